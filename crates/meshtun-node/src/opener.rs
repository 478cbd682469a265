//! The opener side: local TCP connections in, QUIC streams to a peer out.
//! The `[[forward]]` listeners accept here; overlay mode's transparent
//! listener (overlay.rs) hands its connections to the same [`open_stream`].
//!
//! Each shard has its own listener for every forward (one `SO_REUSEPORT`
//! group), so a local connection is accepted on the thread that carries
//! it. The accept loop only accepts and dispatches; everything that can
//! wait on the network (picking a connection, opening the stream, the
//! peer's status) happens in the connection's own task, on the same shard
//! as the QUIC connection that carries it.
//!
//! A reload may add a forward (its listeners are bound and their loops
//! spawned), remove one (its loops stop and the listeners close; the
//! connections already accepted carry on) or send one to another peer or
//! service ([`Target`], read for each new connection).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshtun_proto::{Preamble, ServiceName};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::accept;
use crate::carrier::Carrier;
use crate::metrics::{Direction, RefusalReason};
use crate::peer::PeerLinks;
use crate::splice::{self, FromPeer, Outbound};

/// How long a new local connection may wait for a peer connection whose
/// handshake is under way (at start-up, or right after a peer restart).
/// If no dial is in progress the client is reset at once.
const PEER_WAIT: Duration = Duration::from_millis(500);

/// How long opening a stream may wait for the peer to grant stream credit
/// (it is at `quic.max_streams_per_peer`). Past that the client is reset.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a forward sends its connections: a peer and a service there.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) peer: Arc<PeerLinks>,
    pub(crate) service: ServiceName,
    /// The stream preamble naming `service`, encoded once.
    preamble: Bytes,
}

impl Route {
    pub(crate) fn new(peer: Arc<PeerLinks>, service: ServiceName) -> Self {
        let preamble = encode_preamble(&Preamble::service(service.clone()));
        Self {
            peer,
            service,
            preamble,
        }
    }
}

/// A forward's [`Route`], shared by its listeners on every shard; a reload
/// replaces it whole, and each new connection reads the one in force.
#[derive(Debug)]
pub(crate) struct Target(RwLock<Arc<Route>>);

impl Target {
    pub(crate) fn new(route: Route) -> Self {
        Self(RwLock::new(Arc::new(route)))
    }

    pub(crate) fn get(&self) -> Arc<Route> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn set(&self, route: Route) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(route);
    }
}

/// One `[[forward]]` on one shard: its bound listener (registered with that
/// shard's runtime) and where it sends connections.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(crate) listener: TcpListener,
    pub(crate) local: SocketAddr,
    /// The shard whose runtime the listener belongs to.
    pub(crate) shard: usize,
    pub(crate) target: Arc<Target>,
    /// Fires when this forward stops accepting: the node stops, or a reload
    /// removed the forward.
    pub(crate) stop: CancellationToken,
}

/// Accepts local connections until the forward stops. Runs on the
/// forward's shard, where each connection's task runs too. The listener
/// closes when the loop ends, which resets clients still in its queue.
pub(crate) async fn accept_loop(forward: Forward, carrier: Arc<Carrier>) {
    // The forward's port is fixed (configuration refuses port 0).
    let mut accepting =
        accept::Accepting::fixed_port(format!("forward {}", forward.local), forward.listener);
    while let Some((tcp, client)) = accepting
        .next(&forward.stop, Some(carrier.accept_limits()))
        .await
    {
        let route = forward.target.get();
        let span = tracing::debug_span!(
            "forward",
            listen = %forward.local,
            shard = forward.shard,
            peer = %route.peer.name(),
            service = %route.service,
            %client,
        );
        let task = open_stream(
            tcp,
            route.peer.clone(),
            route.preamble.clone(),
            forward.shard,
            carrier.clone(),
        );
        carrier.streams.spawn(task.instrument(span));
    }
}

/// The bytes of `preamble`, to open a stream with.
pub(crate) fn encode_preamble(preamble: &Preamble) -> Bytes {
    let mut bytes = BytesMut::with_capacity(preamble.encoded_len());
    preamble.encode(&mut bytes);
    bytes.freeze()
}

/// Carries one local TCP connection over one QUIC stream, on `shard`. The
/// carrier's `abort` token cancels it at any point; the socket is
/// armed to reset on close from the start, so cancellation or any early
/// return resets the client rather than closing it cleanly.
pub(crate) async fn open_stream(
    tcp: TcpStream,
    peer: Arc<PeerLinks>,
    preamble: Bytes,
    shard: usize,
    carrier: Arc<Carrier>,
) {
    splice::reset_on_close(&tcp);
    let _counted = carrier.shard(shard).streams.opened();
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%error, "cannot set TCP_NODELAY");
    }
    tokio::select! {
        () = carry(tcp, peer, preamble, shard, &carrier) => {}
        () = carrier.abort.cancelled() => debug!("reset by shutdown"),
    }
}

async fn carry(
    mut tcp: TcpStream,
    peer: Arc<PeerLinks>,
    preamble: Bytes,
    shard: usize,
    carrier: &Carrier,
) {
    let stream = peer.stats().stream(Direction::outgoing);
    let stats = stream.stats();
    let Some(link) = peer.connection(shard, PEER_WAIT).await else {
        let verdict = stats.refused(Direction::outgoing, RefusalReason::NotConnected);
        log_refusal!(verdict, "peer not connected; resetting local connection");
        return;
    };
    // Counted on the connection, so a connection being replaced waits for
    // this stream before it closes.
    let _carried = link.carry();
    let connection = link.connection();
    let (send, mut recv) = match tokio::time::timeout(OPEN_TIMEOUT, connection.open_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(error)) => {
            let verdict = stats.refused(Direction::outgoing, RefusalReason::NotConnected);
            log_refusal!(verdict, %error, "cannot open stream; resetting local connection");
            return;
        }
        Err(_) => {
            let verdict = stats.refused(Direction::outgoing, RefusalReason::NoStreamCredit);
            log_refusal!(verdict, timeout = ?OPEN_TIMEOUT, "peer granted no stream in time; resetting local connection");
            return;
        }
    };
    let mut send = Outbound::new(send);
    let span = tracing::debug_span!("stream", id = %send.stream.id());
    async {
        // The preamble goes out now and the client's bytes right behind it:
        // no round trip is spent waiting for the peer's status.
        let from_peer = FromPeer::AwaitStatus;
        match splice::carry(
            &mut tcp,
            &mut send,
            &mut recv,
            preamble,
            from_peer,
            stats,
            carrier.splice_context(),
        )
        .await
        {
            Ok(totals) => debug!(sent = totals.sent, received = totals.received, "closed"),
            Err((splice::Failure::Refused(status), _)) => {
                let verdict = stats.refused(Direction::outgoing, status.code.into());
                log_refusal!(verdict, code = status.code.as_str(), detail = %status.detail, "stream refused by the peer; local connection reset");
            }
            Err((failure, totals)) => match failure.limit() {
                Some(limit) => {
                    let verdict = stats.refused(Direction::outgoing, RefusalReason::from(limit));
                    log_refusal!(verdict, %failure, "stream reset at the peer's limit; local connection reset");
                }
                None => debug!(%failure, sent = totals.sent, received = totals.received, "reset"),
            },
        }
    }
    .instrument(span)
    .await;
}
