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
//!
//! A reload may change a peer's address (each dialer replaces its
//! connection, and the old one closes once its streams end) or remove the
//! peer (its dialers stop, and each connection closes with
//! [`ConnectionCode::Removed`] once the streams this node carries on it
//! end).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshtun_config::HostPort;
use meshtun_proto::{ConnectionCode, NodeName, WELCOME};
use quinn::{ClientConfig, Connection, Endpoint, VarInt};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::metrics::{handshake_reason, HandshakeReason, PeerStats};
use crate::policy::{still_trusted, TrustState};

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
    Up(Link),
    /// The last dial failed; the dialer is backing off.
    Down,
}

/// A dialled connection and the count of streams this node carries on it,
/// so a connection being replaced is closed only once they are done.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    connection: Connection,
    streams: Arc<AtomicUsize>,
}

impl Link {
    fn new(connection: Connection) -> Self {
        Self {
            connection,
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Counts a stream on this connection until the guard drops.
    pub(crate) fn carry(&self) -> Carried {
        self.streams.fetch_add(1, Ordering::AcqRel);
        Carried(self.streams.clone())
    }
}

/// A stream counted on its [`Link`].
#[derive(Debug)]
pub(crate) struct Carried(Arc<AtomicUsize>);

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a replaced connection is left alone before its stream count
/// is looked at: a forwarder that picked it a moment before it was
/// replaced counts its stream within microseconds.
const RETIRE_GRACE: Duration = Duration::from_secs(2);

/// How often a replaced connection's stream count is looked at.
const RETIRE_POLL: Duration = Duration::from_millis(200);

/// The shortest and longest lead with which a connection is replaced
/// before its certificates expire: a tenth of the time they had left when
/// it was made, within these bounds.
const REFRESH_LEAD: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(300));

/// When to replace a connection made at `now` whose certificates (the
/// peer's chain and this node's own) stop being valid at `deadline`:
/// a tenth of the time left before it, within [`REFRESH_LEAD`]. If
/// `previous`, the deadline of the connection it replaced for the same
/// reason, is the same, the peer has not renewed yet: halfway to the
/// deadline, or `None` once too little time is left.
fn refresh_at(
    now: SystemTime,
    deadline: Option<SystemTime>,
    previous: Option<SystemTime>,
) -> Option<SystemTime> {
    let deadline = deadline?;
    let left = deadline.duration_since(now).unwrap_or(Duration::ZERO);
    let (shortest, longest) = REFRESH_LEAD;
    if previous == Some(deadline) {
        // The same certificates as the connection it replaced: the peer
        // has not renewed yet. Try again halfway to the deadline, while
        // that leaves time.
        return (left >= 2 * shortest).then(|| now + left / 2);
    }
    Some(
        deadline
            .checked_sub((left / 10).clamp(shortest, longest))
            .map_or(now, |at| at.max(now)),
    )
}

/// What a dialer presents: the TLS client configuration and when the
/// certificate in it expires.
#[derive(Debug, Clone)]
pub(crate) struct DialTls {
    pub(crate) client: ClientConfig,
    pub(crate) own_not_after: SystemTime,
}

/// Why every dialer of a peer replaces its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// Nothing yet: the value a peer starts with.
    Nothing,
    /// This node's certificate changed, so peers must see the new one.
    Renewed,
    /// A reload gave the peer a new address.
    Moved,
}

