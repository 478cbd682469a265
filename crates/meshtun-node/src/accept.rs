//! The one way this crate accepts TCP connections: stop when told, and on a
//! failed accept pause instead of spinning. The forward, overlay and admin
//! listeners all go through here, and [`accept_each`] runs the same loop for
//! a listener outside any node (the enrollment server of `meshtun pki
//! serve`, in meshtun-enroll).
//!
//! The failure that matters is running out of file descriptors (`EMFILE`,
//! `ENFILE`): the kernel keeps the client queued, so every later accept
//! fails at once and a naive loop spins. Here the listener pauses, doubling
//! from [`FIRST_PAUSE`] to a maximum (`limits.accept_backoff_max` for the
//! forwarding listeners), and refuses the queued clients instead of leaving
//! them hanging. A client that arrives while descriptors stay short so
//! waits at most one pause. Failures are counted
//! (`meshtun_limit_hits_total{limit="open_files"}`) and logged at most once
//! per [`LOG_PERIOD`] per listener.
//!
//! Refusing needs no descriptor where the listener's port is fixed (the
//! forward and overlay listeners; see [`Refusal`]): the listen is stopped,
//! which resets every queued client, and started again on the same bound
//! socket. Where the port may be the OS's pick (the admin and enrollment
//! listeners, which may be bound to port 0), it falls back to a descriptor
//! held in reserve, given up to accept each queued client and reset it.
//! That fallback is only sound for a listener whose accepts run on one
//! thread: on a node with several shards, another shard's accept could take
//! the freed descriptor and leave this listener's queue unrefused, which is
//! why every forwarding listener refuses by restarting its listen instead.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::metrics::{Metrics, NodeLimit};
use crate::policy::InForce;
use crate::throttle::Throttle;

/// The accept queue of each TCP listener (tokio's default, too).
pub(crate) const LISTEN_BACKLOG: i32 = 1024;

/// The first pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause of listeners whose limit is not configurable.
const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(1);
/// The most queued clients one failed accept refuses.
const MAX_SHED: usize = 4096;
/// At most one warning per listener in this period.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// What a forwarding listener's accepts share with the node: where a
/// failed accept is counted, and the policy whose
/// `limits.accept_backoff_max` bounds the pause.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeLimits<'a> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) policy: &'a InForce,
}

/// How a listener refuses its queued clients when descriptors run out.
#[derive(Debug)]
enum Refusal {
    /// Stop listening, which resets every queued client, and listen again
    /// on the same socket. Needs no descriptor, so it works however many
    /// threads are accepting, but only for a port bound explicitly: Linux
    /// keeps such a port through the stop, while a port the OS picked would
    /// be given up and the listen would restart on another.
    Relisten,
    /// A descriptor held back to refuse clients when none are left.
    Reserve(Option<std::fs::File>),
}

/// One listener, and its memory of its failed accepts.
#[derive(Debug)]
pub(crate) struct Accepting {
    what: String,
    /// `None` once restarting the listen failed; the loop then ends.
    listener: Option<TcpListener>,
    pause: Duration,
    refusal: Refusal,
    /// Warnings at most once per [`LOG_PERIOD`]; the rest go to debug.
    log_throttle: Throttle<()>,
}

impl Accepting {
    /// Accepts on `listener`, whose port may have been picked by the OS;
    /// `what` names it in logs. Refuses with a reserve descriptor, so its
    /// accepts must all run on one thread.
    pub(crate) fn new(what: impl Into<String>, listener: TcpListener) -> Self {
        Self::with(what.into(), listener, Refusal::Reserve(open_reserve()))
    }

    /// Accepts on `listener`, which was bound to a port given explicitly
    /// (never 0). Refuses by restarting the listen (see [`Refusal`]).
    pub(crate) fn fixed_port(what: impl Into<String>, listener: TcpListener) -> Self {
        Self::with(what.into(), listener, Refusal::Relisten)
    }

    fn with(what: String, listener: TcpListener, refusal: Refusal) -> Self {
        Self {
            what,
            listener: Some(listener),
            pause: FIRST_PAUSE,
            refusal,
            log_throttle: Throttle::new(LOG_PERIOD),
        }
    }

