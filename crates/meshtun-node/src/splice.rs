//! Moving bytes between one local TCP connection and one QUIC stream.
//!
//! Each direction is its own small state machine, in the manner of tokio's
//! `copy_bidirectional`: TCP end of file becomes a stream FIN, a stream FIN
//! becomes a TCP FIN (half-close works both ways), and any failure on either
//! side becomes a reset on both (see [`abort`]). The copies avoid moving bytes
//! more than the kernel makes us: TCP reads land in a `BytesMut` that is frozen
//! and handed to quinn without a copy, and stream chunks are written to the
//! socket with one vectored write.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use meshtun_proto::{Status, StatusCode, StreamCode, MAX_STATUS_LEN};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::metrics::{NodeLimit, PeerStats};

/// Size of one TCP read. 64 KiB matches the largest GSO batch quinn sends and
/// keeps the number of reads per gigabyte low.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much spare capacity the read buffer is replaced rather than
/// read into, so a read is never starved to a few bytes.
const MIN_SPARE: usize = 8 * 1024;
/// How many stream chunks one vectored socket write may carry.
const MAX_CHUNKS: usize = 32;
/// Once this much is pending in the read buffer it goes to quinn without a
/// copy; less is sent only when the socket is drained, copied into a chunk
/// of its own size (see `tcp_to_stream`).
const ZERO_COPY_MIN: usize = 16 * 1024;

/// The node's budget of TCP read buffers (`limits.buffer_memory`).
///
/// A stream holds a [`READ_CHUNK`] buffer only while its client is sending:
/// it takes one when the socket becomes readable and gives it back as soon
/// as a read finds the socket empty, so idle connections, however many,
/// hold none. When the budget is spent, a stream that needs a buffer waits
/// for one: that is back-pressure on its client, as a full QUIC window
/// would be, and never a loss. Bytes already handed to quinn are bounded
/// by the QUIC windows (`quic.send_window` per connection), not by this.
pub(crate) struct Buffers {
    permits: Semaphore,
    /// Bytes held now, exported as `meshtun_stream_buffer_bytes`.
    held: prometheus_client::metrics::gauge::Gauge,
    /// Set while streams wait, so a wait is counted once per episode.
    exhausted: AtomicBool,
}

impl std::fmt::Debug for Buffers {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Buffers")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Buffers {
    /// A budget of `bytes`, at least one buffer.
    pub(crate) fn new(bytes: u64, held: prometheus_client::metrics::gauge::Gauge) -> Self {
        let count = usize::try_from(bytes / READ_CHUNK as u64)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Semaphore::new(count),
            held,
            exhausted: AtomicBool::new(false),
        }
    }

    /// One buffer's worth of the budget, waiting if it is spent; `on_wait`
    /// runs once per exhaustion episode, for the counter and the log.
    async fn take(&self, on_wait: impl FnOnce()) -> Result<Held<'_>, Failure> {
        let permit = match self.permits.try_acquire() {
            Ok(permit) => {
                // A waiter that was cancelled may have left the flag set.
                if self.exhausted.load(Ordering::Relaxed) {
                    self.exhausted.store(false, Ordering::Relaxed);
                }
                permit
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if !self.exhausted.swap(true, Ordering::Relaxed) {
                    on_wait();
                }
                let permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| Failure::Shutdown)?;
                self.exhausted.store(false, Ordering::Relaxed);
                permit
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Failure::Shutdown),
        };
        self.held.inc_by(READ_CHUNK as i64);
        Ok(Held {
            buffer: BytesMut::with_capacity(READ_CHUNK),
            _permit: permit,
            held: &self.held,
        })
    }
}

/// A read buffer taken from [`Buffers`]; returns its share when dropped.
struct Held<'a> {
    buffer: BytesMut,
    _permit: SemaphorePermit<'a>,
    held: &'a prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.held.dec_by(READ_CHUNK as i64);
    }
}

/// What every spliced stream shares with the node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    /// Fires when the drain period is over: the stream is reset.
    pub(crate) cancel: &'a CancellationToken,
    /// The read buffer budget.
    pub(crate) buffers: &'a Buffers,
    /// Counts and logs an exhausted buffer budget.
    pub(crate) metrics: &'a crate::metrics::Metrics,
}

