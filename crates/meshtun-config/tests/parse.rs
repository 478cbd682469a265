//! The config schema through the public API: what parses, with which values
//! and defaults, and the exact error (key path and message) for each kind of
//! mistake, all of them reported in one run.

// Helpers here are not `#[test]` functions, which clippy's
// allow-unwrap-in-tests does not cover; a panic in a test file is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use meshtun_config::{load, parse, Allow, Config, ConfigErrors, HostPort, EXAMPLE};
use meshtun_proto::{NodeName, ServiceName};

/// A complete config with every section, as an operator might write it.
const FULL_EXAMPLE: &str = r#"
node = "node-1"                     # must equal this node's certificate identity

[quic]
listen = "198.18.0.2:4433"          # required: no default address
# connections_per_peer = 1

[tls]
ca = "/etc/meshtun/ca.crt"          # PEM, may hold several CA certificates
cert = "/etc/meshtun/node-1.crt"
key = "/etc/meshtun/node-1.key"     # refused if group/world readable
# crl = "/etc/meshtun/crl.pem"

[[peer]]
name = "node-0"
addr = "198.18.0.1:4433"            # host:port; names re-resolved on every dial

[[forward]]                         # a local listener -> a service on a peer
listen = "127.0.0.1:29550"          # loopback only, unless allow_non_loopback = true
peer = "node-0"
service = "vllm-dp-rpc"

[[expose]]                          # a service this node offers
service = "torch-store"
target = "127.0.0.1:29500"
allow = ["node-0", "node-2"]        # default deny; "*" = every cluster identity

[admin]
listen = "127.0.0.1:9464"           # /metrics (Prometheus), /status (JSON)
"#;

/// The smallest valid file: only what has no default.
const MINIMAL: &str = r#"
node = "node-1"
[quic]
listen = "198.18.0.2:4433"
[tls]
ca = "ca.crt"
cert = "node-1.crt"
key = "node-1.key"
"#;

/// MINIMAL with `quic` lines added to [quic] and `rest` appended.
fn with(quic: &str, rest: &str) -> String {
    MINIMAL.replace(
        "listen = \"198.18.0.2:4433\"\n",
        &format!("listen = \"198.18.0.2:4433\"\n{quic}\n"),
    ) + rest
}

/// Two declared peers, for forward tests.
const PEERS: &str = r#"
[[peer]]
name = "node-0"
addr = "198.18.0.1:4433"
[[peer]]
name = "node-2"
addr = "node-2.cluster:4433"
"#;

fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(config) => config,
        Err(errors) => panic!("expected the config to parse, got:\n{errors}"),
    }
}

fn errors(text: &str) -> Vec<(String, String)> {
    match parse(text) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(errors) => {
            assert!(!errors.is_empty());
            errors
                .iter()
                .map(|error| (error.key.clone(), error.message.clone()))
                .collect()
        }
    }
}

