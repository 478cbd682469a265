//! A UDP socket that keeps quinn's segmentation-offload batches within
//! what one `sendmsg` can carry, so that jumbo frames can be used.
//!
//! quinn 0.11 hands the socket batches of up to 10 packets of one size, to
//! go out in one `sendmsg` with UDP segmentation offload (GSO). The kernel
//! takes at most 65,507 bytes per call, so batches of packets above 6,550
//! bytes are refused whole, and MTU discovery reads the failures as a black
//! hole and falls back to 1,200-byte packets. quinn's one knob, the
//! socket's `max_transmit_segments`, caps batches of every packet size:
//! set to 7 it would also shrink the batches of 1,466-byte packets that a
//! 1500-byte link uses. So this wrapper splits only the batches that do
//! not fit into as few calls as fit (seven 8,952-byte packets and then
//! three, say) and leaves every other transmit alone. Everything else goes
//! straight to quinn's own socket.
//!
//! It also joins batches. quinn hands over at most 10 packets per
//! transmit, and a connection's task at most 20 per wake-up; where the
//! kernel passes a segmentation-offload batch along whole (loopback, veth,
//! a bridge, a NIC with UDP segmentation offload, and GRO on the receiver),
//! each `sendmsg` costs both ends about the same whatever its packet count,
//! so 10 per call is a quarter of what fits in 64 KiB. A batch of full
//! packets (every segment the same size) is therefore kept back, copied,
//! and sent with the next ones to the same place in one call: when one
//! arrives that ends with a short packet, when no more fit, when one for
//! elsewhere arrives, or, at the latest, when the task that sent it has
//! yielded (a task spawned at the first kept batch sends what is kept,
//! once the shard's other ready tasks have had their turn). A lone packet
//! is never kept, nor a batch that ends with a short one (the end of a
//! burst), so a small request or answer waits for nothing.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most UDP payload one `sendmsg` may carry: an IPv4 datagram's 65,535
/// bytes less its 20-byte header and the 8-byte UDP header. (IPv6 allows
/// 20 bytes more; the smaller bound serves both.)
pub(crate) const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;

/// Wraps quinn's socket; see the module docs.
pub(crate) struct SplitBatches {
    shared: Arc<Shared>,
}

/// What the socket and the task that sends a kept batch share.
struct Shared {
    inner: Arc<dyn AsyncUdpSocket>,
    kept: Mutex<Kept>,
}

/// Full packets kept back to go out with the next ones.
#[derive(Default)]
struct Kept {
    contents: Vec<u8>,
    destination: Option<SocketAddr>,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    segment_size: usize,
    /// The most bytes one call may carry at this segment size.
    limit: usize,
}

impl Kept {
    fn transmit(&self) -> Option<Transmit<'_>> {
        Some(Transmit {
            destination: self.destination?,
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: Some(self.segment_size),
            src_ip: self.src_ip,
        })
    }

    fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    fn clear(&mut self) {
        self.contents.clear();
        self.destination = None;
    }

    /// Whether `transmit` may join what is kept: the same place, marking
    /// and packet size, what is kept ends on a whole packet (a short one
    /// ends a batch), and there is room for it in one call.
    fn joins(&self, transmit: &Transmit<'_>) -> bool {
        self.destination == Some(transmit.destination)
            && self.ecn == transmit.ecn
            && self.src_ip == transmit.src_ip
            && transmit.segment_size.unwrap_or(transmit.contents.len()) == self.segment_size
            && self.contents.len() % self.segment_size == 0
            && transmit.contents.len() <= self.limit.saturating_sub(self.contents.len())
    }
}

/// Whether `len` bytes of `size`-byte packets are worth keeping back (or
/// keeping on with) when one call may carry `limit` bytes: at least two
/// packets, all full, with room for more.
fn worth_keeping(len: usize, size: usize, limit: usize) -> bool {
    size > 0 && len % size == 0 && len >= 2 * size && len + size <= limit
}

impl SplitBatches {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                kept: Mutex::new(Kept::default()),
            }),
        }
    }
}

impl Shared {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most bytes one call may carry in `size`-byte packets: what
    /// fits 64 KiB, within what the socket does with segmentation offload
    /// now (it turns it off if the kernel refuses it), and the kernel's
    /// 64 segments.
    fn limit(&self, size: usize) -> usize {
        segments_per_send(size)
            .min(self.inner.max_transmit_segments())
            .min(64)
            * size
    }

