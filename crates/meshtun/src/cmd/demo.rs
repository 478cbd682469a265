//! `meshtun demo`: two nodes on loopback with a throwaway CA, a forwarded
//! port, data pushed both ways, and a printed account of what was proved.
//! Nothing is written to disk; every port is chosen by the OS.

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use meshtun_config::Config;
use meshtun_node::Node;
use meshtun_pki::{Authority, NodeCredentials, TrustBundle, Validity};
use meshtun_proto::NodeName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{runtime, EXIT_RUNTIME};

/// Round trips measured for the latency figure.
const PING_ROUNDS: usize = 2000;
/// How long any single demo step may take before it counts as a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn demo(mib: u64) -> ExitCode {
    // Expected refusals (the rogue node) would log warnings; keep the
    // output to what the demo proves unless MESHTUN_LOG asks for more.
    let _junk = crate::init_logging("error", crate::LogFormat::Text);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(problem) => {
            eprintln!("error: cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(run_demo(mib)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            say!("\nsome checks FAILED (see ✗ above)");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(problem) => {
            eprintln!("error: demo could not run: {problem}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// The local TCP services node-b exposes.
#[derive(Debug, Clone, Copy)]
struct Services {
    echo: SocketAddr,
    sink: SocketAddr,
    closed: SocketAddr,
}

/// The node configs. The forward listeners start on port 0 (the OS picks);
/// the config format itself insists on fixed forward ports, so the demo sets
/// them after parsing.
fn node_configs(b_quic: SocketAddr, services: &Services) -> Result<(Config, Config), DemoError> {
    let Services { echo, sink, closed } = *services;
    let b = format!(
        r#"
node = "node-b"
[quic]
listen = "127.0.0.1:0"
[tls]
ca = "unused-in-demo.crt"
cert = "unused-in-demo.crt"
key = "unused-in-demo.key"
[[expose]]
service = "demo-echo"
target = "{echo}"
allow = ["node-a"]
[[expose]]
service = "private"
target = "{echo}"
allow = ["node-c"]
[[expose]]
service = "closed-port"
target = "{closed}"
allow = ["node-a"]
[[expose]]
service = "demo-sink"
target = "{sink}"
allow = ["node-a"]
[limits]
shards = 1
"#
    );
    let a = format!(
        r#"
node = "node-a"
[quic]
listen = "127.0.0.1:0"
[tls]
ca = "unused-in-demo.crt"
cert = "unused-in-demo.crt"
key = "unused-in-demo.key"
[[peer]]
name = "node-b"
addr = "{b_quic}"
[[forward]]
listen = "127.0.0.1:1"
peer = "node-b"
service = "demo-echo"
[[forward]]
listen = "127.0.0.1:2"
peer = "node-b"
service = "no-such-service"
[[forward]]
listen = "127.0.0.1:3"
peer = "node-b"
service = "private"
[[forward]]
listen = "127.0.0.1:4"
peer = "node-b"
service = "closed-port"
[[forward]]
listen = "127.0.0.1:5"
peer = "node-b"
service = "demo-sink"
[limits]
shards = 1
"#
    );
    let b = meshtun_config::parse(&b)?;
    let mut a = meshtun_config::parse(&a)?;
    for forward in &mut a.forwards {
        forward.listen.set_port(0);
    }
    Ok((a, b))
}

struct Checks {
    all_passed: bool,
}

impl Checks {
    fn report(&mut self, passed: bool, line: impl AsRef<str>) {
        self.all_passed &= passed;
        say!("{} {}", if passed { "✓" } else { "✗" }, line.as_ref());
    }
}

async fn run_demo(mib: u64) -> Result<bool, DemoError> {
    say!("meshtun demo: two nodes on loopback, a throwaway CA, nothing written to disk\n");
    let authority = Authority::generate("demo", Validity::days_from_now(1))?;
    let trust = TrustBundle::from_pem(&authority.cert_pem())?;
    let credentials = |name: &str| -> Result<NodeCredentials, DemoError> {
        let node = NodeName::new(name)?;
        let issued = authority.issue(&node, &[], &[], Validity::days_from_now(1))?;
        Ok(NodeCredentials::from_pem(
            &issued.cert_pem,
            &issued.key_pem,
        )?)
    };

    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let services = Services {
        echo: echo.local_addr()?,
        sink: sink.local_addr()?,
        // A port that was bound and released: nothing listens there.
        closed: TcpListener::bind("127.0.0.1:0").await?.local_addr()?,
    };
    let echo_addr = services.echo;
    tokio::spawn(echo_server(echo));
    tokio::spawn(sink_server(sink));

    let (_, b_config) = node_configs("127.0.0.1:9".parse()?, &services)?;
    let node_b = Node::start(b_config, credentials("node-b")?, trust.clone()).await?;
    let (a_config, _) = node_configs(node_b.quic_addr(), &services)?;
    let node_a = Node::start(a_config, credentials("node-a")?, trust.clone()).await?;
    let forwards = node_a.forward_addrs().to_vec();
    say!(
        "node-b  QUIC {}  exposes demo-echo -> {echo_addr} (allow node-a)",
        node_b.quic_addr()
    );
    say!(
        "node-a  QUIC {}  forwards {} -> node-b/demo-echo\n",
        node_a.quic_addr(),
        forwards[0]
    );

    let mut checks = Checks { all_passed: true };
    let missing = node_a.wait_connected(Duration::from_secs(5)).await;
    let seen_by_b = node_b.incoming_peers();
    checks.report(
        missing.is_empty() && seen_by_b.iter().map(NodeName::as_str).eq(["node-a"]),
        format!(
            "mutual TLS 1.3 (ALPN meshtun/1): node-a verified the server's certificate names node-b; \
             node-b verified the client certificate and sees identity {}",
            seen_by_b.iter().map(NodeName::as_str).collect::<Vec<_>>().join(", ")
        ),
    );

    check_transfer(&mut checks, forwards[0], mib).await;

    check_bulk(&mut checks, forwards[4], services.sink, mib).await;

    check_latency(&mut checks, forwards[0], echo_addr).await;

    check_refusals(&mut checks, &forwards).await;

    check_rogue(&mut checks, node_b.quic_addr(), &services, &trust).await?;

    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
    if checks.all_passed {
        say!("\nall checks passed");
    }
    Ok(checks.all_passed)
}

/// `mib` MiB each way at once through the tunnel, hashed on both sides.
async fn check_transfer(checks: &mut Checks, forward: SocketAddr, mib: u64) {
    let started = Instant::now();
    let transfer = tokio::time::timeout(STEP_TIMEOUT, push_through(forward, mib)).await;
    let elapsed = started.elapsed();
    match transfer {
        Ok(Ok(true)) => checks.report(
            true,
            format!(
                "{mib} MiB each way at once through the tunnel in {:.2} s; SHA-256 of what came back equals what was sent",
                elapsed.as_secs_f64()
            ),
        ),
        Ok(Ok(false)) => checks.report(false, "data came back different from what was sent"),
        Ok(Err(problem)) => checks.report(false, format!("transfer failed: {problem}")),
        Err(_) => checks.report(
            false,
            format!("transfer did not finish within {STEP_TIMEOUT:?}"),
        ),
    }
}

/// At least 256 MiB one way into a sink, through the tunnel and direct.
async fn check_bulk(checks: &mut Checks, forward: SocketAddr, sink: SocketAddr, mib: u64) {
    let bulk_mib = mib.max(256);
    match (bulk(forward, bulk_mib).await, bulk(sink, bulk_mib).await) {
        (Ok(tunnel), Ok(direct)) => {
            checks.report(
                true,
                format!("{bulk_mib} MiB one way into a sink, byte count confirmed by the sink"),
            );
            say!(
                "  throughput: {tunnel:.2} Gbit/s through meshtun, {direct:.2} Gbit/s direct TCP on loopback ({:.0}%)",
                100.0 * tunnel / direct
            );
        }
        (Err(problem), _) | (_, Err(problem)) => {
            checks.report(false, format!("bulk transfer failed: {problem}"))
        }
    }
}

/// 64 B ping-pongs through the tunnel and direct.
async fn check_latency(checks: &mut Checks, forward: SocketAddr, echo: SocketAddr) {
    match (ping(forward).await, ping(echo).await) {
        (Ok(tunnel), Ok(direct)) => {
            checks.report(
                true,
                format!("{PING_ROUNDS} ping-pongs of 64 B through the tunnel"),
            );
            say!(
                "  latency: median round trip {:.1} us through meshtun, {:.1} us direct; added {:.1} us (p99 {:.1} us vs {:.1} us)",
                tunnel.median, direct.median, tunnel.median - direct.median, tunnel.p99, direct.p99
            );
        }
        (Err(problem), _) | (_, Err(problem)) => {
            checks.report(false, format!("latency probe failed: {problem}"))
        }
    }
}

/// The refused streams: each local client is reset.
async fn check_refusals(checks: &mut Checks, forwards: &[SocketAddr]) {
    for (addr, what) in [
        (forwards[1], "unknown service"),
        (
            forwards[2],
            "service exposed only to node-c, dialled by node-a (forbidden)",
        ),
        (forwards[3], "target port with nothing listening (refused)"),
    ] {
        match expect_reset(addr).await {
            Ok(after) => checks.report(
                true,
                format!("{what}: local client reset after {} ms", after.as_millis()),
            ),
            Err(problem) => checks.report(false, format!("{what}: {problem}")),
        }
    }
}

/// A node whose certificate comes from another CA: node-b must refuse it.
async fn check_rogue(
    checks: &mut Checks,
    node_b: SocketAddr,
    services: &Services,
    trust: &TrustBundle,
) -> Result<(), DemoError> {
    let rogue_authority = Authority::generate("rogue", Validity::days_from_now(1))?;
    let rogue_node = NodeName::new("node-a")?;
    let rogue = rogue_authority.issue(&rogue_node, &[], &[], Validity::days_from_now(1))?;
    let rogue_credentials = NodeCredentials::from_pem(&rogue.cert_pem, &rogue.key_pem)?;
    let (mut rogue_config, _) = node_configs(node_b, services)?;
    rogue_config.forwards.truncate(1);
    let rogue = Node::start(rogue_config, rogue_credentials, trust.clone()).await?;
    let rogue_missing = rogue.wait_connected(Duration::from_secs(2)).await;
    let rogue_reset = expect_reset(rogue.forward_addrs()[0]).await;
    match (rogue_missing.is_empty(), rogue_reset) {
        (false, Ok(_)) => checks.report(
            true,
            "a node calling itself node-a with a certificate from another CA: handshake rejected, its client reset",
        ),
        (true, _) => checks.report(false, "node-b accepted a certificate from another CA"),
        (false, Err(problem)) => checks.report(false, format!("rogue node's client: {problem}")),
    }
    rogue.shutdown(Duration::from_millis(100)).await;
    Ok(())
}

/// Echoes every byte back, then mirrors the client's half-close.
async fn echo_server(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let (mut read, mut write) = tcp.split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        });
    }
}

