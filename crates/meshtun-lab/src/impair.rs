//! Link impairments without netem: loss, duplication, delay and reordering.
//!
//! The lab kernels may lack `sch_netem`, so each impairment is built from
//! what every kernel with nftables has, plus one userspace relay:
//!
//! - **Loss and duplication on the wire** ([`WireFaults`]): an nftables
//!   `netdev` table in the switch namespace, hooked on the ingress of the
//!   bridge port a host is plugged into. `numgen random` picks the victims;
//!   `drop` loses them and `dup to` sends a second copy out of the
//!   destination host's port. It sits in the switch, not in the sending
//!   host, because a drop in the host's own output path is reported to the
//!   sender (`sendmsg` fails with `EPERM`), which no real link does.
//! - **One datagram per packet** ([`split_segments`]): QUIC stacks send
//!   batches with UDP segmentation offload, and a veth passes such a batch
//!   along as one buffer, so a rule that drops "1% of packets" would drop
//!   1% of batches of up to 64 datagrams. Capping the host's `eth0` at one
//!   segment makes its kernel cut batches into wire-sized datagrams before
//!   they leave, as a NIC without UDP offload would.
//! - **Delay with jitter, and so reordering** ([`Relay`]): no qdisc here
//!   can hold packets for a random time, so a userspace UDP relay in the
//!   switch namespace (at [`RELAY_ADDR`]) holds each datagram for a uniform
//!   random delay before forwarding it. Datagrams whose delays overlap
//!   leave in a different order than they came. It can also lose and
//!   duplicate, per direction, for checking the nftables results.
//!
//! Everything here only ever sends to lab addresses (`198.18.0.0/15`).

use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use crate::{Host, Lab, LabError, Result};

/// The address the relay uses, given to the switch's bridge: outside the
/// range hosts get (`.11` upwards), inside the hosts' `/24`.
pub const RELAY_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// Whether `addr` is in the lab's range, `198.18.0.0/15`: the only
/// destinations impairments may send to.
pub fn is_lab_addr(addr: SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(v4) => {
            let [first, second, ..] = v4.ip().octets();
            first == 198 && (second & 0xfe) == 18
        }
        SocketAddr::V6(_) => false,
    }
}

fn not_lab(addr: SocketAddr) -> LabError {
    LabError::Io(
        format!("{addr} is outside the lab range 198.18.0.0/15"),
        io::ErrorKind::InvalidInput.into(),
    )
}

/// Runs `nft` with `args` (and `stdin`, if any) inside namespace `ns`.
fn nft_in(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, "nft"]).args(args);
    let line = format!("{command:?}");
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| LabError::Io(format!("running {line}"), error))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|error| LabError::Io("writing to nft".into(), error))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| LabError::Io(format!("waiting for {line}"), error))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: match stdin {
                Some(text) => format!("{line} <<\n{text}"),
                None => line,
            },
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Packets and bytes an nftables counter saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Packets (skbs: a segmentation-offload batch counts once).
    pub packets: u64,
    /// Bytes, IP header included.
    pub bytes: u64,
}

impl Count {
    /// Mean packet size, 0 when empty: above the wire MTU means the counter
    /// saw offload batches, not datagrams.
    pub fn mean_size(&self) -> u64 {
        self.bytes.checked_div(self.packets).unwrap_or(0)
    }
}

/// Reads the named counter `name` of table `family table` in `ns`.
fn read_counter(ns: &str, family: &str, table: &str, name: &str) -> Result<Count> {
    let text = nft_in(ns, &["list", "counter", family, table, name], None)?;
    let mut words = text.split_whitespace();
    let mut count = Count::default();
    let mut found = (false, false);
    while let Some(word) = words.next() {
        match word {
            "packets" => {
                count.packets = parse_number(words.next())?;
                found.0 = true;
            }
            "bytes" => {
                count.bytes = parse_number(words.next())?;
                found.1 = true;
            }
            _ => {}
        }
    }
    if found == (true, true) {
        Ok(count)
    } else {
        Err(LabError::Io(
            format!("no packets/bytes in counter {table}/{name}: {text}"),
            io::ErrorKind::InvalidData.into(),
        ))
    }
}