/// Asserts that `text` fails with exactly one error, at `key`, whose message
/// contains `fragment`; returns the message.
#[track_caller]
fn one_error(text: &str, key: &str, fragment: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let (found_key, message) = &errors[0];
    assert_eq!(found_key, key, "{message}");
    assert!(
        message.contains(fragment),
        "message for {key} lacks {fragment:?}: {message}"
    );
    message.clone()
}

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn address(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn design_example_parses_with_its_values() {
    let config = ok(FULL_EXAMPLE);
    assert_eq!(config.node, node("node-1"));
    assert_eq!(config.quic.listen, address("198.18.0.2:4433"));
    assert_eq!(config.quic.connections_per_peer.get(), 1);
    assert_eq!(config.tls.ca, PathBuf::from("/etc/meshtun/ca.crt"));
    assert_eq!(config.tls.cert, PathBuf::from("/etc/meshtun/node-1.crt"));
    assert_eq!(config.tls.key, PathBuf::from("/etc/meshtun/node-1.key"));
    assert_eq!(config.tls.crl, None);

    assert_eq!(config.peers.len(), 1);
    let peer = config.peer(&node("node-0")).unwrap();
    assert_eq!(
        peer.addr,
        HostPort {
            host: "198.18.0.1".to_string(),
            port: 4433
        }
    );
    assert!(config.peer(&node("node-2")).is_none());

    assert_eq!(config.forwards.len(), 1);
    let forward = &config.forwards[0];
    assert_eq!(forward.listen, address("127.0.0.1:29550"));
    assert_eq!(forward.peer, node("node-0"));
    assert_eq!(forward.service, service("vllm-dp-rpc"));
    assert!(!forward.allow_non_loopback);

    let expose = config.expose(&service("torch-store")).unwrap();
    assert_eq!(expose.target.to_string(), "127.0.0.1:29500");
    assert_eq!(
        expose.allow,
        Allow::Only(BTreeSet::from([node("node-0"), node("node-2")]))
    );
    assert!(expose.allow.permits(&node("node-2")));
    assert!(!expose.allow.permits(&node("node-1")));
    assert!(config.expose(&service("vllm-dp-rpc")).is_none());

    assert_eq!(
        config.admin.as_ref().map(|admin| admin.listen),
        Some(address("127.0.0.1:9464"))
    );
}

#[test]
fn example_parses_and_is_a_consistent_node_1() {
    let config = ok(EXAMPLE);
    assert_eq!(config.node, node("node-1"));
    assert_eq!(config.quic.listen, address("198.18.0.2:4433"));
    assert_eq!(config.tls.cert, PathBuf::from("/etc/meshtun/node-1.crt"));
    assert_eq!(config.peers.len(), 1);
    assert_eq!(config.peers[0].name, node("node-0"));
    assert_eq!(config.forwards[0].peer, node("node-0"));
    // Every identity allowed in is a node of the two-node cluster.
    for expose in &config.exposes {
        assert!(expose.allow.permits(&node("node-0")));
        assert!(!expose.allow.permits(&node("node-2")));
    }
    assert!(config.admin.is_some());
    // Defaults: the example sets nothing optional.
    let minimal = ok(MINIMAL);
    assert_eq!(config.quic.idle_timeout, minimal.quic.idle_timeout);
    assert_eq!(config.limits, minimal.limits);
}

#[test]
fn example_comments_state_the_real_defaults() {
    // Uncomment every `# key = value` line: the result must equal the defaults.
    let mut uncommented = 0;
    let text: String = EXAMPLE
        .lines()
        .map(|line| {
            let body = line.strip_prefix("# ").unwrap_or("");
            let is_setting = body
                .split_once(" = ")
                .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            if is_setting {
                uncommented += 1;
                format!("{body}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    // 12 [quic] keys, crl, renew, 2 allow_non_loopback, 9 [limits] keys, 4 [overlay] keys.
    assert_eq!(uncommented, 29);
    let explicit = ok(&text);
    let defaults = ok(EXAMPLE);
    assert_eq!(explicit.quic, defaults.quic);
    assert_eq!(explicit.limits, defaults.limits);
    assert_eq!(explicit.forwards, defaults.forwards);
    assert_eq!(explicit.admin, defaults.admin);
    assert_eq!(explicit.overlay, defaults.overlay);
    assert_eq!(
        explicit.tls.crl,
        Some(PathBuf::from("/etc/meshtun/crl.pem"))
    );
    assert_eq!(
        explicit.tls.renew.map(|renew| renew.at_percent),
        Some(meshtun_config::Renew::DEFAULT_AT_PERCENT)
    );
}

#[test]
fn defaults_are_applied() {
    let config = ok(MINIMAL);
    let quic = &config.quic;
    assert_eq!(quic.connections_per_peer, NonZeroUsize::MIN);
    assert_eq!(quic.idle_timeout, Duration::from_secs(10));
    assert_eq!(quic.keep_alive, Duration::from_secs(2));
    assert_eq!(quic.handshake_timeout, Duration::from_secs(5));
    assert_eq!(quic.max_streams_per_peer, 16_384);
    assert_eq!(quic.stream_window, 4_194_304);
    assert_eq!(quic.connection_window, 128 << 20);
    assert_eq!(quic.send_window, 32 << 20);
    assert_eq!(quic.udp_send_buffer, 8 << 20);
    assert_eq!(quic.udp_recv_buffer, 8 << 20);
    assert_eq!(quic.reconnect_min, Duration::from_millis(100));
    assert_eq!(quic.reconnect_max, Duration::from_secs(10));
    assert_eq!(config.limits.preamble_timeout, Duration::from_secs(5));
    assert_eq!(config.limits.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.limits.drain_grace, Duration::from_secs(10));
    assert_eq!(config.limits.pending_streams_per_peer, 1024);
    assert_eq!(config.limits.connections_per_peer, 256);
    assert_eq!(config.limits.handshakes, 64);
    assert_eq!(config.limits.retry_above, 8);
    assert_eq!(config.limits.accept_backoff_max, Duration::from_secs(1));
    assert_eq!(config.limits.buffer_memory, 256 << 20);
    assert_eq!(config.limits.worker_threads, None);
    assert_eq!(config.limits.shards, None);
    let cpus = NonZeroUsize::new(6).expect("not 0");
    assert_eq!(config.limits.shard_count(cpus), cpus);
    assert!(config.peers.is_empty());
    assert!(config.forwards.is_empty());
    assert!(config.exposes.is_empty());
    assert!(config.admin.is_none());
    // parse keeps relative paths as written; only load resolves them.
    assert_eq!(config.tls.ca, PathBuf::from("ca.crt"));
}

#[test]
fn every_setting_can_be_changed() {
    let config = ok(&with(
        r#"connections_per_peer = 16
idle_timeout = "1m"
keep_alive = "59s"
handshake_timeout = "100ms"
max_streams_per_peer = 1000000
stream_window = "64KiB"
connection_window = 65536
send_window = "4GiB"
udp_send_buffer = "1GiB"
udp_recv_buffer = 65536
reconnect_min = "10ms"
reconnect_max = "10ms""#,
        r#"
[limits]
preamble_timeout = "250ms"
connect_timeout = "1m"
drain_grace = "0s"
pending_streams_per_peer = 1
connections_per_peer = 1024
handshakes = 100000
retry_above = 0
accept_backoff_max = "10ms"
buffer_memory = "64GiB"
worker_threads = 1024
shards = 1024
"#,
    ));
    let quic = &config.quic;
    assert_eq!(quic.connections_per_peer.get(), 16);
    assert_eq!(quic.idle_timeout, Duration::from_secs(60));
    assert_eq!(quic.keep_alive, Duration::from_secs(59));
    assert_eq!(quic.handshake_timeout, Duration::from_millis(100));
    assert_eq!(quic.max_streams_per_peer, 1_000_000);
    assert_eq!(quic.stream_window, 65_536);
    assert_eq!(quic.connection_window, 65_536);
    assert_eq!(quic.send_window, 4 << 30);
    assert_eq!(quic.udp_send_buffer, 1 << 30);
    assert_eq!(quic.udp_recv_buffer, 65_536);
    assert_eq!(quic.reconnect_min, Duration::from_millis(10));
    assert_eq!(quic.reconnect_max, Duration::from_millis(10));
    assert_eq!(config.limits.preamble_timeout, Duration::from_millis(250));
    assert_eq!(config.limits.connect_timeout, Duration::from_secs(60));
    assert_eq!(config.limits.drain_grace, Duration::ZERO);
    assert_eq!(config.limits.pending_streams_per_peer, 1);
    assert_eq!(config.limits.connections_per_peer, 1024);
    assert_eq!(config.limits.handshakes, 100_000);
    assert_eq!(config.limits.retry_above, 0);
    assert_eq!(config.limits.accept_backoff_max, Duration::from_millis(10));
    assert_eq!(config.limits.buffer_memory, 64 << 30);
    assert_eq!(
        config.limits.worker_threads.map(NonZeroUsize::get),
        Some(1024)
    );
    assert_eq!(config.limits.shards.map(NonZeroUsize::get), Some(1024));
}

#[test]
fn shards_default_to_the_cpus_within_worker_threads() {
    let cpus = |count| NonZeroUsize::new(count).expect("not 0");
    let limits = |body: &str| format!("{MINIMAL}[limits]\n{body}\n");
    let config = ok(&limits("worker_threads = 3"));
    assert_eq!(config.limits.shard_count(cpus(8)), cpus(3));
    assert_eq!(config.limits.shard_count(cpus(2)), cpus(2));
    // Set, it is what it says, even beyond the CPUs.
    let config = ok(&limits("shards = 4"));
    assert_eq!(config.limits.shard_count(cpus(2)), cpus(4));
    let config = ok(&limits("shards = 2\nworker_threads = 2"));
    assert_eq!(config.limits.shard_count(cpus(16)), cpus(2));
}

#[test]
fn syntax_error_is_one_error_with_line_and_column() {
    let message = one_error(
        "node = \"node-1\"\n[quic]\nlisten = = 1\n",
        "",
        "TOML syntax error at line 3, column",
    );
    assert!(message.len() > "TOML syntax error at line 3, column 1: ".len());
    let duplicate = errors("node = \"a\"\nnode = \"b\"\n");
    assert_eq!(duplicate.len(), 1);
    assert!(duplicate[0].1.contains("line 2"), "{}", duplicate[0].1);
}

#[test]
fn unknown_keys_are_reported_everywhere_with_the_valid_keys() {
    let text = with(
        "lisen = \"x\"",
        &format!(
            r#"{PEERS}
ports = 1
[[forward]]
listen = "127.0.0.1:1000"
peer = "node-0"
service = "a"
target = "x"
[[expose]]
service = "b"
target = "127.0.0.1:1"
allow = ["*"]
alow = ["*"]
[limits]
drain = "1s"
[admin]
listen = "127.0.0.1:9464"
port = 1
"#
        ),
    )
    .replace(
        "key = \"node-1.key\"",
        "key = \"node-1.key\"\npassword = \"x\"",
    );
    let errors = errors(&text);
    let keys: Vec<&str> = errors.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "quic.lisen",
            "tls.password",
            "peer[1].ports",
            "forward[0].target",
            "expose[0].alow",
            "limits.drain",
            "admin.port"
        ]
    );
    assert_eq!(
        errors[0].1,
        "unknown key (did you mean \"listen\"?); valid keys in [quic]: listen, connections_per_peer, \
         idle_timeout, keep_alive, handshake_timeout, max_streams_per_peer, stream_window, \
         connection_window, send_window, udp_send_buffer, udp_recv_buffer, reconnect_min, reconnect_max"
    );
    assert_eq!(
        errors[2].1,
        "unknown key; valid keys in each [[peer]]: name, addr, overlay"
    );
    assert_eq!(
        errors[3].1,
        "unknown key; valid keys in each [[forward]]: listen, peer, service, allow_non_loopback"
    );
    assert!(
        errors[4].1.contains("did you mean \"allow\""),
        "{}",
        errors[4].1
    );
    assert!(errors[5]
        .1
        .contains("valid keys in [limits]: preamble_timeout, connect_timeout, drain_grace, "));
}

#[test]
fn unknown_top_level_key_and_misplaced_node() {
    let message = one_error(
        &format!("{MINIMAL}\npeers = []\n"),
        "tls.peers",
        "valid keys in [tls]: ca, cert, key, crl",
    );
    assert!(!message.contains("did you mean"), "{message}");
    let top = one_error(
        &format!("nodes = 1\n{MINIMAL}"),
        "nodes",
        "did you mean \"node\"?",
    );
    assert!(top.contains(
        "valid keys in the top level: node, quic, tls, peer, forward, expose, limits, admin"
    ));
    // `node` written below a section header belongs to that section.
    let misplaced = MINIMAL.replace("node = \"node-1\"\n", "") + "node = \"node-1\"\n";
    let errors = errors(&misplaced);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    // Read in order: the top level (node is missing), then [tls].
    let (missing, misplaced) = (&errors[0], &errors[1]);
    assert_eq!(missing.0, "node");
    assert!(missing.1.starts_with("missing: "), "{}", missing.1);
    assert!(
        missing.1.contains("above the first [section]"),
        "{}",
        missing.1
    );
    assert_eq!(misplaced.0, "tls.node");
    assert!(
        misplaced
            .1
            .contains("must come before the first [section] header"),
        "{}",
        misplaced.1
    );
}

#[test]
fn wrong_types_name_what_was_expected_and_found() {
    let text = with(
        "idle_timeout = 10\nmax_streams_per_peer = \"4096\"\nstream_window = 1.5",
        "[[peer]]\nname = 7\naddr = \"a:1\"\n[admin]\nlisten = \"127.0.0.1:1\"\nallow_non_loopback = \"yes\"\n",
    )
    .replace("node = \"node-1\"", "node = [\"node-1\"]");
    let errors = errors(&text);
    let rendered: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    assert_eq!(
        rendered,
        [
            "node: expected a string, found array",
            "quic.idle_timeout: expected a duration string with a unit, found the bare integer 10; write \"10s\" or \"10ms\"",
            "quic.max_streams_per_peer: expected an integer, found string \"4096\"",
            "quic.stream_window: expected a size in bytes, as an integer or a string such as \"4MiB\", found float 1.5",
            "peer[0].name: expected a string, found integer 7",
            "admin.allow_non_loopback: expected true or false, found string \"yes\"",
        ]
    );
}

#[test]
fn sections_of_the_wrong_shape() {
    one_error(
        &format!(
            "quic = 1\n{}",
            MINIMAL.replace("[quic]\nlisten = \"198.18.0.2:4433\"\n", "")
        ),
        "quic",
        "expected a table [quic], found integer 1",
    );
    one_error(
        &format!("{MINIMAL}[peer]\nname = \"node-0\"\naddr = \"a:1\"\n"),
        "peer",
        "write [[peer]] (double brackets)",
    );
    one_error(
        &MINIMAL.replace("node = \"node-1\"", "node = \"node-1\"\nforward = [1]"),
        "forward[0]",
        "expected a table [[forward]], found integer 1",
    );
    // Inline tables in an array are the same thing as [[peer]].
    let inline = MINIMAL.replace(
        "node = \"node-1\"",
        "node = \"node-1\"\npeer = [{ name = \"node-0\", addr = \"198.18.0.1:4433\" }]",
    );
    assert_eq!(ok(&inline).peers[0].name, node("node-0"));
}

#[test]
fn node_missing_or_invalid() {
    one_error(
        &MINIMAL.replace("node = \"node-1\"\n", ""),
        "node",
        "missing: set node = \"<name>\" to this node's certificate identity",
    );
    let message = one_error(
        &MINIMAL.replace("node = \"node-1\"", "node = \"node 1\""),
        "node",
        "invalid node name \"node 1\": ",
    );
    assert!(message.contains("only ASCII letters, digits"), "{message}");
}

#[test]
fn quic_listen_is_required_even_without_a_quic_section() {
    let expected = "missing: meshtun has no default QUIC address; set the UDP address peers dial, e.g. \"198.18.0.2:4433\"";
    let no_listen = MINIMAL.replace("listen = \"198.18.0.2:4433\"\n", "");
    assert_eq!(one_error(&no_listen, "quic.listen", expected), expected);
    let no_section = MINIMAL.replace("[quic]\nlisten = \"198.18.0.2:4433\"\n", "");
    assert_eq!(one_error(&no_section, "quic.listen", expected), expected);
    let parse_error = one_error(
        &MINIMAL.replace("198.18.0.2:4433", "node-1:4433"),
        "quic.listen",
        "is not an IP address and port",
    );
    assert!(parse_error.contains("not a host name"), "{parse_error}");
    // Port 0 is allowed for the QUIC endpoint (tests bind port 0).
    assert_eq!(
        ok(&MINIMAL.replace("198.18.0.2:4433", "127.0.0.1:0"))
            .quic
            .listen
            .port(),
        0
    );
}

#[test]
fn tls_section_and_its_files_are_required() {
    let no_tls = MINIMAL.replace(
        "[tls]\nca = \"ca.crt\"\ncert = \"node-1.crt\"\nkey = \"node-1.key\"\n",
        "",
    );
    one_error(
        &no_tls,
        "tls",
        "missing: [tls] is required, with ca, cert and key",
    );
    let empty_tls = MINIMAL.replace(
        "ca = \"ca.crt\"\ncert = \"node-1.crt\"\nkey = \"node-1.key\"\n",
        "",
    );
    let errors = errors(&empty_tls);
    let keys: Vec<&str> = errors.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["tls.ca", "tls.cert", "tls.key"]);
    assert!(errors
        .iter()
        .all(|(_, message)| message.starts_with("missing: ")));
    one_error(
        &MINIMAL.replace("ca = \"ca.crt\"", "ca = \"\""),
        "tls.ca",
        "the path is empty",
    );
    let crl = ok(&MINIMAL.replace(
        "ca = \"ca.crt\"",
        "ca = \"ca.crt\"\ncrl = \"/etc/meshtun/crl.pem\"",
    ));
    assert_eq!(crl.tls.crl, Some(PathBuf::from("/etc/meshtun/crl.pem")));
}

#[test]
fn tls_renew_names_the_server_and_pinned_ca_and_when() {
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let renewing = |fields: &str| {
        MINIMAL.replace(
            "key = \"node-1.key\"\n",
            &format!("key = \"node-1.key\"\nrenew = {{ {fields} }}\n"),
        )
    };
    let config = ok(&renewing(&format!(
        "server = \"ca-host:4434\", ca_fingerprint = \"{fingerprint}\""
    )));
    let renew = config.tls.renew.expect("renew");
    assert_eq!(renew.server.to_string(), "ca-host:4434");
    assert_eq!(renew.ca_fingerprint, fingerprint);
    assert_eq!(renew.at_percent, 67);
    let half = ok(&renewing(&format!(
        "server = \"198.18.0.1:4434\", ca_fingerprint = \"{fingerprint}\", at = 0.5"
    )));
    assert_eq!(half.tls.renew.expect("renew").at_percent, 50);
    let openssl_spelling = format!("SHA256:{}", ["AB"; 32].join(":"));
    ok(&renewing(&format!(
        "server = \"ca-host:4434\", ca_fingerprint = \"{openssl_spelling}\""
    )));
    assert_eq!(ok(MINIMAL).tls.renew, None);

    one_error(
        &renewing(&format!("ca_fingerprint = \"{fingerprint}\"")),
        "tls.renew.server",
        "missing: the renewal server",
    );
    one_error(
        &renewing("server = \"ca-host:4434\", ca_fingerprint = \"sha256:abc\""),
        "tls.renew.ca_fingerprint",
        "is not a CA fingerprint",
    );
    one_error(
        &renewing(&format!(
            "server = \"ca-host:4434\", ca_fingerprint = \"{fingerprint}\", at = 0.95"
        )),
        "tls.renew.at",
        "outside 0.1..=0.9",
    );
    one_error(
        &renewing(&format!(
            "server = \"ca-host:4434\", ca_fingerprint = \"{fingerprint}\", at = 67"
        )),
        "tls.renew.at",
        "e.g. 0.67",
    );
    one_error(
        &renewing(&format!(
            "server = \"ca-host:4434\", ca_fingerprint = \"{fingerprint}\", sever = 1"
        )),
        "tls.renew.sever",
        "unknown key",
    );
    one_error(
        &MINIMAL.replace(
            "key = \"node-1.key\"\n",
            "key = \"node-1.key\"\nrenew = \"ca-host:4434\"\n",
        ),
        "tls.renew",
        "expected a table",
    );
}

#[test]
fn peer_errors() {
    let text = format!(
        r#"{MINIMAL}
[[peer]]
name = "node-0"
addr = "198.18.0.1:4433"
[[peer]]
name = "bad name"
addr = "198.18.0.3:4433"
[[peer]]
name = "node-0"
addr = "198.18.0.4:4433"
[[peer]]
name = "node-1"
addr = "198.18.0.2:4433"
[[peer]]
name = "node-5"
addr = "198.18.0.5"
[[peer]]
addr = "[fd00::6]:4433"
"#
    );
    let errors = errors(&text);
    let rendered: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    assert_eq!(rendered.len(), 5, "{rendered:#?}");
    assert!(rendered[0].starts_with("peer[1].name: invalid node name \"bad name\": "));
    assert_eq!(
        rendered[1],
        "peer[2].name: duplicate peer \"node-0\", already declared in peer[0]"
    );
    assert_eq!(
        rendered[2],
        "peer[3].name: \"node-1\" is this node's own name (node); a node does not peer with itself"
    );
    assert!(
        rendered[3].starts_with("peer[4].addr: \"198.18.0.5\" has no port"),
        "{}",
        rendered[3]
    );
    assert!(
        rendered[4].starts_with("peer[5].name: missing: "),
        "{}",
        rendered[4]
    );
}

#[test]
fn peers_with_names_and_ipv6_addresses() {
    let config = ok(&format!(
        "{MINIMAL}{PEERS}[[peer]]\nname = \"node-3\"\naddr = \"[fd00::3]:4433\"\n"
    ));
    let names: Vec<&str> = config.peers.iter().map(|peer| peer.name.as_str()).collect();
    assert_eq!(names, ["node-0", "node-2", "node-3"]);
    let by_name = &config.peer(&node("node-2")).unwrap().addr;
    assert_eq!(by_name.host, "node-2.cluster");
    assert_eq!(by_name.to_socket_addr_if_literal(), None);
    let v6 = &config.peer(&node("node-3")).unwrap().addr;
    assert_eq!(
        v6.to_socket_addr_if_literal(),
        Some(address("[fd00::3]:4433"))
    );
    assert_eq!(v6.to_string(), "[fd00::3]:4433");
}

fn forward(listen: &str, peer: &str, service: &str, extra: &str) -> String {
    format!(
        "[[forward]]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nservice = \"{service}\"\n{extra}\n"
    )
}

#[test]
fn forward_to_an_undeclared_peer() {
    let text = format!(
        "{MINIMAL}{PEERS}{}",
        forward("127.0.0.1:29550", "node-9", "svc", "")
    );
    let message = one_error(&text, "forward[0].peer", "");
    assert_eq!(
        message,
        "unknown peer \"node-9\"; declared peers: node-0, node-2"
    );
    let no_peers = format!(
        "{MINIMAL}{}",
        forward("127.0.0.1:29550", "node-0", "svc", "")
    );
    assert_eq!(
        one_error(&no_peers, "forward[0].peer", ""),
        "unknown peer \"node-0\"; no [[peer]] is declared"
    );
    one_error(
        &format!(
            "{MINIMAL}{PEERS}{}",
            forward("127.0.0.1:29550", "node-1", "svc", "")
        ),
        "forward[0].peer",
        "\"node-1\" is this node itself",
    );
}

#[test]
fn forward_to_a_broken_peer_is_reported_once() {
    // The peer's own entry is wrong; the forward naming it adds no second error.
    let text = format!(
        "{MINIMAL}[[peer]]\nname = \"node-0\"\naddr = \"nowhere\"\n{}",
        forward("127.0.0.1:29550", "node-0", "svc", "")
    );
    one_error(&text, "peer[0].addr", "has no port");
    // An unknown peer lists every peer written, the broken one included, once.
    let text = format!(
        "{MINIMAL}{PEERS}[[peer]]\nname = \"node-2\"\naddr = \"x:1\"\n[[peer]]\nname = \"node-3\"\n{}",
        forward("127.0.0.1:29550", "node-9", "svc", "")
    );
    let errors = errors(&text);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_eq!(errors[0].0, "peer[2].name");
    assert_eq!(errors[1].0, "peer[3].addr");
    assert_eq!(
        errors[2],
        (
            "forward[0].peer".to_string(),
            "unknown peer \"node-9\"; declared peers: node-0, node-2, node-3".to_string()
        )
    );
}

#[test]
fn forward_field_errors() {
    let text = format!(
        "{MINIMAL}{PEERS}{}{}{}",
        forward("127.0.0.1:29550", "node-0", "bad/service", ""),
        forward("127.0.0.1:0", "node-0", "svc", ""),
        forward("localhost:29551", "node-0", "svc", ""),
    );
    let errors = errors(&text);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_eq!(errors[0].0, "forward[0].service");
    assert!(errors[0]
        .1
        .starts_with("invalid service name \"bad/service\": "));
    assert_eq!(errors[1].0, "forward[1].listen");
    assert!(
        errors[1].1.contains("a forward needs a fixed port"),
        "{}",
        errors[1].1
    );
    assert_eq!(errors[2].0, "forward[2].listen");
    assert!(errors[2].1.contains("is not an IP address and port"));
}

#[test]
fn forward_listeners_are_loopback_only_unless_allowed() {
    let exposed = format!(
        "{MINIMAL}{PEERS}{}",
        forward("0.0.0.0:29550", "node-0", "svc", "")
    );
    let message = one_error(
        &exposed,
        "forward[0].listen",
        "0.0.0.0:29550 is not a loopback address",
    );
    assert!(
        message.contains("anything that can reach the port can use the tunnel"),
        "{message}"
    );
    assert!(message.contains("allow_non_loopback = true"), "{message}");

    let allowed = ok(&format!(
        "{MINIMAL}{PEERS}{}",
        forward(
            "0.0.0.0:29550",
            "node-0",
            "svc",
            "allow_non_loopback = true"
        )
    ));
    assert!(allowed.forwards[0].allow_non_loopback);
    assert_eq!(allowed.forwards[0].listen, address("0.0.0.0:29550"));

    for loopback in ["127.0.0.5:29550", "[::1]:29550", "[::ffff:127.0.0.1]:29550"] {
        ok(&format!(
            "{MINIMAL}{PEERS}{}",
            forward(loopback, "node-0", "svc", "")
        ));
    }
}

#[test]
fn listeners_may_not_collide() {
    let text = format!(
        "{MINIMAL}{PEERS}{}{}{}{}[admin]\nlisten = \"127.0.0.1:29550\"\n",
        forward("127.0.0.1:29550", "node-0", "a", ""),
        forward("127.0.0.1:29551", "node-0", "b", ""),
        forward("127.0.0.1:29550", "node-2", "c", ""),
        forward("0.0.0.0:29551", "node-2", "d", "allow_non_loopback = true"),
    );
    let errors = errors(&text);
    let rendered: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    assert_eq!(
        rendered,
        [
            "forward[2].listen: 127.0.0.1:29550 is already used by forward[0].listen",
            "forward[3].listen: 0.0.0.0:29551 overlaps forward[1].listen (127.0.0.1:29551): both would listen on TCP port 29551",
            "admin.listen: 127.0.0.1:29550 is already used by forward[0].listen",
        ]
    );
    // The same port on distinct loopback addresses is fine (one per node in tests).
    ok(&format!(
        "{MINIMAL}{PEERS}{}{}",
        forward("127.0.0.2:29550", "node-0", "a", ""),
        forward("127.0.0.3:29550", "node-2", "a", ""),
    ));
}

fn expose(service: &str, target: &str, allow: &str) -> String {
    format!("[[expose]]\nservice = \"{service}\"\ntarget = \"{target}\"\n{allow}\n")
}

#[test]
fn expose_errors() {
    let text = format!(
        "{MINIMAL}{}{}{}{}{}",
        expose("torch-store", "127.0.0.1:29500", "allow = [\"node-0\"]"),
        expose("-bad", "127.0.0.1:29500", "allow = [\"node-0\"]"),
        expose("torch-store", "127.0.0.1:29501", "allow = [\"node-2\"]"),
        expose("rpc", "127.0.0.1", "allow = [\"node-0\"]"),
        expose("rpc2", "127.0.0.1:1", ""),
    );
    let errors = errors(&text);
    let rendered: Vec<String> = errors.iter().map(|(k, m)| format!("{k}: {m}")).collect();
    assert_eq!(rendered.len(), 4, "{rendered:#?}");
    assert_eq!(
        rendered[0],
        "expose[1].service: invalid service name \"-bad\": name must start with an ASCII letter or digit"
    );
    assert_eq!(
        rendered[1],
        "expose[2].service: service \"torch-store\" is already exposed by expose[0]; each service is exposed once"
    );
    assert!(
        rendered[2].starts_with("expose[3].target: \"127.0.0.1\" has no port"),
        "{}",
        rendered[2]
    );
    assert_eq!(
        rendered[3],
        "expose[4].allow: missing: default deny: an empty allow list lets nobody in; list node names or \"*\""
    );
}

#[test]
fn allow_lists() {
    let allow = |list: &str| {
        format!(
            "{MINIMAL}{}",
            expose("svc", "127.0.0.1:1", &format!("allow = {list}"))
        )
    };
    assert_eq!(
        one_error(&allow("[]"), "expose[0].allow", ""),
        "default deny: an empty allow list lets nobody in; list node names or \"*\""
    );
    one_error(
        &allow("[\"*\", \"node-0\"]"),
        "expose[0].allow",
        "do not mix it with node names",
    );
    one_error(
        &allow("[\"node-0\", \"*\"]"),
        "expose[0].allow",
        "write [\"*\"] alone or list the names",
    );
    one_error(
        &allow("[\"node-0\", \"no de\"]"),
        "expose[0].allow[1]",
        "invalid node name \"no de\"",
    );
    assert_eq!(
        one_error(
            &allow("[\"node-0\", \"node-2\", \"node-0\"]"),
            "expose[0].allow[2]",
            ""
        ),
        "duplicate \"node-0\", already listed as allow[0]"
    );
    one_error(
        &allow("[\"*\", \"*\"]"),
        "expose[0].allow[1]",
        "duplicate \"*\"",
    );
    one_error(
        &allow("[\"node-0\", 3]"),
        "expose[0].allow[1]",
        "expected a node name or \"*\", found integer 3",
    );
    one_error(
        &allow("\"*\""),
        "expose[0].allow",
        "expected a list of node names",
    );

    let any = ok(&allow("[\"*\"]"));
    assert_eq!(any.exposes[0].allow, Allow::Any);
    assert!(any.exposes[0].allow.permits(&node("anyone")));
    let only = ok(&allow("[\"node-2\", \"node-0\"]"));
    assert_eq!(
        only.exposes[0].allow,
        Allow::Only(BTreeSet::from([node("node-0"), node("node-2")]))
    );
    // Identities allowed in need not be peers this node dials.
    assert!(only.peers.is_empty());
}

#[test]
fn expose_targets_may_be_names_or_ipv6() {
    let config = ok(&format!(
        "{MINIMAL}{}{}",
        expose("a", "localhost:29500", "allow = [\"*\"]"),
        expose("b", "[::1]:29500", "allow = [\"*\"]"),
    ));
    assert_eq!(config.exposes[0].target.host, "localhost");
    assert_eq!(
        config.exposes[1].target.to_socket_addr_if_literal(),
        Some(address("[::1]:29500"))
    );
}

#[test]
fn quic_ranges() {
    let cases = [
        (
            "connections_per_peer = 0",
            "quic.connections_per_peer",
            "must be from 1 to 16, got 0",
        ),
        (
            "connections_per_peer = 17",
            "quic.connections_per_peer",
            "must be from 1 to 16, got 17",
        ),
        (
            "idle_timeout = \"999ms\"",
            "quic.idle_timeout",
            "must be from 1s to 10m, got 999ms",
        ),
        (
            "idle_timeout = \"601s\"",
            "quic.idle_timeout",
            "must be from 1s to 10m, got 601s",
        ),
        (
            "keep_alive = \"0s\"",
            "quic.keep_alive",
            "must be from 1ms to 10m, got 0s",
        ),
        (
            "handshake_timeout = \"99ms\"",
            "quic.handshake_timeout",
            "must be from 100ms to 1m, got 99ms",
        ),
        (
            "handshake_timeout = \"61s\"",
            "quic.handshake_timeout",
            "must be from 100ms to 1m, got 61s",
        ),
        (
            "max_streams_per_peer = 0",
            "quic.max_streams_per_peer",
            "must be from 1 to 1000000, got 0",
        ),
        (
            "max_streams_per_peer = 1000001",
            "quic.max_streams_per_peer",
            "got 1000001",
        ),
        (
            "stream_window = 65535",
            "quic.stream_window",
            "must be from 64KiB to 1GiB, got 65535 bytes",
        ),
        (
            "stream_window = \"2GiB\"\nconnection_window = \"4GiB\"",
            "quic.stream_window",
            "got 2GiB",
        ),
        (
            "connection_window = \"5GiB\"",
            "quic.connection_window",
            "must be from 64KiB to 4GiB, got 5GiB",
        ),
        (
            "send_window = \"32KiB\"",
            "quic.send_window",
            "must be from 64KiB to 4GiB, got 32KiB",
        ),
        (
            "udp_send_buffer = \"2GiB\"",
            "quic.udp_send_buffer",
            "must be from 64KiB to 1GiB, got 2GiB",
        ),
        (
            "udp_recv_buffer = -1",
            "quic.udp_recv_buffer",
            "a size cannot be negative, got -1",
        ),
        (
            "udp_recv_buffer = \"8MB\"",
            "quic.udp_recv_buffer",
            "decimal units are ambiguous",
        ),
        (
            "reconnect_min = \"1ms\"",
            "quic.reconnect_min",
            "must be from 10ms to 1m, got 1ms",
        ),
        (
            "reconnect_max = \"11m\"",
            "quic.reconnect_max",
            "must be from 10ms to 10m, got 11m",
        ),
        (
            "idle_timeout = \"10\"",
            "quic.idle_timeout",
            "\"10\" has no unit; write \"10s\" or \"10ms\"",
        ),
        (
            "idle_timeout = \"1.5s\"",
            "quic.idle_timeout",
            "is not a duration",
        ),
    ];
    for (setting, key, fragment) in cases {
        one_error(&with(setting, ""), key, fragment);
    }
}

#[test]
fn quic_settings_that_must_agree() {
    let message = one_error(
        &with("idle_timeout = \"5s\"\nkeep_alive = \"5s\"", ""),
        "quic.keep_alive",
        "must be shorter than quic.idle_timeout (5s), got 5s",
    );
    assert!(message.contains("keep-alive"), "{message}");
    // The default idle timeout counts too.
    one_error(
        &with("keep_alive = \"10s\"", ""),
        "quic.keep_alive",
        "quic.idle_timeout (10s)",
    );
    one_error(
        &with("stream_window = \"8MiB\"\nconnection_window = \"4MiB\"", ""),
        "quic.connection_window",
        "must be at least quic.stream_window (8MiB), got 4MiB",
    );
    one_error(
        &with("stream_window = \"256MiB\"", ""),
        "quic.connection_window",
        "must be at least quic.stream_window (256MiB), got 128MiB",
    );
    one_error(
        &with("reconnect_min = \"2s\"\nreconnect_max = \"1s\"", ""),
        "quic.reconnect_max",
        "must be at least quic.reconnect_min (2s), got 1s",
    );
    // A cross-check is skipped when one side is itself invalid: one error, not two.
    one_error(
        &with("idle_timeout = \"0s\"\nkeep_alive = \"5s\"", ""),
        "quic.idle_timeout",
        "got 0s",
    );
}

#[test]
fn limits_ranges() {
    let limits = |body: &str| format!("{MINIMAL}[limits]\n{body}\n");
    one_error(
        &limits("preamble_timeout = \"50ms\""),
        "limits.preamble_timeout",
        "must be from 100ms to 1m, got 50ms",
    );
    one_error(
        &limits("connect_timeout = \"2m\""),
        "limits.connect_timeout",
        "must be from 100ms to 1m, got 2m",
    );
    one_error(
        &limits("drain_grace = \"1h\""),
        "limits.drain_grace",
        "must be from 0s to 10m, got 1h",
    );
    one_error(
        &limits("drain_grace = 10"),
        "limits.drain_grace",
        "bare integer 10",
    );
    one_error(
        &limits("pending_streams_per_peer = 0"),
        "limits.pending_streams_per_peer",
        "must be from 1 to 1000000, got 0",
    );
    one_error(
        &limits("connections_per_peer = 1025"),
        "limits.connections_per_peer",
        "must be from 1 to 1024, got 1025",
    );
    one_error(
        &limits("handshakes = 0"),
        "limits.handshakes",
        "must be from 1 to 100000, got 0",
    );
    one_error(
        &limits("handshakes = 4\nretry_above = 5"),
        "limits.retry_above",
        "must be at most limits.handshakes (4), got 5",
    );
    one_error(
        &limits("accept_backoff_max = \"1ms\""),
        "limits.accept_backoff_max",
        "must be from 10ms to 1m, got 1ms",
    );
    one_error(
        &limits("buffer_memory = \"512KiB\""),
        "limits.buffer_memory",
        "must be from 1MiB to 64GiB",
    );
    one_error(
        &limits("worker_threads = 0"),
        "limits.worker_threads",
        "must be from 1 to 1024, got 0",
    );
    one_error(
        &limits("worker_threads = 1025"),
        "limits.worker_threads",
        "must be from 1 to 1024, got 1025",
    );
    one_error(
        &limits("worker_threads = \"4\""),
        "limits.worker_threads",
        "expected an integer",
    );
    one_error(
        &limits("shards = 0"),
        "limits.shards",
        "must be from 1 to 1024, got 0",
    );
    one_error(
        &limits("shards = 3\nworker_threads = 2"),
        "limits.shards",
        "must be at most limits.worker_threads (2), got 3",
    );
}

#[test]
fn admin_endpoint() {
    let admin = |body: &str| format!("{MINIMAL}[admin]\n{body}\n");
    let message = one_error(
        &admin("listen = \"0.0.0.0:9464\""),
        "admin.listen",
        "0.0.0.0:9464 is not a loopback address",
    );
    assert!(
        message.contains("admin.allow_non_loopback = true"),
        "{message}"
    );
    let allowed = ok(&admin(
        "listen = \"198.18.0.2:9464\"\nallow_non_loopback = true",
    ));
    assert_eq!(
        allowed.admin.map(|admin| admin.listen),
        Some(address("198.18.0.2:9464"))
    );
    one_error(&admin(""), "admin.listen", "missing: ");
    one_error(
        &format!("{MINIMAL}admin = \"127.0.0.1:9464\"\n"),
        "tls.admin",
        "unknown key (a top-level key must come before the first [section] header); valid keys in [tls]",
    );
}

#[test]
fn five_problems_give_five_errors() {
    let text = r#"
node = "node 1"

[quic]
listen = "198.18.0.2:4433"
idle_timeout = "10s"
keep_alive = "20s"

[tls]
ca = "ca.crt"
cert = "node-1.crt"
key = "node-1.key"
verbose = true

[[forward]]
listen = "127.0.0.1:29550"
peer = "node-9"
service = "rpc"

[[expose]]
service = "torch-store"
target = "127.0.0.1:29500"
"#;
    let errors = errors(text);
    let keys: Vec<&str> = errors.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "node",
            "quic.keep_alive",
            "tls.verbose",
            "forward[0].peer",
            "expose[0].allow",
        ]
    );
    assert!(errors[0].1.starts_with("invalid node name"));
    assert!(errors[1].1.contains("shorter than quic.idle_timeout"));
    assert!(errors[2].1.starts_with("unknown key"));
    assert!(errors[3].1.starts_with("unknown peer \"node-9\""));
    assert!(errors[4].1.contains("default deny"));
}

