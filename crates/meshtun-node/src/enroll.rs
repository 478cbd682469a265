//! Enrollment over the network: the server behind `meshtun pki serve` and
//! the client call of `meshtun join`. The protocol, the token store, the CSR
//! checks and the TLS configurations are `meshtun_pki`'s (`enroll.rs`
//! there); this module moves bytes, bounds time, and rate-limits.
//!
//! The server: TLS 1.3 over TCP with a certificate it signs for itself with
//! the CA (made again every [`SERVER_CERT_REFRESH`]). The accept loop only
//! accepts and spawns; each connection runs in its own task, owned by a
//! [`TaskTracker`], with [`CONNECTION_TIMEOUT`] for the handshake and the
//! request and [`WRITE_TIMEOUT`] for the answer, at most [`MAX_CONNECTIONS`]
//! at once. The blocking part (token file lock, CA signature) runs on a
//! blocking thread of the same tracker.
//!
//! Every failed attempt (a refused token, a wrong name, a malformed request,
//! a failed TLS handshake, a timeout) is logged at warn with the source
//! address (never the token secret; the token's public id when there is
//! one) and counts against the source: [`MAX_FAILURES`] failures within
//! [`FAILURE_WINDOW`] make the server answer `rate_limited` to that address
//! for [`BLOCK_DURATION`], valid tokens included. IPv6 sources are counted
//! by /64.
//!
//! The same server answers renewals: a node connects with ALPN
//! `meshtun-renew/1`, presents its current certificate (verified against the
//! CA in the handshake) and sends a CSR for a fresh key; the client side is
//! [`request_renewal`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshtun_enroll::{
    decode_response, encode_frame, enrollment_client_config, enrollment_server_config, frame_len,
    renewal_client_config, CaFingerprint, CaFingerprintMismatch, EnrollResponse, Enroller, Granted,
    Refusal, RefusalCode, RENEW_ALPN,
};
use meshtun_pki::{NodeCredentials, PkiError};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served at once for one source (an address, or a /64 for
/// IPv6), so one host cannot hold every slot.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 4;
/// How long a client may take for the TLS handshake and its request.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the answer may take to be written.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed attempts from one address within [`FAILURE_WINDOW`] that make
/// the server refuse it.
pub const MAX_FAILURES: usize = 5;
/// The window in which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address is refused once it reached [`MAX_FAILURES`].
pub const BLOCK_DURATION: Duration = Duration::from_secs(60);
/// How often the server makes itself a new certificate (valid for a day).
pub const SERVER_CERT_REFRESH: Duration = Duration::from_secs(3600);
/// Addresses whose failures are remembered at once; past that the oldest
/// quiet one is forgotten.
const MAX_TRACKED: usize = 4096;

/// Why the enrollment server could not start.
#[derive(Debug, thiserror::Error)]
pub enum EnrollServerError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// The server's TLS configuration could not be made.
    #[error("cannot make the enrollment server's certificate: {0}")]
    Pki(#[from] PkiError),
}

/// A running enrollment server.
#[derive(Debug)]
pub struct EnrollServer {
    local_addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

/// What the server's tasks share.
#[derive(Debug)]
struct State {
    enroller: Enroller,
    tls: Mutex<ServerTls>,
    limiter: Mutex<RateLimiter>,
    /// Connections being served, per source key.
    active: Mutex<HashMap<IpAddr, usize>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// One served connection, counted against its source until dropped.
#[derive(Debug)]
struct ActiveSlot {
    state: Arc<State>,
    key: IpAddr,
}

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        let mut active = self
            .state
            .active
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = active.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                active.remove(&self.key);
            }
        }
    }
}

/// The acceptor with the server's current certificate, and its age.
struct ServerTls {
    acceptor: TlsAcceptor,
    made: Instant,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("made", &self.made)
            .finish_non_exhaustive()
    }
}

