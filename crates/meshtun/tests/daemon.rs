//! Real daemons: two `meshtun run` processes on loopback, node-a forwarding
//! local ports to services that node-b exposes, with targets served by this
//! test. They check what only whole processes show (DESIGN.md §4, §5):
//! SIGTERM drains and exits 0, a killed peer resets the local client instead
//! of ending its connection cleanly, and a restarted peer is reachable again
//! at once thanks to the stateless-reset key derived from its node key.
//!
//! Each daemon logs at info to a file in the test's temp dir; the log is
//! printed when a test fails.

mod common;

use std::fs::{self, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{free_tcp_port, free_udp_port, meshtun, ChildGuard, TempDir};
use meshtun_pki::{Authority, Validity};
use meshtun_proto::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// `[limits] drain_grace` of both daemons.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long the daemons may take to come up and carry a first round trip.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemons' log filter: info, unless MESHTUN_TEST_DAEMON_LOG names
/// another (e.g. `info,quinn_proto=debug` to see stateless resets).
fn log_filter() -> String {
    std::env::var("MESHTUN_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".to_owned())
}

/// One `meshtun run` process, its config and its log file.
struct Daemon {
    name: &'static str,
    config: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl Daemon {
    fn spawn(name: &'static str, config: PathBuf, log: PathBuf) -> Self {
        let mut daemon = Self {
            name,
            config,
            log,
            child: None,
        };
        daemon.respawn();
        daemon
    }

    /// Starts the daemon (again), appending to the same log.
    fn respawn(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log file");
        let stdout = log.try_clone().expect("clone log file");
        let child = meshtun()
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("MESHTUN_LOG", log_filter())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn meshtun run");
        self.child = Some(ChildGuard::new(child));
    }

    fn child(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("daemon is running")
    }

    /// `kill -9`, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Sends SIGTERM.
    fn terminate(&mut self) {
        let pid = self.child().id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
    }

    /// Whether the process is still alive.
    fn is_running(&mut self) -> bool {
        self.child().0.try_wait().expect("try_wait").is_none()
    }

    /// Polls for the exit until `deadline`; `None` if it still runs.
    async fn exited_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.child().0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_else(|error| error.to_string());
            eprintln!(
                "===== {} log ({}) =====\n{log}",
                self.name,
                self.log.display()
            );
        }
    }
}

/// node-a forwards `echo` and `source` to node-b, which exposes them to
/// node-a with targets served by this test.
struct Cluster {
    // Fields drop in order: the daemons die before their directory goes.
    node_a: Daemon,
    node_b: Daemon,
    /// node-a's forward to the echo service.
    echo: SocketAddr,
    /// node-a's forward to the endless source service.
    source: SocketAddr,
    _dir: TempDir,
}

impl Cluster {
    /// Writes the CA, both nodes' certificates and configs, starts node-b
    /// then node-a, and waits until an echo round trip through node-a works.
    async fn start(label: &str) -> Self {
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
        let source_target = source_server().await;
        let node_b_quic = free_udp_port("127.0.0.3");
        let echo = free_tcp_port("127.0.0.1");
        let source = free_tcp_port("127.0.0.1");
        let quic = "idle_timeout = \"3s\"\nkeep_alive = \"1s\"\nreconnect_max = \"1s\"\n";
        let limits = format!("[limits]\ndrain_grace = \"{}s\"\n", DRAIN_GRACE.as_secs());
        let node_b_config = format!(
            "node = \"node-b\"\n\
             [quic]\nlisten = \"{node_b_quic}\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-b.crt\"\nkey = \"node-b.key\"\n\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo_target}\"\nallow = [\"node-a\"]\n\
             [[expose]]\nservice = \"source\"\ntarget = \"{source_target}\"\nallow = [\"node-a\"]\n\
             {limits}"
        );
        let node_a_config = format!(
            "node = \"node-a\"\n\
             [quic]\nlisten = \"127.0.0.2:0\"\n{quic}\
             [tls]\nca = \"ca.crt\"\ncert = \"node-a.crt\"\nkey = \"node-a.key\"\n\
             [[peer]]\nname = \"node-b\"\naddr = \"{node_b_quic}\"\n\
             [[forward]]\nlisten = \"{echo}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [[forward]]\nlisten = \"{source}\"\npeer = \"node-b\"\nservice = \"source\"\n\
             {limits}"
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
        let node_a = Daemon::spawn(
            "node-a",
            write("node-a.toml", &node_a_config),
            dir.join("node-a.log"),
        );
        let cluster = Self {
            node_a,
            node_b,
            echo,
            source,
            _dir: dir,
        };
        if let Err(error) = echo_until(cluster.echo, READY_TIMEOUT, Duration::from_secs(1)).await {
            panic!("the daemons did not carry an echo within {READY_TIMEOUT:?}: {error}");
        }
        cluster
    }
}

/// An echo server: every byte comes back; the client's FIN is mirrored.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    addr
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

/// One connection through `addr`: a few bytes out and the same bytes back,
/// within `within`.
async fn echo_once(addr: SocketAddr, within: Duration) -> io::Result<()> {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await?;
        round_trip(&mut tcp).await
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no echo in time")))
}

/// Writes a message on `tcp` and reads it back.
async fn round_trip(tcp: &mut TcpStream) -> io::Result<()> {
    let message = b"meshtun echo round trip";
    tcp.write_all(message).await?;
    let mut back = [0u8; 23];
    tcp.read_exact(&mut back).await?;
    if &back != message {
        return Err(io::Error::other(format!("echo returned {back:?}")));
    }
    Ok(())
}

/// Tries [`echo_once`] every 50 ms until one works, giving each attempt
/// `per_attempt`; returns how long it took, or the last error after `timeout`.
async fn echo_until(
    addr: SocketAddr,
    timeout: Duration,
    per_attempt: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match echo_once(addr, per_attempt).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(error) => error,
        };
        if started.elapsed() >= timeout {
            return Err(format!(
                "{attempts} attempts in {:?}; last: {error}",
                started.elapsed()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    eprintln!("node-a exited {:?} after SIGTERM", exited - signalled);

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
    eprintln!("reset {after:?} after the kill; {received} bytes received");

    // node-a keeps running and reaches node-b again once it is back.
    assert!(cluster.node_a.is_running(), "node-a died with its peer");
    cluster.node_b.respawn();
    let recovered = echo_until(
        cluster.echo,
        Duration::from_secs(10),
        Duration::from_secs(1),
    )
    .await
    .unwrap_or_else(|error| panic!("no echo after node-b restarted: {error}"));
    eprintln!("echo through the restarted node-b after {recovered:?}");
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
    eprintln!("echo through the restarted node-b {recovered:?} after its start");
    assert!(
        recovered < Duration::from_secs(2),
        "node-a took {recovered:?} to reach the restarted node-b; the stateless reset should make it drop the stale connection at once"
    );
    assert!(cluster.node_a.is_running(), "node-a was not restarted");
}
