//! Reload: what a new configuration may change without a restart, and how
//! it is applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshtun_config::{Config, Forward as ForwardConfig, Overlay, Peer};
use meshtun_pki::{NodeCredentials, PeerRole, TrustBundle};
use meshtun_proto::NodeName;
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::facts::*;
use super::start::*;
use super::{bind_tcp_group, Node, RunningForward};
use crate::error::{NodeError, ReloadError};
use crate::peer::PeerLinks;
use crate::policy::{still_trusted, Policy};
use crate::shared::unix_now;
use crate::{endpoint, opener, peer};

/// The parts of a configuration that only a restart applies, with the key
/// an operator would look for. Everything else is reloadable.
pub(super) fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.node != new.node {
        changed.push("node");
    }
    if old.quic != new.quic {
        changed.push("[quic]");
    }
    if old.admin != new.admin {
        changed.push("[admin]");
    }
    if old.limits.buffer_memory != new.limits.buffer_memory {
        changed.push("limits.buffer_memory");
    }
    if old.limits.worker_threads != new.limits.worker_threads {
        changed.push("limits.worker_threads");
    }
    if old.limits.shards != new.limits.shards {
        changed.push("limits.shards");
    }
    // The interface, addresses and listener are set up once; who may reach
    // which port is policy.
    let without_allow = |overlay: &Option<Overlay>| {
        overlay.as_ref().map(|overlay| Overlay {
            allow: Vec::new(),
            ..overlay.clone()
        })
    };
    if without_allow(&old.overlay) != without_allow(&new.overlay) {
        changed.push("[overlay] (except allow)");
    }
    // Loaded into nftables with the host set-up.
    if old.guard != new.guard {
        changed.push("[guard]");
    }
    changed
}