impl EnrollServer {
    /// Binds `listen` and starts serving with `enroller`. When this
    /// returns `Ok`, the listener accepts.
    ///
    /// Must be called inside a tokio runtime.
    pub async fn start(listen: SocketAddr, enroller: Enroller) -> Result<Self, EnrollServerError> {
        let acceptor = acceptor(&enroller)?;
        let bind_error = |source| EnrollServerError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let state = Arc::new(State {
            enroller,
            tls: Mutex::new(ServerTls {
                acceptor,
                made: Instant::now(),
            }),
            limiter: Mutex::new(RateLimiter::default()),
            active: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        let accept = state.tasks.spawn(accept_loop(listener, state.clone()));
        Ok(Self {
            local_addr,
            state,
            accept,
        })
    }

    /// The bound address (port 0 becomes real).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the accept loop still runs.
    pub fn is_running(&self) -> bool {
        !self.accept.is_finished()
    }

    /// Stops accepting, gives open connections up to `grace` to finish,
    /// then cancels them.
    pub async fn shutdown(self, grace: Duration) {
        let state = &self.state;
        state.tasks.close();
        // The accept loop ends at once; connections get their grace.
        self.accept.abort();
        if tokio::time::timeout(grace, state.tasks.wait())
            .await
            .is_err()
        {
            state.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), state.tasks.wait()).await;
        }
        state.stop.cancel();
        info!("enrollment server stopped");
    }
}

fn acceptor(enroller: &Enroller) -> Result<TlsAcceptor, PkiError> {
    let config = enrollment_server_config(enroller.authority(), SystemTime::now())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl State {
    /// Counts a connection from `ip`, unless its source is at
    /// [`MAX_CONNECTIONS_PER_SOURCE`].
    fn occupy(self: Arc<Self>, ip: IpAddr) -> Option<ActiveSlot> {
        let key = source_key(ip);
        {
            let mut active = self
                .active
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = active.entry(key).or_insert(0);
            if *count >= MAX_CONNECTIONS_PER_SOURCE {
                return None;
            }
            *count += 1;
        }
        Some(ActiveSlot { state: self, key })
    }

    /// The current acceptor, made again when it is older than
    /// [`SERVER_CERT_REFRESH`] (on failure the old one is kept and the
    /// failure logged: it is valid for a day).
    fn acceptor(&self) -> TlsAcceptor {
        let mut tls = self
            .tls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tls.made.elapsed() >= SERVER_CERT_REFRESH {
            match acceptor(&self.enroller) {
                Ok(fresh) => {
                    tls.acceptor = fresh;
                    tls.made = Instant::now();
                    debug!("enrollment server certificate renewed");
                }
                Err(error) => warn!(%error, "cannot renew the enrollment server certificate"),
            }
        }
        tls.acceptor.clone()
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.limiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a failure of `source`, and says so once when it tips the
    /// address into the refused state.
    fn record_failure(&self, source: SocketAddr) {
        if self.limiter().record_failure(source.ip(), Instant::now()) {
            warn!(
                %source,
                failures = MAX_FAILURES,
                window_seconds = FAILURE_WINDOW.as_secs(),
                refused_seconds = BLOCK_DURATION.as_secs(),
                "enrollment: too many failed attempts; refusing this address for a while"
            );
        }
    }
}

/// Accepts and spawns; nothing else.
async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let stop = state.stop.clone();
    crate::accept_each(
        "enrollment",
        listener,
        MAX_CONNECTIONS,
        stop,
        |permit, tcp, source| {
            // No source may hold more than a few slots, refused or not (a
            // refused one still gets its "rate_limited" answer, so a person at
            // the other end learns why).
            let Some(slot) = state.clone().occupy(source.ip()) else {
                debug!(%source, "enrollment: too many connections from this address; dropped");
                return;
            };
            let span = tracing::info_span!("enroll", %source);
            let task_state = state.clone();
            state.tasks.spawn(
                async move {
                    let _permit = permit;
                    let _slot = slot;
                    serve_one(task_state, tcp, source).await;
                }
                .instrument(span),
            );
        },
    )
    .await;
}

/// How one connection ended, short of a refusal or a certificate.
#[derive(Debug)]
enum ConnectionFailure {
    Handshake(io::Error),
    Io(io::Error),
    /// The handshake and request took longer than [`CONNECTION_TIMEOUT`],
    /// or the answer longer than [`WRITE_TIMEOUT`].
    Timeout,
    /// The server is stopping.
    Stopped,
}

impl std::fmt::Display for ConnectionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Handshake(error) => write!(f, "TLS handshake failed: {error}"),
            Self::Io(error) => write!(f, "connection failed: {error}"),
            Self::Timeout => f.write_str("timed out"),
            Self::Stopped => f.write_str("the server is stopping"),
        }
    }
}

