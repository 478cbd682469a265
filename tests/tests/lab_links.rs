//! Integrity under bad links (issue 3, evidence 3): 64 MiB each way at once
//! through a forward from host A to a service on host B, under 1% loss, 5%
//! loss, 20 ms ± 5 ms delay with reordering, and 1% duplication, and (issue
//! 4) over jumbo frames. Each case checks that every byte arrives, in order
//! (SHA-256 both ways), that no read waits as long as the idle timeout, and
//! that the impairment was really in effect. The kernel here has no netem; `meshtun_lab::impair` says which
//! mechanism emulates what.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use meshtun_lab::impair::{
    split_segments, ArrivalCounter, Count, PathFaults, Relay, WireCounters, WireFaults,
    WireImpairment, LARGE_PAYLOAD, RELAY_ADDR,
};
use meshtun_lab::{require_netns, Daemon, Lab};
use sha2::{Digest, Sha256};

/// Bytes each side sends.
const LEN: u64 = 64 << 20;
/// The QUIC idle timeout both daemons are configured with; no read may
/// wait this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer still running after this long has failed. Most cases take
/// seconds; the reordering case took 14-66 s across runs on 2 shared cores
/// (quinn's ACK handling, see the README's known limits), so the bound sits
/// well above that and below nextest's 300 s kill. Stalls are caught by the
/// read-gap check against the idle timeout, not by this deadline.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(200);
const SERVICE: &str = "127.0.0.1:7000";
const FORWARD: &str = "127.0.0.1:7100";

/// One side of the exchange, as measured by that side.
#[derive(Debug)]
struct Side {
    sent: [u8; 32],
    received: [u8; 32],
    received_bytes: u64,
    /// Longest wait for a read (from the start, between reads, and for EOF).
    longest_gap: Duration,
}

/// Sends `LEN` pseudo-random bytes (from `seed`) on `tcp` while reading and
/// hashing everything the other side sends until EOF, giving up at
/// `deadline`.
fn exchange(tcp: TcpStream, seed: u64, deadline: Instant) -> io::Result<Side> {
    let start = Instant::now();
    tcp.set_write_timeout(Some(TRANSFER_DEADLINE))?;
    let mut writer = tcp.try_clone()?;
    let sending = std::thread::spawn(move || -> io::Result<[u8; 32]> {
        let mut stream = Stream(seed);
        let mut hash = Sha256::new();
        let mut buffer = vec![0u8; 64 << 10];
        let mut left = LEN;
        while left > 0 {
            let chunk = &mut buffer[..usize::try_from(left.min(64 << 10)).unwrap()];
            stream.fill(chunk);
            hash.update(&*chunk);
            writer.write_all(chunk)?;
            left -= chunk.len() as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(hash.finalize().into())
    });
    let mut reader = tcp;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    let mut received_bytes = 0u64;
    let mut longest_gap = Duration::ZERO;
    let mut last = Instant::now();
    let outcome = loop {
        // A read waiting longer than the idle timeout has already failed
        // the test; the margin only lets us measure how long it waited.
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(IDLE_TIMEOUT + Duration::from_secs(5));
        if wait.is_zero() {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "transfer deadline passed",
            ));
        }
        reader.set_read_timeout(Some(wait))?;
        let read = reader.read(&mut buffer);
        let now = Instant::now();
        longest_gap = longest_gap.max(now - last);
        last = now;
        match read {
            Ok(0) => break Ok(()),
            Ok(len) => {
                hash.update(&buffer[..len]);
                received_bytes += len as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if now >= deadline => {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the transfer deadline ({TRANSFER_DEADLINE:?}) passed"),
                ))
            }
            Err(error) => break Err(error),
        }
    };
    if outcome.is_err() {
        // Unblocks the sender too.
        let _ = reader.shutdown(Shutdown::Both);
    }
    let sent = sending.join().expect("sender thread");
    let elapsed = start.elapsed();
    if let Err(error) = outcome {
        return Err(io::Error::new(
            error.kind(),
            format!(
                "read failed after {:.1} MiB in {elapsed:.1?}, longest gap {longest_gap:?}: {error}",
                mib(received_bytes)
            ),
        ));
    }
    Ok(Side {
        sent: sent?,
        received: hash.finalize().into(),
        received_bytes,
        longest_gap,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// A deterministic pseudo-random byte stream (splitmix64), so that a lost,
/// repeated or reordered chunk changes the hash.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buffer: &mut [u8]) {
        for word in buffer.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
    }
}

