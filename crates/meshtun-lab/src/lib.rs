//! meshtun's multi-host lab: test hosts in Linux network namespaces.
//!
//! A [`Lab`] is a small switched network: one namespace holds a bridge (the
//! switch), and each host is a namespace of its own with one veth interface
//! (`eth0`) plugged into it, addressed from the benchmarking range
//! `198.18.0.0/15`. Every host runs a real `meshtun run` process with its own
//! certificate (made with the `meshtun pki` commands) and config. Tests reach
//! a host's loopback through sockets made on a thread that entered the host's
//! namespace ([`Host::run`]), and inject faults with `ip link`, nftables and
//! captures.
//!
//! This crate owns the lab's life cycle and must leave nothing behind: every
//! namespace and process it makes is removed when the [`Lab`] or [`Daemon`]
//! is dropped, also while a failing test unwinds, and [`Lab::new`] first
//! sweeps namespaces left by lab processes that no longer exist. Traffic
//! only ever goes to loopback or to the lab's own namespaces. It talks to
//! meshtun only through the `meshtun` binary, never through its crates.

pub mod capture;
pub mod impair;
pub mod pcap;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Prefix of every namespace the lab creates; the sweep only touches these.
pub const NAMESPACE_PREFIX: &str = "meshtun-lab-";
/// The UDP port every host's QUIC endpoint listens on.
pub const QUIC_PORT: u16 = 4433;
/// The environment variable that turns a SKIP into a failure (set by CI).
pub const REQUIRE_ENV: &str = "MESHTUN_REQUIRE_NETNS";

static LAB_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// What went wrong while building or driving the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Namespaces cannot be made here (not root, no `ip`, ...).
    #[error("network namespaces are not available: {0}")]
    Unavailable(String),
    /// A command the lab runs failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A daemon did not come up.
    #[error("meshtun on {host} did not start: {reason}\n--- log ---\n{log}")]
    DaemonStart {
        /// The host.
        host: String,
        /// Why the lab gave up.
        reason: String,
        /// The daemon's log so far.
        log: String,
    },
    /// Local I/O (files, sockets, threads).
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

type Result<T, E = LabError> = std::result::Result<T, E>;

/// Whether this machine can run lab tests, and if not, why.
pub fn availability() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root (lab tests need CAP_NET_ADMIN)".to_owned());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => {}
        _ => return Err("the `ip` command (iproute2) is missing".to_owned()),
    }
    let probe = format!("{NAMESPACE_PREFIX}{}-probe", std::process::id());
    let created = Command::new("ip").args(["netns", "add", &probe]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    match created {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Err(format!("`ip netns add` could not run: {error}")),
    }
}

/// The gate every lab test starts with: `true` to go on. Where namespaces
/// cannot be made it prints a SKIP line and returns `false`, unless
/// `MESHTUN_REQUIRE_NETNS=1`, in which case the test fails.
pub fn require_netns(test: &str) -> bool {
    match availability() {
        Ok(()) => true,
        Err(reason) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1") {
                // The lab is test tooling: failing the calling test is the point.
                #[allow(clippy::panic)]
                {
                    panic!("{test}: {REQUIRE_ENV}=1 but {reason}");
                }
            }
            println!("SKIP {test}: {reason}");
            false
        }
    }
}

/// The `meshtun` binary under test: `MESHTUN_BIN`, else the one cargo built
/// next to the running test executable (`target/<profile>/meshtun`).
pub fn meshtun_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESHTUN_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()
        .map_err(|error| LabError::Io("locating the test executable".into(), error))?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("meshtun");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(LabError::Io(
        format!(
            "no meshtun binary near {} (build it, or set MESHTUN_BIN)",
            exe.display()
        ),
        io::ErrorKind::NotFound.into(),
    ))
}

/// Runs a command to completion, turning failure into [`LabError::Command`].
fn run_command(command: &mut Command) -> Result<String> {
    let line = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| LabError::Io(format!("running {line}"), error))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: line,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn ip(args: &[&str]) -> Result<String> {
    run_command(Command::new("ip").args(args))
}

