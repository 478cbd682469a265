//! The state the node's tasks share. Held whole only by the node (node/),
//! the admin endpoint (admin.rs, which serves this module's report) and
//! the acceptor, which admits connections against the node's trust,
//! policy, handshake count and per-peer connections. The opener side holds
//! the narrower [`Carrier`]; the forwarding listeners' accepts hold
//! [`NodeLimits`](crate::accept::NodeLimits).

mod report;

pub(crate) use report::unix_now;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use meshtun_proto::NodeName;
use quinn::Connection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::carrier::Carrier;
use crate::metrics::Metrics;
use crate::peer::PeerLinks;
use crate::policy::{Policy, TrustState};
use crate::status::{
    CertificateStatus, ExposeStatus, ForwardStatus, GuardStatus, OverlayStatus, RenewalStatus,
};

/// State shared by the node's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) node: NodeName,
    pub(crate) trust: TrustState,
    pub(crate) handshake_timeout: Duration,
    /// Incoming QUIC handshakes in progress (see `limits.handshakes`).
    pub(crate) handshaking: AtomicU32,
    /// `quic.max_streams_per_peer`: each connection's QUIC stream credit,
    /// and the cap over all of one peer's connections.
    pub(crate) max_streams_per_peer: u32,
    /// Fires when the node stops taking new work (SIGTERM).
    pub(crate) stop_accepting: CancellationToken,
    /// Fires last, when the endpoint closes: the admin endpoint stops.
    pub(crate) closing: CancellationToken,
    /// Accept loops, dialers and connection tasks.
    pub(crate) tasks: TaskTracker,
    /// What the stream tasks hold: their tracker, the drain signal, the
    /// buffer budget, the shards, the metrics and the policy.
    pub(crate) carrier: Arc<Carrier>,
    /// Connections peers dialled to this node, by verified identity, with
    /// the shard that accepted each.
    pub(crate) incoming: Mutex<BTreeMap<NodeName, Vec<(usize, Connection)>>>,
    /// The peers this node dials; a reload may add and remove them.
    pub(crate) peers: RwLock<PeerMap>,
    /// What `/status` reports that is fixed between reloads.
    pub(crate) facts: Mutex<Facts>,
    pub(crate) started: Instant,
}

/// The peers a node dials.
#[derive(Debug, Default)]
pub(crate) struct PeerMap {
    /// Those the configuration in force names.
    pub(crate) configured: BTreeMap<NodeName, Arc<PeerLinks>>,
    /// Those a reload removed, until nothing uses them any more: their
    /// connections stay in the trust sweeps and `/status` while their
    /// streams finish.
    pub(crate) departing: Vec<Arc<PeerLinks>>,
}

/// Descriptive state for `/status`, replaced on reload.
#[derive(Debug)]
pub(crate) struct Facts {
    pub(crate) quic_listen: SocketAddr,
    pub(crate) certificate: CertificateStatus,
    pub(crate) forwards: Vec<ForwardStatus>,
    pub(crate) exposes: Vec<ExposeStatus>,
    pub(crate) overlay: Option<OverlayStatus>,
    pub(crate) guard: Option<GuardStatus>,
    pub(crate) last_reload_unix: Option<i64>,
    pub(crate) last_reload_error: Option<String>,
    /// Self-renewal, as the daemon last reported it.
    pub(crate) renewal: Option<RenewalStatus>,
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
        self.carrier.policy.get()
    }

    /// The node's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.carrier.metrics
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

    /// Incoming handshakes in progress now.
    pub(crate) fn handshakes_in_progress(&self) -> u32 {
        self.handshaking.load(Ordering::Relaxed)
    }

    pub(crate) fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every live connection: its peer, and `Some(peer)` if this node
    /// dialled it (the peer verified as the acceptor) or `None` if the peer
    /// dialled in. Copied out of the locks.
    pub(crate) fn live_connections(&self) -> Vec<(NodeName, Connection, Option<NodeName>)> {
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
