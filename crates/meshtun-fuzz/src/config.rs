//! The config file parser (meshtun-config).

use std::collections::HashSet;
use std::net::SocketAddr;

use meshtun_config::{Allow, Config, ConfigError};
use toml::{Table, Value};

use crate::check;

/// `meshtun_config::parse` on any text (bytes that are not UTF-8 are
/// replaced, as a text editor would).
///
/// - it never panics and gives the same answer twice;
/// - a refused file has at least one error, none of them the parser's own
///   "internal error", each with a message; the only error without a key is
///   the one TOML syntax error, given exactly when the text is not TOML;
/// - an error key `a[i].b` points into the file: `a` is an array with an
///   element `i`, and a key below it that is absent is reported as missing;
/// - an accepted file keeps the promises of [`Config`]'s documentation:
///   peers unique and never this node, forwards to declared peers on
///   loopback unless allowed, exposes unique with a non-empty allow list,
///   ordered windows and timers, overlay addresses inside the prefix.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = meshtun_config::parse(&text);
    let again = meshtun_config::parse(&text);
    check!(
        parsed == again,
        "parse is not deterministic on {text:?}: {parsed:?} then {again:?}"
    );
    let table = text.parse::<Table>().ok();
    match parsed {
        Ok(config) => check_config(&text, &config),
        Err(errors) => {
            check!(!errors.is_empty(), "{text:?}: refused without an error");
            let shown = errors.to_string();
            check!(
                shown.lines().count() >= errors.len(),
                "{text:?}: {} errors display as {shown:?}",
                errors.len()
            );
            match &table {
                None => check!(
                    errors.len() == 1
                        && errors.iter().all(|error| error.key.is_empty()
                            && error.message.starts_with("TOML syntax error")),
                    "{text:?} is not TOML, but the errors are {errors:?}"
                ),
                Some(table) => {
                    for error in &errors {
                        check_error(&text, table, error);
                    }
                }
            }
        }
    }
}

fn check_error(text: &str, table: &Table, error: &ConfigError) {
    check!(
        !error.key.is_empty() && !error.message.is_empty(),
        "{text:?}: an error without a key or message: {error:?}"
    );
    check!(
        !error.message.starts_with("internal error"),
        "{text:?}: {error:?}"
    );
    // Only keys of plain files are followed: a quoted key holding '[' or
    // '.' could read as a path it is not.
    if !plain_keys(table) {
        return;
    }
    let Some(segments) = key_path(&error.key) else {
        return;
    };
    let Some(last_indexed) = segments.iter().rposition(|(_, index)| index.is_some()) else {
        return;
    };
    let mut current = table;
    for (position, (name, index)) in segments.iter().enumerate() {
        let Some(value) = current.get(name.as_str()) else {
            // A key may be missing only below the last indexed segment, and
            // then the error says so.
            check!(
                position > last_indexed,
                "{text:?}: error key {:?} names an entry that does not exist ({error:?})",
                error.key
            );
            check!(
                position + 1 < segments.len() || error.message.starts_with("missing"),
                "{text:?}: error key {:?} names a key that is not in the file, \
                 and the error is not that it is missing ({error:?})",
                error.key
            );
            return;
        };
        let value = match index {
            None => value,
            Some(index) => {
                let element = match value {
                    Value::Array(items) => items.get(*index),
                    _ => None,
                };
                let Some(element) = element else {
                    crate::violated(format_args!(
                        "{text:?}: error key {:?} names element {index} of {name:?}, \
                         which has none ({error:?})",
                        error.key
                    ))
                };
                element
            }
        };
        match value {
            Value::Table(table) => current = table,
            // A value that is not a table ends the path: the error is about it.
            _ => return,
        }
    }
}

/// True if no key anywhere in the file holds '.', '[' or '"'.
fn plain_keys(table: &Table) -> bool {
    table
        .iter()
        .all(|(key, value)| !key.contains(['.', '[', ']', '"']) && plain_value(value))
}