/// Why a spliced connection did not end cleanly. Every variant leads to a
/// reset on both sides: a failure must never look like a clean end of file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error("local TCP read failed: {0}")]
    TcpRead(io::Error),
    #[error("local TCP write failed: {0}")]
    TcpWrite(io::Error),
    #[error("peer reset the stream (code {})", code_name(*.0))]
    StreamReset(VarInt),
    #[error("peer stopped reading the stream (code {})", code_name(*.0))]
    StreamStopped(VarInt),
    #[error("QUIC connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    #[error("stream closed unexpectedly")]
    StreamClosed,
    #[error("stream ended before the peer's status arrived")]
    NoStatus,
    #[error("peer sent a malformed status: {0}")]
    BadStatus(meshtun_proto::StatusError),
    #[error("peer refused the stream: {} ({:?})", .0.code.as_str(), .0.detail)]
    Refused(Status),
    #[error("node is shutting down")]
    Shutdown,
}

impl Failure {
    /// The per-peer stream limit of the acceptor that reset this stream, if
    /// that is what ended it (the acceptor sends no status then).
    pub(crate) fn limit(&self) -> Option<StreamCode> {
        let (Failure::StreamReset(code) | Failure::StreamStopped(code)) = self else {
            return None;
        };
        StreamCode::from_u64(code.into_inner())
            .filter(|code| matches!(code, StreamCode::StreamLimit | StreamCode::PendingLimit))
    }

    /// The QUIC code to reset the stream with when this failure ends it.
    pub(crate) fn stream_code(&self) -> StreamCode {
        match self {
            Failure::TcpRead(_) | Failure::TcpWrite(_) => StreamCode::TcpReset,
            Failure::Refused(_) => StreamCode::Refused,
            Failure::BadStatus(_) | Failure::NoStatus => StreamCode::BadPreamble,
            Failure::Shutdown => StreamCode::Shutdown,
            // The peer already tore the stream down; the code is informational.
            Failure::StreamReset(_)
            | Failure::StreamStopped(_)
            | Failure::ConnectionLost(_)
            | Failure::StreamClosed => StreamCode::TcpReset,
        }
    }
}

/// A stream code with its name, if it is one of ours: `7 (pending_limit)`.
fn code_name(code: VarInt) -> String {
    match StreamCode::from_u64(code.into_inner()) {
        Some(known) => format!("{code} ({})", known.as_str()),
        None => code.to_string(),
    }
}

impl From<ReadError> for Failure {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Reset(code) => Failure::StreamReset(code),
            ReadError::ConnectionLost(error) => Failure::ConnectionLost(error),
            ReadError::ClosedStream
            | ReadError::IllegalOrderedRead
            | ReadError::ZeroRttRejected => Failure::StreamClosed,
        }
    }
}

impl From<WriteError> for Failure {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Stopped(code) => Failure::StreamStopped(code),
            WriteError::ConnectionLost(error) => Failure::ConnectionLost(error),
            WriteError::ClosedStream | WriteError::ZeroRttRejected => Failure::StreamClosed,
        }
    }
}

/// Bytes moved by a spliced connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// From the local TCP socket into the stream.
    pub(crate) sent: u64,
    /// From the stream to the local TCP socket.
    pub(crate) received: u64,
}

/// Counts one direction's bytes for its stream and for the peer's metric.
/// Bytes are counted as they move (read from the local socket, or read off
/// the stream), so `/metrics` moves while a long-lived connection is busy.
struct Moved<'a> {
    total: &'a mut u64,
    metric: &'a prometheus_client::metrics::counter::Counter,
}

impl<'a> Moved<'a> {
    fn new(total: &'a mut u64, metric: &'a prometheus_client::metrics::counter::Counter) -> Self {
        Self { total, metric }
    }

    fn add(&mut self, bytes: usize) {
        let bytes = bytes as u64;
        *self.total += bytes;
        self.metric.inc_by(bytes);
    }
}

/// What the stream→TCP direction must do before it copies.
#[derive(Debug)]
pub(crate) enum FromPeer {
    /// Write these bytes (already read off the stream) first.
    Ready(Bytes),
    /// Read the acceptor's status first; only `Ok` lets bytes through.
    AwaitStatus,
}

