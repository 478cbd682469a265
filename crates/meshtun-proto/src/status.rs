//! The acceptor's one answer on every stream: a status code and a short,
//! human-readable detail. Anything but [`StatusCode::Ok`] is followed by the
//! acceptor finishing (or resetting) the stream.
//!
//! ```text
//! +------+------------+--------------------+
//! | code | detail len | detail (UTF-8)     |
//! |  u8  |     u8     | 0..=255 bytes      |
//! +------+------------+--------------------+
//! ```

use bytes::BufMut;

/// Longest detail text carried, in bytes.
pub const MAX_DETAIL_LEN: usize = 255;
/// Upper bound on an encoded status.
pub const MAX_STATUS_LEN: usize = 2 + MAX_DETAIL_LEN;

/// The outcome of the acceptor's attempt to connect the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// Connected; bytes now flow both ways.
    Ok,
    /// The acceptor exposes no service of that name.
    UnknownService,
    /// The service exists but the opener's identity is not allowed to reach it.
    Forbidden,
    /// The target refused the TCP connection.
    Refused,
    /// The target could not be reached (no route, host down, connect timeout).
    Unreachable,
    /// The acceptor could not read a valid preamble.
    BadPreamble,
    /// The acceptor is at a limit (too many streams, shutting down).
    Unavailable,
    /// A code this build does not know; treated as a failure.
    Other(u8),
}

impl StatusCode {
    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            StatusCode::Ok => 0,
            StatusCode::UnknownService => 1,
            StatusCode::Forbidden => 2,
            StatusCode::Refused => 3,
            StatusCode::Unreachable => 4,
            StatusCode::BadPreamble => 5,
            StatusCode::Unavailable => 6,
            StatusCode::Other(byte) => byte,
        }
    }

    /// The code for a wire byte; unknown bytes become [`StatusCode::Other`].
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0 => StatusCode::Ok,
            1 => StatusCode::UnknownService,
            2 => StatusCode::Forbidden,
            3 => StatusCode::Refused,
            4 => StatusCode::Unreachable,
            5 => StatusCode::BadPreamble,
            6 => StatusCode::Unavailable,
            other => StatusCode::Other(other),
        }
    }

    /// A stable lower-case name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::Ok => "ok",
            StatusCode::UnknownService => "unknown_service",
            StatusCode::Forbidden => "forbidden",
            StatusCode::Refused => "refused",
            StatusCode::Unreachable => "unreachable",
            StatusCode::BadPreamble => "bad_preamble",
            StatusCode::Unavailable => "unavailable",
            StatusCode::Other(_) => "other",
        }
    }
}

/// The encoded `ok` status (code 0, no detail), for senders that answer it
/// on every stream without encoding it each time.
pub const OK_STATUS: &[u8] = &[0, 0];

/// A status answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The outcome.
    pub code: StatusCode,
    /// Human-readable detail, for the opener's log. Never secret.
    pub detail: String,
}

/// Why bytes are not a valid status. Every variant is the acceptor's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// The detail is not UTF-8.
    #[error("status detail is not valid UTF-8")]
    DetailNotUtf8,
}

impl Status {
    /// A status with a detail, cut to [`MAX_DETAIL_LEN`] bytes at a character boundary.
    pub fn new(code: StatusCode, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL_LEN {
            let mut end = MAX_DETAIL_LEN;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Self { code, detail }
    }

    /// The status that lets bytes flow.
    pub fn ok() -> Self {
        Self {
            code: StatusCode::Ok,
            detail: String::new(),
        }
    }

    /// Number of bytes [`Status::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        2 + self.wire_detail().len()
    }

    /// The detail bytes that go on the wire: `new` bounds the detail, and a
    /// hand-built Status is cut here at a character boundary so the encoding
    /// stays valid UTF-8.
    fn wire_detail(&self) -> &[u8] {
        let mut end = self.detail.len().min(MAX_DETAIL_LEN);
        while !self.detail.is_char_boundary(end) {
            end -= 1;
        }
        &self.detail.as_bytes()[..end]
    }

    /// Appends the encoded status to `out`.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        let detail = self.wire_detail();
        out.put_u8(self.code.to_byte());
        out.put_u8(detail.len() as u8);
        out.put_slice(detail);
    }

    /// Decodes a status from the start of `input`: `Ok(None)` while more
    /// bytes are needed, else the status and the number of bytes it took.
    pub fn decode(input: &[u8]) -> Result<Option<(Status, usize)>, StatusError> {
        let (Some(&code), Some(&detail_len)) = (input.first(), input.get(1)) else {
            return Ok(None);
        };
        let len = 2 + usize::from(detail_len);
        let Some(detail) = input.get(2..len) else {
            return Ok(None);
        };
        let detail = std::str::from_utf8(detail).map_err(|_| StatusError::DetailNotUtf8)?;
        Ok(Some((
            Status {
                code: StatusCode::from_byte(code),
                detail: detail.to_owned(),
            },
            len,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(status: &Status) -> Vec<u8> {
        let mut out = Vec::new();
        status.encode(&mut out);
        assert_eq!(out.len(), status.encoded_len());
        out
    }

    #[test]
    fn every_code_round_trips_through_its_byte() {
        for byte in 0..=255u8 {
            assert_eq!(StatusCode::from_byte(byte).to_byte(), byte);
        }
        assert_eq!(StatusCode::from_byte(0), StatusCode::Ok);
        assert_eq!(StatusCode::from_byte(200), StatusCode::Other(200));
    }

    #[test]
    fn status_round_trips_with_payload_behind_it() {
        let status = Status::new(StatusCode::Refused, "127.0.0.1:29500: connection refused");
        let mut bytes = encode(&status);
        let len = bytes.len();
        bytes.extend_from_slice(b"payload");
        assert_eq!(Status::decode(&bytes), Ok(Some((status, len))));
        assert_eq!(
            Status::decode(&encode(&Status::ok())),
            Ok(Some((Status::ok(), 2)))
        );
    }

    #[test]
    fn truncations_ask_for_more() {
        let bytes = encode(&Status::new(
            StatusCode::Forbidden,
            "node-b may not reach svc",
        ));
        for cut in 0..bytes.len() {
            assert_eq!(Status::decode(&bytes[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn oversized_detail_is_cut_at_a_character_boundary() {
        let status = Status::new(StatusCode::Unreachable, "é".repeat(200));
        assert!(status.detail.len() <= MAX_DETAIL_LEN);
        assert!(status.detail.len() >= MAX_DETAIL_LEN - 1);
        let hand_built = Status {
            code: StatusCode::Unreachable,
            detail: "é".repeat(200),
        };
        let bytes = encode(&hand_built);
        assert!(bytes.len() <= MAX_STATUS_LEN);
        let (decoded, _) = Status::decode(&bytes).expect("valid").expect("complete");
        assert_eq!(decoded.detail, status.detail);
    }

    #[test]
    fn the_ok_constant_is_the_encoded_ok_status() {
        assert_eq!(encode(&Status::ok()), OK_STATUS);
    }

    #[test]
    fn garbage_detail_is_an_error() {
        assert_eq!(
            Status::decode(&[3, 2, 0xff, 0xfe]),
            Err(StatusError::DetailNotUtf8)
        );
    }
}
