//! What crosses a real wire between lab hosts: only QUIC to and from the
//! QUIC port, never a byte of the plaintext (not even split across two
//! packets of one flow), and nothing reaches a service around the tunnel.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use meshtun_lab::capture::{Capture, Stats};
use meshtun_lab::pcap::{self, Packet};
use meshtun_lab::{require_netns, Daemon, Host, Lab, QUIC_PORT};
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;
/// The plaintext the wire must never show.
const MARKER: &[u8; 32] = b"MESHTUN-PLAINTEXT-MARKER-0123456";
/// Every blocking socket call in these tests gives up after this long.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// a. No plaintext on the wire.

#[test]
fn only_ciphertext_crosses_the_wire() {
    if !require_netns("only_ciphertext_crosses_the_wire") {
        return;
    }
    const BULK_LEN: usize = 64 * MIB;
    const SIDE_LEN: usize = 8 * MIB;
    let lab = Lab::new(&["node-a", "node-b", "node-c"]).unwrap();
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));

    // The data, and proof that the marker search sees every copy in it.
    let (bulk_data, bulk_markers) = marked_stream(1, BULK_LEN);
    let (side_data, side_markers) = marked_stream(2, SIDE_LEN);
    assert_eq!(count_marker(&bulk_data), bulk_markers);
    assert_eq!(count_marker(&side_data), side_markers);
    assert!(
        bulk_markers > 30_000,
        "{bulk_markers} markers in the bulk stream"
    );
    check_flow_search_sees_split_markers();
    let bulk_hash: [u8; 32] = Sha256::digest(&bulk_data).into();
    let side_hash: [u8; 32] = Sha256::digest(&side_data).into();

    // Real services on B's loopback: sinks that hash what they read.
    let bulk_service: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let side_service: SocketAddr = "127.0.0.1:7001".parse().unwrap();
    let bulk_sink = sink(b.listen(bulk_service).unwrap());
    let side_sink = sink(b.listen(side_service).unwrap());

    // Capture every host's wire from before the first QUIC packet.
    let captures: Vec<Capture> = lab
        .hosts()
        .iter()
        .map(|host| Capture::start(host, &lab.dir, &host.name).unwrap())
        .collect();

    let forward: SocketAddr = "127.0.0.1:7100".parse().unwrap();
    let _daemon_b = lab
        .start(
            1,
            &lab.config(1)
                .expose("bulk", bulk_service, &["node-a"])
                .expose("side", side_service, &["node-c"]),
        )
        .unwrap();
    let daemon_c = lab
        .start(2, &lab.config(2).peer(b).forward(forward, "node-b", "side"))
        .unwrap();
    let daemon_a = lab
        .start(
            0,
            &lab.config(0)
                .peer(b)
                .peer(c)
                .forward(forward, "node-b", "bulk"),
        )
        .unwrap();
    wait_connected(&daemon_a, &["node-b", "node-c"]);
    wait_connected(&daemon_c, &["node-b"]);

    let started = Instant::now();
    let bulk_data = Arc::new(bulk_data);
    let side_data = Arc::new(side_data);
    let bulk_sender = send(a, forward, bulk_data.clone());
    let side_sender = send(c, forward, side_data.clone());
    let sink_timeout = Duration::from_secs(240);
    let bulk_received = bulk_sink.recv_timeout(sink_timeout).unwrap().unwrap();
    let side_received = side_sink.recv_timeout(sink_timeout).unwrap().unwrap();
    let elapsed = started.elapsed();
    bulk_sender.join().unwrap().unwrap();
    side_sender.join().unwrap().unwrap();
    assert_eq!(bulk_received, (BULK_LEN, bulk_hash), "A -> B arrived whole");
    assert_eq!(side_received, (SIDE_LEN, side_hash), "C -> B arrived whole");
    println!(
        "transfer: {} MiB A->B and {} MiB C->B in {:.1} s",
        BULK_LEN / MIB,
        SIDE_LEN / MIB,
        elapsed.as_secs_f64()
    );

    // Stop all three at once: each waits for its file to settle.
    let stopping: Vec<_> = captures
        .into_iter()
        .map(|capture| std::thread::spawn(move || capture.stop_with_stats()))
        .collect();
    let stopped: Vec<(pcap::Capture, Stats)> = stopping
        .into_iter()
        .map(|handle| handle.join().unwrap().unwrap())
        .collect();

    let addrs: Vec<Ipv4Addr> = lab.hosts().iter().map(|host| host.addr).collect();
    let mut wires = Vec::new();
    for (host, (capture, stats)) in lab.hosts().iter().zip(&stopped) {
        let wire = Wire::of(capture, &addrs);
        println!(
            "{}: {} bytes of pcap, {} IPv4 packets ({} UDP, {} UDP payload bytes), \
             {} other frames, {} flows, tcpdump: {:?} captured, {:?} dropped; \
             marker copies: {} in packets, {} in flows",
            host.name,
            stats.file_bytes,
            capture.packets.len(),
            wire.udp_packets,
            wire.udp_payload,
            capture.other_frames,
            wire.flows.len(),
            stats.captured,
            stats.dropped_by_kernel,
            wire.marker_in_packets,
            wire.marker_in_flows,
        );
        for ((src, dst, src_port, dst_port), bytes) in &wire.flows {
            println!("  flow {src}:{src_port:?} -> {dst}:{dst_port:?}: {bytes} payload bytes");
        }
        // The capture is the whole wire: nothing cut short, nothing dropped.
        assert_eq!(capture.truncated, 0, "{}: truncated frames", host.name);
        assert_eq!(
            stats.dropped_by_kernel,
            Some(0),
            "{}: tcpdump missed frames; the capture is not the whole wire",
            host.name
        );
        // Not empty: this host's own QUIC traffic went both ways.
        let out = wire.udp_from(host.addr);
        let into = wire.udp_to(host.addr);
        assert!(
            out > 0 && into > 0,
            "{}: capture holds {out} bytes of QUIC out and {into} in; it saw nothing",
            host.name
        );
        assert!(
            wire.not_quic.is_empty(),
            "{}: {} IPv4 packets that are not UDP to or from port {QUIC_PORT}, e.g. {:?}",
            host.name,
            wire.not_quic.len(),
            &wire.not_quic[..wire.not_quic.len().min(5)]
        );
        assert_eq!(
            wire.marker_in_packets, 0,
            "{}: plaintext marker in a packet",
            host.name
        );
        assert_eq!(
            wire.marker_in_flows, 0,
            "{}: plaintext marker across the packets of a flow",
            host.name
        );
        wires.push(wire);
    }
    // The 64 MiB really crossed A's wire (and C's side stream C's), so the
    // absence of the marker there means something.
    let a_to_b = wires[0].flow_bytes(a.addr, b.addr);
    assert!(
        a_to_b >= BULK_LEN as u64,
        "A's capture holds only {a_to_b} bytes of UDP payload from A to B"
    );
    let b_saw = wires[1].flow_bytes(a.addr, b.addr);
    assert!(
        b_saw >= BULK_LEN as u64,
        "B's capture holds only {b_saw} bytes of UDP payload from A to B"
    );
    let c_to_b = wires[2].flow_bytes(c.addr, b.addr);
    assert!(
        c_to_b >= SIDE_LEN as u64,
        "C's capture holds only {c_to_b} bytes of UDP payload from C to B"
    );
    assert!(
        wires[2].flow_bytes(a.addr, c.addr) > 0,
        "A's connection to C shows on C's wire"
    );
}