/// Writes `header` (the opener's preamble or the acceptor's ok status) and
/// splices; on any failure both sides are reset ([`abort`]) before the
/// failure is returned for the caller to log.
pub(crate) async fn carry(
    tcp: &mut TcpStream,
    send: &mut Outbound,
    recv: &mut RecvStream,
    header: Bytes,
    from_peer: FromPeer,
    stats: &PeerStats,
    context: Context<'_>,
) -> Result<Totals, (Failure, Totals)> {
    let result = match send.stream.write_chunk(header).await {
        Ok(()) => splice(tcp, send, recv, from_peer, stats, context).await,
        Err(error) => Err((Failure::from(error), Totals::default())),
    };
    if let Err((failure, _)) = &result {
        abort(tcp, send, recv, failure.stream_code());
    }
    result
}

/// Runs both directions until both ended cleanly, either failed, or `cancel`
/// fired. On `Err` the caller must [`abort`]: nothing has been reset yet.
pub(crate) async fn splice(
    tcp: &mut TcpStream,
    send: &mut Outbound,
    recv: &mut RecvStream,
    from_peer: FromPeer,
    stats: &PeerStats,
    context: Context<'_>,
) -> Result<Totals, (Failure, Totals)> {
    let mut totals = Totals::default();
    let result = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let sending = tcp_to_stream(
            &mut tcp_read,
            send,
            Moved::new(&mut totals.sent, &stats.sent),
            context,
        );
        let receiving = stream_to_tcp(
            recv,
            &mut tcp_write,
            from_peer,
            Moved::new(&mut totals.received, &stats.received),
        );
        // Pinned here and lent to `join_both`: an async fn keeps the futures
        // it is given by value twice in its own state, and this state is what
        // every idle connection costs.
        tokio::pin!(sending, receiving);
        join_both(sending.as_mut(), receiving.as_mut(), context.cancel).await
    };
    match result {
        Ok(()) => {
            // Both FINs went through: the socket may now close gracefully.
            close_gracefully(tcp);
            Ok(totals)
        }
        Err(failure) => Err((failure, totals)),
    }
}

async fn join_both(
    mut sending: Pin<&mut impl Future<Output = Result<(), Failure>>>,
    mut receiving: Pin<&mut impl Future<Output = Result<(), Failure>>>,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let (mut sending_done, mut receiving_done) = (false, false);
    while !(sending_done && receiving_done) {
        tokio::select! {
            result = sending.as_mut(), if !sending_done => match result {
                Ok(()) => sending_done = true,
                Err(Failure::StreamStopped(code)) if !receiving_done && is_refusal(code) => {
                    // The acceptor writes its status before it stops our
                    // sending half, but the stop may be seen first: give
                    // the status a moment to arrive so the log says why.
                    return Err(match tokio::time::timeout(STATUS_GRACE, receiving.as_mut()).await {
                        Ok(Err(failure @ Failure::Refused(_))) => failure,
                        _ => Failure::StreamStopped(code),
                    });
                }
                Err(failure) => return Err(failure),
            },
            result = receiving.as_mut(), if !receiving_done => { result?; receiving_done = true; }
            () = cancel.cancelled() => return Err(Failure::Shutdown),
        }
    }
    Ok(())
}

/// How long a stopped opener waits for the acceptor's status to learn why.
const STATUS_GRACE: Duration = Duration::from_millis(200);

/// Whether a stop code says the acceptor answered a status first.
fn is_refusal(code: VarInt) -> bool {
    matches!(
        StreamCode::from_u64(code.into_inner()),
        Some(StreamCode::Refused | StreamCode::BadPreamble | StreamCode::PreambleTimeout)
    )
}

