//! The validated configuration. Every value here has passed its checks, so
//! code that holds a [`Config`] never re-validates or unwraps it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshtun_proto::{NodeName, ServiceName};

use crate::HostPort;

/// A node's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's name; it must equal the identity in its certificate.
    pub node: NodeName,
    /// The QUIC endpoint and its transport limits.
    pub quic: Quic,
    /// Where the CA bundle, this node's certificate and key, and the CRL are.
    pub tls: Tls,
    /// The nodes this node dials, in file order; names are unique and never `node`.
    pub peers: Vec<Peer>,
    /// Local listeners that carry connections to services on peers, in file order.
    pub forwards: Vec<Forward>,
    /// Services this node offers to its peers, in file order; names are unique.
    pub exposes: Vec<Expose>,
    /// Timeouts of the forwarding path.
    pub limits: Limits,
    /// The metrics and status endpoint, if `[admin]` is present.
    pub admin: Option<Admin>,
    /// Overlay mode, if `[overlay]` is present.
    pub overlay: Option<Overlay>,
    /// The port guard for services that cannot bind loopback, if `[guard]`
    /// is present.
    pub guard: Option<Guard>,
    /// The cluster manifest this node's peers, forwards and exposes also
    /// come from (`cluster = "PATH"`), if any.
    pub cluster: Option<ClusterSource>,
}

/// `cluster = "PATH"`: the manifest, and what [`load`](crate::load) took
/// from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSource {
    /// The manifest file, resolved against the config file's directory by
    /// [`load`](crate::load).
    pub path: PathBuf,
    /// The manifest's cluster name, once [`load`](crate::load) read it.
    pub name: Option<String>,
}

impl Config {
    /// The declared peer called `name`.
    pub fn peer(&self, name: &NodeName) -> Option<&Peer> {
        self.peers.iter().find(|peer| &peer.name == name)
    }

    /// The expose entry for `service`.
    pub fn expose(&self, service: &ServiceName) -> Option<&Expose> {
        self.exposes
            .iter()
            .find(|expose| &expose.service == service)
    }
}

/// The `[quic]` section: the endpoint's address and transport settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quic {
    /// The UDP address to bind, which peers dial. Required: there is no default.
    pub listen: SocketAddr,
    /// Warm QUIC connections kept to each peer (1..=16, default 1).
    pub connections_per_peer: NonZeroUsize,
    /// A connection that hears nothing for this long is dead (1s..=600s, default 10s).
    pub idle_timeout: Duration,
    /// Ping interval on a quiet connection; always shorter than `idle_timeout` (default 2s).
    pub keep_alive: Duration,
    /// How long a QUIC handshake may take (100ms..=60s, default 5s).
    pub handshake_timeout: Duration,
    /// Concurrent streams (forwarded TCP connections) a peer may have open
    /// to this node, over all its connections; streams beyond it on another
    /// of its connections are reset with `STREAM_LIMIT` (1..=1_000_000,
    /// default 16384).
    pub max_streams_per_peer: u32,
    /// Per-stream receive window in bytes (64 KiB..=1 GiB, default 4 MiB,
    /// sized for 25 Gbit/s x 1 ms).
    pub stream_window: u64,
    /// Per-connection receive window in bytes; at least `stream_window`, at
    /// most 4 GiB (default 128 MiB: room for 32 streams whose local reader
    /// stalls before the other streams of the connection must wait).
    pub connection_window: u64,
    /// Per-connection send window in bytes (64 KiB..=4 GiB, default 32 MiB).
    pub send_window: u64,
    /// `SO_SNDBUF` to request for the UDP socket (64 KiB..=1 GiB, default 8 MiB).
    pub udp_send_buffer: usize,
    /// `SO_RCVBUF` to request for the UDP socket (64 KiB..=1 GiB, default 8 MiB).
    pub udp_recv_buffer: usize,
    /// First re-dial backoff after a lost connection (10ms..=60s, default 100ms).
    pub reconnect_min: Duration,
    /// Backoff cap; at least `reconnect_min`, at most 600s (default 10s).
    pub reconnect_max: Duration,
}

/// The `[tls]` section: file paths, resolved against the config file's
/// directory by [`load`](crate::load) when relative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM bundle of the cluster CA certificates (several, to rotate).
    pub ca: PathBuf,
    /// PEM certificate chain of this node.
    pub cert: PathBuf,
    /// PEM private key of this node.
    pub key: PathBuf,
    /// Optional PEM certificate revocation list, enforced on both sides.
    pub crl: Option<PathBuf>,
    /// `renew = { .. }`: the node renews its own certificate.
    pub renew: Option<Renew>,
}

/// `[tls] renew`: where and when the node renews its certificate itself
/// (a fresh key, a CSR, mTLS with the current certificate against
/// `meshtun pki serve`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renew {
    /// The renewal server (`meshtun pki serve`), `host:port`.
    pub server: HostPort,
    /// The pinned CA: `sha256:` and 64 hex digits, as `pki serve` prints it.
    pub ca_fingerprint: String,
    /// At which share of its lifetime a certificate is renewed, in percent
    /// (`at = 0.67` is 67).
    pub at_percent: u8,
}

