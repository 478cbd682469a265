//! From the parsed TOML table to a [`Config`], section by section and entry
//! by entry. Each check records its error and carries on, so one pass finds
//! every problem; cross-references (forward -> peer, listener overlaps) are
//! checked only between values that were themselves valid, so one mistake is
//! reported once, not again by everything that refers to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use meshtun_proto::{NodeName, ServiceName};
use toml::{Table, Value};

use crate::overlay::check_overlay_addresses;
use crate::read::{
    allow_list, boolean, duration_in, entries, found, host_port, integer_in, is_loopback,
    node_name, overlaps, path, service_name, size_in, socket_addr, string, Sink, TableReader,
    TOP_LEVEL_KEYS,
};
use crate::units::{format_duration, format_size, GIB, KIB, MIB};
use crate::{Admin, Config, ConfigErrors, Expose, Forward, Limits, Peer, Quic, Renew, Tls};

const QUIC_KEYS: &[&str] = &[
    "listen",
    "connections_per_peer",
    "idle_timeout",
    "keep_alive",
    "handshake_timeout",
    "max_streams_per_peer",
    "stream_window",
    "connection_window",
    "send_window",
    "udp_send_buffer",
    "udp_recv_buffer",
    "reconnect_min",
    "reconnect_max",
];
const TLS_KEYS: &[&str] = &["ca", "cert", "key", "crl", "renew"];
const RENEW_KEYS: &[&str] = &["server", "ca_fingerprint", "at"];
const PEER_KEYS: &[&str] = &["name", "addr", "overlay"];
const FORWARD_KEYS: &[&str] = &["listen", "peer", "service", "allow_non_loopback"];
const EXPOSE_KEYS: &[&str] = &["service", "target", "allow"];
const LIMITS_KEYS: &[&str] = &[
    "preamble_timeout",
    "connect_timeout",
    "drain_grace",
    "pending_streams_per_peer",
    "connections_per_peer",
    "handshakes",
    "retry_above",
    "accept_backoff_max",
    "buffer_memory",
    "worker_threads",
    "shards",
];
const ADMIN_KEYS: &[&str] = &["listen", "allow_non_loopback"];

const fn millis(count: u64) -> Duration {
    Duration::from_millis(count)
}

const fn seconds(count: u64) -> Duration {
    Duration::from_secs(count)
}

/// Builds the whole configuration, or every reason it cannot be built.
pub(crate) fn config(table: &Table) -> Result<Config, ConfigErrors> {
    let sink = &mut Sink::default();
    let root = TableReader::new(sink, String::new(), table, TOP_LEVEL_KEYS, "the top level");
    let node = root.required(
        sink,
        "node",
        "set node = \"<name>\" to this node's certificate identity, above the first [section] \
         (a key written below a [section] header belongs to that section)",
        node_name,
    );

    let empty = Table::new();
    let quic = section(&root, sink, "quic").and_then(|table| quic(sink, table.unwrap_or(&empty)));
    let tls = section(&root, sink, "tls").and_then(|table| tls(sink, table));
    let peers = peers(&root, sink, node.as_ref());
    // With a cluster manifest, a forward may name a node the manifest
    // declares: `load` checks those once it has added the manifest's.
    let with_cluster = root.get("cluster").is_some();
    let (forwards, mut listeners) = forwards(&root, sink, node.as_ref(), &peers, with_cluster);
    let (exposes, expose_paths) = exposes(&root, sink);
    let limits =
        section(&root, sink, "limits").and_then(|table| limits(sink, table.unwrap_or(&empty)));
    let admin = section(&root, sink, "admin").and_then(|table| admin(sink, table));
    if let Some(Some(admin)) = &admin {
        listeners.push(("admin.listen".to_string(), admin.listen));
    }
    let overlay =
        section(&root, sink, "overlay").and_then(|table| crate::overlay::overlay(sink, table));
    if let Some(Some(overlay)) = &overlay {
        listeners.push(("overlay.listen".to_string(), overlay.listen));
    }
    let guard = section(&root, sink, "guard").and_then(|table| {
        crate::overlay::guard(sink, table, quic.as_ref().map(|quic| quic.listen.port()))
    });
    check_overlapping_listeners(sink, &listeners);
    let cluster = root
        .optional(sink, "cluster", path)
        .map(|path| path.map(|path| crate::ClusterSource { path, name: None }));
    if let Some(overlay) = &overlay {
        check_overlay_addresses(
            sink,
            overlay.as_ref(),
            quic.as_ref().map(|quic| quic.listen),
            peers.valid.iter().zip(&peers.valid_paths),
            exposes.iter().zip(&expose_paths),
        );
    }

    match (node, quic, tls, limits, admin, overlay, guard, cluster) {
        (
            Some(node),
            Some(quic),
            Some(tls),
            Some(limits),
            Some(admin),
            Some(overlay),
            Some(guard),
            Some(cluster),
        ) if sink.errors.is_empty() => Ok(Config {
            node,
            quic,
            tls,
            peers: peers.valid,
            forwards,
            exposes,
            limits,
            admin,
            overlay,
            guard,
            cluster,
        }),
        _ => {
            if sink.errors.is_empty() {
                // Every path that drops a value records why; this is a bug.
                sink.error("", "internal error: a value was refused without a reason");
            }
            Err(ConfigErrors(std::mem::take(&mut sink.errors)))
        }
    }
}

