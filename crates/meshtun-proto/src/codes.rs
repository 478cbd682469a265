//! QUIC application error codes meshtun uses when it resets a stream or
//! closes a connection, so each side can tell the other why.

/// The acceptor's greeting, sent on the one unidirectional stream it opens
/// after it has checked the dialer's identity. A TLS 1.3 client finishes its
/// handshake before the server has looked at the client certificate, so the
/// dialer counts a connection as usable only once this has arrived: a
/// rejected certificate then shows up as a failed dial, with the reason.
pub const WELCOME: &[u8] = b"meshtun/1 welcome";

/// Codes for `RESET_STREAM` / `STOP_SENDING` on a forwarded stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum StreamCode {
    /// The TCP connection at the resetting side was reset (RST) or failed.
    TcpReset = 1,
    /// The acceptor refused the stream; the status said why.
    Refused = 2,
    /// The preamble was malformed or did not arrive in time.
    BadPreamble = 3,
    /// The node is shutting down and its drain period ended.
    Shutdown = 4,
    /// A local failure (I/O error) that is nobody's protocol fault.
    Internal = 5,
    /// The opener already has `quic.max_streams_per_peer` streams open on
    /// this node, over all its connections.
    StreamLimit = 6,
    /// The opener already has `limits.pending_streams_per_peer` streams
    /// waiting for their preamble or their target.
    PendingLimit = 7,
    /// The preamble did not arrive within `limits.preamble_timeout`.
    PreambleTimeout = 8,
}

impl StreamCode {
    /// The code as a QUIC variable-length integer value.
    pub fn to_u32(self) -> u32 {
        self as u32
    }

    /// A stable lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamCode::TcpReset => "tcp_reset",
            StreamCode::Refused => "refused",
            StreamCode::BadPreamble => "bad_preamble",
            StreamCode::Shutdown => "shutdown",
            StreamCode::Internal => "internal",
            StreamCode::StreamLimit => "stream_limit",
            StreamCode::PendingLimit => "pending_limit",
            StreamCode::PreambleTimeout => "preamble_timeout",
        }
    }

    /// The code for a received value, if it is one of ours.
    pub fn from_u64(value: u64) -> Option<Self> {
        match value {
            1 => Some(StreamCode::TcpReset),
            2 => Some(StreamCode::Refused),
            3 => Some(StreamCode::BadPreamble),
            4 => Some(StreamCode::Shutdown),
            5 => Some(StreamCode::Internal),
            6 => Some(StreamCode::StreamLimit),
            7 => Some(StreamCode::PendingLimit),
            8 => Some(StreamCode::PreambleTimeout),
            _ => None,
        }
    }
}

/// Codes for `CONNECTION_CLOSE` between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ConnectionCode {
    /// Orderly close: the node is shutting down or the connection is surplus.
    Shutdown = 0,
    /// The peer's certificate carries no usable meshtun identity.
    NoIdentity = 1,
    /// The peer broke the protocol (for example opened a unidirectional stream).
    ProtocolViolation = 2,
    /// The peer's certificate no longer verifies against this node's trust
    /// for a reason other than the two below (its CA left the bundle).
    Untrusted = 3,
    /// The peer already has `limits.connections_per_peer` connections open.
    ConnectionLimit = 4,
    /// The peer's certificate, or one of its chain, expired while the
    /// connection was up. A peer with a renewed certificate dials again.
    Expired = 5,
    /// A newly loaded CRL revokes the peer's certificate.
    Revoked = 6,
    /// A reload removed the peer from this node's configuration (a
    /// `[[peer]]`, or a node of the cluster manifest). Sent by the node
    /// that dialled, once its streams on the connection are done.
    Removed = 7,
}

impl ConnectionCode {
    /// The code as a QUIC variable-length integer value.
    pub fn to_u32(self) -> u32 {
        self as u32
    }

    /// Reason phrase sent alongside the code.
    pub fn reason(self) -> &'static [u8] {
        match self {
            ConnectionCode::Shutdown => b"shutdown",
            ConnectionCode::NoIdentity => b"no meshtun identity in certificate",
            ConnectionCode::ProtocolViolation => b"protocol violation",
            ConnectionCode::Untrusted => b"certificate no longer trusted",
            ConnectionCode::ConnectionLimit => b"too many connections from this peer",
            ConnectionCode::Expired => b"certificate expired",
            ConnectionCode::Revoked => b"certificate revoked",
            ConnectionCode::Removed => b"peer removed from the configuration",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_codes_round_trip() {
        for code in [
            StreamCode::TcpReset,
            StreamCode::Refused,
            StreamCode::BadPreamble,
            StreamCode::Shutdown,
            StreamCode::Internal,
            StreamCode::StreamLimit,
            StreamCode::PendingLimit,
            StreamCode::PreambleTimeout,
        ] {
            assert_eq!(StreamCode::from_u64(u64::from(code.to_u32())), Some(code));
            assert!(!code.as_str().is_empty());
        }
        assert_eq!(StreamCode::from_u64(0), None);
        assert_eq!(StreamCode::from_u64(9), None);
        assert_eq!(StreamCode::from_u64(99), None);
    }
}
