//! Warm QUIC connections to each configured peer.
//!
//! Every `[[peer]]` gets `quic.connections_per_peer` dialer tasks on each
//! shard. Each keeps one connection up: it dials at start, waits for the
//! connection to close, and dials again after a jittered exponential
//! backoff. A forwarder picks a live connection of its own shard,
//! round-robin, so the stream's bytes stay on that shard's thread; only if
//! its shard has none up does it borrow another shard's. It never waits for
//! a handshake unless one is already under way, so a down peer turns into a
//! prompt reset.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshtun_config::HostPort;
use meshtun_proto::{ConnectionCode, NodeName, WELCOME};
use quinn::{ClientConfig, Connection, Endpoint, VarInt};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::metrics::{handshake_reason, PeerStats};
use crate::{still_trusted, TrustState};

/// The TLS server name sent by dialers. Identity is checked against the
/// configured peer name by the verifier, not through SNI, so a constant keeps
/// node names out of the clear-text ClientHello.
pub(crate) const SERVER_NAME: &str = "meshtun";

/// State of one connection slot.
#[derive(Debug, Clone)]
enum Slot {
    /// A dial is under way; a forwarder may wait for it.
    Dialing,
    /// A connection is established.
    Up(Connection),
    /// The last dial failed; the dialer is backing off.
    Down,
}

/// Backoff and timing for a dialer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DialTiming {
    pub(crate) handshake_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
}

/// The connections to one peer, shared between its dialers and the
/// forwarders that send streams to it.
#[derive(Debug)]
pub(crate) struct PeerLinks {
    name: NodeName,
    addr: HostPort,
    /// The connection slots of each shard, by shard index.
    shards: Vec<watch::Sender<Vec<Slot>>>,
    next: AtomicUsize,
    /// TLS for the next dial; a reload replaces it.
    client: Mutex<ClientConfig>,
    /// The trust in force, to re-check a handshake that raced a reload.
    trust: TrustState,
    /// Why the last dial failed, until one succeeds.
    last_error: Mutex<Option<String>>,
    stats: Arc<PeerStats>,
}

impl PeerLinks {
    /// `connections` slots on each of `shards` shards.
    pub(crate) fn new(
        name: NodeName,
        addr: HostPort,
        shards: usize,
        connections: usize,
        client: ClientConfig,
        stats: Arc<PeerStats>,
        trust: TrustState,
    ) -> Self {
        Self {
            name,
            addr,
            shards: (0..shards.max(1))
                .map(|_| watch::Sender::new(vec![Slot::Dialing; connections]))
                .collect(),
            next: AtomicUsize::new(0),
            client: Mutex::new(client),
            trust,
            last_error: Mutex::new(None),
            stats,
        }
    }

    pub(crate) fn name(&self) -> &NodeName {
        &self.name
    }

    pub(crate) fn addr(&self) -> &HostPort {
        &self.addr
    }

    /// How many connections this node keeps to the peer, over all shards.
    pub(crate) fn slots(&self) -> usize {
        self.shards.iter().map(|slots| slots.borrow().len()).sum()
    }

    pub(crate) fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Replaces the TLS config used by the next dials. Live connections
    /// keep the one they were made with.
    pub(crate) fn set_client(&self, client: ClientConfig) {
        *self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = client;
    }

    fn client(&self) -> ClientConfig {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
    }

    /// The connections that are up now, with the shard each lives on.
    pub(crate) fn live_connections(&self) -> Vec<(usize, Connection)> {
        let mut live = Vec::new();
        for (shard, slots) in self.shards.iter().enumerate() {
            for slot in slots.borrow().iter() {
                if let Slot::Up(connection) = slot {
                    if connection.close_reason().is_none() {
                        live.push((shard, connection.clone()));
                    }
                }
            }
        }
        live
    }

