//! Real daemons: two `meshtun run` processes on loopback, node-a forwarding
//! local ports to services that node-b exposes, with targets served by this
//! test. They check what only whole processes show (wire behaviour, CLI):
//! SIGTERM drains and exits 0, a killed peer resets the local client instead
//! of ending its connection cleanly, and a restarted peer is reachable again
//! at once thanks to the stateless-reset key derived from its node key.
//!
//! Each daemon logs at info to a file in the test's temp dir; the log is
//! printed when a test fails.

// A panic in test code is a failed test, which is what an expect or a
// panic here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    echo_checked, echo_once, echo_server, echo_until, free_tcp_port, free_tcp_ports, free_udp_port,
    http_get, meshtun, peer_serials, round_trip, status_of, Daemon, TempDir,
};
use meshtun_pki::{Authority, Validity};
use meshtun_proto::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;
/// `limits.shards` of node-a: each shard dials node-b, so node-a keeps this
/// many connections to it. (node-b runs 3 shards, node-c 1.)
const NODE_A_SHARDS: usize = 2;

/// `[limits] drain_grace` of both daemons.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long the daemons may take to come up and carry a first round trip.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// node-a forwards `echo` and `source` to node-b, which exposes them to
/// node-a with targets served by this test. node-a also forwards `missing`,
/// which node-b does not expose. Both serve an admin endpoint.
struct Cluster {
    // Fields drop in order: the daemons die before their directory goes.
    node_a: Daemon,
    node_b: Daemon,
    /// node-b's QUIC address.
    node_b_quic: SocketAddr,
    /// node-a's forward to the echo service.
    echo: SocketAddr,
    /// node-a's forward to the endless source service.
    source: SocketAddr,
    /// node-a's forward to a service node-b does not expose.
    missing: SocketAddr,
    /// The admin endpoints of node-a and node-b.
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    dir: TempDir,
}

/// How a test wants its cluster started.
struct Options {
    /// `[limits] drain_grace` of both daemons.
    drain_grace: Duration,
    /// Environment for node-a only (NOTIFY_SOCKET, WATCHDOG_USEC).
    node_a_env: Vec<(String, String)>,
    /// Wait for an echo through node-a before returning.
    wait_ready: bool,
    /// Make node-b's key and certificate with the `openssl` command line
    /// instead of meshtun.
    openssl_node_b: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            drain_grace: DRAIN_GRACE,
            node_a_env: Vec::new(),
            wait_ready: true,
            openssl_node_b: false,
        }
    }
}

impl Cluster {
    /// Writes the CA, both nodes' certificates and configs, starts node-b
    /// then node-a, and waits until an echo round trip through node-a works.
    async fn start(label: &str) -> Self {
        Self::start_with(label, Options::default()).await
    }

    async fn start_with(label: &str, options: Options) -> Self {
        let dir = TempDir::new(label);
        let authority =
            Authority::generate("test", Validity::days_from_now(2)).expect("generate CA");
        authority.write(dir.path(), false).expect("write CA");
        // node-c has a certificate and may use node-b's echo, for tests that
        // start a third daemon.
        for name in ["node-a", "node-b", "node-c"] {
            let node = NodeName::new(name).expect("node name");
            authority
                .issue(&node, &[], &[], Validity::days_from_now(2))
                .expect("issue")
                .write(dir.path(), &node, false)
                .expect("write node certificate");
        }
        if options.openssl_node_b {
            openssl_node_certificate(&dir, "test", "node-b");
        }

        let echo_target = echo_server().await;
        let source_target = source_server().await;
        let node_b_quic = free_udp_port("127.0.0.3");
        // Chosen together, so no two are the same.
        let ports = free_tcp_ports("127.0.0.1", 5);
        let (echo, source, missing) = (ports[0], ports[1], ports[2]);
        let (admin_a, admin_b) = (ports[3], ports[4]);
        let quic = "idle_timeout = \"3s\"\nkeep_alive = \"1s\"\nreconnect_max = \"1s\"\n";
        let limits = format!(
            "[limits]\ndrain_grace = \"{}ms\"\n",
            options.drain_grace.as_millis()
        );
        let node_b_config = format!(
            "node = \"node-b\"\n\
             [quic]\nlisten = \"{node_b_quic}\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-b.crt\"\nkey = \"node-b.key\"\n\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo_target}\"\nallow = [\"node-a\", \"node-c\"]\n\
             [[expose]]\nservice = \"source\"\ntarget = \"{source_target}\"\nallow = [\"node-a\"]\n\
             {limits}worker_threads = 3\nshards = 3\n\
             [admin]\nlisten = \"{admin_b}\"\n"
        );
        let node_a_config = format!(
            "node = \"node-a\"\n\
             [quic]\nlisten = \"127.0.0.2:0\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-a.crt\"\nkey = \"node-a.key\"\n\
             [[peer]]\nname = \"node-b\"\naddr = \"{node_b_quic}\"\n\
             [[forward]]\nlisten = \"{echo}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [[forward]]\nlisten = \"{source}\"\npeer = \"node-b\"\nservice = \"source\"\n\
             [[forward]]\nlisten = \"{missing}\"\npeer = \"node-b\"\nservice = \"missing\"\n\
             {limits}shards = {NODE_A_SHARDS}\n\
             [admin]\nlisten = \"{admin_a}\"\n"
        );
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).expect("write config");
            path
        };
        let node_b = Daemon::spawn(
            "node-b",
            write("node-b.toml", &node_b_config),
            dir.join("node-b.log"),
        );
        let node_a = Daemon::spawn_with(
            "node-a",
            write("node-a.toml", &node_a_config),
            dir.join("node-a.log"),
            options.node_a_env,
        );
        let cluster = Self {
            node_a,
            node_b,
            node_b_quic,
            echo,
            source,
            missing,
            admin_a,
            admin_b,
            dir,
        };
        if options.wait_ready {
            if let Err(error) =
                echo_until(cluster.echo, READY_TIMEOUT, Duration::from_secs(1)).await
            {
                panic!("the daemons did not carry an echo within {READY_TIMEOUT:?}: {error}");
            }
        }
        cluster
    }
}

