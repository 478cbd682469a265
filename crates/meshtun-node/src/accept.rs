//! The one way this crate accepts TCP connections: stop when told, and on a
//! failed accept (typically EMFILE) log and pause instead of spinning. The
//! forward, overlay, admin and enrollment listeners all go through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long a listener pauses after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener` (`what` names it in the log), or
/// `None` once `stop` fires.
pub(crate) async fn next(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(error) => {
                warn!(listener = what, %error, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Like [`next`], serving at most `permits` connections at once: a slot is
/// taken before accepting, so excess clients wait in the kernel's queue
/// instead of costing a task each. The permit is released when dropped.
pub(crate) async fn next_bounded(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
    what: &str,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit.ok()?,
        () = stop.cancelled() => return None,
    };
    let (tcp, peer) = next(listener, stop, what).await?;
    Some((permit, tcp, peer))
}
