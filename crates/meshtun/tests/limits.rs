#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A daemon out of file descriptors (`ulimit -n 256` with more local
//! clients than descriptors) degrades and never exits: the clients it
//! cannot serve are reset promptly instead of left hanging, the shortage is
//! logged and counted, and once descriptors are free again it carries new
//! connections at once, on the same peer connection.
//!
//! Two real daemons on loopback, as in daemon.rs: node-a forwards a local
//! port to the echo service node-b exposes, whose target this test serves.
//! Only the daemon under test is limited (with `prlimit`, or `ulimit` in a
//! shell that then execs the daemon); this process keeps its own limit.
//! Each daemon logs at info to a file in the test's temp dir, printed when
//! a test fails.
//!
//! A panic in test code is a failed test, which is what an expect or a
//! panic here means (hence the allow above).

mod common;

use std::fs::{self, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    echo_once, echo_server, echo_until, free_tcp_ports, free_udp_port, http_get, status_of,
    ChildGuard, TempDir,
};
use meshtun_pki::{Authority, Validity};
use meshtun_proto::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The descriptor limit (soft and hard) of the daemon under test.
const FD_LIMIT: u32 = 256;
/// `limits.shards` of node-a: one connection to node-b per shard.
///
/// Two, so the forward has two listeners (one `SO_REUSEPORT` group), each
/// on its own thread. Refusing a queue by giving up a reserve descriptor
/// failed here: the other shard's accept took the freed descriptor, and in
/// one CI run 71 of 400 clients were neither served nor refused within
/// 5 s. Each listener now refuses by restarting its listen, which needs no
/// descriptor.
const NODE_A_SHARDS: usize = 2;
/// Local clients held open at once: well past [`FD_LIMIT`].
const CLIENTS: usize = 400;
/// How long one client's attempt (connect, echo or refusal) may take.
const ATTEMPT_BOUND: Duration = Duration::from_secs(5);
/// How long the daemons may take to come up and carry a first echo.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long after the clients are released the daemon must serve again.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Sequential clients that must all get their echo after the release.
const RECOVERY_CLIENTS: usize = 50;
/// The series the accept loops count descriptor shortages in.
const OPEN_FILES_SERIES: &str = "meshtun_limit_hits_total{limit=\"open_files\"}";

/// Whether util-linux `prlimit` can run a command here.
fn has_prlimit() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// One `meshtun run` process and its log file.
struct Daemon {
    name: &'static str,
    log: PathBuf,
    child: ChildGuard,
}

