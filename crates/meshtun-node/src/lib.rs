//! The meshtun daemon's runtime.
//!
//! This crate owns everything that does network I/O or spawns tasks: the
//! shards that carry the data plane ([`shard`]: one thread each, with its
//! own QUIC endpoint and connections), the warm connections to each peer, a loopback listener per
//! `[[forward]]`, and the acceptor that maps each incoming stream to an
//! `[[expose]]` target, and in overlay mode the transparent listener and
//! the host set-up behind it ([`overlay`]). It takes a validated [`meshtun_config::Config`] and
//! loaded certificates; it must not parse configuration or read key files
//! itself, and it never decides policy outside what the config says.
//!
//! It also lends its accept loop to a listener outside any [`Node`]
//! ([`accept_each`]): the enrollment server of `meshtun pki serve`, which
//! is meshtun-enroll's.
//!
//! Every task it spawns is owned by a [`TaskTracker`] and stops through a
//! [`CancellationToken`]: [`Node::shutdown`] stops accepting, lets open
//! streams drain for a grace period, resets what is left and closes QUIC with
//! a code.

/// Logs a refused stream at info if [`metrics::PeerStats::refused`] says
/// so (with how many were quiet since), else at debug.
macro_rules! log_refusal {
    ($verdict:expr, $($field:tt)+) => {
        match $verdict {
            Some(quiet) => tracing::info!(similar_since_last_report = quiet, $($field)+),
            None => tracing::debug!($($field)+),
        }
    };
}

/// Logs a limit hit at warn, or at debug when [`metrics::Metrics::limit_hit`]
/// or [`metrics::PeerStats::refused`] says this kind was logged recently.
macro_rules! log_limit {
    ($verdict:expr, $($field:tt)+) => {
        match $verdict {
            Some(quiet) => tracing::warn!(similar_since_last_report = quiet, $($field)+),
            None => tracing::debug!($($field)+),
        }
    };
}

mod accept;
mod admin;
mod cid;
mod endpoint;
mod expose;
mod forward;
mod gso;
mod identity;
mod metrics;
pub mod overlay;
mod peer;
mod shard;
mod splice;
mod status;
mod throttle;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use meshtun_config::{Allow, Config, Expose, Forward as ForwardConfig, Limits, Overlay, Peer};
use meshtun_pki::{NodeCredentials, PeerRole, TrustBundle};
use meshtun_proto::{ConnectionCode, NodeName};
use quinn::{Connection, VarInt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::metrics::{CutReason, Direction, Metrics};
use crate::peer::{DialTiming, PeerLinks};

pub use crate::overlay::OverlayError;
pub use crate::status::{
    CertificateStatus, ExposeStatus, ForwardStatus, GuardStatus, NodeStatus, OverlayStatus,
    PeerCertificate, PeerStatus, ReloadStatus, RenewalStatus, ShardStatus,
};
pub use accept::accept_each;

/// Why a node could not start. Each variant says which part of the
/// configuration or environment is at fault.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A socket could not be created or bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener, in config terms.
        what: &'static str,
        /// The address from the config.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS material could not be turned into rustls configs.
    #[error(transparent)]
    Pki(#[from] meshtun_pki::PkiError),
    /// A QUIC setting is unusable.
    #[error("QUIC configuration: {0}")]
    Quic(String),
    /// A forward names a peer the configuration does not declare (the
    /// config crate refuses this; a `Config` built by hand may not).
    #[error("forward on {listen} names undeclared peer {peer}")]
    UndeclaredPeer {
        /// The forward's listen address.
        listen: SocketAddr,
        /// The peer it names.
        peer: NodeName,
    },
    /// A shard's thread or runtime could not be started.
    #[error("cannot start shard {index}'s thread: {source}")]
    Shard {
        /// Which shard.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The overlay interface or nftables table could not be set up
    /// (`overlay.manage = true`).
    #[error("overlay set-up: {0}")]
    Overlay(#[from] OverlayError),
}

/// Why a reload was refused. The node keeps running on what it had.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration changes settings that only a restart applies.
    #[error("{} changed; restart meshtun to apply (nothing was reloaded)", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    /// The new certificates could not be turned into TLS configs, or a new
    /// forward's listener could not be bound.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// How long shutdown waits for reset stream tasks to end before it closes
/// the endpoint under them.
const ABORT_WAIT: Duration = Duration::from_secs(1);
/// How long shutdown lets the QUIC close frames leave before it exits.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// What a reload may change without a restart: who may reach which service
/// or overlay port, and the timeouts of the forwarding path. Replaced whole,
/// so a stream sees one consistent version.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) exposes: Vec<Expose>,
    /// `[overlay]`, if on; a reload may change only its `allow`.
    pub(crate) overlay: Option<Overlay>,
    /// `[limits]`; a reload may change all but `buffer_memory`.
    pub(crate) limits: Limits,
}

impl Policy {
    fn from_config(config: &Config) -> Self {
        Self {
            exposes: config.exposes.clone(),
            overlay: config.overlay.clone(),
            limits: config.limits.clone(),
        }
    }
}

/// The trust bundle in force, shared with the dialers: a connection whose
/// handshake raced a reload is checked again against the newest one.
pub(crate) type TrustState = Arc<RwLock<Arc<TrustBundle>>>;

/// Checks `connection`'s peer certificate against the trust in force, the
/// way its handshake did (`role`), and closes the connection if it no
/// longer passes: with [`ConnectionCode::Expired`] when a certificate of
/// the chain expired, [`ConnectionCode::Revoked`] when a CRL revokes it,
/// else [`ConnectionCode::Untrusted`], counted in `stats`. Call it after
/// the connection is tracked (in `incoming` or a peer slot), so a reload's
/// sweep or this check, whichever comes last, sees it. Returns whether the
/// connection may stay.
pub(crate) fn still_trusted(
    connection: &Connection,
    trust: &TrustState,
    role: PeerRole<'_>,
    stats: &metrics::PeerStats,
) -> bool {
    let trust = trust
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let verdict = match identity::peer_chain(connection) {
        Ok(chain) => trust
            .verify_peer_chain(&chain, role, SystemTime::now())
            .map(|_| ())
            .map_err(|error| {
                let code = if error.is_expired() {
                    ConnectionCode::Expired
                } else if error.is_revoked() {
                    ConnectionCode::Revoked
                } else {
                    ConnectionCode::Untrusted
                };
                (code, error.to_string())
            }),
        Err(error) => Err((ConnectionCode::Untrusted, error.to_string())),
    };
    match verdict {
        Ok(()) => true,
        Err((code, reason)) => {
            let label = match code {
                ConnectionCode::Expired => CutReason::Expired,
                ConnectionCode::Revoked => CutReason::Revoked,
                _ => CutReason::Untrusted,
            };
            warn!(
                remote = %connection.remote_address(),
                cut = label.as_str(),
                %reason,
                "closing connection: the peer's certificate is no longer trusted"
            );
            stats.connection_cut(label);
            connection.close(VarInt::from_u32(code.to_u32()), code.reason());
            false
        }
    }
}

/// How often live connections are checked against the dates of their
/// peers' certificates.
const TRUST_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Closes live connections whose peer's chain expired: every
/// [`TRUST_SWEEP_INTERVAL`], a connection past its chain's deadline
/// ([`TrustBundle::chain_deadline`], parsed once per connection) is checked
/// in full by [`still_trusted`]. Ends when the node closes.
async fn sweep_expired(shared: Arc<Shared>) {
    // By stable id, with a handle on the connection: while the handle is
    // held, no new connection can take the same id.
    let mut deadlines: HashMap<usize, (Connection, Option<SystemTime>)> = HashMap::new();
    let mut ticks = tokio::time::interval(TRUST_SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shared.closing.cancelled() => return,
        }
        let trust = shared
            .trust
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let now = SystemTime::now();
        let mut seen = Vec::new();
        for (name, connection, role) in shared.live_connections() {
            let id = connection.stable_id();
            seen.push(id);
            let deadline = deadlines
                .entry(id)
                .or_insert_with(|| {
                    let deadline = identity::peer_chain(&connection)
                        .ok()
                        .and_then(|chain| trust.chain_deadline(&chain));
                    (connection.clone(), deadline)
                })
                .1;
            if deadline.is_some_and(|deadline| deadline <= now) {
                debug!(peer = %name, remote = %connection.remote_address(), "the peer's certificates of a live connection are past their date: checking it");
                let role = match &role {
                    Some(peer) => PeerRole::Acceptor(peer),
                    None => PeerRole::Dialer,
                };
                let stats = shared.metrics.peer(&name);
                if still_trusted(&connection, &shared.trust, role, &stats) {
                    // Still good (a newer CA of the same name, or a clock
                    // a moment behind the certificate's): look again at
                    // the next deadline the bundle in force gives, or at
                    // the next sweep.
                    let next = identity::peer_chain(&connection)
                        .ok()
                        .and_then(|chain| trust.chain_deadline(&chain))
                        .filter(|next| *next > now)
                        .unwrap_or(now + TRUST_SWEEP_INTERVAL);
                    deadlines.insert(id, (connection.clone(), Some(next)));
                }
            }
        }
        deadlines.retain(|id, _| seen.contains(id));
    }
}

/// State shared by the node's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    node: NodeName,
    trust: TrustState,
    policy: RwLock<Arc<Policy>>,
    handshake_timeout: Duration,
    /// Incoming QUIC handshakes in progress (see `limits.handshakes`).
    handshaking: AtomicU32,
    /// `quic.max_streams_per_peer`: each connection's QUIC stream credit,
    /// and the cap over all of one peer's connections.
    max_streams_per_peer: u32,
    /// The budget of TCP read buffers (`limits.buffer_memory`).
    buffers: splice::Buffers,
    /// Fires when the node stops taking new work (SIGTERM).
    stop_accepting: CancellationToken,
    /// Fires when the drain period is over: open streams are reset.
    abort_streams: CancellationToken,
    /// Fires last, when the endpoint closes: the admin endpoint stops.
    closing: CancellationToken,
    /// Accept loops, dialers and connection tasks.
    tasks: TaskTracker,
    /// One task per forwarded stream, on either side.
    streams: TaskTracker,
    /// Connections peers dialled to this node, by verified identity, with
    /// the shard that accepted each.
    incoming: Mutex<BTreeMap<NodeName, Vec<(usize, Connection)>>>,
    /// The data-plane shards, in order; never empty.
    shards: Vec<shard::Shard>,
    /// The peers this node dials; a reload may add and remove them.
    peers: RwLock<PeerMap>,
    metrics: Metrics,
    /// What `/status` reports that is fixed between reloads.
    facts: Mutex<Facts>,
    started: Instant,
}

