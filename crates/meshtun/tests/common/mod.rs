//! Helpers shared by the tests that run the `meshtun` binary as a process:
//! unique temporary directories, commands with a time bound, child processes
//! that are killed when a test fails, and OS-chosen loopback ports.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a one-shot CLI command (`check`, `pki ...`, a `run` that must
/// fail) may take. Generous: the binary is a debug build on a shared machine.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit code for a command line the binary cannot understand.
pub(crate) const EXIT_USAGE: i32 = 64;
/// Exit code for a bad configuration or certificate.
pub(crate) const EXIT_CONFIG: i32 = 78;

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshtun-bin-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// `self/name`.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The directory as a string with a trailing '/', for config text.
    pub(crate) fn prefix(&self) -> String {
        let text = self.0.to_str().expect("temp dir path is UTF-8");
        format!("{text}/")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The binary under test, with no configuration or logging settings
/// inherited from the environment of whoever runs the tests.
pub(crate) fn meshtun() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshtun"));
    command
        .env_remove("MESHTUN_CONFIG")
        .env_remove("MESHTUN_LOG")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    command
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// The exit code; panics (with the output) if a signal ended it.
    pub(crate) fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self}"))
    }

    /// Asserts exit code 0.
    pub(crate) fn success(self) -> Self {
        assert_eq!(self.code(), 0, "expected success: {self}");
        self
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to completion, killing it and failing the test if it
/// takes longer than [`COMMAND_TIMEOUT`].
pub(crate) fn run(command: &mut Command) -> Finished {
    let mut child = ChildGuard::new(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshtun"),
    );
    let stdout = drain(child.0.stdout.take().expect("piped stdout"));
    let stderr = drain(child.0.stderr.take().expect("piped stderr"));
    let status = child
        .wait_until(Instant::now() + COMMAND_TIMEOUT)
        .unwrap_or_else(|| panic!("{command:?} did not finish within {COMMAND_TIMEOUT:?}"));
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// `meshtun ARGS...`, run to completion.
pub(crate) fn meshtun_with(args: &[&str]) -> Finished {
    run(meshtun().args(args))
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A child process that is killed and reaped when dropped, so a failing
/// test never leaves a daemon behind.
#[derive(Debug)]
pub(crate) struct ChildGuard(pub(crate) Child);

impl ChildGuard {
    pub(crate) fn new(child: Child) -> Self {
        Self(child)
    }

    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }

    /// Polls for the child's exit until `deadline`; `None` if it still runs.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then reap.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP port that was free a moment ago.
pub(crate) fn free_tcp_port(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("bind TCP port 0");
    listener.local_addr().expect("local addr")
}

/// `count` distinct TCP ports on `ip` that were free a moment ago: all
/// are held at once while they are chosen, so no two are the same (ports
/// chosen one after another may repeat).
pub(crate) fn free_tcp_ports(ip: &str, count: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind((ip, 0)).expect("bind TCP port 0"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr"))
        .collect()
}

/// A loopback UDP port that was free a moment ago.
pub(crate) fn free_udp_port(ip: &str) -> SocketAddr {
    let socket = UdpSocket::bind((ip, 0)).expect("bind UDP port 0");
    socket.local_addr().expect("local addr")
}

/// The permission bits of `path`.
pub(crate) fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|error| panic!("stat {}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|error| panic!("chmod {}: {error}", path.display()));
}

/// `meshtun pki init-ca --cluster CLUSTER --out DIR`, which must succeed.
pub(crate) fn init_ca(cluster: &str, dir: &Path) {
    meshtun_with(&[
        "pki",
        "init-ca",
        "--cluster",
        cluster,
        "--out",
        dir.to_str().expect("UTF-8 path"),
    ])
    .success();
}

/// `meshtun pki issue --ca CA --node NODE --out OUT`, which must succeed.
pub(crate) fn issue(ca: &Path, node: &str, out: &Path) {
    meshtun_with(&[
        "pki",
        "issue",
        "--ca",
        ca.to_str().expect("UTF-8 path"),
        "--node",
        node,
        "--out",
        out.to_str().expect("UTF-8 path"),
    ])
    .success();
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// GET `path` from an admin endpoint: (HTTP status code, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        tcp.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no header end in {response:?}")))?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status code in {head:?}")))?;
        Ok((code, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ))
        })
}

/// `/status` of a node, parsed.
pub(crate) async fn status_of(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status").await.expect("GET /status");
    assert_eq!(code, 200, "GET /status: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("/status is not JSON ({error}): {body}"))
}

/// The daemons' log filter: info, unless MESHTUN_TEST_DAEMON_LOG names
/// another (e.g. `info,quinn_proto=debug` to see stateless resets).
pub(crate) fn log_filter() -> String {
    std::env::var("MESHTUN_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".to_owned())
}

/// One `meshtun run` process, its config and its log file.
pub(crate) struct Daemon {
    pub(crate) name: &'static str,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<ChildGuard>,
}

impl Daemon {
    pub(crate) fn spawn(name: &'static str, config: PathBuf, log: PathBuf) -> Self {
        Self::spawn_with(name, config, log, Vec::new())
    }

    /// Like [`Daemon::spawn`], with extra environment variables.
    pub(crate) fn spawn_with(
        name: &'static str,
        config: PathBuf,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut daemon = Self {
            name,
            config,
            log,
            env,
            child: None,
        };
        daemon.respawn();
        daemon
    }

    /// Starts the daemon (again), appending to the same log.
    pub(crate) fn respawn(&mut self) {
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
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn meshtun run");
        self.child = Some(ChildGuard::new(child));
    }

    pub(crate) fn child(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("daemon is running")
    }

    /// `kill -9`, and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Sends SIGTERM.
    pub(crate) fn terminate(&mut self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`kill -NAME`).
    pub(crate) fn signal(&mut self, name: &str) {
        let pid = self.child().id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// Whether the process is still alive.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child().0.try_wait().expect("try_wait").is_none()
    }

    /// Polls for the exit until `deadline`; `None` if it still runs.
    pub(crate) async fn exited_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
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

/// One mebibyte.
pub(crate) const MIB_BYTES: usize = 1024 * 1024;

// Not every test file forwards to an echo server.
#[allow(unused_imports)]
pub(crate) use meshtun_test_support::echo_server;

/// Echoes `total` bytes through `addr` (a repeating 1 MiB pattern), checking
/// every byte that comes back; `progress` is called with the bytes received
/// so far after each read. Returns the bytes received and the offset of the
/// first wrong byte, if any.
pub(crate) async fn echo_checked(
    addr: SocketAddr,
    total: usize,
    mut progress: impl FnMut(usize),
) -> std::io::Result<(usize, Option<usize>)> {
    let block: Vec<u8> = (0..MIB_BYTES)
        .map(|index| (index * 7 % 251) as u8)
        .collect();
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut read, mut write) = tcp.split();
    let sending = async {
        for _ in 0..total / MIB_BYTES {
            write.write_all(&block).await?;
        }
        write.shutdown().await
    };
    let receiving = async {
        let mut buffer = vec![0u8; 256 * 1024];
        let mut received = 0usize;
        let mut mismatch = None;
        loop {
            let count = read.read(&mut buffer).await?;
            if count == 0 {
                return Ok::<_, std::io::Error>((received, mismatch));
            }
            for (offset, byte) in buffer[..count].iter().enumerate() {
                let at = received + offset;
                if mismatch.is_none() && *byte != block[at % MIB_BYTES] {
                    mismatch = Some(at);
                }
            }
            received += count;
            progress(received);
        }
    };
    let (sent, received) = tokio::join!(sending, receiving);
    sent?;
    received
}

/// `/status` `peers[name]` of the node behind `admin` (`Null` if none).
pub(crate) async fn peer_status(admin: SocketAddr, peer: &str) -> serde_json::Value {
    let status = status_of(admin).await;
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry["name"] == peer)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// The serials of the certificates `peer` presents to the node behind `admin`.
pub(crate) async fn peer_serials(admin: SocketAddr, peer: &str) -> Vec<String> {
    let status = status_of(admin).await;
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["name"] == peer)
        .flat_map(|entry| {
            entry["certificates"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|certificate| certificate["serial"].as_str().map(str::to_owned))
        .collect()
}

/// One connection through `addr`: a few bytes out and the same bytes back,
/// within `within`.
pub(crate) async fn echo_once(addr: SocketAddr, within: Duration) -> std::io::Result<()> {
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        round_trip(&mut tcp).await
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no echo in time",
            ))
        })
}

/// Writes a message on `tcp` and reads it back.
pub(crate) async fn round_trip(tcp: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let message = b"meshtun echo round trip";
    tcp.write_all(message).await?;
    let mut back = [0u8; 23];
    tcp.read_exact(&mut back).await?;
    if &back != message {
        return Err(std::io::Error::other(format!("echo returned {back:?}")));
    }
    Ok(())
}

/// Tries [`echo_once`] every 50 ms until one works, giving each attempt
/// `per_attempt`; returns the last error if none worked within `timeout`.
pub(crate) async fn echo_until(
    addr: SocketAddr,
    timeout: Duration,
    per_attempt: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match echo_once(addr, per_attempt).await {
            Ok(()) => return Ok(()),
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
