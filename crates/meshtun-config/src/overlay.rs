//! `[overlay]` and the overlay addresses of `[[peer]]`s: overlay mode
//! (README, "Overlay mode"). Kept apart from `build.rs`, which calls in here;
//! like every section module it stands on `read.rs` alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;

use toml::{Table, Value};

use crate::read::{
    allow_list, boolean, found, is_loopback, socket_addr, string, Sink, TableReader,
};
use crate::{Expose, Guard, Overlay, OverlayAllow, OverlayPrefix, Peer};

pub(crate) const OVERLAY_KEYS: &[&str] = &[
    "address",
    "prefix",
    "listen",
    "interface",
    "manage",
    "guard",
    "allow",
];
const ALLOW_KEYS: &[&str] = &["peers", "ports"];
const GUARD_KEYS: &[&str] = &["ports"];

/// Where redirected connections arrive unless `overlay.listen` says.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:15001";
/// The dummy interface unless `overlay.interface` says.
pub(crate) const DEFAULT_INTERFACE: &str = "meshtun0";

/// `[overlay]`: `Some(None)` if absent, `None` if invalid.
pub(crate) fn overlay(sink: &mut Sink, table: Option<&Table>) -> Option<Option<Overlay>> {
    let Some(table) = table else {
        return Some(None);
    };
    let reader = TableReader::new(
        sink,
        "overlay".to_string(),
        table,
        OVERLAY_KEYS,
        "[overlay]",
    );
    let prefix = reader.required(
        sink,
        "prefix",
        "the block every node's overlay address is in, e.g. \"100.127.0.0/16\"",
        prefix,
    );
    let address = reader.required(
        sink,
        "address",
        "this node's overlay address, e.g. \"100.127.0.2\" (with a cluster manifest, leave it out to use the node's overlay there)",
        ipv4,
    );
    if let (Some(prefix), Some(address)) = (prefix, address) {
        if !prefix.contains(address) {
            sink.error(
                reader.key("address"),
                format!("{address} is not inside overlay.prefix {prefix}"),
            );
        }
    }
    let default_listen: SocketAddr = DEFAULT_LISTEN.parse().ok()?;
    let listen = reader.or_default(sink, "listen", default_listen, socket_addr);
    if let Some(listen) = listen {
        if !listen.is_ipv4() {
            sink.error(
                reader.key("listen"),
                format!("{listen} is IPv6; connections redirected from IPv4 overlay addresses arrive on an IPv4 loopback address, e.g. \"127.0.0.1:15001\""),
            );
        } else if !is_loopback(listen.ip()) {
            sink.error(
                reader.key("listen"),
                format!("{listen} is not a loopback address; the transparent listener only takes connections redirected on this host"),
            );
        }
    }
    let interface = reader.or_default(sink, "interface", DEFAULT_INTERFACE.to_owned(), interface);
    let manage = reader.or_default(sink, "manage", false, boolean);
    let guard = reader.or_default(sink, "guard", true, boolean);
    let allow = allow_rules(&reader, sink);
    Some(Some(Overlay {
        address: address?,
        prefix: prefix?,
        listen: listen?,
        interface: interface?,
        manage: manage?,
        guard: guard?,
        allow: allow?,
    }))
}

/// `[guard]`: `Some(None)` if absent, `None` if invalid. `quic_port` (if
/// known) may not be guarded: the rule would drop meshtun's own packets.
pub(crate) fn guard(
    sink: &mut Sink,
    table: Option<&Table>,
    quic_port: Option<u16>,
) -> Option<Option<Guard>> {
    let Some(table) = table else {
        return Some(None);
    };
    let reader = TableReader::new(sink, "guard".to_string(), table, GUARD_KEYS, "[guard]");
    if quic_port == Some(0) {
        sink.error(
            "quic.listen",
            "has port 0, which the OS picks at start; with [guard] the QUIC port must be fixed, so that no guarded range can cover it",
        );
        return None;
    }
    let items = match reader.get("ports") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(other) => {
            sink.error(
                reader.key("ports"),
                format!(
                    "expected a non-empty list of ports or ranges, e.g. [29500, \"29550-29560\"], {}",
                    found(other)
                ),
            );
            return None;
        }
        None => {
            sink.error(
                reader.key("ports"),
                "missing: the ports only meshtun may reach from off this node, e.g. [29500, \"29550-29560\"]",
            );
            return None;
        }
    };
    let mut ports = Vec::new();
    let mut valid = true;
    for (index, item) in items.iter().enumerate() {
        let path = format!("guard.ports[{index}]");
        match port_range(item) {
            Ok(range) if quic_port.is_some_and(|quic| range.contains(&quic)) => {
                sink.error(
                    path,
                    format!(
                        "{}-{} includes quic.listen's port {}; the guard would drop meshtun's own QUIC packets",
                        range.start(),
                        range.end(),
                        quic_port.unwrap_or_default()
                    ),
                );
                valid = false;
            }
            Ok(range) => ports.push(range),
            Err(message) => {
                sink.error(path, message);
                valid = false;
            }
        }
    }
    valid.then_some(Some(Guard { ports }))
}

