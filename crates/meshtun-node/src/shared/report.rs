//! What the node reports: the `/metrics` text and the `/status` document.

use std::collections::BTreeMap;
use std::time::SystemTime;

use meshtun_proto::NodeName;
use quinn::Connection;

use super::Shared;
use crate::identity;
use crate::metrics::{Direction, LabelValue, NodeLimit};
use crate::status::{
    CertificateStatus, GuardStatus, NodeStatus, OverlayStatus, PeerCertificate, PeerStatus,
    ReloadStatus, ShardStatus,
};

impl Shared {
    /// The certificate in use, with the seconds left until it expires and
    /// its self-renewal.
    pub(crate) fn certificate(&self) -> CertificateStatus {
        let facts = self.facts();
        let mut certificate = facts.certificate.clone();
        certificate.expires_in_seconds = certificate.not_after_unix - unix_now();
        certificate.renewal = facts.renewal.clone();
        certificate
    }

    /// Reads live connection state into the gauges and returns it per peer;
    /// with `for_status`, also what each peer presented and the path MTU
    /// (for `/status` only: it parses certificates). The second part is
    /// each shard's (outgoing, incoming) connection count.
    fn refresh_live(&self, for_status: bool) -> (BTreeMap<NodeName, Live>, Vec<(usize, usize)>) {
        let mut live: BTreeMap<NodeName, Live> = BTreeMap::new();
        let mut per_shard = vec![(0, 0); self.carrier.shards.len()];
        for links in self.all_peers() {
            let entry = live.entry(links.name().clone()).or_default();
            for (shard, connection) in links.live_connections() {
                entry.outgoing += 1;
                entry.add(&connection, for_status);
                if let Some(counts) = per_shard.get_mut(shard) {
                    counts.0 += 1;
                }
            }
        }
        // Copied out, so no work happens under the lock that connection
        // set-up and tear-down take.
        let incoming: Vec<(NodeName, usize, Connection)> = {
            let incoming = self
                .incoming
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            incoming
                .iter()
                .flat_map(|(name, connections)| {
                    connections
                        .iter()
                        .map(|(shard, connection)| (name.clone(), *shard, connection.clone()))
                })
                .collect()
        };
        for (name, shard, connection) in incoming {
            if connection.close_reason().is_none() {
                let entry = live.entry(name).or_default();
                entry.incoming += 1;
                entry.add(&connection, for_status);
                if let Some(counts) = per_shard.get_mut(shard) {
                    counts.1 += 1;
                }
            }
        }
        for (name, stats) in self.metrics().peers() {
            let entry = live.get(&name);
            stats.set_live(
                entry.map_or(0, |live| live.outgoing),
                entry.map_or(0, |live| live.incoming),
                entry.and_then(|live| live.rtt),
            );
        }
        (live, per_shard)
    }