/// A `[section]`: `Some(None)` if absent, `None` if it is not a table.
fn section<'a>(root: &TableReader<'a>, sink: &mut Sink, key: &str) -> Option<Option<&'a Table>> {
    match root.get(key) {
        None => Some(None),
        Some(Value::Table(table)) => Some(Some(table)),
        Some(other) => {
            sink.error(
                root.key(key),
                format!("expected a table [{key}], {}", found(other)),
            );
            None
        }
    }
}

fn quic(sink: &mut Sink, table: &Table) -> Option<Quic> {
    let quic = TableReader::new(sink, "quic".to_string(), table, QUIC_KEYS, "[quic]");
    let listen = quic.required(
        sink,
        "listen",
        "meshtun has no default QUIC address; set the UDP address peers dial, e.g. \"198.18.0.2:4433\"",
        socket_addr,
    );
    let connections_per_peer =
        quic.or_default(sink, "connections_per_peer", NonZeroUsize::MIN, |value| {
            let count: usize = integer_in(value, 1..=16)?;
            NonZeroUsize::new(count).ok_or_else(|| "must not be 0".to_string())
        });
    let idle_timeout = quic.or_default(sink, "idle_timeout", seconds(10), |value| {
        duration_in(value, seconds(1)..=seconds(600))
    });
    let mut keep_alive = quic.or_default(sink, "keep_alive", seconds(2), |value| {
        duration_in(value, millis(1)..=seconds(600))
    });
    let handshake_timeout = quic.or_default(sink, "handshake_timeout", seconds(5), |value| {
        duration_in(value, millis(100)..=seconds(60))
    });
    let max_streams_per_peer = quic.or_default(sink, "max_streams_per_peer", 16_384, |value| {
        integer_in(value, 1..=1_000_000)
    });
    let stream_window = quic.or_default(sink, "stream_window", 4 * MIB, |value| {
        size_in(value, 64 * KIB..=GIB)
    });
    let mut connection_window = quic.or_default(sink, "connection_window", 128 * MIB, |value| {
        size_in(value, 64 * KIB..=4 * GIB)
    });
    let send_window = quic.or_default(sink, "send_window", 32 * MIB, |value| {
        size_in(value, 64 * KIB..=4 * GIB)
    });
    let udp_buffer = |value: &Value| {
        let bytes = size_in(value, 64 * KIB..=GIB)?;
        usize::try_from(bytes).map_err(|_| "does not fit this platform's address space".to_string())
    };
    let udp_send_buffer = quic.or_default(sink, "udp_send_buffer", 8 * 1024 * 1024, udp_buffer);
    let udp_recv_buffer = quic.or_default(sink, "udp_recv_buffer", 8 * 1024 * 1024, udp_buffer);
    let reconnect_min = quic.or_default(sink, "reconnect_min", millis(100), |value| {
        duration_in(value, millis(10)..=seconds(60))
    });
    let mut reconnect_max = quic.or_default(sink, "reconnect_max", seconds(10), |value| {
        duration_in(value, millis(10)..=seconds(600))
    });

    if let (Some(keep), Some(idle)) = (keep_alive, idle_timeout) {
        if keep >= idle {
            sink.error(
                quic.key("keep_alive"),
                format!(
                    "must be shorter than quic.idle_timeout ({}), got {}: a quiet but healthy connection would time out before its keep-alive is sent",
                    format_duration(idle),
                    format_duration(keep)
                ),
            );
            keep_alive = None;
        }
    }
    if let (Some(stream), Some(connection)) = (stream_window, connection_window) {
        if connection < stream {
            sink.error(
                quic.key("connection_window"),
                format!(
                    "must be at least quic.stream_window ({}), got {}: a single stream could never fill its own window",
                    format_size(stream),
                    format_size(connection)
                ),
            );
            connection_window = None;
        }
    }
    if let (Some(min), Some(max)) = (reconnect_min, reconnect_max) {
        if max < min {
            sink.error(
                quic.key("reconnect_max"),
                format!(
                    "must be at least quic.reconnect_min ({}), got {}",
                    format_duration(min),
                    format_duration(max)
                ),
            );
            reconnect_max = None;
        }
    }

    Some(Quic {
        listen: listen?,
        connections_per_peer: connections_per_peer?,
        idle_timeout: idle_timeout?,
        keep_alive: keep_alive?,
        handshake_timeout: handshake_timeout?,
        max_streams_per_peer: max_streams_per_peer?,
        stream_window: stream_window?,
        connection_window: connection_window?,
        send_window: send_window?,
        udp_send_buffer: udp_send_buffer?,
        udp_recv_buffer: udp_recv_buffer?,
        reconnect_min: reconnect_min?,
        reconnect_max: reconnect_max?,
    })
}