impl Replace {
    fn why(self) -> &'static str {
        match self {
            Replace::Nothing => "no reason",
            Replace::Renewed => "this node's certificate was renewed",
            Replace::Moved => "the peer's address changed",
        }
    }
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
    /// Where to dial; a reload may change it.
    addr: Mutex<HostPort>,
    /// The connection slots of each shard, by shard index.
    shards: Vec<watch::Sender<Vec<Slot>>>,
    next: AtomicUsize,
    /// TLS for the next dial; a reload replaces it.
    client: Mutex<ClientConfig>,
    /// When this node's own certificate expires (the peer cuts connections
    /// made with it then).
    own_not_after: Mutex<SystemTime>,
    /// Bumped (with the reason) when every dialer must replace its
    /// connection: this node's certificate changed, so peers see the new
    /// one, or the peer's address did.
    replace: watch::Sender<(u64, Replace)>,
    /// Fires when the dialers stop: the node shuts down, or a reload
    /// removed the peer (then `removed` is set first).
    stop: CancellationToken,
    removed: AtomicBool,
    /// Replaced connections still carrying streams, with their shard.
    retired: Mutex<Vec<(usize, Connection)>>,
    /// The trust in force, to re-check a handshake that raced a reload.
    trust: TrustState,
    /// Why the last dial failed, until one succeeds.
    last_error: Mutex<Option<String>>,
    stats: Arc<PeerStats>,
}

