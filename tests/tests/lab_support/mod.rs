//! Shared helpers for the lab tests (lab_wire, lab_clients, lab_overlay,
//! lab_bench):
//! tool probes and child processes inside hosts, waiting on daemons and
//! listeners, an echo service and reset probes, and the wire analysis
//! (marked plaintext, and what a capture shows).
// Each test binary includes this module and uses only a subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use meshtun_lab::pcap::{self, Packet};
use meshtun_lab::{Daemon, Host, Lab, QUIC_PORT, REQUIRE_ENV};

// ---------------------------------------------------------------------------
// Recipes from examples/.

/// A recipe from `examples/`, as an operator would install it: the text of
/// `path`, with only the certificate paths under /etc/meshtun/ pointed at
/// the lab's PKI.
pub(crate) fn recipe_config(lab: &Lab, index: usize, path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    let lab_config = lab.config(index);
    let name = &lab.host(index).name;
    let text = text
        .replace("/etc/meshtun/ca.crt", &lab_config.ca.display().to_string())
        .replace(
            &format!("/etc/meshtun/{name}.crt"),
            &lab_config.cert.display().to_string(),
        )
        .replace(
            &format!("/etc/meshtun/{name}.key"),
            &lab_config.key.display().to_string(),
        );
    assert!(
        !text.contains("/etc/meshtun/"),
        "{path}: a path the lab cannot provide is left:\n{text}"
    );
    text
}

/// Starts the recipe's node `index` (config file `path` under `examples/`)
/// the way its README says: `meshtun overlay up -c FILE` first when the
/// config has `[overlay]` (what the systemd drop-in runs as root before
/// the daemon), then `meshtun run`.
pub(crate) fn start_recipe_node(lab: &Lab, index: usize, path: &str) -> Daemon {
    let text = recipe_config(lab, index, path);
    if text.contains("\n[overlay]") {
        let file = lab
            .dir
            .join(format!("{}-recipe.toml", lab.host(index).name));
        std::fs::write(&file, &text).unwrap();
        let output = lab
            .host(index)
            .command(lab.binary())
            .args(["overlay", "up", "-c"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{path}: meshtun overlay up failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    lab.start_toml(index, &text)
        .unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The route around the tunnel, tried from `outsider` (a lab host that
/// runs no meshtun): a host route for `target`'s overlay address via
/// `head`'s underlay address, then a TCP connect to `target`, where a
/// service listens. Asserts that nothing answers and that `head`'s guard
/// counted the drops; returns the count.
pub(crate) fn assert_bypass_dropped(head: &Host, outsider: &Host, target: SocketAddr) -> u64 {
    let route = format!("{}/32", target.ip());
    let status = outsider
        .command("ip")
        .args(["route", "replace", &route, "via", &head.addr.to_string()])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "ip route replace {route} in {}",
        outsider.name
    );
    let attempt = outsider
        .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)))
        .unwrap();
    assert!(
        attempt.is_err(),
        "{} connected to {target} around the tunnel (routed via {})",
        outsider.name,
        head.addr
    );
    let output = head
        .command("nft")
        .args([
            "list",
            "counter",
            "inet",
            "meshtun_overlay",
            "bypass_dropped",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    let packets = listed
        .split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|count| count.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no guard counter on {}: {listed}", head.name));
    assert!(
        packets >= 1,
        "{}: the guard counted nothing: {listed}",
        head.name
    );
    packets
}

// ---------------------------------------------------------------------------
// Tools and processes inside hosts.

/// Whether `command` (a probe for a tool the test needs) succeeds; if not,
/// prints a SKIP line, or fails the test when `MESHTUN_REQUIRE_NETNS=1`.
pub(crate) fn require_tool(test: &str, what: &str, command: &mut Command) -> bool {
    let ok = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !ok {
        if std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1") {
            panic!("{test}: {REQUIRE_ENV}=1 but {what} is missing");
        }
        println!("SKIP {test}: {what} is missing");
    }
    ok
}

/// The gate of a lab test that runs pyzmq: namespaces and python3 with
/// zmq, or a SKIP line (a failure under `MESHTUN_REQUIRE_NETNS=1`).
pub(crate) fn require_netns_and_pyzmq(test: &str) -> bool {
    meshtun_lab::require_netns(test)
        && require_tool(
            test,
            "python3 with pyzmq",
            Command::new("python3").args(["-c", "import zmq"]),
        )
}

/// A process inside a host that is killed when dropped, with its output
/// collected on threads so that a full pipe never blocks it.
pub(crate) struct Process {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    })
}

