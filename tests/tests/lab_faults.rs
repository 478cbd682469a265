//! Faults on a real wire (issue 3, evidence 4): a peer killed mid-transfer
//! and restarted, a link cut for 5 s, a peer missing at start-up, and junk
//! UDP at a node's QUIC port during a bulk transfer. Each case runs real
//! `meshtun run` daemons in lab namespaces.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use meshtun_lab::{require_netns, Daemon, Host, Lab};

mod lab_support;

const MIB: u64 = 1024 * 1024;
/// The `[quic]` timing every case sets explicitly, so the bounds below do
/// not drift with the defaults.
const TIMING: &str = "idle_timeout = \"10s\"\nkeep_alive = \"2s\"";
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the test services on the hosts accept connections.
const SERVICE_LIFETIME: Duration = Duration::from_secs(180);

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Accepts on `listener` (a socket inside a host) until `SERVICE_LIFETIME`
/// passes or `limit` connections came, each handled on its own thread.
fn serve(listener: TcpListener, limit: usize, handler: fn(TcpStream)) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + SERVICE_LIFETIME;
        let mut accepted = 0;
        while accepted < limit && Instant::now() < deadline {
            match listener.accept() {
                Ok((tcp, _)) => {
                    accepted += 1;
                    let _ = tcp.set_nonblocking(false);
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
                    let _ = tcp.set_write_timeout(Some(Duration::from_secs(30)));
                    thread::spawn(move || handler(tcp));
                }
                Err(error) if is_timeout(&error) => thread::sleep(Duration::from_millis(10)),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// Echoes until EOF, then closes its side cleanly.
fn echo(mut tcp: TcpStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    for _ in 0..1_000_000 {
        match tcp.read(&mut buffer) {
            Ok(0) => {
                let _ = tcp.shutdown(Shutdown::Write);
                return;
            }
            Ok(read) => {
                if tcp.write_all(&buffer[..read]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Reads to EOF, then answers with the byte count (u64, big-endian), so the
/// client knows every byte arrived.
fn sink(mut tcp: TcpStream) {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    for _ in 0..10_000_000 {
        match tcp.read(&mut buffer) {
            Ok(0) => {
                let _ = tcp.write_all(&total.to_be_bytes());
                let _ = tcp.shutdown(Shutdown::Write);
                return;
            }
            Ok(read) => total += read as u64,
            Err(_) => return,
        }
    }
}

/// One echo round trip through `forward` from inside `host`.
fn round_trip(host: &Host, forward: SocketAddr, tag: usize) -> io::Result<()> {
    let mut tcp = host.connect(forward).unwrap()?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(3)))?;
    let message = format!("ping {tag}");
    tcp.write_all(message.as_bytes())?;
    let mut reply = vec![0u8; message.len()];
    tcp.read_exact(&mut reply)?;
    if reply != message.as_bytes() {
        return Err(io::Error::other("echo differs"));
    }
    Ok(())
}

/// Retries echo round trips until one succeeds or `within` passes; returns
/// how long it took to the first success.
fn first_round_trip(host: &Host, forward: SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    for attempt in 0..2_000 {
        if round_trip(host, forward, attempt).is_ok() {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        thread::sleep(Duration::from_millis(25));
    }
    None
}

/// Streams `size` bytes into the sink behind `forward` and waits for its
/// count; returns the time from connect to the count.
fn bulk(host: &Host, forward: SocketAddr, size: u64) -> Duration {
    let start = Instant::now();
    let mut tcp = host.connect(forward).unwrap().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let now = left.min(chunk.len() as u64);
        tcp.write_all(&chunk[..now as usize]).unwrap();
        left -= now;
    }
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).unwrap();
    assert_eq!(u64::from_be_bytes(count), size, "the sink got every byte");
    start.elapsed()
}

/// Starts host A's daemon forwarding `to_sink` and `to_echo` to node-b's
/// `sink` and `echo` services, and waits until an echo goes through.
fn start_forwarding_host(lab: &Lab, to_sink: SocketAddr, to_echo: SocketAddr) -> Daemon {
    let config = lab
        .config(0)
        .quic(TIMING)
        .peer(lab.host(1))
        .forward(to_sink, "node-b", "sink")
        .forward(to_echo, "node-b", "echo");
    let daemon = lab.start(0, &config).unwrap();
    assert!(
        first_round_trip(lab.host(0), to_echo, Duration::from_secs(10)).is_some(),
        "A never reached B"
    );
    daemon
}

/// What one read or write says about a connection: `None` to keep going.
fn ending(op: &'static str, result: io::Result<usize>) -> Option<Outcome> {
    match result {
        Ok(0) if op == "read" => Some(Outcome::CleanEof),
        Ok(_) => None,
        Err(error) if is_timeout(&error) => None,
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => Some(Outcome::Reset(op)),
        Err(error) => Some(Outcome::Other(op, error)),
    }
}

/// What a client saw after its peer died.
#[derive(Debug)]
enum Outcome {
    Reset(&'static str),
    CleanEof,
    Other(&'static str, io::Error),
    Nothing,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reset(on) => write!(out, "reset on {on}"),
            Outcome::CleanEof => write!(out, "clean EOF"),
            Outcome::Other(on, error) => write!(out, "{:?} on {on}: {error}", error.kind()),
            Outcome::Nothing => write!(out, "nothing"),
        }
    }
}

/// (a) `kill -9` of B mid-transfer: A's client sees a reset, never a clean
/// EOF, within the idle timeout; a restarted B serves new connections
/// through A within 2 s, with A's daemon untouched.
#[test]
fn killed_peer_resets_clients_and_restarted_peer_serves_at_once() {
    if !require_netns("killed_peer_resets_clients_and_restarted_peer_serves_at_once") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let (sink_at, echo_at) = (addr("127.0.0.1:7000"), addr("127.0.0.1:7001"));
    let _sink = serve(b.listen(sink_at).unwrap(), 16, sink);
    let _echo = serve(b.listen(echo_at).unwrap(), 1_000, echo);
    let config_b = lab
        .config(1)
        .quic(TIMING)
        .expose("sink", sink_at, &["node-a"])
        .expose("echo", echo_at, &["node-a"]);
    let mut daemon_b = lab.start(1, &config_b).unwrap();
    let (to_sink, to_echo) = (addr("127.0.0.1:7100"), addr("127.0.0.1:7101"));
    let mut daemon_a = start_forwarding_host(&lab, to_sink, to_echo);
    let pid_a = daemon_a.pid();

    // A few MiB into the sink, then B dies.
    let mut client = a.connect(to_sink).unwrap().unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    for _ in 0..64 {
        client.write_all(&chunk).unwrap();
    }
    daemon_b.kill();
    let killed = Instant::now();

    // Keep streaming and reading until the client learns of the death.
    client
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let limit = IDLE_TIMEOUT + Duration::from_secs(10);
    let mut outcome = Outcome::Nothing;
    let mut reply = [0u8; 64];
    for _ in 0..1_000 {
        if killed.elapsed() > limit {
            break;
        }
        if let Some(ending) = ending("write", client.write(&chunk)) {
            outcome = ending;
            break;
        }
        if let Some(ending) = ending("read", client.read(&mut reply)) {
            outcome = ending;
            break;
        }
    }
    let reset_after = killed.elapsed();
    assert!(
        matches!(outcome, Outcome::Reset(_)),
        "A's client must see a reset after B's death, saw {outcome} after {reset_after:?}\n--- A ---\n{}",
        daemon_a.log_since_start()
    );
    assert!(
        reset_after <= IDLE_TIMEOUT + Duration::from_secs(3),
        "reset came {reset_after:?} after the kill (idle timeout {IDLE_TIMEOUT:?})"
    );

    // B comes back: new connections through A work at once.
    let _daemon_b = lab.start(1, &config_b).unwrap();
    let recovered = first_round_trip(a, to_echo, Duration::from_secs(20));
    let log_a = daemon_a.log_since_start();
    let recovered =
        recovered.unwrap_or_else(|| panic!("no echo through A 20 s after B's restart\n{log_a}"));
    assert!(
        recovered <= Duration::from_secs(2),
        "first echo after restart took {recovered:?}\n--- A ---\n{log_a}"
    );
    assert!(daemon_a.is_running(), "A's daemon still runs");
    assert_eq!(daemon_a.pid(), pid_a, "A's daemon is the same process");
}

/// (b) B's link down for 5 s (less than the idle timeout) while messages
/// trickle through an open forwarded connection: the connection and the
/// stream survive, every message is echoed exactly once and in order, and A
/// does not reconnect.
#[test]
fn link_down_for_five_seconds_keeps_connection_and_stream() {
    if !require_netns("link_down_for_five_seconds_keeps_connection_and_stream") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let echo_at = addr("127.0.0.1:7001");
    let _echo = serve(b.listen(echo_at).unwrap(), 100, echo);
    let _daemon_b = lab
        .start(
            1,
            &lab.config(1)
                .quic(TIMING)
                .expose("echo", echo_at, &["node-a"]),
        )
        .unwrap();
    let to_echo = addr("127.0.0.1:7101");
    let mut daemon_a = lab
        .start(
            0,
            &lab.config(0)
                .quic(TIMING)
                .peer(b)
                .forward(to_echo, "node-b", "echo"),
        )
        .unwrap();
    assert!(
        first_round_trip(a, to_echo, Duration::from_secs(10)).is_some(),
        "A never reached B"
    );

    const MESSAGES: usize = 90;
    const INTERVAL: Duration = Duration::from_millis(100);
    let message = |index: usize| format!("message {index:05} ..\n").into_bytes();
    let size = message(0).len();
    let expected: Vec<u8> = (0..MESSAGES).flat_map(message).collect();

    let client = a.connect(to_echo).unwrap().unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut writer = client.try_clone().unwrap();
    let sender = thread::spawn(move || -> io::Result<()> {
        for index in 0..MESSAGES {
            writer.write_all(&message(index))?;
            thread::sleep(INTERVAL);
        }
        Ok(())
    });
    let mut reader = client.try_clone().unwrap();
    let receiver = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        let mut failure = None;
        while received.len() < MESSAGES * size && Instant::now() < deadline {
            match reader.read(&mut buffer) {
                Ok(0) => {
                    failure = Some("clean EOF".to_owned());
                    break;
                }
                Ok(read) => received.extend_from_slice(&buffer[..read]),
                Err(error) if is_timeout(&error) => {}
                Err(error) => {
                    failure = Some(format!("{:?}: {error}", error.kind()));
                    break;
                }
            }
        }
        (received, failure)
    });

    thread::sleep(Duration::from_millis(1_500));
    b.set_link(false).unwrap();
    thread::sleep(Duration::from_secs(5));
    b.set_link(true).unwrap();

    let sent = sender.join().unwrap();
    let (received, failure) = receiver.join().unwrap();
    assert!(sent.is_ok(), "sending failed: {sent:?}");
    assert_eq!(failure, None, "the forwarded connection failed");
    assert!(
        received == expected,
        "every message echoed exactly once and in order (got {} bytes)",
        received.len()
    );

    // Nothing more arrives (no duplicates), and the connection still closes
    // cleanly both ways.
    let mut client = client;
    let mut extra = [0u8; 64];
    match client.read(&mut extra) {
        Err(error) if is_timeout(&error) => {}
        other => panic!("after the last echo the connection must be quiet, got {other:?}"),
    }
    client.shutdown(Shutdown::Write).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        client.read(&mut extra).unwrap(),
        0,
        "clean close after the echo"
    );

    let log_a = daemon_a.log_since_start();
    // Each shard of A dialled B once, and none of them again.
    let connects: Vec<&str> = log_a
        .lines()
        .filter(|line| line.contains("peer connected") && line.contains("node-b"))
        .filter_map(|line| line.split(" shard=").nth(1)?.split(' ').next())
        .collect();
    let shards: std::collections::BTreeSet<&str> = connects.iter().copied().collect();
    assert!(
        Some(connects.len()) == lab_support::shards_in_log(&log_a)
            && shards.len() == connects.len(),
        "A did not reconnect\n--- A ---\n{log_a}"
    );
    assert!(
        !log_a.contains("peer connection closed"),
        "A's connection to B never closed\n--- A ---\n{log_a}"
    );
    assert!(daemon_a.is_running());
}

/// (c) A peer unreachable at A's start-up: A serves its other peer at once
/// and connects to the missing one once it appears.
#[test]
fn missing_peer_at_start_does_not_block_others_and_is_joined_later() {
    if !require_netns("missing_peer_at_start_does_not_block_others_and_is_joined_later") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b", "node-c"]).unwrap();
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let echo_at = addr("127.0.0.1:7001");
    let _echo_b = serve(b.listen(echo_at).unwrap(), 100, echo);
    let _echo_c = serve(c.listen(echo_at).unwrap(), 100, echo);
    let _daemon_c = lab
        .start(
            2,
            &lab.config(2)
                .quic(TIMING)
                .expose("echo", echo_at, &["node-a"]),
        )
        .unwrap();
    let (to_b, to_c) = (addr("127.0.0.1:7101"), addr("127.0.0.1:7102"));
    // A dial attempt that is under way when B appears only reaches it with
    // its next Initial retransmission or the next attempt: the bound is the
    // backoff cap plus part of the handshake timeout.
    let reconnect_max = Duration::from_secs(2);
    let mut daemon_a = lab
        .start(
            0,
            &lab.config(0)
                .quic(TIMING)
                .quic("reconnect_max = \"2s\"")
                .peer(b)
                .peer(c)
                .forward(to_b, "node-b", "echo")
                .forward(to_c, "node-c", "echo"),
        )
        .unwrap();
    let started_a = Instant::now();

    let served_c = first_round_trip(a, to_c, Duration::from_secs(5));
    assert!(
        served_c.is_some_and(|took| took <= Duration::from_secs(2)),
        "A serves C at once while B is missing ({served_c:?})\n--- A ---\n{}",
        daemon_a.log_since_start()
    );
    // B's forward fails fast (a reset, not a hang) while B is missing.
    let to_missing = round_trip(a, to_b, 0);
    assert!(to_missing.is_err(), "B is not there yet: {to_missing:?}");

    // Let A's backoff reach its cap, then B appears.
    let absent = Duration::from_secs(6);
    thread::sleep(absent.saturating_sub(started_a.elapsed()));
    let _daemon_b = lab
        .start(
            1,
            &lab.config(1)
                .quic(TIMING)
                .expose("echo", echo_at, &["node-a"]),
        )
        .unwrap();
    let joined = first_round_trip(a, to_b, Duration::from_secs(20));
    let log_a = daemon_a.log_since_start();
    let joined = joined.unwrap_or_else(|| panic!("A never connected to B\n{log_a}"));
    assert!(
        joined <= reconnect_max + Duration::from_secs(3),
        "A connected to B {joined:?} after it started (reconnect_max {reconnect_max:?})\n--- A ---\n{log_a}"
    );
    assert!(
        round_trip(a, to_c, 1).is_ok(),
        "C still served after B joined"
    );
    assert!(daemon_a.is_running());
}

/// A small deterministic generator (xorshift64*), enough for junk bytes.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for byte in bytes {
            *byte = self.next() as u8;
        }
    }

    /// Datagram `index` of the junk: mostly random sizes and bytes, and every
    /// 25th one shaped like a QUIC v1 long-header Initial (or, alternately,
    /// one of an unknown version) with a garbage body, padded to 1200 bytes.
    fn datagram(&mut self, index: usize) -> Vec<u8> {
        if index % 25 != 0 {
            let size = 1 + (self.next() % 1400) as usize;
            let mut datagram = vec![0u8; size];
            self.fill(&mut datagram);
            return datagram;
        }
        let mut datagram = vec![0u8; 1200];
        self.fill(&mut datagram);
        // Long header, fixed bit, type Initial, random reserved/pn-length bits.
        datagram[0] = 0xc0 | (datagram[0] & 0x0f);
        let version: u32 = if index % 50 == 0 { 1 } else { 0x1a2a_3a4a };
        datagram[1..5].copy_from_slice(&version.to_be_bytes());
        datagram[5] = 8; // destination connection ID length, 8 random bytes follow
        datagram[14] = 8; // source connection ID length, 8 random bytes follow
        datagram[23] = 0; // token length
        let rest = (1200 - 26) as u16;
        datagram[24..26].copy_from_slice(&(0x4000 | rest).to_be_bytes());
        datagram
    }
}

