//! `host:port` addresses that may name a host by DNS: peer addresses and
//! expose targets. Names are kept as written so that the node can re-resolve
//! them on every dial; nothing here resolves anything.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest DNS name accepted (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;

/// A host (IP literal or DNS name) and a non-zero port, parsed from
/// `"host:port"`, `"1.2.3.4:443"` or `"[::1]:443"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// An IP address literal (IPv6 without brackets) or a DNS name.
    pub host: String,
    /// The port, never 0.
    pub port: u16,
}

/// Why a string is not a valid `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// There is no `:port` part.
    #[error(
        "\"{0}\" has no port; write host:port, e.g. \"node-0.cluster:4433\" or \"[fd00::1]:4433\""
    )]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("\"{0}\" is not a port; a port is a number from 1 to 65535")]
    BadPort(String),
    /// The host part is empty.
    #[error("the host is empty; write host:port")]
    EmptyHost,
    /// An IPv6 address written without brackets, so its port cannot be told apart.
    #[error("\"{0}\" looks like an IPv6 address without brackets; write \"[address]:port\", e.g. \"[::1]:443\"")]
    UnbracketedIpv6(String),
    /// Text between brackets that is not an IPv6 address.
    #[error("\"{0}\" between brackets is not an IPv6 address")]
    BadIpv6(String),
    /// Dotted digits that do not form an IPv4 address.
    #[error("\"{0}\" is not a valid IPv4 address")]
    BadIpv4(String),
    /// A host name with characters a DNS name cannot hold, or too long.
    #[error(
        "\"{0}\" is not a host name: use letters, digits, '-', '_' and '.', at most 253 characters"
    )]
    BadHost(String),
}

impl HostPort {
    /// The socket address if the host is an IP literal; `None` for a DNS name,
    /// which the caller must resolve (on every dial, since it may move).
    pub fn to_socket_addr_if_literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = text.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(HostPortError::BadIpv6(rest.to_string()));
            };
            let address = inside
                .parse::<Ipv6Addr>()
                .map_err(|_| HostPortError::BadIpv6(inside.to_string()))?;
            let Some(port) = after.strip_prefix(':') else {
                return Err(HostPortError::MissingPort(text.to_string()));
            };
            return Ok(Self {
                host: address.to_string(),
                port: parse_port(port)?,
            });
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(HostPortError::MissingPort(text.to_string()));
        };
        if host.contains(':') {
            return Err(HostPortError::UnbracketedIpv6(text.to_string()));
        }
        let port = parse_port(port)?;
        Ok(Self {
            host: parse_host(host)?,
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn parse_port(text: &str) -> Result<u16, HostPortError> {
    match text.parse::<u16>() {
        Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(HostPortError::BadPort(text.to_string())),
    }
}

/// Checks an IPv4 literal or a DNS name (IPv6 needs brackets and is handled
/// by the caller).
fn parse_host(host: &str) -> Result<String, HostPortError> {
    if host.is_empty() {
        return Err(HostPortError::EmptyHost);
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // Only digits and dots: this is meant as an IPv4 address, so a typo
        // like 198.18.0.256 must not pass as a host name.
        return host
            .parse::<Ipv4Addr>()
            .map(|address| address.to_string())
            .map_err(|_| HostPortError::BadIpv4(host.to_string()));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let labels_ok = host
        .trim_end_matches('.')
        .split('.')
        .all(|label| !label.is_empty() && label.len() <= 63);
    if host.len() > MAX_HOST_LEN || !labels_ok || !host.bytes().all(allowed) {
        return Err(HostPortError::BadHost(host.to_string()));
    }
    Ok(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_port(text: &str) -> Result<HostPort, HostPortError> {
        text.parse()
    }

    #[test]
    fn parses_names_and_literals() {
        let name = host_port("node-0.cluster.local:4433").unwrap();
        assert_eq!(name.host, "node-0.cluster.local");
        assert_eq!(name.port, 4433);
        assert_eq!(name.to_socket_addr_if_literal(), None);

        let v4 = host_port("198.18.0.1:4433").unwrap();
        assert_eq!(v4.host, "198.18.0.1");
        assert_eq!(
            v4.to_socket_addr_if_literal(),
            Some("198.18.0.1:4433".parse().unwrap())
        );

        let v6 = host_port("[::1]:443").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.port, 443);
        assert_eq!(
            v6.to_socket_addr_if_literal(),
            Some("[::1]:443".parse().unwrap())
        );

        assert_eq!(host_port("localhost:65535").unwrap().port, 65535);
        assert_eq!(host_port("a:1").unwrap().host, "a");
    }

    #[test]
    fn displays_back_what_was_written() {
        for text in [
            "node-0:4433",
            "198.18.0.1:4433",
            "[::1]:443",
            "[fd00::2]:29500",
            "gpu_01.rack-2.example:1",
        ] {
            assert_eq!(host_port(text).unwrap().to_string(), text);
        }
        // IPv6 literals are written in their canonical form.
        assert_eq!(
            host_port("[fd00:0:0::0002]:443").unwrap().to_string(),
            "[fd00::2]:443"
        );
    }

    #[test]
    fn refuses_each_kind_of_bad_input() {
        assert!(matches!(
            host_port("node-0"),
            Err(HostPortError::MissingPort(_))
        ));
        assert!(matches!(
            host_port("[::1]"),
            Err(HostPortError::MissingPort(_))
        ));
        assert!(matches!(host_port(":443"), Err(HostPortError::EmptyHost)));
        for port in [
            "node:0",
            "node:65536",
            "node:",
            "node:http",
            "node:+1",
            "node:-1",
        ] {
            assert!(
                matches!(host_port(port), Err(HostPortError::BadPort(_))),
                "{port}"
            );
        }
        assert!(matches!(
            host_port("::1:443"),
            Err(HostPortError::UnbracketedIpv6(_))
        ));
        assert!(matches!(
            host_port("[::g]:443"),
            Err(HostPortError::BadIpv6(_))
        ));
        assert!(matches!(
            host_port("[::1:443"),
            Err(HostPortError::BadIpv6(_))
        ));
        assert!(matches!(
            host_port("[1.2.3.4]:443"),
            Err(HostPortError::BadIpv6(_))
        ));
        assert!(matches!(
            host_port("198.18.0.256:443"),
            Err(HostPortError::BadIpv4(_))
        ));
        for host in [
            "has space:1",
            "tab\there:1",
            " node:1",
            "a..b:1",
            ".lead:1",
            "nœud:1",
            "a/b:1",
        ] {
            assert!(
                matches!(host_port(host), Err(HostPortError::BadHost(_))),
                "{host:?}"
            );
        }
        let long = format!("{}:1", vec!["a".repeat(63); 5].join("."));
        assert!(matches!(host_port(&long), Err(HostPortError::BadHost(_))));
    }

    #[test]
    fn error_messages_say_what_to_write() {
        let missing = host_port("node-0").unwrap_err().to_string();
        assert!(missing.contains("host:port"), "{missing}");
        let bare_v6 = host_port("fd00::1:443").unwrap_err().to_string();
        assert!(bare_v6.contains("[::1]:443"), "{bare_v6}");
    }
}