impl Daemon {
    /// Starts `meshtun run -c CONFIG`, under a descriptor limit if given.
    /// No `pre_exec`/`setrlimit` here (the workspace forbids unsafe code):
    /// `prlimit` or `sh`'s `ulimit` sets the limit and execs the daemon, so
    /// the child's pid is the daemon's.
    fn spawn(name: &'static str, config: &Path, log: PathBuf, fd_limit: Option<u32>) -> Self {
        let exe = env!("CARGO_BIN_EXE_meshtun");
        let mut command = match fd_limit {
            None => Command::new(exe),
            Some(limit) if has_prlimit() => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(exe);
                command
            }
            Some(limit) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(exe);
                command
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log file");
        let stdout = file.try_clone().expect("clone log file");
        let child = command
            .arg("run")
            .arg("-c")
            .arg(config)
            .env_remove("MESHTUN_CONFIG")
            .env_remove("RUST_LOG")
            .env("MESHTUN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn meshtun run");
        Self {
            name,
            log,
            child: ChildGuard::new(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still alive.
    fn is_running(&mut self) -> bool {
        self.child.0.try_wait().expect("try_wait").is_none()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|error| error.to_string())
    }

    /// The (soft, hard) "Max open files" of the running process.
    fn nofile_limit(&self) -> (String, String) {
        let limits = fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("read /proc/PID/limits");
        let line = limits
            .lines()
            .find_map(|line| line.strip_prefix("Max open files"))
            .unwrap_or_else(|| panic!("no 'Max open files' in:\n{limits}"));
        let mut fields = line.split_whitespace();
        let soft = fields.next().unwrap_or_default().to_owned();
        let hard = fields.next().unwrap_or_default().to_owned();
        (soft, hard)
    }

    /// Descriptors the process holds now (0 if it cannot be read).
    fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, Iterator::count)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!(
                "===== {} log ({}) =====\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// node-a forwards a local port to node-b's echo service.
struct Cluster {
    // Fields drop in order: the daemons die before their directory goes.
    node_a: Daemon,
    node_b: Daemon,
    /// node-a's forward to the echo service.
    echo: SocketAddr,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    _dir: TempDir,
}

impl Cluster {
    /// Writes the CA, certificates and configs, starts node-b then node-a
    /// (each under `limit_*` descriptors if given), and waits for an echo
    /// through node-a.
    async fn start(label: &str, limit_a: Option<u32>, limit_b: Option<u32>) -> Self {
        let dir = TempDir::new(label);
        let authority =
            Authority::generate("test", Validity::days_from_now(2)).expect("generate CA");
        authority.write(dir.path(), false).expect("write CA");
        for name in ["node-a", "node-b"] {
            let node = NodeName::new(name).expect("node name");
            authority
                .issue(&node, &[], &[], Validity::days_from_now(2))
                .expect("issue")
                .write(dir.path(), &node, false)
                .expect("write node certificate");
        }
        let echo_target = echo_server().await;
        let node_b_quic = free_udp_port("127.0.0.1");
        // Chosen together, so no two are the same.
        let ports = free_tcp_ports("127.0.0.1", 3);
        let (echo, admin_a, admin_b) = (ports[0], ports[1], ports[2]);
        let quic = "idle_timeout = \"3s\"\nkeep_alive = \"1s\"\nreconnect_max = \"1s\"\n";
        let node_b_config = format!(
            "node = \"node-b\"\n\
             [quic]\nlisten = \"{node_b_quic}\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-b.crt\"\nkey = \"node-b.key\"\n\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo_target}\"\nallow = [\"node-a\"]\n\
             [admin]\nlisten = \"{admin_b}\"\n"
        );
        let node_a_config = format!(
            "node = \"node-a\"\n\
             [quic]\nlisten = \"127.0.0.1:0\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-a.crt\"\nkey = \"node-a.key\"\n\
             [[peer]]\nname = \"node-b\"\naddr = \"{node_b_quic}\"\n\
             [[forward]]\nlisten = \"{echo}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [limits]\nshards = {NODE_A_SHARDS}\n\
             [admin]\nlisten = \"{admin_a}\"\n"
        );
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).expect("write config");
            path
        };
        let node_b = Daemon::spawn(
            "node-b",
            &write("node-b.toml", &node_b_config),
            dir.join("node-b.log"),
            limit_b,
        );
        let node_a = Daemon::spawn(
            "node-a",
            &write("node-a.toml", &node_a_config),
            dir.join("node-a.log"),
            limit_a,
        );
        let cluster = Self {
            node_a,
            node_b,
            echo,
            admin_a,
            admin_b,
            _dir: dir,
        };
        if let Err(error) = echo_until(cluster.echo, READY_TIMEOUT, Duration::from_secs(2)).await {
            panic!("the daemons did not carry an echo within {READY_TIMEOUT:?}: {error}");
        }
        cluster
    }
}

/// Asserts that `daemon` really runs under [`FD_LIMIT`] descriptors.
fn assert_limited(daemon: &Daemon) {
    let comm = fs::read_to_string(format!("/proc/{}/comm", daemon.pid())).unwrap_or_default();
    assert_eq!(comm.trim(), "meshtun", "the limited child is not meshtun");
    let limit = FD_LIMIT.to_string();
    assert_eq!(
        daemon.nofile_limit(),
        (limit.clone(), limit),
        "{}'s Max open files",
        daemon.name
    );
}

/// How one client's attempt ended.
#[derive(Debug)]
enum Outcome {
    /// Its own bytes came back; the connection is held open.
    Echoed(TcpStream),
    /// Reset by the daemon (before any echo).
    Reset,
    /// Closed cleanly after `received` correct bytes of a partial echo.
    Eof { received: usize },
    /// Another error (connect, write or read).
    Failed(io::ErrorKind),
    /// Bytes that are not its own: data crossed between connections.
    WrongData(Vec<u8>),
    /// No answer within [`ATTEMPT_BOUND`].
    Hung,
}

/// Connects to `addr`, sends a message unique to `index` and reads it back,
/// all within [`ATTEMPT_BOUND`].
async fn client(addr: SocketAddr, index: usize) -> (Outcome, Duration) {
    let started = Instant::now();
    let message = format!("meshtun limits client {index:04}\n").into_bytes();
    let attempt = async {
        let failed = |error: io::Error| match error.kind() {
            io::ErrorKind::ConnectionReset => Outcome::Reset,
            kind => Outcome::Failed(kind),
        };
        let mut tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(error) => return failed(error),
        };
        if let Err(error) = tcp.write_all(&message).await {
            return failed(error);
        }
        let mut back = Vec::with_capacity(message.len());
        let mut buffer = [0u8; 64];
        while back.len() < message.len() {
            match tcp.read(&mut buffer).await {
                Ok(0) => {
                    return Outcome::Eof {
                        received: back.len(),
                    }
                }
                Ok(read) => {
                    back.extend_from_slice(&buffer[..read]);
                    if !message.starts_with(&back) {
                        return Outcome::WrongData(back);
                    }
                }
                Err(error) => return failed(error),
            }
        }
        Outcome::Echoed(tcp)
    };
    let outcome = tokio::time::timeout(ATTEMPT_BOUND, attempt)
        .await
        .unwrap_or(Outcome::Hung);
    (outcome, started.elapsed())
}