impl Renew {
    /// The default of `at`: two thirds of the lifetime.
    pub const DEFAULT_AT_PERCENT: u8 = 67;
}

impl Tls {
    /// Makes every relative path relative to `directory` instead.
    pub(crate) fn resolve_relative_to(&mut self, directory: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = directory.join(&*path);
            }
        };
        resolve(&mut self.ca);
        resolve(&mut self.cert);
        resolve(&mut self.key);
        if let Some(crl) = &mut self.crl {
            resolve(crl);
        }
    }
}

/// A `[[peer]]`: a node this node dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's identity; its certificate must carry exactly this name.
    pub name: NodeName,
    /// Where to dial it; a DNS name is re-resolved on every dial.
    pub addr: HostPort,
    /// Its overlay address (overlay mode): TCP to this address on this node
    /// is carried to the peer. Inside `overlay.prefix`, unique.
    pub overlay: Option<Ipv4Addr>,
}

/// A `[[forward]]`: a local TCP listener whose connections go to a service on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The TCP address to listen on: a fixed port, loopback unless
    /// `allow_non_loopback` is set.
    pub listen: SocketAddr,
    /// The declared peer that hosts the service.
    pub peer: NodeName,
    /// The service's name on that peer.
    pub service: ServiceName,
    /// The operator accepted a listener reachable from beyond this host.
    pub allow_non_loopback: bool,
}

/// An `[[expose]]`: a service this node offers, and who may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    /// The name peers ask for; unique among exposes.
    pub service: ServiceName,
    /// Where this node connects for each accepted stream.
    pub target: HostPort,
    /// Which peer identities may reach the service.
    pub allow: Allow,
}

/// Who may reach an exposed service. There is no "nobody" variant: an empty
/// allow list is refused when parsing, since it would expose nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Every identity the cluster CA vouches for (`allow = ["*"]`).
    Any,
    /// Exactly these identities; never empty.
    Only(BTreeSet<NodeName>),
}

impl Allow {
    /// True if a peer authenticated as `identity` may reach the service.
    pub fn permits(&self, identity: &NodeName) -> bool {
        match self {
            Self::Any => true,
            Self::Only(names) => names.contains(identity),
        }
    }
}

/// The `[limits]` section: what one peer, or the network at large, may
/// make this node hold. Every limit, when hit, refuses the excess with a
/// specific code, counts it, and logs it at most once a minute per peer and
/// reason; what is already established is not disturbed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long an acceptor waits for a stream's preamble (100ms..=60s, default 5s).
    pub preamble_timeout: Duration,
    /// TCP connect timeout to an expose target (100ms..=60s, default 5s).
    pub connect_timeout: Duration,
    /// On SIGTERM, how long open streams may finish (0s..=600s, default 10s).
    pub drain_grace: Duration,
    /// Streams of one peer that are not yet answered (preamble not read,
    /// target not yet connected) at once; more are reset with
    /// `PENDING_LIMIT` (1..=1_000_000, default 1024).
    pub pending_streams_per_peer: u32,
    /// QUIC connections one peer identity may have open to this node at
    /// once; more are closed (1..=1024, default 256). A peer dials one
    /// connection per shard, times `quic.connections_per_peer`: the default
    /// covers a 128-CPU peer with one connection per shard twice over, for
    /// the overlap while it reconnects.
    pub connections_per_peer: u32,
    /// Incoming QUIC handshakes in progress at once, from anyone; more are
    /// refused (1..=100_000, default 64).
    pub handshakes: u32,
    /// Once this many handshakes are in progress, a new client must first
    /// prove its address with a QUIC Retry round trip; 0 asks every client
    /// (0..=100_000, default 8).
    pub retry_above: u32,
    /// Longest pause of a listener whose accept keeps failing (out of file
    /// descriptors); the pause doubles from 5 ms up to this (10ms..=60s,
    /// default 1s).
    pub accept_backoff_max: Duration,
    /// Memory, in bytes, the node may hold in TCP read buffers of forwarded
    /// streams at once; a stream that needs a buffer beyond it waits for one
    /// (1 MiB..=64 GiB, default 256 MiB). A restart applies a change.
    pub buffer_memory: u64,
    /// The async worker threads that run the daemon's control work (admin
    /// endpoint, reloads, signals), and the bound on the default shard
    /// count (1..=1024; default one per CPU it may run on). The shards, which
    /// carry the data plane, are threads of their own, so with the defaults
    /// meshtun keeps about as many cores busy as there are shards. It
    /// bounds how many cores, not which: to keep meshtun off the cores a GPU
    /// node's inference workers use, pin it as well (systemd
    /// `CPUAffinity=`, `taskset`). The main thread and tokio's blocking pool
    /// (name lookups, file reads) come on top. A restart applies a change.
    pub worker_threads: Option<NonZeroUsize>,
    /// How many shards carry the data plane (1..=1024; default one per CPU
    /// the daemon may run on, capped by `worker_threads`; if both are set,
    /// at most `worker_threads`). A shard is one thread running one event
    /// loop that owns its UDP sockets, its QUIC connections to every peer
    /// and the TCP sockets of the streams they carry, so a stream's bytes
    /// stay on one thread (unless its shard has no connection to the peer
    /// up and borrows another shard's). A restart applies a change.
    pub shards: Option<NonZeroUsize>,
}