/// Size of one block of test data.
const BLOCK: usize = 1024 * 1024;

/// Deterministic, incompressible test data: a random 1 MiB base block with
/// the block's index stamped into its first eight bytes, so lost, repeated
/// or reordered blocks change the hash.
struct TestData {
    base: Vec<u8>,
}

impl TestData {
    fn new() -> Self {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let base = (0..BLOCK / 8)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        Self { base }
    }

    fn block(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.base);
        out[..8].copy_from_slice(&index.to_le_bytes());
    }
}

/// Sends `mib` MiB through `addr` while reading the echo; true if the hash
/// of what came back equals the hash of what was sent.
async fn push_through(addr: SocketAddr, mib: u64) -> io::Result<bool> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut read, mut write) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let data = TestData::new();
        let mut block = Vec::with_capacity(BLOCK);
        let mut sent = Sha256::new();
        for index in 0..mib {
            data.block(index, &mut block);
            sent.update(&block);
            write.write_all(&block).await?;
        }
        write.shutdown().await?;
        Ok::<_, io::Error>(sent.finalize())
    });
    let mut received = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let read = read.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        total += read as u64;
        received.update(&buffer[..read]);
    }
    let sent = writer.await.map_err(io::Error::other)??;
    Ok(total == mib * BLOCK as u64 && sent == received.finalize())
}

