//! Accounting for datagrams that are not meshtun's QUIC.
//!
//! quinn drops garbage, packets for unknown connections and handshakes that
//! fail to authenticate before meshtun sees them, and says so only in its
//! own debug/trace events, one per datagram. Operators should know when
//! their QUIC port is being sprayed, without a line per packet: this
//! tracing layer counts those events, and [`report`] logs one summary line
//! per interval at info while junk keeps arriving.
//!
//! Reading event text is fragile, so it is pinned: quinn 0.11's own
//! `Endpoint::stats()` counts handshakes only (accepted, outgoing, refused,
//! ignored), with nothing for a datagram dropped before a handshake, so
//! there is no counter to read instead. The unit test below sends four
//! kinds of garbage at a real quinn endpoint and expects four counts; a
//! quinn upgrade that rewords the events fails it rather than silently
//! zeroing the figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The quinn module whose drop events are counted.
pub(crate) const TARGET: &str = "quinn_proto::endpoint";

/// Shared counter of dropped datagrams.
#[derive(Debug, Clone, Default)]
pub(crate) struct JunkCounter(Arc<AtomicU64>);

impl JunkCounter {
    fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// Counts quinn's "dropping …", "malformed …", "ignoring …" events.
#[derive(Debug)]
pub(crate) struct JunkLayer {
    counter: JunkCounter,
}

impl JunkLayer {
    pub(crate) fn new(counter: JunkCounter) -> Self {
        Self { counter }
    }
}

/// Reads an event's `message` field and decides whether it reports a
/// dropped datagram.
#[derive(Default)]
struct DropMessage(bool);

impl Visit for DropMessage {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let text = format!("{value:?}");
            self.0 = [
                "dropping",
                "malformed",
                "ignoring",
                "unable to decode",
                "failed to authenticate",
            ]
            .iter()
            .any(|prefix| text.starts_with(prefix));
        }
    }
}

impl<S: Subscriber> Layer<S> for JunkLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut message = DropMessage::default();
        event.record(&mut message);
        if message.0 {
            self.counter.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Logs, once per `interval`, how many datagrams were dropped, while any were.
pub(crate) async fn report(counter: JunkCounter, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let dropped = counter.take();
        if dropped > 0 {
            tracing::info!(
                dropped,
                interval = ?interval,
                "dropped datagrams on the QUIC port that are not valid QUIC for this node (garbage, unknown connection or version, failed authentication)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;

    /// quinn reports a dropped datagram only by a debug or trace event, so
    /// the counter reads their text. This pins that text: a quinn upgrade
    /// that rewords the events fails here rather than silently zeroing
    /// the figure operators read.
    #[test]
    fn garbage_at_a_quinn_endpoint_is_counted_once_a_datagram() {
        let counter = JunkCounter::default();
        let subscriber = tracing_subscriber::registry().with(
            JunkLayer::new(counter.clone())
                .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE)),
        );
        let _default = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Each dropped on another path: too small to be a header, a short
        // header for no connection, a long header of an unknown version,
        // and a long header whose connection ids run past the datagram.
        let garbage: [&[u8]; 4] = [
            b"\x00junk",
            &[0x40; 64],
            &[
                0xc0, 0x0a, 0x1a, 0x2a, 0x3a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0,
            ],
            &[0xff; 1200],
        ];
        runtime.block_on(async {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = endpoint.local_addr().unwrap();
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for datagram in garbage {
                socket.send_to(datagram, addr).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while counter.0.load(Ordering::Relaxed) < garbage.len() as u64
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Anything counted late would show here.
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        assert_eq!(counter.take(), garbage.len() as u64);
    }
}