impl Limits {
    /// The shard count in force on a machine where the daemon may run on
    /// `cpus` CPUs: `shards` if set, else one per CPU, capped by
    /// `worker_threads`.
    pub fn shard_count(&self, cpus: NonZeroUsize) -> NonZeroUsize {
        match self.shards {
            Some(shards) => shards,
            None => self
                .worker_threads
                .map_or(cpus, |workers| workers.min(cpus)),
        }
    }
}

/// The `[admin]` section: the HTTP endpoint serving `/metrics` and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The TCP address to listen on; loopback unless `admin.allow_non_loopback = true`.
    pub listen: SocketAddr,
}

/// `[overlay]`: this node's overlay address, and which peers may reach
/// which of its ports through it (overlay mode, README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// This node's overlay address; applications bind and advertise it.
    pub address: Ipv4Addr,
    /// The block every node's overlay address is in.
    pub prefix: OverlayPrefix,
    /// The transparent listener redirected connections arrive at; loopback.
    pub listen: SocketAddr,
    /// The dummy interface that holds `address`.
    pub interface: String,
    /// Whether the daemon sets the interface and nftables table up at start
    /// and removes them at stop (else `meshtun overlay up`/`down` does).
    pub manage: bool,
    /// Whether the set-up also drops packets for the overlay prefix that
    /// arrive from off the node (default true): without it, a neighbour
    /// that routes this node's overlay address at its underlay address
    /// reaches the services bound there in plain text.
    pub guard: bool,
    /// Who may reach which ports of `address`; empty lets nobody in.
    pub allow: Vec<OverlayAllow>,
}

impl Overlay {
    /// Whether `identity` may reach `port` on this node's overlay address.
    pub fn permits(&self, identity: &NodeName, port: u16) -> bool {
        self.allow
            .iter()
            .any(|rule| rule.peers.permits(identity) && rule.ports.contains(&port))
    }
}

/// `[guard]`: ports of this node that only meshtun may reach from off the
/// node, for services that cannot bind loopback. The host set-up (`meshtun
/// overlay up`, or the daemon when `overlay.manage = true`) drops new TCP
/// and UDP connections to them that arrive on any interface but `lo`,
/// counted with the overlay guard's drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The guarded port ranges, in file order; never empty, never the
    /// QUIC port.
    pub ports: Vec<RangeInclusive<u16>>,
}

/// An IPv4 block, `network/len`, with the host bits of `network` zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayPrefix {
    /// The first address of the block.
    pub network: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub len: u8,
}

impl OverlayPrefix {
    /// Whether `address` is inside the block.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(address) & mask == u32::from(self.network)
    }
}

impl std::fmt::Display for OverlayPrefix {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.network, self.len)
    }
}

/// One `[overlay] allow` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayAllow {
    /// Which identities.
    pub peers: Allow,
    /// Which ports of this node's overlay address.
    pub ports: RangeInclusive<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> NodeName {
        NodeName::new(text).unwrap()
    }

    #[test]
    fn allow_permits_only_listed_identities() {
        assert!(Allow::Any.permits(&name("anyone")));
        let only = Allow::Only([name("node-0"), name("node-2")].into());
        assert!(only.permits(&name("node-0")));
        assert!(only.permits(&name("node-2")));
        assert!(!only.permits(&name("node-1")));
        assert!(!only.permits(&name("node-00")));
    }

    #[test]
    fn relative_tls_paths_are_joined_absolute_ones_kept() {
        let mut tls = Tls {
            ca: PathBuf::from("/etc/meshtun/ca.crt"),
            cert: PathBuf::from("node-1.crt"),
            key: PathBuf::from("keys/node-1.key"),
            crl: Some(PathBuf::from("crl.pem")),
            renew: None,
        };
        tls.resolve_relative_to(Path::new("/srv/meshtun"));
        assert_eq!(tls.ca, PathBuf::from("/etc/meshtun/ca.crt"));
        assert_eq!(tls.cert, PathBuf::from("/srv/meshtun/node-1.crt"));
        assert_eq!(tls.key, PathBuf::from("/srv/meshtun/keys/node-1.key"));
        assert_eq!(tls.crl, Some(PathBuf::from("/srv/meshtun/crl.pem")));
    }
}
