//! The meshtun daemon's runtime.
//!
//! This crate owns everything that does network I/O or spawns tasks: the
//! shards that carry the data plane (`shard.rs`: one thread each, with its
//! own QUIC endpoint and connections), the warm connections to each peer
//! (`peer.rs`), the opener's loopback listener per `[[forward]]`
//! (`opener.rs`), the acceptor that maps each incoming stream to an
//! `[[expose]]` target (`acceptor.rs`), and in overlay mode the transparent
//! listener and the host set-up behind it ([`overlay`]). It takes a
//! validated [`meshtun_config::Config`] and loaded certificates; it must not
//! parse configuration or read key files itself, and it never decides
//! policy outside what the config says.
//!
//! It also lends its accept loop to a listener outside any [`Node`]
//! ([`accept_each`]): the enrollment server of `meshtun pki serve`, which
//! is meshtun-enroll's.
//!
//! Every task it spawns is owned by a
//! [`TaskTracker`](tokio_util::task::TaskTracker) and stops through a
//! [`CancellationToken`](tokio_util::sync::CancellationToken):
//! [`Node::shutdown`] stops accepting, lets open
//! streams drain for a grace period, resets what is left and closes QUIC with
//! a code.

/// Logs a refused stream at info if [`metrics::PeerStats::refused`] says
/// so (with how many were quiet since), else at debug.
macro_rules! log_refusal {
    ($verdict:expr, $($field:tt)+) => {
        match $verdict {
            Some(quiet) => tracing::info!(similar_since_last_report = quiet, $($field)+),
            None => tracing::debug!($($field)+),
        }
    };
}

/// Logs a limit hit at warn, or at debug when [`metrics::Metrics::limit_hit`]
/// or [`metrics::PeerStats::refused`] says this kind was logged recently.
macro_rules! log_limit {
    ($verdict:expr, $($field:tt)+) => {
        match $verdict {
            Some(quiet) => tracing::warn!(similar_since_last_report = quiet, $($field)+),
            None => tracing::debug!($($field)+),
        }
    };
}

mod accept;
mod acceptor;
mod admin;
mod carrier;
mod cid;
mod endpoint;
mod error;
mod gso;
mod identity;
mod metrics;
mod node;
mod opener;
pub mod overlay;
mod peer;
mod policy;
mod shard;
mod shared;
mod splice;
mod status;
mod throttle;

pub use crate::accept::accept_each;
pub use crate::error::{NodeError, ReloadError};
pub use crate::node::Node;
pub use crate::overlay::OverlayError;
pub use crate::status::{
    CertificateStatus, ExposeStatus, ForwardStatus, GuardStatus, NodeStatus, OverlayStatus,
    PeerCertificate, PeerStatus, ReloadStatus, RenewalStatus, ShardStatus,
};
