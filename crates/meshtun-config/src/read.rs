//! Reading a parsed `toml::Table` key by key while collecting errors.
//!
//! serde stops at the first error, and an operator should see every problem
//! of a file at once, so the file is first parsed into a plain table and then
//! walked here: each table reports its unknown keys, and each key is converted
//! on its own, with its key path, whatever happened to its neighbours.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use meshtun_proto::{NodeName, ServiceName};
use toml::{Table, Value};

use crate::units::{format_duration, format_size, parse_duration, parse_size};
use crate::{Allow, ConfigError, HostPort};

/// The errors found so far.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    pub(crate) errors: Vec<ConfigError>,
}

impl Sink {
    pub(crate) fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(key, message));
    }
}

/// `path.key`, quoting `key` if it is not a bare TOML key.
pub(crate) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// The keys of the top level of the file.
pub(crate) const TOP_LEVEL_KEYS: &[&str] = &[
    "node", "quic", "tls", "peer", "forward", "expose", "limits", "admin", "overlay", "guard",
    "cluster",
];

/// One table being read, with its key path (`""` for the top level,
/// `"quic"`, `"forward[2]"`).
#[derive(Debug)]
pub(crate) struct TableReader<'a> {
    path: String,
    table: &'a Table,
}

impl<'a> TableReader<'a> {
    /// Starts reading `table`, reporting each key not in `valid`. `what`
    /// names the table for the operator (`"[quic]"`, `"each [[forward]]"`).
    pub(crate) fn new(
        sink: &mut Sink,
        path: String,
        table: &'a Table,
        valid: &[&str],
        what: &str,
    ) -> Self {
        let mut unknown: Vec<&String> = table
            .keys()
            .filter(|key| !valid.contains(&key.as_str()))
            .collect();
        // Report in a stable order whatever map type toml was built with.
        unknown.sort();
        for key in unknown {
            let misplaced = !path.is_empty() && TOP_LEVEL_KEYS.contains(&key.as_str());
            let suggestion = if misplaced {
                // TOML puts every key below a [section] header into that section.
                " (a top-level key must come before the first [section] header)".to_string()
            } else {
                closest(key, valid)
                    .map(|close| format!(" (did you mean \"{close}\"?)"))
                    .unwrap_or_default()
            };
            sink.error(
                join(&path, key),
                format!(
                    "unknown key{suggestion}; valid keys in {what}: {}",
                    valid.join(", ")
                ),
            );
        }
        Self { path, table }
    }

    /// The path of a key of this table.
    pub(crate) fn key(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The raw value of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    /// Converts `key`, reporting a conversion error; `None` if absent or bad.
    fn convert<T>(
        &self,
        sink: &mut Sink,
        key: &str,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Result<Option<T>, ()> {
        match self.get(key).map(convert) {
            None => Ok(None),
            Some(Ok(value)) => Ok(Some(value)),
            Some(Err(message)) => {
                sink.error(self.key(key), message);
                Err(())
            }
        }
    }

    /// A key that must be present; `hint` says what to write when it is not.
    pub(crate) fn required<T>(
        &self,
        sink: &mut Sink,
        key: &str,
        hint: &str,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        match self.convert(sink, key, convert) {
            Ok(Some(value)) => Some(value),
            Ok(None) => {
                sink.error(self.key(key), format!("missing: {hint}"));
                None
            }
            Err(()) => None,
        }
    }

    /// A key that takes `default` when absent; `None` only if it is invalid.
    pub(crate) fn or_default<T>(
        &self,
        sink: &mut Sink,
        key: &str,
        default: T,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<T> {
        match self.convert(sink, key, convert) {
            Ok(value) => Some(value.unwrap_or(default)),
            Err(()) => None,
        }
    }

    /// A key that may be absent: `Some(None)` if absent, `None` if invalid.
    pub(crate) fn optional<T>(
        &self,
        sink: &mut Sink,
        key: &str,
        convert: impl FnOnce(&'a Value) -> Result<T, String>,
    ) -> Option<Option<T>> {
        self.convert(sink, key, convert).ok()
    }
}

/// The closest valid key within two edits, to catch typos like `lisen`.
fn closest<'v>(key: &str, valid: &[&'v str]) -> Option<&'v str> {
    valid
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, b_char) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(a_char != *b_char);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Describes a value of the wrong type: its type, and its text if short.
pub(crate) fn found(value: &Value) -> String {
    match value {
        Value::String(text) if text.len() <= 64 => format!("found string {text:?}"),
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Datetime(_) => {
            format!("found {} {value}", value.type_str())
        }
        _ => format!("found {}", value.type_str()),
    }
}

pub(crate) fn string(value: &Value) -> Result<&str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("expected a string, {}", found(value)))
}