fn tls(sink: &mut Sink, table: Option<&Table>) -> Option<Tls> {
    let Some(table) = table else {
        sink.error(
            "tls",
            "missing: [tls] is required, with ca, cert and key (PEM files)",
        );
        return None;
    };
    let tls = TableReader::new(sink, "tls".to_string(), table, TLS_KEYS, "[tls]");
    let ca = tls.required(
        sink,
        "ca",
        "the PEM bundle of the cluster CA certificates, e.g. \"/etc/meshtun/ca.crt\"",
        path,
    );
    let cert = tls.required(
        sink,
        "cert",
        "this node's PEM certificate, e.g. \"/etc/meshtun/node-1.crt\"",
        path,
    );
    let key = tls.required(
        sink,
        "key",
        "this node's PEM private key, e.g. \"/etc/meshtun/node-1.key\"",
        path,
    );
    let crl = tls.optional(sink, "crl", path);
    let renew = match tls.get("renew") {
        None => Some(None),
        Some(Value::Table(table)) => renew(sink, tls.key("renew"), table).map(Some),
        Some(other) => {
            sink.error(
                tls.key("renew"),
                format!(
                    "expected a table like {{ server = \"ca-host:4434\", ca_fingerprint = \"sha256:…\" }}, {}",
                    found(other)
                ),
            );
            None
        }
    };
    Some(Tls {
        ca: ca?,
        cert: cert?,
        key: key?,
        crl: crl?,
        renew: renew?,
    })
}

/// `[tls] renew = { server, ca_fingerprint, at }`.
fn renew(sink: &mut Sink, path: String, table: &Table) -> Option<Renew> {
    let renew = TableReader::new(sink, path, table, RENEW_KEYS, "tls.renew");
    let server = renew.required(
        sink,
        "server",
        "the renewal server (`meshtun pki serve`) as host:port, e.g. \"ca-host:4434\"",
        host_port,
    );
    let ca_fingerprint = renew.required(
        sink,
        "ca_fingerprint",
        "the CA's fingerprint as `meshtun pki serve` prints it, \"sha256:\" and 64 hex digits",
        |value| {
            // The spellings `meshtun join --ca-fingerprint` takes: lower or
            // upper case, with or without ':' between bytes.
            let text = string(value)?.trim();
            let digits: String = text
                .strip_prefix("sha256:")
                .or_else(|| text.strip_prefix("SHA256:"))
                .unwrap_or_default()
                .chars()
                .filter(|c| *c != ':')
                .collect();
            if digits.len() == 64 && digits.chars().all(|c| c.is_ascii_hexdigit()) {
                Ok(text.to_owned())
            } else {
                Err(format!(
                    "{text:?} is not a CA fingerprint: write \"sha256:\" and 64 hex digits, as \
                     `meshtun pki serve` and `meshtun pki inspect` print it"
                ))
            }
        },
    );
    let at_percent = renew.or_default(sink, "at", Renew::DEFAULT_AT_PERCENT, |value| match value {
        Value::Float(share) if (0.1..=0.9).contains(share) => {
            // In range, so the rounded percentage fits a u8.
            Ok(u8::try_from((share * 100.0).round() as i64).unwrap_or(Renew::DEFAULT_AT_PERCENT))
        }
        Value::Float(share) => Err(format!(
            "{share} is outside 0.1..=0.9: the share of a certificate's lifetime after which it is renewed"
        )),
        other => Err(format!(
            "expected a share of the lifetime between 0.1 and 0.9, e.g. 0.67, {}",
            found(other)
        )),
    });
    Some(Renew {
        server: server?,
        ca_fingerprint: ca_fingerprint?,
        at_percent: at_percent?,
    })
}