/// (d) 1,000 junk datagrams at B's QUIC port during a bulk transfer: the
/// transfer keeps its throughput, B keeps running and serving, and its log
/// holds no panic.
#[test]
fn junk_datagrams_at_quic_port_do_not_hurt_a_transfer() {
    if !require_netns("junk_datagrams_at_quic_port_do_not_hurt_a_transfer") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b", "node-c"]).unwrap();
    let (a, b, c) = (lab.host(0), lab.host(1), lab.host(2));
    let (sink_at, echo_at) = (addr("127.0.0.1:7000"), addr("127.0.0.1:7001"));
    let _sink = serve(b.listen(sink_at).unwrap(), 16, sink);
    let _echo = serve(b.listen(echo_at).unwrap(), 100, echo);
    let mut daemon_b = lab
        .start(
            1,
            &lab.config(1)
                .quic(TIMING)
                .expose("sink", sink_at, &["node-a"])
                .expose("echo", echo_at, &["node-a"]),
        )
        .unwrap();
    let (to_sink, to_echo) = (addr("127.0.0.1:7100"), addr("127.0.0.1:7101"));
    let _daemon_a = start_forwarding_host(&lab, to_sink, to_echo);

    // The machine is shared: a pair (clean, then with junk) is measured up
    // to three times, and one pair at or above the bar passes.
    let size = 64 * MIB;
    let target = b.quic_addr();
    let mut ratios = Vec::new();
    for pair in 0..3u64 {
        let clean = bulk(a, to_sink, size);
        // The junk is spread over about as long as the clean transfer took.
        let junk_socket = c.udp(addr("0.0.0.0:0")).unwrap();
        let pause = clean / 1_000;
        let seed = (u64::from(std::process::id()) << 20 | 0x9e37) + pair;
        let junk = thread::spawn(move || {
            let mut junk = Junk(seed);
            let mut sent = 0usize;
            for index in 0..1_000 {
                if junk_socket.send_to(&junk.datagram(index), target).is_ok() {
                    sent += 1;
                }
                thread::sleep(pause);
            }
            sent
        });
        let dirty = bulk(a, to_sink, size);
        let sent = junk.join().unwrap();
        let ratio = clean.as_secs_f64() / dirty.as_secs_f64();
        assert_eq!(sent, 1_000, "every junk datagram left C");
        ratios.push(ratio);
        if ratio >= 0.5 {
            break;
        }
    }
    assert!(
        ratios.iter().any(|ratio| *ratio >= 0.5),
        "throughput with junk collapsed (ratios {ratios:.2?} of the clean runs)"
    );
    let log_b = daemon_b.log_since_start();
    assert!(daemon_b.is_running(), "B survived the junk");
    assert!(
        first_round_trip(a, to_echo, Duration::from_secs(5)).is_some(),
        "B still serves new connections after the junk"
    );
    let lower = log_b.to_lowercase();
    assert!(
        !lower.contains("panic") && !log_b.contains("ERROR"),
        "B's log is calm\n--- B ---\n{log_b}"
    );
    // B says it is being sprayed: one summary line per 10 s interval, at
    // the default log level, not a line per datagram.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log_b = daemon_b.log_since_start();
        if log_b
            .lines()
            .any(|line| line.contains("dropped datagrams on the QUIC port"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never logged the junk\n--- B ---\n{log_b}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let summaries = daemon_b
        .log_since_start()
        .lines()
        .filter(|line| line.contains("dropped datagrams on the QUIC port"))
        .count();
    assert!(
        summaries <= 4,
        "junk is summarized, not logged per datagram ({summaries} lines)"
    );
}