/// Local TCP → QUIC stream. TCP end of file finishes the stream, and the
/// direction is done once the peer has acknowledged every byte and the FIN,
/// so a drain never closes the connection under unacknowledged data. While
/// the client is quiet, a stop or a lost connection still ends it at once:
/// a dead peer resets even an idle, half-closed client.
async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut Outbound,
    mut moved: Moved<'_>,
    context: Context<'_>,
) -> Result<(), Failure> {
    let stopped = send.stream.stopped();
    tokio::pin!(stopped);
    // A buffer is held only while the client is sending (see `Buffers`).
    let mut held: Option<Held<'_>> = None;
    loop {
        let buffer = match &mut held {
            Some(held) => &mut held.buffer,
            None => {
                tokio::select! {
                    ready = tcp.readable() => ready.map_err(Failure::TcpRead)?,
                    outcome = &mut stopped => return Err(stopped_early(outcome)),
                }
                let on_wait = || {
                    let verdict = context.metrics.limit_hit(NodeLimit::BufferMemory);
                    log_limit!(verdict, "stream buffer memory (limits.buffer_memory) is spent; streams wait for buffers");
                };
                let taken = tokio::select! {
                    taken = context.buffers.take(on_wait) => taken?,
                    outcome = &mut stopped => return Err(stopped_early(outcome)),
                };
                &mut held.insert(taken).buffer
            }
        };
        if buffer.capacity() - buffer.len() < MIN_SPARE {
            // Room for READ_CHUNK in all, pending bytes included, so a
            // buffer never outgrows what the budget counts for it.
            buffer.reserve(READ_CHUNK.saturating_sub(buffer.len()));
        }
        let read = match read_now(tcp, buffer).await {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Drained: what is pending is small (see below), so it is
                // copied out and the buffer goes back until the client
                // sends more.
                let pending = copy_out(buffer);
                held = None;
                if let Some(chunk) = pending {
                    send.stream.write_chunk(chunk).await?;
                }
                continue;
            }
            Err(error) => return Err(Failure::TcpRead(error)),
        };
        if read == 0 {
            let pending = copy_out(buffer);
            drop(held);
            if let Some(chunk) = pending {
                send.stream.write_chunk(chunk).await?;
            }
            // The client half-closed: mirror its FIN.
            send.finish()?;
            return match stopped.await {
                Ok(None) => Ok(()),
                outcome => Err(stopped_early(outcome)),
            };
        }
        moved.add(read);
        // quinn keeps each chunk until the peer acknowledges it, and with it
        // the whole allocation the chunk lives in. Once ZERO_COPY_MIN bytes
        // are pending they go over without a copy (`split` leaves the spare
        // capacity behind for the next read). Less is kept while the socket
        // has more to read, and copied out into a chunk of its own size only
        // when the socket is drained, so that a client sending small
        // messages does not pin a 64 KiB buffer per message, and a bulk
        // sender whose reads come back small is not copied twice.
        if buffer.len() < ZERO_COPY_MIN {
            continue;
        }
        let chunk = buffer.split().freeze();
        // quinn's write does not spend tokio's cooperative budget, but the
        // read does: once it is spent the read reports nothing to read, the
        // pending bytes go out, and the wait for the socket yields, so a
        // fast client cannot keep the shard from the connection's tasks.
        send.stream.write_chunk(chunk).await?;
    }
}

/// Reads what `tcp` holds now into `buffer`'s spare capacity, or fails with
/// `WouldBlock` if it holds nothing, without waiting.
///
/// `try_read_buf` would do, but it tells tokio the socket is drained only
/// when a read fails with `WouldBlock`: every message of a client that
/// sends small ones would cost a second `read` that fails. tokio's own read
/// path also takes a read that came back short as proof that the socket is
/// drained, so the read after it finds tokio's readiness cleared and
/// returns at once, with no system call.
async fn read_now(tcp: &mut ReadHalf<'_>, buffer: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;

    let read = tcp.read_buf(buffer);
    tokio::pin!(read);
    std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
        Poll::Pending => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
        ready @ Poll::Ready(_) => ready,
    })
    .await
}

/// What is pending in `buffer`, copied into a chunk of its own size, so
/// that the buffer can go back to the budget.
fn copy_out(buffer: &BytesMut) -> Option<Bytes> {
    (!buffer.is_empty()).then(|| Bytes::copy_from_slice(buffer))
}

/// The failure behind a `stopped()` outcome other than "all data acknowledged".
fn stopped_early(outcome: Result<Option<VarInt>, quinn::StoppedError>) -> Failure {
    match outcome {
        Ok(Some(code)) => Failure::StreamStopped(code),
        Ok(None) => Failure::StreamClosed,
        Err(quinn::StoppedError::ConnectionLost(error)) => Failure::ConnectionLost(error),
        Err(quinn::StoppedError::ZeroRttRejected) => Failure::StreamClosed,
    }
}