fn parse_number(word: Option<&str>) -> Result<u64> {
    word.and_then(|word| word.parse().ok()).ok_or_else(|| {
        LabError::Io(
            format!("not a counter value: {word:?}"),
            io::ErrorKind::InvalidData.into(),
        )
    })
}

/// Makes `host`'s kernel cut every UDP segmentation-offload batch into
/// wire-sized datagrams before they leave `eth0` (`gso_max_segs 1`), so that
/// per-packet rules downstream ([`WireFaults`], captures) see one datagram
/// per packet, as on a real wire. The sender still batches its `sendmsg`
/// calls; only the cut moves from a NIC into the kernel.
pub fn split_segments(host: &Host) -> Result<()> {
    crate::ip(&[
        "-n",
        &host.namespace,
        "link",
        "set",
        host.interface,
        "gso_max_segs",
        "1",
    ])
    .map(drop)
}

/// Loss and duplication applied by the switch to the UDP packets one host
/// sends: what its cable loses and repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireFaults {
    /// Packets lost, per thousand (10 = 1%).
    pub loss_per_mille: u16,
    /// Packets that arrive twice, per thousand. Only packets that were not
    /// lost are duplicated.
    pub duplicate_per_mille: u16,
}

/// What [`WireImpairment`]'s counters saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireCounters {
    /// UDP packets the host sent into the switch.
    pub seen: Count,
    /// Of those, lost.
    pub dropped: Count,
    /// Of those, sent twice.
    pub duplicated: Count,
}

/// [`WireFaults`] installed in the switch on the port of one host: an
/// nftables `netdev` table with an ingress chain on that port. Only UDP
/// over IPv4 is touched (ARP and the rest pass), so the link stays
/// resolvable. Dropping it removes the table.
#[derive(Debug)]
pub struct WireImpairment {
    switch: String,
    table: String,
}

