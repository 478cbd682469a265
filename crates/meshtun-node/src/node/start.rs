//! The steps of [`Node::start`](super::Node::start).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use meshtun_config::{Config, Forward as ForwardConfig, Overlay, Peer};
use meshtun_pki::{NodeCredentials, TrustBundle};
use meshtun_proto::NodeName;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::{bind_tcp_group, AcceptLoop, RunningForward};
use crate::carrier::Carrier;
use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::peer::{DialTiming, PeerLinks};
use crate::policy::{InForce, Policy, TrustState};
use crate::shared::Shared;
use crate::{acceptor, endpoint, gso, opener, overlay, peer, shard, splice};

/// Makes the dial state of `peer`, whose dialers stop with `stop`.
pub(super) fn peer_links(
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
pub(super) fn spawn_dialers(
    shared: &Shared,
    links: &Arc<PeerLinks>,
    dialers: &[quinn::Endpoint],
    timing: DialTiming,
    connections: usize,
) {
    for (shard, dialer) in shared.carrier.shards.iter().zip(dialers) {
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
pub(super) fn spawn_forward(
    shared: &Arc<Shared>,
    listeners: Vec<TcpListener>,
    running: &RunningForward,
) -> Vec<AcceptLoop> {
    let route = running.target.get();
    info!(listen = %running.local, peer = %route.peer.name(), service = %route.service, "forwarding");
    let mut loops = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let shard = shared.carrier.shard(index);
        let task = opener::accept_loop(
            opener::Forward {
                listener,
                local: running.local,
                shard: shard.index,
                target: running.target.clone(),
                stop: running.stop.clone(),
            },
            shared.carrier.clone(),
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
pub(super) fn overlay_routes(
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

/// Where `forward` sends its connections, among `peers`.
pub(super) fn forward_route(
    forward: &ForwardConfig,
    peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
) -> Result<opener::Route, NodeError> {
    // The config refers only to declared peers.
    let links = peers
        .get(&forward.peer)
        .ok_or_else(|| NodeError::UndeclaredPeer {
            listen: forward.listen,
            peer: forward.peer.clone(),
        })?;
    Ok(opener::Route::new(links.clone(), forward.service.clone()))
}

/// One QUIC listener per shard, made inside its shard's runtime (quinn
/// registers the socket with the reactor and spawns its driver there), and
/// the endpoint each shard dials from: its listener when there is one
/// shard, as a node without shards would; a socket of its own otherwise.
pub(super) fn shard_endpoints(
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
pub(super) fn shard_states(
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
pub(super) fn configured_peers(
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
pub(super) fn bind_forwards(
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
            target: Arc::new(opener::Target::new(route)),
            stop: stop_accepting.child_token(),
        };
        forwards.push((running, listeners));
    }
    Ok(forwards)
}

/// The overlay's transparent listeners, one per shard, and its routes.
pub(super) fn bind_transparent(
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

/// With `overlay.manage`, the interface and the nftables table (with
/// `[guard]`, which shares it); a failure undoes what was made.
pub(super) async fn set_up_host(
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
pub(super) fn spawn_shards(
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
    for index in 0..shared.carrier.shards.len() {
        let carrier = shared.carrier.clone();
        let (started, closing) = (shared.started, shared.closing.clone());
        let beat = async move {
            carrier.shard(index).heartbeat(started, closing).await;
        };
        shared
            .tasks
            .spawn_on(beat, &shared.carrier.shard(index).handle);
    }
    let mut loops = Vec::new();
    for (shard, listener) in shared.carrier.shards.iter().zip(listeners) {
        let span = tracing::info_span!("shard", shard = shard.index);
        let accept = acceptor::accept_loop(listener.clone(), shard.index, shared.clone());
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
pub(super) fn spawn_transparent(
    shared: &Arc<Shared>,
    transparent: overlay::Transparent,
    loops: &mut Vec<AcceptLoop>,
) -> SocketAddr {
    let local = transparent.local;
    info!(listen = %local, "overlay transparent listener");
    for (index, listener) in transparent.listeners.into_iter().enumerate() {
        let shard = shared.carrier.shard(index);
        let task = overlay::accept_loop(
            listener,
            local,
            index,
            transparent.routes.clone(),
            shared.carrier.clone(),
            shared.stop_accepting.clone(),
        );
        loops.push(AcceptLoop::new(
            format!("overlay transparent listener {local} of shard {index}"),
            shared.tasks.spawn_on(task, &shard.handle),
        ));
    }
    local
}

/// What the stream tasks will hold: a fresh tracker and drain signal, the
/// buffer budget of `limits.buffer_memory`, the shards, the node's metrics
/// and the policy `config` puts in force.
pub(super) fn new_carrier(
    config: &Config,
    shards: Vec<shard::Shard>,
    metrics: Metrics,
) -> Arc<Carrier> {
    Arc::new(Carrier {
        streams: TaskTracker::new(),
        abort: CancellationToken::new(),
        buffers: splice::Buffers::new(config.limits.buffer_memory, metrics.buffer_bytes.clone()),
        shards,
        metrics: Arc::new(metrics),
        policy: InForce::new(Policy::from_config(config)),
    })
}