    /// Sends what is kept now. `WouldBlock` keeps it; any other error
    /// drops it (the packets count as lost, as quinn's own socket does
    /// with such errors), since the transmits in it were taken long ago.
    fn flush(&self, kept: &mut Kept) -> io::Result<()> {
        let Some(transmit) = kept.transmit() else {
            return Ok(());
        };
        match self.inner.try_send(&transmit) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Err(error),
            Err(error) => {
                tracing::debug!(%error, "a kept batch could not be sent");
                kept.clear();
                Ok(())
            }
            Ok(()) => {
                kept.clear();
                Ok(())
            }
        }
    }

    /// Sends `transmit` at once, in as few calls as fit.
    fn send_now(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let segment_size = match transmit.segment_size {
            Some(size) if transmit.contents.len() > MAX_SEND_BYTES => size,
            _ => return self.inner.try_send(transmit),
        };
        let part_len = segments_per_send(segment_size) * segment_size;
        for (index, part) in transmit.contents.chunks(part_len).enumerate() {
            let sent = self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > segment_size).then_some(segment_size),
                src_ip: transmit.src_ip,
            });
            if let Err(error) = sent {
                if index > 0 {
                    tracing::trace!(%error, "a later part of a split batch waits; the whole batch goes again");
                }
                // quinn waits until the socket is writable and offers the
                // whole batch again. If earlier parts already left, their
                // packets arrive twice and the receiver drops the copies
                // by packet number: a few wasted bytes when the socket
                // buffer is full, where leaving them out would read as
                // loss and shrink the congestion window.
                return Err(error);
            }
        }
        Ok(())
    }
}

/// Sends what `shared` keeps once the task that kept it has yielded,
/// waiting for the socket to take it.
async fn send_kept(shared: Weak<Shared>) {
    tokio::task::yield_now().await;
    let mut poller = None;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let result = {
            let mut kept = shared.kept();
            if kept.is_empty() {
                return;
            }
            shared.flush(&mut kept)
        };
        match result {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let poller = poller.get_or_insert_with(|| shared.inner.clone().create_io_poller());
                drop(shared);
                if std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(_) | Ok(()) => return,
        }
    }
}

impl fmt::Debug for SplitBatches {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SplitBatches")
            .field("inner", &self.shared.inner)
            .finish()
    }
}

/// How many whole segments of `segment_size` bytes fit one `sendmsg`.
fn segments_per_send(segment_size: usize) -> usize {
    (MAX_SEND_BYTES / segment_size.max(1)).max(1)
}