    /// The next connection, or `None` once `stop` fires (or the listener
    /// is lost, which is logged). `node`, if given (the forwarding
    /// listeners), counts failed accepts and sets the longest pause
    /// (`limits.accept_backoff_max`, read when an accept fails, so a reload
    /// applies to the next failure).
    pub(crate) async fn next(
        &mut self,
        stop: &CancellationToken,
        node: Option<NodeLimits<'_>>,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let listener = self.listener.as_ref()?;
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            let error = match accepted {
                Ok(accepted) => {
                    self.pause = FIRST_PAUSE;
                    // A reserve lost to a shortage is taken back as soon as
                    // descriptors are free again.
                    if let Refusal::Reserve(reserve @ None) = &mut self.refusal {
                        *reserve = open_reserve();
                    }
                    return Some(accepted);
                }
                Err(error) => error,
            };
            let out_of_files = is_out_of_files(&error);
            let refused = if out_of_files {
                if let Some(node) = node {
                    node.metrics.limit_hit(NodeLimit::OpenFiles);
                }
                self.refuse_queued().await
            } else {
                Refused::None
            };
            self.log(&error, out_of_files, refused);
            tokio::select! {
                () = tokio::time::sleep(self.pause) => {}
                () = stop.cancelled() => return None,
            }
            let max_pause = node.map_or(DEFAULT_MAX_PAUSE, |node| {
                node.policy.get().limits.accept_backoff_max
            });
            self.pause = (self.pause * 2).min(max_pause);
        }
    }

    /// Refuses the clients queued now, as [`Refusal`] says.
    async fn refuse_queued(&mut self) -> Refused {
        match &mut self.refusal {
            Refusal::Relisten => {
                let Some(listener) = self.listener.take() else {
                    return Refused::None;
                };
                match relisten(listener) {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        Refused::AllQueued
                    }
                    Err(error) => {
                        error!(
                            listener = %self.what,
                            %error,
                            "cannot restart listening after refusing queued clients; this listener is closed"
                        );
                        Refused::None
                    }
                }
            }
            Refusal::Reserve(reserve) => {
                if reserve.is_none() {
                    *reserve = open_reserve();
                }
                let Some(listener) = &self.listener else {
                    return Refused::None;
                };
                Refused::Counted(shed(listener, reserve).await)
            }
        }
    }

    fn log(&self, error: &io::Error, out_of_files: bool, refused: Refused) {
        let Some(quiet) = self.log_throttle.admit(()) else {
            debug!(listener = %self.what, %error, %refused, "accept failed");
            return;
        };
        if out_of_files {
            warn!(
                listener = %self.what,
                %error,
                %refused,
                similar_since_last_report = quiet,
                "out of file descriptors: resetting queued clients and pausing accepts (raise LimitNOFILE / ulimit -n)"
            );
        } else {
            warn!(listener = %self.what, %error, similar_since_last_report = quiet, "accept failed; pausing");
        }
    }
}

/// What one refusal did, for the log.
#[derive(Debug, Clone, Copy)]
enum Refused {
    None,
    /// Every client queued at the time (restarting the listen does not count them).
    AllQueued,
    Counted(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => formatter.write_str("none"),
            Self::AllQueued => formatter.write_str("all queued"),
            Self::Counted(count) => write!(formatter, "{count}"),
        }
    }
}

/// Stops and restarts the listen on `listener`'s socket: the kernel resets
/// every client in its accept queue as the listen stops (in a
/// `SO_REUSEPORT` group, only this member's queue; new clients go to the
/// other members meanwhile), and the socket keeps its explicitly bound
/// port. The socket leaves tokio's reactor first and joins it afresh, so
/// a hang-up the kernel may report while the listen is stopped cannot
/// linger: tokio keeps "closed" as a final readiness state, and an accept
/// on a listener marked closed would be woken again and again.
fn relisten(listener: TcpListener) -> io::Result<TcpListener> {
    let socket = socket2::Socket::from(listener.into_std()?);
    let before = socket.local_addr()?.as_socket();
    socket.shutdown(Shutdown::Read)?;
    socket.listen(LISTEN_BACKLOG)?;
    let after = socket.local_addr()?.as_socket();
    if before != after {
        return Err(io::Error::other(format!(
            "the listener moved from {before:?} to {after:?}; was its port 0?"
        )));
    }
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Refuses the clients queued on `listener` (at most [`MAX_SHED`]) with
/// the reserve descriptor: each is accepted into the one descriptor the
/// reserve frees and reset at once, which frees it again for the next.
/// Returns how many were refused.
async fn shed(listener: &TcpListener, reserve: &mut Option<std::fs::File>) -> usize {
    // Closing the reserve frees one descriptor for the accepts below.
    if reserve.take().is_none() {
        return 0;
    }
    let mut refused = 0;
    while refused < MAX_SHED {
        // Only what is queued now: a zero timeout polls the accept once.
        match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
            Ok(Ok((tcp, _))) => {
                // Reset, not FIN: the client must not read a clean end.
                crate::splice::reset_on_close(&tcp);
                drop(tcp);
                refused += 1;
            }
            _ => break,
        }
    }
    *reserve = open_reserve();
    refused
}