#[test]
fn errors_display_one_per_line_with_their_key() {
    let errors: ConfigErrors = parse(
        &MINIMAL
            .replace("node = \"node-1\"\n", "")
            .replace("ca = \"ca.crt\"\n", ""),
    )
    .unwrap_err();
    let text = errors.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("node: missing: "), "{text}");
    assert!(lines[1].starts_with("tls.ca: missing: "), "{text}");
    let as_error: &dyn std::error::Error = &errors;
    assert_eq!(as_error.to_string(), text);
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "meshtun-config-{tag}-{}-{unique}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn load_resolves_relative_tls_paths_against_the_file() {
    let dir = TempDir::new("load");
    let file = dir.0.join("node-1.toml");
    let text = MINIMAL
        .replace(
            "ca = \"ca.crt\"",
            "ca = \"/etc/meshtun/ca.crt\"\ncrl = \"pki/crl.pem\"",
        )
        .replace("key = \"node-1.key\"", "key = \"./keys/node-1.key\"");
    std::fs::write(&file, text).unwrap();
    let config = load(&file).unwrap();
    assert_eq!(config.tls.ca, PathBuf::from("/etc/meshtun/ca.crt"));
    assert_eq!(config.tls.cert, dir.0.join("node-1.crt"));
    assert_eq!(config.tls.key, dir.0.join("./keys/node-1.key"));
    assert_eq!(config.tls.crl, Some(dir.0.join("pki/crl.pem")));
    assert!(config.tls.cert.is_absolute());
}