/// `overlay.allow`: a list of `{ peers = [...], ports = "N-M" }`; may be
/// empty (default deny).
fn allow_rules(reader: &TableReader<'_>, sink: &mut Sink) -> Option<Vec<OverlayAllow>> {
    let items = match reader.get("allow") {
        None => return Some(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            sink.error(
                reader.key("allow"),
                format!(
                    "expected a list such as [{{ peers = [\"*\"], ports = \"1024-65535\" }}], {}",
                    found(other)
                ),
            );
            return None;
        }
    };
    let mut rules = Vec::new();
    let mut valid = true;
    for (index, item) in items.iter().enumerate() {
        let path = format!("overlay.allow[{index}]");
        let Value::Table(table) = item else {
            sink.error(
                path,
                format!(
                    "expected {{ peers = [...], ports = \"N-M\" }}, {}",
                    found(item)
                ),
            );
            valid = false;
            continue;
        };
        let rule = TableReader::new(sink, path, table, ALLOW_KEYS, "each overlay.allow rule");
        let peers = allow_list(&rule, sink, "peers");
        let ports = rule.required(
            sink,
            "ports",
            "the ports of this node's overlay address the peers may reach, e.g. \"1024-65535\" or \"29500\"",
            port_range,
        );
        match (peers, ports) {
            (Some(peers), Some(ports)) => rules.push(OverlayAllow { peers, ports }),
            _ => valid = false,
        }
    }
    valid.then_some(rules)
}

/// An IPv4 address written as a string.
pub(crate) fn ipv4(value: &Value) -> Result<Ipv4Addr, String> {
    let text = string(value)?;
    text.parse()
        .map_err(|_| format!("{text:?} is not an IPv4 address (overlay mode is IPv4 only)"))
}

fn prefix(value: &Value) -> Result<OverlayPrefix, String> {
    let text = string(value)?;
    let (network, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a prefix like \"100.127.0.0/16\""))?;
    let network: Ipv4Addr = network
        .parse()
        .map_err(|_| format!("{network:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|len| (8..=30).contains(len))
        .ok_or_else(|| format!("prefix length {len:?} must be 8 to 30"))?;
    let prefix = OverlayPrefix { network, len };
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    if u32::from(network) & !mask != 0 {
        let first = Ipv4Addr::from(u32::from(network) & mask);
        return Err(format!(
            "{text:?} has host bits set; the block starts at {first}/{len}"
        ));
    }
    Ok(prefix)
}

fn interface(value: &Value) -> Result<String, String> {
    let text = string(value)?;
    let ok = (1..=15).contains(&text.len())
        && text
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "_.-".contains(character));
    if ok {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not an interface name (1 to 15 of A-Z a-z 0-9 _ . -)"
        ))
    }
}

