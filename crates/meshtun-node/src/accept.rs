//! The one way this crate accepts TCP connections: stop when told, and on a
//! failed accept pause instead of spinning. The forward, overlay, admin and
//! enrollment listeners all go through here.
//!
//! The failure that matters is running out of file descriptors (`EMFILE`,
//! `ENFILE`): the kernel keeps the client queued, so every later accept
//! fails at once and a naive loop spins. Here the listener pauses, doubling
//! from [`FIRST_PAUSE`] to a maximum (`limits.accept_backoff_max` for the
//! forwarding listeners), and refuses the queued clients instead of leaving
//! them hanging: it keeps one descriptor in reserve, gives it up to accept
//! each queued client and reset it, and takes the reserve back. A client
//! that arrives while descriptors stay short so waits at most one pause. Failures are counted
//! (`meshtun_limit_hits_total{limit="open_files"}`) and logged at most once
//! per [`LOG_PERIOD`] per listener.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Throttle;
use crate::Shared;

/// The first pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause of listeners whose limit is not configurable.
pub(crate) const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(1);
/// The most queued clients one failed accept refuses.
const MAX_SHED: usize = 4096;
/// At most one warning per listener in this period.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// One listener's memory of its failed accepts.
#[derive(Debug)]
pub(crate) struct Accepting {
    what: String,
    /// The longest pause of a listener with no node to ask.
    max_pause: Duration,
    pause: Duration,
    /// A descriptor held back to refuse clients when none are left.
    reserve: Option<std::fs::File>,
    /// Warnings at most once per [`LOG_PERIOD`]; the rest go to debug.
    log_throttle: Throttle<()>,
}

impl Accepting {
    /// `what` names the listener in logs.
    pub(crate) fn new(what: impl Into<String>, max_pause: Duration) -> Self {
        Self {
            what: what.into(),
            max_pause,
            pause: FIRST_PAUSE,
            reserve: open_reserve(),
            log_throttle: Throttle::new(LOG_PERIOD),
        }
    }

    /// The next connection on `listener`, or `None` once `stop` fires.
    /// `node`, if given (the forwarding listeners), counts failed accepts
    /// and sets the longest pause (`limits.accept_backoff_max`, read when
    /// an accept fails, so a reload applies to the next failure).
    pub(crate) async fn next(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
        node: Option<&Shared>,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            let error = match accepted {
                Ok(accepted) => {
                    self.pause = FIRST_PAUSE;
                    // A reserve lost to a shortage is taken back as soon as
                    // descriptors are free again.
                    if self.reserve.is_none() {
                        self.reserve = open_reserve();
                    }
                    return Some(accepted);
                }
                Err(error) => error,
            };
            let out_of_files = is_out_of_files(&error);
            if out_of_files {
                if let Some(node) = node {
                    node.metrics.limit_hit("open_files");
                }
                if self.reserve.is_none() {
                    self.reserve = open_reserve();
                }
            }
            let shed = if out_of_files {
                self.shed(listener).await
            } else {
                0
            };
            self.log(&error, out_of_files, shed);
            tokio::select! {
                () = tokio::time::sleep(self.pause) => {}
                () = stop.cancelled() => return None,
            }
            let max_pause = node.map_or(self.max_pause, |node| {
                node.policy().limits.accept_backoff_max
            });
            self.pause = (self.pause * 2).min(max_pause);
        }
    }

    /// Refuses the clients queued on `listener` (at most [`MAX_SHED`]) with
    /// the reserve descriptor: each is accepted into the one descriptor the
    /// reserve frees and reset at once, which frees it again for the next.
    /// Returns how many were refused.
    async fn shed(&mut self, listener: &TcpListener) -> usize {
        // Closing the reserve frees one descriptor for the accepts below.
        if self.reserve.take().is_none() {
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
        self.reserve = open_reserve();
        refused
    }

    fn log(&self, error: &io::Error, out_of_files: bool, shed: usize) {
        let Some(quiet) = self.log_throttle.admit(()) else {
            debug!(listener = %self.what, %error, refused = shed, "accept failed");
            return;
        };
        if out_of_files {
            warn!(
                listener = %self.what,
                %error,
                refused = shed,
                similar_since_last_report = quiet,
                "out of file descriptors: resetting queued clients and pausing accepts (raise LimitNOFILE / ulimit -n)"
            );
        } else {
            warn!(listener = %self.what, %error, similar_since_last_report = quiet, "accept failed; pausing");
        }
    }
}

/// Like [`Accepting::next`], serving at most `permits` connections at once:
/// a slot is taken before accepting, so excess clients wait in the kernel's
/// queue instead of costing a task each. The permit is released when dropped.
pub(crate) async fn next_bounded(
    accepting: &mut Accepting,
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    let (tcp, peer) = accepting.next(listener, stop, None).await?;
    Some((permit, tcp, peer))
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
