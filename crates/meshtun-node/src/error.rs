//! Why a node could not start, or a reload was refused.

use std::net::SocketAddr;

use meshtun_proto::NodeName;

use crate::overlay::OverlayError;

/// Why a node could not start. Each variant says which part of the
/// configuration or environment is at fault.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A socket could not be created or bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener, in config terms.
        what: &'static str,
        /// The address from the config.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS material could not be turned into rustls configs.
    #[error(transparent)]
    Pki(#[from] meshtun_pki::PkiError),
    /// A QUIC setting is unusable.
    #[error("QUIC configuration: {0}")]
    Quic(String),
    /// A forward names a peer the configuration does not declare (the
    /// config crate refuses this; a `Config` built by hand may not).
    #[error("forward on {listen} names undeclared peer {peer}")]
    UndeclaredPeer {
        /// The forward's listen address.
        listen: SocketAddr,
        /// The peer it names.
        peer: NodeName,
    },
    /// A shard's thread or runtime could not be started.
    #[error("cannot start shard {index}'s thread: {source}")]
    Shard {
        /// Which shard.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The overlay interface or nftables table could not be set up
    /// (`overlay.manage = true`).
    #[error("overlay set-up: {0}")]
    Overlay(#[from] OverlayError),
}

/// Why a reload was refused. The node keeps running on what it had.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration changes settings that only a restart applies.
    #[error("{} changed; restart meshtun to apply (nothing was reloaded)", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    /// The new certificates could not be turned into TLS configs, or a new
    /// forward's listener could not be bound.
    #[error(transparent)]
    Node(#[from] NodeError),
}
