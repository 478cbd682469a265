//! `meshtun status`: asks a running node's admin endpoint for `/status`
//! and prints it for a human, one block per peer, the way `wg show` does.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use meshtun_node::{NodeStatus, PeerStatus};

use crate::{runtime, EXIT_CONFIG, EXIT_RUNTIME};

/// The whole exchange must finish within this.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A status document larger than this is not one.
const MAX_BODY: usize = 16 * 1024 * 1024;

pub(crate) fn status(config: Option<&Path>, admin: Option<SocketAddr>, json: bool) -> ExitCode {
    let addr = match (admin, config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => match meshtun_config::load_local(path) {
            Ok(config) => match config.admin {
                Some(admin) => admin.listen,
                None => {
                    eprintln!(
                        "{}: no [admin] section; `meshtun status` reads the admin endpoint, so add [admin] listen = \"127.0.0.1:9464\" and restart",
                        path.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            Err(errors) => {
                for problem in errors.iter() {
                    eprintln!("{}: {problem}", path.display());
                }
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        // clap requires one of the two.
        (None, None) => return ExitCode::from(crate::EXIT_USAGE),
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let body = match runtime.block_on(async { tokio::time::timeout(TIMEOUT, fetch(addr)).await }) {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            eprintln!("cannot read status from the admin endpoint at {addr}: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        Err(_) => {
            eprintln!("the admin endpoint at {addr} did not answer within {TIMEOUT:?}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if json {
        // Printed as served, once it is known to be JSON at all.
        return match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => {
                say!("{}", String::from_utf8_lossy(&body).trim_end());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{addr}/status is not JSON: {error}");
                ExitCode::from(EXIT_RUNTIME)
            }
        };
    }
    match serde_json::from_slice::<NodeStatus>(&body) {
        Ok(status) => {
            say!("{}", render(&status).trim_end());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{addr}/status is not a meshtun status document: {error}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// GET /status over one HTTP/1.1 connection.
async fn fetch(addr: SocketAddr) -> Result<Bytes, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| format!("{error} (is meshtun running with [admin] on this address?)"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|error| error.to_string())?;
    // The connection task ends when the response is read or the runtime stops.
    tokio::spawn(connection);
    let request = Request::get("/status")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| error.to_string())?;
    let code = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    if !code.is_success() {
        return Err(format!(
            "HTTP {code}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(body)
}

/// The human form: the node, then one block per peer.
pub(crate) fn render(status: &NodeStatus) -> String {
    let mut out = String::new();
    let certificate = &status.certificate;
    let _ = writeln!(out, "node: {}", status.node);
    let _ = writeln!(out, "  version: {}", status.version);
    let _ = writeln!(out, "  quic listen: {}", status.quic_listen);
    let _ = writeln!(out, "  worker threads: {}", status.worker_threads);
    for shard in &status.shards {
        let _ = writeln!(
            out,
            "  shard {}: dials from {}, {} out / {} in connections, {} open streams ({} carried)",
            shard.index,
            shard.dial_addr,
            shard.connections_outgoing,
            shard.connections_incoming,
            shard.open_streams,
            shard.streams
        );
    }
    let _ = writeln!(
        out,
        "  up: {}{}",
        duration(status.uptime_seconds),
        if status.draining { " (draining)" } else { "" }
    );
    let expiry = if certificate.expires_in_seconds >= 0 {
        format!(
            "expires in {}",
            duration(certificate.expires_in_seconds.unsigned_abs())
        )
    } else {
        format!(
            "EXPIRED {} ago",
            duration(certificate.expires_in_seconds.unsigned_abs())
        )
    };
    let _ = writeln!(
        out,
        "  certificate: {} serial {} ({expiry}; {})",
        certificate.identity, certificate.serial, certificate.fingerprint
    );
    if let Some(renewal) = &certificate.renewal {
        let _ = writeln!(out, "  renewal: {}", renewal_line(renewal, now_unix()));
    }
    let reload = &status.reload;
    if reload.successes + reload.failures > 0 {
        let _ = writeln!(
            out,
            "  reloads: {} ok, {} failed",
            reload.successes, reload.failures
        );
    }
    if let Some(error) = &reload.last_error {
        let _ = writeln!(out, "  last reload FAILED: {}", printable(error));
    }
    if !status.incoming_handshakes_failed.is_empty() {
        let _ = writeln!(
            out,
            "  failed incoming handshakes: {}",
            reasons(&status.incoming_handshakes_failed)
        );
    }
    if !status.limit_hits.is_empty() {
        let _ = writeln!(out, "  limits hit: {}", reasons(&status.limit_hits));
    }
    for forward in &status.forwards {
        let _ = writeln!(
            out,
            "  forward: {} -> {}/{}",
            forward.listen, forward.peer, forward.service
        );
    }
    for expose in &status.exposes {
        let _ = writeln!(
            out,
            "  expose: {} -> {} (allow {})",
            expose.service,
            expose.target,
            expose.allow.join(", ")
        );
    }
    if let Some(overlay) = &status.overlay {
        let managed = if overlay.managed { ", managed" } else { "" };
        let _ = writeln!(
            out,
            "  overlay: {} in {} on {}, listener {}{managed}",
            overlay.address,
            printable(&overlay.prefix),
            printable(&overlay.interface),
            overlay.listen
        );
        let guard = match (overlay.guard, overlay.bypass_dropped) {
            (false, _) => "OFF (overlay.guard = false): the overlay address is reachable from off this node in plain text".to_owned(),
            (true, Some(dropped)) => format!("on, {dropped} packet(s) from off this node dropped"),
            (true, None) => "on (its counter is unreadable without CAP_NET_ADMIN, or the table is missing: see the daemon's log)".to_owned(),
        };
        let _ = writeln!(out, "  overlay guard: {guard}");
        for (peer, address) in &overlay.peers {
            let _ = writeln!(out, "  overlay: {address} -> {}", printable(peer));
        }
    }
    if let Some(guard) = &status.guard {
        let dropped = match guard.bypass_dropped {
            Some(dropped) => format!("{dropped} packet(s) from off this node dropped"),
            None => "its counter is unreadable without CAP_NET_ADMIN, or the table is missing: see the daemon's log".to_owned(),
        };
        let _ = writeln!(
            out,
            "  port guard: ports {} kept for meshtun; {dropped}",
            printable(&guard.ports)
        );
    }
    for peer in &status.peers {
        out.push('\n');
        render_peer(&mut out, peer);
    }
    out
}

fn render_peer(out: &mut String, peer: &PeerStatus) {
    let _ = writeln!(out, "peer: {}", peer.name);
    if let Some(addr) = &peer.addr {
        let _ = writeln!(out, "  endpoint: {addr}");
    }
    let state = if peer.connections_up + peer.connections_incoming > 0 {
        "connected"
    } else {
        "NOT CONNECTED"
    };
    let mut links = Vec::new();
    if peer.connections_configured > 0 {
        links.push(format!(
            "{}/{} dialled",
            peer.connections_up, peer.connections_configured
        ));
    }
    if peer.connections_incoming > 0 {
        links.push(format!("{} incoming", peer.connections_incoming));
    }
    let links = if links.is_empty() {
        String::new()
    } else {
        format!(" ({})", links.join(", "))
    };
    let _ = writeln!(out, "  state: {state}{links}");
    if let Some(rtt) = peer.rtt_ms {
        let _ = writeln!(out, "  rtt: {rtt:.2} ms");
    }
    if let Some(mtu) = peer.path_mtu {
        let _ = writeln!(out, "  path MTU: {mtu} bytes of UDP payload");
    }
    for certificate in &peer.certificates {
        let _ = writeln!(
            out,
            "  certificate: serial {} ({})",
            certificate.serial, certificate.fingerprint
        );
    }
    let _ = writeln!(
        out,
        "  transfer: {} received, {} sent",
        bytes(peer.received_bytes),
        bytes(peer.sent_bytes)
    );
    let _ = writeln!(
        out,
        "  streams: {} open; {} opened here, {} by the peer",
        peer.open_streams, peer.streams_outgoing, peer.streams_incoming
    );
    if !peer.refused_outgoing.is_empty() {
        let _ = writeln!(out, "  refused to us: {}", reasons(&peer.refused_outgoing));
    }
    if !peer.refused_incoming.is_empty() {
        let _ = writeln!(out, "  refused by us: {}", reasons(&peer.refused_incoming));
    }
    if !peer.connections_cut.is_empty() {
        let _ = writeln!(
            out,
            "  connections cut (certificate no longer trusted): {}",
            reasons(&peer.connections_cut)
        );
    }
    if !peer.handshakes_failed.is_empty() {
        let _ = writeln!(
            out,
            "  failed handshakes: {}",
            reasons(&peer.handshakes_failed)
        );
    }
    if peer.reconnects > 0 {
        let _ = writeln!(out, "  reconnects: {}", peer.reconnects);
    }
    if let Some(error) = &peer.last_error {
        let _ = writeln!(out, "  last error: {}", printable(error));
    }
}

/// `text` with control characters escaped: an error can quote what a peer
/// sent (its close reason), which must not reach a terminal as escapes.
fn printable(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_control() {
                character.escape_default().to_string()
            } else {
                character.to_string()
            }
        })
        .collect()
}

fn reasons(map: &std::collections::BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(reason, count)| format!("{count} {}", reason_text(reason)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A metric reason label in words. Labels this build does not know (a newer
/// daemon) are shown as they are.
fn reason_text(reason: &str) -> String {
    let text = match reason {
        "refused" => "target refused the connection",
        "unreachable" => "target unreachable",
        "unavailable" => "peer draining or at a limit",
        "stream_limit" => "over quic.max_streams_per_peer",
        "pending_limit" => "over limits.pending_streams_per_peer",
        "preamble_timeout" => "no preamble in time",
        "handshakes" => "over limits.handshakes",
        "open_files" => "out of file descriptors",
        "not_connected" => "peer not connected",
        "no_stream_credit" => "no stream credit from peer",
        "no_welcome" => "not welcomed by peer",
        "rejected" => "rejected by peer",
        "tls" => "TLS (certificate) failure",
        other => return other.replace('_', " "),
    };
    text.to_owned()
}

/// Bytes in binary units, as `wg show` prints transfer.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Seconds as the two largest units: "3 days, 4 hours", "5 minutes, 2 seconds".
/// `[tls] renew` in one line: where, when next, and how it went.
fn renewal_line(renewal: &meshtun_node::RenewalStatus, now: i64) -> String {
    let when = if renewal.in_progress {
        "renewing now".to_owned()
    } else {
        match renewal.next_attempt_unix {
            Some(at) if at > now => format!("next in {}", duration((at - now).unsigned_abs())),
            Some(_) => "next attempt due now".to_owned(),
            None => "no attempt planned".to_owned(),
        }
    };
    let mut line = format!(
        "from {} at {}% of the lifetime; {when}; {} renewed, {} failed",
        renewal.server, renewal.at_percent, renewal.successes, renewal.failures
    );
    if let Some(error) = &renewal.last_error {
        line.push_str(&format!("; LAST ATTEMPT FAILED: {}", printable(error)));
    }
    line
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

fn duration(seconds: u64) -> String {
    let parts = [
        (seconds / 86_400, "day"),
        (seconds / 3_600 % 24, "hour"),
        (seconds / 60 % 60, "minute"),
        (seconds % 60, "second"),
    ];
    let shown: Vec<String> = parts
        .iter()
        .skip_while(|(value, _)| *value == 0)
        .take(2)
        .filter(|(value, _)| *value > 0)
        .map(|(value, unit)| format!("{value} {unit}{}", if *value == 1 { "" } else { "s" }))
        .collect();
    if shown.is_empty() {
        "0 seconds".to_owned()
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_peers_are_escaped() {
        assert_eq!(
            printable("closed: \u{1b}[31mred\n"),
            "closed: \\u{1b}[31mred\\n"
        );
        assert_eq!(printable("plain text"), "plain text");
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.00 GiB");
    }

    #[test]
    fn renewal_says_where_when_and_how_it_went() {
        let mut renewal = meshtun_node::RenewalStatus {
            server: "198.18.0.10:7443".to_owned(),
            at_percent: 67,
            in_progress: false,
            next_attempt_unix: Some(1_000 + 3 * 3600),
            last_attempt_unix: None,
            last_error: None,
            successes: 2,
            failures: 0,
        };
        assert_eq!(
            renewal_line(&renewal, 1_000),
            "from 198.18.0.10:7443 at 67% of the lifetime; next in 3 hours; 2 renewed, 0 failed"
        );
        renewal.failures = 1;
        renewal.last_error = Some("cannot connect to 198.18.0.10:7443".to_owned());
        renewal.next_attempt_unix = Some(1_030);
        assert_eq!(
            renewal_line(&renewal, 1_000),
            "from 198.18.0.10:7443 at 67% of the lifetime; next in 30 seconds; 2 renewed, 1 failed; \
             LAST ATTEMPT FAILED: cannot connect to 198.18.0.10:7443"
        );
        renewal.in_progress = true;
        assert!(renewal_line(&renewal, 1_000).contains("renewing now"));
    }

    #[test]
    fn durations_show_two_units() {
        assert_eq!(duration(0), "0 seconds");
        assert_eq!(duration(1), "1 second");
        assert_eq!(duration(125), "2 minutes, 5 seconds");
        assert_eq!(duration(3 * 86_400 + 4 * 3_600 + 7), "3 days, 4 hours");
        assert_eq!(duration(86_400 + 30), "1 day");
    }
}