/// A server that reads and discards, then reports how much it got.
async fn sink_server(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(read) = tcp.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                total += read as u64;
            }
            let _ = tcp.write_all(&total.to_le_bytes()).await;
        });
    }
}

/// One-way bulk transfer of `mib` MiB into the sink; Gbit/s, once the sink
/// confirmed it received every byte.
async fn bulk(addr: SocketAddr, mib: u64) -> io::Result<f64> {
    let data = TestData::new();
    let mut tcp = TcpStream::connect(addr).await?;
    let started = Instant::now();
    for _ in 0..mib {
        tcp.write_all(&data.base).await?;
    }
    tcp.shutdown().await?;
    let mut total = [0u8; 8];
    tcp.read_exact(&mut total).await?;
    let elapsed = started.elapsed();
    if u64::from_le_bytes(total) != mib * BLOCK as u64 {
        return Err(io::Error::other(
            "sink received a different number of bytes",
        ));
    }
    Ok((mib * BLOCK as u64 * 8) as f64 / elapsed.as_secs_f64() / 1e9)
}

struct Latency {
    median: f64,
    p99: f64,
}

/// 64-byte ping-pongs over one connection; round-trip times in microseconds.
async fn ping(addr: SocketAddr) -> io::Result<Latency> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let message = [0x5au8; 64];
    let mut reply = [0u8; 64];
    let mut samples = Vec::with_capacity(PING_ROUNDS);
    for round in 0..PING_ROUNDS + 100 {
        let started = Instant::now();
        tcp.write_all(&message).await?;
        tcp.read_exact(&mut reply).await?;
        // The first hundred rounds warm up caches and congestion state.
        if round >= 100 {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        if reply != message {
            return Err(io::Error::other("echo returned different bytes"));
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(Latency {
        median: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
    })
}

/// Connects, sends a few bytes and expects the connection to be reset
/// (not a clean end of file, not a hang) within two seconds.
async fn expect_reset(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        let mut tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            // On loopback the reset can land before connect() returns.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
            Err(error) => return Err(error),
        };
        let _ = tcp.write_all(b"hello").await;
        let mut buffer = [0u8; 16];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) => return Ok(false),
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
                Err(error) => return Err(error),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(true)) => Ok(started.elapsed()),
        Ok(Ok(false)) => Err("client saw a clean end of file instead of a reset".to_owned()),
        Ok(Err(error)) => Err(format!("unexpected error: {error}")),
        Err(_) => Err("client was neither reset nor closed within 2 s".to_owned()),
    }
}