/// What one capture shows.
struct Wire {
    udp_packets: usize,
    udp_payload: u64,
    /// UDP payload bytes per flow.
    flows: Vec<(Flow, u64)>,
    /// IPv4 packets that are not UDP to or from the QUIC port.
    not_quic: Vec<String>,
    /// Marker copies inside single packets.
    marker_in_packets: usize,
    /// Marker copies in each flow's payloads concatenated in capture order
    /// (this includes copies split across packets).
    marker_in_flows: usize,
}

/// (source, destination, source port, destination port).
type Flow = (Ipv4Addr, Ipv4Addr, Option<u16>, Option<u16>);

impl Wire {
    fn of(capture: &pcap::Capture, hosts: &[Ipv4Addr]) -> Wire {
        let mut wire = Wire {
            udp_packets: 0,
            udp_payload: 0,
            flows: Vec::new(),
            not_quic: Vec::new(),
            marker_in_packets: 0,
            marker_in_flows: 0,
        };
        let mut flow_index: HashMap<Flow, usize> = HashMap::new();
        // Per flow, the last MARKER.len() - 1 bytes of its payloads so far: a
        // copy that ends in a packet starts at most that far back, so
        // searching tail + payload finds every copy in the concatenation.
        let mut tails: Vec<Vec<u8>> = Vec::new();
        for packet in &capture.packets {
            let quic = packet.protocol == 17
                && (packet.src_port == Some(QUIC_PORT) || packet.dst_port == Some(QUIC_PORT));
            if !quic {
                wire.not_quic.push(describe(packet));
            }
            if packet.protocol == 17 {
                wire.udp_packets += 1;
                wire.udp_payload += packet.payload.len() as u64;
                assert!(
                    hosts.contains(&packet.src) && hosts.contains(&packet.dst),
                    "UDP between lab hosts only: {}",
                    describe(packet)
                );
            }
            wire.marker_in_packets += count_marker(&packet.payload);
            let flow = (packet.src, packet.dst, packet.src_port, packet.dst_port);
            let index = *flow_index.entry(flow).or_insert_with(|| {
                wire.flows.push((flow, 0));
                tails.push(Vec::new());
                wire.flows.len() - 1
            });
            wire.flows[index].1 += packet.payload.len() as u64;
            let tail = &mut tails[index];
            tail.extend_from_slice(&packet.payload);
            wire.marker_in_flows += count_marker(tail);
            let keep = tail.len().min(MARKER.len() - 1);
            tail.drain(..tail.len() - keep);
        }
        wire
    }

