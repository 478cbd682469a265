//! What crosses a real wire between lab hosts: only QUIC to and from the
//! QUIC port, never a byte of the plaintext (not even split across two
//! packets of one flow), and nothing reaches a service around the tunnel.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod lab_support;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lab_support::{
    accept_within, count_marker, marked_stream, reset_outcome, wait_connected, wait_until, Echo,
    Noise, Wire,
};
use meshtun_lab::capture::{Capture, Stats};
use meshtun_lab::pcap::{self, Packet};
use meshtun_lab::{require_netns, Host, Lab, QUIC_PORT};
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
    let (bulk_data, bulk_markers) = marked_stream(MARKER, 1, BULK_LEN);
    let (side_data, side_markers) = marked_stream(MARKER, 2, SIDE_LEN);
    assert_eq!(count_marker(MARKER, &bulk_data), bulk_markers);
    assert_eq!(count_marker(MARKER, &side_data), side_markers);
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
    wait_connected(&daemon_a, &["node-b", "node-c"], Duration::from_secs(15));
    wait_connected(&daemon_c, &["node-b"], Duration::from_secs(15));

    let bulk_data = Arc::new(bulk_data);
    let side_data = Arc::new(side_data);
    let bulk_sender = send(a, forward, bulk_data.clone());
    let side_sender = send(c, forward, side_data.clone());
    let sink_timeout = Duration::from_secs(240);
    let bulk_received = bulk_sink.recv_timeout(sink_timeout).unwrap().unwrap();
    let side_received = side_sink.recv_timeout(sink_timeout).unwrap().unwrap();
    bulk_sender.join().unwrap().unwrap();
    side_sender.join().unwrap().unwrap();
    assert_eq!(bulk_received, (BULK_LEN, bulk_hash), "A -> B arrived whole");
    assert_eq!(side_received, (SIDE_LEN, side_hash), "C -> B arrived whole");

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
        let wire = Wire::of(capture, &addrs, MARKER, Noise::Listed);
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
    let one_flow = Wire::of(&split(11, 11), &hosts, MARKER, Noise::Listed);
    assert_eq!(
        (one_flow.marker_in_packets, one_flow.marker_in_flows),
        (0, 1)
    );
    let two_flows = Wire::of(&split(11, 13), &hosts, MARKER, Noise::Listed);
    assert_eq!(
        (two_flows.marker_in_packets, two_flows.marker_in_flows),
        (0, 0)
    );
}