    /// A live connection of `shard`, round-robin over its slots, or failing
    /// that of any other shard. Waits up to `wait` only while a dial of
    /// `shard` is still in progress; returns `None` at once if nothing is
    /// up and `shard` is not dialling.
    pub(crate) async fn connection(&self, shard: usize, wait: Duration) -> Option<Connection> {
        let deadline = Instant::now() + wait;
        let own = self.shards.get(shard).unwrap_or(&self.shards[0]);
        let mut slots = own.subscribe();
        loop {
            let dialing = {
                let current = slots.borrow_and_update();
                if let Some(connection) = self.pick(&current) {
                    return Some(connection);
                }
                current.iter().any(|slot| matches!(slot, Slot::Dialing))
            };
            // This shard has nothing up: borrow another's rather than wait.
            for (index, other) in self.shards.iter().enumerate() {
                if index != shard {
                    if let Some(connection) = self.pick(&other.borrow()) {
                        return Some(connection);
                    }
                }
            }
            if !dialing {
                return None;
            }
            match tokio::time::timeout_at(deadline, slots.changed()).await {
                Ok(Ok(())) => continue,
                // A last look: another shard may have come up meanwhile.
                Ok(Err(_)) | Err(_) => {
                    return self
                        .shards
                        .iter()
                        .find_map(|other| self.pick(&other.borrow()));
                }
            }
        }
    }

    /// A live connection among `slots`, round-robin.
    fn pick(&self, slots: &[Slot]) -> Option<Connection> {
        let count = slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count).find_map(|offset| match &slots[(start + offset) % count] {
            Slot::Up(connection) if connection.close_reason().is_none() => Some(connection.clone()),
            _ => None,
        })
    }

    /// Whether at least one connection is up, on any shard.
    pub(crate) fn is_connected(&self) -> bool {
        (0..self.shards.len()).any(|shard| self.shard_connected(shard))
    }

    fn shard_connected(&self, shard: usize) -> bool {
        self.shards[shard].borrow().iter().any(|slot| match slot {
            Slot::Up(connection) => connection.close_reason().is_none(),
            _ => false,
        })
    }

    /// Waits until every shard has at least one connection up, or
    /// `deadline` passes; returns whether they all do.
    pub(crate) async fn wait_connected(&self, deadline: Instant) -> bool {
        for (shard, slots) in self.shards.iter().enumerate() {
            let mut slots = slots.subscribe();
            loop {
                if self.shard_connected(shard) {
                    break;
                }
                match tokio::time::timeout_at(deadline, slots.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => return self.shard_connected(shard),
                }
            }
        }
        true
    }

    fn set(&self, shard: usize, index: usize, slot: Slot) {
        if let Some(slots) = self.shards.get(shard) {
            slots.send_modify(|slots| slots[index] = slot);
        }
    }

    /// Keeps slot `index` of `shard` connected until `cancel` fires. Runs on
    /// that shard, and dials through its `endpoint`.
    pub(crate) async fn dial_loop(
        self: Arc<Self>,
        shard: usize,
        index: usize,
        endpoint: Endpoint,
        timing: DialTiming,
        cancel: CancellationToken,
    ) {
        let mut delay = timing.reconnect_min;
        let mut failures: u32 = 0;
        let mut was_up = false;
        loop {
            self.set(shard, index, Slot::Dialing);
            let client = self.client();
            let attempt = self.dial_once(&endpoint, &client, timing.handshake_timeout);
            let result = tokio::select! {
                result = attempt => result,
                () = cancel.cancelled() => return,
            };
            match result {
                Ok(connection) => {
                    info!(
                        remote = %connection.remote_address(),
                        shard,
                        connection = index,
                        "peer connected"
                    );
                    failures = 0;
                    delay = timing.reconnect_min;
                    if was_up {
                        self.stats.reconnected();
                    }
                    was_up = true;
                    self.set_last_error(None);
                    self.set(shard, index, Slot::Up(connection.clone()));
                    // The handshake may have used a trust bundle a reload
                    // replaced; if so the connection is closed right here.
                    let role = meshtun_pki::PeerRole::Acceptor(&self.name);
                    let _ = still_trusted(&connection, &self.trust, role);
                    tokio::select! {
                        reason = connection.closed() => {
                            info!(connection = index, %reason, "peer connection closed");
                        }
                        // On shutdown the connection stays in its slot so that
                        // draining streams keep it; the node closes the endpoint.
                        () = cancel.cancelled() => return,
                    }
                    self.set(shard, index, Slot::Down);
                }
                Err(error) => {
                    self.set(shard, index, Slot::Down);
                    self.stats.handshake_failed(error.reason());
                    self.set_last_error(Some(error.to_string()));
                    failures += 1;
                    // One warning per outage, then a reminder every tenth
                    // attempt: a dead peer must not flood the log.
                    if failures == 1 || failures % 10 == 0 {
                        warn!(connection = index, attempts = failures, %error, "cannot connect to peer");
                    } else {
                        debug!(connection = index, attempts = failures, %error, "cannot connect to peer");
                    }
                }
            }
            let pause = jitter(delay);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return,
            }
            delay = (delay * 2).min(timing.reconnect_max);
        }
    }

    async fn dial_once(
        &self,
        endpoint: &Endpoint,
        client: &ClientConfig,
        handshake_timeout: Duration,
    ) -> Result<Connection, DialError> {
        let addr = self.resolve().await?;
        let connecting = endpoint
            .connect_with(client.clone(), addr, SERVER_NAME)
            .map_err(DialError::Connect)?;
        let handshake = async {
            let connection = connecting
                .await
                .map_err(|error| DialError::Handshake(addr, error))?;
            welcome(&connection).await.map_err(|error| {
                connection.close(
                    VarInt::from_u32(ConnectionCode::ProtocolViolation.to_u32()),
                    b"no welcome",
                );
                DialError::Welcome(addr, error)
            })?;
            Ok(connection)
        };
        match tokio::time::timeout(handshake_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(DialError::Timeout(addr, handshake_timeout)),
        }
    }

    /// Resolves the peer's address on every dial, so DNS changes are seen.
    async fn resolve(&self) -> Result<SocketAddr, DialError> {
        if let Some(addr) = self.addr.to_socket_addr_if_literal() {
            return Ok(addr);
        }
        let target = self.addr.to_string();
        let mut addrs = tokio::net::lookup_host(target.clone())
            .instrument(tracing::debug_span!("resolve", peer_addr = %target))
            .await
            .map_err(|error| DialError::Resolve(target.clone(), error.to_string()))?;
        let first = addrs.next();
        first.ok_or_else(|| DialError::Resolve(target, "no addresses".to_owned()))
    }
}