/// The peers a node dials.
#[derive(Debug, Default)]
struct PeerMap {
    /// Those the configuration in force names.
    configured: BTreeMap<NodeName, Arc<PeerLinks>>,
    /// Those a reload removed, until nothing uses them any more: their
    /// connections stay in the trust sweeps and `/status` while their
    /// streams finish.
    departing: Vec<Arc<PeerLinks>>,
}

/// Descriptive state for `/status`, replaced on reload.
#[derive(Debug)]
struct Facts {
    quic_listen: SocketAddr,
    certificate: CertificateStatus,
    forwards: Vec<ForwardStatus>,
    exposes: Vec<ExposeStatus>,
    overlay: Option<OverlayStatus>,
    guard: Option<GuardStatus>,
    last_reload_unix: Option<i64>,
    last_reload_error: Option<String>,
    /// Self-renewal, as the daemon last reported it.
    renewal: Option<RenewalStatus>,
}

impl Shared {
    /// The peers the configuration in force names.
    pub(crate) fn peers(&self) -> BTreeMap<NodeName, Arc<PeerLinks>> {
        self.peers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .configured
            .clone()
    }

    /// Every peer with connections of this node's dialling: those
    /// configured and those a reload removed whose connections are still
    /// in use (a removed peer is forgotten once nothing holds it).
    fn all_peers(&self) -> Vec<Arc<PeerLinks>> {
        let mut map = self
            .peers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only this list holds it: its dialers, forwards and streams are gone.
        map.departing.retain(|links| Arc::strong_count(links) > 1);
        map.configured
            .values()
            .chain(map.departing.iter())
            .cloned()
            .collect()
    }

    /// The policy in force now.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Shard `index`'s counters (shard 0's if there is no such shard).
    pub(crate) fn shard(&self, index: usize) -> &shard::Shard {
        self.shards.get(index).unwrap_or(&self.shards[0])
    }

    /// Records an incoming connection from `peer`, accepted on `shard`,
    /// until the guard drops, unless `peer` already has `limit` connections
    /// here: then `Err` with that count, and nothing is recorded.
    pub(crate) fn track_incoming(
        self: &Arc<Self>,
        peer: &NodeName,
        shard: usize,
        connection: &Connection,
        limit: u32,
    ) -> Result<IncomingGuard, usize> {
        let mut incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let connections = incoming.entry(peer.clone()).or_default();
        if connections.len() >= limit as usize {
            return Err(connections.len());
        }
        connections.push((shard, connection.clone()));
        Ok(IncomingGuard {
            shared: self.clone(),
            peer: peer.clone(),
            id: connection.stable_id(),
        })
    }

    /// Counts an incoming handshake as in progress until the guard drops;
    /// returns how many were in progress before it.
    pub(crate) fn handshake_started(self: &Arc<Self>) -> (Handshaking, u32) {
        let before = self.handshaking.fetch_add(1, Ordering::Relaxed);
        (
            Handshaking {
                shared: self.clone(),
            },
            before,
        )
    }

