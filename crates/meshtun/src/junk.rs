//! Accounting for datagrams that are not meshtun's QUIC.
//!
//! quinn drops garbage, packets for unknown connections and handshakes that
//! fail to authenticate before meshtun sees them, and says so only in its
//! own debug/trace events, one per datagram. Operators should know when
//! their QUIC port is being sprayed, without a line per packet: this
//! tracing layer counts those events, and [`report`] logs one summary line
//! per interval at info while junk keeps arriving.

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
