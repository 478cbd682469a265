//! A running node: start, the handles the daemon asks, and shutdown.

mod facts;
mod reload;
mod start;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use meshtun_config::{Config, Forward as ForwardConfig};
use meshtun_pki::{NodeCredentials, TrustBundle};
use meshtun_proto::{ConnectionCode, NodeName};
use quinn::VarInt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::peer::DialTiming;
use crate::policy::TrustState;
use crate::shared::{PeerMap, Shared};
use crate::status::{CertificateStatus, NodeStatus, RenewalStatus};
use crate::{accept, admin, endpoint, opener, overlay, shard};
use facts::*;
use start::*;
use watch::*;

/// How long shutdown waits for reset stream tasks to end before it closes
/// the endpoint under them.
const ABORT_WAIT: Duration = Duration::from_secs(1);
/// How long shutdown lets the QUIC close frames leave before it exits.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

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
    target: Arc<opener::Target>,
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

        let carrier = new_carrier(&config, shards, metrics);
        let shared = Arc::new(Shared {
            node: config.node.clone(),
            trust: trust_state,
            handshake_timeout: quic.handshake_timeout,
            handshaking: AtomicU32::new(0),
            max_streams_per_peer: quic.max_streams_per_peer,
            stop_accepting,
            closing: CancellationToken::new(),
            tasks: TaskTracker::new(),
            carrier,
            incoming: Mutex::new(BTreeMap::new()),
            peers: RwLock::new(PeerMap {
                configured: peers,
                departing: Vec::new(),
            }),
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
        self.shared.certificate()
    }

    /// Records the state of the certificate's self-renewal, for `/status`
    /// and `/metrics` (`None`: not configured).
    pub fn set_renewal(&self, renewal: Option<RenewalStatus>) {
        self.shared.metrics().set_renewal(renewal.as_ref());
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
        for shard in &self.shared.carrier.shards {
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
}

impl Node {
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
        shared.carrier.streams.close();
        let open = shared.carrier.streams.len();
        if open > 0 {
            info!(open, ?grace, "draining open streams");
        }
        if tokio::time::timeout(grace, shared.carrier.streams.wait())
            .await
            .is_err()
        {
            warn!(
                open = shared.carrier.streams.len(),
                "drain period over; resetting open streams"
            );
            shared.carrier.abort.cancel();
            // Cancelled stream tasks end at their next poll; the bound only
            // guards against a peer that keeps opening streams meanwhile.
            let _ = tokio::time::timeout(ABORT_WAIT, shared.carrier.streams.wait()).await;
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
        socket.listen(accept::LISTEN_BACKLOG).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        let _entered = handle.enter();
        listeners.push(TcpListener::from_std(socket.into()).map_err(bind_error)?);
    }
    Ok((listeners, local))
}

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