    /// What a spliced stream needs of the node.
    pub(crate) fn splice_context(&self) -> splice::Context<'_> {
        splice::Context {
            cancel: &self.abort_streams,
            buffers: &self.buffers,
            metrics: &self.metrics,
        }
    }

    /// Incoming handshakes in progress now.
    pub(crate) fn handshakes_in_progress(&self) -> u32 {
        self.handshaking.load(Ordering::Relaxed)
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads live connection state into the gauges and returns it per peer;
    /// with `for_status`, also what each peer presented and the path MTU
    /// (for `/status` only: it parses certificates). The second part is
    /// each shard's (outgoing, incoming) connection count.
    fn refresh_live(&self, for_status: bool) -> (BTreeMap<NodeName, Live>, Vec<(usize, usize)>) {
        let mut live: BTreeMap<NodeName, Live> = BTreeMap::new();
        let mut per_shard = vec![(0, 0); self.shards.len()];
        for links in self.all_peers() {
            let entry = live.entry(links.name().clone()).or_default();
            for (shard, connection) in links.live_connections() {
                entry.outgoing += 1;
                entry.add(&connection, for_status);
                if let Some(counts) = per_shard.get_mut(shard) {
                    counts.0 += 1;
                }
            }
        }
        // Copied out, so no work happens under the lock that connection
        // set-up and tear-down take.
        let incoming: Vec<(NodeName, usize, Connection)> = {
            let incoming = self
                .incoming
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            incoming
                .iter()
                .flat_map(|(name, connections)| {
                    connections
                        .iter()
                        .map(|(shard, connection)| (name.clone(), *shard, connection.clone()))
                })
                .collect()
        };
        for (name, shard, connection) in incoming {
            if connection.close_reason().is_none() {
                let entry = live.entry(name).or_default();
                entry.incoming += 1;
                entry.add(&connection, for_status);
                if let Some(counts) = per_shard.get_mut(shard) {
                    counts.1 += 1;
                }
            }
        }
        for (name, stats) in self.metrics.peers() {
            let entry = live.get(&name);
            stats.set_live(
                entry.map_or(0, |live| live.outgoing),
                entry.map_or(0, |live| live.incoming),
                entry.and_then(|live| live.rtt),
            );
        }
        (live, per_shard)
    }

    /// Every live connection: its peer, and `Some(peer)` if this node
    /// dialled it (the peer verified as the acceptor) or `None` if the peer
    /// dialled in. Copied out of the locks.
    fn live_connections(&self) -> Vec<(NodeName, Connection, Option<NodeName>)> {
        let mut live = Vec::new();
        for links in self.all_peers() {
            let name = links.name();
            for (_, connection) in links.connections_to_check() {
                live.push((name.clone(), connection, Some(name.clone())));
            }
        }
        let incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (name, connections) in incoming.iter() {
            for (_, connection) in connections {
                if connection.close_reason().is_none() {
                    live.push((name.clone(), connection.clone(), None));
                }
            }
        }
        live
    }

    /// The `/metrics` text: live gauges refreshed, then every family.
    pub(crate) fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.refresh_live(false);
        self.metrics.encode()
    }

    /// The `/status` document.
    pub(crate) fn status(&self) -> NodeStatus {
        let (live, per_shard) = self.refresh_live(true);
        let configured = self.peers();
        let mut peers = Vec::new();
        for (name, stats) in self.metrics.peers() {
            let empty = Live::default();
            let peer_live = live.get(&name).unwrap_or(&empty);
            let links = configured.get(&name);
            let counts = stats.counts();
            let named = |map: &BTreeMap<&'static str, u64>| {
                map.iter()
                    .map(|(reason, count)| ((*reason).to_owned(), *count))
                    .collect()
            };
            peers.push(PeerStatus {
                name: name.to_string(),
                addr: links.map(|links| links.addr().to_string()),
                connections_up: peer_live.outgoing,
                connections_configured: links.map_or(0, |links| links.slots()),
                connections_incoming: peer_live.incoming,
                rtt_ms: peer_live.rtt.map(|seconds| seconds * 1000.0),
                path_mtu: peer_live.path_mtu,
                certificates: peer_live
                    .certificates
                    .iter()
                    .map(|(serial, fingerprint)| PeerCertificate {
                        serial: serial.clone(),
                        fingerprint: fingerprint.clone(),
                    })
                    .collect(),
                sent_bytes: counts.sent,
                received_bytes: counts.received,
                streams_outgoing: counts.streams[Direction::outgoing as usize],
                streams_incoming: counts.streams[Direction::incoming as usize],
                open_streams: counts.open.iter().sum(),
                refused_outgoing: named(&counts.refused[Direction::outgoing as usize]),
                refused_incoming: named(&counts.refused[Direction::incoming as usize]),
                handshakes_failed: named(&counts.handshakes_failed),
                connections_cut: named(&counts.cut),
                reconnects: counts.reconnects,
                last_error: links.and_then(|links| links.last_error()),
            });
        }
        let facts = self.facts();
        let mut certificate = facts.certificate.clone();
        certificate.expires_in_seconds = certificate.not_after_unix - unix_now();
        certificate.renewal = facts.renewal.clone();
        NodeStatus {
            node: self.node.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            quic_listen: facts.quic_listen,
            uptime_seconds: self.started.elapsed().as_secs(),
            draining: self.stop_accepting.is_cancelled(),
            worker_threads: tokio::runtime::Handle::try_current()
                .map_or(0, |runtime| runtime.metrics().num_workers()),
            shards: self
                .shards
                .iter()
                .zip(per_shard)
                .map(|(shard, (outgoing, incoming))| {
                    let (open_streams, streams) = shard.streams.counts();
                    ShardStatus {
                        index: shard.index,
                        dial_addr: shard.dial_addr,
                        connections_outgoing: outgoing,
                        connections_incoming: incoming,
                        open_streams,
                        streams,
                    }
                })
                .collect(),
            certificate,
            reload: ReloadStatus {
                successes: self.metrics.reloads("success"),
                failures: self.metrics.reloads("failure"),
                last_attempt_unix: facts.last_reload_unix,
                last_error: facts.last_reload_error.clone(),
            },
            peers,
            incoming_handshakes_failed: self
                .metrics
                .incoming_handshakes_failed()
                .into_iter()
                .map(|(reason, count)| (reason.to_owned(), count))
                .collect(),
            limit_hits: metrics::NODE_LIMITS
                .iter()
                .map(|&limit| (limit.to_owned(), self.metrics.limit_hits(limit)))
                .filter(|&(_, count)| count > 0)
                .collect(),
            forwards: facts.forwards.clone(),
            exposes: facts.exposes.clone(),
            overlay: facts.overlay.clone().map(|overlay| OverlayStatus {
                bypass_dropped: self.metrics.overlay_bypass_dropped(),
                ..overlay
            }),
            guard: facts.guard.clone().map(|guard| GuardStatus {
                bypass_dropped: self.metrics.overlay_bypass_dropped(),
                ..guard
            }),
        }
    }
}

/// A peer's live connections, read when `/metrics` or `/status` asks.
#[derive(Debug, Default)]
struct Live {
    /// Dialled connections up.
    outgoing: usize,
    /// Connections the peer dialled that are up.
    incoming: usize,
    /// The best smoothed RTT, seconds.
    rtt: Option<f64>,
    /// The largest current path MTU (UDP payload bytes), for `/status`.
    path_mtu: Option<u16>,
    /// The certificates the peer presented on them: (serial, fingerprint).
    certificates: std::collections::BTreeSet<(String, String)>,
}

impl Live {
    fn add(&mut self, connection: &Connection, for_status: bool) {
        let rtt = connection.rtt().as_secs_f64();
        self.rtt = Some(self.rtt.map_or(rtt, |best| best.min(rtt)));
        if !for_status {
            return;
        }
        let mtu = connection.stats().path.current_mtu;
        self.path_mtu = Some(self.path_mtu.map_or(mtu, |best| best.max(mtu)));
        if let Some(leaf) = identity::peer_chain(connection)
            .ok()
            .and_then(|chain| chain.first().cloned())
        {
            if let Ok(described) = meshtun_pki::serial_and_fingerprint(&leaf) {
                self.certificates.insert(described);
            }
        }
    }
}

/// An incoming handshake in progress; un-counted when dropped.
#[derive(Debug)]
pub(crate) struct Handshaking {
    shared: Arc<Shared>,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Un-counts an incoming connection when its task ends.
#[derive(Debug)]
pub(crate) struct IncomingGuard {
    shared: Arc<Shared>,
    peer: NodeName,
    id: usize,
}

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        let mut incoming = self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(connections) = incoming.get_mut(&self.peer) {
            connections.retain(|(_, connection)| connection.stable_id() != self.id);
            if connections.is_empty() {
                incoming.remove(&self.peer);
            }
        }
    }
}

fn unix_now() -> i64 {
    meshtun_pki::unix_seconds(SystemTime::now())
}

fn certificate_status(credentials: &NodeCredentials) -> CertificateStatus {
    let not_after_unix = meshtun_pki::unix_seconds(credentials.not_after());
    let serial = credentials
        .chain()
        .first()
        .and_then(|leaf| meshtun_pki::serial_and_fingerprint(leaf).ok())
        .map(|(serial, _)| serial)
        .unwrap_or_default();
    CertificateStatus {
        identity: credentials.identity().to_string(),
        serial,
        fingerprint: credentials.fingerprint(),
        not_after_unix,
        expires_in_seconds: not_after_unix - unix_now(),
        renewal: None,
    }
}

fn expose_statuses(exposes: &[Expose]) -> Vec<ExposeStatus> {
    exposes
        .iter()
        .map(|expose| ExposeStatus {
            service: expose.service.to_string(),
            target: expose.target.to_string(),
            allow: match &expose.allow {
                Allow::Any => vec!["*".to_owned()],
                Allow::Only(names) => names.iter().map(ToString::to_string).collect(),
            },
        })
        .collect()
}