impl WireImpairment {
    /// Impairs what `from` sends. Duplicates are sent out of `to`'s port,
    /// so they only reach `to` (a bridge port cannot copy to "wherever the
    /// original goes"); with `duplicate_per_mille` 0, `to` is unused.
    pub fn install(lab: &Lab, from: &Host, to: &Host, faults: WireFaults) -> Result<Self> {
        if faults.loss_per_mille > 1000 || faults.duplicate_per_mille > 1000 {
            return Err(LabError::Io(
                format!("{faults:?}: per-mille values must be at most 1000"),
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        let table = format!("meshtun_lab_{}", from.switch_port);
        let ruleset = format!(
            "table netdev {table} {{\n\
             \x20 counter seen {{ }}\n\
             \x20 counter dropped {{ }}\n\
             \x20 counter duplicated {{ }}\n\
             \x20 chain ingress {{\n\
             \x20   type filter hook ingress device \"{port}\" priority 0; policy accept;\n\
             \x20   meta protocol != ip accept\n\
             \x20   meta l4proto != udp accept\n\
             \x20   counter name seen\n\
             \x20   numgen random mod 1000 < {loss} counter name dropped drop\n\
             \x20   numgen random mod 1000 < {duplicate} counter name duplicated dup to \"{to_port}\"\n\
             \x20 }}\n\
             }}\n",
            port = from.switch_port,
            loss = faults.loss_per_mille,
            duplicate = faults.duplicate_per_mille,
            to_port = to.switch_port,
        );
        let impairment = WireImpairment {
            switch: lab.switch.clone(),
            table,
        };
        // A table left by an earlier install on this port is replaced.
        let _ = nft_in(
            &impairment.switch,
            &["delete", "table", "netdev", &impairment.table],
            None,
        );
        nft_in(&impairment.switch, &["-f", "-"], Some(&ruleset))?;
        Ok(impairment)
    }

    /// What the counters saw so far.
    pub fn counters(&self) -> Result<WireCounters> {
        let read = |name| read_counter(&self.switch, "netdev", &self.table, name);
        Ok(WireCounters {
            seen: read("seen")?,
            dropped: read("dropped")?,
            duplicated: read("duplicated")?,
        })
    }

    /// Removes the impairment now (dropping it does the same, ignoring
    /// errors).
    pub fn clear(mut self) -> Result<()> {
        let table = std::mem::take(&mut self.table);
        nft_in(&self.switch, &["delete", "table", "netdev", &table], None).map(drop)
    }
}

impl Drop for WireImpairment {
    fn drop(&mut self) {
        if !self.table.is_empty() {
            let _ = nft_in(
                &self.switch,
                &["delete", "table", "netdev", &self.table],
                None,
            );
        }
    }
}

/// Counts the UDP packets a host receives on its wire interface from
/// another address (a `netdev` ingress counter inside the host), to check
/// what an impairment upstream really delivered, and, apart, those whose
/// UDP payload is above [`LARGE_PAYLOAD`] bytes (jumbo packets). Dropping
/// it removes it.
#[derive(Debug)]
pub struct ArrivalCounter {
    namespace: String,
    table: String,
}

/// The UDP payload above which [`ArrivalCounter::large`] counts a packet.
pub const LARGE_PAYLOAD: u32 = 8000;

impl ArrivalCounter {
    /// Counts UDP packets from `source` arriving on `host`'s `eth0`.
    pub fn install(host: &Host, source: Ipv4Addr) -> Result<Self> {
        let table = format!("meshtun_lab_from_{}", source.to_string().replace('.', "_"));
        let ruleset = format!(
            "table netdev {table} {{\n\
             \x20 counter arrived {{ }}\n\
             \x20 counter large {{ }}\n\
             \x20 chain ingress {{\n\
             \x20   type filter hook ingress device \"{interface}\" priority 0; policy accept;\n\
             \x20   meta protocol ip ip saddr {source} meta l4proto udp counter name arrived\n\
             \x20   meta protocol ip ip saddr {source} udp length > {large} counter name large\n\
             \x20 }}\n\
             }}\n",
            interface = host.interface,
            // The UDP length field counts its 8-byte header.
            large = LARGE_PAYLOAD + 8,
        );
        let _ = nft_in(
            &host.namespace,
            &["delete", "table", "netdev", &table],
            None,
        );
        nft_in(&host.namespace, &["-f", "-"], Some(&ruleset))?;
        Ok(ArrivalCounter {
            namespace: host.namespace.clone(),
            table,
        })
    }

    /// What arrived so far.
    pub fn count(&self) -> Result<Count> {
        read_counter(&self.namespace, "netdev", &self.table, "arrived")
    }

    /// What arrived so far with a UDP payload above [`LARGE_PAYLOAD`].
    pub fn large(&self) -> Result<Count> {
        read_counter(&self.namespace, "netdev", &self.table, "large")
    }
}

impl Drop for ArrivalCounter {
    fn drop(&mut self) {
        let _ = nft_in(
            &self.namespace,
            &["delete", "table", "netdev", &self.table],
            None,
        );
    }
}

/// How the relay treats the datagrams of one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct PathFaults {
    /// Each datagram is held for a delay drawn uniformly from
    /// `min_delay..=max_delay`; datagrams closer together than
    /// `max_delay - min_delay` may overtake each other.
    pub min_delay: Duration,
    /// See `min_delay`.
    pub max_delay: Duration,
    /// Probability (0..=1) that a datagram is lost.
    pub loss: f64,
    /// Probability (0..=1) that a datagram that is not lost is sent twice
    /// (each copy with its own delay).
    pub duplicate: f64,
}

impl PathFaults {
    /// A clean path: no delay, loss or duplication.
    pub fn clean() -> Self {
        PathFaults {
            min_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
        }
    }

    /// A uniformly random delay of `center ± jitter`.
    pub fn delay(center: Duration, jitter: Duration) -> Self {
        PathFaults {
            min_delay: center.saturating_sub(jitter),
            max_delay: center + jitter,
            ..PathFaults::clean()
        }
    }

    fn check(&self) -> Result<()> {
        let probability = |value: f64| (0.0..=1.0).contains(&value);
        if self.min_delay <= self.max_delay
            && self.max_delay <= Duration::from_secs(10)
            && probability(self.loss)
            && probability(self.duplicate)
        {
            Ok(())
        } else {
            Err(LabError::Io(
                format!("{self:?}: need min_delay <= max_delay <= 10 s and probabilities in 0..=1"),
                io::ErrorKind::InvalidInput.into(),
            ))
        }
    }
}

/// What the relay did in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Datagrams received from the sending side.
    pub received: u64,
    /// Datagrams lost on purpose.
    pub dropped: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Datagrams sent (copies included).
    pub sent: u64,
    /// Datagrams sent after one that arrived later than they did.
    pub reordered: u64,
    /// Datagrams dropped because the relay's queue was full.
    pub overflowed: u64,
    /// Datagrams the relay could not send (`sendto` failed).
    pub send_errors: u64,
    /// Datagrams ignored because they came from an unexpected address.
    pub strays: u64,
    /// The shortest and longest time a datagram was held, in microseconds.
    pub min_held_micros: u64,
    /// See `min_held_micros`.
    pub max_held_micros: u64,
}

#[derive(Debug)]
struct PathCounters {
    received: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    sent: AtomicU64,
    reordered: AtomicU64,
    overflowed: AtomicU64,
    send_errors: AtomicU64,
    strays: AtomicU64,
    min_held_micros: AtomicU64,
    max_held_micros: AtomicU64,
}

impl PathCounters {
    fn new() -> Self {
        PathCounters {
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            min_held_micros: AtomicU64::new(u64::MAX),
            max_held_micros: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> PathStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let min_held = load(&self.min_held_micros);
        PathStats {
            received: load(&self.received),
            dropped: load(&self.dropped),
            duplicated: load(&self.duplicated),
            sent: load(&self.sent),
            reordered: load(&self.reordered),
            overflowed: load(&self.overflowed),
            send_errors: load(&self.send_errors),
            strays: load(&self.strays),
            min_held_micros: if min_held == u64::MAX { 0 } else { min_held },
            max_held_micros: load(&self.max_held_micros),
        }
    }
}

/// The two directions through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the client (who dials the relay) to the server.
    ToServer,
    /// From the server back to the client.
    ToClient,
}

/// A datagram waiting for its time.
#[derive(Debug)]
struct Held {
    due: Instant,
    /// Arrival order within its direction (copies share it).
    arrival: u64,
    received_at: Instant,
    direction: Direction,
    payload: Vec<u8>,
}

// The heap is a max-heap: the earliest `due` (then the earliest arrival)
// must compare greatest.
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .due
            .cmp(&self.due)
            .then_with(|| other.arrival.cmp(&self.arrival))
    }
}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Held {}