#[test]
fn load_reports_an_unreadable_file_and_parse_errors() {
    let dir = TempDir::new("unreadable");
    let missing = dir.0.join("absent.toml");
    let errors = load(&missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    let error = errors.iter().next().unwrap();
    assert_eq!(error.key, "");
    assert!(
        error.message.starts_with("cannot read config file "),
        "{}",
        error.message
    );
    assert!(error.message.contains("absent.toml"), "{}", error.message);
    assert!(error.message.contains("No such file"), "{}", error.message);

    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, MINIMAL.replace("node = \"node-1\"\n", "")).unwrap();
    let errors = load(&bad).unwrap_err();
    assert_eq!(
        errors.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["node"]
    );
}

#[test]
fn overlay_section_is_parsed_with_its_defaults() {
    let config = ok(EXAMPLE);
    let overlay = config.overlay.expect("the example has [overlay]");
    assert_eq!(overlay.address.to_string(), "100.127.0.2");
    assert_eq!(overlay.prefix.to_string(), "100.127.0.0/16");
    assert_eq!(overlay.listen.to_string(), "127.0.0.1:15001");
    assert_eq!(overlay.interface, "meshtun0");
    assert!(!overlay.manage);
    assert!(overlay.guard, "the guard is on unless turned off");
    let off = ok(&EXAMPLE.replace("# guard = true", "guard = false"));
    assert!(!off.overlay.expect("[overlay]").guard);
    let node_0 = meshtun_proto::NodeName::new("node-0").unwrap();
    let node_3 = meshtun_proto::NodeName::new("node-3").unwrap();
    assert!(overlay.permits(&node_0, 29500));
    assert!(!overlay.permits(&node_0, 80));
    assert!(!overlay.permits(&node_3, 29500));
    assert_eq!(
        config.peers[0].overlay.map(|ip| ip.to_string()).as_deref(),
        Some("100.127.0.1")
    );
}