    fn udp_from(&self, addr: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.0 == addr)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    fn udp_to(&self, addr: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.1 == addr)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// UDP payload bytes from `src` to `dst`, over all their flows.
    fn flow_bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u64 {
        self.flows
            .iter()
            .filter(|(flow, _)| flow.0 == src && flow.1 == dst)
            .map(|(_, bytes)| bytes)
            .sum()
    }
}

fn describe(packet: &Packet) -> String {
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

/// The flow search must find a marker split across two packets of one flow
/// (with another flow's packet between them), and must not join two flows.
fn check_flow_search_sees_split_markers() {
    let packet = |src: u8, payload: &[u8]| Packet {
        src: Ipv4Addr::new(198, 18, 0, src),
        dst: Ipv4Addr::new(198, 18, 0, 12),
        protocol: 17,
        src_port: Some(QUIC_PORT),
        dst_port: Some(QUIC_PORT),
        payload: payload.to_vec(),
    };
    let split = |first: u8, second: u8| pcap::Capture {
        packets: vec![
            packet(first, &[b"xx", &MARKER[..10]].concat()),
            packet(13, b"other flow"),
            packet(second, &MARKER[10..]),
        ],
        ..pcap::Capture::default()
    };
    let hosts = [11, 12, 13].map(|octet| Ipv4Addr::new(198, 18, 0, octet));
    let one_flow = Wire::of(&split(11, 11), &hosts);
    assert_eq!(
        (one_flow.marker_in_packets, one_flow.marker_in_flows),
        (0, 1)
    );
    let two_flows = Wire::of(&split(11, 13), &hosts);
    assert_eq!(
        (two_flows.marker_in_packets, two_flows.marker_in_flows),
        (0, 0)
    );
}

/// `len` bytes of xorshift noise with [`MARKER`] written at pseudo-random
/// gaps of 1000 to 3047 bytes, so its copies sit at every offset relative to
/// write and packet boundaries and some straddle them. Returns the data and
/// the number of copies.
fn marked_stream(seed: u64, len: usize) -> (Vec<u8>, usize) {
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
    while at + MARKER.len() <= len {
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
        copies += 1;
        at += MARKER.len() + 1000 + (next() % 2048) as usize;
    }
    (data, copies)
}

/// How many times [`MARKER`] occurs in `haystack`. Every copy covers
/// exactly one byte whose index is `MARKER.len() - 1` modulo `MARKER.len()`,
/// so only those bytes are looked at: fast enough for hundreds of MiB in a
/// debug build.
fn count_marker(haystack: &[u8]) -> usize {
    let width = MARKER.len();
    let mut count = 0;
    let mut at = width - 1;
    while at < haystack.len() {
        let byte = haystack[at];
        for (offset, _) in MARKER.iter().enumerate().filter(|(_, &m)| m == byte) {
            let start = at - offset;
            if haystack.get(start..start + width) == Some(MARKER.as_slice()) {
                count += 1;
            }
        }
        at += width;
    }
    count
}

/// A service: accepts one connection (within 30 s), reads it to the end
/// while hashing, closes it, and reports (bytes, SHA-256).
fn sink(listener: TcpListener) -> mpsc::Receiver<io::Result<(usize, [u8; 32])>> {
    let (report, reported) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let mut tcp = accept_within(&listener, SOCKET_TIMEOUT)?;
            tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
            let mut hash = Sha256::new();
            let mut total = 0;
            let mut buffer = vec![0u8; 256 * 1024];
            loop {
                let read = tcp.read(&mut buffer)?;
                if read == 0 {
                    break;
                }
                total += read;
                hash.update(&buffer[..read]);
            }
            Ok((total, hash.finalize().into()))
        })();
        let _ = report.send(result);
    });
    reported
}

