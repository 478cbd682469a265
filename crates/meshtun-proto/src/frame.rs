//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes
//! of body, 1 to [`MAX_FRAME_LEN`]. Enrollment (`meshtun pki serve`,
//! `meshtun join`) sends one JSON message in each; this module knows only
//! the bytes.
//!
//! ```text
//! +----------------+------------------+
//! | body len       | body             |
//! | u32 big-endian | 1..=65536 bytes  |
//! +----------------+------------------+
//! ```

/// Largest frame body, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX_LEN: usize = 4;

/// A body length no frame may have: over [`MAX_FRAME_LEN`] (a body to send,
/// or a length a prefix announced), or 0 (announced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame body is 1 to {MAX_FRAME_LEN} bytes, not {len}")]
pub struct FrameLenError {
    /// The length refused.
    pub len: usize,
}

/// `body` behind its 4-byte big-endian length.
pub fn encode_frame(body: &[u8]) -> Result<Vec<u8>, FrameLenError> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| (*len as usize) <= MAX_FRAME_LEN)
        .ok_or(FrameLenError { len: body.len() })?;
    let mut frame = Vec::with_capacity(FRAME_PREFIX_LEN + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// The body length a frame's prefix announces, if it is within
/// 1..=[`MAX_FRAME_LEN`].
pub fn decode_frame_len(prefix: [u8; FRAME_PREFIX_LEN]) -> Result<usize, FrameLenError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(FrameLenError { len });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_its_big_endian_length_then_its_body() {
        let frame = encode_frame(b"{}").unwrap();
        assert_eq!(frame, [0, 0, 0, 2, b'{', b'}']);
        let prefix: [u8; FRAME_PREFIX_LEN] = frame[..FRAME_PREFIX_LEN].try_into().unwrap();
        assert_eq!(decode_frame_len(prefix), Ok(2));

        let longest = vec![b'x'; MAX_FRAME_LEN];
        let frame = encode_frame(&longest).unwrap();
        assert_eq!(frame[..FRAME_PREFIX_LEN], [0, 1, 0, 0]);
        assert_eq!(&frame[FRAME_PREFIX_LEN..], &longest[..]);
        assert_eq!(decode_frame_len([0, 1, 0, 0]), Ok(MAX_FRAME_LEN));
        assert_eq!(decode_frame_len([0, 0, 0, 1]), Ok(1));
    }

    #[test]
    fn a_body_over_the_limit_is_not_framed() {
        let error = encode_frame(&vec![0; MAX_FRAME_LEN + 1]).unwrap_err();
        assert_eq!(error.len, MAX_FRAME_LEN + 1);
        assert_eq!(
            error.to_string(),
            format!(
                "a frame body is 1 to 65536 bytes, not {}",
                MAX_FRAME_LEN + 1
            )
        );
    }

    #[test]
    fn a_prefix_announcing_nothing_or_too_much_is_refused() {
        for announced in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            assert_eq!(
                decode_frame_len(announced.to_be_bytes()),
                Err(FrameLenError {
                    len: announced as usize
                })
            );
        }
    }
}
