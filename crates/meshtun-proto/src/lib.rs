//! meshtun's wire vocabulary.
//!
//! This crate owns what two meshtun nodes must agree on byte for byte: the
//! names they use for nodes and services, the preamble that opens every
//! forwarded stream, the status the acceptor answers, the ALPN and the QUIC
//! error codes, and the length-prefixed frames enrollment's messages travel
//! in. It takes bytes and returns values: it must not do I/O, read a
//! clock or spawn anything, so it stays deterministic, unit-testable and
//! fuzzable.

mod codes;
mod frame;
mod name;
mod preamble;
mod status;

pub use codes::{ConnectionCode, StreamCode, WELCOME};
pub use frame::{decode_frame_len, encode_frame, FrameLenError, FRAME_PREFIX_LEN, MAX_FRAME_LEN};
pub use name::{NameError, NodeName, ServiceName, MAX_NAME_LEN};
pub use preamble::{Decoded, Kind, Preamble, PreambleError, MAX_PREAMBLE_LEN, VERSION};
pub use status::{Status, StatusCode, StatusError, MAX_DETAIL_LEN, MAX_STATUS_LEN, OK_STATUS};

/// The ALPN protocol id both sides must offer; anything else fails the handshake.
pub const ALPN: &[u8] = b"meshtun/1";
