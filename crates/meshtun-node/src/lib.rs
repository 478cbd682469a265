//! The meshtun daemon's runtime.
//!
//! This crate owns everything that does network I/O or spawns tasks: the one
//! QUIC endpoint, the warm connections to each peer, a loopback listener per
//! `[[forward]]`, and the acceptor that maps each incoming stream to an
//! `[[expose]]` target. It takes a validated [`meshtun_config::Config`] and
//! loaded certificates; it must not parse configuration or read key files
//! itself, and it never decides policy outside what the config says.
//!
//! Every task it spawns is owned by a [`TaskTracker`] and stops through a
//! [`CancellationToken`]: [`Node::shutdown`] stops accepting, lets open
//! streams drain for a grace period, resets what is left and closes QUIC with
//! a code.

mod cid;
mod endpoint;
mod expose;
mod forward;
mod peer;
mod splice;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshtun_config::{Config, Expose};
use meshtun_pki::{NodeCredentials, TrustBundle};
use meshtun_proto::{ConnectionCode, NodeName};
use quinn::VarInt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::peer::{DialTiming, PeerLinks};

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
}

/// How long shutdown waits for reset stream tasks to end before it closes
/// the endpoint under them.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// State shared by the node's tasks. Read-only after start.
#[derive(Debug)]
pub(crate) struct Shared {
    node: NodeName,
    exposes: Vec<Expose>,
    handshake_timeout: Duration,
    preamble_timeout: Duration,
    connect_timeout: Duration,
    /// Fires when the node stops taking new work (SIGTERM).
    stop_accepting: CancellationToken,
    /// Fires when the drain period is over: open streams are reset.
    abort_streams: CancellationToken,
    /// Accept loops, dialers and connection tasks.
    tasks: TaskTracker,
    /// One task per forwarded stream, on either side.
    streams: TaskTracker,
    /// Identities of the peers connected to this node, with how many
    /// connections each has open.
    incoming: Mutex<BTreeMap<NodeName, usize>>,
}

impl Shared {
    /// Records an incoming connection from `peer` until the guard drops.
    pub(crate) fn track_incoming(self: &Arc<Self>, peer: &NodeName) -> IncomingGuard {
        let mut incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *incoming.entry(peer.clone()).or_insert(0) += 1;
        IncomingGuard {
            shared: self.clone(),
            peer: peer.clone(),
        }
    }
}

/// Un-counts an incoming connection when its task ends.
#[derive(Debug)]
pub(crate) struct IncomingGuard {
    shared: Arc<Shared>,
    peer: NodeName,
}

impl Drop for IncomingGuard {
    fn drop(&mut self) {
        let mut incoming = self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = incoming.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                incoming.remove(&self.peer);
            }
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    forward_addrs: Vec<SocketAddr>,
    peers: BTreeMap<NodeName, Arc<PeerLinks>>,
}

