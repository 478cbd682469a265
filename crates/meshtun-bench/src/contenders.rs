//! The contenders: how each is installed, configured and started with the
//! same topology (a forwarder on each host, the client on host A's loopback,
//! the services on host B's loopback), and stopped again.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::measure;
use meshtun_lab::{Daemon, Host, Lab};

/// The iperf3 server's port on host B (it listens on every address there).
pub(crate) const IPERF_PORT: u16 = 5201;
/// The echo service's port on host B (every address).
pub(crate) const ECHO_PORT: u16 = 7000;
/// The sshd port on host B.
const SSH_PORT: u16 = 2222;

/// One kind of contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Plain TCP from A to B's address: no forwarder, the limit.
    Direct,
    /// One `meshtun run` per host, with the default shards (one per CPU).
    Meshtun,
    /// One `meshtun run` per host, with `limits.shards = 1`.
    MeshtunOneShard,
    /// stunnel4 with mutual TLS 1.3.
    Stunnel,
    /// `ssh -L` to a standalone sshd.
    Ssh,
    /// spiped, encrypting on A and decrypting on B.
    Spiped,
    /// socat on each host, a plain two-hop relay.
    Socat,
}

impl Kind {
    /// Every contender, in table order.
    pub const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::Meshtun,
        Kind::MeshtunOneShard,
        Kind::Stunnel,
        Kind::Ssh,
        Kind::Spiped,
        Kind::Socat,
    ];

    /// The name used on the command line, in tables and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Meshtun => "meshtun",
            Kind::MeshtunOneShard => "meshtun-1shard",
            Kind::Stunnel => "stunnel",
            Kind::Ssh => "ssh",
            Kind::Spiped => "spiped",
            Kind::Socat => "socat",
        }
    }

    /// Parses a name from [`Kind::name`].
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The Debian packages it needs, and a program that shows they are
    /// installed.
    pub(crate) fn packages(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Kind::Direct | Kind::Meshtun | Kind::MeshtunOneShard => (&[], &[]),
            Kind::Stunnel => (&["stunnel4"], &["stunnel4"]),
            Kind::Ssh => (
                &["openssh-server", "openssh-client"],
                &["/usr/sbin/sshd", "ssh", "ssh-keygen"],
            ),
            Kind::Spiped => (&["spiped"], &["spiped"]),
            Kind::Socat => (&["socat"], &["socat"]),
        }
    }

    /// The Debian package whose version the report names.
    pub(crate) fn version_package(self) -> Option<&'static str> {
        match self {
            Kind::Direct | Kind::Meshtun | Kind::MeshtunOneShard => None,
            Kind::Stunnel => Some("stunnel4"),
            Kind::Ssh => Some("openssh-server"),
            Kind::Spiped => Some("spiped"),
            Kind::Socat => Some("socat"),
        }
    }

    fn index(self) -> u16 {
        Kind::ALL
            .iter()
            .position(|kind| *kind == self)
            .and_then(|index| u16::try_from(index).ok())
            .unwrap_or(0)
    }
}