/// The declared peers.
struct Peers {
    /// The valid, unique peers.
    valid: Vec<Peer>,
    /// The key path of each valid peer (`peer[2]`): errors about a valid
    /// peer must name its own entry, not its place among the valid ones.
    valid_paths: Vec<String>,
    /// Every name string written in a `[[peer]]`, valid or not, so that a
    /// forward naming a peer whose entry is broken is not reported again.
    written: Vec<String>,
}

fn peers(root: &TableReader<'_>, sink: &mut Sink, node: Option<&NodeName>) -> Peers {
    let mut peers = Peers {
        valid: Vec::new(),
        valid_paths: Vec::new(),
        written: Vec::new(),
    };
    let mut first_seen: HashMap<NodeName, String> = HashMap::new();
    for (path, table) in entries(root, sink, "peer") {
        let peer = TableReader::new(sink, path.clone(), table, PEER_KEYS, "each [[peer]]");
        if let Some(Value::String(written)) = peer.get("name") {
            peers.written.push(written.clone());
        }
        let mut name = peer.required(
            sink,
            "name",
            "the peer's node name, as its certificate carries it",
            node_name,
        );
        if let Some(valid) = &name {
            if Some(valid) == node {
                sink.error(
                    peer.key("name"),
                    format!("\"{valid}\" is this node's own name (node); a node does not peer with itself"),
                );
                name = None;
            } else if let Some(first) = first_seen.get(valid) {
                sink.error(
                    peer.key("name"),
                    format!("duplicate peer \"{valid}\", already declared in {first}"),
                );
                name = None;
            } else {
                first_seen.insert(valid.clone(), path.clone());
            }
        }
        let addr = peer.required(
            sink,
            "addr",
            "where to dial the peer, as host:port, e.g. \"198.18.0.1:4433\"",
            host_port,
        );
        let overlay = peer.optional(sink, "overlay", crate::overlay::ipv4);
        if let (Some(name), Some(addr), Some(overlay)) = (name, addr, overlay) {
            peers.valid.push(Peer {
                name,
                addr,
                overlay,
            });
            peers.valid_paths.push(path);
        }
    }
    peers
}

/// The valid forwards, and every valid forward listen address with its key
/// path for the overlap check.
fn forwards(
    root: &TableReader<'_>,
    sink: &mut Sink,
    node: Option<&NodeName>,
    peers: &Peers,
    with_cluster: bool,
) -> (Vec<Forward>, Vec<(String, SocketAddr)>) {
    let mut forwards = Vec::new();
    let mut listeners = Vec::new();
    for (path, table) in entries(root, sink, "forward") {
        let forward = TableReader::new(sink, path, table, FORWARD_KEYS, "each [[forward]]");
        let allow_non_loopback = forward.or_default(sink, "allow_non_loopback", false, boolean);
        let mut listen = forward.required(
            sink,
            "listen",
            "the local TCP address applications connect to, e.g. \"127.0.0.1:29550\"",
            socket_addr,
        );
        if let Some(address) = listen {
            if address.port() == 0 {
                sink.error(
                    forward.key("listen"),
                    format!("{address} has port 0, which lets the OS pick a port; a forward needs a fixed port that applications connect to"),
                );
                listen = None;
            } else {
                listeners.push((forward.key("listen"), address));
                if !is_loopback(address.ip()) && allow_non_loopback == Some(false) {
                    sink.error(
                        forward.key("listen"),
                        format!(
                            "{address} is not a loopback address; local listeners are loopback-only by default because anything that can reach the port can use the tunnel with this node's identity; set allow_non_loopback = true in this [[forward]] if that is intended"
                        ),
                    );
                    listen = None;
                }
            }
        }
        let mut peer = forward.required(
            sink,
            "peer",
            "the name of the declared [[peer]] that hosts the service",
            node_name,
        );
        // Not written as a [[peer]] here: the manifest may declare it.
        let deferred_to_manifest = |name: &NodeName| {
            with_cluster && !peers.written.iter().any(|written| written == name.as_str())
        };
        if let Some(name) = &peer {
            if Some(name) == node {
                sink.error(
                    forward.key("peer"),
                    format!("\"{name}\" is this node itself; a forward carries connections to another node"),
                );
                peer = None;
            } else if !peers.valid.iter().any(|declared| &declared.name == name)
                && !deferred_to_manifest(name)
            {
                // A peer whose own entry is broken has been reported already.
                if !peers.written.iter().any(|written| written == name.as_str()) {
                    // Name every peer written, even one whose entry is broken.
                    let mut declared: Vec<&str> = Vec::new();
                    for written in &peers.written {
                        if !declared.contains(&written.as_str()) {
                            declared.push(written);
                        }
                    }
                    let declared = if declared.is_empty() {
                        "no [[peer]] is declared".to_string()
                    } else {
                        format!("declared peers: {}", declared.join(", "))
                    };
                    sink.error(
                        forward.key("peer"),
                        format!("unknown peer \"{name}\"; {declared}"),
                    );
                }
                peer = None;
            }
        }
        let service = forward.required(
            sink,
            "service",
            "the name the peer exposes the service under, e.g. \"vllm-dp-rpc\"",
            service_name,
        );
        if let (Some(listen), Some(peer), Some(service), Some(allow_non_loopback)) =
            (listen, peer, service, allow_non_loopback)
        {
            forwards.push(Forward {
                listen,
                peer,
                service,
                allow_non_loopback,
            });
        }
    }
    (forwards, listeners)
}