pub(crate) fn boolean(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("expected true or false, {}", found(value)))
}

/// An integer within `range`, converted to `T`.
pub(crate) fn integer_in<T: TryFrom<i64>>(
    value: &Value,
    range: RangeInclusive<i64>,
) -> Result<T, String> {
    let Some(number) = value.as_integer() else {
        return Err(format!("expected an integer, {}", found(value)));
    };
    if !range.contains(&number) {
        return Err(format!(
            "must be from {} to {}, got {number}",
            range.start(),
            range.end()
        ));
    }
    T::try_from(number).map_err(|_| format!("{number} does not fit this platform"))
}

pub(crate) fn node_name(value: &Value) -> Result<NodeName, String> {
    let text = string(value)?;
    NodeName::new(text).map_err(|error| format!("invalid node name {text:?}: {error}"))
}

pub(crate) fn service_name(value: &Value) -> Result<ServiceName, String> {
    let text = string(value)?;
    ServiceName::new(text).map_err(|error| format!("invalid service name {text:?}: {error}"))
}

/// An IP address and port to bind: a listener binds an address, not a name.
pub(crate) fn socket_addr(value: &Value) -> Result<SocketAddr, String> {
    let text = string(value)?;
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address and port; write e.g. \"127.0.0.1:29550\" or \"[::1]:29550\" (a listener binds an address, not a host name)"
        )
    })
}

pub(crate) fn host_port(value: &Value) -> Result<HostPort, String> {
    string(value)?.parse().map_err(|error| format!("{error}"))
}

/// A file path: a non-empty string.
pub(crate) fn path(value: &Value) -> Result<PathBuf, String> {
    match string(value)? {
        "" => Err("the path is empty".to_string()),
        text => Ok(PathBuf::from(text)),
    }
}

/// A duration string within `range`; a bare integer is refused with a hint.
pub(crate) fn duration_in(
    value: &Value,
    range: RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let duration = match value {
        Value::String(text) => parse_duration(text)?,
        Value::Integer(number) => {
            return Err(format!(
                "expected a duration string with a unit, found the bare integer {number}; write \"{number}s\" or \"{number}ms\""
            ))
        }
        other => {
            return Err(format!(
                "expected a duration such as \"10s\" or \"250ms\", {}",
                found(other)
            ))
        }
    };
    if !range.contains(&duration) {
        return Err(format!(
            "must be from {} to {}, got {}",
            format_duration(*range.start()),
            format_duration(*range.end()),
            format_duration(duration)
        ));
    }
    Ok(duration)
}

/// A size in bytes within `range`: an integer, or a string such as `"4MiB"`.
pub(crate) fn size_in(value: &Value, range: RangeInclusive<u64>) -> Result<u64, String> {
    let size = match value {
        Value::Integer(number) => u64::try_from(*number)
            .map_err(|_| format!("a size cannot be negative, got {number}"))?,
        Value::String(text) => parse_size(text)?,
        other => {
            return Err(format!(
                "expected a size in bytes, as an integer or a string such as \"4MiB\", {}",
                found(other)
            ))
        }
    };
    if !range.contains(&size) {
        return Err(format!(
            "must be from {} to {}, got {}",
            format_size(*range.start()),
            format_size(*range.end()),
            format_size(size)
        ));
    }
    Ok(size)
}

