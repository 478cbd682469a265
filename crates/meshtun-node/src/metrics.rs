//! The node's counters, exported at `/metrics` in the OpenMetrics text
//! format (which Prometheus scrapes natively) and summarized at `/status`.
//!
//! Counters live in a `prometheus-client` registry. Hot paths never look a
//! label set up: each peer's handles are resolved once ([`PeerStats`]) and
//! every update after that is one relaxed atomic add. Values that are a
//! property of live state (connections up, RTT) are not tracked at all; they
//! are read off the connections when a scrape asks ([`Metrics::encode`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshtun_proto::{NodeName, StatusCode, StreamCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::throttle::Throttle;

/// Which end of a connection or stream this node is: the label values
/// say it as a direction, which dashboards already scrape.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub(crate) enum Direction {
    /// This node is the opener: it dialled the connection and opens the
    /// streams (a forward, or the overlay).
    outgoing,
    /// This node is the acceptor (an expose, or an overlay port).
    incoming,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirectionLabels {
    peer: String,
    direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    peer: String,
    direction: Direction,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CutLabels {
    peer: String,
    reason: &'static str,
}

/// A closed set of label values, as [`label_values!`] makes them.
pub(crate) trait LabelValue: Copy + 'static {
    /// Every value, in the order `/status` lists them.
    const ALL: &'static [Self];
    /// The label value.
    fn as_str(self) -> &'static str;
}