/// The parts of a configuration that only a restart applies, with the key
/// an operator would look for. Everything else is reloadable.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.node != new.node {
        changed.push("node");
    }
    if old.quic != new.quic {
        changed.push("[quic]");
    }
    if old.admin != new.admin {
        changed.push("[admin]");
    }
    if old.limits.buffer_memory != new.limits.buffer_memory {
        changed.push("limits.buffer_memory");
    }
    if old.limits.worker_threads != new.limits.worker_threads {
        changed.push("limits.worker_threads");
    }
    if old.limits.shards != new.limits.shards {
        changed.push("limits.shards");
    }
    // The interface, addresses and listener are set up once; who may reach
    // which port is policy.
    let without_allow = |overlay: &Option<Overlay>| {
        overlay.as_ref().map(|overlay| Overlay {
            allow: Vec::new(),
            ..overlay.clone()
        })
    };
    if without_allow(&old.overlay) != without_allow(&new.overlay) {
        changed.push("[overlay] (except allow)");
    }
    // Loaded into nftables with the host set-up.
    if old.guard != new.guard {
        changed.push("[guard]");
    }
    changed
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    /// Every QUIC endpoint of every shard.
    endpoints: Vec<quinn::Endpoint>,
    /// The endpoints that accept (bound to `quic.listen`): a reload gives
    /// them the new server config.
    listeners: Vec<quinn::Endpoint>,
    /// The endpoint each shard dials from, by shard index: a peer a reload
    /// adds is dialled through them.
    dialers: Vec<quinn::Endpoint>,
    /// How dialers back off (from `[quic]`, which only a restart changes).
    timing: DialTiming,
    /// The shard threads; stopped last on shutdown, or when the node drops.
    threads: shard::Threads,
    quic_addr: SocketAddr,
    /// The forwards running, in config order.
    forwards: Mutex<Vec<RunningForward>>,
    admin_addr: Option<SocketAddr>,
    overlay_addr: Option<SocketAddr>,
    /// Overlay mode's routes by address, which a reload replaces.
    routes: Option<Arc<overlay::Routes>>,
    /// The configuration in force, to tell what a reload changes.
    config: Mutex<Config>,
    /// The accept loops; one that ends before shutdown is a fault the
    /// watchdog reports (a forward a reload removed takes its loops along).
    loops: Mutex<Vec<AcceptLoop>>,
}

/// A `[[forward]]` as it runs: one listener per shard, sharing a target
/// and a stop.
#[derive(Debug)]
struct RunningForward {
    config: ForwardConfig,
    local: SocketAddr,
    target: Arc<forward::Target>,
    /// Stops its accept loops (a child of the node's `stop_accepting`).
    stop: CancellationToken,
}

/// A task that accepts connections, named for the watchdog's report.
#[derive(Debug)]
struct AcceptLoop {
    name: String,
    handle: JoinHandle<()>,
    /// The forward (its configured `listen`) it belongs to, if any.
    forward: Option<SocketAddr>,
}

impl AcceptLoop {
    fn new(name: String, handle: JoinHandle<()>) -> Self {
        Self {
            name,
            handle,
            forward: None,
        }
    }
}

/// Makes the dial state of `peer`, whose dialers stop with `stop`.
fn peer_links(
    peer: &Peer,
    shards: usize,
    connections: usize,
    tls: peer::DialTls,
    metrics: &Metrics,
    trust: &TrustState,
    stop: &CancellationToken,
) -> Arc<PeerLinks> {
    Arc::new(PeerLinks::new(
        peer.name.clone(),
        peer.addr.clone(),
        shards,
        connections,
        tls,
        metrics.peer(&peer.name),
        trust.clone(),
        stop.child_token(),
    ))
}

/// Spawns `links`' dialers: `connections` on each shard, each dialling
/// through its shard's endpoint in `dialers`.
fn spawn_dialers(
    shared: &Shared,
    links: &Arc<PeerLinks>,
    dialers: &[quinn::Endpoint],
    timing: DialTiming,
    connections: usize,
) {
    for (shard, dialer) in shared.shards.iter().zip(dialers) {
        for index in 0..connections {
            let span = tracing::info_span!("peer", peer = %links.name(), shard = shard.index);
            let task = links
                .clone()
                .dial_loop(shard.index, index, dialer.clone(), timing);
            shared.tasks.spawn_on(task.instrument(span), &shard.handle);
        }
    }
}

/// Spawns the accept loops of a forward bound to `local`, one per shard
/// listener, and returns them.
fn spawn_forward(
    shared: &Arc<Shared>,
    listeners: Vec<TcpListener>,
    running: &RunningForward,
) -> Vec<AcceptLoop> {
    let route = running.target.get();
    info!(listen = %running.local, peer = %route.peer.name(), service = %route.service, "forwarding");
    let mut loops = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let shard = shared.shard(index);
        let task = forward::accept_loop(
            forward::Forward {
                listener,
                local: running.local,
                shard: shard.index,
                target: running.target.clone(),
                stop: running.stop.clone(),
            },
            shared.clone(),
        );
        loops.push(AcceptLoop {
            name: format!(
                "forward listener {} of shard {}",
                running.local, shard.index
            ),
            handle: shared.tasks.spawn_on(task, &shard.handle),
            forward: Some(running.config.listen),
        });
    }
    loops
}

/// Overlay mode's routes: each configured peer with an overlay address.
fn overlay_routes(
    config: &Config,
    peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
) -> HashMap<Ipv4Addr, Arc<PeerLinks>> {
    // Config validation keeps peers' overlay addresses unique.
    config
        .peers
        .iter()
        .filter_map(|peer| Some((peer.overlay?, peers.get(&peer.name)?.clone())))
        .collect()
}

/// The peers' overlay addresses, for `/status`.
fn overlay_peers(config: &Config) -> BTreeMap<String, Ipv4Addr> {
    config
        .peers
        .iter()
        .filter_map(|peer| Some((peer.name.to_string(), peer.overlay?)))
        .collect()
}

/// Where `forward` sends its connections, among `peers`.
fn forward_route(
    forward: &ForwardConfig,
    peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
) -> Result<forward::Route, NodeError> {
    // The config refers only to declared peers.
    let links = peers
        .get(&forward.peer)
        .ok_or_else(|| NodeError::UndeclaredPeer {
            listen: forward.listen,
            peer: forward.peer.clone(),
        })?;
    Ok(forward::Route::new(links.clone(), forward.service.clone()))
}

fn forward_statuses(forwards: &[RunningForward]) -> Vec<ForwardStatus> {
    forwards
        .iter()
        .map(|running| ForwardStatus {
            listen: running.local,
            peer: running.config.peer.to_string(),
            service: running.config.service.to_string(),
        })
        .collect()
}

/// One QUIC listener per shard, made inside its shard's runtime (quinn
/// registers the socket with the reactor and spawns its driver there), and
/// the endpoint each shard dials from: its listener when there is one
/// shard, as a node without shards would; a socket of its own otherwise.
fn shard_endpoints(
    quic: &meshtun_config::Quic,
    credentials: &NodeCredentials,
    server: quinn::ServerConfig,
    listen_sockets: Vec<std::net::UdpSocket>,
    handles: &[tokio::runtime::Handle],
) -> Result<(Vec<quinn::Endpoint>, Vec<quinn::Endpoint>), NodeError> {
    let new_endpoint = |handle: &tokio::runtime::Handle,
                        socket: std::net::UdpSocket,
                        server: Option<quinn::ServerConfig>| {
        let _entered = handle.enter();
        let bind_error = |source| NodeError::Bind {
            what: "QUIC endpoint (quic.listen)",
            addr: quic.listen,
            source,
        };
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let socket = runtime.wrap_udp_socket(socket).map_err(bind_error)?;
        quinn::Endpoint::new_with_abstract_socket(
            endpoint::endpoint_config(credentials),
            server,
            Arc::new(gso::SplitBatches::new(socket)),
            runtime,
        )
        .map_err(bind_error)
    };
    let mut listeners = Vec::new();
    let mut dialers = Vec::new();
    for (handle, socket) in handles.iter().zip(listen_sockets) {
        let listener = new_endpoint(handle, socket, Some(server.clone()))?;
        let dialer = if handles.len() == 1 {
            listener.clone()
        } else {
            new_endpoint(handle, endpoint::bind_dial(quic)?, None)?
        };
        listeners.push(listener);
        dialers.push(dialer);
    }
    Ok((listeners, dialers))
}

