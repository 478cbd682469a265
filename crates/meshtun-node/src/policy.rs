//! What is in force and may change on reload: the policy (who may reach
//! which service, the limits) and the trust bundle, with the check a live
//! connection takes again when either changes.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use meshtun_config::{Config, Expose, Limits, Overlay};
use meshtun_pki::{PeerRole, TrustBundle};
use meshtun_proto::ConnectionCode;
use quinn::{Connection, VarInt};
use tracing::warn;

use crate::metrics::{CutReason, LabelValue};
use crate::{identity, metrics};

/// What a reload may change without a restart: who may reach which service
/// or overlay port, and the timeouts of the forwarding path. Replaced whole,
/// so a stream sees one consistent version.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) exposes: Vec<Expose>,
    /// `[overlay]`, if on; a reload may change only its `allow`.
    pub(crate) overlay: Option<Overlay>,
    /// `[limits]`; a reload may change all but `buffer_memory`.
    pub(crate) limits: Limits,
}

impl Policy {
    pub(crate) fn from_config(config: &Config) -> Self {
        Self {
            exposes: config.exposes.clone(),
            overlay: config.overlay.clone(),
            limits: config.limits.clone(),
        }
    }
}

/// The [`Policy`] in force, replaced whole by a reload: a reader holds
/// one version for as long as it needs it.
#[derive(Debug)]
pub(crate) struct InForce(RwLock<Arc<Policy>>);

impl InForce {
    pub(crate) fn new(policy: Policy) -> Self {
        Self(RwLock::new(Arc::new(policy)))
    }

    /// The policy in force now.
    pub(crate) fn get(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `policy` in force for everything that reads it from now on.
    pub(crate) fn replace(&self, policy: Policy) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(policy);
    }
}

/// The trust bundle in force, shared with the dialers: a connection whose
/// handshake raced a reload is checked again against the newest one.
pub(crate) type TrustState = Arc<RwLock<Arc<TrustBundle>>>;

/// Checks `connection`'s peer certificate against the trust in force, the
/// way its handshake did (`role`), and closes the connection if it no
/// longer passes: with [`ConnectionCode::Expired`] when a certificate of
/// the chain expired, [`ConnectionCode::Revoked`] when a CRL revokes it,
/// else [`ConnectionCode::Untrusted`], counted in `stats`. Call it after
/// the connection is tracked (in `incoming` or a peer slot), so a reload's
/// sweep or this check, whichever comes last, sees it. Returns whether the
/// connection may stay.
pub(crate) fn still_trusted(
    connection: &Connection,
    trust: &TrustState,
    role: PeerRole<'_>,
    stats: &metrics::PeerStats,
) -> bool {
    let trust = trust
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let verdict = match identity::peer_chain(connection) {
        Ok(chain) => trust
            .verify_peer_chain(&chain, role, SystemTime::now())
            .map(|_| ())
            .map_err(|error| {
                let code = if error.is_expired() {
                    ConnectionCode::Expired
                } else if error.is_revoked() {
                    ConnectionCode::Revoked
                } else {
                    ConnectionCode::Untrusted
                };
                (code, error.to_string())
            }),
        Err(error) => Err((ConnectionCode::Untrusted, error.to_string())),
    };
    match verdict {
        Ok(()) => true,
        Err((code, reason)) => {
            let label = match code {
                ConnectionCode::Expired => CutReason::Expired,
                ConnectionCode::Revoked => CutReason::Revoked,
                _ => CutReason::Untrusted,
            };
            warn!(
                remote = %connection.remote_address(),
                cut = label.as_str(),
                %reason,
                "closing connection: the peer's certificate is no longer trusted"
            );
            stats.connection_cut(label);
            connection.close(VarInt::from_u32(code.to_u32()), code.reason());
            false
        }
    }
}