/// One connection; logs its outcome and counts failures.
async fn serve_one(state: Arc<State>, tcp: TcpStream, source: SocketAddr) {
    match exchange(&state, tcp, source).await {
        Ok(Ok(granted)) => match &granted.token_id {
            Some(token_id) => info!(
                %source,
                node = %granted.node,
                token_id,
                certificate = %granted.fingerprint,
                "enrollment: issued a certificate"
            ),
            None => info!(
                %source,
                node = %granted.node,
                certificate = %granted.fingerprint,
                "renewal: issued a certificate for the node's new key"
            ),
        },
        Ok(Err(refusal)) => {
            if refusal.code.is_client_failure() {
                state.record_failure(source);
            }
            warn!(
                %source,
                code = %refusal.code,
                token_id = refusal.token_id.as_deref(),
                reason = %refusal.message,
                detail = refusal.log_detail.as_deref(),
                "enrollment: request refused"
            );
        }
        Err(ConnectionFailure::Stopped) => {
            debug!(%source, "enrollment: connection cut by shutdown")
        }
        Err(failure) => {
            state.record_failure(source);
            warn!(%source, error = %failure, "enrollment: connection failed");
        }
    }
}

/// The handshake and the request (under [`CONNECTION_TIMEOUT`], cut by
/// shutdown), the answer (not cut: once a token is being redeemed, the
/// certificate should reach the client), its delivery (under
/// [`WRITE_TIMEOUT`]).
async fn exchange(
    state: &Arc<State>,
    tcp: TcpStream,
    source: SocketAddr,
) -> Result<Result<Granted, Refusal>, ConnectionFailure> {
    let receive = async {
        let mut tls = state
            .acceptor()
            .accept(tcp)
            .await
            .map_err(ConnectionFailure::Handshake)?;
        let body = read_frame(&mut tls).await.map_err(ConnectionFailure::Io)?;
        Ok::<_, ConnectionFailure>((tls, body))
    };
    let (mut tls, body) = tokio::select! {
        received = tokio::time::timeout(CONNECTION_TIMEOUT, receive) => {
            received.map_err(|_| ConnectionFailure::Timeout)??
        }
        () = state.stop.cancelled() => return Err(ConnectionFailure::Stopped),
    };
    let blocked = state.limiter().blocked(source.ip(), Instant::now());
    let result = match (blocked, body) {
        (Some(remaining), _) => Err(Refusal::new(
            RefusalCode::RateLimited,
            format!(
                "too many failed attempts from this address; retry in {} s",
                remaining.as_secs().max(1)
            ),
        )),
        (None, Err(refusal)) => Err(refusal),
        (None, Ok(body)) => {
            let task_state = state.clone();
            let by = source.to_string();
            let (_, session) = tls.get_ref();
            let renewal = session.alpn_protocol() == Some(RENEW_ALPN);
            let client_chain = session.peer_certificates().map(<[_]>::to_vec);
            state
                .tasks
                .spawn_blocking(move || {
                    let enroller = &task_state.enroller;
                    if renewal {
                        enroller.renew(&body, client_chain.as_deref(), SystemTime::now())
                    } else {
                        enroller.handle(&body, &by, SystemTime::now())
                    }
                })
                .await
                .unwrap_or_else(|error| {
                    let mut refusal = Refusal::new(
                        RefusalCode::ServerError,
                        "the enrollment server cannot complete the request; its log says why",
                    );
                    refusal.log_detail = Some(format!("the request handler failed: {error}"));
                    Err(refusal)
                })
        }
    };
    let response = EnrollResponse::from(&result);
    let deliver = async {
        // An answer too big to encode would be a certificate over 64 KiB,
        // which issuance never makes; a refusal is a few short strings.
        let frame = encode_frame(&response).map_err(io::Error::other)?;
        tls.write_all(&frame).await?;
        tls.shutdown().await
    };
    let delivered = match tokio::time::timeout(WRITE_TIMEOUT, deliver).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ConnectionFailure::Io(error)),
        Err(_) => Err(ConnectionFailure::Timeout),
    };
    if let (Err(failure), Ok(granted)) = (&delivered, &result) {
        match &granted.token_id {
            Some(token_id) => warn!(
                %source,
                node = %granted.node,
                token_id,
                error = %failure,
                "enrollment: issued a certificate but could not deliver it; the token is used up"
            ),
            None => warn!(
                %source,
                node = %granted.node,
                error = %failure,
                "renewal: issued a certificate but could not deliver it; the node may ask again \
                 with the same certificate for a while"
            ),
        }
    }
    delivered.map(|()| result)
}

