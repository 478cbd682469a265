//! The preamble that opens every forwarded stream.
//!
//! The stream opener writes it and then, without waiting, the client's bytes.
//! Layout (all integers big-endian):
//!
//! ```text
//! +---------+------+-------------------------------------------+
//! | version | kind | body                                      |
//! |   u8    |  u8  | kind 1 (service): len u8, name bytes      |
//! |         |      | kind 2 (overlay port): port u16           |
//! +---------+------+-------------------------------------------+
//! ```
//!
//! Decoding never needs more than [`MAX_PREAMBLE_LEN`] bytes, so the acceptor
//! reads a bounded prefix and hands the rest of the stream to the target.

use bytes::BufMut;

use crate::name::{NameError, ServiceName, MAX_NAME_LEN};

/// The preamble version this build speaks.
pub const VERSION: u8 = 1;

const KIND_SERVICE: u8 = 1;
const KIND_OVERLAY_PORT: u8 = 2;

/// Upper bound on an encoded preamble: version, kind, length and the longest name.
pub const MAX_PREAMBLE_LEN: usize = 3 + MAX_NAME_LEN;

/// What the opener asks the acceptor to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A named service from the acceptor's `[[expose]]` table (forward mode).
    Service(ServiceName),
    /// A TCP port on the acceptor's own overlay address (overlay mode).
    OverlayPort(u16),
}

/// The decoded stream preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// What the stream should be connected to.
    pub kind: Kind,
}

/// Result of feeding a prefix of a stream to [`Preamble::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole preamble; `len` bytes of the input belong to it, the rest is payload.
    Complete {
        /// The preamble.
        preamble: Preamble,
        /// How many input bytes it took.
        len: usize,
    },
    /// The input is a valid prefix; at least `needed` more bytes are required.
    Incomplete {
        /// The minimum number of further bytes before decoding can progress.
        needed: usize,
    },
}

/// Why bytes are not a valid preamble. Every variant is the opener's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// The version byte names a version this build does not speak.
    #[error("unsupported preamble version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The kind byte is not one this version defines.
    #[error("unknown preamble kind {0}")]
    UnknownKind(u8),
    /// The service name's length byte is out of range.
    #[error("service name length {0} is out of range 1..={MAX_NAME_LEN}")]
    BadNameLength(u8),
    /// The service name breaks the naming rules.
    #[error("bad service name in preamble: {0}")]
    BadName(#[from] NameError),
    /// Overlay port 0 cannot be connected to.
    #[error("overlay port 0 is not a valid destination")]
    ZeroPort,
}

impl Preamble {
    /// A preamble asking for the named service.
    pub fn service(name: ServiceName) -> Self {
        Self {
            kind: Kind::Service(name),
        }
    }

    /// A preamble asking for `port` on the acceptor's overlay address.
    /// Port 0 encodes, but the acceptor refuses it ([`PreambleError::ZeroPort`]).
    pub fn overlay_port(port: u16) -> Self {
        Self {
            kind: Kind::OverlayPort(port),
        }
    }