/// An application on `host`: connects to `forward`, writes `data`, half-
/// closes, and expects a clean EOF with nothing else once the service has
/// read it all.
fn send(
    host: &Host,
    forward: SocketAddr,
    data: Arc<Vec<u8>>,
) -> std::thread::JoinHandle<io::Result<()>> {
    let host = host.clone();
    std::thread::spawn(move || {
        let mut tcp = host.connect(forward).map_err(io::Error::other)??;
        tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        for chunk in data.chunks(64 * 1024) {
            tcp.write_all(chunk)?;
        }
        tcp.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest)?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other("the sink sent data"))
        }
    })
}

// ---------------------------------------------------------------------------
// b. Nothing reachable around the tunnel.

#[test]
fn nothing_reaches_the_service_around_the_tunnel() {
    if !require_netns("nothing_reaches_the_service_around_the_tunnel") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b", "node-c"]).unwrap();
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let service: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let echo = Echo::start(b.listen(service).unwrap());
    // node-c's *name* is allowed: only its certificate can keep it out.
    let daemon_b = lab
        .start(
            1,
            &lab.config(1).expose("echo", service, &["node-a", "node-c"]),
        )
        .unwrap();
    let forward: SocketAddr = "127.0.0.1:7100".parse().unwrap();
    let daemon_a = lab
        .start(0, &lab.config(0).peer(b).forward(forward, "node-b", "echo"))
        .unwrap();
    wait_connected(&daemon_a, &["node-b"]);

    // Control: the service works through the tunnel.
    let mut tcp = a.connect(forward).unwrap().unwrap();
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    tcp.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    tcp.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello");
    drop(tcp);

    // A direct TCP connect to B's service port fails from the other hosts.
    let direct = SocketAddr::new(b.addr.into(), service.port());
    for host in [a, c] {
        match host.connect(direct).unwrap() {
            Ok(_) => panic!("{} reached B's loopback service at {direct}", host.name),
            Err(error) => {
                println!("direct connect {} -> {direct}: {error}", host.name);
                assert!(
                    matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
                    ),
                    "unexpected error {error:?}"
                );
            }
        }
    }

    // A node whose certificate comes from another CA (named differently, and
    // then named like the real one) cannot open a stream to B.
    for cluster in ["rogue", "lab"] {
        let dir = lab.dir.join(format!("rogue-{cluster}"));
        pki(&lab, |command| {
            command
                .args(["pki", "init-ca", "--cluster", cluster, "--out"])
                .arg(dir.join("ca"))
        });
        pki(&lab, |command| {
            command
                .args(["pki", "issue", "--ca"])
                .arg(dir.join("ca"))
                .args(["--node", "node-c", "--ip", &c.addr.to_string(), "--out"])
                .arg(dir.join("certs"))
        });
        let mut config = lab.config(2).peer(b).forward(forward, "node-b", "echo");
        config.cert = dir.join("certs").join("node-c.crt");
        config.key = dir.join("certs").join("node-c.key");
        // The rogue trusts its own CA and the cluster's (meshtun refuses to
        // start with a certificate its own bundle does not vouch for): it
        // accepts B, but B does not accept it.
        let bundle = dir.join("bundle.crt");
        let rogue_ca = std::fs::read_to_string(dir.join("ca").join("ca.crt")).unwrap();
        let cluster_ca = std::fs::read_to_string(&config.ca).unwrap();
        std::fs::write(&bundle, format!("{rogue_ca}{cluster_ca}")).unwrap();
        config.ca = bundle;
        let rejections_before = count_lines(&daemon_b.log_since_start(), "handshake failed");
        let mut rogue = lab.start(2, &config).unwrap();
        let rejected = wait_until(Duration::from_secs(15), || {
            count_lines(&daemon_b.log_since_start(), "handshake failed") > rejections_before
                && rogue.log_since_start().contains("cannot connect to peer")
        });
        let b_log = daemon_b.log_since_start();
        let c_log = rogue.log_since_start();
        assert!(
            rejected,
            "B did not log a rejected handshake from the rogue node-c\n--- B ---\n{b_log}\n--- C ---\n{c_log}"
        );
        let rejection = b_log
            .lines()
            .filter(|line| line.contains("handshake failed"))
            .nth(rejections_before)
            .unwrap()
            .to_owned();
        println!("rogue CA {cluster:?}: B logged: {rejection}");
        assert!(
            rejection.contains(&c.addr.to_string()),
            "the rejection names the rogue's address"
        );
        // Also a CA that copies the cluster's name: the issuer is unknown
        // because no trusted key signed the certificate.
        assert!(
            rejection.contains("invalid peer certificate: UnknownIssuer"),
            "B's rejection says the issuer is unknown"
        );
        assert!(
            !b_log.contains("peer=node-c"),
            "B never accepted the rogue as node-c:\n{b_log}"
        );
        if let Some(line) = c_log
            .lines()
            .find(|line| line.contains("cannot connect to peer"))
        {
            println!("rogue CA {cluster:?}: C logged: {line}");
        }
        assert!(!c_log.contains("peer connected"), "{c_log}");

        // An application on C using the rogue's forward is reset.
        let outcome = reset_outcome(c, forward);
        println!("rogue CA {cluster:?}: client on C: {outcome}");
        assert!(outcome.starts_with("reset"), "{outcome}");

        rogue.terminate();
        assert!(rogue.wait_exit(Duration::from_secs(10)).is_some());
    }
    let accepted = echo.stop();
    assert_eq!(
        accepted, 1,
        "the service saw only the control connection through A"
    );
}