/// Each shard's state: its runtime, the address it dials from, its streams.
fn shard_states(
    quic: &meshtun_config::Quic,
    handles: &[tokio::runtime::Handle],
    dialers: &[quinn::Endpoint],
) -> Result<Vec<shard::Shard>, NodeError> {
    let mut shards = Vec::new();
    for (index, (handle, dialer)) in handles.iter().zip(dialers).enumerate() {
        shards.push(shard::Shard {
            index,
            handle: handle.clone(),
            dial_addr: endpoint::local_addr(dialer, quic.listen)?,
            streams: shard::ShardStreams::default(),
            beat: std::sync::atomic::AtomicU64::new(0),
        });
    }
    Ok(shards)
}

/// The links to every configured peer, with the TLS each dials with.
fn configured_peers(
    config: &Config,
    trust: &TrustBundle,
    credentials: &NodeCredentials,
    shards: usize,
    metrics: &Metrics,
    trust_state: &TrustState,
    stop_accepting: &CancellationToken,
) -> Result<BTreeMap<NodeName, Arc<PeerLinks>>, NodeError> {
    let quic = &config.quic;
    let mut peers = BTreeMap::new();
    for peer in &config.peers {
        let client = endpoint::client_config(quic, trust, credentials, &peer.name)?;
        let tls = peer::DialTls {
            client,
            own_not_after: credentials.not_after(),
        };
        let links = peer_links(
            peer,
            shards,
            quic.connections_per_peer.get(),
            tls,
            metrics,
            trust_state,
            stop_accepting,
        );
        peers.insert(peer.name.clone(), links);
    }
    Ok(peers)
}

/// Every `[[forward]]`'s listeners, one per shard, bound and not yet
/// accepting.
fn bind_forwards(
    config: &Config,
    handles: &[tokio::runtime::Handle],
    peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
    stop_accepting: &CancellationToken,
) -> Result<Vec<(RunningForward, Vec<TcpListener>)>, NodeError> {
    let mut forwards = Vec::new();
    for forward in &config.forwards {
        let (listeners, local) = bind_tcp_group("forward listener", forward.listen, handles)?;
        let route = forward_route(forward, peers)?;
        let running = RunningForward {
            config: forward.clone(),
            local,
            target: Arc::new(forward::Target::new(route)),
            stop: stop_accepting.child_token(),
        };
        forwards.push((running, listeners));
    }
    Ok(forwards)
}

/// The overlay's transparent listeners, one per shard, and its routes.
fn bind_transparent(
    config: &Config,
    handles: &[tokio::runtime::Handle],
    peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
) -> Result<Option<overlay::Transparent>, NodeError> {
    let Some(overlay) = &config.overlay else {
        return Ok(None);
    };
    let what = "overlay transparent listener (overlay.listen)";
    let (listeners, local) = bind_tcp_group(what, overlay.listen, handles)?;
    let routes = Arc::new(overlay::Routes::new(overlay_routes(config, peers)));
    Ok(Some(overlay::Transparent {
        listeners,
        local,
        routes,
    }))
}

/// The overlay's part of `/status`.
fn overlay_status(
    config: &Config,
    transparent: Option<&overlay::Transparent>,
) -> Option<OverlayStatus> {
    config
        .overlay
        .as_ref()
        .zip(transparent)
        .map(|(overlay, transparent)| OverlayStatus {
            address: overlay.address,
            prefix: overlay.prefix.to_string(),
            listen: transparent.local,
            interface: overlay.interface.clone(),
            managed: overlay.manage,
            guard: overlay.guard,
            bypass_dropped: None,
            peers: overlay_peers(config),
        })
}

/// With `overlay.manage`, the interface and the nftables table (with
/// `[guard]`, which shares it); a failure undoes what was made.
async fn set_up_host(
    config: &Config,
    transparent: Option<&overlay::Transparent>,
) -> Result<(), NodeError> {
    let Some((overlay, transparent)) = config
        .overlay
        .as_ref()
        .filter(|overlay| overlay.manage)
        .zip(transparent)
    else {
        return Ok(());
    };
    let applied = overlay::HostSetup {
        overlay: Some(Overlay {
            listen: transparent.local,
            ..overlay.clone()
        }),
        guard: config.guard.clone(),
    };
    if let Err(error) = overlay::setup_up_blocking(applied.clone(), config.peers.clone()).await {
        // Leave nothing half made behind.
        if let Err(undo) = overlay::setup_down_blocking(applied).await {
            warn!(%undo, "could not undo a partial overlay set-up");
        }
        return Err(error.into());
    }
    Ok(())
}

/// Each shard's dialers, heartbeat and QUIC accept loop; the accept loops.
fn spawn_shards(
    shared: &Arc<Shared>,
    listeners: &[quinn::Endpoint],
    dialers: &[quinn::Endpoint],
    timing: DialTiming,
    quic: &meshtun_config::Quic,
) -> Vec<AcceptLoop> {
    let connections = quic.connections_per_peer.get();
    for links in shared.peers().values() {
        spawn_dialers(shared, links, dialers, timing, connections);
    }
    for index in 0..shared.shards.len() {
        let shard = shared.clone();
        let closing = shared.closing.clone();
        let beat = async move {
            shard.shard(index).heartbeat(shard.started, closing).await;
        };
        shared.tasks.spawn_on(beat, &shared.shard(index).handle);
    }
    let mut loops = Vec::new();
    for (shard, listener) in shared.shards.iter().zip(listeners) {
        let span = tracing::info_span!("shard", shard = shard.index);
        let accept = expose::accept_loop(listener.clone(), shard.index, shared.clone());
        loops.push(AcceptLoop::new(
            format!("QUIC accept loop of shard {}", shard.index),
            shared
                .tasks
                .spawn_on(accept.instrument(span), &shard.handle),
        ));
    }
    loops
}

/// The overlay's accept loop on each shard; its listen address.
fn spawn_transparent(
    shared: &Arc<Shared>,
    transparent: overlay::Transparent,
    loops: &mut Vec<AcceptLoop>,
) -> SocketAddr {
    let local = transparent.local;
    info!(listen = %local, "overlay transparent listener");
    for (index, listener) in transparent.listeners.into_iter().enumerate() {
        let shard = shared.shard(index);
        let task = overlay::accept_loop(
            listener,
            local,
            index,
            transparent.routes.clone(),
            shared.clone(),
        );
        loops.push(AcceptLoop::new(
            format!("overlay transparent listener {local} of shard {index}"),
            shared.tasks.spawn_on(task, &shard.handle),
        ));
    }
    local
}

/// What `/status` says of the node before anything has run.
fn initial_facts(
    config: &Config,
    credentials: &NodeCredentials,
    quic_listen: SocketAddr,
    overlay: Option<OverlayStatus>,
) -> Facts {
    Facts {
        quic_listen,
        certificate: certificate_status(credentials),
        forwards: Vec::new(),
        exposes: expose_statuses(&config.exposes),
        overlay,
        guard: config.guard.as_ref().map(|guard| GuardStatus {
            ports: overlay::port_list(&guard.ports),
            bypass_dropped: None,
        }),
        last_reload_unix: None,
        last_reload_error: None,
        renewal: None,
    }
}