impl Process {
    pub(crate) fn spawn(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Process {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits at most `timeout` for the exit; kills the process if it runs
    /// longer. Returns its status (`None` if it was killed) and output.
    pub(crate) fn finish(mut self, timeout: Duration) -> (Option<ExitStatus>, String, String) {
        let deadline = Instant::now() + timeout;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(exit)) = self.child.try_wait() {
                status = Some(exit);
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let stdout = self.stdout.take().map(|thread| thread.join().unwrap());
        let stderr = self.stderr.take().map(|thread| thread.join().unwrap());
        (
            status,
            stdout.unwrap_or_default(),
            stderr.unwrap_or_default(),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Waiting.

/// Waits (at most 10 s) until something listens on TCP `port` in `host`.
pub(crate) fn wait_listening(host: &Host, port: u16) -> bool {
    let filter = format!("sport = :{port}");
    wait_until(Duration::from_secs(10), || {
        host.command("ss")
            .args(["-Hltn", &filter])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|output| !output.stdout.is_empty())
    })
}

/// How many shards `log`'s "node started" line names, once it is there.
pub(crate) fn shards_in_log(log: &str) -> Option<usize> {
    log.lines()
        .find(|line| line.contains("node started"))
        .and_then(|line| {
            line.split(" shards=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
}

/// Waits (at most `timeout`) until `daemon` logged an outgoing connection
/// to each of `peers` from each of its shards.
pub(crate) fn wait_connected(daemon: &Daemon, peers: &[&str], timeout: Duration) {
    let connected = |log: &str, peer: &str| {
        let Some(shards) = shards_in_log(log) else {
            return false;
        };
        let span = format!("peer{{peer={peer} shard=");
        let up: std::collections::BTreeSet<&str> = log
            .lines()
            .filter(|line| line.contains(&span) && line.contains("peer connected remote="))
            .filter_map(|line| line.split(&span).nth(1)?.split('}').next())
            .collect();
        up.len() >= shards
    };
    let done = wait_until(timeout, || {
        let log = daemon.log_since_start();
        peers.iter().all(|peer| connected(&log, peer))
    });
    assert!(
        done,
        "{} did not connect to {peers:?}:\n{}",
        daemon.host(),
        daemon.log_since_start()
    );
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts one connection within `timeout`: the stream (blocking again)
/// and the peer's address.
pub(crate) fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
) -> io::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((tcp, peer)) => {
                tcp.set_nonblocking(false)?;
                return Ok((tcp, peer));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection to accept",
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(error),
        }
    }
}

// ---------------------------------------------------------------------------
// Services and clients.

/// What happens to a client of `target` on `host`: "reset ..." when the
/// connection was reset, anything else otherwise.
pub(crate) fn reset_outcome(host: &Host, target: SocketAddr) -> String {
    let is_reset = |error: &io::Error| {
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    };
    let mut tcp = match host.connect(target).unwrap() {
        Ok(tcp) => tcp,
        Err(error) if is_reset(&error) => return format!("reset at connect: {error}"),
        Err(error) => return format!("connect failed otherwise: {error}"),
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if let Err(error) = tcp.write_all(b"hello") {
        return if is_reset(&error) {
            format!("reset at write: {error}")
        } else {
            format!("write failed otherwise: {error}")
        };
    }
    let mut reply = [0u8; 5];
    match tcp.read(&mut reply) {
        Ok(0) => "clean EOF (a refusal must be a reset)".to_owned(),
        Ok(read) => format!("received {read} bytes: {:?}", &reply[..read]),
        Err(error) if is_reset(&error) => format!("reset at read: {error}"),
        Err(error) => format!("read failed otherwise: {error}"),
    }
}

/// An echo service that counts the connections it accepts.
pub(crate) struct Echo {
    /// The port it listens on.
    pub(crate) port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

impl Echo {
    pub(crate) fn start(listener: TcpListener) -> Echo {
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::spawn(move || {
                listener.set_nonblocking(true).unwrap();
                let deadline = Instant::now() + Duration::from_secs(240);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            thread::spawn(move || {
                                let _ = echo_once(tcp);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Echo {
            port,
            stop,
            accepted,
            thread,
        }
    }

    /// Stops the service; returns how many connections it accepted.
    pub(crate) fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.accepted.load(Ordering::Relaxed)
    }
}

fn echo_once(mut tcp: TcpStream) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut buffer = [0u8; 1024];
    loop {
        let read = tcp.read(&mut buffer)?;
        if read == 0 {
            return Ok(());
        }
        tcp.write_all(&buffer[..read])?;
    }
}

// ---------------------------------------------------------------------------
// The wire.

/// `len` bytes of xorshift noise with `marker` written at pseudo-random
/// gaps of 1000 to 3047 bytes, so its copies sit at every offset relative to
/// write and packet boundaries and some straddle them. Returns the data and
/// the number of copies.
pub(crate) fn marked_stream(marker: &[u8], seed: u64, len: usize) -> (Vec<u8>, usize) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&next().to_le_bytes());
    }
    data.truncate(len);
    let mut at = (next() % 1000) as usize;
    let mut copies = 0;
    while at + marker.len() <= len {
        data[at..at + marker.len()].copy_from_slice(marker);
        copies += 1;
        at += marker.len() + 1000 + (next() % 2048) as usize;
    }
    (data, copies)
}

/// How many times `marker` occurs in `haystack`. Every copy covers
/// exactly one byte whose index is `marker.len() - 1` modulo `marker.len()`,
/// so only those bytes are looked at: fast enough for hundreds of MiB in a
/// debug build.
pub(crate) fn count_marker(marker: &[u8], haystack: &[u8]) -> usize {
    let width = marker.len();
    let mut count = 0;
    let mut at = width - 1;
    while at < haystack.len() {
        let byte = haystack[at];
        for (offset, _) in marker.iter().enumerate().filter(|(_, &m)| m == byte) {
            let start = at - offset;
            if haystack.get(start..start + width) == Some(marker) {
                count += 1;
            }
        }
        at += width;
    }
    count
}

/// Which IPv4 packets other than QUIC between the lab hosts [`Wire::of`]
/// sets apart instead of listing them in [`Wire::not_quic`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noise {
    /// None: every such packet is `not_quic`.
    Listed,
    /// ICMP "port unreachable" answers to QUIC packets sent to a host whose
    /// daemon was not up yet, and IGMP from the lab switch's bridge: only
    /// counted, in `quic_unreachable` and `switch_igmp`.
    Counted,
}

/// What one capture shows.
pub(crate) struct Wire {
    pub(crate) udp_packets: usize,
    pub(crate) udp_payload: u64,
    /// UDP payload bytes per flow.
    pub(crate) flows: Vec<(Flow, u64)>,
    /// IPv4 packets that are not UDP to or from the QUIC port between two
    /// lab hosts' real addresses (TCP to an overlay port, say), except
    /// those [`Noise::Counted`] sets apart.
    pub(crate) not_quic: Vec<String>,
    /// ICMP "port unreachable" answers to QUIC packets sent to a host
    /// whose daemon was not up yet (the mesh starts one daemon at a time);
    /// 0 unless [`Noise::Counted`].
    pub(crate) quic_unreachable: usize,
    /// IGMP membership reports of the lab switch's bridge; 0 unless
    /// [`Noise::Counted`].
    pub(crate) switch_igmp: usize,
    /// Marker copies inside single packets.
    pub(crate) marker_in_packets: usize,
    /// Marker copies in each flow's payloads concatenated in capture order
    /// (this includes copies split across packets).
    pub(crate) marker_in_flows: usize,
}

/// (source, destination, source port, destination port).
pub(crate) type Flow = (Ipv4Addr, Ipv4Addr, Option<u16>, Option<u16>);

impl Wire {
    /// Reads `capture`, taken on a network of the lab hosts at `hosts`,
    /// counting copies of `marker`. Asserts that UDP flows only between
    /// lab hosts.
    pub(crate) fn of(
        capture: &pcap::Capture,
        hosts: &[Ipv4Addr],
        marker: &[u8],
        noise: Noise,
    ) -> Wire {
        let mut wire = Wire {
            udp_packets: 0,
            udp_payload: 0,
            flows: Vec::new(),
            not_quic: Vec::new(),
            quic_unreachable: 0,
            switch_igmp: 0,
            marker_in_packets: 0,
            marker_in_flows: 0,
        };
        let mut flow_index: HashMap<Flow, usize> = HashMap::new();
        // Per flow, the last marker.len() - 1 bytes of its payloads so far: a
        // copy that ends in a packet starts at most that far back, so
        // searching tail + payload finds every copy in the concatenation.
        let mut tails: Vec<Vec<u8>> = Vec::new();
        for packet in &capture.packets {
            if packet.protocol == 17 {
                wire.udp_packets += 1;
                wire.udp_payload += packet.payload.len() as u64;
                assert!(
                    hosts.contains(&packet.src) && hosts.contains(&packet.dst),
                    "UDP between lab hosts only: {}",
                    describe(packet)
                );
            }
            // UDP is between lab hosts (asserted above).
            let quic = packet.protocol == 17
                && (packet.src_port == Some(QUIC_PORT) || packet.dst_port == Some(QUIC_PORT));
            if !quic {
                if noise == Noise::Counted && is_quic_port_unreachable(packet, hosts) {
                    wire.quic_unreachable += 1;
                } else if noise == Noise::Counted
                    && packet.protocol == 2
                    && packet.src.is_unspecified()
                    && packet.dst.octets()[..3] == [224, 0, 0]
                {
                    // IGMP from the lab switch's own bridge (it has no
                    // address, hence 0.0.0.0), flooded to every port.
                    wire.switch_igmp += 1;
                } else {
                    wire.not_quic.push(describe(packet));
                }
            }
            wire.marker_in_packets += count_marker(marker, &packet.payload);
            let flow = (packet.src, packet.dst, packet.src_port, packet.dst_port);
            let index = *flow_index.entry(flow).or_insert_with(|| {
                wire.flows.push((flow, 0));
                tails.push(Vec::new());
                wire.flows.len() - 1
            });
            wire.flows[index].1 += packet.payload.len() as u64;
            let tail = &mut tails[index];
            tail.extend_from_slice(&packet.payload);
            wire.marker_in_flows += count_marker(marker, tail);
            let keep = tail.len().min(marker.len() - 1);
            tail.drain(..tail.len() - keep);
        }
        wire
    }

    pub(crate) fn udp_from(&self, addr: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.0 == addr)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    pub(crate) fn udp_to(&self, addr: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.1 == addr)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// UDP payload bytes from `src` to `dst`, over all their flows.
    pub(crate) fn flow_bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.0 == src && flow.1 == dst)
            .map(|(_, bytes)| bytes)
            .sum()
    }
}

/// Whether `packet` is an ICMP port unreachable between two lab hosts that
/// quotes a UDP packet the other way to the QUIC port: a dial that arrived
/// before the far daemon listened.
fn is_quic_port_unreachable(packet: &Packet, hosts: &[Ipv4Addr]) -> bool {
    let icmp = &packet.payload;
    if packet.protocol != 1 || icmp.len() < 8 + 20 + 8 || icmp[0] != 3 || icmp[1] != 3 {
        return false;
    }
    let inner = &icmp[8..];
    let header = usize::from(inner[0] & 0x0f) * 4;
    let address = |at: usize| Ipv4Addr::new(inner[at], inner[at + 1], inner[at + 2], inner[at + 3]);
    let Some(udp) = inner.get(header..header + 8) else {
        return false;
    };
    inner[9] == 17
        && address(12) == packet.dst
        && address(16) == packet.src
        && hosts.contains(&packet.src)
        && hosts.contains(&packet.dst)
        && u16::from_be_bytes([udp[2], udp[3]]) == QUIC_PORT
}

pub(crate) fn describe(packet: &Packet) -> String {
    format!(
        "proto {} {}:{:?} -> {}:{:?} ({} bytes)",
        packet.protocol,
        packet.src,
        packet.src_port,
        packet.dst,
        packet.dst_port,
        packet.payload.len()
    )
}