/// The entries of a `[[key]]` array of tables, each with its key path.
pub(crate) fn entries<'a>(
    root: &TableReader<'a>,
    sink: &mut Sink,
    key: &str,
) -> Vec<(String, &'a Table)> {
    match root.get(key) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| {
                let path = format!("{key}[{index}]");
                match item {
                    Value::Table(table) => Some((path, table)),
                    other => {
                        sink.error(
                            path,
                            format!("expected a table [[{key}]], {}", found(other)),
                        );
                        None
                    }
                }
            })
            .collect(),
        Some(Value::Table(_)) => {
            sink.error(
                root.key(key),
                format!("expected an array of tables: write [[{key}]] (double brackets), once per {key}"),
            );
            Vec::new()
        }
        Some(other) => {
            sink.error(
                root.key(key),
                format!("expected an array of tables [[{key}]], {}", found(other)),
            );
            Vec::new()
        }
    }
}

const DEFAULT_DENY: &str =
    "default deny: an empty allow list lets nobody in; list node names or \"*\"";

/// A list of who may reach something (`allow` of an expose, `peers` of an
/// overlay rule): `["*"]`, or node names, never empty.
pub(crate) fn allow_list(expose: &TableReader<'_>, sink: &mut Sink, field: &str) -> Option<Allow> {
    let key = expose.key(field);
    let items = match expose.get(field) {
        None => {
            sink.error(key, format!("missing: {DEFAULT_DENY}"));
            return None;
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            sink.error(
                key,
                format!(
                    "expected a list of node names such as [\"node-0\", \"node-2\"] or [\"*\"], {}",
                    found(other)
                ),
            );
            return None;
        }
    };
    if items.is_empty() {
        sink.error(key, DEFAULT_DENY);
        return None;
    }
    let mut valid = true;
    let mut star = false;
    let mut named = false;
    let mut names: BTreeSet<NodeName> = BTreeSet::new();
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{index}]");
        let Value::String(text) = item else {
            sink.error(
                item_key,
                format!("expected a node name or \"*\", {}", found(item)),
            );
            valid = false;
            continue;
        };
        if let Some(first) = first_seen.insert(text.as_str(), index) {
            sink.error(
                item_key,
                format!("duplicate \"{text}\", already listed as allow[{first}]"),
            );
            valid = false;
            continue;
        }
        if text == "*" {
            star = true;
            continue;
        }
        named = true;
        match NodeName::new(text) {
            Ok(name) => {
                names.insert(name);
            }
            Err(error) => {
                sink.error(item_key, format!("invalid node name {text:?}: {error}"));
                valid = false;
            }
        }
    }
    if star && named {
        sink.error(
            key,
            "\"*\" already admits every identity the cluster CA vouches for; do not mix it with node names: write [\"*\"] alone or list the names",
        );
        return None;
    }
    match (valid, star) {
        (false, _) => None,
        (true, true) => Some(Allow::Any),
        (true, false) => Some(Allow::Only(names)),
    }
}