impl Node {
    /// Binds the QUIC endpoint and every forward listener, then starts the
    /// dialers and accept loops. When this returns `Ok`, every listener is
    /// bound and the node serves; peers may still be connecting.
    ///
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<Node, NodeError> {
        let quic = &config.quic;
        let server = endpoint::server_config(quic, &trust, &credentials)?;
        let socket = endpoint::bind_udp(quic)?;
        let endpoint = quinn::Endpoint::new(
            endpoint::endpoint_config(&credentials),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| NodeError::Bind {
            what: "QUIC endpoint (quic.listen)",
            addr: quic.listen,
            source,
        })?;
        let quic_addr = endpoint::local_addr(&endpoint, quic.listen)?;

        let mut peers = BTreeMap::new();
        let mut clients = Vec::new();
        for peer in &config.peers {
            let client = endpoint::client_config(quic, &trust, &credentials, &peer.name)?;
            let links = Arc::new(PeerLinks::new(
                peer.name.clone(),
                peer.addr.clone(),
                quic.connections_per_peer.get(),
            ));
            peers.insert(peer.name.clone(), links.clone());
            clients.push((links, client));
        }

        // Bind every forward listener before spawning anything, so a port
        // conflict fails the start instead of leaving a half-running node.
        let mut forwards = Vec::new();
        let mut forward_addrs = Vec::new();
        for forward in &config.forwards {
            let listener =
                TcpListener::bind(forward.listen)
                    .await
                    .map_err(|source| NodeError::Bind {
                        what: "forward listener",
                        addr: forward.listen,
                        source,
                    })?;
            let local = listener.local_addr().map_err(|source| NodeError::Bind {
                what: "forward listener",
                addr: forward.listen,
                source,
            })?;
            // The config refers only to declared peers.
            let Some(links) = peers.get(&forward.peer) else {
                return Err(NodeError::Quic(format!(
                    "forward on {} names undeclared peer {}",
                    forward.listen, forward.peer
                )));
            };
            forward_addrs.push(local);
            forwards.push(forward::Forward {
                listener,
                local,
                peer: links.clone(),
                service: forward.service.clone(),
            });
        }

        let shared = Arc::new(Shared {
            node: config.node.clone(),
            exposes: config.exposes.clone(),
            handshake_timeout: quic.handshake_timeout,
            preamble_timeout: config.limits.preamble_timeout,
            connect_timeout: config.limits.connect_timeout,
            stop_accepting: CancellationToken::new(),
            abort_streams: CancellationToken::new(),
            tasks: TaskTracker::new(),
            streams: TaskTracker::new(),
            incoming: Mutex::new(BTreeMap::new()),
        });

        let timing = DialTiming {
            handshake_timeout: quic.handshake_timeout,
            reconnect_min: quic.reconnect_min,
            reconnect_max: quic.reconnect_max,
        };
        for (links, client) in clients {
            for index in 0..quic.connections_per_peer.get() {
                let span = tracing::info_span!("peer", peer = %links.name());
                let task = links.clone().dial_loop(
                    index,
                    endpoint.clone(),
                    client.clone(),
                    timing,
                    shared.stop_accepting.clone(),
                );
                shared.tasks.spawn(task.instrument(span));
            }
        }
        shared
            .tasks
            .spawn(expose::accept_loop(endpoint.clone(), shared.clone()));
        for forward in forwards {
            info!(listen = %forward.local, peer = %forward.peer.name(), service = %forward.service, "forwarding");
            shared
                .tasks
                .spawn(forward::accept_loop(forward, shared.clone()));
        }
        info!(node = %config.node, quic = %quic_addr, peers = peers.len(), exposes = config.exposes.len(), "node started");
        Ok(Node {
            shared,
            endpoint,
            quic_addr,
            forward_addrs,
            peers,
        })
    }

    /// The UDP address the QUIC endpoint is bound to.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound address of each `[[forward]]`, in config order.
    pub fn forward_addrs(&self) -> &[SocketAddr] {
        &self.forward_addrs
    }

    /// Whether at least one QUIC connection to `peer` is up.
    pub fn is_connected(&self, peer: &NodeName) -> bool {
        self.peers
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

    /// Waits until every configured peer has a live connection, or `timeout`
    /// passes. Returns the peers still not connected.
    pub async fn wait_connected(&self, timeout: Duration) -> Vec<NodeName> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing = Vec::new();
        for (name, links) in &self.peers {
            if !links.wait_connected(deadline).await {
                missing.push(name.clone());
            }
        }
        missing
    }

    /// Stops accepting, lets open streams finish for up to `grace`, resets
    /// the rest, and closes every QUIC connection with a shutdown code.
    pub async fn shutdown(self, grace: Duration) {
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
        self.endpoint
            .close(VarInt::from_u32(code.to_u32()), code.reason());
        shared.tasks.close();
        // Connection tasks end once the endpoint is closed; waiting for the
        // close frames to go out is bounded so a vanished peer cannot hold us.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            shared.tasks.wait().await;
            self.endpoint.wait_idle().await;
        })
        .await;
        info!("node stopped");
    }
}