#[test]
fn overlay_mistakes_are_reported_with_their_keys() {
    let text = EXAMPLE
        .replace("address = \"100.127.0.2\"", "address = \"10.0.0.2\"")
        .replace("overlay = \"100.127.0.1\"", "overlay = \"100.127.0.1\"\n")
        .replace("ports = \"1024-65535\"", "ports = \"9-2\"")
        .replace("# interface = \"meshtun0\"", "interface = \"a/b\"")
        .replace("# guard = true", "guard = \"off\"");
    let errors = parse(&text).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|error| error.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "overlay.address",
            "overlay.interface",
            "overlay.guard",
            "overlay.allow[0].ports"
        ],
        "{errors}"
    );
    // An expose target at another node's overlay address would loop.
    let looping = EXAMPLE.replace(
        "target = \"127.0.0.1:29500\"",
        "target = \"100.127.0.1:29500\"",
    );
    let keys: Vec<String> = parse(&looping)
        .unwrap_err()
        .iter()
        .map(|error| error.key.clone())
        .collect();
    assert_eq!(keys, ["expose[0].target"]);
    // A peer overlay address without [overlay], and one outside the prefix.
    let without = EXAMPLE.split("[overlay]").next().unwrap();
    let keys: Vec<String> = parse(without)
        .unwrap_err()
        .iter()
        .map(|error| error.key.clone())
        .collect();
    assert_eq!(keys, ["peer[0].overlay"]);
    let outside = EXAMPLE.replace("overlay = \"100.127.0.1\"", "overlay = \"100.128.0.1\"");
    let errors = parse(&outside).unwrap_err();
    assert!(
        errors.to_string().contains("not inside overlay.prefix"),
        "{errors}"
    );
}