/// Like [`Accepting::next`], serving at most `permits` connections at once:
/// a slot is taken before accepting, so excess clients wait in the kernel's
/// queue instead of costing a task each. The permit is released when dropped.
pub(crate) async fn next_bounded(
    accepting: &mut Accepting,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    let (tcp, peer) = accepting.next(stop, None).await?;
    Some((permit, tcp, peer))
}

/// Accepts on `listener` until `stop` fires and hands each connection to
/// `serve` with its source address and a permit: at most `max_connections`
/// permits are out at once, and a dropped permit frees its slot, so excess
/// clients wait in the kernel's queue. `what` names the listener in logs.
///
/// For a server that runs outside any [`Node`](crate::Node): a failed
/// accept pauses (5 ms, doubling up to one second) instead of spinning, and
/// when file descriptors run out the queued clients are reset from a
/// descriptor kept in reserve, which works for a listener bound to port 0.
/// All its accepts run on the task that awaits this; `serve` should only
/// spawn, as the next accept waits for it to return.
pub async fn accept_each(
    what: &'static str,
    listener: TcpListener,
    max_connections: usize,
    stop: CancellationToken,
    mut serve: impl FnMut(OwnedSemaphorePermit, TcpStream, SocketAddr),
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut accepting = Accepting::new(what, listener);
    while let Some((permit, tcp, source)) = next_bounded(&mut accepting, &permits, &stop).await {
        serve(permit, tcp, source);
    }
}

fn is_out_of_files(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE)
    )
}

fn open_reserve() -> Option<std::fs::File> {
    // Failing to hold a reserve only means queued clients wait instead of
    // being reset while descriptors are short.
    std::fs::File::open("/dev/null").ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Read;

    use super::*;

    /// A listener bound the way the forward listeners are: to a port given
    /// explicitly (found free with a throwaway bind first).
    fn fixed_port_listener() -> TcpListener {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(LISTEN_BACKLOG).unwrap();
        socket.set_nonblocking(true).unwrap();
        TcpListener::from_std(socket.into()).unwrap()
    }

    #[tokio::test]
    async fn restarting_the_listen_resets_queued_clients_keeps_the_port_and_accepts_again() {
        let listener = fixed_port_listener();
        let addr = listener.local_addr().unwrap();
        // Queued, never accepted: the kernel completes their handshakes.
        let mut queued: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();

        let listener = relisten(listener).unwrap();

        assert_eq!(listener.local_addr().unwrap(), addr, "the port moved");
        for client in &mut queued {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let error = client
                .read(&mut [0u8; 8])
                .expect_err("a queued client must be refused, not left open");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        }
        // The same listener, registered afresh, serves the next client.
        let next = TcpStream::connect(addr).await.unwrap();
        let (accepted, from) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("accept after the restart")
            .unwrap();
        assert_eq!(from, next.local_addr().unwrap());
        drop(accepted);
        // And with nothing queued, an accept waits rather than failing.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), listener.accept())
                .await
                .is_err(),
            "accept returned with no client queued"
        );
    }

    #[tokio::test]
    async fn a_listener_on_a_port_the_os_picked_is_not_restarted_elsewhere() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = relisten(listener).expect_err("port 0 cannot keep its port");
        assert!(error.to_string().contains("moved"), "{error}");
    }
}