/// Kills every process inside namespace `ns`, then deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// The lab namespaces that exist now.
pub fn lab_namespaces() -> Vec<String> {
    let Ok(listing) = ip(&["netns", "list"]) else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(NAMESPACE_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Removes lab namespaces whose creating process is gone (a test run that
/// was killed). Namespaces of live processes, such as parallel tests, stay.
/// A lab made by `meshtun-lab up` (named without a process id) is left
/// alone: it lives until `meshtun-lab down`.
pub fn sweep_stale() {
    for ns in lab_namespaces() {
        let pid = ns
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_namespace(&ns);
            }
        }
    }
    // The files of labs whose process was killed before its Drop ran.
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(NAMESPACE_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Removes every namespace whose name starts with `prefix` (and the
/// processes inside). Used by `meshtun-lab down`.
pub fn remove_lab(prefix: &str) -> usize {
    let mut removed = 0;
    for ns in lab_namespaces()
        .into_iter()
        .filter(|ns| ns.starts_with(prefix))
    {
        remove_namespace(&ns);
        removed += 1;
    }
    removed
}

/// One test host: a namespace with `lo` and `eth0` on the lab switch.
#[derive(Debug, Clone)]
pub struct Host {
    /// The node name, also its certificate identity.
    pub name: String,
    /// The namespace's name.
    pub namespace: String,
    /// The address of `eth0`.
    pub addr: Ipv4Addr,
    /// The host's wire interface.
    pub interface: &'static str,
    /// The bridge port (in the switch namespace) this host is plugged into.
    pub switch_port: String,
}

impl Host {
    /// The host's QUIC address, as peers dial it.
    pub fn quic_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.addr, QUIC_PORT))
    }

    /// Runs `work` on a thread that has entered this host's network
    /// namespace. Sockets it creates belong to the host, and keep belonging
    /// to it when handed back to (and used from) any other thread.
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.namespace);
        let namespace =
            File::open(&path).map_err(|error| LabError::Io(format!("opening {path}"), error))?;
        std::thread::spawn(move || {
            nix::sched::setns(&namespace, CloneFlags::CLONE_NEWNET)
                .map_err(|errno| LabError::Io(format!("entering {path}"), errno.into()))?;
            Ok(work())
        })
        .join()
        .map_err(|_| LabError::Io("lab thread panicked".into(), io::ErrorKind::Other.into()))?
    }

    /// A TCP connection made from inside this host (for example to its own
    /// loopback forward).
    pub fn connect(&self, addr: SocketAddr) -> Result<io::Result<TcpStream>> {
        self.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }

    /// A TCP listener inside this host.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))?
            .map_err(|error| LabError::Io(format!("listening on {addr}"), error))
    }

    /// A UDP socket inside this host.
    pub fn udp(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.run(move || UdpSocket::bind(addr))?
            .map_err(|error| LabError::Io(format!("binding UDP {addr}"), error))
    }

    /// A command that will run inside this host (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    /// Takes the host's wire interface down or up (a cut cable).
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &self.namespace,
            "link",
            "set",
            self.interface,
            if up { "up" } else { "down" },
        ])
        .map(drop)
    }

    /// Limits the host's egress on its wire interface to `mbit` Mbit/s with
    /// a token bucket (`tc qdisc ... tbf`): netem's `rate` is not available
    /// on kernels built without netem, tbf is.
    pub fn shape_rate(&self, mbit: u32) -> Result<()> {
        let rate = format!("{mbit}mbit");
        // A burst of about 1 ms at the rate (at least 64 KiB so a GSO batch
        // fits), and a queue of 50 ms before packets are dropped.
        let burst = (u64::from(mbit) * 1_000_000 / 8 / 1000)
            .max(64 * 1024)
            .to_string();
        run_command(self.command("tc").args([
            "qdisc",
            "replace",
            "dev",
            self.interface,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            &burst,
            "latency",
            "50ms",
        ]))
        .map(drop)
    }

    /// Removes any shaping from the wire interface.
    pub fn clear_shaping(&self) -> Result<()> {
        run_command(
            self.command("tc")
                .args(["qdisc", "del", "dev", self.interface, "root"]),
        )
        .map(drop)
    }

    /// `tc -s qdisc show` of the wire interface: shaping counters (sent,
    /// dropped, overlimits) for tests to check a limit was in effect.
    pub fn shaping_stats(&self) -> Result<String> {
        run_command(
            self.command("tc")
                .args(["-s", "qdisc", "show", "dev", self.interface]),
        )
    }

    /// Loads an nftables ruleset (as `nft -f -` would) inside this host.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| LabError::Io("running nft".into(), error))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(ruleset.as_bytes())
                .map_err(|error| LabError::Io("writing to nft".into(), error))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|error| LabError::Io("waiting for nft".into(), error))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(LabError::Command {
                command: format!("nft -f - in {}:\n{ruleset}", self.namespace),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }
}