/// A service: accepts one connection (within 30 s), reads it to the end
/// while hashing, closes it, and reports (bytes, SHA-256).
fn sink(listener: TcpListener) -> mpsc::Receiver<io::Result<(usize, [u8; 32])>> {
    let (report, reported) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let (mut tcp, _) = accept_within(&listener, SOCKET_TIMEOUT)?;
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
    let mut b_config = lab.config(1).expose("echo", service, &["node-a", "node-c"]);
    b_config.extra = format!("\n[admin]\nlisten = \"{ADMIN}\"\n");
    let b_started = Instant::now();
    let daemon_b = lab.start(1, &b_config).unwrap();
    let forward: SocketAddr = "127.0.0.1:7100".parse().unwrap();
    let daemon_a = lab
        .start(0, &lab.config(0).peer(b).forward(forward, "node-b", "echo"))
        .unwrap();
    wait_connected(&daemon_a, &["node-b"], Duration::from_secs(15));

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
                assert!(
                    matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
                    ),
                    "direct connect {} -> {direct}: unexpected error {error:?}",
                    host.name
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
        config.extra = format!("\n[admin]\nlisten = \"{ADMIN}\"\n");
        // B counts every refused handshake (and logs only some: see below).
        let refused_before = admin_counter(b, B_REFUSED_TLS).unwrap();
        let mut rogue = lab.start(2, &config).unwrap();
        let rejected = wait_until(Duration::from_secs(15), || {
            admin_counter(b, B_REFUSED_TLS).unwrap() > refused_before
                && rogue.log_since_start().contains("cannot connect to peer")
        });
        let b_log = daemon_b.log_since_start();
        let c_log = rogue.log_since_start();
        assert!(
            rejected,
            "B did not count a refused handshake from the rogue node-c\n--- B ---\n{b_log}\n--- C ---\n{c_log}"
        );
        // Each of the rogue's attempts that failed, B refused and counted.
        let rogue_failed = admin_counter(c, C_REFUSED_TLS).unwrap();
        assert!(rogue_failed > 0, "the rogue counted no failure:\n{c_log}");
        assert!(
            !b_log.contains("peer=node-c"),
            "B never accepted the rogue as node-c:\n{b_log}"
        );
        assert!(!c_log.contains("peer connected"), "{c_log}");

        // An application on C using the rogue's forward is reset.
        let outcome = reset_outcome(c, forward);
        assert!(outcome.starts_with("reset"), "{outcome}");

        rogue.terminate();
        assert!(rogue.wait_exit(Duration::from_secs(10)).is_some());
        let mut refused = 0;
        let counted = wait_until(Duration::from_secs(5), || {
            refused = admin_counter(b, B_REFUSED_TLS).unwrap() - refused_before;
            refused >= rogue_failed
        });
        assert!(
            counted,
            "B counted {refused} refused handshakes, the rogue saw {rogue_failed} fail"
        );
    }
    // B warns about refused handshakes once per reason per 10 s (plus the
    // first), whatever their number: the rogues' later attempts went to
    // debug. What it says names the rogue and who refused what; a CA that
    // copies the cluster's name fares no better, the issuer is unknown
    // because no trusted key signed the certificate.
    let b_log = daemon_b.log_since_start();
    let warned: Vec<&str> = b_log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("handshake failed"))
        .collect();
    let allowed = 1 + b_started.elapsed().as_secs() / 10;
    let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
    for line in &warned {
        let reason = line
            .split_once(" reason=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map_or("(none)", |reason| reason.trim_matches('"'));
        *reasons.entry(reason).or_default() += 1;
    }
    for (reason, lines) in &reasons {
        assert!(
            *lines <= allowed,
            "{lines} warn lines for reason {reason} in {:?}, at most {allowed}:\n{b_log}",
            b_started.elapsed()
        );
    }
    let tls: Vec<&&str> = warned
        .iter()
        .filter(|line| line.contains("reason=\"tls\""))
        .collect();
    assert!(
        !tls.is_empty(),
        "B never warned about the refused handshakes:\n{b_log}"
    );
    for line in tls {
        assert!(
            line.contains(&c.addr.to_string()),
            "the warning names the rogue's address: {line}"
        );
        assert!(
            line.contains("this node refused the peer's certificate (UnknownIssuer)"),
            "the warning says B refused the rogue's certificate, its issuer unknown: {line}"
        );
    }
    let accepted = echo.stop();
    assert_eq!(
        accepted, 1,
        "the service saw only the control connection through A"
    );
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

/// The admin endpoint of B and of the rogues, each on its own host.
const ADMIN: &str = "127.0.0.1:9464";
/// Handshakes B refused for a TLS reason (a certificate), by anyone.
const B_REFUSED_TLS: &str =
    "meshtun_peer_handshakes_failed_total{peer=\"\",direction=\"incoming\",reason=\"tls\"}";
/// Handshakes with B that a rogue saw fail for a TLS reason.
const C_REFUSED_TLS: &str =
    "meshtun_peer_handshakes_failed_total{peer=\"node-b\",direction=\"outgoing\",reason=\"tls\"}";

/// The value of the counter `series` in the `/metrics` of the daemon on
/// `host` ([`ADMIN`]); 0 while it has no sample.
fn admin_counter(host: &Host, series: &str) -> io::Result<u64> {
    let mut tcp = host
        .connect(ADMIN.parse().expect("a socket address"))
        .map_err(io::Error::other)??;
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: meshtun\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("GET /metrics: {response}")));
    }
    let prefix = format!("{series} ");
    response
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(Ok(0), |value| {
            value.trim().parse().map_err(io::Error::other)
        })
}