/// Loopback, counting IPv4-mapped IPv6 loopback addresses too.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether two TCP listeners would fight over the same port: the same
/// address, or one of them a wildcard that covers the other (`[::]` is
/// dual-stack on Linux by default, so it covers IPv4 too).
pub(crate) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: IpAddr, narrow: IpAddr| {
        wide.is_unspecified() && (wide.is_ipv6() || narrow.is_ipv4())
    };
    let (a_ip, b_ip) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port()
        && a.port() != 0
        && (a_ip == b_ip || covers(a_ip, b_ip) || covers(b_ip, a_ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn key_paths_quote_keys_that_are_not_bare() {
        assert_eq!(join("", "node"), "node");
        assert_eq!(join("quic", "listen"), "quic.listen");
        assert_eq!(join("forward[1]", "peer"), "forward[1].peer");
        assert_eq!(join("quic", "a b"), "quic.\"a b\"");
        assert_eq!(join("quic", ""), "quic.\"\"");
    }

    #[test]
    fn unknown_keys_name_the_valid_ones_and_a_close_match() {
        let mut sink = Sink::default();
        let parsed = table("lisen = 1\nzzz = 2\npeer = \"x\"");
        TableReader::new(
            &mut sink,
            "forward[0]".to_string(),
            &parsed,
            &["listen", "peer"],
            "each [[forward]]",
        );
        assert_eq!(sink.errors.len(), 2);
        assert_eq!(sink.errors[0].key, "forward[0].lisen");
        assert_eq!(
            sink.errors[0].message,
            "unknown key (did you mean \"listen\"?); valid keys in each [[forward]]: listen, peer"
        );
        assert_eq!(sink.errors[1].key, "forward[0].zzz");
        assert!(!sink.errors[1].message.contains("did you mean"));
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("keepalive", "keep_alive"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn required_optional_and_default_report_once_each() {
        let mut sink = Sink::default();
        let parsed = table("a = \"x\"\nb = 5");
        let reader = TableReader::new(&mut sink, "s".to_string(), &parsed, &["a", "b", "c"], "[s]");
        assert_eq!(reader.required(&mut sink, "a", "h", string), Some("x"));
        assert_eq!(reader.required(&mut sink, "b", "h", string), None);
        assert_eq!(reader.required(&mut sink, "c", "set c", string), None);
        assert_eq!(reader.optional(&mut sink, "c", string), Some(None));
        assert_eq!(reader.optional(&mut sink, "b", string), None);
        assert_eq!(reader.or_default(&mut sink, "c", "d", string), Some("d"));
        let keys: Vec<_> = sink.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            keys,
            [
                "s.b: expected a string, found integer 5",
                "s.c: missing: set c",
                "s.b: expected a string, found integer 5",
            ]
        );
    }

    #[test]
    fn durations_and_sizes_from_values() {
        let range = Duration::from_secs(1)..=Duration::from_secs(600);
        assert_eq!(
            duration_in(&Value::from("10s"), range.clone()),
            Ok(Duration::from_secs(10))
        );
        let bare = duration_in(&Value::from(10), range.clone()).unwrap_err();
        assert!(bare.contains("bare integer 10; write \"10s\""), "{bare}");
        let out = duration_in(&Value::from("900ms"), range.clone()).unwrap_err();
        assert_eq!(out, "must be from 1s to 10m, got 900ms");
        let float = duration_in(&Value::from(1.5), range).unwrap_err();
        assert!(float.contains("found float 1.5"), "{float}");

        let range = 65_536..=1 << 30;
        assert_eq!(size_in(&Value::from(65_536), range.clone()), Ok(65_536));
        assert_eq!(size_in(&Value::from("4MiB"), range.clone()), Ok(4 << 20));
        assert_eq!(
            size_in(&Value::from(1024), range.clone()),
            Err("must be from 64KiB to 1GiB, got 1KiB".to_string())
        );
        let negative = size_in(&Value::from(-1), range.clone()).unwrap_err();
        assert!(negative.contains("negative"), "{negative}");
        let boolean = size_in(&Value::from(true), range).unwrap_err();
        assert!(boolean.contains("found boolean true"), "{boolean}");
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(integer_in::<u32>(&Value::from(16), 1..=16), Ok(16));
        assert_eq!(
            integer_in::<u32>(&Value::from(17), 1..=16),
            Err("must be from 1 to 16, got 17".to_string())
        );
        let text = integer_in::<u32>(&Value::from("4"), 1..=16).unwrap_err();
        assert_eq!(text, "expected an integer, found string \"4\"");
    }
}