/// A running network of test hosts. Dropping it removes everything.
#[derive(Debug)]
pub struct Lab {
    /// Where certificates, configs, logs and captures go.
    pub dir: PathBuf,
    /// The switch namespace (holds the bridge `br0`).
    pub switch: String,
    hosts: Vec<Host>,
    binary: PathBuf,
    persistent: bool,
}

impl Lab {
    /// Builds a switched network with one host per name (node names, e.g.
    /// `["node-a", "node-b"]`), addresses `198.18.0.11`, `.12`, ..., and a
    /// cluster PKI with a certificate per host.
    pub fn new(names: &[&str]) -> Result<Lab> {
        let sequence = LAB_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NAMESPACE_PREFIX}{}-{sequence}", std::process::id());
        Self::with_id(id, names)
    }

    /// Like [`Lab::new`], with namespace names starting with `id`.
    pub fn with_id(id: String, names: &[&str]) -> Result<Lab> {
        availability().map_err(LabError::Unavailable)?;
        sweep_stale();
        let binary = meshtun_binary()?;
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)
            .map_err(|error| LabError::Io(format!("creating {}", dir.display()), error))?;
        let mut lab = Lab {
            dir,
            switch: format!("{id}-sw"),
            hosts: Vec::new(),
            binary,
            persistent: false,
        };
        // From here on, Drop cleans up whatever part was built.
        ip(&["netns", "add", &lab.switch])?;
        ip(&["-n", &lab.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.switch, "link", "set", "br0", "up"])?;
        for (index, name) in names.iter().enumerate() {
            let namespace = format!("{id}-h{index}");
            let port = format!("port{index}");
            let octet = u8::try_from(11 + index)
                .map_err(|_| LabError::Unavailable("too many hosts".into()))?;
            let addr = Ipv4Addr::new(198, 18, 0, octet);
            ip(&["netns", "add", &namespace])?;
            lab.hosts.push(Host {
                name: (*name).to_owned(),
                namespace: namespace.clone(),
                addr,
                interface: "eth0",
                switch_port: port.clone(),
            });
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lab.switch,
            ])?;
            ip(&["-n", &lab.switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &lab.switch, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
        }
        lab.make_pki()?;
        Ok(lab)
    }

    /// Host `index`, in the order given to [`Lab::new`].
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// Every host.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The meshtun binary the lab runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn make_pki(&self) -> Result<()> {
        let ca = self.dir.join("ca");
        run_command(
            Command::new(&self.binary)
                .args(["pki", "init-ca", "--cluster", "lab", "--out"])
                .arg(&ca),
        )?;
        for host in &self.hosts {
            run_command(
                Command::new(&self.binary)
                    .args(["pki", "issue", "--ca"])
                    .arg(&ca)
                    .args([
                        "--node",
                        &host.name,
                        "--ip",
                        &host.addr.to_string(),
                        "--out",
                    ])
                    .arg(self.dir.join("certs")),
            )?;
        }
        Ok(())
    }

    /// A config for host `index` with its QUIC endpoint and certificates
    /// filled in; add peers, forwards and exposes before starting it.
    pub fn config(&self, index: usize) -> NodeConfig {
        let host = &self.hosts[index];
        NodeConfig {
            node: host.name.clone(),
            quic_listen: host.quic_addr(),
            ca: self.dir.join("ca").join("ca.crt"),
            cert: self.dir.join("certs").join(format!("{}.crt", host.name)),
            key: self.dir.join("certs").join(format!("{}.key", host.name)),
            peers: Vec::new(),
            forwards: Vec::new(),
            exposes: Vec::new(),
            extra_quic: String::new(),
            extra: String::new(),
            overlay: None,
            peer_overlays: Vec::new(),
        }
    }

    /// Starts `meshtun run` inside host `index` with `config`, and waits
    /// (at most 10 s) until it logs that it started.
    pub fn start(&self, index: usize, config: &NodeConfig) -> Result<Daemon> {
        self.start_toml(index, &config.to_toml())
    }

    /// Like [`Lab::start`], with the config as TOML text (a config from
    /// `examples/`, say, with its certificate paths pointed at the lab's).
    pub fn start_toml(&self, index: usize, config: &str) -> Result<Daemon> {
        self.start_toml_as(index, config, &self.hosts[index].name)
    }

    /// Like [`Lab::start`], with the config and log files named after
    /// `stem` instead of the host: for a second daemon on the same host.
    pub fn start_as(&self, index: usize, config: &NodeConfig, stem: &str) -> Result<Daemon> {
        self.start_toml_as(index, &config.to_toml(), stem)
    }

    fn start_toml_as(&self, index: usize, config: &str, stem: &str) -> Result<Daemon> {
        let host = &self.hosts[index];
        let config_path = self.dir.join(format!("{stem}.toml"));
        fs::write(&config_path, config)
            .map_err(|error| LabError::Io(format!("writing {}", config_path.display()), error))?;
        let log = self.dir.join(format!("{stem}.log"));
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|error| LabError::Io(format!("opening {}", log.display()), error))?;
        let start_offset = log_file.metadata().map(|meta| meta.len()).unwrap_or(0);
        let child = host
            .command(&self.binary)
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .env(
                "MESHTUN_LOG",
                std::env::var("MESHTUN_LAB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|error| {
                LabError::Io(format!("starting meshtun in {}", host.namespace), error)
            })?;
        let mut daemon = Daemon {
            host: host.name.clone(),
            child: Some(child),
            log,
            log_offset: start_offset,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if daemon.log_since_start().contains("node started") {
                return Ok(daemon);
            }
            if let Some(status) = daemon.try_exit_status() {
                return Err(LabError::DaemonStart {
                    host: host.name.clone(),
                    reason: format!("exited with {status}"),
                    log: daemon.log_since_start(),
                });
            }
            if Instant::now() > deadline {
                return Err(LabError::DaemonStart {
                    host: host.name.clone(),
                    reason: "no \"node started\" within 10 s".into(),
                    log: daemon.log_since_start(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Lab {
    /// Sets the MTU of every link of the lab's network: each host's wire
    /// interface, its port on the switch, and the bridge (e.g. 1500 or 9000).
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        for host in &self.hosts {
            ip(&[
                "-n",
                &self.switch,
                "link",
                "set",
                &host.switch_port,
                "mtu",
                &mtu,
            ])?;
            ip(&[
                "-n",
                &host.namespace,
                "link",
                "set",
                host.interface,
                "mtu",
                &mtu,
            ])?;
        }
        ip(&["-n", &self.switch, "link", "set", "br0", "mtu", &mtu]).map(drop)
    }

    /// Keeps the namespaces and files after this value is gone (for
    /// `meshtun-lab up`); remove them with [`remove_lab`].
    pub fn persist(mut self) {
        self.persistent = true;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        for host in &self.hosts {
            remove_namespace(&host.namespace);
        }
        remove_namespace(&self.switch);
        if std::env::var_os("MESHTUN_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `meshtun run` process inside a host. Dropping it kills it.
#[derive(Debug)]
pub struct Daemon {
    host: String,
    child: Option<Child>,
    log: PathBuf,
    log_offset: u64,
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and reaps the process (a crash, as `kill -9`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (an orderly stop).
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit_status().is_none()
    }

    /// What this run of the daemon has logged so far.
    pub fn log_since_start(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            use std::io::Seek as _;
            if file.seek(io::SeekFrom::Start(self.log_offset)).is_ok() {
                let _ = file.read_to_string(&mut text);
            }
        }
        text
    }

    /// The host this daemon runs on.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node's config, rendered to TOML by [`NodeConfig::to_toml`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `node`.
    pub node: String,
    /// `quic.listen`.
    pub quic_listen: SocketAddr,
    /// `tls.ca`.
    pub ca: PathBuf,
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// `[[peer]]`: name and address.
    pub peers: Vec<(String, SocketAddr)>,
    /// `[[forward]]`: listen, peer, service.
    pub forwards: Vec<(SocketAddr, String, String)>,
    /// `[[expose]]`: service, target, allowed names (`*` for all).
    pub exposes: Vec<(String, SocketAddr, Vec<String>)>,
    /// Extra lines inside `[quic]` (e.g. `idle_timeout = "10s"`).
    pub extra_quic: String,
    /// Extra top-level tables appended at the end (e.g. `[limits]`).
    pub extra: String,
    /// `[overlay]` (overlay mode), if any.
    pub overlay: Option<OverlaySection>,
    /// The `overlay` address of `[[peer]]`s, by peer name.
    pub peer_overlays: Vec<(String, Ipv4Addr)>,
}

/// A node's `[overlay]` section (overlay mode), as [`NodeConfig`] renders it.
#[derive(Debug, Clone)]
pub struct OverlaySection {
    /// `overlay.address`: this node's overlay address.
    pub address: Ipv4Addr,
    /// `overlay.prefix`, e.g. `"100.127.0.0/16"`.
    pub prefix: String,
    /// `overlay.manage`; `None` leaves the key out (the default).
    pub manage: Option<bool>,
    /// `overlay.allow`: (peer names or `*`, port range such as
    /// `"1024-65535"`). Empty renders `allow = []` (nobody may reach).
    pub allow: Vec<(Vec<String>, String)>,
    /// Extra lines inside `[overlay]` (e.g. `listen = "127.0.0.1:15002"`).
    pub extra: String,
}

impl NodeConfig {
    /// Adds a `[[peer]]` for `host`.
    pub fn peer(mut self, host: &Host) -> Self {
        self.peers.push((host.name.clone(), host.quic_addr()));
        self
    }

    /// Adds a `[[peer]]` named `name` at an arbitrary address (for example a
    /// relay in front of the real host).
    pub fn peer_at(mut self, name: &str, addr: SocketAddr) -> Self {
        self.peers.push((name.to_owned(), addr));
        self
    }

    /// Adds a `[[forward]]`.
    pub fn forward(mut self, listen: SocketAddr, peer: &str, service: &str) -> Self {
        self.forwards
            .push((listen, peer.to_owned(), service.to_owned()));
        self
    }

    /// Adds an `[[expose]]`.
    pub fn expose(mut self, service: &str, target: SocketAddr, allow: &[&str]) -> Self {
        self.exposes.push((
            service.to_owned(),
            target,
            allow.iter().map(|name| (*name).to_owned()).collect(),
        ));
        self
    }

    /// Turns on overlay mode: `[overlay]` with this node's overlay
    /// `address` and the `prefix` every node's address is in. Add
    /// `overlay_allow` rules (default deny) and `overlay_manage` as needed.
    pub fn overlay(mut self, address: Ipv4Addr, prefix: &str) -> Self {
        self.overlay = Some(OverlaySection {
            address,
            prefix: prefix.to_owned(),
            manage: None,
            allow: Vec::new(),
            extra: String::new(),
        });
        self
    }

    /// Sets `overlay.manage` (the daemon sets up and removes the interface
    /// and nftables table itself). Needs [`NodeConfig::overlay`] first.
    pub fn overlay_manage(mut self, manage: bool) -> Self {
        self.overlay_section().manage = Some(manage);
        self
    }

    /// Adds an `overlay.allow` rule: `peers` (names or `*`) may reach
    /// `ports` (`"N"` or `"N-M"`) of this node's overlay address.
    pub fn overlay_allow(mut self, peers: &[&str], ports: &str) -> Self {
        self.overlay_section().allow.push((
            peers.iter().map(|peer| (*peer).to_owned()).collect(),
            ports.to_owned(),
        ));
        self
    }

    /// Adds lines to `[overlay]`.
    pub fn overlay_lines(mut self, lines: &str) -> Self {
        let section = self.overlay_section();
        section.extra.push_str(lines);
        section.extra.push('\n');
        self
    }

    // A builder misuse in a test is a failed test, said plainly.
    #[allow(clippy::expect_used)]
    fn overlay_section(&mut self) -> &mut OverlaySection {
        self.overlay
            .as_mut()
            .expect("NodeConfig::overlay(...) must come before the other overlay settings")
    }

    /// Adds a `[[peer]]` for `host` with overlay address `overlay`.
    pub fn overlay_peer(mut self, host: &Host, overlay: Ipv4Addr) -> Self {
        self.peers.push((host.name.clone(), host.quic_addr()));
        self.peer_overlays.push((host.name.clone(), overlay));
        self
    }

    /// Adds lines to `[quic]`.
    pub fn quic(mut self, lines: &str) -> Self {
        self.extra_quic.push_str(lines);
        self.extra_quic.push('\n');
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "node = {:?}\n\n[quic]\nlisten = \"{}\"",
            self.node, self.quic_listen
        );
        text.push_str(&self.extra_quic);
        let _ = writeln!(
            text,
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
            self.ca.display().to_string(),
            self.cert.display().to_string(),
            self.key.display().to_string()
        );
        if let Some(overlay) = &self.overlay {
            let _ = writeln!(
                text,
                "\n[overlay]\naddress = \"{}\"\nprefix = {:?}",
                overlay.address, overlay.prefix
            );
            if let Some(manage) = overlay.manage {
                let _ = writeln!(text, "manage = {manage}");
            }
            let rules = overlay
                .allow
                .iter()
                .map(|(peers, ports)| {
                    let peers = peers
                        .iter()
                        .map(|peer| format!("{peer:?}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("{{ peers = [{peers}], ports = {ports:?} }}")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(text, "allow = [{rules}]");
            text.push_str(&overlay.extra);
        }
        for (name, addr) in &self.peers {
            let _ = writeln!(text, "\n[[peer]]\nname = {name:?}\naddr = \"{addr}\"");
            if let Some((_, overlay)) = self.peer_overlays.iter().find(|(peer, _)| peer == name) {
                let _ = writeln!(text, "overlay = \"{overlay}\"");
            }
        }
        for (listen, peer, service) in &self.forwards {
            let _ = writeln!(
                text,
                "\n[[forward]]\nlisten = \"{listen}\"\npeer = {peer:?}\nservice = {service:?}"
            );
        }
        for (service, target, allow) in &self.exposes {
            let allow = allow
                .iter()
                .map(|name| format!("{name:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                text,
                "\n[[expose]]\nservice = {service:?}\ntarget = \"{target}\"\nallow = [{allow}]"
            );
        }
        text.push_str(&self.extra);
        text
    }
}