/// The sweep of expired and revoked peers, and the guard's watch; a warning
/// when the overlay runs unguarded.
fn spawn_watchers(shared: &Arc<Shared>, config: &Config) {
    shared.tasks.spawn(sweep_expired(shared.clone()));
    if overlay::HostSetup::of(config).is_some_and(|setup| setup.guards()) {
        let watch = overlay::watch_guard(shared.clone());
        shared.tasks.spawn(watch);
    }
    if let Some(overlay) = &config.overlay {
        if !overlay.guard {
            warn!(address = %overlay.address, prefix = %overlay.prefix, "overlay.guard = false: packets for the overlay prefix from off this node are not dropped, so anyone on the link who routes this node's overlay address at it reaches the services bound there in plain text");
        }
    }
}

impl Node {
    /// Binds the QUIC endpoint, every forward listener and the admin
    /// endpoint, then starts the dialers and accept loops. When this returns
    /// `Ok`, every listener accepts and the node serves; peers may still be
    /// connecting.
    ///
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<Node, NodeError> {
        let quic = &config.quic;
        let server = endpoint::server_config(quic, &trust, &credentials)?;
        let shard_count = config.limits.shard_count(shard::available_cpus());
        let (threads, handles) = shard::Threads::start(shard_count)?;
        let listen_sockets = endpoint::bind_listen_group(quic, shard_count.get())?;
        let (listeners, dialers) =
            shard_endpoints(quic, &credentials, server, listen_sockets, &handles)?;
        let quic_addr = endpoint::local_addr(&listeners[0], quic.listen)?;
        let shards = shard_states(quic, &handles, &dialers)?;
        let metrics = Metrics::new();
        metrics.set_certificate_expiry(meshtun_pki::unix_seconds(credentials.not_after()));
        let trust_state: TrustState = Arc::new(RwLock::new(Arc::new(trust.clone())));
        let stop_accepting = CancellationToken::new();

        let peers = configured_peers(
            &config,
            &trust,
            &credentials,
            shard_count.get(),
            &metrics,
            &trust_state,
            &stop_accepting,
        )?;

        // Bind every listener before spawning anything, so a port conflict
        // fails the start instead of leaving a half-running node.
        let forwards = bind_forwards(&config, &handles, &peers, &stop_accepting)?;
        let admin = match &config.admin {
            Some(admin) => Some(bind_tcp("admin endpoint (admin.listen)", admin.listen).await?),
            None => None,
        };
        let transparent = bind_transparent(&config, &handles, &peers)?;
        let overlay_status = overlay_status(&config, transparent.as_ref());
        // Last before anything is spawned: the nftables rule redirects to
        // the bound listener (its real port, even when configured as 0).
        set_up_host(&config, transparent.as_ref()).await?;

        let shared = Arc::new(Shared {
            node: config.node.clone(),
            trust: trust_state,
            policy: RwLock::new(Arc::new(Policy::from_config(&config))),
            handshake_timeout: quic.handshake_timeout,
            handshaking: AtomicU32::new(0),
            max_streams_per_peer: quic.max_streams_per_peer,
            buffers: splice::Buffers::new(
                config.limits.buffer_memory,
                metrics.buffer_bytes.clone(),
            ),
            stop_accepting,
            abort_streams: CancellationToken::new(),
            closing: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: TaskTracker::new(),
            incoming: Mutex::new(BTreeMap::new()),
            shards,
            peers: RwLock::new(PeerMap {
                configured: peers,
                departing: Vec::new(),
            }),
            metrics,
            facts: Mutex::new(initial_facts(
                &config,
                &credentials,
                quic_addr,
                overlay_status,
            )),
            started: Instant::now(),
        });

        let timing = DialTiming {
            handshake_timeout: quic.handshake_timeout,
            reconnect_min: quic.reconnect_min,
            reconnect_max: quic.reconnect_max,
        };
        let mut loops = spawn_shards(&shared, &listeners, &dialers, timing, quic);
        let mut running_forwards = Vec::new();
        for (running, listeners) in forwards {
            loops.extend(spawn_forward(&shared, listeners, &running));
            running_forwards.push(running);
        }
        shared.facts().forwards = forward_statuses(&running_forwards);
        spawn_watchers(&shared, &config);
        let routes = transparent
            .as_ref()
            .map(|transparent| transparent.routes.clone());
        let overlay_addr =
            transparent.map(|transparent| spawn_transparent(&shared, transparent, &mut loops));
        let admin_addr = admin.map(|(listener, local)| {
            info!(listen = %local, "admin endpoint serving /metrics and /status");
            let task = admin::serve(listener, shared.clone());
            let name = format!("admin endpoint {local}");
            loops.push(AcceptLoop::new(name, shared.tasks.spawn(task)));
            local
        });
        info!(node = %config.node, quic = %quic_addr, shards = shard_count.get(), peers = config.peers.len(), exposes = config.exposes.len(), "node started");
        let mut endpoints = listeners.clone();
        if shard_count.get() > 1 {
            endpoints.extend(dialers.iter().cloned());
        }
        Ok(Node {
            shared,
            endpoints,
            listeners,
            dialers,
            timing,
            threads,
            quic_addr,
            forwards: Mutex::new(running_forwards),
            admin_addr,
            overlay_addr,
            routes,
            config: Mutex::new(config),
            loops: Mutex::new(loops),
        })
    }

    /// The UDP address the QUIC endpoint is bound to.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound address of each `[[forward]]` in force, in config order.
    pub fn forward_addrs(&self) -> Vec<SocketAddr> {
        self.running_forwards()
            .iter()
            .map(|running| running.local)
            .collect()
    }