/// What happens to a client of `forward` on `host`: "reset ..." when the
/// connection was reset, anything else otherwise.
fn reset_outcome(host: &Host, forward: SocketAddr) -> String {
    let is_reset = |error: &io::Error| {
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    };
    let mut tcp = match host.connect(forward).unwrap() {
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
struct Echo {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Echo {
    fn start(listener: TcpListener) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                listener.set_nonblocking(true).unwrap();
                let deadline = Instant::now() + Duration::from_secs(240);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = echo_once(tcp);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Echo {
            stop,
            accepted,
            thread,
        }
    }

    /// Stops the service; returns how many connections it accepted.
    fn stop(self) -> usize {
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

/// Runs `meshtun pki ...` (built by `args`) and asserts it succeeded.
fn pki(lab: &Lab, args: impl FnOnce(&mut Command) -> &mut Command) {
    let mut command = Command::new(lab.binary());
    let output = args(&mut command).output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------
// Shared helpers.

/// Accepts one connection within `timeout`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((tcp, _)) => {
                tcp.set_nonblocking(false)?;
                return Ok(tcp);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection to accept",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Waits (at most 15 s) until `daemon` logged an outgoing connection to
/// each of `peers`.
fn wait_connected(daemon: &Daemon, peers: &[&str]) {
    let connected = |log: &str, peer: &str| {
        log.lines().any(|line| {
            line.contains(&format!("peer{{peer={peer}}}"))
                && line.contains("peer connected remote=")
        })
    };
    let done = wait_until(Duration::from_secs(15), || {
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

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