/// A closed set of label values: the enum, its one list (`ALL`), and each
/// value's label. `/metrics` and `/status` both read `ALL`, so a reason
/// counted is a reason shown.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
        pub(crate) enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl LabelValue for $name {
            const ALL: &'static [$name] = &[$($name::$variant,)+];

            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

label_values! {
    /// The node-wide limits counted in `meshtun_limit_hits_total`, by
    /// config key.
    NodeLimit {
        /// `limits.handshakes`: incoming handshakes in progress.
        Handshakes => "handshakes",
        /// `limits.connections_per_peer`.
        ConnectionsPerPeer => "connections_per_peer",
        /// `limits.buffer_memory`: the TCP read buffer budget.
        BufferMemory => "buffer_memory",
        /// The process's file descriptor limit.
        OpenFiles => "open_files",
    }
}

label_values! {
    /// Why a live connection was cut because its peer's certificate lost
    /// trust.
    CutReason {
        /// The certificate is past its notAfter.
        Expired => "expired",
        /// A CRL lists it.
        Revoked => "revoked",
        /// Anything else: no longer chains to the trust bundle.
        Untrusted => "untrusted",
    }
}

label_values! {
    /// Why a stream never reached its target. The acceptor's status codes
    /// first, then the opener's own failures before any status.
    RefusalReason {
        /// No such service on the acceptor.
        UnknownService => "unknown_service",
        /// The policy does not let this peer in.
        Forbidden => "forbidden",
        /// The target refused the TCP connection.
        Refused => "refused",
        /// The target could not be reached.
        Unreachable => "unreachable",
        /// The preamble was malformed.
        BadPreamble => "bad_preamble",
        /// The acceptor is draining.
        Unavailable => "unavailable",
        /// Any other status code.
        Other => "other",
        /// No connection to the peer.
        NotConnected => "not_connected",
        /// The peer granted no stream in time.
        NoStreamCredit => "no_stream_credit",
        /// The preamble did not arrive in time.
        PreambleTimeout => "preamble_timeout",
        /// The per-peer stream limit.
        StreamLimit => "stream_limit",
        /// The per-peer limit of streams waiting for their target.
        PendingLimit => "pending_limit",
    }
}

impl From<StatusCode> for RefusalReason {
    fn from(code: StatusCode) -> Self {
        match code {
            StatusCode::UnknownService => Self::UnknownService,
            StatusCode::Forbidden => Self::Forbidden,
            StatusCode::Refused => Self::Refused,
            StatusCode::Unreachable => Self::Unreachable,
            StatusCode::BadPreamble => Self::BadPreamble,
            StatusCode::Unavailable => Self::Unavailable,
            // An `ok` never refuses a stream; were one counted, it shows as
            // `other` rather than not at all.
            StatusCode::Ok | StatusCode::Other(_) => Self::Other,
        }
    }
}

impl From<StreamCode> for RefusalReason {
    /// The per-peer limit an acceptor reset a stream at (see
    /// `splice::Failure::limit`).
    fn from(code: StreamCode) -> Self {
        match code {
            StreamCode::PendingLimit => Self::PendingLimit,
            _ => Self::StreamLimit,
        }
    }
}

label_values! {
    /// Why a QUIC handshake failed.
    HandshakeReason {
        /// Not complete within `quic.handshake_timeout`.
        Timeout => "timeout",
        /// A TLS alert: certificate refused, wrong CA, bad ALPN.
        Tls => "tls",
        /// Closed by the other side.
        Rejected => "rejected",
        /// The peer's certificate names no usable node.
        NoIdentity => "no_identity",
        /// The acceptor's welcome never came or was garbled.
        NoWelcome => "no_welcome",
        /// The peer's address did not resolve.
        Resolve => "resolve",
        /// This side closed it, or could not start it.
        Local => "local",
        /// A stateless reset.
        Reset => "reset",
        /// Anything else.
        Other => "other",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The labels of a family with one unlabelled member, used where a metric
/// must be able to have no sample at all (rather than a false 0).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct NoLabels;

impl prometheus_client::encoding::EncodeLabelSet for NoLabels {
    fn encode(
        &self,
        _encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), fmt::Error> {
        Ok(())
    }
}

/// Every metric the node exports.
pub(crate) struct Metrics {
    registry: Registry,
    /// The per-peer families; each peer's handles come from these.
    peer: PeerFamilies,
    certificate_expiry: Gauge,
    reloads: Family<ResultLabels, Counter>,
    renewals: Family<ResultLabels, Counter>,
    /// When the next renewal attempt starts; no sample when renewal is
    /// off or an attempt runs.
    renewal_next: Family<NoLabels, Gauge>,
    cut: Family<CutLabels, Counter>,
    limit_hits: Family<LimitLabels, Counter>,
    limit_log: Throttle<NodeLimit>,
    /// Which failed incoming handshakes are logged at warn, by reason.
    handshake_log: Throttle<HandshakeReason>,
    retries: Counter,
    /// Packets the overlay guard dropped, as nftables counted them. A
    /// family without labels, so it has no sample until the daemon could
    /// read the counter: a missing figure, never a false zero.
    overlay_bypass_dropped: Family<NoLabels, Counter>,
    /// Bytes of TCP read buffers held by streams now.
    pub(crate) buffer_bytes: Gauge,
    /// Handles per peer, so the hot path and `/status` never search the
    /// families. Grows by one entry per peer identity ever seen.
    peers: Mutex<BTreeMap<NodeName, Arc<PeerStats>>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The per-peer metric families, registered first.
struct PeerFamilies {
    connections: Family<PeerDirectionLabels, Gauge>,
    rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    sent: Family<PeerLabels, Counter>,
    received: Family<PeerLabels, Counter>,
    streams: Family<PeerDirectionLabels, Counter>,
    streams_open: Family<PeerDirectionLabels, Gauge>,
    refused: Family<ReasonLabels, Counter>,
    handshakes_failed: Family<ReasonLabels, Counter>,
    reconnects: Family<PeerLabels, Counter>,
}

impl PeerFamilies {
    fn register(registry: &mut Registry) -> Self {
        let connections = Family::default();
        registry.register(
            "peer_connections",
            "QUIC connections to the peer that are up, by who dialled",
            Family::clone(&connections),
        );
        let rtt = Family::default();
        registry.register_with_unit(
            "peer_rtt",
            "Smoothed round-trip time of the best connection to the peer",
            Unit::Seconds,
            Family::clone(&rtt),
        );
        let sent = Family::default();
        registry.register_with_unit(
            "peer_sent",
            "Stream payload bytes sent to the peer",
            Unit::Bytes,
            Family::clone(&sent),
        );
        let received = Family::default();
        registry.register_with_unit(
            "peer_received",
            "Stream payload bytes received from the peer",
            Unit::Bytes,
            Family::clone(&received),
        );
        let streams = Family::default();
        registry.register(
            "peer_streams",
            "Forwarded TCP connections (QUIC streams), by who opened them",
            Family::clone(&streams),
        );
        let streams_open = Family::default();
        registry.register(
            "peer_open_streams",
            "Forwarded TCP connections open now, by who opened them",
            Family::clone(&streams_open),
        );
        let refused = Family::default();
        registry.register(
            "peer_streams_refused",
            "Streams that never reached their target, by reason; outgoing = refused to this node, incoming = refused by it",
            Family::clone(&refused),
        );
        let handshakes_failed = Family::default();
        registry.register(
            "peer_handshakes_failed",
            "QUIC handshakes that failed, by reason; incoming ones carry peer=\"\" as the peer is not yet known",
            Family::clone(&handshakes_failed),
        );
        let reconnects = Family::default();
        registry.register(
            "peer_reconnects",
            "Times a dialled connection to the peer came back after it was lost",
            Family::clone(&reconnects),
        );
        Self {
            connections,
            rtt,
            sent,
            received,
            streams,
            streams_open,
            refused,
            handshakes_failed,
            reconnects,
        }
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("meshtun");
        let peer = PeerFamilies::register(&mut registry);
        let certificate_expiry = Gauge::default();
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When this node's certificate expires (Unix time)",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Configuration and certificate reloads, by result",
            Family::clone(&reloads),
        );
        let renewals = Family::default();
        registry.register(
            "certificate_renewals",
            "Attempts of this node to renew its own certificate ([tls] renew), by result",
            Family::clone(&renewals),
        );
        let renewal_next = Family::default();
        registry.register_with_unit(
            "certificate_renewal_next_timestamp",
            "When this node next tries to renew its certificate (Unix time; absent when renewal is off or running)",
            Unit::Seconds,
            Family::clone(&renewal_next),
        );
        let cut = Family::default();
        registry.register(
            "peer_connections_cut",
            "Live connections closed because the peer's certificate lost trust: expired, revoked (a new CRL) or untrusted (its CA left the bundle)",
            Family::clone(&cut),
        );
        let limit_hits = Family::default();
        registry.register(
            "limit_hits",
            "Times a limit refused or delayed something, by the limit's config key",
            Family::clone(&limit_hits),
        );
        let retries = Counter::default();
        registry.register(
            "incoming_retries",
            "New QUIC clients asked to prove their address (Retry) because many handshakes were in progress",
            retries.clone(),
        );
        let overlay_bypass_dropped = Family::default();
        registry.register(
            "overlay_bypass_dropped",
            "Packets from off this node that meshtun's guards dropped: for its overlay address or prefix, or to its [guard] ports (read from nftables; absent while unreadable)",
            Family::clone(&overlay_bypass_dropped),
        );
        let buffer_bytes = Gauge::default();
        registry.register_with_unit(
            "stream_buffer",
            "Memory held in TCP read buffers of forwarded streams now (limited by limits.buffer_memory)",
            Unit::Bytes,
            buffer_bytes.clone(),
        );
        registry.register(
            "build",
            "The running meshtun version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Self {
            registry,
            peer,
            certificate_expiry,
            reloads,
            renewals,
            renewal_next,
            cut,
            limit_hits,
            limit_log: Throttle::new(LIMIT_LOG_PERIOD),
            handshake_log: Throttle::new(HANDSHAKE_LOG_PERIOD),
            retries,
            overlay_bypass_dropped,
            buffer_bytes,
            peers: Mutex::new(BTreeMap::new()),
        }
    }

    /// The handles for `peer`, created on first use.
    pub(crate) fn peer(&self, peer: &NodeName) -> Arc<PeerStats> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        peers
            .entry(peer.clone())
            .or_insert_with(|| Arc::new(self.new_peer(peer)))
            .clone()
    }

    /// Every peer seen so far with its handles.
    pub(crate) fn peers(&self) -> Vec<(NodeName, Arc<PeerStats>)> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        peers
            .iter()
            .map(|(name, stats)| (name.clone(), stats.clone()))
            .collect()
    }

    fn new_peer(&self, peer: &NodeName) -> PeerStats {
        let labels = PeerLabels {
            peer: peer.to_string(),
        };
        let by_direction = |direction| PeerDirectionLabels {
            peer: peer.to_string(),
            direction,
        };
        let outgoing = by_direction(Direction::outgoing);
        let incoming = by_direction(Direction::incoming);
        PeerStats {
            name: peer.to_string(),
            sent: self.peer.sent.get_or_create_owned(&labels),
            received: self.peer.received.get_or_create_owned(&labels),
            streams: [
                self.peer.streams.get_or_create_owned(&outgoing),
                self.peer.streams.get_or_create_owned(&incoming),
            ],
            open: [
                self.peer.streams_open.get_or_create_owned(&outgoing),
                self.peer.streams_open.get_or_create_owned(&incoming),
            ],
            connections: [
                self.peer.connections.get_or_create_owned(&outgoing),
                self.peer.connections.get_or_create_owned(&incoming),
            ],
            rtt: self.peer.rtt.get_or_create_owned(&labels),
            reconnects: self.peer.reconnects.get_or_create_owned(&labels),
            refused: self.peer.refused.clone(),
            handshakes_failed: self.peer.handshakes_failed.clone(),
            cut: self.cut.clone(),
            refusal_log: Throttle::new(REFUSAL_LOG_PERIOD),
            pending: AtomicU32::new(0),
        }
    }

    /// Counts a failed incoming handshake, whose peer is not known, and
    /// returns the log verdict, as [`Metrics::limit_hit`] does: one warn
    /// line per reason every [`HANDSHAKE_LOG_PERIOD`], node-wide. Anyone
    /// who can reach the QUIC port can make handshakes fail as fast as it
    /// can send; every failure is counted, few are logged.
    pub(crate) fn incoming_handshake_failed(&self, reason: HandshakeReason) -> Option<u64> {
        self.peer
            .handshakes_failed
            .get_or_create(&ReasonLabels {
                peer: String::new(),
                direction: Direction::incoming,
                reason: reason.as_str(),
            })
            .inc();
        self.handshake_log.admit(reason)
    }

    /// Failed incoming handshakes by reason (only reasons seen).
    pub(crate) fn incoming_handshakes_failed(&self) -> BTreeMap<&'static str, u64> {
        count_reasons::<HandshakeReason>(&self.peer.handshakes_failed, "", Direction::incoming)
    }

    /// Counts a hit of `limit`, and returns the log verdict, as
    /// [`PeerStats::refused`] does: one info line per limit every
    /// [`LIMIT_LOG_PERIOD`].
    pub(crate) fn limit_hit(&self, limit: NodeLimit) -> Option<u64> {
        self.limit_hits
            .get_or_create(&LimitLabels {
                limit: limit.as_str(),
            })
            .inc();
        self.limit_log.admit(limit)
    }

    /// How often `limit` was hit.
    pub(crate) fn limit_hits(&self, limit: NodeLimit) -> u64 {
        self.limit_hits
            .get(&LimitLabels {
                limit: limit.as_str(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Counts a Retry sent to a new client.
    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    /// Records the guard's drop counter as nftables reports it (it starts
    /// again from 0 when the table is loaded anew, which scrapers read as
    /// a counter reset).
    pub(crate) fn set_overlay_bypass_dropped(&self, packets: u64) {
        self.overlay_bypass_dropped
            .get_or_create(&NoLabels)
            .inner()
            .store(packets, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops the figure: it could not be read, so none is shown as current.
    pub(crate) fn forget_overlay_bypass_dropped(&self) {
        self.overlay_bypass_dropped.remove(&NoLabels);
    }

    /// The guard's drop counter as last read, if it was.
    pub(crate) fn overlay_bypass_dropped(&self) -> Option<u64> {
        self.overlay_bypass_dropped
            .get(&NoLabels)
            .map(|counter| counter.get())
    }

    pub(crate) fn set_certificate_expiry(&self, unix_seconds: i64) {
        self.certificate_expiry.set(unix_seconds);
    }

    pub(crate) fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Brings the renewal metrics to what `renewal` says (counts since
    /// start only grow).
    pub(crate) fn set_renewal(&self, renewal: Option<&crate::RenewalStatus>) {
        let Some(renewal) = renewal else {
            self.renewal_next.remove(&NoLabels);
            return;
        };
        for (result, count) in [
            ("success", renewal.successes),
            ("failure", renewal.failures),
        ] {
            let counter = self.renewals.get_or_create(&ResultLabels { result });
            let seen = counter.get();
            if count > seen {
                counter.inc_by(count - seen);
            }
        }
        match renewal.next_attempt_unix {
            Some(at) => {
                self.renewal_next.get_or_create(&NoLabels).set(at);
            }
            None => {
                self.renewal_next.remove(&NoLabels);
            }
        }
    }

    pub(crate) fn reloads(&self, result: &'static str) -> u64 {
        self.reloads
            .get(&ResultLabels { result })
            .map_or(0, |counter| counter.get())
    }

    /// The registry in OpenMetrics text.
    pub(crate) fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The counts of `family` for `peer` and `direction` by every reason of
/// `R`, leaving out those never counted.
fn count_reasons<R: LabelValue>(
    family: &Family<ReasonLabels, Counter>,
    peer: &str,
    direction: Direction,
) -> BTreeMap<&'static str, u64> {
    R::ALL
        .iter()
        .filter_map(|&reason| {
            let labels = ReasonLabels {
                peer: peer.to_owned(),
                direction,
                reason: reason.as_str(),
            };
            let count = family.get(&labels).map_or(0, |counter| counter.get());
            (count > 0).then_some((reason.as_str(), count))
        })
        .collect()
}

/// One peer's metric handles. Cheap to update from any task.
pub(crate) struct PeerStats {
    name: String,
    /// Payload bytes this node sent to the peer, over all streams.
    pub(crate) sent: Counter,
    /// Payload bytes received from the peer.
    pub(crate) received: Counter,
    streams: [Counter; 2],
    open: [Gauge; 2],
    connections: [Gauge; 2],
    rtt: Gauge<f64, AtomicU64>,
    reconnects: Counter,
    refused: Family<ReasonLabels, Counter>,
    handshakes_failed: Family<ReasonLabels, Counter>,
    cut: Family<CutLabels, Counter>,
    /// Which refusals are logged at info.
    refusal_log: Throttle<RefusalKind>,
    /// Incoming streams not yet answered (`limits.pending_streams_per_peer`).
    pending: AtomicU32,
}

/// A kind of refusal: who refused, and why.
type RefusalKind = (Direction, RefusalReason);

/// At most one info line per kind of refusal and peer in this period; the
/// rest go to debug, and every one is counted in the metrics.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(60);

/// At most one info line per node-wide limit in this period; a flood is
/// worth hearing about more often than a refused peer.
const LIMIT_LOG_PERIOD: Duration = Duration::from_secs(10);

/// At most one warn line per reason of failed incoming handshakes in this
/// period: a client that reconnects every few milliseconds with a
/// certificate this node refuses is worth hearing about, not thousands of
/// times.
const HANDSHAKE_LOG_PERIOD: Duration = LIMIT_LOG_PERIOD;

impl fmt::Debug for PeerStats {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PeerStats")
            .field("peer", &self.name)
            .finish_non_exhaustive()
    }
}

/// A snapshot of one peer's counters, for `/status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerCounts {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) streams: [u64; 2],
    pub(crate) open: [i64; 2],
    pub(crate) reconnects: u64,
    pub(crate) refused: [BTreeMap<&'static str, u64>; 2],
    pub(crate) handshakes_failed: BTreeMap<&'static str, u64>,
    pub(crate) cut: BTreeMap<&'static str, u64>,
}

impl PeerStats {
    /// Counts a stream and holds it open until the guard drops.
    pub(crate) fn stream(self: &Arc<Self>, direction: Direction) -> OpenStream {
        self.streams[direction as usize].inc();
        let before = self.open[direction as usize].inc();
        OpenStream {
            stats: self.clone(),
            direction,
            before,
        }
    }

    /// Counts an incoming stream as not yet answered until the guard drops;
    /// also returns how many were pending before it.
    pub(crate) fn pending(self: &Arc<Self>) -> (Pending, u32) {
        let before = self.pending.fetch_add(1, Ordering::Relaxed);
        (
            Pending {
                stats: self.clone(),
            },
            before,
        )
    }

    /// Counts a refused stream. Returns `Some(n)` if this one should be
    /// logged at info, `n` being how many like it went to debug since the
    /// last info line; `None` means log it at debug. A peer or a client
    /// retrying a forbidden service cannot flood the log this way.
    pub(crate) fn refused(&self, direction: Direction, reason: RefusalReason) -> Option<u64> {
        self.refused
            .get_or_create(&ReasonLabels {
                peer: self.name.clone(),
                direction,
                reason: reason.as_str(),
            })
            .inc();
        self.refusal_log.admit((direction, reason))
    }

    pub(crate) fn handshake_failed(&self, reason: HandshakeReason) {
        self.handshakes_failed
            .get_or_create(&ReasonLabels {
                peer: self.name.clone(),
                direction: Direction::outgoing,
                reason: reason.as_str(),
            })
            .inc();
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Records the live state read off the connections at scrape time.
    pub(crate) fn set_live(&self, outgoing: usize, incoming: usize, rtt: Option<f64>) {
        self.connections[Direction::outgoing as usize].set(saturating_i64(outgoing));
        self.connections[Direction::incoming as usize].set(saturating_i64(incoming));
        // No connection, no RTT: NaN is how OpenMetrics says "unknown".
        self.rtt.set(rtt.unwrap_or(f64::NAN));
    }

    pub(crate) fn counts(&self) -> PeerCounts {
        let refused =
            |direction| count_reasons::<RefusalReason>(&self.refused, &self.name, direction);
        PeerCounts {
            sent: self.sent.get(),
            received: self.received.get(),
            streams: [self.streams[0].get(), self.streams[1].get()],
            open: [self.open[0].get(), self.open[1].get()],
            reconnects: self.reconnects.get(),
            refused: [refused(Direction::outgoing), refused(Direction::incoming)],
            handshakes_failed: count_reasons::<HandshakeReason>(
                &self.handshakes_failed,
                &self.name,
                Direction::outgoing,
            ),
            cut: CutReason::ALL
                .iter()
                .filter_map(|reason| {
                    let labels = CutLabels {
                        peer: self.name.clone(),
                        reason: reason.as_str(),
                    };
                    let count = self.cut.get(&labels).map_or(0, |counter| counter.get());
                    (count > 0).then_some((reason.as_str(), count))
                })
                .collect(),
        }
    }

    /// Counts a live connection cut because the peer's certificate lost
    /// trust.
    pub(crate) fn connection_cut(&self, reason: CutReason) {
        self.cut
            .get_or_create(&CutLabels {
                peer: self.name.clone(),
                reason: reason.as_str(),
            })
            .inc();
    }
}

fn saturating_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// An open stream, counted in `meshtun_peer_open_streams` until dropped.
#[derive(Debug)]
pub(crate) struct OpenStream {
    stats: Arc<PeerStats>,
    direction: Direction,
    /// Streams of this peer and direction that were open before this one.
    before: i64,
}

impl OpenStream {
    pub(crate) fn stats(&self) -> &PeerStats {
        &self.stats
    }

    /// Streams of this peer and direction that were open before this one.
    pub(crate) fn open_before(&self) -> i64 {
        self.before
    }
}

/// An incoming stream not yet answered; un-counted when dropped.
#[derive(Debug)]
pub(crate) struct Pending {
    stats: Arc<PeerStats>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.stats.open[self.direction as usize].dec();
    }
}

/// The label value for a QUIC connection error during a handshake.
pub(crate) fn handshake_reason(error: &quinn::ConnectionError) -> HandshakeReason {
    use quinn::ConnectionError;
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match error {
        ConnectionError::TimedOut => HandshakeReason::Timeout,
        ConnectionError::TransportError(error) if is_crypto(error.code) => HandshakeReason::Tls,
        ConnectionError::ConnectionClosed(close) if is_crypto(close.error_code) => {
            HandshakeReason::Tls
        }
        ConnectionError::ConnectionClosed(_) | ConnectionError::ApplicationClosed(_) => {
            HandshakeReason::Rejected
        }
        ConnectionError::Reset => HandshakeReason::Reset,
        ConnectionError::LocallyClosed | ConnectionError::CidsExhausted => HandshakeReason::Local,
        ConnectionError::VersionMismatch | ConnectionError::TransportError(_) => {
            HandshakeReason::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> NodeName {
        NodeName::new(text).unwrap()
    }

    #[test]
    fn peer_handles_are_shared_and_counted_once() {
        let metrics = Metrics::new();
        let first = metrics.peer(&name("node-1"));
        let second = metrics.peer(&name("node-1"));
        first.sent.inc_by(10);
        second.sent.inc_by(5);
        assert_eq!(metrics.peer(&name("node-1")).counts().sent, 15);
        assert_eq!(metrics.peers().len(), 1);
    }

    #[test]
    fn the_bypass_counter_has_no_sample_until_read_then_the_value_read() {
        let metrics = Metrics::new();
        let sample = |text: &str| {
            text.lines()
                .find(|line| line.starts_with("meshtun_overlay_bypass_dropped_total"))
                .map(str::to_owned)
        };
        let text = metrics.encode().unwrap();
        assert!(
            !text.contains("overlay_bypass_dropped"),
            "a figure nobody read must be absent: {text}"
        );
        assert_eq!(metrics.overlay_bypass_dropped(), None);
        metrics.set_overlay_bypass_dropped(7);
        metrics.set_overlay_bypass_dropped(42);
        assert_eq!(metrics.overlay_bypass_dropped(), Some(42));
        metrics.forget_overlay_bypass_dropped();
        assert_eq!(metrics.overlay_bypass_dropped(), None);
        assert!(!metrics.encode().unwrap().contains("overlay_bypass_dropped"));
        metrics.set_overlay_bypass_dropped(42);
        let text = metrics.encode().unwrap();
        assert_eq!(
            sample(&text).as_deref(),
            Some("meshtun_overlay_bypass_dropped_total 42"),
            "{text}"
        );
    }

    #[test]
    fn open_streams_fall_when_the_guard_drops() {
        let metrics = Metrics::new();
        let stats = metrics.peer(&name("node-1"));
        let guard = stats.stream(Direction::incoming);
        assert_eq!(stats.counts().open, [0, 1]);
        drop(guard);
        let counts = stats.counts();
        assert_eq!(counts.open, [0, 0]);
        assert_eq!(counts.streams, [0, 1]);
    }

    #[test]
    fn repeated_refusals_are_logged_once_per_period_and_all_counted() {
        let metrics = Metrics::new();
        let stats = metrics.peer(&name("node-1"));
        assert_eq!(
            stats.refused(Direction::incoming, RefusalReason::Forbidden),
            Some(0)
        );
        for _ in 0..100 {
            assert_eq!(
                stats.refused(Direction::incoming, RefusalReason::Forbidden),
                None
            );
        }
        // Another reason or direction has its own budget.
        assert_eq!(
            stats.refused(Direction::outgoing, RefusalReason::Forbidden),
            Some(0)
        );
        assert_eq!(
            stats.refused(Direction::incoming, RefusalReason::Refused),
            Some(0)
        );
        let counts = stats.counts();
        assert_eq!(
            counts.refused[Direction::incoming as usize].get("forbidden"),
            Some(&101)
        );
    }

    #[test]
    fn node_limits_are_counted_every_time_and_logged_once_per_period() {
        let metrics = Metrics::new();
        assert_eq!(metrics.limit_hit(NodeLimit::Handshakes), Some(0));
        for _ in 0..9 {
            assert_eq!(metrics.limit_hit(NodeLimit::Handshakes), None);
        }
        assert_eq!(metrics.limit_hit(NodeLimit::OpenFiles), Some(0));
        assert_eq!(metrics.limit_hits(NodeLimit::Handshakes), 10);
        assert_eq!(metrics.limit_hits(NodeLimit::BufferMemory), 0);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("meshtun_limit_hits_total{limit=\"handshakes\"} 10"),
            "{text}"
        );
    }

    #[test]
    fn failed_incoming_handshakes_are_all_counted_and_logged_once_per_reason_and_period() {
        let metrics = Metrics::new();
        let admitted = (0..2000)
            .filter(|_| {
                metrics
                    .incoming_handshake_failed(HandshakeReason::Tls)
                    .is_some()
            })
            .count();
        assert_eq!(admitted, 1, "one warn line for 2000 failures of one reason");
        // Another reason has its own budget, and its own count.
        assert_eq!(
            metrics.incoming_handshake_failed(HandshakeReason::Timeout),
            Some(0)
        );
        assert_eq!(
            metrics.incoming_handshake_failed(HandshakeReason::Timeout),
            None
        );
        let counted = metrics.incoming_handshakes_failed();
        assert_eq!(counted.get("tls"), Some(&2000));
        assert_eq!(counted.get("timeout"), Some(&2));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "meshtun_peer_handshakes_failed_total{peer=\"\",direction=\"incoming\",reason=\"tls\"} 2000"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_reason_counted_is_a_reason_shown_under_its_old_label() {
        let labels = |all: &[&str]| all.join(",");
        assert_eq!(
            labels(
                &RefusalReason::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
            ),
            "unknown_service,forbidden,refused,unreachable,bad_preamble,unavailable,other,\
             not_connected,no_stream_credit,preamble_timeout,stream_limit,pending_limit"
        );
        assert_eq!(
            labels(
                &HandshakeReason::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
            ),
            "timeout,tls,rejected,no_identity,no_welcome,resolve,local,reset,other"
        );
        assert_eq!(
            labels(
                &CutReason::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
            ),
            "expired,revoked,untrusted"
        );
        assert_eq!(
            labels(
                &NodeLimit::ALL
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
            ),
            "handshakes,connections_per_peer,buffer_memory,open_files"
        );
        let metrics = Metrics::new();
        let stats = metrics.peer(&name("node-1"));
        for &reason in RefusalReason::ALL {
            stats.refused(Direction::incoming, reason);
        }
        for &reason in HandshakeReason::ALL {
            stats.handshake_failed(reason);
            metrics.incoming_handshake_failed(reason);
        }
        for &reason in CutReason::ALL {
            stats.connection_cut(reason);
        }
        // An `ok` status refusing a stream cannot happen; were one counted,
        // it would show as `other`, not vanish.
        stats.refused(Direction::outgoing, StatusCode::Ok.into());
        let counts = stats.counts();
        assert_eq!(counts.refused[1].len(), RefusalReason::ALL.len());
        assert_eq!(counts.refused[0].get("other"), Some(&1));
        assert_eq!(counts.handshakes_failed.len(), HandshakeReason::ALL.len());
        assert_eq!(counts.cut.len(), CutReason::ALL.len());
        assert_eq!(
            metrics.incoming_handshakes_failed().len(),
            HandshakeReason::ALL.len()
        );
    }

    #[test]
    fn pending_streams_are_counted_until_answered() {
        let metrics = Metrics::new();
        let stats = metrics.peer(&name("node-1"));
        let (first, before) = stats.pending();
        assert_eq!(before, 0);
        let (second, before) = stats.pending();
        assert_eq!(before, 1);
        drop(first);
        let (_third, before) = stats.pending();
        assert_eq!(before, 1);
        drop(second);
        let (_fourth, before) = stats.pending();
        assert_eq!(before, 1);
    }

    #[test]
    fn encoding_names_every_family_with_its_labels() {
        let metrics = Metrics::new();
        let stats = metrics.peer(&name("node-1"));
        stats.refused(Direction::incoming, RefusalReason::Forbidden);
        stats.received.inc_by(42);
        metrics.reload("success");
        let text = metrics.encode().unwrap();
        for expected in [
            "meshtun_peer_received_bytes_total{peer=\"node-1\"} 42",
            "meshtun_peer_streams_refused_total{peer=\"node-1\",direction=\"incoming\",reason=\"forbidden\"} 1",
            "meshtun_reloads_total{result=\"success\"} 1",
            "meshtun_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
        assert_eq!(
            stats.counts().refused[Direction::incoming as usize].get("forbidden"),
            Some(&1)
        );
    }
}