/// What [`CLIENTS`] concurrent clients saw; the echoed ones stay open.
#[derive(Debug, Default)]
struct Tally {
    held: Vec<TcpStream>,
    reset: usize,
    eof: usize,
    /// Clean closes after part of the echo (should not happen).
    partial: usize,
    failed: Vec<io::ErrorKind>,
    wrong: Vec<Vec<u8>>,
    hung: usize,
    slowest_echo: Duration,
    slowest_refusal: Duration,
    took: Duration,
}

impl Tally {
    fn refused(&self) -> usize {
        self.reset + self.eof + self.failed.len()
    }

    fn summary(&self) -> String {
        format!(
            "{} echoed, {} refused ({} reset, {} clean EOF, {} other errors {:?}), \
             {} partial echoes, {} wrong data, {} hung past {ATTEMPT_BOUND:?}; \
             slowest echo {:?}, slowest refusal {:?}, all settled in {:?}",
            self.held.len(),
            self.refused(),
            self.reset,
            self.eof,
            self.failed.len(),
            self.failed,
            self.partial,
            self.wrong.len(),
            self.hung,
            self.slowest_echo,
            self.slowest_refusal,
            self.took
        )
    }
}

/// Runs [`CLIENTS`] clients at once against `addr` and tallies them.
async fn crowd(addr: SocketAddr) -> Tally {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|index| tokio::spawn(client(addr, index)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        // Each attempt is bounded by ATTEMPT_BOUND; this bounds the join.
        let (outcome, took) = tokio::time::timeout(ATTEMPT_BOUND * 4, task)
            .await
            .expect("a client task outlived its own bound")
            .expect("client task");
        if matches!(outcome, Outcome::Echoed(_)) {
            tally.slowest_echo = tally.slowest_echo.max(took);
        } else if !matches!(outcome, Outcome::Hung) {
            tally.slowest_refusal = tally.slowest_refusal.max(took);
        }
        match outcome {
            Outcome::Echoed(tcp) => tally.held.push(tcp),
            Outcome::Reset => tally.reset += 1,
            Outcome::Eof { received: 0 } => tally.eof += 1,
            Outcome::Eof { .. } => tally.partial += 1,
            Outcome::Failed(kind) => tally.failed.push(kind),
            Outcome::WrongData(bytes) => tally.wrong.push(bytes),
            Outcome::Hung => tally.hung += 1,
        }
    }
    tally.took = started.elapsed();
    tally
}

/// Waits (within [`RECOVERY_TIMEOUT`]) for a first echo through `addr`,
/// then requires [`RECOVERY_CLIENTS`] sequential echoes in a row.
async fn recovery(addr: SocketAddr) {
    let released = Instant::now();
    echo_until(addr, RECOVERY_TIMEOUT, Duration::from_secs(2))
        .await
        .unwrap_or_else(|error| {
            panic!("no echo within {RECOVERY_TIMEOUT:?} of releasing the clients: {error}")
        });
    for index in 0..RECOVERY_CLIENTS {
        if let Err(error) = echo_once(addr, Duration::from_secs(2)).await {
            panic!("recovery client {index} of {RECOVERY_CLIENTS} failed: {error}");
        }
    }
    let all = released.elapsed();
    assert!(
        all < RECOVERY_TIMEOUT,
        "{RECOVERY_CLIENTS} sequential echoes took until {all:?} after the release"
    );
}

/// The value of the sample `series` (name and labels, exactly) in an
/// OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The open_files hits in a `/metrics` scrape.
fn open_files_hits(scrape: &io::Result<(u16, String)>) -> Option<f64> {
    match scrape {
        Ok((200, text)) => sample(text, OPEN_FILES_SERIES),
        _ => None,
    }
}