/// QUIC stream → local TCP. Stream FIN shuts down the socket's write side.
async fn stream_to_tcp(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    from_peer: FromPeer,
    mut moved: Moved<'_>,
) -> Result<(), Failure> {
    let first = match from_peer {
        FromPeer::Ready(bytes) => bytes,
        FromPeer::AwaitStatus => {
            let (status, rest) = read_status(recv).await?;
            if status.code != StatusCode::Ok {
                return Err(Failure::Refused(status));
            }
            rest
        }
    };
    if !first.is_empty() {
        moved.add(first.len());
        tcp.write_all(&first).await.map_err(Failure::TcpWrite)?;
    }
    loop {
        // The wait for data holds no room for a batch, so an idle connection
        // costs only this future's small state; the batch is taken once the
        // first chunk is in.
        let Some(first) = recv.read_chunk(usize::MAX, true).await? else {
            tcp.shutdown().await.map_err(Failure::TcpWrite)?;
            return Ok(());
        };
        // A lone chunk (a small message) is written as it is; only a
        // stream with more already received takes room for a batch.
        let mut second = Bytes::new();
        if more_chunks(recv, std::slice::from_mut(&mut second))? == 0 {
            moved.add(first.bytes.len());
            tcp.write_all(&first.bytes)
                .await
                .map_err(Failure::TcpWrite)?;
            continue;
        }
        let mut chunks = vec![Bytes::new(); MAX_CHUNKS];
        chunks[0] = first.bytes;
        chunks[1] = second;
        let count = 2 + more_chunks(recv, &mut chunks[2..])?;
        let chunks = &mut chunks[..count];
        moved.add(chunks.iter().map(Bytes::len).sum());
        write_all_chunks(tcp, chunks)
            .await
            .map_err(Failure::TcpWrite)?;
    }
}

/// Fills `chunks` with what the stream has received already, without
/// waiting; returns how many. An end of stream is left for the next read
/// to report; a reset or a lost connection is an error at once.
fn more_chunks(recv: &mut RecvStream, chunks: &mut [Bytes]) -> Result<usize, Failure> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let read = recv.read_chunks(chunks);
    let read = std::pin::pin!(read);
    match read.poll(&mut cx) {
        Poll::Ready(Ok(Some(count))) => Ok(count),
        Poll::Ready(Ok(None)) | Poll::Pending => Ok(0),
        Poll::Ready(Err(error)) => Err(error.into()),
    }
}

/// Writes every chunk with as few vectored writes as the socket allows.
async fn write_all_chunks(tcp: &mut WriteHalf<'_>, mut chunks: &mut [Bytes]) -> io::Result<()> {
    while let Some(first) = chunks.first() {
        if first.is_empty() {
            chunks = &mut chunks[1..];
            continue;
        }
        let mut written = std::future::poll_fn(|cx| {
            // Built on the stack at each try, so that the slices are not
            // part of the connection's future while it waits.
            let mut slices = [IoSlice::new(&[]); MAX_CHUNKS];
            let count = chunks.len().min(MAX_CHUNKS);
            for (slice, chunk) in slices.iter_mut().zip(chunks.iter()) {
                *slice = IoSlice::new(chunk);
            }
            Pin::new(&mut *tcp).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            // `written` never exceeds the total length of `chunks`.
            let chunk = &mut chunks[0];
            let taken = written.min(chunk.len());
            chunk.advance(taken);
            written -= taken;
            if chunk.is_empty() {
                chunks = &mut chunks[1..];
            }
        }
    }
    Ok(())
}

/// Reads the acceptor's status from the start of `recv`, and returns it with
/// any payload bytes that arrived in the same chunk.
pub(crate) async fn read_status(recv: &mut RecvStream) -> Result<(Status, Bytes), Failure> {
    let mut buffer = BytesMut::new();
    loop {
        match Status::decode(&buffer) {
            Ok(Some((status, len))) => {
                let rest = buffer.split_off(len).freeze();
                return Ok((status, rest));
            }
            Ok(None) => {}
            Err(error) => return Err(Failure::BadStatus(error)),
        }
        // A status is at most MAX_STATUS_LEN bytes, so asking for no more
        // than what is missing keeps payload in quinn's buffers.
        let wanted = MAX_STATUS_LEN - buffer.len();
        match recv.read_chunk(wanted, true).await? {
            Some(chunk) => buffer.extend_from_slice(&chunk.bytes),
            None => return Err(Failure::NoStatus),
        }
    }
}

/// Tears a failed connection down on both sides: the stream is reset and
/// stopped with `code`, and the local TCP socket is set to close with RST, so
/// the application sees a reset instead of a clean end of file.
pub(crate) fn abort(tcp: &TcpStream, send: &mut Outbound, recv: &mut RecvStream, code: StreamCode) {
    send.reset(code);
    // The receive half may already be finished; then there is nothing to stop.
    let _ = recv.stop(VarInt::from_u32(code.to_u32()));
    reset_on_close(tcp);
}

/// The sending half of a carried stream, which fails closed.
///
/// quinn finishes a `SendStream` that is dropped, which would show the peer
/// a clean end of stream even if the transfer was cut short (a task
/// cancelled by shutdown, say). This guard resets the stream instead unless
/// it was explicitly finished or reset.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) stream: SendStream,
    closed: bool,
}

