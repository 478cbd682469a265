//! What `/status` returns: the node's state as JSON, for `meshtun status`
//! and for scripts. The same types deserialize it again, so the CLI and the
//! daemon cannot drift apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The whole `/status` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's name (its certificate identity).
    pub node: String,
    /// The meshtun version that is running.
    pub version: String,
    /// The UDP address of the QUIC endpoint.
    pub quic_listen: SocketAddr,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// Whether the node is draining (SIGTERM received).
    pub draining: bool,
    /// Threads running the node's work (`limits.worker_threads`).
    #[serde(default)]
    pub worker_threads: usize,
    /// The data-plane shards (`limits.shards`), in order.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
    /// The certificate in use.
    pub certificate: CertificateStatus,
    /// Reloads so far and the last failure.
    pub reload: ReloadStatus,
    /// Every configured peer, and every peer that connected to this node.
    pub peers: Vec<PeerStatus>,
    /// Incoming handshakes that failed before a peer identity was known,
    /// by reason.
    pub incoming_handshakes_failed: BTreeMap<String, u64>,
    /// Node-wide limits that were hit, by config key, with how often (only
    /// limits hit at least once). Per-peer stream limits are in each peer's
    /// `refused_incoming`.
    #[serde(default)]
    pub limit_hits: BTreeMap<String, u64>,
    /// The forward listeners.
    pub forwards: Vec<ForwardStatus>,
    /// The exposed services.
    pub exposes: Vec<ExposeStatus>,
    /// Overlay mode, if `[overlay]` is configured.
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
    /// The port guard, if `[guard]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardStatus>,
}

/// The port guard of `[guard]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardStatus {
    /// The guarded ports, as `29500, 29550-29560`.
    pub ports: String,
    /// Packets the guards dropped (the overlay's and this one share the
    /// counter), as last read from nftables; absent while the daemon
    /// cannot read it (reading needs `CAP_NET_ADMIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass_dropped: Option<u64>,
}

/// One data-plane shard: a thread with its own QUIC sockets, connections
/// and streams. The per-peer figures in `peers` are summed over shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// Its place among the node's shards, from 0.
    pub index: usize,
    /// The local UDP address its dialled connections leave from.
    pub dial_addr: SocketAddr,
    /// Dialled connections up, over all peers.
    pub connections_outgoing: usize,
    /// Connections peers dialled that it accepted and holds.
    pub connections_incoming: usize,
    /// Forwarded connections it handles now, either way (a local
    /// connection counts from its accept, before its stream is open).
    pub open_streams: u64,
    /// Forwarded connections it has handled since start, either way,
    /// refused ones included.
    pub streams: u64,
}

/// Overlay mode on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// This node's overlay address.
    pub address: std::net::Ipv4Addr,
    /// The block every node's overlay address is in.
    pub prefix: String,
    /// The bound transparent listener.
    pub listen: SocketAddr,
    /// The dummy interface that holds `address`.
    pub interface: String,
    /// Whether the daemon set up the interface and nftables table itself.
    pub managed: bool,
    /// Whether `overlay.guard` is on (packets for the prefix from off the
    /// node are dropped). Absent from an older daemon, which had no guard.
    #[serde(default)]
    pub guard: bool,
    /// Packets the guard dropped, as last read from nftables; absent while
    /// the daemon cannot read it (reading needs `CAP_NET_ADMIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass_dropped: Option<u64>,
    /// Each peer's overlay address, by peer name.
    pub peers: BTreeMap<String, std::net::Ipv4Addr>,
}

/// The node certificate in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// The identity the certificate names.
    pub identity: String,
    /// Its serial number, hex.
    pub serial: String,
    /// SHA-256 fingerprint of the certificate.
    pub fingerprint: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
    /// Seconds until expiry (negative once expired).
    pub expires_in_seconds: i64,
    /// Self-renewal (`[tls] renew`), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal: Option<RenewalStatus>,
}

/// The node renewing its own certificate (`[tls] renew`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalStatus {
    /// The renewal server, `host:port`.
    pub server: String,
    /// At which share of the lifetime it renews, in percent.
    pub at_percent: u8,
    /// Whether an attempt is running now.
    pub in_progress: bool,
    /// When the next attempt starts, Unix seconds; `None` while one runs.
    pub next_attempt_unix: Option<i64>,
    /// When the last attempt started, Unix seconds.
    pub last_attempt_unix: Option<i64>,
    /// Why the last attempt failed; `None` after a success.
    pub last_error: Option<String>,
    /// Renewals installed since start.
    pub successes: u64,
    /// Failed attempts since start.
    pub failures: u64,
}

/// Reload history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// Reloads applied.
    pub successes: u64,
    /// Reloads refused; the node kept its previous configuration.
    pub failures: u64,
    /// Unix seconds of the last reload attempt, if any.
    pub last_attempt_unix: Option<i64>,
    /// Why the last attempt failed; `None` once a reload succeeds.
    pub last_error: Option<String>,
}

/// One peer, seen from this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's name.
    pub name: String,
    /// The configured address, if this node dials the peer.
    pub addr: Option<String>,
    /// Dialled connections that are up.
    pub connections_up: usize,
    /// Dialled connections configured (`quic.connections_per_peer`), 0 for
    /// peers that only connect to us.
    pub connections_configured: usize,
    /// Connections the peer dialled to this node that are up.
    pub connections_incoming: usize,
    /// Smoothed RTT of the best live connection, milliseconds.
    pub rtt_ms: Option<f64>,
    /// The largest UDP payload MTU discovery has found usable on the live
    /// connections (bytes; 1200 until discovery raises it, at most 8952).
    #[serde(default)]
    pub path_mtu: Option<u16>,
    /// The certificates the peer presented on its live connections (more
    /// than one while connections from before a rotation are still open).
    pub certificates: Vec<PeerCertificate>,
    /// Stream payload bytes sent to the peer.
    pub sent_bytes: u64,
    /// Stream payload bytes received from the peer.
    pub received_bytes: u64,
    /// Streams this node opened to the peer (forwards), in all.
    pub streams_outgoing: u64,
    /// Streams the peer opened to this node (exposes), in all.
    pub streams_incoming: u64,
    /// Streams open now, both directions.
    pub open_streams: i64,
    /// Streams refused to this node, by reason.
    pub refused_outgoing: BTreeMap<String, u64>,
    /// Streams this node refused the peer, by reason.
    pub refused_incoming: BTreeMap<String, u64>,
    /// Failed dials to the peer, by reason.
    pub handshakes_failed: BTreeMap<String, u64>,
    /// Live connections closed because the peer's certificate lost trust,
    /// by reason (`expired`, `revoked`, `untrusted`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connections_cut: BTreeMap<String, u64>,
    /// Times a lost connection came back.
    pub reconnects: u64,
    /// The last dial error, if the peer is not reachable now.
    pub last_error: Option<String>,
}

/// A certificate a peer presented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerCertificate {
    /// Serial number, hex.
    pub serial: String,
    /// SHA-256 fingerprint.
    pub fingerprint: String,
}

/// One `[[forward]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// The bound local address.
    pub listen: SocketAddr,
    /// The peer it sends to.
    pub peer: String,
    /// The service it asks for.
    pub service: String,
}

/// One `[[expose]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposeStatus {
    /// The service name.
    pub service: String,
    /// Where its streams go.
    pub target: String,
    /// Who may use it; `["*"]` for every cluster identity.
    pub allow: Vec<String>,
}