/// Reads one frame. An I/O failure is the outer error; a length out of
/// bounds is a refusal to send back (the body is not read).
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Result<Vec<u8>, Refusal>> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = match frame_len(prefix) {
        Ok(len) => len,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Ok(body))
}

// ------------------------------------------------------------------ client

/// Why `meshtun join` could not get an answer from the server.
#[derive(Debug, thiserror::Error)]
pub enum EnrollClientError {
    /// The server address did not resolve.
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        /// The address as given.
        server: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// No address of the server accepted a connection.
    #[error("cannot connect to {server}: {source}")]
    Connect {
        /// The address as given.
        server: String,
        /// The last connection error.
        source: io::Error,
    },
    /// The server does not hold the pinned CA. Nothing was sent.
    #[error("{0}")]
    CaMismatch(CaFingerprintMismatch),
    /// The TLS handshake failed for another reason (for example a clock far
    /// off, which makes the server's day-long certificate look invalid).
    #[error("TLS handshake with {server} failed: {source}")]
    Handshake {
        /// The address as given.
        server: String,
        /// What rustls said.
        source: io::Error,
    },
    /// The exchange broke off.
    #[error("enrollment exchange with {server} failed: {source}")]
    Io {
        /// The address as given.
        server: String,
        /// The error.
        source: io::Error,
    },
    /// The server answered something that is not an enrollment answer.
    #[error("{server} answered something that is not an enrollment answer: {detail}")]
    Response {
        /// The address as given.
        server: String,
        /// What is wrong.
        detail: String,
    },
    /// The whole exchange took too long.
    #[error("no answer from {server} within {after:?}")]
    Timeout {
        /// The address as given.
        server: String,
        /// The limit.
        after: Duration,
    },
    /// The client's TLS configuration could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// Sends one framed `request` to the enrollment server at `server`
/// (`host:port`) and returns its answer, all within `timeout`. The server is
/// accepted only if it holds the CA with fingerprint `pinned`; if it does
/// not, the handshake stops before anything of the request is sent.
pub async fn request_certificate(
    server: &str,
    pinned: &CaFingerprint,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    let config = Arc::new(enrollment_client_config(pinned)?);
    exchange_with(config, server, request, timeout).await
}

/// Like [`request_certificate`], for a renewal: presents `current` (the
/// node's certificate and key in force) in the handshake and sends the
/// framed renewal `request`.
pub async fn request_renewal(
    server: &str,
    pinned: &CaFingerprint,
    current: &NodeCredentials,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    let config = Arc::new(renewal_client_config(pinned, current)?);
    exchange_with(config, server, request, timeout).await
}

async fn exchange_with(
    config: Arc<rustls::ClientConfig>,
    server: &str,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    tokio::time::timeout(timeout, async {
        let tcp = connect(server).await?;
        let peer = tcp.peer_addr().map_err(|source| EnrollClientError::Io {
            server: server.to_owned(),
            source,
        })?;
        let mut tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
            .map_err(|source| match fingerprint_mismatch(&source) {
                Some(mismatch) => EnrollClientError::CaMismatch(mismatch),
                None => EnrollClientError::Handshake {
                    server: server.to_owned(),
                    source,
                },
            })?;
        let io_error = |source| EnrollClientError::Io {
            server: server.to_owned(),
            source,
        };
        tls.write_all(request).await.map_err(io_error)?;
        tls.flush().await.map_err(io_error)?;
        let body = match read_frame(&mut tls).await.map_err(io_error)? {
            Ok(body) => body,
            Err(refusal) => {
                return Err(EnrollClientError::Response {
                    server: server.to_owned(),
                    detail: refusal.message,
                })
            }
        };
        decode_response(&body).map_err(|error| EnrollClientError::Response {
            server: server.to_owned(),
            detail: error.to_string(),
        })
    })
    .await
    .unwrap_or_else(|_| {
        Err(EnrollClientError::Timeout {
            server: server.to_owned(),
            after: timeout,
        })
    })
}

/// Connects to the first address of `server` that answers.
async fn connect(server: &str) -> Result<TcpStream, EnrollClientError> {
    let addrs =
        tokio::net::lookup_host(server)
            .await
            .map_err(|source| EnrollClientError::Resolve {
                server: server.to_owned(),
                source,
            })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(error) => last = error,
        }
    }
    Err(EnrollClientError::Connect {
        server: server.to_owned(),
        source: last,
    })
}