fn plain_value(value: &Value) -> bool {
    match value {
        Value::Table(table) => plain_keys(table),
        Value::Array(items) => items.iter().all(plain_value),
        _ => true,
    }
}

/// `peer[1].overlay` as `[("peer", Some(1)), ("overlay", None)]`; `None`
/// for a key with quoted segments.
fn key_path(key: &str) -> Option<Vec<(String, Option<usize>)>> {
    key.split('.')
        .map(|segment| {
            let (name, index) = match segment.split_once('[') {
                None => (segment, None),
                Some((name, rest)) => {
                    let index = rest.strip_suffix(']')?.parse::<usize>().ok()?;
                    (name, Some(index))
                }
            };
            let bare = !name.is_empty()
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'));
            bare.then(|| (name.to_owned(), index))
        })
        .collect()
}

fn loopback(address: &SocketAddr) -> bool {
    address.ip().to_canonical().is_loopback()
}

/// What a [`Config`] promises: checked on every accepted file.
fn check_config(text: &str, config: &Config) {
    let mut peer_names = HashSet::new();
    for peer in &config.peers {
        check!(
            peer.name != config.node,
            "{text:?}: node {} peers with itself",
            config.node
        );
        check!(
            peer_names.insert(&peer.name),
            "{text:?}: peer {} is declared twice",
            peer.name
        );
    }
    for forward in &config.forwards {
        check!(
            config.peer(&forward.peer).is_some(),
            "{text:?}: a forward to undeclared peer {}",
            forward.peer
        );
        check!(
            forward.listen.port() != 0 && (loopback(&forward.listen) || forward.allow_non_loopback),
            "{text:?}: forward listen {} accepted",
            forward.listen
        );
    }
    let mut services = HashSet::new();
    for expose in &config.exposes {
        check!(
            services.insert(&expose.service),
            "{text:?}: service {} is exposed twice",
            expose.service
        );
        check!(
            !matches!(&expose.allow, Allow::Only(names) if names.is_empty()),
            "{text:?}: service {} has an empty allow list",
            expose.service
        );
    }
    let quic = &config.quic;
    check!(
        (1..=16).contains(&quic.connections_per_peer.get())
            && quic.keep_alive < quic.idle_timeout
            && quic.stream_window <= quic.connection_window
            && quic.reconnect_min <= quic.reconnect_max,
        "{text:?}: inconsistent [quic] accepted: {quic:?}"
    );
    let mut listeners: Vec<SocketAddr> = config.forwards.iter().map(|f| f.listen).collect();
    listeners.extend(config.admin.iter().map(|admin| admin.listen));
    listeners.extend(config.overlay.iter().map(|overlay| overlay.listen));
    let distinct: HashSet<&SocketAddr> = listeners.iter().collect();
    check!(
        distinct.len() == listeners.len(),
        "{text:?}: two listeners on one address: {listeners:?}"
    );
    match &config.overlay {
        None => check!(
            config.peers.iter().all(|peer| peer.overlay.is_none()),
            "{text:?}: a peer overlay address without [overlay]"
        ),
        Some(overlay) => {
            let prefix = overlay.prefix;
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.len))
                .unwrap_or(0);
            check!(
                (8..=30).contains(&prefix.len)
                    && u32::from(prefix.network) & !mask == 0
                    && prefix.contains(overlay.address)
                    && loopback(&overlay.listen),
                "{text:?}: inconsistent [overlay] accepted: {overlay:?}"
            );
            let mut seen = HashSet::from([overlay.address]);
            for address in config.peers.iter().filter_map(|peer| peer.overlay) {
                check!(
                    prefix.contains(address) && seen.insert(address),
                    "{text:?}: peer overlay address {address} outside {prefix} or taken"
                );
            }
            for rule in &overlay.allow {
                check!(
                    rule.ports.start() <= rule.ports.end() && *rule.ports.start() > 0,
                    "{text:?}: overlay rule with ports {:?}",
                    rule.ports
                );
            }
        }
    }
}