/// The valid exposes, each with its key path (`expose[1]`).
fn exposes(root: &TableReader<'_>, sink: &mut Sink) -> (Vec<Expose>, Vec<String>) {
    let mut exposes = Vec::new();
    let mut paths = Vec::new();
    let mut first_seen: HashMap<ServiceName, String> = HashMap::new();
    for (path, table) in entries(root, sink, "expose") {
        let expose = TableReader::new(sink, path.clone(), table, EXPOSE_KEYS, "each [[expose]]");
        let mut service = expose.required(
            sink,
            "service",
            "the name peers ask for, e.g. \"torch-store\"",
            service_name,
        );
        if let Some(name) = &service {
            if let Some(first) = first_seen.get(name) {
                sink.error(
                    expose.key("service"),
                    format!("service \"{name}\" is already exposed by {first}; each service is exposed once"),
                );
                service = None;
            } else {
                first_seen.insert(name.clone(), path.clone());
            }
        }
        let target = expose.required(
            sink,
            "target",
            "where this node connects for each accepted stream, as host:port, e.g. \"127.0.0.1:29500\"",
            host_port,
        );
        let allow = allow_list(&expose, sink, "allow");
        if let (Some(service), Some(target), Some(allow)) = (service, target, allow) {
            exposes.push(Expose {
                service,
                target,
                allow,
            });
            paths.push(path);
        }
    }
    (exposes, paths)
}