/// At most this many datagrams wait in the relay; more are dropped and
/// counted (memory stays bounded whatever the senders do).
const QUEUE_LIMIT: usize = 65_536;
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(25);

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    queue: Mutex<BinaryHeap<Held>>,
    ready: Condvar,
    to_server: PathCounters,
    to_client: PathCounters,
}

impl Shared {
    fn counters(&self, direction: Direction) -> &PathCounters {
        match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToClient => &self.to_client,
        }
    }

    fn queue(&self) -> MutexGuard<'_, BinaryHeap<Held>> {
        // A poisoned queue only means a relay thread panicked; the heap
        // itself is still a valid heap.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A userspace UDP relay in the lab's switch namespace, between one client
/// and one server (e.g. node A's and node B's QUIC endpoints): the client
/// sends to [`Relay::addr`] instead of to the server (configure it with
/// `NodeConfig::peer_at`), the relay forwards to the server from its own
/// second socket, and the server's replies go back to the client the same
/// way, each direction with its own [`PathFaults`].
///
/// It only accepts datagrams from, and only sends to, the two addresses it
/// was given, which must be lab addresses. Dropping it stops its threads
/// and waits for them.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay from `client` to `server`.
    pub fn start(
        lab: &Lab,
        client: SocketAddr,
        server: SocketAddr,
        to_server: PathFaults,
        to_client: PathFaults,
    ) -> Result<Relay> {
        for addr in [client, server] {
            if !is_lab_addr(addr) {
                return Err(not_lab(addr));
            }
        }
        to_server.check()?;
        to_client.check()?;
        ensure_relay_addr(lab)?;
        let (front, back) = bind_in(&lab.switch)?;
        let addr = front
            .local_addr()
            .map_err(|error| LabError::Io("relay address".into(), error))?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            queue: Mutex::new(BinaryHeap::new()),
            ready: Condvar::new(),
            to_server: PathCounters::new(),
            to_client: PathCounters::new(),
        });
        let clone = |socket: &UdpSocket| {
            socket
                .try_clone()
                .map_err(|error| LabError::Io("cloning a relay socket".into(), error))
        };
        let mut relay = Relay {
            addr,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        // From here on, Drop stops whatever threads were started.
        let receivers = [
            (clone(&front)?, client, Direction::ToServer, to_server),
            (clone(&back)?, server, Direction::ToClient, to_client),
        ];
        for (socket, expected, direction, faults) in receivers {
            let shared = Arc::clone(&shared);
            relay
                .threads
                .push(spawn(format!("relay-{direction:?}-rx"), move || {
                    receive_loop(&shared, &socket, expected, direction, &faults)
                })?);
        }
        let shared = Arc::clone(&shared);
        relay.threads.push(spawn("relay-tx".into(), move || {
            send_loop(&shared, &front, client, &back, server);
        })?);
        Ok(relay)
    }

    /// The address clients dial instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the relay did from the client to the server.
    pub fn to_server(&self) -> PathStats {
        self.shared.to_server.snapshot()
    }

    /// What the relay did from the server to the client.
    pub fn to_client(&self) -> PathStats {
        self.shared.to_client.snapshot()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: String, work: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(work)
        .map_err(|error| LabError::Io("starting a relay thread".into(), error))
}

