//! What carrying local TCP connections over QUIC streams needs of the node:
//! the stream tracker, the drain signal, the buffer budget, the shards'
//! counters, the metrics and the policy in force. The opener side (the
//! forward listeners and overlay mode's transparent listener) holds only
//! this; the acceptor reaches it through the node's shared state, which
//! also holds what admitting a peer needs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::policy::InForce;
use crate::{accept, shard, splice};

/// The node's stream-carrying parts, behind one `Arc`.
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
    /// The node's metrics; the guard's watch holds them too.
    pub(crate) metrics: Arc<Metrics>,
    /// The policy in force, which a reload replaces.
    pub(crate) policy: InForce,
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
