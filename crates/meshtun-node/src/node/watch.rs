//! The node's watchers: the sweep of peers whose certificates expired, and
//! the guard's watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshtun_config::Config;
use meshtun_pki::PeerRole;
use quinn::Connection;
use tracing::{debug, warn};

use crate::policy::still_trusted;
use crate::shared::Shared;
use crate::{identity, overlay};

/// How often live connections are checked against the dates of their
/// peers' certificates.
pub(super) const TRUST_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Closes live connections whose peer's chain expired: every
/// [`TRUST_SWEEP_INTERVAL`], a connection past its chain's deadline
/// ([`TrustBundle::chain_deadline`], parsed once per connection) is checked
/// in full by [`still_trusted`]. Ends when the node closes.
pub(super) async fn sweep_expired(shared: Arc<Shared>) {
    // By stable id, with a handle on the connection: while the handle is
    // held, no new connection can take the same id.
    let mut deadlines: HashMap<usize, (Connection, Option<SystemTime>)> = HashMap::new();
    let mut ticks = tokio::time::interval(TRUST_SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shared.closing.cancelled() => return,
        }
        let trust = shared
            .trust
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let now = SystemTime::now();
        let mut seen = Vec::new();
        for (name, connection, role) in shared.live_connections() {
            let id = connection.stable_id();
            seen.push(id);
            let deadline = deadlines
                .entry(id)
                .or_insert_with(|| {
                    let deadline = identity::peer_chain(&connection)
                        .ok()
                        .and_then(|chain| trust.chain_deadline(&chain));
                    (connection.clone(), deadline)
                })
                .1;
            if deadline.is_some_and(|deadline| deadline <= now) {
                debug!(peer = %name, remote = %connection.remote_address(), "the peer's certificates of a live connection are past their date: checking it");
                let role = match &role {
                    Some(peer) => PeerRole::Acceptor(peer),
                    None => PeerRole::Dialer,
                };
                let stats = shared.metrics().peer(&name);
                if still_trusted(&connection, &shared.trust, role, &stats) {
                    // Still good (a newer CA of the same name, or a clock
                    // a moment behind the certificate's): look again at
                    // the next deadline the bundle in force gives, or at
                    // the next sweep.
                    let next = identity::peer_chain(&connection)
                        .ok()
                        .and_then(|chain| trust.chain_deadline(&chain))
                        .filter(|next| *next > now)
                        .unwrap_or(now + TRUST_SWEEP_INTERVAL);
                    deadlines.insert(id, (connection.clone(), Some(next)));
                }
            }
        }
        deadlines.retain(|id, _| seen.contains(id));
    }
}

/// The sweep of expired and revoked peers, and the guard's watch; a warning
/// when the overlay runs unguarded.
pub(super) fn spawn_watchers(shared: &Arc<Shared>, config: &Config) {
    shared.tasks.spawn(sweep_expired(shared.clone()));
    if overlay::HostSetup::of(config).is_some_and(|setup| setup.guards()) {
        let watch = overlay::watch_guard(shared.carrier.metrics.clone(), shared.closing.clone());
        shared.tasks.spawn(watch);
    }
    if let Some(overlay) = &config.overlay {
        if !overlay.guard {
            warn!(address = %overlay.address, prefix = %overlay.prefix, "overlay.guard = false: packets for the overlay prefix from off this node are not dropped, so anyone on the link who routes this node's overlay address at it reaches the services bound there in plain text");
        }
    }
}