#[test]
fn errors_about_valid_entries_name_their_own_entry_after_a_broken_one() {
    // Found by the config fuzz target: entries were numbered among the
    // valid ones, so an error behind a broken entry named its neighbour.
    let text = r#"node = "node-1"
[quic]
listen = "0.0.0.0:4433"
[tls]
ca = "ca.crt"
cert = "node-1.crt"
key = "node-1.key"
[[peer]]
name = "bad name"
addr = "198.18.0.1:4433"
[[peer]]
name = "node-2"
addr = "198.18.0.3:4433"
overlay = "10.0.0.1"
[[expose]]
service = "bad name"
target = "127.0.0.1:1"
allow = ["*"]
[[expose]]
service = "ok"
target = "100.127.0.9:1"
allow = ["*"]
[overlay]
address = "100.127.0.2"
prefix = "100.127.0.0/16"
"#;
    let errors = errors(text);
    let keys: Vec<&str> = errors.iter().map(|(key, _)| key.as_str()).collect();
    assert!(keys.contains(&"peer[1].overlay"), "{errors:?}");
    assert!(keys.contains(&"expose[1].target"), "{errors:?}");
    assert!(!keys.contains(&"peer[0].overlay"), "{errors:?}");
    assert!(!keys.contains(&"expose[0].target"), "{errors:?}");
}

