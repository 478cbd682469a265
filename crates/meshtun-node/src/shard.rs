//! Shards: the per-core data plane.
//!
//! A shard is one OS thread running one single-threaded tokio runtime. It
//! owns its UDP sockets and QUIC endpoints, its QUIC connections to every
//! peer (dialled and accepted), and the TCP sockets of every stream those
//! connections carry. A forwarded stream therefore lives on one thread from
//! its first byte to its last: quinn's endpoint driver, its connection
//! driver and the splice task that moves the stream's bytes wake each other
//! without crossing cores, and no work-stealing scheduler moves them apart.
//!
//! Each shard also has its own listener for every `[[forward]]` and for the
//! overlay's transparent listener: one `SO_REUSEPORT` group per address,
//! over which the kernel spreads new local connections, so each is accepted
//! on the thread that carries it. What is not per shard stays on the
//! runtime that started the node: the admin endpoint and reloads.
//!
//! With one shard the node has one UDP socket, bound to `quic.listen`, that
//! both accepts and dials, as a node without shards would. With more, each
//! shard has two:
//! - a socket bound to `quic.listen` in one `SO_REUSEPORT` group, on which
//!   it accepts: the kernel spreads incoming connections over the group by
//!   their address pair, and keeps every packet of one address pair on the
//!   socket that got the first;
//! - a socket of its own on an ephemeral port of the same address, from
//!   which it dials. Dialling from `quic.listen` would not work: every shard
//!   would dial from the same address pair, and the peer's replies would be
//!   spread over the group by the kernel, not by connection.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::NodeError;

/// One shard as the node's tasks see it: where to spawn, and its counters.
#[derive(Debug)]
pub(crate) struct Shard {
    /// Its place among the node's shards, from 0.
    pub(crate) index: usize,
    /// Its runtime; tasks spawned here run on its thread.
    pub(crate) handle: Handle,
    /// The local address its dialled connections leave from.
    pub(crate) dial_addr: SocketAddr,
    /// Streams it carries now and has carried.
    pub(crate) streams: ShardStreams,
    /// When its heartbeat task last ran, in milliseconds since the node
    /// started (see [`Shard::heartbeat`]).
    pub(crate) beat: AtomicU64,
}

/// How often a shard's heartbeat task runs.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// A shard whose heartbeat is older than this counts as wedged.
const STALLED_AFTER: Duration = Duration::from_secs(5);

/// How long a stopping shard waits for its blocking tasks (a name lookup
/// under way) before its thread ends anyway.
const STOP_WAIT: Duration = Duration::from_secs(1);

impl Shard {
    /// Runs on the shard until `closing` fires, recording each turn in
    /// `beat`: a shard whose thread is stuck (a task that never yields, a
    /// blocking call) stops beating, and [`Shard::stalled`] says so.
    pub(crate) async fn heartbeat(
        &self,
        started: Instant,
        closing: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.beat.store(now, Ordering::Relaxed);
            tokio::select! {
                () = tokio::time::sleep(HEARTBEAT) => {}
                () = closing.cancelled() => return,
            }
        }
    }

    /// How long the shard has not run its heartbeat, if longer than
    /// [`STALLED_AFTER`].
    pub(crate) fn stalled(&self, started: Instant) -> Option<Duration> {
        let now = started.elapsed();
        let beat = Duration::from_millis(self.beat.load(Ordering::Relaxed));
        let silent = now.saturating_sub(beat);
        (silent > STALLED_AFTER).then_some(silent)
    }
}

/// Stream counts of one shard, for `/status`.
#[derive(Debug, Default)]
pub(crate) struct ShardStreams {
    open: AtomicI64,
    total: AtomicU64,
}

impl ShardStreams {
    /// Counts a stream as open on this shard until the guard drops.
    pub(crate) fn opened(&self) -> ShardStream<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ShardStream { streams: self }
    }

    /// (open now, carried since start).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let open = self.open.load(Ordering::Relaxed).max(0) as u64;
        (open, self.total.load(Ordering::Relaxed))
    }
}

/// A stream counted as open on its shard; un-counted when dropped.
#[derive(Debug)]
pub(crate) struct ShardStream<'a> {
    streams: &'a ShardStreams,
}

impl Drop for ShardStream<'_> {
    fn drop(&mut self) {
        self.streams.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shard threads. Dropping this stops them: each runtime ends, and with
/// it every task and socket of its shard.
#[derive(Debug)]
pub(crate) struct Threads {
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    /// Starts `count` shard threads, each with an idle runtime; returns them
    /// with a handle to each runtime, in shard order.
    pub(crate) fn start(count: NonZeroUsize) -> Result<(Threads, Vec<Handle>), NodeError> {
        let stop = CancellationToken::new();
        let threads = Threads {
            stop: stop.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let mut handles = Vec::new();
        for index in 0..count.get() {
            let failed = |source: std::io::Error| NodeError::Shard { index, source };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(failed)?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("meshtun-shard-{index}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled());
                    runtime.shutdown_timeout(STOP_WAIT);
                })
                .map_err(failed)?;
            threads
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(thread);
        }
        Ok((threads, handles))
    }

    /// Stops every shard and waits (on a blocking thread, at most a little
    /// longer than a shard waits for its own blocking tasks) until they
    /// ended.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                // A shard that panicked has ended too; its panic was logged.
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(STOP_WAIT * 2, joined).await;
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The CPUs this process may run on (1 if that cannot be told).
pub(crate) fn available_cpus() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_counts_follow_their_guards() {
        let streams = ShardStreams::default();
        let first = streams.opened();
        let second = streams.opened();
        assert_eq!(streams.counts(), (2, 2));
        drop(first);
        assert_eq!(streams.counts(), (1, 2));
        drop(second);
        assert_eq!(streams.counts(), (0, 2));
    }

    #[test]
    fn a_shard_whose_heartbeat_is_old_counts_as_stalled() {
        let count = NonZeroUsize::new(1).expect("not 0");
        let (threads, handles) = Threads::start(count).expect("threads start");
        let shard = Shard {
            index: 0,
            handle: handles[0].clone(),
            dial_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            streams: ShardStreams::default(),
            beat: AtomicU64::new(0),
        };
        let Some(started) = Instant::now().checked_sub(Duration::from_secs(10)) else {
            return; // a clock too young to look 10 s back
        };
        // Never beat since a start 10 s ago: stalled for about 10 s.
        let silent = shard.stalled(started).expect("stalled");
        assert!(silent >= Duration::from_secs(10), "{silent:?}");
        // One turn of the heartbeat task on the shard clears it.
        let shard = std::sync::Arc::new(shard);
        let closing = tokio_util::sync::CancellationToken::new();
        let beating = {
            let shard = shard.clone();
            let closing = closing.clone();
            handles[0].spawn(async move { shard.heartbeat(started, closing).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while shard.stalled(started).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(shard.stalled(started), None);
        closing.cancel();
        drop(beating);
        drop(threads);
    }

    #[test]
    fn each_shard_runs_its_tasks_on_its_own_thread() {
        let count = NonZeroUsize::new(2).expect("not 0");
        let (threads, handles) = Threads::start(count).expect("threads start");
        let names: Vec<String> = handles
            .iter()
            .map(|handle| {
                let (sender, receiver) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = sender.send(name.unwrap_or_default());
                });
                receiver
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the shard ran the task")
            })
            .collect();
        assert_eq!(names, ["meshtun-shard-0", "meshtun-shard-1"]);
        drop(threads);
    }
}