/// The pinned-CA mismatch inside a failed handshake, if that is what it was.
fn fingerprint_mismatch(error: &io::Error) -> Option<CaFingerprintMismatch> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = tls else {
        return None;
    };
    other.0.downcast_ref::<CaFingerprintMismatch>().cloned()
}

// ------------------------------------------------------------------ rate limit

/// Failed attempts per source address, with a time passed in.
#[derive(Debug, Default)]
struct RateLimiter {
    sources: HashMap<IpAddr, Failures>,
}

#[derive(Debug)]
struct Failures {
    /// When the failures within the window happened, oldest first.
    recent: VecDeque<Instant>,
    /// Refused until then.
    blocked_until: Option<Instant>,
    last: Instant,
}

impl RateLimiter {
    /// How much longer `ip` is refused, if it is.
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let key = source_key(ip);
        let failures = self.sources.get_mut(&key)?;
        match failures.blocked_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                // The refusal is over: start counting afresh.
                self.sources.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Counts a failure of `ip` at `now`; true when this one makes the
    /// address refused.
    fn record_failure(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_TRACKED {
            self.forget_quiet(now);
        }
        let failures = self.sources.entry(key).or_insert_with(|| Failures {
            recent: VecDeque::new(),
            blocked_until: None,
            last: now,
        });
        failures.last = now;
        if failures.blocked_until.is_some_and(|until| until > now) {
            return false;
        }
        failures.blocked_until = None;
        while failures
            .recent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= FAILURE_WINDOW)
        {
            failures.recent.pop_front();
        }
        failures.recent.push_back(now);
        if failures.recent.len() >= MAX_FAILURES {
            failures.recent.clear();
            failures.blocked_until = Some(now + BLOCK_DURATION);
            return true;
        }
        false
    }

    /// Forgets addresses with nothing in force; if all are in force, the
    /// one quiet for longest.
    fn forget_quiet(&mut self, now: Instant) {
        self.sources.retain(|_, failures| {
            failures.blocked_until.is_some_and(|until| until > now)
                || failures
                    .recent
                    .back()
                    .is_some_and(|at| now.saturating_duration_since(*at) < FAILURE_WINDOW)
        });
        if self.sources.len() >= MAX_TRACKED {
            if let Some(oldest) = self
                .sources
                .iter()
                .min_by_key(|(_, failures)| failures.last)
                .map(|(key, _)| *key)
            {
                self.sources.remove(&oldest);
            }
        }
    }
}