/// The entry for `name` in a `/status` document's peers.
fn peer<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|peer| peer["name"] == name))
        .unwrap_or_else(|| panic!("no peer {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_degrades_and_recovers() {
    let mut cluster = Cluster::start("nofile-forward", Some(FD_LIMIT), None).await;
    assert_limited(&cluster.node_a);

    let tally = crowd(cluster.echo).await;
    let peak = cluster.node_a.open_fds();

    // The daemon degraded rather than died, and said why.
    assert!(cluster.node_a.is_running(), "node-a exited");
    let log = cluster.node_a.log_text();
    assert!(
        log.contains("out of file descriptors"),
        "node-a did not log the shortage"
    );
    // Every client heard back promptly: its echo, or a refusal.
    assert!(
        tally.wrong.is_empty(),
        "clients read bytes that were not theirs: {:?}",
        tally.wrong
    );
    assert_eq!(
        tally.partial,
        0,
        "clean closes mid-echo: {}",
        tally.summary()
    );
    assert!(
        tally.held.len() >= 100,
        "too few echoes: {}",
        tally.summary()
    );
    assert!(
        tally.refused() >= 1,
        "nobody was refused ({peak} of {FD_LIMIT} descriptors open at the peak): {}",
        tally.summary()
    );
    assert!(
        tally.reset >= 1,
        "refused clients should see a reset: {}",
        tally.summary()
    );

    // The admin endpoint needs a descriptor of its own: while the clients
    // hold them all, the scrape is usually refused (reset by the admin
    // listener's reserve descriptor). Try once; the counter is read after
    // the clients are released, which also shows the endpoint recovered.
    let held_scrape = http_get(cluster.admin_a, "/metrics")
        .await
        .map(|(code, _)| code);

    // Release every client: the daemon serves again at once.
    let (hung, summary) = (tally.hung, tally.summary());
    drop(tally);
    recovery(cluster.echo).await;

    let scrape = http_get(cluster.admin_a, "/metrics").await;
    let hits = open_files_hits(&scrape);
    assert!(
        hits.is_some_and(|hits| hits > 0.0),
        "{OPEN_FILES_SERIES} should be > 0 (the scrape while the clients were held: \
         {held_scrape:?}): {scrape:?}"
    );
    let status = status_of(cluster.admin_a).await;
    assert!(
        status["limit_hits"]["open_files"].as_u64() > Some(0),
        "/status limit_hits: {status}"
    );
    // The peer connection carried on throughout: the same one, still up.
    let node_b = peer(&status, "node-b");
    assert_eq!(node_b["connections_up"], NODE_A_SHARDS, "{node_b}");
    assert_eq!(node_b["reconnects"], 0, "{node_b}");
    assert!(cluster.node_a.is_running(), "node-a exited after recovery");
    assert!(cluster.node_b.is_running(), "node-b exited");
    // Checked last, so that a failure here still shows whether the daemon
    // counted, logged and recovered.
    assert_eq!(hung, 0, "clients left hanging: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptor_out_of_descriptors_refuses_streams_and_recovers() {
    let mut cluster = Cluster::start("nofile-expose", None, Some(FD_LIMIT)).await;
    assert_limited(&cluster.node_b);

    let tally = crowd(cluster.echo).await;
    let peak = cluster.node_b.open_fds();

    assert!(cluster.node_b.is_running(), "node-b exited");
    assert!(cluster.node_a.is_running(), "node-a exited");
    assert!(
        tally.wrong.is_empty(),
        "clients read bytes that were not theirs: {:?}",
        tally.wrong
    );
    assert_eq!(
        tally.partial,
        0,
        "clean closes mid-echo: {}",
        tally.summary()
    );
    assert!(
        tally.held.len() >= 100,
        "too few echoes: {}",
        tally.summary()
    );
    assert!(
        tally.refused() >= 1,
        "nobody was refused ({peak} of {FD_LIMIT} descriptors open at the peak): {}",
        tally.summary()
    );
    assert!(
        tally.reset >= 1,
        "refused clients should see a reset: {}",
        tally.summary()
    );
    // node-a is not limited: its /status answers while the clients are held.
    let status_a = status_of(cluster.admin_a).await;
    let refused_outgoing = &peer(&status_a, "node-b")["refused_outgoing"];
    let unreachable = refused_outgoing["unreachable"].as_u64().unwrap_or(0);
    assert!(
        unreachable >= 1,
        "node-a should count node-b's refusals: {refused_outgoing}"
    );
    assert!(
        cluster.node_b.log_text().contains("Too many open files"),
        "node-b did not log why the target was unavailable"
    );

    let (hung, summary) = (tally.hung, tally.summary());
    drop(tally);
    recovery(cluster.echo).await;
    // node-b's admin endpoint may have been starved while the clients were
    // held; it answers now.
    let status_b = status_of(cluster.admin_b).await;
    let node_a = peer(&status_b, "node-a");
    assert!(
        node_a["refused_incoming"]["unreachable"].as_u64() >= Some(1),
        "node-b should count its refusals: {node_a}"
    );
    let status_a = status_of(cluster.admin_a).await;
    let node_b = peer(&status_a, "node-b");
    assert_eq!(node_b["connections_up"], NODE_A_SHARDS, "{node_b}");
    assert_eq!(node_b["reconnects"], 0, "{node_b}");
    assert!(cluster.node_b.is_running(), "node-b exited after recovery");
    // Checked last, so that a failure here still shows whether the daemon
    // counted and recovered.
    assert_eq!(hung, 0, "clients left hanging: {summary}");
}