impl AsyncUdpSocket for SplitBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.shared.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let shared = &self.shared;
        let mut kept = shared.kept();
        if !kept.is_empty() {
            if !kept.joins(transmit) {
                // What is kept goes first; if the socket is full, this
                // transmit waits with it (quinn offers it again).
                shared.flush(&mut kept)?;
            } else {
                kept.contents.extend_from_slice(transmit.contents);
                if worth_keeping(kept.contents.len(), kept.segment_size, kept.limit) {
                    return Ok(());
                }
                // Full, or ended by a short packet: out now, or by the
                // task already spawned if the socket is full (this
                // transmit is taken either way).
                return match shared.flush(&mut kept) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
                    other => other,
                };
            }
        }
        if let Some(size) = transmit.segment_size {
            let limit = shared.limit(size);
            if worth_keeping(transmit.contents.len(), size, limit) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    kept.contents.extend_from_slice(transmit.contents);
                    kept.destination = Some(transmit.destination);
                    kept.ecn = transmit.ecn;
                    kept.src_ip = transmit.src_ip;
                    kept.segment_size = size;
                    kept.limit = limit;
                    runtime.spawn(send_kept(Arc::downgrade(shared)));
                    return Ok(());
                }
            }
        }
        drop(kept);
        shared.send_now(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.shared.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.shared.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.shared.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.shared.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it is asked to send; fails the sends listed in `fail`.
    #[derive(Debug, Default)]
    struct Recorder {
        sent: Mutex<Vec<(usize, Option<usize>)>>,
        /// Every byte sent, in order.
        bytes: Mutex<Vec<u8>>,
        fail: Vec<usize>,
        /// What `max_transmit_segments` says (0: 64, as with GSO on).
        segments: usize,
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(AlwaysWritable)
        }

        fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
            let mut sent = self.sent.lock().unwrap();
            if self.fail.contains(&sent.len()) {
                sent.push((0, None));
                return Err(io::ErrorKind::WouldBlock.into());
            }
            sent.push((transmit.contents.len(), transmit.segment_size));
            self.bytes
                .lock()
                .unwrap()
                .extend_from_slice(transmit.contents);
            Ok(())
        }

        fn max_transmit_segments(&self) -> usize {
            if self.segments == 0 {
                64
            } else {
                self.segments
            }
        }

        fn poll_recv(
            &self,
            _: &mut Context<'_>,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
    }

    /// A socket that always takes more.
    #[derive(Debug)]
    struct AlwaysWritable;

    impl UdpPoller for AlwaysWritable {
        fn poll_writable(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn to(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn send_to(
        socket: &SplitBatches,
        destination: SocketAddr,
        len: usize,
        segment: Option<usize>,
    ) -> io::Result<()> {
        send_marked(socket, destination, len, segment, 0, None)
    }

    /// Sends `len` bytes of `mark`.
    fn send_marked(
        socket: &SplitBatches,
        destination: SocketAddr,
        len: usize,
        segment: Option<usize>,
        mark: u8,
        ecn: Option<EcnCodepoint>,
    ) -> io::Result<()> {
        let contents = vec![mark; len];
        socket.try_send(&Transmit {
            destination,
            ecn,
            contents: &contents,
            segment_size: segment,
            src_ip: None,
        })
    }

    /// Runs `body` on a current-thread runtime, as a shard does.
    fn on_a_shard(body: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(body);
    }

    /// Lets the task that sends kept batches run.
    async fn let_it_run() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn full_batches_join_the_next_ones_and_a_short_packet_sends_them() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder::default());
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            assert!(recorder.sent.lock().unwrap().is_empty(), "kept back");
            send_to(&socket, to(2), 4 * 1466 + 100, Some(1466)).unwrap();
            assert_eq!(
                *recorder.sent.lock().unwrap(),
                [(24 * 1466 + 100, Some(1466))]
            );
            let_it_run().await;
            assert_eq!(recorder.sent.lock().unwrap().len(), 1, "nothing twice");
        });
    }

    #[test]
    fn a_kept_batch_goes_out_once_the_sender_yields() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder::default());
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            assert!(recorder.sent.lock().unwrap().is_empty());
            let_it_run().await;
            assert_eq!(*recorder.sent.lock().unwrap(), [(10 * 1466, Some(1466))]);
        });
    }

    #[test]
    fn a_send_elsewhere_or_one_that_does_not_fit_sends_the_kept_batch_first() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder::default());
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            send_to(&socket, to(3), 1200, None).unwrap();
            // Four batches of ten fit one call of 64 KiB (44 packets); the
            // fifth does not.
            for _ in 0..5 {
                send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            }
            let_it_run().await;
            let sent = recorder.sent.lock().unwrap().clone();
            assert_eq!(
                sent,
                [
                    (10 * 1466, Some(1466)),
                    (1200, None),
                    (40 * 1466, Some(1466)),
                    (10 * 1466, Some(1466)),
                ]
            );
            assert!(sent.iter().all(|(len, _)| *len <= MAX_SEND_BYTES));
        });
    }

    #[test]
    fn a_full_socket_keeps_the_batch_and_holds_back_what_comes_after_it() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder {
                fail: vec![0],
                ..Recorder::default()
            });
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            // The kept batch cannot go: the packet for elsewhere is refused
            // too, so quinn offers it again later, after the batch.
            let error = send_to(&socket, to(3), 1200, None).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
            let_it_run().await;
            send_to(&socket, to(3), 1200, None).unwrap();
            assert_eq!(
                *recorder.sent.lock().unwrap(),
                [(0, None), (10 * 1466, Some(1466)), (1200, None)]
            );
        });
    }

    #[test]
    fn a_batch_never_joins_one_that_ended_with_a_short_packet() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder {
                fail: vec![0],
                ..Recorder::default()
            });
            let socket = SplitBatches::new(recorder.clone());
            send_marked(&socket, to(2), 10 * 1466, Some(1466), 1, None).unwrap();
            // Ends with a short packet; the socket is full, so it is kept
            // (and taken).
            send_marked(&socket, to(2), 4 * 1466 + 100, Some(1466), 2, None).unwrap();
            // Must not be appended after the short packet.
            send_marked(&socket, to(2), 10 * 1466, Some(1466), 3, None).unwrap();
            let_it_run().await;
            assert_eq!(
                *recorder.sent.lock().unwrap(),
                [
                    (0, None),
                    (14 * 1466 + 100, Some(1466)),
                    (10 * 1466, Some(1466))
                ]
            );
            let bytes = recorder.bytes.lock().unwrap().clone();
            let mut expected = vec![1u8; 10 * 1466];
            expected.extend(vec![2u8; 4 * 1466 + 100]);
            expected.extend(vec![3u8; 10 * 1466]);
            assert!(bytes == expected, "bytes out of order");
        });
    }

    #[test]
    fn only_batches_to_the_same_place_with_the_same_marking_join() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder::default());
            let socket = SplitBatches::new(recorder.clone());
            let ect = Some(EcnCodepoint::Ect0);
            send_marked(&socket, to(2), 10 * 1466, Some(1466), 1, None).unwrap();
            send_marked(&socket, to(3), 10 * 1466, Some(1466), 2, None).unwrap();
            send_marked(&socket, to(3), 10 * 1466, Some(1466), 3, ect).unwrap();
            send_marked(&socket, to(3), 10 * 1466, Some(1466), 4, ect).unwrap();
            let_it_run().await;
            assert_eq!(
                *recorder.sent.lock().unwrap(),
                [
                    (10 * 1466, Some(1466)),
                    (10 * 1466, Some(1466)),
                    (20 * 1466, Some(1466))
                ]
            );
            let bytes = recorder.bytes.lock().unwrap().clone();
            let expected: Vec<u8> = (1..=4u8).flat_map(|mark| vec![mark; 10 * 1466]).collect();
            assert!(bytes == expected, "bytes out of order");
        });
    }

    #[test]
    fn nothing_is_kept_when_the_socket_sends_one_packet_a_call() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder {
                segments: 1,
                ..Recorder::default()
            });
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 10 * 1466, Some(1466)).unwrap();
            assert_eq!(recorder.sent.lock().unwrap().len(), 1, "sent at once");
        });
    }

    #[test]
    fn small_packets_and_jumbo_batches_are_never_kept() {
        on_a_shard(async {
            let recorder = Arc::new(Recorder::default());
            let socket = SplitBatches::new(recorder.clone());
            send_to(&socket, to(2), 64, None).unwrap();
            send_to(&socket, to(2), 2 * 1466 + 10, Some(1466)).unwrap();
            send_to(&socket, to(2), 10 * 8952, Some(8952)).unwrap();
            assert_eq!(recorder.sent.lock().unwrap().len(), 4);
        });
    }

    fn send(recorder: Arc<Recorder>, len: usize, segment: Option<usize>) -> io::Result<()> {
        let contents = vec![0u8; len];
        SplitBatches::new(recorder).try_send(&Transmit {
            destination: SocketAddr::from(([127, 0, 0, 1], 2)),
            ecn: None,
            contents: &contents,
            segment_size: segment,
            src_ip: None,
        })
    }

    #[test]
    fn batches_that_fit_go_out_whole() {
        let recorder = Arc::new(Recorder::default());
        send(recorder.clone(), 10 * 1466, Some(1466)).unwrap();
        send(recorder.clone(), 1200, None).unwrap();
        send(recorder.clone(), 10 * 6500, Some(6500)).unwrap();
        assert_eq!(
            *recorder.sent.lock().unwrap(),
            [(14_660, Some(1466)), (1200, None), (65_000, Some(6500))]
        );
    }

    #[test]
    fn jumbo_batches_are_split_into_sends_that_fit() {
        let recorder = Arc::new(Recorder::default());
        // Nine 8952-byte packets and a short last one.
        send(recorder.clone(), 9 * 8952 + 100, Some(8952)).unwrap();
        let sent = recorder.sent.lock().unwrap().clone();
        assert_eq!(sent, [(7 * 8952, Some(8952)), (2 * 8952 + 100, Some(8952))]);
        assert!(sent.iter().all(|(len, _)| *len <= MAX_SEND_BYTES));
    }

    #[test]
    fn a_lone_last_segment_goes_without_segmentation() {
        let recorder = Arc::new(Recorder::default());
        send(recorder.clone(), 7 * 8952 + 3000, Some(8952)).unwrap();
        assert_eq!(
            *recorder.sent.lock().unwrap(),
            [(7 * 8952, Some(8952)), (3000, None)]
        );
    }

    #[test]
    fn a_refused_part_makes_quinn_offer_the_whole_batch_again() {
        for refused in [0, 1] {
            let recorder = Arc::new(Recorder {
                fail: vec![refused],
                ..Recorder::default()
            });
            let error = send(recorder.clone(), 10 * 8952, Some(8952)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
            // Nothing is tried after the refused part.
            assert_eq!(recorder.sent.lock().unwrap().len(), refused + 1);
        }
    }
}
