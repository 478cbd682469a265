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

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most UDP payload one `sendmsg` may carry: an IPv4 datagram's 65,535
/// bytes less its 20-byte header and the 8-byte UDP header. (IPv6 allows
/// 20 bytes more; the smaller bound serves both.)
pub(crate) const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;

/// Wraps quinn's socket; see the module docs.
pub(crate) struct SplitBatches {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl SplitBatches {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for SplitBatches {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SplitBatches")
            .field("inner", &self.inner)
            .finish()
    }
}

/// How many whole segments of `segment_size` bytes fit one `sendmsg`.
fn segments_per_send(segment_size: usize) -> usize {
    (MAX_SEND_BYTES / segment_size.max(1)).max(1)
}

impl AsyncUdpSocket for SplitBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
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

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
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
        fail: Vec<usize>,
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            unimplemented!("not polled in these tests")
        }

        fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
            let mut sent = self.sent.lock().unwrap();
            if self.fail.contains(&sent.len()) {
                sent.push((0, None));
                return Err(io::ErrorKind::WouldBlock.into());
            }
            sent.push((transmit.contents.len(), transmit.segment_size));
            Ok(())
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