/// A server that writes to each connection until the connection fails.
async fn source_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind source");
    let addr = listener.local_addr().expect("source addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk: Vec<u8> = (0..64 * 1024).map(|index| (index % 251) as u8).collect();
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_the_grace_period_and_exits_0() {
    let mut cluster = Cluster::start("sigterm").await;
    let mut idle = TcpStream::connect(cluster.echo).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(5), round_trip(&mut idle))
        .await
        .expect("echo in time")
        .expect("echo before SIGTERM");

    cluster.node_a.terminate();
    let signalled = Instant::now();

    // The listener closes at once: new connections are refused.
    loop {
        match TcpStream::connect(cluster.echo).await {
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => break,
            // A connection that landed in the listener's backlog just
            // before it closed is reset by the kernel: still closing.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
            Err(error) => panic!("unexpected connect error after SIGTERM: {error}"),
            Ok(_) => {}
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "the forward listener still accepts 1s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An open connection keeps working while the daemon drains.
    tokio::time::timeout(Duration::from_secs(1), round_trip(&mut idle))
        .await
        .expect("echo during the drain in time")
        .expect("echo during the drain");
    assert!(
        signalled.elapsed() < DRAIN_GRACE,
        "the drain check ran too late to mean anything"
    );

    // Left idle, the connection is cut when the grace period ends.
    let closed = tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        let outcome = idle.read(&mut buffer).await;
        (outcome, Instant::now())
    });
    let slack = Duration::from_millis(1500);
    let status = cluster
        .node_a
        .exited_by(signalled + DRAIN_GRACE + slack)
        .await
        .unwrap_or_else(|| panic!("node-a still runs {:?} after SIGTERM", DRAIN_GRACE + slack));
    let exited = Instant::now();
    assert_eq!(status.code(), Some(0), "node-a exit status: {status}");

    let (outcome, closed_at) = tokio::time::timeout(Duration::from_secs(2), closed)
        .await
        .expect("the idle connection is closed once node-a has exited")
        .expect("reader task");
    assert!(
        closed_at <= exited + Duration::from_millis(100),
        "the idle connection outlived node-a by {:?}",
        closed_at - exited
    );
    match outcome {
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "the idle connection cut by the end of the drain should see a reset, got {other:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_far_daemon_mid_transfer_resets_the_local_client() {
    let mut cluster = Cluster::start("kill").await;
    let mut client = TcpStream::connect(cluster.source).await.expect("connect");
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    let flowing = async {
        while received < 8 * MIB {
            match client.read(&mut buffer).await {
                Ok(0) => panic!("the source ended after {received} bytes"),
                Ok(read) => received += read,
                Err(error) => panic!("the source failed after {received} bytes: {error}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), flowing)
        .await
        .expect("8 MiB through the tunnel within 20s");

    cluster.node_b.kill();
    let killed = Instant::now();
    let before_kill = received;
    let ending = async {
        loop {
            match client.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(read) => received += read,
                Err(error) => return Err(error),
            }
        }
    };
    let limit = Duration::from_secs(10);
    let outcome = tokio::time::timeout(limit, ending)
        .await
        .unwrap_or_else(|_| {
            panic!("the local client neither saw a reset nor EOF within {limit:?} of the kill")
        });
    let after = killed.elapsed();
    match outcome {
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(()) => panic!(
            "clean EOF {after:?} after the peer was killed ({before_kill} bytes before, {received} in all): a truncated transfer looked like success"
        ),
        Err(error) => panic!("expected a reset {after:?} after the kill, got {error}"),
    }

    // node-a keeps running and reaches node-b again once it is back.
    assert!(cluster.node_a.is_running(), "node-a died with its peer");
    cluster.node_b.respawn();
    echo_until(
        cluster.echo,
        Duration::from_secs(10),
        Duration::from_secs(1),
    )
    .await
    .unwrap_or_else(|error| panic!("no echo after node-b restarted: {error}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reachable_at_once() {
    let mut cluster = Cluster::start("restart").await;
    // Traffic just before the kill, so node-a's idle timer has just been
    // reset: without the stateless reset, node-a would keep its stale
    // connection for a whole idle timeout (3s) after the kill.
    echo_once(cluster.echo, Duration::from_secs(2))
        .await
        .expect("echo before the kill");
    cluster.node_b.kill();
    let started = Instant::now();
    cluster.node_b.respawn();
    echo_until(
        cluster.echo,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await
    .unwrap_or_else(|error| panic!("no echo through the restarted node-b: {error}"));
    let recovered = started.elapsed();
    assert!(
        recovered < Duration::from_secs(2),
        "node-a took {recovered:?} to reach the restarted node-b; the stateless reset should make it drop the stale connection at once"
    );
    assert!(cluster.node_a.is_running(), "node-a was not restarted");
}

/// Whether a tool a test needs must be present (CI), so that its absence
/// fails the test instead of skipping it.
fn tools_required() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
        || std::env::var("MESHTUN_REQUIRE_NETNS").is_ok_and(|value| value == "1")
}

/// One sample of a scrape: metric name, labels, value (`None` for NaN).
#[derive(Debug, serde::Deserialize)]
struct Sample(
    String,
    std::collections::BTreeMap<String, String>,
    Option<f64>,
);

/// Parses `/metrics` with the Prometheus project's own Python client
/// (`prometheus_client.openmetrics.parser`), which rejects anything that is
/// not valid OpenMetrics. Returns `None` (after printing SKIP) if the parser
/// is not installed and the environment does not require it.
fn parse_openmetrics(text: &str) -> Option<Vec<Sample>> {
    const SCRIPT: &str = "\
import json, math, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value if math.isfinite(s.value) else None])
print(json.dumps(out))
";
    let required = tools_required();
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output();
    if !probe.is_ok_and(|output| output.status.success()) {
        assert!(
            !required,
            "python3 with prometheus_client is required here: pip install prometheus-client"
        );
        println!("SKIP: python3 with prometheus_client is missing; /metrics not parsed");
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write metrics");
    }
    let output = child.wait_with_output().expect("python3 output");
    assert!(
        output.status.success(),
        "the OpenMetrics parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(serde_json::from_slice(&output.stdout).expect("parser output"))
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|Sample(sample, have, _)| {
            sample == name
                && labels
                    .iter()
                    .all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|Sample(_, _, value)| value.unwrap_or(f64::NAN))
}

/// Scrapes `/metrics` until `ready` holds for the parsed samples (counters
/// are updated by stream tasks that may finish just after the client).
async fn scrape_until(
    admin: SocketAddr,
    what: &str,
    ready: impl Fn(&[Sample]) -> bool,
) -> Option<Vec<Sample>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, text) = http_get(admin, "/metrics").await.expect("GET /metrics");
        assert_eq!(code, 200, "GET /metrics: {text}");
        let samples = parse_openmetrics(&text)?;
        if ready(&samples) {
            return Some(samples);
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen in /metrics within 5s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_follow_forwarded_bytes_and_refusals() {
    let cluster = Cluster::start("metrics").await;
    let outgoing = [("peer", "node-b"), ("direction", "outgoing")];
    // The start-up echo already opened a stream or more.
    let Some(baseline) = scrape_until(cluster.admin_a, "a stream count", |samples| {
        sample(samples, "meshtun_peer_streams_total", &outgoing).is_some()
    })
    .await
    else {
        return;
    };
    let streams_before =
        sample(&baseline, "meshtun_peer_streams_total", &outgoing).unwrap_or_default();
    let payload: Vec<u8> = (0..MIB).map(|index| (index % 253) as u8).collect();
    let mut tcp = TcpStream::connect(cluster.echo)
        .await
        .expect("connect echo");
    let (mut read, mut write) = tcp.split();
    let sending = async {
        write.write_all(&payload).await?;
        write.shutdown().await
    };
    let mut echoed = Vec::new();
    let (sent, received) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(sending, read.read_to_end(&mut echoed))
    })
    .await
    .expect("1 MiB echo within 20s");
    sent.expect("send 1 MiB");
    received.expect("read the echo");
    assert!(echoed == payload, "the echo differs from what was sent");
    drop(tcp);

    // A service node-b does not expose: the client is reset, and both
    // sides count the refusal.
    // The refusal needs no client bytes, so on a busy machine the reset can
    // arrive before `connect` has even looked at the socket; then `connect`
    // reports it.
    let attempt = async {
        let mut refused = TcpStream::connect(cluster.missing).await?;
        let _ = refused.write_all(b"hello").await;
        let mut buffer = [0u8; 16];
        refused.read(&mut buffer).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .expect("the refused client is closed within 5s");
    assert!(
        matches!(&outcome, Err(error) if error.kind() == io::ErrorKind::ConnectionReset),
        "a refused stream must reset the client, got {outcome:?}"
    );

    let mib = MIB as f64;
    let peer_b = [("peer", "node-b")];
    let Some(samples_a) = scrape_until(cluster.admin_a, "node-a's counters", |samples| {
        sample(samples, "meshtun_peer_received_bytes_total", &peer_b).unwrap_or(0.0) >= mib
            && sample(
                samples,
                "meshtun_peer_streams_refused_total",
                &[
                    ("peer", "node-b"),
                    ("direction", "outgoing"),
                    ("reason", "unknown_service"),
                ],
            ) == Some(1.0)
            // The refused stream's task ends a moment after the client
            // saw the reset.
            && sample(
                samples,
                "meshtun_peer_open_streams",
                &[("peer", "node-b"), ("direction", "outgoing")],
            ) == Some(0.0)
    })
    .await
    else {
        return;
    };
    let sent_a = sample(&samples_a, "meshtun_peer_sent_bytes_total", &peer_b).unwrap_or(0.0);
    assert!(
        sent_a >= mib,
        "node-a counted {sent_a} bytes sent to node-b"
    );
    // One per shard of node-a.
    assert_eq!(
        sample(&samples_a, "meshtun_peer_connections", &outgoing),
        Some(NODE_A_SHARDS as f64)
    );
    // The echo and the refused stream.
    assert_eq!(
        sample(&samples_a, "meshtun_peer_streams_total", &outgoing),
        Some(streams_before + 2.0)
    );
    assert_eq!(
        sample(&samples_a, "meshtun_peer_open_streams", &outgoing),
        Some(0.0)
    );
    let rtt = sample(&samples_a, "meshtun_peer_rtt_seconds", &peer_b).unwrap_or(f64::NAN);
    assert!(rtt > 0.0 && rtt < 1.0, "node-a's RTT to node-b: {rtt}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = sample(
        &samples_a,
        "meshtun_certificate_expiry_timestamp_seconds",
        &[],
    )
    .expect("certificate expiry exported");
    assert!(
        expiry > now + 86_400.0 && expiry < now + 3.0 * 86_400.0,
        "the certificate was issued for 2 days; expiry {expiry} vs now {now}"
    );

    let peer_a = [("peer", "node-a")];
    let samples_b = scrape_until(cluster.admin_b, "node-b's counters", |samples| {
        sample(samples, "meshtun_peer_received_bytes_total", &peer_a).unwrap_or(0.0) >= mib
            && sample(
                samples,
                "meshtun_peer_streams_refused_total",
                &[
                    ("peer", "node-a"),
                    ("direction", "incoming"),
                    ("reason", "unknown_service"),
                ],
            ) == Some(1.0)
    })
    .await
    .expect("the parser was there a moment ago");
    let incoming = [("peer", "node-a"), ("direction", "incoming")];
    assert_eq!(
        sample(&samples_b, "meshtun_peer_connections", &incoming),
        Some(NODE_A_SHARDS as f64)
    );
    let sent_b = sample(&samples_b, "meshtun_peer_sent_bytes_total", &peer_a).unwrap_or(0.0);
    assert!(
        sent_b >= mib,
        "node-b counted {sent_b} bytes sent to node-a"
    );

    // `meshtun status` shows the same: the peer, its state and its bytes.
    let config = cluster.dir.join("node-a.toml");
    let human = tokio::task::spawn_blocking(move || {
        common::run(meshtun().args(["status", "-c"]).arg(config)).success()
    })
    .await
    .expect("meshtun status");
    let text = human.stdout;
    for expected in [
        "node: node-a",
        "peer: node-b",
        "state: connected (2/2 dialled)",
        "shard 1: dials from",
        "refused to us: 1 unknown service",
        "forward: ",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from meshtun status:\n{text}"
        );
    }
    let transfer = text
        .lines()
        .find(|line| line.trim_start().starts_with("transfer:"))
        .unwrap_or_else(|| panic!("no transfer line in meshtun status:\n{text}"));
    assert!(
        transfer.contains("MiB received") && transfer.contains("MiB sent"),
        "1 MiB each way should show in MiB: {transfer}"
    );
    let status = status_of(cluster.admin_a).await;
    let peer = &status["peers"][0];
    assert_eq!(peer["name"], "node-b");
    assert!(
        peer["sent_bytes"].as_u64().unwrap_or(0) >= MIB as u64,
        "{peer}"
    );
    assert!(
        peer["received_bytes"].as_u64().unwrap_or(0) >= MIB as u64,
        "{peer}"
    );
    // node-b runs on the 3 threads its config asks for (more than this
    // machine's CPUs, so not the default by chance); node-a on tokio's
    // default, one per CPU unless TOKIO_WORKER_THREADS says otherwise.
    assert_eq!(status_of(cluster.admin_b).await["worker_threads"], 3);
    let default = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|threads| threads.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
    assert_eq!(status["worker_threads"], default, "{status}");

    // Each of node-a's shards dialled node-b from a socket of its own, and
    // node-b's shards between them accepted those connections.
    let shards_a = status["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards_a.len(), NODE_A_SHARDS, "{status}");
    let mut dial_ports = std::collections::BTreeSet::new();
    for (index, shard) in shards_a.iter().enumerate() {
        assert_eq!(shard["index"], index, "{shard}");
        assert_eq!(shard["connections_outgoing"], 1, "{shard}");
        assert_eq!(shard["open_streams"], 0, "{shard}");
        let addr: SocketAddr = shard["dial_addr"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no dial address: {shard}"));
        dial_ports.insert(addr.port());
    }
    assert_eq!(dial_ports.len(), NODE_A_SHARDS, "{status}");
    let carried: u64 = shards_a
        .iter()
        .map(|shard| shard["streams"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        carried,
        peer["streams_outgoing"].as_u64().unwrap_or(u64::MAX),
        "the shards carried every stream node-a opened: {status}"
    );
    let status_b = status_of(cluster.admin_b).await;
    let shards_b = status_b["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards_b.len(), 3, "{status_b}");
    let accepted: u64 = shards_b
        .iter()
        .map(|shard| shard["connections_incoming"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(accepted, NODE_A_SHARDS as u64, "{status_b}");
}

/// A socket standing in for systemd's `$NOTIFY_SOCKET`: records every
/// message the daemon sends.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    /// WATCHDOG=1 pings seen so far (skipped by [`NotifySocket::next`]).
    watchdog_pings: usize,
    _dir: TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = TempDir::new("notify");
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        // Polled from the test's runtime, never blocking it.
        socket.set_nonblocking(true).expect("non-blocking");
        Self {
            socket,
            path,
            watchdog_pings: 0,
            _dir: dir,
        }
    }

    /// The next message other than a watchdog ping, within `within`.
    async fn next(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let message = self.receive(deadline).await;
            if message == "WATCHDOG=1" {
                self.watchdog_pings += 1;
                continue;
            }
            return message;
        }
    }

    async fn receive(&mut self, deadline: Instant) -> String {
        let mut buffer = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buffer) {
                Ok(len) => return String::from_utf8_lossy(&buffer[..len]).into_owned(),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("notify socket: {error}"),
            }
            assert!(Instant::now() < deadline, "no notify message in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sends SIGHUP to `daemon` and waits for systemd's RELOADING=1 and
/// READY=1 around the reload, whatever its outcome.
async fn reload_bracketed(daemon: &mut Daemon, notify: &mut NotifySocket) {
    daemon.signal("HUP");
    let reloading = notify.next(Duration::from_secs(5)).await;
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading:?}");
    let ready = notify.next(Duration::from_secs(5)).await;
    assert!(ready.starts_with("READY=1"), "after RELOADING: {ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_the_listeners_reload_brackets_and_stopping() {
    let mut notify = NotifySocket::bind();
    let options = Options {
        node_a_env: vec![
            (
                "NOTIFY_SOCKET".to_owned(),
                notify.path.display().to_string(),
            ),
            // 400 ms: pings every 200 ms.
            ("WATCHDOG_USEC".to_owned(), "400000".to_owned()),
        ],
        wait_ready: false,
        ..Options::default()
    };
    let mut cluster = Cluster::start_with("notify", options).await;

    // READY=1 comes first, and when it does every listener already accepts.
    let ready = notify.next(READY_TIMEOUT).await;
    assert!(ready.starts_with("READY=1\n"), "first message: {ready:?}");
    assert!(
        ready.contains("STATUS=serving: 1 peers, 3 forwards"),
        "{ready:?}"
    );
    for forward in [cluster.echo, cluster.source, cluster.missing] {
        match TcpStream::connect(forward).await {
            Ok(_) => {}
            // Accepted, then reset by a quick refusal (the peer may not be
            // connected yet, and `missing` is refused anyway): still accepting.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
            Err(error) => panic!("forward {forward} not accepting at READY: {error}"),
        }
    }
    let status = status_of(cluster.admin_a).await;
    assert_eq!(status["node"], "node-a");
    echo_until(cluster.echo, READY_TIMEOUT, Duration::from_secs(1))
        .await
        .expect("echo after READY");

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1 again.
    cluster.node_a.signal("HUP");
    let reloading = notify.next(Duration::from_secs(5)).await;
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("expected RELOADING=1 with MONOTONIC_USEC, got {reloading:?}"));
    assert!(usec.parse::<u64>().is_ok(), "MONOTONIC_USEC={usec:?}");
    let ready = notify.next(Duration::from_secs(5)).await;
    assert!(ready.starts_with("READY=1"), "after RELOADING: {ready:?}");
    let status = status_of(cluster.admin_a).await;
    assert_eq!(status["reload"]["successes"], 1, "{status}");
    assert_eq!(status["reload"]["last_error"], serde_json::Value::Null);

    // A broken config: the reload fails, is bracketed all the same, is
    // visible in /status, and node-a keeps forwarding on the old one.
    let config = cluster.dir.join("node-a.toml");
    let good = fs::read_to_string(&config).expect("read config");
    fs::write(&config, format!("{good}\nbogus_key = 1\n")).expect("break config");
    reload_bracketed(&mut cluster.node_a, &mut notify).await;
    let status = status_of(cluster.admin_a).await;
    assert_eq!(status["reload"]["failures"], 1, "{status}");
    let error = status["reload"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("bogus_key"),
        "the failure should name the bad key: {error:?}"
    );
    echo_once(cluster.echo, Duration::from_secs(5))
        .await
        .expect("echo after a failed reload");

    // A forward moved to another port applies on reload: the new port
    // forwards, the old one is closed.
    let new_listen = free_tcp_port("127.0.0.1");
    let moved = good.replace(
        &format!("listen = \"{}\"", cluster.missing),
        &format!("listen = \"{new_listen}\""),
    );
    assert_ne!(moved, good, "the test should move a forward");
    fs::write(&config, &moved).expect("move a forward");
    reload_bracketed(&mut cluster.node_a, &mut notify).await;
    let status = status_of(cluster.admin_a).await;
    assert_eq!(status["reload"]["successes"], 2, "{status}");
    let listens: Vec<String> = status["forwards"]
        .as_array()
        .expect("forwards in /status")
        .iter()
        .map(|forward| forward["listen"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(listens.contains(&new_listen.to_string()), "{listens:?}");
    assert!(
        !listens.contains(&cluster.missing.to_string()),
        "{listens:?}"
    );
    // Accepted, then reset: node-b has no `missing` service.
    match TcpStream::connect(new_listen).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("moved forward {new_listen} not accepting: {error}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(cluster.missing).await {
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < deadline,
                "the old listen address still accepts: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_once(cluster.echo, Duration::from_secs(5))
        .await
        .expect("echo after moving another forward");

    // A change that needs a restart is refused as a whole and says why.
    let quic_changed = moved.replace("idle_timeout = \"3s\"", "idle_timeout = \"4s\"");
    assert_ne!(quic_changed, moved, "the test should change [quic]");
    fs::write(&config, quic_changed).expect("change [quic]");
    reload_bracketed(&mut cluster.node_a, &mut notify).await;
    let status = status_of(cluster.admin_a).await;
    assert_eq!(status["reload"]["failures"], 2, "{status}");
    let error = status["reload"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("[quic] changed; restart"), "{error:?}");

    // The watchdog pings keep coming while the node is healthy.
    let deadline = Instant::now() + Duration::from_secs(5);
    while notify.watchdog_pings < 3 {
        let message = notify.receive(deadline).await;
        if message == "WATCHDOG=1" {
            notify.watchdog_pings += 1;
        }
    }

    // SIGTERM: STOPPING=1, then an orderly exit.
    cluster.node_a.terminate();
    let stopping = notify.next(Duration::from_secs(5)).await;
    assert!(
        stopping.starts_with("STOPPING=1"),
        "after SIGTERM: {stopping:?}"
    );
    let status = cluster
        .node_a
        .exited_by(Instant::now() + DRAIN_GRACE + Duration::from_secs(3))
        .await
        .expect("node-a exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "node-a exit status: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_lets_the_transfer_finish_and_exits_0() {
    let grace = Duration::from_secs(20);
    let options = Options {
        drain_grace: grace,
        ..Options::default()
    };
    let mut cluster = Cluster::start_with("sigterm-load", options).await;
    let total = 64 * MIB;
    let mut signalled = None;
    let echo = cluster.echo;
    let node_a = &mut cluster.node_a;
    let outcome = tokio::time::timeout(
        grace,
        echo_checked(echo, total, |received| {
            // SIGTERM once the transfer is well under way.
            if signalled.is_none() && received >= 4 * MIB {
                node_a.terminate();
                signalled = Some(Instant::now());
            }
        }),
    )
    .await
    .expect("the transfer finishes within the drain grace");
    let (received, mismatch) = outcome.expect("the echo is read to its end, not reset");
    let signalled = signalled.expect("SIGTERM was sent mid-transfer");
    let finished = Instant::now();
    assert_eq!(received, total, "echoed bytes");
    assert_eq!(mismatch, None, "first corrupted byte offset");

    // node-a exits once its last stream is done, not at the end of the grace.
    let status = cluster
        .node_a
        .exited_by(finished + Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("node-a still runs 5s after its last stream ended"));
    assert_eq!(status.code(), Some(0), "node-a exit status: {status}");
    assert!(
        signalled.elapsed() < grace,
        "node-a waited out the whole grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_connection_and_stream_events_but_no_key_material() {
    let options = Options {
        node_a_env: vec![
            ("MESHTUN_LOG_FORMAT".to_owned(), "json".to_owned()),
            // Debug: per-stream detail too, the most a log ever says.
            ("MESHTUN_LOG".to_owned(), "debug".to_owned()),
        ],
        ..Options::default()
    };
    let mut cluster = Cluster::start_with("json-logs", options).await;
    echo_once(cluster.echo, Duration::from_secs(5))
        .await
        .expect("echo");
    let _ = TcpStream::connect(cluster.missing).await;
    cluster.node_a.terminate();
    let status = cluster
        .node_a
        .exited_by(Instant::now() + DRAIN_GRACE + Duration::from_secs(3))
        .await
        .expect("node-a exits");
    assert_eq!(status.code(), Some(0));

    let log = fs::read_to_string(cluster.dir.join("node-a.log")).expect("read log");
    let mut messages = Vec::new();
    for line in log.lines().filter(|line| !line.is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
        messages.push(
            event["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    for expected in ["node started", "peer connected", "closed", "node stopped"] {
        assert!(
            messages.iter().any(|message| message == expected),
            "no {expected:?} event in the JSON log:\n{log}"
        );
    }

    // Neither key's PEM body, nor any long run of it, appears in the log.
    for key in ["node-a.key", "node-b.key", "ca.key"] {
        let pem = fs::read_to_string(cluster.dir.join(key)).expect("read key");
        for body_line in pem.lines().filter(|line| !line.starts_with("-----")) {
            let needle = &body_line[..body_line.len().min(24)];
            assert!(!log.contains(needle), "{key} material appears in the log");
        }
    }
    assert!(
        !log.contains("PRIVATE KEY"),
        "a private key header appears in the log"
    );
}

/// Issues a new certificate and key for `node` from the cluster CA in `dir`
/// and renames them over the old files (key first), as `meshtun pki` and
/// cert-manager replace files. Returns the new certificate's serial.
fn rotate(dir: &TempDir, node: &str) -> String {
    let authority = meshtun_pki::Authority::load(dir.path()).expect("load CA");
    let name = NodeName::new(node).expect("node name");
    let issued = authority
        .issue(&name, &[], &[], Validity::days_from_now(2))
        .expect("issue");
    let staging = dir.join(&format!("staging-{node}"));
    issued.write(&staging, &name, true).expect("write new pair");
    for extension in ["key", "crt"] {
        let file = format!("{node}.{extension}");
        fs::rename(staging.join(&file), dir.join(&file)).expect("rename into place");
    }
    let pem = issued.cert_pem.clone();
    let inspected = meshtun_pki::inspect_pem(&pem).expect("inspect new certificate");
    inspected[0].serial.clone()
}

/// Waits until the node behind `admin` runs a certificate with `serial`.
async fn wait_serial(admin: SocketAddr, serial: &str) -> serde_json::Value {
    // The certificate changes inside a reload, just before it is counted.
    status_until(admin, &format!("running certificate {serial}"), |status| {
        status["certificate"]["serial"] == serial && status["reload"]["successes"] != 0
    })
    .await
}

/// Polls `/status` until `ready` holds, for up to 15 s.
async fn status_until(
    admin: SocketAddr,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = status_of(admin).await;
        if ready(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "not {what} after 15s: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_dropping_a_byte() {
    let mut cluster = Cluster::start("rotate").await;
    let old_b = status_of(cluster.admin_b).await["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        peer_serials(cluster.admin_a, "node-b").await,
        vec![old_b.clone()]
    );

    // Mid-transfer, both nodes' certificates and keys are replaced on disk:
    // node-a is told with SIGHUP, node-b notices the files by itself.
    let total = 64 * MIB;
    let mut new_serials = None;
    let echo = cluster.echo;
    let node_a = &mut cluster.node_a;
    let dir = &cluster.dir;
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        echo_checked(echo, total, |received| {
            if new_serials.is_none() && received >= 8 * MIB {
                let serials = (rotate(dir, "node-a"), rotate(dir, "node-b"));
                node_a.signal("HUP");
                new_serials = Some(serials);
            }
        }),
    )
    .await
    .expect("the transfer finishes within 60s");
    let (received, mismatch) = outcome.expect("the transfer is not reset by the rotation");
    assert_eq!(received, total, "echoed bytes");
    assert_eq!(mismatch, None, "first corrupted byte offset");
    let (new_a, new_b) = new_serials.expect("rotated mid-transfer");
    assert_ne!(new_b, old_b);

    // Both now run the new certificates. node-a, whose own certificate
    // changed, replaced its connections with ones made with the new one
    // (a replacement, not a reconnect); the old ones closed once their
    // streams ended, so node-b soon sees only node-a's new certificate.
    let status_a = wait_serial(cluster.admin_a, &new_a).await;
    let status_b = wait_serial(cluster.admin_b, &new_b).await;
    assert!(
        status_a["reload"]["successes"].as_u64() >= Some(1),
        "{status_a}"
    );
    assert_eq!(status_b["reload"]["successes"], 1, "{status_b}");
    let peer = &status_a["peers"][0];
    assert_eq!(peer["reconnects"], 0, "{peer}");
    assert_eq!(peer["connections_up"], NODE_A_SHARDS, "{peer}");
    let replaced_by = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = peer_serials(cluster.admin_b, "node-a").await;
        if seen == vec![new_a.clone()] {
            break;
        }
        assert!(
            Instant::now() < replaced_by,
            "node-b still sees node-a's certificates {seen:?}, not only the new {new_a}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    echo_once(cluster.echo, Duration::from_secs(5))
        .await
        .expect("echo after the rotation");

    // A new connection (node-a restarted) uses the new certificates on
    // both sides.
    cluster.node_a.kill();
    cluster.node_a.respawn();
    echo_until(cluster.echo, READY_TIMEOUT, Duration::from_secs(1))
        .await
        .expect("echo through the restarted node-a");
    assert_eq!(peer_serials(cluster.admin_a, "node-b").await, vec![new_b]);
    assert!(
        peer_serials(cluster.admin_b, "node-a")
            .await
            .contains(&new_a),
        "node-b should see node-a's new certificate on the new connection"
    );
}

/// Replaces `DIR/NODE.crt` and `DIR/NODE.key` with a key and certificate
/// made by the `openssl` command line alone, signed by the CA in `DIR`, the
/// way an operator with an existing openssl-based PKI would: an EC P-256
/// key, and the URI SAN `spiffe://CLUSTER/node/NODE` as the identity.
fn openssl_node_certificate(dir: &TempDir, cluster: &str, node: &str) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let key = format!("{node}.key");
    let csr = format!("{node}.csr");
    let cert = format!("{node}.crt");
    let extensions = format!("{node}.ext");
    let _ = fs::remove_file(dir.join(&key));
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key,
    ]);
    common::set_mode(&dir.join(&key), 0o600);
    run(&[
        "req",
        "-new",
        "-key",
        &key,
        "-subj",
        &format!("/CN={node}"),
        "-out",
        &csr,
    ]);
    fs::write(
        dir.join(&extensions),
        format!(
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth, clientAuth\n\
             subjectAltName = URI:spiffe://{cluster}/node/{node}\n"
        ),
    )
    .expect("write extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        &extensions,
        "-out",
        &cert,
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_made_with_openssl_works_like_one_from_meshtun() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(!tools_required(), "openssl is required here");
        println!("SKIP: openssl is not installed");
        return;
    }
    let options = Options {
        openssl_node_b: true,
        ..Options::default()
    };
    // `start_with` waits for an echo through both daemons: node-b serves
    // with the openssl certificate and node-a accepted it.
    let cluster = Cluster::start_with("openssl", options).await;
    let config = cluster.dir.join("node-b.toml");
    let checked = tokio::task::spawn_blocking(move || {
        common::run(meshtun().args(["check", "-c"]).arg(config))
    })
    .await
    .expect("meshtun check");
    assert_eq!(
        checked.code(),
        0,
        "meshtun check on the openssl certificate: {}{}",
        checked.stdout,
        checked.stderr
    );

    let output = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cluster.dir.join("node-b.crt"))
        .output()
        .expect("openssl x509 -serial");
    let serial = String::from_utf8_lossy(&output.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase();
    let seen: Vec<String> = peer_serials(cluster.admin_a, "node-b")
        .await
        .into_iter()
        .map(|serial| serial.replace(':', "").to_lowercase())
        .collect();
    assert_eq!(
        seen,
        vec![serial],
        "node-a should be talking to the openssl certificate"
    );
    let status_b = status_of(cluster.admin_b).await;
    assert_eq!(status_b["certificate"]["identity"], "node-b");
}

impl Cluster {
    /// Starts node-c, which forwards a port of its own to node-b's echo
    /// service. Returns the daemon, its forward and its admin endpoint.
    fn start_node_c(&self) -> (Daemon, SocketAddr, SocketAddr) {
        let echo = free_tcp_port("127.0.0.1");
        let admin = free_tcp_port("127.0.0.1");
        let config = format!(
            "node = \"node-c\"\n\
             [quic]\nlisten = \"127.0.0.4:0\"\nidle_timeout = \"3s\"\nkeep_alive = \"1s\"\nreconnect_max = \"1s\"\n\
             [tls]\nca = \"ca.crt\"\ncert = \"node-c.crt\"\nkey = \"node-c.key\"\n\
             [[peer]]\nname = \"node-b\"\naddr = \"{}\"\n\
             [[forward]]\nlisten = \"{echo}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [limits]\nshards = 1\n\
             [admin]\nlisten = \"{admin}\"\n",
            self.node_b_quic
        );
        let path = self.dir.join("node-c.toml");
        fs::write(&path, config).expect("write node-c config");
        let daemon = Daemon::spawn("node-c", path, self.dir.join("node-c.log"));
        (daemon, echo, admin)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_peer_cuts_its_connection_and_keeps_it_out_while_others_carry_on() {
    let cluster = Cluster::start("revoke").await;
    let (_node_c, echo_c, admin_c) = cluster.start_node_c();
    echo_until(echo_c, READY_TIMEOUT, Duration::from_secs(1))
        .await
        .expect("echo through node-c");
    // A connection through each client node, open across the revocation.
    let mut held_a = TcpStream::connect(cluster.echo)
        .await
        .expect("connect via node-a");
    round_trip(&mut held_a).await.expect("echo via node-a");
    let mut held_c = TcpStream::connect(echo_c)
        .await
        .expect("connect via node-c");
    round_trip(&mut held_c).await.expect("echo via node-c");

    // Revoke node-a on the CA and install the CRL on node-b: its config
    // gains tls.crl, which its file watcher picks up (no signal).
    let dir = cluster.dir.path().to_path_buf();
    let revoked = tokio::task::spawn_blocking(move || {
        common::run(
            meshtun()
                .args(["pki", "revoke", "--ca"])
                .arg(&dir)
                .arg("--cert")
                .arg(dir.join("node-a.crt")),
        )
        .success()
    })
    .await
    .expect("meshtun pki revoke");
    assert!(
        revoked.stdout.contains("revoked serial"),
        "{}",
        revoked.stdout
    );
    let config = cluster.dir.join("node-b.toml");
    let text = fs::read_to_string(&config).expect("read node-b config");
    let with_crl = text.replace(
        "key = \"node-b.key\"\n",
        "key = \"node-b.key\"\ncrl = \"crl.pem\"\n",
    );
    assert_ne!(with_crl, text);
    fs::write(&config, with_crl).expect("add tls.crl");

    // node-a's open connection is cut: its client sees a reset.
    let mut buffer = [0u8; 64];
    let cut = tokio::time::timeout(Duration::from_secs(15), held_a.read(&mut buffer))
        .await
        .expect("node-a's connection is cut within 15s of the CRL landing");
    assert!(
        matches!(&cut, Err(error) if error.kind() == io::ErrorKind::ConnectionReset),
        "the revoked peer's client should see a reset, got {cut:?}"
    );
    // The node counts a reload before it cuts what the reload revoked, so
    // a client that saw the cut finds the reload counted.
    let status_b = status_of(cluster.admin_b).await;
    assert_eq!(status_b["reload"]["successes"], 1, "{status_b}");

    // node-a cannot come back: its re-dials fail the handshake.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status_a = status_of(cluster.admin_a).await;
        let failed = status_a["peers"][0]["handshakes_failed"]["tls"]
            .as_u64()
            .unwrap_or(0);
        if failed >= 2 {
            assert_eq!(status_a["peers"][0]["connections_up"], 0, "{status_a}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a's re-dials were not refused: {status_a}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        echo_once(cluster.echo, Duration::from_secs(2))
            .await
            .is_err(),
        "the revoked node must not reach node-b's services"
    );
    let status_b = status_of(cluster.admin_b).await;
    assert!(
        status_b["incoming_handshakes_failed"]["tls"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "node-b should count the refused handshakes: {status_b}"
    );

    // node-c carried on, on the same connection.
    round_trip(&mut held_c)
        .await
        .expect("node-c's open connection still echoes");
    echo_once(echo_c, Duration::from_secs(5))
        .await
        .expect("a new connection via node-c");
    let status_c = status_of(admin_c).await;
    let peer = &status_c["peers"][0];
    assert_eq!(peer["reconnects"], 0, "{peer}");
    assert_eq!(peer["connections_up"], 1, "{peer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_bundle_that_would_cut_the_node_off_is_refused_on_reload() {
    let cluster = Cluster::start("wrong-ca").await;
    let mut held = TcpStream::connect(cluster.echo).await.expect("connect");
    round_trip(&mut held).await.expect("echo before");
    // The mistake the CA rotation procedure warns about: the new CA copied
    // over the old one instead of beside it. node-a's own certificate does
    // not chain to it, so the reload (from the file watch) must refuse it
    // rather than close every connection.
    let other = Authority::generate("test", Validity::days_from_now(2)).expect("another CA");
    let staging = cluster.dir.join("other-ca.crt");
    fs::write(&staging, other.cert_pem()).expect("write other CA");
    fs::rename(&staging, cluster.dir.join("ca.crt")).expect("replace ca.crt");

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = status_of(cluster.admin_a).await;
        if status["reload"]["failures"].as_u64() >= Some(1) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no reload attempt within 15s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = status["reload"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not verify against tls.ca"),
        "{error:?}"
    );
    assert_eq!(status["reload"]["successes"], 0, "{status}");
    assert_eq!(
        status["peers"][0]["connections_up"], NODE_A_SHARDS,
        "{status}"
    );
    round_trip(&mut held)
        .await
        .expect("the open connection survives the refused reload");
}

/// The failed incoming handshakes node-b has counted for `reason`, from a
/// `/metrics` text (0 before the first).
fn incoming_handshakes_failed(metrics: &str, reason: &str) -> u64 {
    let series = format!(
        "meshtun_peer_handshakes_failed_total{{peer=\"\",direction=\"incoming\",reason=\"{reason}\"}} "
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().expect("a counter value"))
}

/// The `reason` field of a log line, if it has one.
fn reason_field(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(" reason=")?;
    let value = rest.split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// A hostile client that re-dials as fast as `quic.reconnect_min` allows
/// (every 10 ms, on four shards) with a certificate of a CA node-b does not
/// trust: node-b counts every failed handshake in `/metrics`, but logs at
/// warn only one line per reason each 10 s, not one per attempt (5,463
/// lines in 5 s before). The flood runs until node-b has counted 2,000
/// failures, or for 10 s, whichever comes first; at least 200 must fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_counted_in_full_and_logged_a_few_times() {
    const ATTEMPTS: u64 = 2_000;
    const FLOOD_FOR: Duration = Duration::from_secs(10);
    const AT_LEAST: u64 = 200;
    /// How often node-b may warn about one reason (metrics.rs).
    const LOG_PERIOD: Duration = Duration::from_secs(10);
    let cluster = Cluster::start("handshake-flood").await;

    // The rogue: node-c with a certificate from a CA of its own. It trusts
    // that CA and the cluster's (meshtun will not start with a certificate
    // its own bundle does not vouch for), so it accepts node-b; node-b
    // refuses it.
    let rogue_dir = cluster.dir.join("rogue");
    let rogue = Authority::generate("test", Validity::days_from_now(2)).expect("rogue CA");
    rogue.write(&rogue_dir, false).expect("write rogue CA");
    let node_c = NodeName::new("node-c").expect("node name");
    rogue
        .issue(&node_c, &[], &[], Validity::days_from_now(2))
        .expect("issue rogue certificate")
        .write(&rogue_dir, &node_c, false)
        .expect("write rogue certificate");
    let cluster_ca = fs::read_to_string(cluster.dir.join("ca.crt")).expect("cluster CA");
    fs::write(
        rogue_dir.join("bundle.crt"),
        format!("{}{cluster_ca}", rogue.cert_pem()),
    )
    .expect("write rogue bundle");
    let rogue_admin = free_tcp_port("127.0.0.1");
    let config = format!(
        "node = \"node-c\"\n\
         [quic]\nlisten = \"127.0.0.4:0\"\nreconnect_min = \"10ms\"\nreconnect_max = \"10ms\"\n\
         [tls]\nca = \"rogue/bundle.crt\"\ncert = \"rogue/node-c.crt\"\nkey = \"rogue/node-c.key\"\n\
         [[peer]]\nname = \"node-b\"\naddr = \"{}\"\n\
         [limits]\nshards = 4\n\
         [admin]\nlisten = \"{rogue_admin}\"\n",
        cluster.node_b_quic
    );
    let path = cluster.dir.join("rogue.toml");
    fs::write(&path, config).expect("write rogue config");
    let b_log_before = fs::read_to_string(&cluster.node_b.log).unwrap_or_default();
    let started = Instant::now();
    let mut rogue_daemon = Daemon::spawn("rogue node-c", path, cluster.dir.join("rogue.log"));

    // Flood until node-b has counted enough, or the time is up.
    let counted = || async {
        let (code, text) = http_get(cluster.admin_b, "/metrics")
            .await
            .expect("GET /metrics from node-b");
        assert_eq!(code, 200, "{text}");
        incoming_handshakes_failed(&text, "tls")
    };
    while started.elapsed() < FLOOD_FOR && counted().await < ATTEMPTS {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the rogue saw fail, then the rogue gone: node-b must have counted
    // at least as many (it refused each one before the rogue could tell).
    let (code, rogue_metrics) = http_get(rogue_admin, "/metrics")
        .await
        .expect("GET /metrics from the rogue");
    assert_eq!(code, 200, "{rogue_metrics}");
    rogue_daemon.kill();
    let flood = started.elapsed();
    let rogue_failed: u64 = rogue_metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "meshtun_peer_handshakes_failed_total{peer=\"node-b\",direction=\"outgoing\",reason=\"tls\"} ",
            )
        })
        .map_or(0, |value| value.trim().parse().expect("a counter value"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counted = counted().await;
    let elapsed = started.elapsed();

    let b_log = fs::read_to_string(&cluster.node_b.log).unwrap_or_default();
    let new_lines = b_log.get(b_log_before.len()..).unwrap_or_default();
    let warned: Vec<&str> = new_lines
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("handshake failed"))
        .collect();
    let mut per_reason = std::collections::BTreeMap::<&str, u64>::new();
    for line in &warned {
        *per_reason
            .entry(reason_field(line).unwrap_or("(none)"))
            .or_default() += 1;
    }
    assert!(
        rogue_failed >= AT_LEAST,
        "the rogue made only {rogue_failed} failed attempts in {flood:?}; the test needs {AT_LEAST}"
    );
    assert!(
        counted >= rogue_failed,
        "node-b counted {counted} failed handshakes, the rogue saw {rogue_failed} fail"
    );
    // One line at the first failure, then at most one per period.
    let allowed = 1 + elapsed.as_secs() / LOG_PERIOD.as_secs();
    assert!(
        !warned.is_empty(),
        "node-b never warned about the refused handshakes"
    );
    for (reason, lines) in &per_reason {
        assert!(
            *lines <= allowed,
            "{lines} warn lines for reason {reason} in {elapsed:?} (at most {allowed}):\n{}",
            warned.join("\n")
        );
    }
    assert!(
        warned[0].contains("this node refused the peer's certificate (UnknownIssuer)"),
        "the warning says who refused whose certificate: {}",
        warned[0]
    );
    assert!(
        warned[0].contains("similar_since_last_report=0"),
        "{}",
        warned[0]
    );
    // node-a, whose certificate node-b trusts, was not disturbed.
    echo_once(cluster.echo, Duration::from_secs(5))
        .await
        .expect("an echo through node-a after the flood");
}

/// `meshtun run` and `meshtun check` say how long a certificate has left
/// in the same words. node-b gets a certificate that lasts twelve and a
/// half hours (picked up by its file watch); both then say "12 hours" (not
/// "within 1 days", nor "0 day(s)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_check_say_how_long_the_certificate_has_left_alike() {
    let cluster = Cluster::start("expiry-words").await;
    let authority = Authority::load(cluster.dir.path()).expect("the cluster's CA");
    let node = NodeName::new("node-b").expect("node name");
    let now = time::OffsetDateTime::now_utc();
    let short = Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::minutes(12 * 60 + 30),
    };
    authority
        .issue(&node, &[], &[], short)
        .expect("issue a short certificate")
        .write(cluster.dir.path(), &node, true)
        .expect("replace node-b's certificate and key");
    let expected = "the node certificate expires in 12 hours; renew it";
    let deadline = Instant::now() + Duration::from_secs(20);
    let warning = loop {
        let log = fs::read_to_string(&cluster.node_b.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|line| line.contains(expected)) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "node-b did not say {expected:?} after the reload:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(warning.contains(" WARN "), "{warning}");
    let config = cluster.dir.join("node-b.toml");
    let checked = tokio::task::spawn_blocking(move || {
        common::run(meshtun().arg("check").arg("-c").arg(&config))
    })
    .await
    .expect("meshtun check");
    assert_eq!(checked.code(), 0, "{checked}");
    assert!(
        checked
            .stdout
            .contains("warning: tls.cert: certificate expires in 12 hours; renew it"),
        "{checked}"
    );
}