/// `"N"`, `"N-M"` or an integer N, with 1 <= N <= M <= 65535.
pub(crate) fn port_range(value: &Value) -> Result<RangeInclusive<u16>, String> {
    let parse = |text: &str| -> Result<u16, String> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| format!("{text:?} is not a port from 1 to 65535"))
    };
    match value {
        Value::Integer(port) => u16::try_from(*port)
            .ok()
            .filter(|port| *port > 0)
            .map(|port| port..=port)
            .ok_or_else(|| format!("{port} is not a port from 1 to 65535")),
        Value::String(text) => {
            let (low, high) = match text.split_once('-') {
                Some((low, high)) => (parse(low)?, parse(high)?),
                None => {
                    let port = parse(text)?;
                    (port, port)
                }
            };
            if low > high {
                return Err(format!("{text:?}: the range is empty ({low} > {high})"));
            }
            Ok(low..=high)
        }
        other => Err(format!(
            "expected a port or a range such as \"1024-65535\", {}",
            found(other)
        )),
    }
}

/// The overlay addresses: each peer's is inside the prefix, unique and not
/// this node's; peers have one only if `[overlay]` is on; and no expose
/// target points at another node's overlay address, which would loop.
pub(crate) fn check_overlay_addresses<'c>(
    sink: &mut Sink,
    overlay: Option<&crate::Overlay>,
    quic_listen: Option<SocketAddr>,
    peers: impl Iterator<Item = (&'c Peer, &'c String)>,
    exposes: impl Iterator<Item = (&'c Expose, &'c String)>,
) {
    // The prefix is routed into the overlay interface and guarded: an
    // underlay address inside it would be cut off.
    let underlay = |addr: Option<SocketAddr>| match addr.map(|addr| addr.ip()) {
        Some(IpAddr::V4(ip)) => overlay.filter(|overlay| overlay.prefix.contains(ip)),
        _ => None,
    };
    if let Some(overlay) = underlay(quic_listen) {
        sink.error(
            "quic.listen",
            format!(
                "{} is inside overlay.prefix {}; the prefix must not cover the network the nodes talk QUIC on",
                quic_listen.map(|addr| addr.to_string()).unwrap_or_default(),
                overlay.prefix
            ),
        );
    }
    let mut seen: HashMap<std::net::Ipv4Addr, &str> = HashMap::new();
    for (peer, path) in peers {
        if let Some(overlay) = underlay(peer.addr.to_socket_addr_if_literal()) {
            sink.error(
                format!("{path}.addr"),
                format!(
                    "{} is inside overlay.prefix {}; the prefix must not cover the network the nodes talk QUIC on",
                    peer.addr, overlay.prefix
                ),
            );
        }
        let Some(address) = peer.overlay else {
            continue;
        };
        let key = format!("{path}.overlay");
        let Some(overlay) = overlay else {
            sink.error(
                key,
                "a peer overlay address needs an [overlay] section for this node",
            );
            continue;
        };
        if !overlay.prefix.contains(address) {
            sink.error(
                key,
                format!("{address} is not inside overlay.prefix {}", overlay.prefix),
            );
        } else if address == overlay.address {
            sink.error(key, format!("{address} is this node's own overlay.address"));
        } else if let Some(first) = seen.insert(address, path) {
            sink.error(
                key,
                format!("{address} is already {first}'s overlay address"),
            );
        }
    }
    if let Some(overlay) = overlay {
        for (expose, path) in exposes {
            if let Some(target) = expose.target.to_socket_addr_if_literal() {
                if let IpAddr::V4(ip) = target.ip() {
                    if overlay.prefix.contains(ip) && ip != overlay.address {
                        sink.error(
                            format!("{path}.target"),
                            format!("{target} is another node's overlay address; meshtun's own connections must not be redirected into the overlay"),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_must_be_blocks() {
        let ok = prefix(&Value::String("100.127.0.0/16".into())).unwrap();
        assert!(ok.contains("100.127.3.4".parse().unwrap()));
        assert!(!ok.contains("100.128.0.1".parse().unwrap()));
        for bad in ["100.127.0.1/16", "100.127.0.0", "100.127.0.0/31", "x/16"] {
            assert!(prefix(&Value::String(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            port_range(&Value::String("1024-65535".into())),
            Ok(1024..=65535)
        );
        assert_eq!(
            port_range(&Value::String("29500".into())),
            Ok(29500..=29500)
        );
        assert_eq!(port_range(&Value::Integer(80)), Ok(80..=80));
        for bad in ["0", "2-1", "70000", "a-b", ""] {
            assert!(port_range(&Value::String(bad.into())).is_err(), "{bad}");
        }
    }
}