/// Waits for the acceptor's [`WELCOME`]: proof that it accepted our
/// certificate. If it refused, the connection's close reason says why (in
/// TLS 1.3 the client's side of the handshake completes before the server
/// has judged the client's certificate).
async fn welcome(connection: &Connection) -> Result<(), WelcomeError> {
    let mut stream = connection
        .accept_uni()
        .await
        .map_err(WelcomeError::Closed)?;
    let greeting = stream
        .read_to_end(WELCOME.len())
        .await
        .map_err(|error| WelcomeError::Garbled(format!("reading the welcome: {error}")))?;
    if greeting != WELCOME {
        return Err(WelcomeError::Garbled(
            "peer sent an unexpected welcome; is it a meshtun/1 node?".to_owned(),
        ));
    }
    Ok(())
}

/// Why no welcome came.
#[derive(Debug, thiserror::Error)]
enum WelcomeError {
    /// The acceptor closed the connection (typically: it refused our
    /// certificate).
    #[error(transparent)]
    Closed(quinn::ConnectionError),
    /// Something else arrived.
    #[error("{0}")]
    Garbled(String),
}

/// A uniformly random pause in `[delay/2, delay]`, so peers that lost each
/// other at the same moment do not re-dial in lockstep.
fn jitter(delay: Duration) -> Duration {
    let half = delay / 2;
    let extra = rand::rng().random_range(0..=half.as_micros().min(u128::from(u64::MAX)) as u64);
    half + Duration::from_micros(extra)
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot start a QUIC connection: {0}")]
    Connect(quinn::ConnectError),
    #[error("handshake with {0} failed: {1}")]
    Handshake(SocketAddr, quinn::ConnectionError),
    #[error("{0} did not accept this node: {1}")]
    Welcome(SocketAddr, WelcomeError),
    #[error("handshake with {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
}

impl DialError {
    /// The metric label for this failure.
    fn reason(&self) -> &'static str {
        match self {
            DialError::Resolve(..) => "resolve",
            DialError::Connect(_) => "local",
            DialError::Handshake(_, error) => handshake_reason(error),
            DialError::Welcome(_, WelcomeError::Closed(error)) => handshake_reason(error),
            DialError::Welcome(_, WelcomeError::Garbled(_)) => "no_welcome",
            DialError::Timeout(..) => "timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for millis in [0u64, 1, 100, 10_000] {
            let delay = Duration::from_millis(millis);
            for _ in 0..100 {
                let pause = jitter(delay);
                assert!(
                    pause >= delay / 2 && pause <= delay,
                    "{pause:?} for {delay:?}"
                );
            }
        }
    }
}