    /// The `/metrics` text: live gauges refreshed, then every family.
    pub(crate) fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.refresh_live(false);
        self.metrics().encode()
    }

    /// The `/status` document.
    pub(crate) fn status(&self) -> NodeStatus {
        let (live, per_shard) = self.refresh_live(true);
        let configured = self.peers();
        let mut peers = Vec::new();
        for (name, stats) in self.metrics().peers() {
            let empty = Live::default();
            let peer_live = live.get(&name).unwrap_or(&empty);
            let links = configured.get(&name);
            let counts = stats.counts();
            let named = |map: &BTreeMap<&'static str, u64>| {
                map.iter()
                    .map(|(reason, count)| ((*reason).to_owned(), *count))
                    .collect()
            };
            peers.push(PeerStatus {
                name: name.to_string(),
                addr: links.map(|links| links.addr().to_string()),
                connections_up: peer_live.outgoing,
                connections_configured: links.map_or(0, |links| links.slots()),
                connections_incoming: peer_live.incoming,
                rtt_ms: peer_live.rtt.map(|seconds| seconds * 1000.0),
                path_mtu: peer_live.path_mtu,
                certificates: peer_live
                    .certificates
                    .iter()
                    .map(|(serial, fingerprint)| PeerCertificate {
                        serial: serial.clone(),
                        fingerprint: fingerprint.clone(),
                    })
                    .collect(),
                sent_bytes: counts.sent,
                received_bytes: counts.received,
                streams_outgoing: counts.streams[Direction::outgoing as usize],
                streams_incoming: counts.streams[Direction::incoming as usize],
                open_streams: counts.open.iter().sum(),
                refused_outgoing: named(&counts.refused[Direction::outgoing as usize]),
                refused_incoming: named(&counts.refused[Direction::incoming as usize]),
                handshakes_failed: named(&counts.handshakes_failed),
                connections_cut: named(&counts.cut),
                reconnects: counts.reconnects,
                last_error: links.and_then(|links| links.last_error()),
            });
        }
        let certificate = self.certificate();
        let facts = self.facts();
        NodeStatus {
            node: self.node.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            quic_listen: facts.quic_listen,
            uptime_seconds: self.started.elapsed().as_secs(),
            draining: self.stop_accepting.is_cancelled(),
            worker_threads: tokio::runtime::Handle::try_current()
                .map_or(0, |runtime| runtime.metrics().num_workers()),
            shards: self
                .carrier
                .shards
                .iter()
                .zip(per_shard)
                .map(|(shard, (outgoing, incoming))| {
                    let (open_streams, streams) = shard.streams.counts();
                    ShardStatus {
                        index: shard.index,
                        dial_addr: shard.dial_addr,
                        connections_outgoing: outgoing,
                        connections_incoming: incoming,
                        open_streams,
                        streams,
                    }
                })
                .collect(),
            certificate,
            reload: ReloadStatus {
                successes: self.metrics().reloads("success"),
                failures: self.metrics().reloads("failure"),
                last_attempt_unix: facts.last_reload_unix,
                last_error: facts.last_reload_error.clone(),
            },
            peers,
            incoming_handshakes_failed: self
                .metrics()
                .incoming_handshakes_failed()
                .into_iter()
                .map(|(reason, count)| (reason.to_owned(), count))
                .collect(),
            limit_hits: NodeLimit::ALL
                .iter()
                .map(|&limit| (limit.as_str().to_owned(), self.metrics().limit_hits(limit)))
                .filter(|&(_, count)| count > 0)
                .collect(),
            forwards: facts.forwards.clone(),
            exposes: facts.exposes.clone(),
            overlay: facts.overlay.clone().map(|overlay| OverlayStatus {
                bypass_dropped: self.metrics().overlay_bypass_dropped(),
                ..overlay
            }),
            guard: facts.guard.clone().map(|guard| GuardStatus {
                bypass_dropped: self.metrics().overlay_bypass_dropped(),
                ..guard
            }),
        }
    }
}

/// A peer's live connections, read when `/metrics` or `/status` asks.
#[derive(Debug, Default)]
struct Live {
    /// Dialled connections up.
    outgoing: usize,
    /// Connections the peer dialled that are up.
    incoming: usize,
    /// The best smoothed RTT, seconds.
    rtt: Option<f64>,
    /// The largest current path MTU (UDP payload bytes), for `/status`.
    path_mtu: Option<u16>,
    /// The certificates the peer presented on them: (serial, fingerprint).
    certificates: std::collections::BTreeSet<(String, String)>,
}

impl Live {
    fn add(&mut self, connection: &Connection, for_status: bool) {
        let rtt = connection.rtt().as_secs_f64();
        self.rtt = Some(self.rtt.map_or(rtt, |best| best.min(rtt)));
        if !for_status {
            return;
        }
        let mtu = connection.stats().path.current_mtu;
        self.path_mtu = Some(self.path_mtu.map_or(mtu, |best| best.max(mtu)));
        if let Some(leaf) = identity::peer_chain(connection)
            .ok()
            .and_then(|chain| chain.first().cloned())
        {
            if let Ok(described) = meshtun_pki::serial_and_fingerprint(&leaf) {
                self.certificates.insert(described);
            }
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    meshtun_pki::unix_seconds(SystemTime::now())
}