impl PeerLinks {
    /// `connections` slots on each of `shards` shards. `stop` ends the
    /// dialers (pass a child of the node's shutdown token).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: NodeName,
        addr: HostPort,
        shards: usize,
        connections: usize,
        tls: DialTls,
        stats: Arc<PeerStats>,
        trust: TrustState,
        stop: CancellationToken,
    ) -> Self {
        Self {
            name,
            addr: Mutex::new(addr),
            shards: (0..shards.max(1))
                .map(|_| watch::Sender::new(vec![Slot::Dialing; connections]))
                .collect(),
            next: AtomicUsize::new(0),
            client: Mutex::new(tls.client),
            own_not_after: Mutex::new(tls.own_not_after),
            replace: watch::Sender::new((0, Replace::Nothing)),
            stop,
            removed: AtomicBool::new(false),
            retired: Mutex::new(Vec::new()),
            trust,
            last_error: Mutex::new(None),
            stats,
        }
    }

    pub(crate) fn name(&self) -> &NodeName {
        &self.name
    }

    pub(crate) fn addr(&self) -> HostPort {
        self.addr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Dials `addr` from now on. If it differs from the address in use,
    /// every dialer replaces its connection (a dialer backing off dials at
    /// once); the old connections close once their streams end. Returns
    /// whether the address changed.
    pub(crate) fn set_addr(&self, addr: &HostPort) -> bool {
        {
            let mut current = self
                .addr
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *current == *addr {
                return false;
            }
            *current = addr.clone();
        }
        self.replace_all(Replace::Moved);
        true
    }

    /// Stops dialing this peer for good: a reload removed it. Each dialer
    /// ends, and its connection closes with [`ConnectionCode::Removed`]
    /// once no stream of this node uses it.
    pub(crate) fn remove(&self) {
        self.removed.store(true, Ordering::Release);
        self.stop.cancel();
    }

    fn replace_all(&self, why: Replace) {
        self.replace
            .send_modify(|(generation, reason)| (*generation, *reason) = (*generation + 1, why));
    }

    /// How many connections this node keeps to the peer, over all shards.
    pub(crate) fn slots(&self) -> usize {
        self.shards.iter().map(|slots| slots.borrow().len()).sum()
    }

    pub(crate) fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// Replaces the TLS config used by the next dials. Live connections
    /// keep the one they were made with, unless `renewed` says this node's
    /// certificate (valid until `own_not_after`) is new: then each dialer
    /// replaces its connection, and the old one closes once its streams end.
    pub(crate) fn set_client(&self, tls: DialTls, renewed: bool) {
        *self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = tls.client;
        *self
            .own_not_after
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = tls.own_not_after;
        if renewed {
            self.replace_all(Replace::Renewed);
        }
    }

    /// When a connection made now stops being valid: the earlier of the
    /// peer's chain ([`TrustBundle::chain_deadline`]) and this node's
    /// own certificate.
    fn deadline(&self, connection: &Connection) -> Option<SystemTime> {
        let own = *self
            .own_not_after
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let trust = self
            .trust
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let peer = crate::identity::peer_chain(connection)
            .ok()
            .and_then(|chain| trust.chain_deadline(&chain));
        Some(peer.map_or(own, |peer| peer.min(own)))
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

    /// Every connection to check against the trust in force: those up in
    /// the slots and those replaced but still carrying streams.
    pub(crate) fn connections_to_check(&self) -> Vec<(usize, Connection)> {
        let mut all = self.live_connections();
        all.extend(
            self.retired()
                .iter()
                .filter(|(_, connection)| connection.close_reason().is_none())
                .cloned(),
        );
        all
    }

    /// The connections that are up now, with the shard each lives on.
    pub(crate) fn live_connections(&self) -> Vec<(usize, Connection)> {
        let mut live = Vec::new();
        for (shard, slots) in self.shards.iter().enumerate() {
            for slot in slots.borrow().iter() {
                if let Slot::Up(link) = slot {
                    if link.connection.close_reason().is_none() {
                        live.push((shard, link.connection.clone()));
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
    pub(crate) async fn connection(&self, shard: usize, wait: Duration) -> Option<Link> {
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
    fn pick(&self, slots: &[Slot]) -> Option<Link> {
        let count = slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count).find_map(|offset| match &slots[(start + offset) % count] {
            Slot::Up(link) if link.connection.close_reason().is_none() => Some(link.clone()),
            _ => None,
        })
    }

    /// Whether at least one connection is up, on any shard.
    pub(crate) fn is_connected(&self) -> bool {
        (0..self.shards.len()).any(|shard| self.shard_connected(shard))
    }

    fn shard_connected(&self, shard: usize) -> bool {
        self.shards[shard].borrow().iter().any(|slot| match slot {
            Slot::Up(link) => link.connection.close_reason().is_none(),
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

    /// A dial of slot `index` of `shard` failed for the `failures`-th time
    /// in a row: counted, and logged once per outage, then every tenth
    /// attempt, so a dead peer does not flood the log. A failed replacement
    /// keeps the connection it was to replace (`still`), which is still good.
    fn dial_failed(
        &self,
        shard: usize,
        index: usize,
        still: Option<&Link>,
        error: &DialError,
        failures: u32,
    ) {
        match still {
            Some(old) => self.set(shard, index, Slot::Up(old.clone())),
            None => self.set(shard, index, Slot::Down),
        }
        self.stats.handshake_failed(error.reason());
        self.set_last_error(Some(error.to_string()));
        if failures == 1 || failures % 10 == 0 {
            warn!(connection = index, attempts = failures, %error, "cannot connect to peer");
        } else {
            debug!(connection = index, attempts = failures, %error, "cannot connect to peer");
        }
    }

    /// Keeps slot `index` of `shard` connected until the peer's `stop`
    /// fires. Runs on that shard, and dials through its `endpoint`.
    pub(crate) async fn dial_loop(
        self: Arc<Self>,
        shard: usize,
        index: usize,
        endpoint: Endpoint,
        timing: DialTiming,
    ) {
        let cancel = self.stop.clone();
        let mut delay = timing.reconnect_min;
        let mut failures: u32 = 0;
        let mut was_up = false;
        let mut replace = self.replace.subscribe();
        // The connection being replaced, with the time its certificates
        // expire: it stays in the slot, carrying new streams, until its
        // successor is up.
        let mut replacing: Option<(Link, Option<SystemTime>)> = None;
        // When a connection was replaced because its certificates were
        // about to expire, their deadline: a successor with the same one
        // got the same certificates (the peer has not renewed yet).
        let mut same_as = None;
        loop {
            if replacing
                .as_ref()
                .is_some_and(|(old, _)| old.connection.close_reason().is_some())
            {
                replacing = None;
            }
            if replacing.is_none() {
                self.set(shard, index, Slot::Dialing);
            }
            // Seen before the client and address are read: a renewal or
            // move from here on replaces the connection this dial makes.
            replace.borrow_and_update();
            let client = self.client();
            let attempt = self.dial_once(&endpoint, &client, timing.handshake_timeout);
            let result = tokio::select! {
                result = attempt => result,
                // A new address (or certificate) while a dial is under way,
                // perhaps to a dead address: dial again with it at once.
                Ok(()) = replace.changed() => continue,
                () = cancel.cancelled() => return self.stopped(shard, index, replacing).await,
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
                    // A replacement is not a reconnect: nothing was lost.
                    let was_replacement = replacing.is_some();
                    if was_up && !was_replacement {
                        self.stats.reconnected();
                    }
                    was_up = true;
                    self.set_last_error(None);
                    let link = Link::new(connection.clone());
                    self.set(shard, index, Slot::Up(link.clone()));
                    if let Some((old, old_deadline)) = replacing.take() {
                        tokio::spawn(self.clone().retire(shard, old, old_deadline));
                    }
                    // The handshake may have used a trust bundle a reload
                    // replaced; if so the connection is closed right here.
                    let role = meshtun_pki::PeerRole::Acceptor(&self.name);
                    let _ = still_trusted(&connection, &self.trust, role, &self.stats);
                    let deadline = self.deadline(&connection);
                    let refresh = refresh_at(SystemTime::now(), deadline, same_as);
                    tokio::select! {
                        reason = connection.closed() => {
                            info!(connection = index, %reason, "peer connection closed");
                            same_as = None;
                        }
                        () = sleep_until_wall(refresh) => {
                            info!(connection = index, "replacing the connection: its certificates expire soon");
                            same_as = deadline;
                            replacing = Some((link, deadline));
                            continue;
                        }
                        Ok(()) = replace.changed() => {
                            let why = replace.borrow_and_update().1.why();
                            info!(connection = index, "replacing the connection: {why}");
                            same_as = None;
                            replacing = Some((link, deadline));
                            continue;
                        }
                        () = cancel.cancelled() => {
                            return self.stopped(shard, index, Some((link, deadline))).await;
                        }
                    }
                    self.set(shard, index, Slot::Down);
                }
                Err(error) => {
                    failures += 1;
                    let still = replacing.as_ref().map(|(old, _)| old);
                    self.dial_failed(shard, index, still, &error, failures);
                }
            }
            let pause = jitter(delay);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                // A new address is worth a dial at once.
                Ok(()) = replace.changed() => {}
                () = cancel.cancelled() => return self.stopped(shard, index, replacing).await,
            }
            delay = (delay * 2).min(timing.reconnect_max);
        }
    }

    /// The end of a dialer, with the connection of its slot, if any. On
    /// shutdown the connection stays in its slot, so that draining streams
    /// keep it (the node closes the endpoint). A removed peer's connection
    /// leaves the slot and closes once its streams are done.
    async fn stopped(
        &self,
        shard: usize,
        index: usize,
        current: Option<(Link, Option<SystemTime>)>,
    ) {
        if !self.removed.load(Ordering::Acquire) {
            return;
        }
        self.set(shard, index, Slot::Down);
        if let Some((link, deadline)) = current {
            if link.connection.close_reason().is_none() {
                self.retire_as(shard, link, deadline, ConnectionCode::Removed)
                    .await;
            }
        }
    }

    /// Closes a replaced connection once no stream of this node uses it
    /// (after [`RETIRE_GRACE`]), or cuts it when its certificates expire
    /// at `deadline`, whichever comes first.
    async fn retire(self: Arc<Self>, shard: usize, old: Link, deadline: Option<SystemTime>) {
        self.retire_as(shard, old, deadline, ConnectionCode::Shutdown)
            .await;
    }

    /// [`PeerLinks::retire`], closing with `code`.
    async fn retire_as(
        &self,
        shard: usize,
        old: Link,
        deadline: Option<SystemTime>,
        code: ConnectionCode,
    ) {
        // Kept where a reload's trust sweep and the expiry sweep see it.
        self.retired().push((shard, old.connection.clone()));
        self.finish_retiring(&old, deadline, code).await;
        let id = old.connection.stable_id();
        self.retired()
            .retain(|(_, connection)| connection.stable_id() != id);
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Connection)>> {
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn finish_retiring(
        &self,
        old: &Link,
        deadline: Option<SystemTime>,
        code: ConnectionCode,
    ) {
        // A connection closed meanwhile (the node shutting down, the peer
        // going away) ends the wait at once.
        let pause = |length| async move {
            tokio::select! {
                () = tokio::time::sleep(length) => {}
                _ = old.connection.closed() => {}
            }
        };
        pause(RETIRE_GRACE).await;
        loop {
            if old.connection.close_reason().is_some() {
                return;
            }
            if old.streams.load(Ordering::Acquire) == 0 {
                // Replaced, and then removed before its streams were done.
                let code = if self.removed.load(Ordering::Acquire) {
                    ConnectionCode::Removed
                } else {
                    code
                };
                let reason: &[u8] = match code {
                    ConnectionCode::Shutdown => b"replaced",
                    other => other.reason(),
                };
                debug!(
                    reason = %String::from_utf8_lossy(reason),
                    "closing a connection that is no longer needed: its streams are done"
                );
                old.connection
                    .close(VarInt::from_u32(code.to_u32()), reason);
                return;
            }
            if deadline.is_some_and(|deadline| deadline <= SystemTime::now()) {
                let role = meshtun_pki::PeerRole::Acceptor(&self.name);
                if !still_trusted(&old.connection, &self.trust, role, &self.stats) {
                    return;
                }
            }
            pause(RETIRE_POLL).await;
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
        let addr = self.addr();
        if let Some(addr) = addr.to_socket_addr_if_literal() {
            return Ok(addr);
        }
        let target = addr.to_string();
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

/// Sleeps until the wall-clock time `at`, or forever if `None`.
async fn sleep_until_wall(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
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
    fn reason(&self) -> HandshakeReason {
        match self {
            DialError::Resolve(..) => HandshakeReason::Resolve,
            DialError::Connect(_) => HandshakeReason::Local,
            DialError::Handshake(_, error) => handshake_reason(error),
            DialError::Welcome(_, WelcomeError::Closed(error)) => handshake_reason(error),
            DialError::Welcome(_, WelcomeError::Garbled(_)) => HandshakeReason::NoWelcome,
            DialError::Timeout(..) => HandshakeReason::Timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_replaced_a_tenth_of_its_time_before_its_certificates_expire() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let in_seconds = |seconds: u64| now + Duration::from_secs(seconds);
        // A two-minute certificate: 12 s ahead.
        assert_eq!(
            refresh_at(now, Some(in_seconds(120)), None),
            Some(in_seconds(108))
        );
        // Hours ahead: at most five minutes early.
        assert_eq!(
            refresh_at(now, Some(in_seconds(12 * 3600)), None),
            Some(in_seconds(12 * 3600 - 300))
        );
        // Seconds ahead: at least two seconds early, never before now.
        assert_eq!(
            refresh_at(now, Some(in_seconds(10)), None),
            Some(in_seconds(8))
        );
        assert_eq!(refresh_at(now, Some(in_seconds(1)), None), Some(now));
        // The same certificates as the connection it replaced: again
        // halfway, while that leaves time.
        assert_eq!(
            refresh_at(now, Some(in_seconds(120)), Some(in_seconds(120))),
            Some(in_seconds(60))
        );
        assert_eq!(
            refresh_at(now, Some(in_seconds(3)), Some(in_seconds(3))),
            None
        );
        assert_eq!(refresh_at(now, None, None), None);
    }

    #[test]
    fn a_link_counts_the_streams_it_carries() {
        let streams = Arc::new(AtomicUsize::new(0));
        let first = Carried({
            streams.fetch_add(1, Ordering::AcqRel);
            streams.clone()
        });
        let second = Carried({
            streams.fetch_add(1, Ordering::AcqRel);
            streams.clone()
        });
        assert_eq!(streams.load(Ordering::Acquire), 2);
        drop(first);
        drop(second);
        assert_eq!(streams.load(Ordering::Acquire), 0);
    }

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