/// Whether `program` (a name on PATH or an absolute path) exists.
pub(crate) fn have_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A process of a contender, inside a host. Dropping it kills it and every
/// process it forked.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Proc, String> {
        let log = dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).map_err(|error| format!("{}: {error}", log.display()))?;
        let stderr = file
            .try_clone()
            .map_err(|error| format!("{}: {error}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|error| format!("starting {name}: {error}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(why)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        Some(format!(
            "{} exited ({status}): {}",
            self.name,
            log.trim().chars().take(600).collect::<String>()
        ))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Forked children first (socat, sshd), then the process itself.
            for pid in measure::process_tree(&[child.id()]) {
                if pid != child.id() {
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A contender that is up: where host A's client connects, and the processes
/// (on both hosts) whose memory counts.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) kind: Kind,
    /// The iperf3 server, as host A reaches it through this contender.
    pub(crate) iperf: SocketAddr,
    /// The echo service, as host A reaches it through this contender.
    pub(crate) echo: SocketAddr,
    procs: Vec<Proc>,
    daemons: Vec<Daemon>,
}

impl Running {
    /// The forwarders' process ids (their children are found at reading time).
    pub(crate) fn roots(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter_map(Proc::pid)
            .chain(self.daemons.iter().filter_map(Daemon::pid))
            .collect()
    }

    /// `Some(why)` if a forwarder has died.
    pub(crate) fn died(&mut self) -> Option<String> {
        for proc in &mut self.procs {
            if let Some(why) = proc.exited() {
                return Some(why);
            }
        }
        for daemon in &mut self.daemons {
            if !daemon.is_running() {
                let log = daemon.log_since_start();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some(format!("meshtun on {} exited: {tail}", daemon.host()));
            }
        }
        None
    }

    /// What the meshtun daemons logged at WARN or ERROR (empty for others).
    pub(crate) fn warnings(&self) -> Vec<String> {
        self.daemons
            .iter()
            .flat_map(|daemon| {
                daemon
                    .log_since_start()
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .map(|line| format!("{}: {line}", daemon.host()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Ports on host A's loopback (client side) and on host B's address (the
/// wire side of two-hop relays), distinct per contender.
fn ports(kind: Kind) -> (u16, u16, u16, u16) {
    let base = 10_000 + 100 * kind.index();
    let wire = 20_000 + 100 * kind.index();
    (base + 1, base + 2, wire + 1, wire + 2)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Starts `kind` in `lab` (host 0 is A, host 1 is B) and waits until a byte
/// goes through it to the echo service and back.
pub(crate) fn start(lab: &Lab, kind: Kind, dir: &Path) -> Result<Running, String> {
    let (a, b) = (lab.host(0), lab.host(1));
    let (a_iperf, a_echo, b_iperf, b_echo) = ports(kind);
    let mut running = Running {
        kind,
        iperf: loopback(a_iperf),
        echo: loopback(a_echo),
        procs: Vec::new(),
        daemons: Vec::new(),
    };
    let services = [(a_iperf, b_iperf, IPERF_PORT), (a_echo, b_echo, ECHO_PORT)];
    match kind {
        Kind::Direct => {
            running.iperf = SocketAddr::from((b.addr, IPERF_PORT));
            running.echo = SocketAddr::from((b.addr, ECHO_PORT));
        }
        Kind::Meshtun | Kind::MeshtunOneShard => start_meshtun(&mut running, lab, kind)?,
        Kind::Socat => start_socat(&mut running, a, b, dir, &services)?,
        Kind::Spiped => start_spiped(&mut running, a, b, dir, &services)?,
        Kind::Stunnel => start_stunnel(&mut running, lab, dir, &services)?,
        Kind::Ssh => start_ssh(&mut running, a, b, dir, &services)?,
    }
    wait_ready(a, &mut running)?;
    Ok(running)
}

/// One `meshtun run` per host; the one-shard variant on the next UDP port
/// with files of its own, so both run side by side.
fn start_meshtun(running: &mut Running, lab: &Lab, kind: Kind) -> Result<(), String> {
    let (a, b) = (lab.host(0), lab.host(1));
    // Where A's forwards listen, as `start` chose them.
    let (iperf, echo) = (running.iperf, running.echo);
    let (limits, port_offset, stem) = if kind == Kind::MeshtunOneShard {
        ("\n[limits]\nshards = 1\n", 1, "-1shard")
    } else {
        ("", 0, "")
    };
    let quic =
        |host: &Host| SocketAddr::new(host.quic_addr().ip(), host.quic_addr().port() + port_offset);
    let mut b_config = lab
        .config(1)
        .expose("iperf", loopback(IPERF_PORT), &[&a.name])
        .expose("echo", loopback(ECHO_PORT), &[&a.name]);
    b_config.extra.push_str(limits);
    b_config.quic_listen = quic(b);
    running.daemons.push(
        lab.start_as(1, &b_config, &format!("{}{stem}", b.name))
            .map_err(|error| error.to_string())?,
    );
    let mut a_config = lab
        .config(0)
        .peer_at(&b.name, quic(b))
        .forward(iperf, &b.name, "iperf")
        .forward(echo, &b.name, "echo");
    a_config.extra.push_str(limits);
    a_config.quic_listen = quic(a);
    running.daemons.push(
        lab.start_as(0, &a_config, &format!("{}{stem}", a.name))
            .map_err(|error| error.to_string())?,
    );
    Ok(())
}

/// socat on each host, a plain two-hop relay.
fn start_socat(
    running: &mut Running,
    a: &Host,
    b: &Host,
    dir: &Path,
    services: &[(u16, u16, u16)],
) -> Result<(), String> {
    for &(a_port, b_port, target) in services {
        let mut command = b.command("socat");
        command.arg(format!(
            "TCP4-LISTEN:{b_port},bind={},reuseaddr,fork,backlog=4096,nodelay",
            b.addr
        ));
        command.arg(format!("TCP4:127.0.0.1:{target},nodelay"));
        running
            .procs
            .push(Proc::spawn(&format!("socat-b-{b_port}"), command, dir)?);
        let mut command = a.command("socat");
        command.arg(format!(
            "TCP4-LISTEN:{a_port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay"
        ));
        command.arg(format!("TCP4:{}:{b_port},nodelay", b.addr));
        running
            .procs
            .push(Proc::spawn(&format!("socat-a-{a_port}"), command, dir)?);
    }
    Ok(())
}

/// spiped, encrypting on A and decrypting on B, with a fresh key.
fn start_spiped(
    running: &mut Running,
    a: &Host,
    b: &Host,
    dir: &Path,
    services: &[(u16, u16, u16)],
) -> Result<(), String> {
    let key = dir.join("spiped.key");
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut bytes))
        .and_then(|()| fs::write(&key, bytes))
        .map_err(|error| format!("making the spiped key: {error}"))?;
    for &(a_port, b_port, target) in services {
        let mut command = b.command("spiped");
        command
            .args(["-d", "-F", "-R", "-n", "0"])
            .args(["-s", &format!("[{}]:{b_port}", b.addr)])
            .args(["-t", &format!("[127.0.0.1]:{target}")])
            .arg("-k")
            .arg(&key);
        running
            .procs
            .push(Proc::spawn(&format!("spiped-b-{b_port}"), command, dir)?);
        let mut command = a.command("spiped");
        command
            .args(["-e", "-F", "-R", "-n", "0"])
            .args(["-s", &format!("[127.0.0.1]:{a_port}")])
            .args(["-t", &format!("[{}]:{b_port}", b.addr)])
            .arg("-k")
            .arg(&key);
        running
            .procs
            .push(Proc::spawn(&format!("spiped-a-{a_port}"), command, dir)?);
    }
    Ok(())
}

/// stunnel4 on each host with mutual TLS 1.3, using the lab's own PKI (made
/// with `meshtun pki`): a CA and one certificate per node, each used as
/// client and as server.
fn start_stunnel(
    running: &mut Running,
    lab: &Lab,
    dir: &Path,
    services: &[(u16, u16, u16)],
) -> Result<(), String> {
    let (a, b) = (lab.host(0), lab.host(1));
    let ca = lab.dir.join("ca").join("ca.crt");
    let cert = |host: &Host| lab.dir.join("certs").join(format!("{}.crt", host.name));
    let key = |host: &Host| lab.dir.join("certs").join(format!("{}.key", host.name));
    let common = |text: &mut String, host: &Host, log: &str| {
        let _ = writeln!(
            text,
            "foreground = yes\npid =\nsyslog = no\ndebug = 3\noutput = {}",
            dir.join(log).display()
        );
        let _ = writeln!(
            text,
            "cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1",
            cert(host).display(),
            key(host).display(),
            ca.display()
        );
    };
    let mut b_conf = String::new();
    common(&mut b_conf, b, "stunnel-b.out");
    let mut a_conf = String::new();
    common(&mut a_conf, a, "stunnel-a.out");
    for (name, (a_port, b_port, target)) in
        ["iperf", "echo"].into_iter().zip(services.iter().copied())
    {
        let _ = writeln!(
            b_conf,
            "[{name}]\naccept = {}:{b_port}\nconnect = 127.0.0.1:{target}\nrequireCert = yes",
            b.addr
        );
        let _ = writeln!(
            a_conf,
            "[{name}]\nclient = yes\naccept = 127.0.0.1:{a_port}\nconnect = {}:{b_port}\ncheckIP = {}",
            b.addr, b.addr
        );
    }
    let (b_path, a_path) = (dir.join("stunnel-b.conf"), dir.join("stunnel-a.conf"));
    fs::write(&b_path, b_conf).map_err(|error| format!("stunnel config: {error}"))?;
    fs::write(&a_path, a_conf).map_err(|error| format!("stunnel config: {error}"))?;
    let mut command = b.command("stunnel4");
    command.arg(&b_path);
    running.procs.push(Proc::spawn("stunnel-b", command, dir)?);
    let mut command = a.command("stunnel4");
    command.arg(&a_path);
    running.procs.push(Proc::spawn("stunnel-a", command, dir)?);
    Ok(())
}

fn ssh_keygen(path: &Path) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "meshtun-bench", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("ssh-keygen: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ssh-keygen: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// sshd's privilege-separation directory, made by the bench if it was
/// missing (and removed again by [`remove_privsep_dir`]).
pub(crate) const PRIVSEP_DIR: &str = "/run/sshd";

/// Removes [`PRIVSEP_DIR`] if the bench made it.
pub(crate) fn remove_privsep_dir(made: bool) {
    if made {
        let _ = fs::remove_dir(PRIVSEP_DIR);
    }
}

fn start_ssh(
    running: &mut Running,
    a: &Host,
    b: &Host,
    dir: &Path,
    services: &[(u16, u16, u16); 2],
) -> Result<(), String> {
    let host_key = dir.join("ssh_host_ed25519_key");
    let client_key = dir.join("id_ed25519");
    ssh_keygen(&host_key)?;
    ssh_keygen(&client_key)?;
    let read = |path: PathBuf| {
        fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))
    };
    let authorized = dir.join("authorized_keys");
    fs::write(&authorized, read(client_key.with_extension("pub"))?)
        .map_err(|error| format!("authorized_keys: {error}"))?;
    let host_pub = read(host_key.with_extension("pub"))?;
    let known_hosts = dir.join("known_hosts");
    fs::write(
        &known_hosts,
        format!("[{}]:{SSH_PORT} {}", b.addr, host_pub.trim()),
    )
    .map_err(|error| format!("known_hosts: {error}"))?;
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "ListenAddress {}:{SSH_PORT}\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\nUseDNS no\n\
             AllowTcpForwarding local\nPermitOpen any\nX11Forwarding no\nLogLevel ERROR\n",
            b.addr,
            host_key.display(),
            authorized.display()
        ),
    )
    .map_err(|error| format!("sshd_config: {error}"))?;
    let mut command = b.command("/usr/sbin/sshd");
    command.args(["-D", "-e", "-f"]).arg(&config);
    running.procs.push(Proc::spawn("sshd-b", command, dir)?);
    // Wait for sshd to listen before the client dials.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ssh_addr = SocketAddr::from((b.addr, SSH_PORT));
    while a
        .connect(ssh_addr)
        .map_err(|error| error.to_string())?
        .is_err()
    {
        if let Some(why) = running.died() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err("sshd did not listen within 10 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut command = a.command("ssh");
    command
        .args(["-F", "/dev/null", "-N", "-T", "-i"])
        .arg(&client_key)
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"]);
    for (a_port, _, target) in services {
        command
            .arg("-L")
            .arg(format!("127.0.0.1:{a_port}:127.0.0.1:{target}"));
    }
    command
        .args(["-p", &SSH_PORT.to_string()])
        .arg(format!("root@{}", b.addr));
    running.procs.push(Proc::spawn("ssh-a", command, dir)?);
    Ok(())
}

/// Waits (at most 20 s) until a byte goes from A through the contender to
/// the echo service and back.
fn wait_ready(a: &Host, running: &mut Running) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = measure::round_trip(a, running.echo);
        if attempt.is_ok() {
            return Ok(());
        }
        if let Some(why) = running.died() {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} not ready within 20 s: {}",
                running.kind.name(),
                attempt.err().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