    /// Number of bytes [`Preamble::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match &self.kind {
            Kind::Service(name) => 3 + name.as_str().len(),
            Kind::OverlayPort(_) => 4,
        }
    }

    /// Appends the encoded preamble to `out`.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_u8(VERSION);
        match &self.kind {
            Kind::Service(name) => {
                let bytes = name.as_str().as_bytes();
                out.put_u8(KIND_SERVICE);
                // Names are at most MAX_NAME_LEN (63) bytes by construction.
                out.put_u8(bytes.len() as u8);
                out.put_slice(bytes);
            }
            Kind::OverlayPort(port) => {
                out.put_u8(KIND_OVERLAY_PORT);
                out.put_u16(*port);
            }
        }
    }

    /// Decodes a preamble from the start of `input`.
    ///
    /// Returns [`Decoded::Incomplete`] while `input` is a valid but short
    /// prefix, so a reader can call it again with more bytes. Errors are
    /// reported as early as the offending byte is seen.
    pub fn decode(input: &[u8]) -> Result<Decoded, PreambleError> {
        let Some(&version) = input.first() else {
            return Ok(Decoded::Incomplete { needed: 2 });
        };
        if version != VERSION {
            return Err(PreambleError::UnsupportedVersion(version));
        }
        let Some(&kind) = input.get(1) else {
            return Ok(Decoded::Incomplete { needed: 1 });
        };
        match kind {
            KIND_SERVICE => {
                let Some(&name_len) = input.get(2) else {
                    return Ok(Decoded::Incomplete { needed: 1 });
                };
                if name_len == 0 || usize::from(name_len) > MAX_NAME_LEN {
                    return Err(PreambleError::BadNameLength(name_len));
                }
                let len = 3 + usize::from(name_len);
                let Some(name) = input.get(3..len) else {
                    return Ok(Decoded::Incomplete {
                        needed: len - input.len(),
                    });
                };
                let name = ServiceName::try_from(name)?;
                Ok(Decoded::Complete {
                    preamble: Preamble::service(name),
                    len,
                })
            }
            KIND_OVERLAY_PORT => {
                let Some(port) = input.get(2..4) else {
                    return Ok(Decoded::Incomplete {
                        needed: 4 - input.len(),
                    });
                };
                let port = u16::from_be_bytes([port[0], port[1]]);
                if port == 0 {
                    return Err(PreambleError::ZeroPort);
                }
                Ok(Decoded::Complete {
                    preamble: Preamble::overlay_port(port),
                    len: 4,
                })
            }
            other => Err(PreambleError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> Preamble {
        Preamble::service(ServiceName::new(name).expect("test names are valid"))
    }

    fn encode(preamble: &Preamble) -> Vec<u8> {
        let mut out = Vec::new();
        preamble.encode(&mut out);
        assert_eq!(out.len(), preamble.encoded_len());
        out
    }

    #[test]
    fn service_round_trips_with_payload_behind_it() {
        let preamble = service("vllm-dp-rpc");
        let mut bytes = encode(&preamble);
        assert_eq!(&bytes[..3], &[VERSION, KIND_SERVICE, 11]);
        bytes.extend_from_slice(b"client bytes");
        assert_eq!(
            Preamble::decode(&bytes),
            Ok(Decoded::Complete { preamble, len: 14 })
        );
    }

    #[test]
    fn overlay_port_round_trips() {
        let preamble = Preamble {
            kind: Kind::OverlayPort(29500),
        };
        let bytes = encode(&preamble);
        assert_eq!(bytes, [VERSION, KIND_OVERLAY_PORT, 0x73, 0x3c]);
        assert_eq!(
            Preamble::decode(&bytes),
            Ok(Decoded::Complete { preamble, len: 4 })
        );
    }

    #[test]
    fn every_truncation_is_incomplete_and_asks_for_at_least_one_byte() {
        for preamble in [
            service("s"),
            service(&"x".repeat(MAX_NAME_LEN)),
            Preamble {
                kind: Kind::OverlayPort(1),
            },
        ] {
            let bytes = encode(&preamble);
            for cut in 0..bytes.len() {
                match Preamble::decode(&bytes[..cut]) {
                    Ok(Decoded::Incomplete { needed }) => {
                        assert!(needed >= 1 && cut + needed <= bytes.len(), "cut {cut}")
                    }
                    other => panic!("cut {cut} of {bytes:?} gave {other:?}"),
                }
            }
        }
    }

    #[test]
    fn longest_preamble_fits_the_bound() {
        let bytes = encode(&service(&"x".repeat(MAX_NAME_LEN)));
        assert_eq!(bytes.len(), MAX_PREAMBLE_LEN);
    }

    #[test]
    fn garbage_is_rejected_with_the_reason() {
        assert_eq!(
            Preamble::decode(b"GET / HTTP/1.1\r\n"),
            Err(PreambleError::UnsupportedVersion(b'G'))
        );
        assert_eq!(
            Preamble::decode(&[0]),
            Err(PreambleError::UnsupportedVersion(0))
        );
        assert_eq!(
            Preamble::decode(&[VERSION, 9]),
            Err(PreambleError::UnknownKind(9))
        );
        assert_eq!(
            Preamble::decode(&[VERSION, KIND_SERVICE, 0]),
            Err(PreambleError::BadNameLength(0))
        );
        assert_eq!(
            Preamble::decode(&[VERSION, KIND_SERVICE, 64]),
            Err(PreambleError::BadNameLength(64))
        );
        assert_eq!(
            Preamble::decode(&[VERSION, KIND_SERVICE, 255, b'a']),
            Err(PreambleError::BadNameLength(255))
        );
        assert!(matches!(
            Preamble::decode(&[VERSION, KIND_SERVICE, 3, b'a', b' ', b'b']),
            Err(PreambleError::BadName(NameError::BadCharacter {
                found: ' ',
                ..
            }))
        ));
        assert!(matches!(
            Preamble::decode(&[VERSION, KIND_SERVICE, 2, 0xc3, 0x28]),
            Err(PreambleError::BadName(_))
        ));
        assert_eq!(
            Preamble::decode(&[VERSION, KIND_OVERLAY_PORT, 0, 0]),
            Err(PreambleError::ZeroPort)
        );
    }

    #[test]
    fn no_input_of_up_to_three_bytes_panics() {
        // Exhaustive over every 0..=3 byte input: decode returns a value, never panics.
        let mut input = [0u8; 3];
        for first in 0..=255u8 {
            for second in 0..=255u8 {
                for third in [0u8, 1, 2, 63, 64, 255] {
                    input[0] = first;
                    input[1] = second;
                    input[2] = third;
                    for cut in 0..=3 {
                        let _ = Preamble::decode(&input[..cut]);
                    }
                }
            }
        }
    }
}