/// Accepts one connection on `listener` within 30 s.
fn accept_one(listener: &TcpListener) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((tcp, _)) => {
                tcp.set_nonblocking(false)?;
                return Ok(tcp);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// The daemons of one case: B exposes the service, A forwards to it and
/// dials B at `b_addr` (B itself, or a relay in front of it).
/// Starts B, and A dialling B at `b_addr`; `a_limits` is appended to A's
/// config (a `[limits]` table, or nothing).
fn start_daemons(lab: &Lab, b_addr: SocketAddr, a_limits: &str) -> (Daemon, Daemon) {
    let quic = format!(
        "idle_timeout = \"{}s\"\nkeep_alive = \"2s\"",
        IDLE_TIMEOUT.as_secs()
    );
    let b = lab
        .start(
            1,
            &lab.config(1)
                .quic(&quic)
                .expose("bulk", SERVICE.parse().unwrap(), &["node-a"]),
        )
        .unwrap();
    let mut a_config = lab.config(0).quic(&quic).peer_at("node-b", b_addr).forward(
        FORWARD.parse().unwrap(),
        "node-b",
        "bulk",
    );
    // Inside A's namespace, whose loopback is its own.
    a_config.extra = format!("\n[admin]\nlisten = \"{ADMIN}\"\n{a_limits}");
    let a = lab.start(0, &a_config).unwrap();
    (a, b)
}

/// A's admin endpoint, on the loopback of A's namespace.
const ADMIN: &str = "127.0.0.1:9464";

/// A's `/status` (through `meshtun status --json` run on A).
fn status_of_a(lab: &Lab) -> serde_json::Value {
    let output = lab
        .host(0)
        .command(lab.binary())
        .args(["status", "--json", "--admin", ADMIN])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "meshtun status on A: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What one transfer did, checked by [`Transfer::check`] once the case has
/// read its impairment counters.
struct Transfer {
    case: String,
    /// Client (on A) and service (on B), or why they failed.
    sides: Result<(Side, Side), String>,
}

/// Runs the 64 MiB-each-way exchange from A's forward to B's service. A
/// failure is printed at once, in case the case fails before its check.
fn transfer(case: &str, lab: &Lab, daemons: &(Daemon, Daemon)) -> Transfer {
    let (a, b) = (lab.host(0), lab.host(1));
    let listener = b.listen(SERVICE.parse().unwrap()).unwrap();
    let start = Instant::now();
    let deadline = start + TRANSFER_DEADLINE;
    let service = std::thread::spawn(move || exchange(accept_one(&listener)?, 0xb0b, deadline));
    let client = a
        .connect(FORWARD.parse().unwrap())
        .unwrap()
        .and_then(|tcp| exchange(tcp, 0xa11ce, deadline));
    let service = service.join().expect("service thread");
    let elapsed = start.elapsed();
    let sides = match (client, service) {
        (Ok(client), Ok(service)) => Ok((client, service)),
        (client, service) => {
            let failure = format!(
                "transfer failed after {elapsed:.1?}\nclient (A): {client:?}\nservice (B): {service:?}\n\
                 --- A log ---\n{}\n--- B log ---\n{}",
                daemons.0.log_since_start(),
                daemons.1.log_since_start()
            );
            println!("{case}: {failure}");
            Err(failure)
        }
    };
    Transfer {
        case: case.to_owned(),
        sides,
    }
}

impl Transfer {
    /// Every byte arrived intact both ways, and no read stalled as long as
    /// the idle timeout.
    fn check(self) {
        let case = self.case;
        let (client, service) = match self.sides {
            Ok(sides) => sides,
            Err(failure) => panic!("{case}: {failure}"),
        };
        assert_eq!(service.received_bytes, LEN, "{case}: bytes A -> B");
        assert_eq!(client.received_bytes, LEN, "{case}: bytes B -> A");
        assert!(service.received == client.sent, "{case}: A -> B corrupted");
        assert!(client.received == service.sent, "{case}: B -> A corrupted");
        for (side, gap) in [("A", client.longest_gap), ("B", service.longest_gap)] {
            assert!(
                gap < IDLE_TIMEOUT,
                "{case}: a read on {side} waited {gap:?}, not less than the idle timeout {IDLE_TIMEOUT:?}"
            );
        }
    }
}

/// The switch impairs what each host sends with `faults`; returns the
/// counters of each direction with what the other host received.
fn wire_case(case: &str, faults: WireFaults) -> Vec<(&'static str, WireCounters, u64)> {
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    split_segments(a).unwrap();
    split_segments(b).unwrap();
    let a_out = WireImpairment::install(&lab, a, b, faults).unwrap();
    let b_out = WireImpairment::install(&lab, b, a, faults).unwrap();
    let at_b = ArrivalCounter::install(b, a.addr).unwrap();
    let at_a = ArrivalCounter::install(a, b.addr).unwrap();
    let daemons = start_daemons(&lab, b.quic_addr(), "");
    let outcome = transfer(case, &lab, &daemons);
    let mut directions = Vec::new();
    for (direction, wire, arrived) in [("A->B", &a_out, &at_b), ("B->A", &b_out, &at_a)] {
        let counters = wire.counters().unwrap();
        let arrived = arrived.count().unwrap().packets;
        directions.push((direction, counters, arrived));
    }
    outcome.check();
    for (direction, counters, _) in &directions {
        // The switch saw datagrams, not offload batches of them, so the
        // rates below are per datagram.
        assert!(
            counters.seen.packets > 10_000 && counters.seen.mean_size() <= 1500,
            "{case}: {direction}: {counters:?}"
        );
    }
    directions
}

/// The switch drops `per_mille` of the datagrams each host sends.
fn loss_case(case: &str, per_mille: u16) {
    let faults = WireFaults {
        loss_per_mille: per_mille,
        ..WireFaults::default()
    };
    for (direction, counters, arrived) in wire_case(case, faults) {
        // The loss rate is the configured one, within a wide margin ...
        let rate = counters.dropped.packets as f64 / counters.seen.packets as f64;
        let target = f64::from(per_mille) / 1000.0;
        assert!(
            rate > target * 0.5 && rate < target * 1.5,
            "{case}: {direction}: {counters:?}"
        );
        // ... and what was dropped never reached the other host (a few
        // keep-alives may pass between the two readings).
        let delivered = counters.seen.packets - counters.dropped.packets;
        assert!(
            arrived >= delivered && arrived <= delivered + 20,
            "{case}: {direction}: {counters:?}, {arrived} arrived"
        );
    }
}

#[test]
fn one_percent_loss_both_ways_loses_no_byte() {
    if !require_netns("one_percent_loss_both_ways_loses_no_byte") {
        return;
    }
    loss_case("1% loss", 10);
}

#[test]
fn five_percent_loss_both_ways_loses_no_byte() {
    if !require_netns("five_percent_loss_both_ways_loses_no_byte") {
        return;
    }
    loss_case("5% loss", 50);
}

#[test]
fn one_percent_duplication_both_ways_adds_no_byte() {
    if !require_netns("one_percent_duplication_both_ways_adds_no_byte") {
        return;
    }
    let case = "1% duplication";
    let faults = WireFaults {
        duplicate_per_mille: 10,
        ..WireFaults::default()
    };
    for (direction, counters, arrived) in wire_case(case, faults) {
        let rate = counters.duplicated.packets as f64 / counters.seen.packets as f64;
        assert!(
            rate > 0.005 && rate < 0.015,
            "{case}: {direction}: {counters:?}"
        );
        // The copies really reached the other host: more datagrams arrived
        // than were sent, by the number duplicated.
        let expected = counters.seen.packets + counters.duplicated.packets;
        assert!(
            arrived >= expected && arrived <= expected + 20,
            "{case}: {direction}: {counters:?}, {arrived} arrived"
        );
    }
}

/// A relay holds each datagram for `20 ms ± jitter`, both ways.
fn delay_case(case: &str, jitter: Duration) {
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let path = PathFaults::delay(Duration::from_millis(20), jitter);
    let relay = Relay::start(&lab, a.quic_addr(), b.quic_addr(), path.clone(), path).unwrap();
    let from_a = ArrivalCounter::install(b, a.addr).unwrap();
    let from_relay = ArrivalCounter::install(b, RELAY_ADDR).unwrap();
    // With several shards A would dial from one socket per shard, and the
    // relay serves a single client address (`Relay::start`): one shard.
    let daemons = start_daemons(&lab, relay.addr(), "[limits]\nshards = 1\n");
    let outcome = transfer(case, &lab, &daemons);
    let paths = [("A->B", relay.to_server()), ("B->A", relay.to_client())];
    outcome.check();
    let low = Duration::from_millis(20) - jitter;
    for (direction, stats) in paths {
        assert!(stats.sent > 10_000, "{case}: {direction}: {stats:?}");
        assert_eq!(
            (stats.strays, stats.overflowed, stats.send_errors),
            (0, 0, 0),
            "{case}: {direction}: {stats:?}"
        );
        // Every datagram was held at least the shortest delay, and none was
        // held indefinitely. The upper bound is loose on purpose: on a
        // shared 2-core machine the relay's own scheduling has added 45 ms
        // to a 20 ms delay (seen in a CI run while builds ran beside it).
        assert!(
            u128::from(stats.min_held_micros) >= low.as_micros()
                && stats.max_held_micros < 1_000_000,
            "{case}: {direction}: {stats:?}"
        );
        // ... and the jitter, and only the jitter, reordered them.
        if jitter.is_zero() {
            assert_eq!(stats.reordered, 0, "{case}: {direction}: {stats:?}");
        } else {
            assert!(
                stats.reordered * 100 > stats.sent,
                "{case}: {direction}: {stats:?}"
            );
        }
    }
    // All of A's traffic to B went through the relay.
    assert_eq!(from_a.count().unwrap().packets, 0, "A reached B directly");
    assert!(from_relay.count().unwrap().packets > 10_000);
}

/// Heavy reordering: with quinn's default loss detection this collapsed to
/// ~0.1 MiB/s; meshtun declares loss by time only (see
/// `meshtun-node/src/endpoint.rs`), and 64 MiB each way now finishes.
#[test]
fn delay_with_jitter_that_reorders_loses_no_byte() {
    if !require_netns("delay_with_jitter_that_reorders_loses_no_byte") {
        return;
    }
    delay_case("20 ms ± 5 ms delay", Duration::from_millis(5));
}

/// The control for the case above: the same relay and delay without
/// jitter, so nothing is reordered.
#[test]
fn fixed_delay_without_reordering_loses_no_byte() {
    if !require_netns("fixed_delay_without_reordering_loses_no_byte") {
        return;
    }
    delay_case("20 ms fixed delay", Duration::ZERO);
}

/// A rate-limited link (token bucket on both hosts' egress, in place of
/// netem's `rate`): the transfer is intact, and the shaper really held it
/// back (its overlimits counter moved).
#[test]
fn rate_limited_link_loses_no_byte() {
    if !require_netns("rate_limited_link_loses_no_byte") {
        return;
    }
    const MBIT: u32 = 400;
    let case = "400 Mbit/s link";
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    a.shape_rate(MBIT).unwrap();
    b.shape_rate(MBIT).unwrap();
    let daemons = start_daemons(&lab, b.quic_addr(), "");
    let outcome = transfer(case, &lab, &daemons);
    for host in [a, b] {
        let stats = host.shaping_stats().unwrap();
        let overlimits = stats
            .split_whitespace()
            .skip_while(|word| *word != "overlimits")
            .nth(1)
            .and_then(|count| count.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            stats.contains("tbf") && overlimits > 0,
            "{case}: the shaper on {} never held a packet back:\n{stats}",
            host.name
        );
    }
    outcome.check();
}

/// Jumbo frames: on a 9000-byte link MTU discovery raises the packet size
/// to 8952 bytes of UDP payload (what the link carries over IPv6; the
/// configured ceiling). quinn 0.11 sends GSO batches of up to 10 packets,
/// and 10 x 8952 bytes overflow one UDP send: without the socket that
/// splits such batches (`meshtun-node/src/gso.rs`) every batch failed and
/// black-hole detection dropped the connection to 1200 bytes. Every byte
/// still arrives intact, and the wire really carried datagrams above 8000
/// bytes.
#[test]
fn jumbo_frames_carry_every_byte_in_packets_above_8000_bytes() {
    if !require_netns("jumbo_frames_carry_every_byte_in_packets_above_8000_bytes") {
        return;
    }
    let case = "MTU 9000";
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    lab.set_mtu(9000).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    // One datagram per skb at the counters, not offload batches.
    split_segments(a).unwrap();
    split_segments(b).unwrap();
    let at_b = ArrivalCounter::install(b, a.addr).unwrap();
    let at_a = ArrivalCounter::install(a, b.addr).unwrap();
    let daemons = start_daemons(&lab, b.quic_addr(), "");
    let outcome = transfer(case, &lab, &daemons);
    let status = status_of_a(&lab);
    let peer = &status["peers"][0];
    let arrived = [
        ("A->B", at_b.count().unwrap(), at_b.large().unwrap()),
        ("B->A", at_a.count().unwrap(), at_a.large().unwrap()),
    ];
    outcome.check();
    let mtu = peer["path_mtu"].as_u64().unwrap_or(0);
    assert!(
        (8_000..=8_952).contains(&mtu),
        "{case}: the path MTU should rise above 8000 bytes and stay at most 8952: {peer}"
    );
    for (direction, count, large) in arrived {
        // The data crossed in packets above 8000 B: 60 of its 64 MiB at
        // least, and nine tenths of all the bytes. The rest are ACKs (many more under
        // load, which is why the mean datagram is not the measure) and the
        // start before discovery. None is above the 9000-byte link.
        assert!(
            large.bytes >= 60 * 1024 * 1024
                && share(&large, &count) >= 0.9
                && large.mean_size() <= 8_980,
            "{case}: {direction}: {large:?} of {count:?} above {LARGE_PAYLOAD} B"
        );
    }
}

/// The share of `all`'s bytes that `part` holds (0 when `all` is empty).
fn share(part: &Count, all: &Count) -> f64 {
    if all.bytes == 0 {
        0.0
    } else {
        part.bytes as f64 / all.bytes as f64
    }
}
