//! The enrollment protocol on the wire, over TLS 1.3 (ALPN
//! [`ENROLL_ALPN`](crate::ENROLL_ALPN) to join,
//! [`RENEW_ALPN`](crate::RENEW_ALPN) to renew). Both directions: a 4-byte
//! big-endian length, then that many bytes of JSON, at most
//! [`MAX_MESSAGE_LEN`] (meshtun-proto's frame codec). Request
//! `{"version":1,"token":"mtjoin1.<id>.<secret>","csr":"<PEM>"}` (a renewal:
//! `{"version":1,"csr":"<PEM>"}`); answer
//! `{"certificate":"<PEM>","ca":"<PEM>"}` or
//! `{"error":"<code>","message":"<text>"}` with a code of
//! [`RefusalCode`].

use std::fmt;
use std::io;
use std::time::Duration;

use meshtun_proto::FRAME_PREFIX_LEN;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{EnrollError, Refusal, RefusalCode};

/// The enrollment protocol version this build speaks.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response body, in bytes.
pub const MAX_MESSAGE_LEN: usize = meshtun_proto::MAX_FRAME_LEN;

/// A node's renewal request, sent over a connection with ALPN
/// [`RENEW_ALPN`](crate::RENEW_ALPN) on which it presented its current
/// certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenewRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The CSR for the node's fresh key, in PEM.
    pub csr: String,
}

/// The client's request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnrollRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The join token, secret included.
    pub token: String,
    /// The CSR in PEM.
    pub csr: String,
    /// Seconds the node asks its certificate to be valid for (`join
    /// --valid-for`): it may ask for less than the token grants, not more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for: Option<u64>,
}

/// How long after a certificate's renewal the same certificate may ask
/// again (the node never got the first answer); later, it is refused.
pub(crate) const RENEWED_RETRY_WINDOW: Duration = Duration::from_secs(30 * 60);

/// The shortest lifetime a node may ask for when it joins.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(60);

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("version", &self.version)
            .field("token", &"[elided]")
            .field("csr_len", &self.csr.len())
            .finish()
    }
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnrollResponse {
    /// The certificate and the CA certificate, both PEM.
    Issued {
        /// The node's new certificate.
        certificate: String,
        /// The CA certificate that signed it.
        ca: String,
    },
    /// A refusal.
    Refused {
        /// A [`RefusalCode`] string.
        error: String,
        /// What to do about it.
        message: String,
    },
}

/// `message` as JSON behind its 4-byte big-endian length.
pub fn encode_frame(message: &impl Serialize) -> Result<Vec<u8>, EnrollError> {
    let body = serde_json::to_vec(message)
        .map_err(|error| EnrollError::Response(format!("cannot encode: {error}")))?;
    meshtun_proto::encode_frame(&body).map_err(|error| {
        EnrollError::Response(format!(
            "message of {} bytes is over the {MAX_MESSAGE_LEN}-byte limit",
            error.len
        ))
    })
}

/// The body length a frame's 4-byte prefix announces, if it is within
/// 1..=[`MAX_MESSAGE_LEN`].
pub fn frame_len(prefix: [u8; FRAME_PREFIX_LEN]) -> Result<usize, Refusal> {
    meshtun_proto::decode_frame_len(prefix).map_err(|error| {
        Refusal::new(
            RefusalCode::BadRequest,
            format!(
                "a message is a 4-byte big-endian length of 1 to {MAX_MESSAGE_LEN} and that many \
                 bytes of JSON; this one announced {} bytes",
                error.len
            ),
        )
    })
}

/// Reads one frame. An I/O failure is the outer error; a length out of
/// bounds is a refusal to send back (the body is not read).
pub(crate) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<Result<Vec<u8>, Refusal>> {
    let mut prefix = [0u8; FRAME_PREFIX_LEN];
    stream.read_exact(&mut prefix).await?;
    let len = match frame_len(prefix) {
        Ok(len) => len,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Ok(body))
}

/// Parses a response body.
pub fn decode_response(body: &[u8]) -> Result<EnrollResponse, EnrollError> {
    serde_json::from_slice(body).map_err(|error| EnrollError::Response(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_messages() {
        let frame = encode_frame(&EnrollResponse::Refused {
            error: "bad_request".to_owned(),
            message: "m".to_owned(),
        })
        .unwrap();
        let len = frame_len(frame[..FRAME_PREFIX_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - FRAME_PREFIX_LEN);
        assert_eq!(
            decode_response(&frame[FRAME_PREFIX_LEN..]).unwrap(),
            EnrollResponse::Refused {
                error: "bad_request".to_owned(),
                message: "m".to_owned()
            }
        );
        assert_eq!(
            String::from_utf8(frame[FRAME_PREFIX_LEN..].to_vec()).unwrap(),
            r#"{"error":"bad_request","message":"m"}"#
        );
        let issued = encode_frame(&EnrollResponse::Issued {
            certificate: "c".to_owned(),
            ca: "a".to_owned(),
        })
        .unwrap();
        assert_eq!(
            &issued[FRAME_PREFIX_LEN..],
            br#"{"certificate":"c","ca":"a"}"#
        );
        for prefix in [0u32, MAX_MESSAGE_LEN as u32 + 1, u32::MAX] {
            assert_eq!(
                frame_len(prefix.to_be_bytes()).unwrap_err().code,
                RefusalCode::BadRequest
            );
        }
        assert!(encode_frame(&"x".repeat(MAX_MESSAGE_LEN)).is_err());
        for code in RefusalCode::ALL {
            assert_eq!(RefusalCode::parse(code.as_str()), Some(code));
        }
        let request = EnrollRequest {
            version: 1,
            token: "mtjoin1.secret".to_owned(),
            csr: String::new(),
            valid_for: None,
        };
        assert!(!format!("{request:?}").contains("secret"));
    }
}