/// Gives the switch's bridge [`RELAY_ADDR`], once per lab.
fn ensure_relay_addr(lab: &Lab) -> Result<()> {
    let shown = crate::ip(&["-n", &lab.switch, "-4", "addr", "show", "dev", "br0"])?;
    if shown.contains(&format!("inet {RELAY_ADDR}/")) {
        return Ok(());
    }
    crate::ip(&[
        "-n",
        &lab.switch,
        "addr",
        "add",
        &format!("{RELAY_ADDR}/24"),
        "dev",
        "br0",
    ])
    .map(drop)
}

/// Binds the relay's two sockets at [`RELAY_ADDR`] inside namespace `ns`:
/// sockets keep the namespace they were made in, whatever thread uses them.
fn bind_in(ns: &str) -> Result<(UdpSocket, UdpSocket)> {
    let path = format!("/run/netns/{ns}");
    let namespace =
        File::open(&path).map_err(|error| LabError::Io(format!("opening {path}"), error))?;
    let bound = std::thread::spawn(move || -> Result<(UdpSocket, UdpSocket)> {
        nix::sched::setns(&namespace, CloneFlags::CLONE_NEWNET)
            .map_err(|errno| LabError::Io(format!("entering {path}"), errno.into()))?;
        let bind = || {
            let socket = UdpSocket::bind(SocketAddrV4::new(RELAY_ADDR, 0))
                .map_err(|error| LabError::Io(format!("binding UDP {RELAY_ADDR}:0"), error))?;
            socket
                .set_read_timeout(Some(POLL))
                .map_err(|error| LabError::Io("setting a read timeout".into(), error))?;
            Ok::<_, LabError>(socket)
        };
        Ok((bind()?, bind()?))
    })
    .join()
    .map_err(|_| {
        LabError::Io(
            "relay setup thread panicked".into(),
            io::ErrorKind::Other.into(),
        )
    })?;
    bound
}