fn limits(sink: &mut Sink, table: &Table) -> Option<Limits> {
    let limits = TableReader::new(sink, "limits".to_string(), table, LIMITS_KEYS, "[limits]");
    let preamble_timeout = limits.or_default(sink, "preamble_timeout", seconds(5), |value| {
        duration_in(value, millis(100)..=seconds(60))
    });
    let connect_timeout = limits.or_default(sink, "connect_timeout", seconds(5), |value| {
        duration_in(value, millis(100)..=seconds(60))
    });
    let drain_grace = limits.or_default(sink, "drain_grace", seconds(10), |value| {
        duration_in(value, Duration::ZERO..=seconds(600))
    });
    let pending_streams_per_peer =
        limits.or_default(sink, "pending_streams_per_peer", 1024, |value| {
            integer_in(value, 1..=1_000_000)
        });
    let connections_per_peer = limits.or_default(sink, "connections_per_peer", 256, |value| {
        integer_in(value, 1..=1024)
    });
    let handshakes = limits.or_default(sink, "handshakes", 64, |value| {
        integer_in(value, 1..=100_000)
    });
    let retry_above = limits.or_default(sink, "retry_above", 8, |value| {
        integer_in(value, 0..=100_000)
    });
    let accept_backoff_max = limits.or_default(sink, "accept_backoff_max", seconds(1), |value| {
        duration_in(value, millis(10)..=seconds(60))
    });
    let buffer_memory = limits.or_default(sink, "buffer_memory", 256 * MIB, |value| {
        size_in(value, MIB..=64 * GIB)
    });
    let worker_threads = limits.optional(sink, "worker_threads", |value| {
        let count: usize = integer_in(value, 1..=1024)?;
        NonZeroUsize::new(count).ok_or_else(|| "must not be 0".to_string())
    });
    let shards = limits.optional(sink, "shards", |value| {
        let count: usize = integer_in(value, 1..=1024)?;
        NonZeroUsize::new(count).ok_or_else(|| "must not be 0".to_string())
    });
    if let (Some(Some(shards)), Some(Some(workers))) = (shards, worker_threads) {
        if shards > workers {
            sink.error(
                "limits.shards",
                format!(
                    "must be at most limits.worker_threads ({workers}), got {shards}: \
                     each shard is a thread of its own, and worker_threads bounds the threads"
                ),
            );
            return None;
        }
    }
    if let (Some(handshakes), Some(retry_above)) = (handshakes, retry_above) {
        if retry_above > handshakes {
            sink.error(
                "limits.retry_above",
                format!(
                    "must be at most limits.handshakes ({handshakes}), got {retry_above}: \
                     past limits.handshakes new clients are refused, so a Retry would never be asked"
                ),
            );
            return None;
        }
    }
    Some(Limits {
        preamble_timeout: preamble_timeout?,
        connect_timeout: connect_timeout?,
        drain_grace: drain_grace?,
        pending_streams_per_peer: pending_streams_per_peer?,
        connections_per_peer: connections_per_peer?,
        handshakes: handshakes?,
        retry_above: retry_above?,
        accept_backoff_max: accept_backoff_max?,
        buffer_memory: buffer_memory?,
        worker_threads: worker_threads?,
        shards: shards?,
    })
}

/// `[admin]`: `Some(None)` if absent, `None` if invalid.
fn admin(sink: &mut Sink, table: Option<&Table>) -> Option<Option<Admin>> {
    let Some(table) = table else {
        return Some(None);
    };
    let admin = TableReader::new(sink, "admin".to_string(), table, ADMIN_KEYS, "[admin]");
    let allow_non_loopback = admin.or_default(sink, "allow_non_loopback", false, boolean);
    let listen = admin.required(
        sink,
        "listen",
        "the TCP address of the metrics and status endpoint, e.g. \"127.0.0.1:9464\"",
        socket_addr,
    )?;
    if !is_loopback(listen.ip()) && allow_non_loopback == Some(false) {
        sink.error(
            admin.key("listen"),
            format!("{listen} is not a loopback address; the admin endpoint shows peers, services and traffic, so it is loopback-only unless admin.allow_non_loopback = true"),
        );
        return None;
    }
    allow_non_loopback?;
    Some(Some(Admin { listen }))
}

/// Reports each TCP listener that would collide with an earlier one.
fn check_overlapping_listeners(sink: &mut Sink, listeners: &[(String, SocketAddr)]) {
    for (index, (key, address)) in listeners.iter().enumerate() {
        let earlier = listeners[..index]
            .iter()
            .find(|(_, other)| overlaps(*address, *other));
        if let Some((first_key, first)) = earlier {
            let message = if first == address {
                format!("{address} is already used by {first_key}")
            } else {
                format!(
                    "{address} overlaps {first_key} ({first}): both would listen on TCP port {}",
                    address.port()
                )
            };
            sink.error(key.clone(), message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn overlap_follows_what_bind_would_refuse() {
        let overlap = |a, b| overlaps(address(a), address(b));
        assert!(overlap("127.0.0.1:80", "127.0.0.1:80"));
        assert!(!overlap("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!overlap("127.0.0.1:80", "127.0.0.2:80"));
        assert!(overlap("0.0.0.0:80", "127.0.0.2:80"));
        assert!(overlap("127.0.0.2:80", "0.0.0.0:80"));
        assert!(!overlap("0.0.0.0:80", "[::1]:80"));
        assert!(overlap("[::]:80", "127.0.0.1:80"));
        assert!(overlap("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(!overlap("127.0.0.1:0", "127.0.0.1:0"));
    }

    #[test]
    fn mapped_loopback_counts_as_loopback() {
        assert!(is_loopback("127.0.0.9".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
        assert!(!is_loopback("198.18.0.2".parse().unwrap()));
    }
}