impl Outbound {
    pub(crate) fn new(stream: SendStream) -> Self {
        Self {
            stream,
            closed: false,
        }
    }

    /// Sends FIN after everything written so far.
    pub(crate) fn finish(&mut self) -> Result<(), Failure> {
        self.closed = true;
        self.stream.finish().map_err(|_| Failure::StreamClosed)
    }

    /// Abandons the stream with `code`; the peer sees a reset.
    pub(crate) fn reset(&mut self, code: StreamCode) {
        self.closed = true;
        // An already finished or reset stream is fine: the peer knows.
        let _ = self.stream.reset(VarInt::from_u32(code.to_u32()));
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self
                .stream
                .reset(VarInt::from_u32(StreamCode::Shutdown.to_u32()));
        }
    }
}

/// Lets the next close of `tcp` send FIN again (the default linger).
fn close_gracefully(tcp: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(tcp).set_linger(None) {
        tracing::warn!(%error, "could not restore graceful close; the client may see a reset after a complete transfer");
    }
}

/// Makes the next close of `tcp` send RST instead of FIN (SO_LINGER = 0).
///
/// Every carried socket is armed like this as soon as it exists, so any
/// way out of its task other than a completed [`splice`] (an error, a
/// cancelled task) resets it: a failure can never look like a clean end of
/// file. `splice` disarms it once both directions ended cleanly.
pub(crate) fn reset_on_close(tcp: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
        // Without linger the close becomes a FIN; say so rather than hide it.
        tracing::warn!(%error, "could not arm TCP reset on close; the client may see EOF instead of a reset");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_spent_buffer_budget_makes_streams_wait_and_counts_the_episode_once() {
        let held = Gauge::default();
        // Two buffers' worth.
        let buffers = Buffers::new(2 * READ_CHUNK as u64 + 1, held.clone());
        let waits = AtomicUsize::new(0);
        let on_wait = || {
            waits.fetch_add(1, Ordering::Relaxed);
        };
        let first = buffers.take(on_wait).await.unwrap();
        let second = buffers.take(on_wait).await.unwrap();
        assert_eq!(held.get(), 2 * READ_CHUNK as i64);
        assert_eq!(waits.load(Ordering::Relaxed), 0);

        // A third waits until one is given back, and the wait is counted.
        let third = buffers.take(on_wait);
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err(),
            "a third buffer was handed out beyond the budget"
        );
        assert_eq!(waits.load(Ordering::Relaxed), 1);
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("a returned buffer is handed on")
            .unwrap();
        assert_eq!(held.get(), 2 * READ_CHUNK as i64);
        drop((second, third));
        assert_eq!(held.get(), 0);
        assert_eq!(waits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_cancelled_wait_does_not_hide_the_next_exhaustion() {
        let buffers = Buffers::new(READ_CHUNK as u64, Gauge::default());
        let waits = AtomicUsize::new(0);
        let on_wait = || {
            waits.fetch_add(1, Ordering::Relaxed);
        };
        let first = buffers.take(on_wait).await.unwrap();
        // A waiter that gives up (its stream was stopped).
        let gave_up = tokio::time::timeout(Duration::from_millis(20), buffers.take(on_wait)).await;
        assert!(gave_up.is_err());
        assert_eq!(waits.load(Ordering::Relaxed), 1);
        drop(first);
        let second = buffers.take(on_wait).await.unwrap();
        // A new episode: counted again.
        let waiting = tokio::time::timeout(Duration::from_millis(20), buffers.take(on_wait)).await;
        assert!(waiting.is_err());
        assert_eq!(waits.load(Ordering::Relaxed), 2);
        drop(second);
    }

    #[test]
    fn a_budget_below_one_buffer_still_allows_one() {
        let buffers = Buffers::new(1, Gauge::default());
        assert_eq!(buffers.permits.available_permits(), 1);
    }
}