impl Node {
    /// Applies a new configuration and certificates without dropping any
    /// stream. New handshakes use the new certificates, trust bundle and
    /// CRL; new streams see the new `[[expose]]` rules and `[limits]`.
    /// Streams already open keep going under the rules they were admitted
    /// by. Peers and forwards follow the new config: a peer added is
    /// dialled, one removed stops being dialled and its connections close
    /// ([`ConnectionCode::Removed`](meshtun_proto::ConnectionCode::Removed)) once their streams end, one with a new
    /// address is re-dialled there; a forward added listens, one removed
    /// stops accepting (its connections carry on), one with a new peer or
    /// service sends new connections there.
    ///
    /// Settings bound or set up once (`node`, `[quic]`, `[admin]`, the
    /// buffer budget, threads and shards, `[overlay]` except its `allow`,
    /// `[guard]`) are not reloadable: if any changed, nothing is applied
    /// and the error names them. Nor is anything applied if a new
    /// forward's port cannot be bound.
    pub fn reload(
        &self,
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<(), ReloadError> {
        let result = self.apply(config, credentials, trust);
        match &result {
            Ok(()) => {
                // Counted before the sweep, so whoever sees a connection
                // cut by this reload also sees the reload in `/status`.
                self.record_reload(None);
                self.drop_untrusted();
            }
            Err(error) => self.record_reload(Some(error.to_string())),
        }
        result
    }

    /// Records a reload that failed before the node saw new material (an
    /// unreadable file, a config error), for `/status` and the metrics.
    pub fn reload_failed(&self, error: &str) {
        self.record_reload(Some(error.to_owned()));
    }

    fn apply(
        &self,
        config: Config,
        credentials: NodeCredentials,
        trust: TrustBundle,
    ) -> Result<(), ReloadError> {
        let mut current = self
            .config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = restart_only_changes(&current, &config);
        if !changed.is_empty() {
            return Err(ReloadError::NeedsRestart(changed));
        }
        // Build everything first, so a failure applies nothing.
        let server = endpoint::server_config(&config.quic, &trust, &credentials)?;
        let mut clients = Vec::new();
        for peer in &config.peers {
            let client = endpoint::client_config(&config.quic, &trust, &credentials, &peer.name)?;
            clients.push((peer, client));
        }
        let mut forwards = self.running_forwards();
        let added_forwards = self.bind_new_forwards(&forwards, &config)?;
        // The trust state first: a handshake completing from here on is
        // checked against it once tracked, and anything tracked before is
        // swept once the reload is counted (`reload`).
        *self
            .shared
            .trust
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(trust);
        for listener in &self.listeners {
            listener.set_server_config(Some(server.clone()));
        }
        // A new certificate of this node: dialers replace their
        // connections, so peers never hold one made with the old
        // certificate when it expires.
        let renewed = self.shared.facts().certificate.fingerprint != credentials.fingerprint();
        let peers = self.apply_peers(&config, clients, credentials.not_after(), renewed);
        self.apply_forwards(&mut forwards, &config, &peers, added_forwards);
        if let Some(routes) = &self.routes {
            routes.replace(overlay_routes(&config, &peers));
        }
        self.shared
            .carrier
            .policy
            .replace(Policy::from_config(&config));
        self.shared
            .metrics()
            .set_certificate_expiry(meshtun_pki::unix_seconds(credentials.not_after()));
        {
            let mut facts = self.shared.facts();
            facts.certificate = certificate_status(&credentials);
            facts.exposes = expose_statuses(&config.exposes);
            facts.forwards = forward_statuses(&forwards);
            if let Some(overlay) = &mut facts.overlay {
                overlay.peers = overlay_peers(&config);
            }
        }
        *current = config;
        Ok(())
    }

    /// Checks that every forward in `config` names one of its peers, and
    /// binds the listeners of those not running yet (a `listen` no running
    /// forward has), before anything changes: a port in use fails the
    /// whole reload.
    fn bind_new_forwards(
        &self,
        running: &[RunningForward],
        config: &Config,
    ) -> Result<Vec<(ForwardConfig, Vec<TcpListener>, SocketAddr)>, NodeError> {
        let handles: Vec<_> = self
            .shared
            .carrier
            .shards
            .iter()
            .map(|shard| shard.handle.clone())
            .collect();
        let mut bound = Vec::new();
        for forward in &config.forwards {
            if !config.peers.iter().any(|peer| peer.name == forward.peer) {
                return Err(NodeError::UndeclaredPeer {
                    listen: forward.listen,
                    peer: forward.peer.clone(),
                });
            }
            if running
                .iter()
                .any(|running| running.config.listen == forward.listen)
            {
                continue;
            }
            let (listeners, local) = bind_tcp_group("forward listener", forward.listen, &handles)?;
            bound.push((forward.clone(), listeners, local));
        }
        Ok(bound)
    }

    /// Brings the dialled peers in line with `config`: new TLS for all (a
    /// new address replaces a peer's connections), dialers for a peer
    /// added, and a removed peer's dialers stopped, its connections closing
    /// once their streams end. Returns the peers now configured.
    fn apply_peers(
        &self,
        config: &Config,
        clients: Vec<(&Peer, quinn::ClientConfig)>,
        own_not_after: SystemTime,
        renewed: bool,
    ) -> BTreeMap<NodeName, Arc<PeerLinks>> {
        let connections = config.quic.connections_per_peer.get();
        let mut added = Vec::new();
        let mut map = self
            .shared
            .peers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (peer, client) in clients {
            let tls = peer::DialTls {
                client,
                own_not_after,
            };
            match map.configured.get(&peer.name) {
                Some(links) => {
                    links.set_client(tls, renewed);
                    if links.set_addr(&peer.addr) {
                        info!(peer = %peer.name, addr = %peer.addr, "peer address changed: its connections are replaced, and the old ones close once their streams end");
                    }
                }
                None => {
                    let links = peer_links(
                        peer,
                        self.shared.carrier.shards.len(),
                        connections,
                        tls,
                        self.shared.metrics(),
                        &self.shared.trust,
                        &self.shared.stop_accepting,
                    );
                    map.configured.insert(peer.name.clone(), links.clone());
                    added.push(links);
                }
            }
        }
        let gone: Vec<NodeName> = map
            .configured
            .keys()
            .filter(|name| !config.peers.iter().any(|peer| &peer.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(links) = map.configured.remove(&name) {
                info!(peer = %name, "peer removed: no more dials; its connections close once their streams end");
                links.remove();
                map.departing.push(links);
            }
        }
        let peers = map.configured.clone();
        drop(map);
        for links in added {
            info!(peer = %links.name(), addr = %links.addr(), "peer added");
            spawn_dialers(
                &self.shared,
                &links,
                &self.dialers,
                self.timing,
                connections,
            );
        }
        peers
    }

    /// Brings the running forwards in line with `config`: a removed one
    /// stops accepting (its open connections carry on), one with a new
    /// peer or service sends new connections there, and the `added` ones
    /// (bound by [`Node::bind_new_forwards`]) start.
    fn apply_forwards(
        &self,
        forwards: &mut Vec<RunningForward>,
        config: &Config,
        peers: &BTreeMap<NodeName, Arc<PeerLinks>>,
        added: Vec<(ForwardConfig, Vec<TcpListener>, SocketAddr)>,
    ) {
        let mut loops = self
            .loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        forwards.retain_mut(|running| {
            let listen = running.config.listen;
            let Some(wanted) = config.forwards.iter().find(|f| f.listen == listen) else {
                info!(listen = %running.local, peer = %running.config.peer, service = %running.config.service, "forward removed: its listener closes; connections already open carry on");
                loops.retain(|accept| accept.forward != Some(listen));
                running.stop.cancel();
                return false;
            };
            if *wanted != running.config {
                match forward_route(wanted, peers) {
                    Ok(route) => {
                        info!(listen = %running.local, peer = %wanted.peer, service = %wanted.service, "forward changed: new connections go to the new peer and service");
                        running.target.set(route);
                        running.config = wanted.clone();
                    }
                    // `bind_new_forwards` checked every forward's peer.
                    Err(error) => warn!(%error, "forward left as it was"),
                }
            }
            true
        });
        for (forward, listeners, local) in added {
            match forward_route(&forward, peers) {
                Ok(route) => {
                    let running = RunningForward {
                        config: forward,
                        local,
                        target: Arc::new(opener::Target::new(route)),
                        stop: self.shared.stop_accepting.child_token(),
                    };
                    loops.extend(spawn_forward(&self.shared, listeners, &running));
                    forwards.push(running);
                }
                Err(error) => warn!(%error, "forward not started"),
            }
        }
        // In config order, as `forward_addrs` and `/status` list them.
        forwards.sort_by_key(|running| {
            config
                .forwards
                .iter()
                .position(|forward| forward.listen == running.config.listen)
        });
    }

    /// Closes every live connection whose peer certificate the trust in
    /// force no longer accepts (a new CRL revoked it, or its CA left the
    /// bundle). New handshakes are refused by the new TLS configs already;
    /// this ends what was admitted under the old ones. Returns how many
    /// were closed.
    fn drop_untrusted(&self) -> usize {
        let trust = &self.shared.trust;
        let mut closed = 0;
        for (name, connection, dialled) in self.shared.live_connections() {
            let role = match &dialled {
                Some(peer) => PeerRole::Acceptor(peer),
                None => PeerRole::Dialer,
            };
            let stats = self.shared.metrics().peer(&name);
            if !still_trusted(&connection, trust, role, &stats) {
                closed += 1;
            }
        }
        closed
    }

    fn record_reload(&self, error: Option<String>) {
        let result = if error.is_some() {
            "failure"
        } else {
            "success"
        };
        self.shared.metrics().reload(result);
        let mut facts = self.shared.facts();
        facts.last_reload_unix = Some(unix_now());
        facts.last_reload_error = error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn overlay_allow_reloads_the_rest_of_overlay_needs_a_restart() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        if let Some(overlay) = &mut new.overlay {
            overlay.allow.clear();
        }
        assert!(restart_only_changes(&old, &new).is_empty());
        if let Some(overlay) = &mut new.overlay {
            overlay.manage = !overlay.manage;
        }
        assert_eq!(
            restart_only_changes(&old, &new),
            ["[overlay] (except allow)"]
        );
        new.overlay = None;
        assert_eq!(
            restart_only_changes(&old, &new),
            ["[overlay] (except allow)"]
        );
    }

    #[test]
    fn peers_and_forwards_reload_quic_and_admin_need_a_restart() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        new.peers.reverse();
        new.peers.pop();
        new.forwards.clear();
        new.exposes.clear();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.quic.idle_timeout *= 2;
        new.admin = None;
        assert_eq!(restart_only_changes(&old, &new), ["[quic]", "[admin]"]);
    }

    #[test]
    fn limits_reload_except_the_buffer_budget_and_threads() {
        let old = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        let mut new = old.clone();
        new.limits.pending_streams_per_peer = 1;
        new.limits.handshakes = 1;
        new.limits.retry_above = 0;
        new.limits.accept_backoff_max = Duration::from_secs(5);
        assert!(restart_only_changes(&old, &new).is_empty());
        new.limits.buffer_memory *= 2;
        assert_eq!(restart_only_changes(&old, &new), ["limits.buffer_memory"]);
        new.limits.worker_threads = std::num::NonZeroUsize::new(1);
        assert_eq!(
            restart_only_changes(&old, &new),
            ["limits.buffer_memory", "limits.worker_threads"]
        );
        new.limits.shards = std::num::NonZeroUsize::new(1);
        assert_eq!(
            restart_only_changes(&old, &new),
            [
                "limits.buffer_memory",
                "limits.worker_threads",
                "limits.shards"
            ]
        );
    }
}