/// Receives datagrams from `expected` and queues them with their delays.
fn receive_loop(
    shared: &Shared,
    socket: &UdpSocket,
    expected: SocketAddr,
    direction: Direction,
    faults: &PathFaults,
) {
    let counters = shared.counters(direction);
    let mut random = Random::seeded(direction as u64);
    let mut buffer = vec![0u8; 65_536];
    let mut arrival = 0u64;
    let spread = faults.max_delay.saturating_sub(faults.min_delay);
    while !shared.stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            // Timeouts (to look at `stop`) and ICMP errors from earlier
            // sends both land here; neither ends the relay.
            Err(_) => continue,
        };
        if from != expected {
            counters.strays.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        counters.received.fetch_add(1, Ordering::Relaxed);
        arrival += 1;
        if random.chance(faults.loss) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let copies = if random.chance(faults.duplicate) {
            counters.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let mut queue = shared.queue();
        for _ in 0..copies {
            if queue.len() >= QUEUE_LIMIT {
                counters.overflowed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push(Held {
                due: now + spread.mul_f64(random.unit()) + faults.min_delay,
                arrival,
                received_at: now,
                direction,
                payload: buffer[..len].to_vec(),
            });
        }
        drop(queue);
        shared.ready.notify_one();
    }
}

/// Sends every queued datagram when it is due: towards the server from
/// `back`, towards the client from `front`.
fn send_loop(
    shared: &Shared,
    front: &UdpSocket,
    client: SocketAddr,
    back: &UdpSocket,
    server: SocketAddr,
) {
    // Highest arrival number sent so far, per direction.
    let mut latest = [0u64; 2];
    let mut queue = shared.queue();
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match queue.peek() {
            Some(next) if next.due <= now => None,
            Some(next) => Some((next.due - now).min(POLL)),
            None => Some(POLL),
        };
        if let Some(wait) = wait {
            queue = shared
                .ready
                .wait_timeout(queue, wait)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            continue;
        }
        let Some(held) = queue.pop() else { continue };
        drop(queue);
        let counters = shared.counters(held.direction);
        let (socket, target, slot) = match held.direction {
            Direction::ToServer => (back, server, 0),
            Direction::ToClient => (front, client, 1),
        };
        if held.arrival < latest[slot] {
            counters.reordered.fetch_add(1, Ordering::Relaxed);
        }
        latest[slot] = latest[slot].max(held.arrival);
        let held_micros = u64::try_from(held.received_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters
            .min_held_micros
            .fetch_min(held_micros, Ordering::Relaxed);
        counters
            .max_held_micros
            .fetch_max(held_micros, Ordering::Relaxed);
        // `target` was checked to be a lab address when the relay started.
        match socket.send_to(&held.payload, target) {
            Ok(_) => counters.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.send_errors.fetch_add(1, Ordering::Relaxed),
        };
        queue = shared.queue();
    }
}

/// A small, fast, non-cryptographic generator (xorshift64*): enough to pick
/// victims and delays, and no dependency.
#[derive(Debug)]
struct Random(u64);

impl Random {
    fn seeded(salt: u64) -> Self {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        // Never zero: zero is xorshift's fixed point.
        Random((clock ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0.0..1.0`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && self.unit() < probability
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_benchmarking_range_is_lab() {
        for (addr, lab) in [
            ("198.18.0.11:4433", true),
            ("198.19.255.1:1", true),
            ("198.20.0.1:4433", false),
            ("198.17.0.1:4433", false),
            ("127.0.0.1:4433", false),
            ("[::1]:4433", false),
        ] {
            assert_eq!(is_lab_addr(addr.parse().expect("address")), lab, "{addr}");
        }
    }

    #[test]
    fn held_datagrams_leave_earliest_due_first() {
        let start = Instant::now();
        let held = |millis, arrival| Held {
            due: start + Duration::from_millis(millis),
            arrival,
            received_at: start,
            direction: Direction::ToServer,
            payload: Vec::new(),
        };
        let mut heap: BinaryHeap<Held> = [held(20, 1), held(5, 2), held(12, 3), held(5, 0)]
            .into_iter()
            .collect();
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|held| held.arrival)).collect();
        assert_eq!(order, [0, 2, 3, 1]);
    }

    #[test]
    fn random_chances_are_near_their_probability() {
        let mut random = Random::seeded(7);
        let hits = (0..100_000).filter(|_| random.chance(0.05)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| random.chance(0.0)));
    }
}