    fn running_forwards(&self) -> std::sync::MutexGuard<'_, Vec<RunningForward>> {
        self.forwards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bound admin address, if `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The bound address of overlay mode's transparent listener, if
    /// `[overlay]` is configured.
    pub fn overlay_addr(&self) -> Option<SocketAddr> {
        self.overlay_addr
    }

    /// Whether at least one QUIC connection to `peer` is up.
    pub fn is_connected(&self, peer: &NodeName) -> bool {
        self.shared
            .peers()
            .get(peer)
            .is_some_and(|links| links.is_connected())
    }

    /// Identities of the peers whose connections this node has accepted
    /// (their certificates verified against the cluster CA) and that are
    /// still connected.
    pub fn incoming_peers(&self) -> Vec<NodeName> {
        let incoming = self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        incoming.keys().cloned().collect()
    }

    /// The certificate in use, with the seconds left until it expires.
    pub fn certificate(&self) -> CertificateStatus {
        let facts = self.shared.facts();
        let mut certificate = facts.certificate.clone();
        certificate.expires_in_seconds = certificate.not_after_unix - unix_now();
        certificate.renewal = facts.renewal.clone();
        certificate
    }

    /// Records the state of the certificate's self-renewal, for `/status`
    /// and `/metrics` (`None`: not configured).
    pub fn set_renewal(&self, renewal: Option<RenewalStatus>) {
        self.shared.metrics.set_renewal(renewal.as_ref());
        self.shared.facts().renewal = renewal;
    }

    /// The node's state, as `/status` serves it.
    pub fn status(&self) -> NodeStatus {
        self.shared.status()
    }

    /// Whether the node's own machinery still runs: every accept loop is
    /// alive, and every shard ran its heartbeat within the last seconds (a
    /// shard whose thread is stuck carries nothing). Called from the
    /// control runtime, so a wedged control runtime fails the check by
    /// never getting to it (the systemd watchdog relies on all three).
    pub fn health(&self) -> Result<(), String> {
        if self.shared.stop_accepting.is_cancelled() {
            return Ok(());
        }
        let loops = self
            .loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(stopped) = loops.iter().find(|accept| accept.handle.is_finished()) {
            return Err(format!("{} has stopped", stopped.name));
        }
        drop(loops);
        for shard in &self.shared.shards {
            if let Some(silent) = shard.stalled(self.shared.started) {
                return Err(format!(
                    "shard {} has not run for {:.1} s",
                    shard.index,
                    silent.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// Applies a new configuration and certificates without dropping any
    /// stream. New handshakes use the new certificates, trust bundle and
    /// CRL; new streams see the new `[[expose]]` rules and `[limits]`.
    /// Streams already open keep going under the rules they were admitted
    /// by. Peers and forwards follow the new config: a peer added is
    /// dialled, one removed stops being dialled and its connections close
    /// ([`ConnectionCode::Removed`]) once their streams end, one with a new
    /// address is re-dialled there; a forward added listens, one removed
    /// stops accepting (its connections carry on), one with a new peer or
    /// service sends new connections there.
    ///
    /// Settings bound or set up once (`node`, `[quic]`, `[admin]`, the
    /// buffer budget, threads and shards, `[overlay]` except its `allow`,
    /// `[guard]`) are not reloadable: if any changed, nothing is applied
    /// and the error names them. Nor is anything applied if a new
    /// forward's port cannot be bound.
    pub fn reload(
        &self,
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<(), ReloadError> {
        let result = self.apply(config, credentials, trust);
        match &result {
            Ok(()) => {
                // Counted before the sweep, so whoever sees a connection
                // cut by this reload also sees the reload in `/status`.
                self.record_reload(None);
                self.drop_untrusted();
            }
            Err(error) => self.record_reload(Some(error.to_string())),
        }
        result
    }

    /// Records a reload that failed before the node saw new material (an
    /// unreadable file, a config error), for `/status` and the metrics.
    pub fn reload_failed(&self, error: &str) {
        self.record_reload(Some(error.to_owned()));
    }

    fn apply(
        &self,
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<(), ReloadError> {
        let mut current = self
            .config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = restart_only_changes(&current, &config);
        if !changed.is_empty() {
            return Err(ReloadError::NeedsRestart(changed));
        }
        // Build everything first, so a failure applies nothing.
        let server = endpoint::server_config(&config.quic, &trust, &credentials)?;
        let mut clients = Vec::new();
        for peer in &config.peers {
            let client = endpoint::client_config(&config.quic, &trust, &credentials, &peer.name)?;
            clients.push((peer, client));
        }
        let mut forwards = self.running_forwards();
        let added_forwards = self.bind_new_forwards(&forwards, &config)?;
        // The trust state first: a handshake completing from here on is
        // checked against it once tracked, and anything tracked before is
        // swept once the reload is counted (`reload`).
        *self
            .shared
            .trust
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(trust);
        for listener in &self.listeners {
            listener.set_server_config(Some(server.clone()));
        }
        // A new certificate of this node: dialers replace their
        // connections, so peers never hold one made with the old
        // certificate when it expires.
        let renewed = self.shared.facts().certificate.fingerprint != credentials.fingerprint();
        let peers = self.apply_peers(&config, clients, credentials.not_after(), renewed);
        self.apply_forwards(&mut forwards, &config, &peers, added_forwards);
        if let Some(routes) = &self.routes {
            routes.replace(overlay_routes(&config, &peers));
        }
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Arc::new(Policy::from_config(&config));
        self.shared
            .metrics
            .set_certificate_expiry(meshtun_pki::unix_seconds(credentials.not_after()));
        {
            let mut facts = self.shared.facts();
            facts.certificate = certificate_status(&credentials);
            facts.exposes = expose_statuses(&config.exposes);
            facts.forwards = forward_statuses(&forwards);
            if let Some(overlay) = &mut facts.overlay {
                overlay.peers = overlay_peers(&config);
            }
        }
        *current = config;
        Ok(())
    }

    /// Checks that every forward in `config` names one of its peers, and
    /// binds the listeners of those not running yet (a `listen` no running
    /// forward has), before anything changes: a port in use fails the
    /// whole reload.
    fn bind_new_forwards(
        &self,
        running: &[RunningForward],
        config: &Config,
    ) -> Result<Vec<(ForwardConfig, Vec<TcpListener>, SocketAddr)>, NodeError> {
        let handles: Vec<_> = self
            .shared
            .shards
            .iter()
            .map(|shard| shard.handle.clone())
            .collect();
        let mut bound = Vec::new();
        for forward in &config.forwards {
            if !config.peers.iter().any(|peer| peer.name == forward.peer) {
                return Err(NodeError::UndeclaredPeer {
                    listen: forward.listen,
                    peer: forward.peer.clone(),
                });
            }
            if running
                .iter()
                .any(|running| running.config.listen == forward.listen)
            {
                continue;
            }
            let (listeners, local) = bind_tcp_group("forward listener", forward.listen, &handles)?;
            bound.push((forward.clone(), listeners, local));
        }
        Ok(bound)
    }

    /// Brings the dialled peers in line with `config`: new TLS for all (a
    /// new address replaces a peer's connections), dialers for a peer
    /// added, and a removed peer's dialers stopped, its connections closing
    /// once their streams end. Returns the peers now configured.
    fn apply_peers(
        &self,
        config: &Config,
        clients: Vec<(&Peer, quinn::ClientConfig)>,
        own_not_after: SystemTime,
        renewed: bool,
    ) -> BTreeMap<NodeName, Arc<PeerLinks>> {
        let connections = config.quic.connections_per_peer.get();
        let mut added = Vec::new();
        let mut map = self
            .shared
            .peers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (peer, client) in clients {
            let tls = peer::DialTls {
                client,
                own_not_after,
            };
            match map.configured.get(&peer.name) {
                Some(links) => {
                    links.set_client(tls, renewed);
                    if links.set_addr(&peer.addr) {
                        info!(peer = %peer.name, addr = %peer.addr, "peer address changed: its connections are replaced, and the old ones close once their streams end");
                    }
                }
                None => {
                    let links = peer_links(
                        peer,
                        self.shared.shards.len(),
                        connections,
                        tls,
                        &self.shared.metrics,
                        &self.shared.trust,
                        &self.shared.stop_accepting,
                    );
                    map.configured.insert(peer.name.clone(), links.clone());
                    added.push(links);
                }
            }
        }
        let gone: Vec<NodeName> = map
            .configured
            .keys()
            .filter(|name| !config.peers.iter().any(|peer| &peer.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(links) = map.configured.remove(&name) {
                info!(peer = %name, "peer removed: no more dials; its connections close once their streams end");
                links.remove();
                map.departing.push(links);
            }
        }
        let peers = map.configured.clone();
        drop(map);
        for links in added {
            info!(peer = %links.name(), addr = %links.addr(), "peer added");
            spawn_dialers(
                &self.shared,
                &links,
                &self.dialers,
                self.timing,
                connections,
            );
        }
        peers
    }

    /// Brings the running forwards in line with `config`: a removed one
    /// stops accepting (its open connections carry on), one with a new
    /// peer or service sends new connections there, and the `added` ones
    /// (bound by [`Node::bind_new_forwards`]) start.
    fn apply_forwards(
        &self,
        forwards: &mut Vec<RunningForward>,
        config: &Config,
        peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
        added: Vec<(ForwardConfig, Vec<TcpListener>, SocketAddr)>,
    ) {
        let mut loops = self
            .loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        forwards.retain_mut(|running| {
            let listen = running.config.listen;
            let Some(wanted) = config.forwards.iter().find(|f| f.listen == listen) else {
                info!(listen = %running.local, peer = %running.config.peer, service = %running.config.service, "forward removed: its listener closes; connections already open carry on");
                loops.retain(|accept| accept.forward != Some(listen));
                running.stop.cancel();
                return false;
            };
            if *wanted != running.config {
                match forward_route(wanted, peers) {
                    Ok(route) => {
                        info!(listen = %running.local, peer = %wanted.peer, service = %wanted.service, "forward changed: new connections go to the new peer and service");
                        running.target.set(route);
                        running.config = wanted.clone();
                    }
                    // `bind_new_forwards` checked every forward's peer.
                    Err(error) => warn!(%error, "forward left as it was"),
                }
            }
            true
        });
        for (forward, listeners, local) in added {
            match forward_route(&forward, peers) {
                Ok(route) => {
                    let running = RunningForward {
                        config: forward,
                        local,
                        target: Arc::new(forward::Target::new(route)),
                        stop: self.shared.stop_accepting.child_token(),
                    };
                    loops.extend(spawn_forward(&self.shared, listeners, &running));
                    forwards.push(running);
                }
                Err(error) => warn!(%error, "forward not started"),
            }
        }
        // In config order, as `forward_addrs` and `/status` list them.
        forwards.sort_by_key(|running| {
            config
                .forwards
                .iter()
                .position(|forward| forward.listen == running.config.listen)
        });
    }

    /// Closes every live connection whose peer certificate the trust in
    /// force no longer accepts (a new CRL revoked it, or its CA left the
    /// bundle). New handshakes are refused by the new TLS configs already;
    /// this ends what was admitted under the old ones. Returns how many
    /// were closed.
    fn drop_untrusted(&self) -> usize {
        let trust = &self.shared.trust;
        let mut closed = 0;
        for (name, connection, dialled) in self.shared.live_connections() {
            let role = match &dialled {
                Some(peer) => PeerRole::Acceptor(peer),
                None => PeerRole::Dialer,
            };
            let stats = self.shared.metrics.peer(&name);
            if !still_trusted(&connection, trust, role, &stats) {
                closed += 1;
            }
        }
        closed
    }

    fn record_reload(&self, error: Option<String>) {
        let result = if error.is_some() {
            "failure"
        } else {
            "success"
        };
        self.shared.metrics.reload(result);
        let mut facts = self.shared.facts();
        facts.last_reload_unix = Some(unix_now());
        facts.last_reload_error = error;
    }

    /// Waits until every configured peer has a live connection on every
    /// shard, or `timeout` passes. Returns the peers still not connected.
    pub async fn wait_connected(&self, timeout: Duration) -> Vec<NodeName> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing = Vec::new();
        for (name, links) in &self.shared.peers() {
            if !links.wait_connected(deadline).await {
                missing.push(name.clone());
            }
        }
        missing
    }

    /// Stops accepting, lets open streams finish for up to `grace`, resets
    /// the rest, and closes every QUIC connection with a shutdown code.
    /// With `overlay.manage`, removes the overlay interface and nftables
    /// table last.
    pub async fn shutdown(self, grace: Duration) {
        let managed_overlay = {
            let config = self
                .config
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            overlay::HostSetup::of(&config)
                .filter(|setup| setup.overlay.as_ref().is_some_and(|overlay| overlay.manage))
        };
        let shared = &self.shared;
        shared.stop_accepting.cancel();
        shared.streams.close();
        let open = shared.streams.len();
        if open > 0 {
            info!(open, ?grace, "draining open streams");
        }
        if tokio::time::timeout(grace, shared.streams.wait())
            .await
            .is_err()
        {
            warn!(
                open = shared.streams.len(),
                "drain period over; resetting open streams"
            );
            shared.abort_streams.cancel();
            // Cancelled stream tasks end at their next poll; the bound only
            // guards against a peer that keeps opening streams meanwhile.
            let _ = tokio::time::timeout(ABORT_WAIT, shared.streams.wait()).await;
        }
        let code = ConnectionCode::Shutdown;
        for endpoint in &self.endpoints {
            endpoint.close(VarInt::from_u32(code.to_u32()), code.reason());
        }
        shared.closing.cancel();
        shared.tasks.close();
        // Connection tasks end once the endpoint is closed.
        let _ = tokio::time::timeout(Duration::from_secs(2), shared.tasks.wait()).await;
        // The close frames go out at once; `wait_idle` would also sit out
        // QUIC's draining period (three probe timeouts, over a second early
        // in a connection's life), which only guards against a lost close
        // frame. A short wait lets them leave; a peer that missed one gets a
        // stateless reset on its next packet.
        let idle = async {
            for endpoint in &self.endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, idle).await;
        self.threads.stop().await;
        if let Some(overlay) = managed_overlay {
            if let Err(error) = overlay::setup_down_blocking(overlay).await {
                warn!(%error, "could not remove the overlay set-up");
            }
        }
        info!("node stopped");
    }
}

/// Binds the TCP listeners of one forward (or of the overlay's transparent
/// listener): one per shard, each registered with its shard's runtime, so
/// a connection is accepted on the thread that will carry it. With several
/// shards they form one `SO_REUSEPORT` group, over which the kernel spreads
/// new connections by their address pair. As for the QUIC sockets
/// (`endpoint::bind_listen_group`), the address is first bound alone: that
/// fails while anything else holds it, rather than joining a stray group,
/// and turns port 0 into the port the group shares. Returns the listeners
/// in shard order and the bound address.
fn bind_tcp_group(
    what: &'static str,
    addr: SocketAddr,
    handles: &[tokio::runtime::Handle],
) -> Result<(Vec<TcpListener>, SocketAddr), NodeError> {
    let bind_error = |source| NodeError::Bind { what, addr, source };
    let socket = |addr: SocketAddr, reuse_port: bool| -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As tokio's `TcpListener::bind` does: a restart can bind at once.
        socket.set_reuse_address(true)?;
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&addr.into())?;
        Ok(socket)
    };
    let probe = socket(addr, false).map_err(bind_error)?;
    let local = probe
        .local_addr()
        .map_err(bind_error)?
        .as_socket()
        .ok_or_else(|| bind_error(std::io::Error::other("bound to a non-IP address")))?;
    let sockets = if handles.len() > 1 {
        drop(probe);
        handles
            .iter()
            .map(|_| socket(local, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bind_error)?
    } else {
        vec![probe]
    };
    let mut listeners = Vec::new();
    for (handle, socket) in handles.iter().zip(sockets) {
        socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        let _entered = handle.enter();
        listeners.push(TcpListener::from_std(socket.into()).map_err(bind_error)?);
    }
    Ok((listeners, local))
}

/// The accept queue of each TCP listener (tokio's default, too).
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// Binds a TCP listener and reads back its address (port 0 becomes real).
async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), NodeError> {
    let bind_error = |source| NodeError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_allow_reloads_the_rest_of_overlay_needs_a_restart() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        if let Some(overlay) = &mut new.overlay {
            overlay.allow.clear();
        }
        assert!(restart_only_changes(&old, &new).is_empty());
        if let Some(overlay) = &mut new.overlay {
            overlay.manage = !overlay.manage;
        }
        assert_eq!(
            restart_only_changes(&old, &new),
            ["[overlay] (except allow)"]
        );
        new.overlay = None;
        assert_eq!(
            restart_only_changes(&old, &new),
            ["[overlay] (except allow)"]
        );
    }

    #[test]
    fn peers_and_forwards_reload_quic_and_admin_need_a_restart() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        new.peers.reverse();
        new.peers.pop();
        new.forwards.clear();
        new.exposes.clear();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.quic.idle_timeout *= 2;
        new.admin = None;
        assert_eq!(restart_only_changes(&old, &new), ["[quic]", "[admin]"]);
    }

    #[test]
    fn limits_reload_except_the_buffer_budget_and_threads() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        new.limits.pending_streams_per_peer = 1;
        new.limits.handshakes = 1;
        new.limits.retry_above = 0;
        new.limits.accept_backoff_max = Duration::from_secs(5);
        assert!(restart_only_changes(&old, &new).is_empty());
        new.limits.buffer_memory *= 2;
        assert_eq!(restart_only_changes(&old, &new), ["limits.buffer_memory"]);
        new.limits.worker_threads = std::num::NonZeroUsize::new(1);
        assert_eq!(
            restart_only_changes(&old, &new),
            ["limits.buffer_memory", "limits.worker_threads"]
        );
        new.limits.shards = std::num::NonZeroUsize::new(1);
        assert_eq!(
            restart_only_changes(&old, &new),
            [
                "limits.buffer_memory",
                "limits.worker_threads",
                "limits.shards"
            ]
        );
    }
}
