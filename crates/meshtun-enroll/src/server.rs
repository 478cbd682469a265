//! The enrollment server behind `meshtun pki serve`: TLS 1.3 over TCP with
//! a certificate it signs for itself with the CA (made again every
//! [`SERVER_CERT_REFRESH`]). The caller's accept loop only accepts and
//! hands over ([`EnrollServer::admit`]); each connection runs in its own
//! task, owned by a [`TaskTracker`], with [`CONNECTION_TIMEOUT`] for the
//! handshake and the request and [`WRITE_TIMEOUT`] for the answer, at most
//! [`MAX_CONNECTIONS`] at once. The blocking part (token file lock, CA
//! signature) runs on a blocking thread of the same tracker.
//!
//! Every failed attempt (a refused token, a wrong name, a malformed request,
//! a failed TLS handshake, a timeout) is logged at warn with the source
//! address (never the token secret; the token's public id when there is
//! one) and counts against the source ([`crate::limiter`]): too many make
//! the server answer `rate_limited` to that address for a while, valid
//! tokens included.
//!
//! The same server answers renewals: a node connects with ALPN
//! `meshtun-renew/1`, presents its current certificate (verified against the
//! CA in the handshake) and sends a CSR for a fresh key; the client side is
//! [`request_renewal`](crate::request_renewal).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshtun_pki::PkiError;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::enroller::{Enroller, Granted};
use crate::error::{Refusal, RefusalCode};
use crate::limiter::{source_key, RateLimiter, BLOCK_DURATION, FAILURE_WINDOW, MAX_FAILURES};
use crate::pin::{enrollment_server_config, RENEW_ALPN};
use crate::wire::{encode_frame, read_frame, EnrollResponse};

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served at once for one source (an address, or a /64 for
/// IPv6), so one host cannot hold every slot.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 4;
/// How long a client may take for the TLS handshake and its request.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the answer may take to be written.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the server makes itself a new certificate (valid for a day).
pub(crate) const SERVER_CERT_REFRESH: Duration = Duration::from_secs(3600);

/// A running enrollment server: serves each connection handed to it
/// ([`EnrollServer::admit`]) in a task of its own. The listener and its
/// accept loop are the caller's (`meshtun pki serve` runs
/// `meshtun_node::accept_each` with [`MAX_CONNECTIONS`]). A clone is
/// another handle on the same server.
#[derive(Debug, Clone)]
pub struct EnrollServer {
    state: Arc<State>,
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
    /// A server answering with `enroller`, with a certificate made for it
    /// now (the error says why that certificate could not be made). Must be
    /// called inside a tokio runtime.
    pub fn new(enroller: Enroller) -> Result<Self, PkiError> {
        let acceptor = acceptor(&enroller)?;
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
        Ok(Self { state })
    }

    /// Serves `tcp`, accepted from `source`, in a task of its own that holds
    /// `permit` (the accept loop's slot) until it ends; only spawns. A
    /// source that already holds [`MAX_CONNECTIONS_PER_SOURCE`] connections
    /// is dropped instead.
    pub fn admit(&self, permit: OwnedSemaphorePermit, tcp: TcpStream, source: SocketAddr) {
        let state = &self.state;
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
    }

    /// Gives open connections up to `grace` to finish, then cancels them.
    /// Stop the accept loop that admits connections first.
    pub async fn shutdown(self, grace: Duration) {
        let state = &self.state;
        state.tasks.close();
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
                    Err(Refusal::server_error(format_args!(
                        "the request handler failed: {error}"
                    )))
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
