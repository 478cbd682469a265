//! What carrying local TCP connections over QUIC streams needs of the node,
//! on either end: a narrow handle, so the opener, the overlay listener and
//! the acceptor's stream tasks reach only the stream tracker, the drain
//! signal, the buffer budget, the shards' counters, the metrics and the
//! policy in force, and not the node's whole shared state.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::policy::InForce;
use crate::{accept, shard, splice};

/// The handle every carried stream holds.
#[derive(Debug)]
pub(crate) struct Carrier {
    /// One task per carried stream, on either end.
    pub(crate) streams: TaskTracker,
    /// Fires when the drain period is over: open streams are reset.
    pub(crate) abort: CancellationToken,
    /// The budget of TCP read buffers (`limits.buffer_memory`).
    pub(crate) buffers: splice::Buffers,
    /// The data-plane shards, in order; never empty.
    pub(crate) shards: Vec<shard::Shard>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) policy: Arc<InForce>,
}

impl Carrier {
    /// Shard `index`'s counters (shard 0's if there is no such shard).
    pub(crate) fn shard(&self, index: usize) -> &shard::Shard {
        self.shards.get(index).unwrap_or(&self.shards[0])
    }

    /// What a spliced stream needs of the node.
    pub(crate) fn splice_context(&self) -> splice::Context<'_> {
        splice::Context {
            cancel: &self.abort,
            buffers: &self.buffers,
            metrics: &self.metrics,
        }
    }

    /// What a forwarding listener's failed accepts need of the node.
    pub(crate) fn accept_limits(&self) -> accept::NodeLimits<'_> {
        accept::NodeLimits {
            metrics: &self.metrics,
            policy: &self.policy,
        }
    }
}