/// The key paths of the errors `text` gets, in order; panics if it parses.
fn keys(text: &str) -> Vec<String> {
    parse(text)
        .unwrap_err()
        .iter()
        .map(|error| error.key.clone())
        .collect()
}

#[test]
fn guard_section_lists_ports_and_ranges_and_never_the_quic_port() {
    let with = |section: &str| format!("{MINIMAL}\n{section}\n");
    let config = ok(&with("[guard]\nports = [29500, \"29550-29560\"]"));
    let guard = config.guard.expect("[guard] is present");
    assert_eq!(guard.ports, vec![29500..=29500, 29550..=29560]);
    assert!(ok(MINIMAL).guard.is_none(), "no [guard], no guard");

    let quic_port = ok(MINIMAL).quic.listen.port();
    assert_eq!(
        keys(&with(&format!(
            "[guard]\nports = [80, \"{}-{}\"]",
            quic_port - 1,
            quic_port + 1
        ))),
        ["guard.ports[1]"]
    );
    assert_eq!(keys(&with("[guard]\nports = []")), ["guard.ports"]);
    assert_eq!(keys(&with("[guard]")), ["guard.ports"]);
    assert_eq!(
        keys(&with("[guard]\nports = [0, \"9-2\", 70000]")),
        ["guard.ports[0]", "guard.ports[1]", "guard.ports[2]"]
    );
    assert_eq!(
        keys(&with("[guard]\nports = [22]\nmanage = true")),
        ["guard.manage"]
    );
}

#[test]
fn an_overlay_prefix_may_not_cover_the_underlay_and_a_guarded_node_needs_a_fixed_quic_port() {
    // The example's nodes talk QUIC on 198.18.0.0/15; a prefix around it
    // would route and guard the underlay away.
    let wide = EXAMPLE
        .replace("prefix = \"100.127.0.0/16\"", "prefix = \"198.0.0.0/8\"")
        .replace("address = \"100.127.0.2\"", "address = \"198.127.0.2\"")
        .replace("overlay = \"100.127.0.1\"", "overlay = \"198.127.0.1\"");
    assert_eq!(keys(&wide), ["quic.listen", "peer[0].addr"]);
    let port_zero = MINIMAL.replace("198.18.0.2:4433", "198.18.0.2:0");
    assert!(ok(&port_zero).guard.is_none());
    assert_eq!(
        keys(&format!("{port_zero}\n[guard]\nports = [29500]\n")),
        ["quic.listen"]
    );
}