/// The address failures are counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64, which one host typically holds whole.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP address")
    }

    #[test]
    fn five_failures_in_a_minute_refuse_the_address_for_a_minute() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        let source = ip("198.18.0.7");
        for index in 0..MAX_FAILURES - 1 {
            let at = start + Duration::from_secs(index as u64);
            assert!(!limiter.record_failure(source, at));
            assert_eq!(limiter.blocked(source, at), None);
        }
        let fifth = start + Duration::from_secs(10);
        assert!(limiter.record_failure(source, fifth), "the fifth blocks");
        assert_eq!(
            limiter.blocked(source, fifth + Duration::from_secs(1)),
            Some(BLOCK_DURATION - Duration::from_secs(1))
        );
        // Other addresses are not affected.
        assert_eq!(limiter.blocked(ip("198.18.0.8"), fifth), None);
        // Failures while refused neither extend nor re-announce it.
        assert!(!limiter.record_failure(source, fifth + Duration::from_secs(2)));
        assert_eq!(limiter.blocked(source, fifth + BLOCK_DURATION), None);
        // Counting starts afresh.
        assert!(!limiter.record_failure(source, fifth + BLOCK_DURATION));
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        let source = ip("198.18.0.7");
        for index in 0..20u64 {
            // One failure every 16 s: never 5 within 60 s.
            let at = start + Duration::from_secs(index * 16);
            assert!(!limiter.record_failure(source, at), "failure {index}");
        }
    }

    #[test]
    fn ipv6_is_counted_by_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:198.18.0.1")), ip("198.18.0.1"));
    }

    /// A CA in a fresh directory (removed on drop) and a token for `node`.
    struct CaDir(std::path::PathBuf);

    impl Drop for CaDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ca_dir(label: &str) -> (CaDir, meshtun_pki::Authority) {
        let path = std::env::temp_dir().join(format!(
            "meshtun-node-enroll-{label}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        let authority =
            meshtun_pki::Authority::generate("test", meshtun_pki::Validity::days_from_now(2))
                .expect("CA");
        authority.write(&path, false).expect("write CA");
        (CaDir(path), authority)
    }

    #[tokio::test]
    async fn a_join_over_the_network_and_a_wrong_pin() {
        use meshtun_enroll::{Grant, JoinKey, TokenStore};
        let (dir, authority) = ca_dir("join");
        let pinned = CaFingerprint::of_authority(&authority);
        let store = TokenStore::new(&dir.0);
        let node = meshtun_proto::NodeName::new("node-n").expect("name");
        let grant = Grant {
            node: node.clone(),
            ips: Vec::new(),
            dns: Vec::new(),
            valid_for: None,
        };
        let token = store
            .create(&grant, Duration::from_secs(60), SystemTime::now())
            .expect("token")
            .token;
        let server = EnrollServer::start(
            "127.0.0.1:0".parse().expect("addr"),
            Enroller::new(authority, store, Duration::from_secs(86_400)),
        )
        .await
        .expect("start");
        let addr = server.local_addr().to_string();
        let key = JoinKey::generate(&node).expect("key");
        let request = key.request(&token).expect("request");

        let wrong = CaFingerprint::of(b"another CA");
        match request_certificate(&addr, &wrong, &request, Duration::from_secs(10)).await {
            Err(EnrollClientError::CaMismatch(mismatch)) => {
                assert_eq!(mismatch.expected, wrong);
                assert_eq!(mismatch.presented, Some(pinned));
            }
            other => panic!("expected a CA mismatch, got {other:?}"),
        }

        let response = request_certificate(&addr, &pinned, &request, Duration::from_secs(10))
            .await
            .expect("answer");
        let enrolled = key
            .accept(response, &pinned, SystemTime::now())
            .expect("certificate");
        assert_eq!(enrolled.node(), &node);
        assert!(server.is_running());

        // The node renews with the certificate it got: a new key, the same node.
        let current = enrolled.credentials();
        let fresh = JoinKey::generate(&node).expect("key");
        let renewal = fresh.renewal_request().expect("request");
        let response = request_renewal(&addr, &pinned, current, &renewal, Duration::from_secs(10))
            .await
            .expect("answer");
        let renewed = fresh
            .accept(response, &pinned, SystemTime::now())
            .expect("renewed certificate");
        assert_eq!(renewed.node(), &node);
        assert_ne!(
            renewed.credentials().fingerprint(),
            current.fingerprint(),
            "a new certificate"
        );
        // Without a client certificate (the join ALPN and a renewal body),
        // the server refuses as a bad request: no token.
        let response = request_certificate(&addr, &pinned, &renewal, Duration::from_secs(10))
            .await
            .expect("answer");
        assert!(
            matches!(&response, meshtun_enroll::EnrollResponse::Refused { error, .. } if error == "bad_request"),
            "{response:?}"
        );

        // Nobody listening: a connect error, promptly.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").to_string()
        };
        assert!(matches!(
            request_certificate(&closed, &pinned, &request, Duration::from_secs(10)).await,
            Err(EnrollClientError::Connect { .. })
        ));
        server.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        for index in 0..(MAX_TRACKED as u32 + 100) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + index));
            limiter.record_failure(source, start);
        }
        assert!(limiter.sources.len() <= MAX_TRACKED);
    }
}
