//! Overlay mode between lab hosts: every node owns an overlay address
//! (100.127.0.1, .2, .3, ... for node-0, -1, -2, ...) on a dummy interface,
//! applications bind and dial those addresses on OS-chosen ports, and
//! nftables hands the connections to meshtun, which carries them over QUIC.
//! The overlay guard is on in every test (it is the default).
//!
//! - the recipes under `examples/`, run as written (`meshtun overlay up`,
//!   then the daemon), each with a stand-in for the application, since
//!   torch, vLLM and MindSpore are not installed here:
//!   - torch.distributed: a TCPStore-like store on node-0's loopback
//!     (forward mode) and a gloo-like full mesh (overlay), with only QUIC
//!     on the wire;
//!   - MindSpore: Workers register with a Scheduler on node-0's loopback
//!     (forward mode), then link Worker to Worker (overlay);
//!   - vLLM, four nodes: a pyzmq ROUTER/DEALER exchange on the RPC port of
//!     the head's overlay address, then PUSH/PULL to a port zmq picked;
//!
//!   in each, a host that runs no meshtun routes the head's overlay address
//!   at its underlay address: nothing answers, and the guard counts the
//!   drops;
//! - the guard itself: that route is dropped and counted in `/metrics` and
//!   `/status` with the guard on, and reaches the service with it off;
//! - refusals: a port outside the allowed range and a peer not allowed are
//!   reset promptly, and the application never sees the connection;
//! - cleanup: the interface and nftables table go away at SIGTERM, and a
//!   restart after `kill -9` leaves exactly one of each; with
//!   `manage = false`, `meshtun overlay up`/`down` do the set-up instead.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod lab_support;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lab_support::{
    accept_within, assert_bypass_dropped, marked_stream, require_netns_and_pyzmq, reset_outcome,
    start_recipe_node, wait_connected, wait_listening, wait_until, Echo, Noise, Process, Wire,
};
use meshtun_lab::capture::{Capture, Stats};
use meshtun_lab::pcap;
use meshtun_lab::{require_netns, Daemon, Host, Lab, NodeConfig, OverlaySection};
use sha2::{Digest, Sha256};

const NAMES: [&str; 3] = ["node-0", "node-1", "node-2"];
const PREFIX: &str = "100.127.0.0/16";
/// The ports every peer may reach unless a test says otherwise.
const ALL_PORTS: &str = "1024-65535";
/// The rendezvous store on node-0's overlay address (torch's TCPStore port).
const STORE_PORT: u16 = 29500;
const MIB: usize = 1024 * 1024;
/// The plaintext the wire must never show.
const MARKER: &[u8; 32] = b"MESHTUN-OVERLAY-PLAINTEXT-MARK-7";
/// Every blocking socket call in these tests gives up after this long.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// The table and interface `manage = true` makes.
const TABLE: &str = "meshtun_overlay";
const INTERFACE: &str = "meshtun0";

/// Node `index`'s overlay address: 100.127.0.(index + 1).
fn overlay(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 127, 0, u8::try_from(index + 1).unwrap())
}

fn on_overlay(index: usize, port: u16) -> SocketAddr {
    SocketAddr::new(overlay(index).into(), port)
}

/// Host `index`'s config: `[overlay]` with its address, `manage = true`,
/// the `allow` rules given, and every other host as a peer with its
/// overlay address.
fn overlay_config(lab: &Lab, index: usize, allow: &[(&[&str], &str)]) -> NodeConfig {
    let mut config = lab
        .config(index)
        .overlay(overlay(index), PREFIX)
        .overlay_manage(true);
    for (peers, ports) in allow {
        config = config.overlay_allow(peers, ports);
    }
    for other in (0..lab.hosts().len()).filter(|other| *other != index) {
        config = config.overlay_peer(lab.host(other), overlay(other));
    }
    config
}

/// Starts `configs[i]` on host `i` (all of them), then waits until every
/// daemon is connected to every other.
fn start_mesh(lab: &Lab, configs: &[NodeConfig]) -> Vec<Daemon> {
    let daemons: Vec<Daemon> = configs
        .iter()
        .enumerate()
        .map(|(index, config)| lab.start(index, config).unwrap())
        .collect();
    wait_mesh_connected(&daemons, &NAMES[..configs.len()]);
    daemons
}

/// Waits until daemon `i` (node `names[i]`) is connected to every other.
fn wait_mesh_connected(daemons: &[Daemon], names: &[&str]) {
    for (index, daemon) in daemons.iter().enumerate() {
        let others: Vec<&str> = names
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, name)| *name)
            .collect();
        wait_connected(daemon, &others, Duration::from_secs(30));
    }
}

fn all_logs<'a>(daemons: impl IntoIterator<Item = &'a Daemon>) -> String {
    daemons
        .into_iter()
        .map(|daemon| format!("--- {} ---\n{}", daemon.host(), daemon.log_since_start()))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// 0. The lab renders overlay configs meshtun accepts (no namespaces needed).

#[test]
fn the_lab_renders_overlay_configs_meshtun_parses() {
    let peer = |octet: u8| -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(198, 18, 0, octet).into(), 4433)
    };
    let config = NodeConfig {
        node: "node-0".into(),
        quic_listen: peer(11),
        ca: "/tmp/ca.crt".into(),
        cert: "/tmp/node-0.crt".into(),
        key: "/tmp/node-0.key".into(),
        peers: vec![("node-1".into(), peer(12)), ("node-2".into(), peer(13))],
        forwards: Vec::new(),
        exposes: Vec::new(),
        extra_quic: String::new(),
        extra: String::new(),
        overlay: Some(OverlaySection {
            address: overlay(0),
            prefix: PREFIX.into(),
            manage: Some(true),
            allow: vec![
                (vec!["node-1".into()], "20000-30000".into()),
                (vec!["*".into()], "29500".into()),
            ],
            extra: String::new(),
        }),
        peer_overlays: vec![("node-1".into(), overlay(1)), ("node-2".into(), overlay(2))],
    };
    let text = config.to_toml();
    let parsed = meshtun_config::parse(&text).unwrap_or_else(|errors| panic!("{errors}\n{text}"));
    let section = parsed.overlay.as_ref().unwrap();
    assert_eq!(section.address, overlay(0));
    assert_eq!(section.prefix.to_string(), PREFIX);
    assert!(section.manage);
    assert_eq!(section.interface, INTERFACE);
    assert_eq!(section.listen, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(section.allow.len(), 2);
    assert_eq!(section.allow[0].ports, 20000..=30000);
    let overlays: Vec<_> = parsed.peers.iter().map(|peer| peer.overlay).collect();
    assert_eq!(overlays, vec![Some(overlay(1)), Some(overlay(2))], "{text}");

    // No allow rules: `allow = []`, which denies everyone.
    let mut deny = config.clone();
    deny.overlay.as_mut().unwrap().allow.clear();
    let parsed = meshtun_config::parse(&deny.to_toml()).unwrap();
    assert!(parsed.overlay.unwrap().allow.is_empty());
}

// ---------------------------------------------------------------------------
// 1. A gloo-like full mesh through the overlay.

/// The lab of a three-node recipe: its nodes at the recipe's addresses,
/// and a fourth host on the same link, `outsider`, that runs no meshtun.
const RECIPE_HOSTS: [&str; 4] = ["node-0", "node-1", "node-2", "outsider"];

/// The torch.distributed recipe (`examples/torch-distributed/`) run as
/// written, with a stand-in for torch: a TCPStore-like store on node-0's
/// `127.0.0.1:29500` (`MASTER_ADDR=127.0.0.1`, carried to the other nodes
/// by forward mode) and a gloo-like full mesh on ports the OS picks on each
/// node's overlay address (`GLOO_SOCKET_IFNAME=meshtun0`, carried by the
/// overlay).
#[test]
fn the_torch_recipe_carries_its_store_and_a_gloo_like_full_mesh() {
    run_mesh_recipe(
        "the_torch_recipe_carries_its_store_and_a_gloo_like_full_mesh",
        [
            "torch-distributed/master.toml",
            "torch-distributed/worker.toml",
            "torch-distributed/worker-2.toml",
        ],
        (Ipv4Addr::LOCALHOST, 29500).into(),
    );
}

/// The MindSpore recipe (`examples/mindspore/`) run as written in its
/// overlay form (its README's 3.2: `--master_addr=100.127.0.1` on every
/// node), with a stand-in for MindSpore's dynamic cluster: every Worker
/// registers its address with a Scheduler on node-0's overlay address,
/// port 8118 (`MS_SCHED_HOST`, `MS_SCHED_PORT`), waits until all have, and
/// then links to every other Worker on the port that Worker's OS picked on
/// its overlay address. All of it is carried by the overlay; node-0's own
/// Workers reach the Scheduler on their host.
#[test]
fn the_mindspore_recipe_carries_scheduler_registration_and_worker_links() {
    run_mesh_recipe(
        "the_mindspore_recipe_carries_scheduler_registration_and_worker_links",
        [
            "mindspore/scheduler.toml",
            "mindspore/worker.toml",
            "mindspore/worker-2.toml",
        ],
        on_overlay(0, 8118),
    );
}

/// Runs the three-node recipe `files` (under `examples/`) as its README
/// says, with a rendezvous store on node-0 at `store_addr` (loopback,
/// carried by forward mode, or node-0's overlay address) and a listener
/// per node on its overlay address, port chosen by the OS. Every
/// node registers with the store, waits for the others, and exchanges 1 MiB
/// each way with each of them, checked by SHA-256. The wire carries only
/// QUIC between the hosts' real addresses, with no plaintext. Then the
/// outsider's route around the tunnel to node-0's listener gets nothing,
/// and node-0's guard counts it.
fn run_mesh_recipe(test: &str, files: [&str; 3], store_addr: SocketAddr) {
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&RECIPE_HOSTS).unwrap();
    let nodes = &lab.hosts()[..3];
    let captures: Vec<Capture> = nodes
        .iter()
        .map(|host| Capture::start(host, &lab.dir, &host.name).unwrap())
        .collect();
    let daemons: Vec<Daemon> = files
        .iter()
        .enumerate()
        .map(|(index, file)| start_recipe_node(&lab, index, file))
        .collect();
    wait_mesh_connected(&daemons, &NAMES);

    // The rendezvous, where the recipe has it.
    let store = Store::start(lab.host(0).listen(store_addr).unwrap());

    // A listener per host on its overlay address, port chosen by the OS.
    let mut servers = Vec::new();
    let mut published = Vec::new();
    for index in 0..3 {
        let listener = lab.host(index).listen(on_overlay(index, 0)).unwrap();
        let local = listener.local_addr().unwrap();
        assert_eq!(local.ip(), overlay(index));
        assert_ne!(local.port(), 0);
        published.push(local);
        servers.push(serve_transfers(listener, index, 2));
    }

    let workers: Vec<JoinHandle<Result<(), String>>> = (0..3)
        .map(|index| {
            let host = lab.host(index).clone();
            let me = published[index];
            thread::spawn(move || mesh_worker(&host, index, me, store_addr))
        })
        .collect();
    let mut failures = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        if let Err(error) = worker.join().unwrap() {
            failures.push(format!("{}: {error}", NAMES[index]));
        }
    }
    for (index, server) in servers.into_iter().enumerate() {
        match server.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failures.push(format!("{} server: {error}", NAMES[index])),
            Err(_) => failures.push(format!("{} server: no report in 60 s", NAMES[index])),
        }
    }
    let store_connections = store.stop();
    assert!(
        failures.is_empty(),
        "mesh failed:\n{}\n{}",
        failures.join("\n"),
        all_logs(&daemons)
    );
    assert_eq!(store_connections, 3, "one store client per host");
    // The wire: only QUIC between the hosts' real addresses. Each host
    // sent 2 MiB to the others and 2 MiB of replies.
    assert_only_quic(nodes, captures, (4 * MIB) as u64);

    // The route around the tunnel, after the captures (its SYNs are not
    // QUIC): nothing answers at node-0's published listener.
    let bait = Echo::start(lab.host(0).listen(on_overlay(0, 0)).unwrap());
    assert_bypass_dropped(lab.host(0), lab.host(3), on_overlay(0, bait.port));
    assert_eq!(bait.stop(), 0, "the outsider reached node-0's service");
}

/// Stops `captures` (one per host of `nodes`, in order) and asserts that
/// the wire held only QUIC between the hosts' real addresses, whole (no
/// frame truncated or missed), with no plaintext marker, and at least
/// `min_out` bytes of QUIC leaving each host.
fn assert_only_quic(nodes: &[Host], captures: Vec<Capture>, min_out: u64) {
    let stopping: Vec<_> = captures
        .into_iter()
        .map(|capture| thread::spawn(move || capture.stop_with_stats()))
        .collect();
    let stopped: Vec<(pcap::Capture, Stats)> = stopping
        .into_iter()
        .map(|handle| handle.join().unwrap().unwrap())
        .collect();
    let addrs: Vec<Ipv4Addr> = nodes.iter().map(|host| host.addr).collect();
    for (host, (capture, stats)) in nodes.iter().zip(&stopped) {
        let wire = Wire::of(capture, &addrs, MARKER, Noise::Counted);
        assert_eq!(capture.truncated, 0, "{}: truncated frames", host.name);
        assert_eq!(
            stats.dropped_by_kernel,
            Some(0),
            "{}: tcpdump missed frames; the capture is not the whole wire",
            host.name
        );
        assert!(
            wire.not_quic.is_empty(),
            "{}: {} IPv4 packets that are not QUIC between lab hosts, e.g. {:?}",
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
        // The data did cross this wire, so the marker's absence means
        // something.
        let out = wire.udp_from(host.addr);
        assert!(
            out >= min_out,
            "{}: only {out} bytes of QUIC left this host",
            host.name
        );
    }
}

/// One host's part of the mesh: publish, wait for everyone, look the others
/// up, and exchange 1 MiB each way with each of them.
fn mesh_worker(host: &Host, index: usize, me: SocketAddr, store: SocketAddr) -> Result<(), String> {
    let mut kv = Kv::connect(host, store).map_err(|error| format!("store {store}: {error}"))?;
    kv.request(&format!("SET {} {me}", host.name), "OK")?;
    kv.request("WAIT 3", "OK")?;
    for (other, name) in NAMES
        .iter()
        .enumerate()
        .filter(|(other, _)| *other != index)
    {
        let reply = kv.call(&format!("GET {name}"))?;
        let addr: SocketAddr = reply
            .strip_prefix("VALUE ")
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| format!("GET {name}: {reply:?}"))?;
        if addr.ip() != overlay(other) {
            return Err(format!(
                "{name} published {addr}, not on its overlay address"
            ));
        }
        transfer(host, index, other, addr)
            .map_err(|error| format!("to {name} at {addr}: {error}"))?;
    }
    Ok(())
}

/// Sends `from`'s 1 MiB for `to` to `addr` and reads back the SHA-256 of
/// what arrived and `to`'s 1 MiB reply; checks both.
fn transfer(host: &Host, from: usize, to: usize, addr: SocketAddr) -> io::Result<()> {
    let data = marked_stream(MARKER, seed(from, to), MIB).0;
    let mut tcp = host.connect(addr).map_err(io::Error::other)??;
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    tcp.write_all(&[u8::try_from(from).unwrap()])?;
    tcp.write_all(&data)?;
    tcp.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply)?;
    if reply.len() != 32 + MIB {
        return Err(io::Error::other(format!(
            "{} bytes of reply, expected {}",
            reply.len(),
            32 + MIB
        )));
    }
    let sent: [u8; 32] = Sha256::digest(&data).into();
    if reply[..32] != sent {
        return Err(io::Error::other("the far side hashed different bytes"));
    }
    if reply[32..] != marked_stream(MARKER, seed(to, from), MIB).0[..] {
        return Err(io::Error::other("the reply differs"));
    }
    Ok(())
}

fn seed(from: usize, to: usize) -> u64 {
    (from * 16 + to + 1) as u64
}

/// The listener of host `index`: accepts `count` connections (within 60 s),
/// each in a thread that reads the sender's index and 1 MiB, answers with
/// the SHA-256 of those bytes and this host's 1 MiB for the sender.
/// Reports whether it served them all.
fn serve_transfers(
    listener: TcpListener,
    index: usize,
    count: usize,
) -> mpsc::Receiver<Result<(), String>> {
    let (report, reported) = mpsc::channel();
    thread::spawn(move || {
        let result = (|| {
            let mut handlers = Vec::new();
            for _ in 0..count {
                let (tcp, _) = accept_within(&listener, Duration::from_secs(60))
                    .map_err(|error| format!("accept: {error}"))?;
                handlers.push(thread::spawn(move || serve_one(tcp, index)));
            }
            for handler in handlers {
                handler
                    .join()
                    .map_err(|_| "handler panicked".to_owned())?
                    .map_err(|error| format!("serving: {error}"))?;
            }
            Ok(())
        })();
        let _ = report.send(result);
    });
    reported
}

fn serve_one(mut tcp: TcpStream, index: usize) -> io::Result<()> {
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    let mut received = Vec::new();
    (&mut tcp).take(2 * MIB as u64).read_to_end(&mut received)?;
    let Some((&from, data)) = received.split_first() else {
        return Err(io::Error::other("nothing received"));
    };
    if data.len() != MIB {
        return Err(io::Error::other(format!("{} bytes received", data.len())));
    }
    let from = usize::from(from);
    let digest: [u8; 32] = Sha256::digest(data).into();
    tcp.write_all(&digest)?;
    tcp.write_all(&marked_stream(MARKER, seed(index, from), MIB).0)?;
    tcp.shutdown(Shutdown::Write)?;
    Ok(())
}

/// A tiny rendezvous store (as torch's TCPStore or gloo's): a thread per
/// connection, lines "SET k v" -> "OK", "GET k" -> "VALUE v" | "NONE",
/// "WAIT n" -> "OK" once n keys are set (or "TIMEOUT" after 30 s).
struct Store {
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

type Entries = Arc<(Mutex<HashMap<String, String>>, Condvar)>;

impl Store {
    fn start(listener: TcpListener) -> Store {
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let entries: Entries = Arc::default();
        let thread = {
            let (stop, connections) = (stop.clone(), connections.clone());
            thread::spawn(move || {
                listener.set_nonblocking(true).unwrap();
                let deadline = Instant::now() + Duration::from_secs(240);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            let entries = entries.clone();
                            thread::spawn(move || {
                                let _ = store_client(tcp, &entries);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Store {
            stop,
            connections,
            thread,
        }
    }

    /// Stops accepting; returns how many connections the store accepted.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.connections.load(Ordering::Relaxed)
    }
}

fn store_client(tcp: TcpStream, entries: &Entries) -> io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    let mut writer = tcp.try_clone()?;
    let (map, changed) = &**entries;
    for line in BufReader::new(tcp).lines() {
        let line = line?;
        let mut words = line.splitn(3, ' ');
        let reply = match (words.next(), words.next(), words.next()) {
            (Some("SET"), Some(key), Some(value)) => {
                map.lock().unwrap().insert(key.to_owned(), value.to_owned());
                changed.notify_all();
                "OK".to_owned()
            }
            (Some("GET"), Some(key), None) => match map.lock().unwrap().get(key) {
                Some(value) => format!("VALUE {value}"),
                None => "NONE".to_owned(),
            },
            (Some("WAIT"), Some(count), None) => {
                let count: usize = count.parse().unwrap_or(usize::MAX);
                let guard = map.lock().unwrap();
                let (guard, _) = changed
                    .wait_timeout_while(guard, SOCKET_TIMEOUT, |map| map.len() < count)
                    .unwrap();
                if guard.len() >= count {
                    "OK".to_owned()
                } else {
                    "TIMEOUT".to_owned()
                }
            }
            _ => format!("ERROR {line:?}"),
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
    Ok(())
}

/// A store client inside a host.
struct Kv {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Kv {
    fn connect(host: &Host, store: SocketAddr) -> io::Result<Kv> {
        let tcp = host.connect(store).map_err(io::Error::other)??;
        tcp.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        tcp.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        Ok(Kv {
            writer: tcp.try_clone()?,
            reader: BufReader::new(tcp),
        })
    }

    fn call(&mut self, line: &str) -> Result<String, String> {
        let mut exchange = || -> io::Result<String> {
            self.writer.write_all(format!("{line}\n").as_bytes())?;
            let mut reply = String::new();
            if self.reader.read_line(&mut reply)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "store closed"));
            }
            Ok(reply.trim_end().to_owned())
        };
        exchange().map_err(|error| format!("{line:?}: {error}"))
    }

    fn request(&mut self, line: &str, expected: &str) -> Result<(), String> {
        let reply = self.call(line)?;
        if reply == expected {
            Ok(())
        } else {
            Err(format!("{line:?}: store answered {reply:?}"))
        }
    }
}

// ---------------------------------------------------------------------------
// 2. A vLLM-shaped pyzmq exchange over the overlay.

/// The four-node vLLM recipe (`examples/vllm-dp-4node/`) run as written,
/// with pyzmq standing in for vLLM: a ROUTER on the head's overlay address
/// and the RPC port (`--data-parallel-address 100.127.0.1
/// --data-parallel-rpc-port 13345`), a DEALER on each headless node; the
/// ROUTER announces a PULL port zmq picked (`bind_to_random_port`), as
/// vLLM's handshake hands out its queues, and the DEALER hosts push
/// messages to it. Then a TCPStore-like store on a port the OS picked on
/// the head's overlay address (as the DP process group's master port is
/// handed out): every headless node registers and reads the others. The
/// wire carries only QUIC. Last, a fifth host's route around the tunnel to
/// the RPC port gets nothing, and the head's guard counts it.
#[test]
fn the_vllm_four_node_recipe_carries_a_vllm_shaped_zmq_exchange() {
    let test = "the_vllm_four_node_recipe_carries_a_vllm_shaped_zmq_exchange";
    if !require_netns_and_pyzmq(test) {
        return;
    }
    let names = ["node-0", "node-1", "node-2", "node-3"];
    let lab = Lab::new(&["node-0", "node-1", "node-2", "node-3", "outsider"]).unwrap();
    let nodes = &lab.hosts()[..4];
    let captures: Vec<Capture> = nodes
        .iter()
        .map(|host| Capture::start(host, &lab.dir, &host.name).unwrap())
        .collect();
    let daemons: Vec<Daemon> = (0..4)
        .map(|index| start_recipe_node(&lab, index, &format!("vllm-dp-4node/node-{index}.toml")))
        .collect();
    wait_mesh_connected(&daemons, &names);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/zmq_overlay.py");
    let address = overlay(0).to_string();
    let port = 13345;
    let messages = "500";

    let mut router = lab.host(0).command("python3");
    router.arg(&script).args([
        "router",
        "--address",
        &address,
        "--port",
        &port.to_string(),
        "--dealers",
        "3",
        "--messages",
        messages,
        "--timeout",
        "60",
    ]);
    let router = Process::spawn(router);
    assert!(wait_listening(lab.host(0), port), "ROUTER did not listen");

    let dealers: Vec<Process> = [1, 2, 3]
        .into_iter()
        .map(|rank| {
            let mut dealer = lab.host(rank).command("python3");
            dealer.arg(&script).args([
                "dealer",
                "--address",
                &address,
                "--port",
                &port.to_string(),
                "--rank",
                &rank.to_string(),
                "--messages",
                messages,
                "--timeout",
                "50",
            ]);
            Process::spawn(dealer)
        })
        .collect();
    let dealer_results: Vec<_> = dealers
        .into_iter()
        .map(|dealer| dealer.finish(Duration::from_secs(70)))
        .collect();
    let (router_status, router_out, router_err) = router.finish(Duration::from_secs(20));
    let mut logs = format!("--- router ---\n{router_out}{router_err}\n");
    for (rank, (_, out, err)) in dealer_results.iter().enumerate() {
        logs.push_str(&format!("--- dealer {} ---\n{out}{err}\n", rank + 1));
    }
    logs.push_str(&all_logs(&daemons));
    for (rank, (status, out, _)) in dealer_results.iter().enumerate() {
        assert!(
            status.is_some_and(|status| status.success()),
            "dealer {} failed ({status:?})\n{logs}",
            rank + 1
        );
        assert!(
            out.contains(&format!(
                "dealer-{} OK messages={messages} pull=tcp://{address}:",
                rank + 1
            )),
            "{logs}"
        );
    }
    assert!(
        router_status.is_some_and(|status| status.success()),
        "ROUTER side failed ({router_status:?})\n{logs}"
    );
    assert!(
        router_out.contains("router OK dealers=3 messages=1500"),
        "{logs}"
    );

    // The DP process group's store, on a port the OS picked.
    let listener = lab.host(0).listen(on_overlay(0, 0)).unwrap();
    let store_addr = listener.local_addr().unwrap();
    let store = Store::start(listener);
    let members: Vec<JoinHandle<Result<(), String>>> = (1..4)
        .map(|index| {
            let host = lab.host(index).clone();
            thread::spawn(move || {
                let mut kv = Kv::connect(&host, store_addr)
                    .map_err(|error| format!("{}: store {store_addr}: {error}", host.name))?;
                kv.request(&format!("SET {} rank-{index}", host.name), "OK")?;
                kv.request("WAIT 3", "OK")?;
                for other in (1..4).filter(|other| *other != index) {
                    let reply = kv.call(&format!("GET node-{other}"))?;
                    if reply != format!("VALUE rank-{other}") {
                        return Err(format!("{}: GET node-{other}: {reply:?}", host.name));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for member in members {
        member
            .join()
            .unwrap()
            .unwrap_or_else(|error| panic!("{error}\n{}", all_logs(&daemons)));
    }
    assert_eq!(store.stop(), 3, "one store client per headless node");
    assert_only_quic(nodes, captures, 16 * 1024);

    let bait = Echo::start(lab.host(0).listen(on_overlay(0, port)).unwrap());
    assert_bypass_dropped(lab.host(0), lab.host(4), on_overlay(0, port));
    assert_eq!(bait.stop(), 0, "the outsider reached the RPC port");
}

// ---------------------------------------------------------------------------
// 3. Refusals.

/// node-0 lets only node-1 reach ports 20000-30000 of its overlay address.
/// node-1 reaching 40000 (where a listener waits) and node-2 reaching 25000
/// are both reset within 5 s, and neither listener ever sees them; so is a
/// connection to an address in the prefix that no peer has.
#[test]
fn the_overlay_resets_ports_and_peers_that_are_not_allowed() {
    let test = "the_overlay_resets_ports_and_peers_that_are_not_allowed";
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&NAMES).unwrap();
    let configs: Vec<NodeConfig> = (0..3)
        .map(|index| {
            if index == 0 {
                overlay_config(&lab, index, &[(&["node-1"], "20000-30000")])
            } else {
                overlay_config(&lab, index, &[(&["*"], ALL_PORTS)])
            }
        })
        .collect();
    let daemons = start_mesh(&lab, &configs);
    let head = lab.host(0);
    let allowed = Echo::start(head.listen(on_overlay(0, 25000)).unwrap());
    let outside = Echo::start(head.listen(on_overlay(0, 40000)).unwrap());

    // Control: node-1 reaches the allowed port.
    let mut tcp = lab.host(1).connect(on_overlay(0, 25000)).unwrap().unwrap();
    tcp.set_read_timeout(Some(SOCKET_TIMEOUT)).unwrap();
    tcp.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    tcp.read_exact(&mut reply)
        .unwrap_or_else(|error| panic!("control: {error}\n{}", all_logs(&daemons)));
    assert_eq!(&reply, b"hello");
    drop(tcp);

    // 100.127.0.9 is inside the prefix but no peer's address.
    let nobody = SocketAddr::new(Ipv4Addr::new(100, 127, 0, 9).into(), 25000);
    let cases = [
        (
            "node-1 to a port outside 20000-30000",
            1,
            on_overlay(0, 40000),
        ),
        (
            "node-2, not allowed, to an allowed port",
            2,
            on_overlay(0, 25000),
        ),
        (
            "node-2, not allowed, to a port outside",
            2,
            on_overlay(0, 40000),
        ),
        ("node-1 to an overlay address no peer has", 1, nobody),
    ];
    for (what, from, target) in cases {
        let started = Instant::now();
        let outcome = reset_outcome(lab.host(from), target);
        let took = started.elapsed();
        assert!(
            outcome.starts_with("reset"),
            "{what}: {outcome}\n{}",
            all_logs(&daemons)
        );
        assert!(
            took < Duration::from_secs(5),
            "{what}: the reset took {took:?}"
        );
    }
    assert_eq!(
        allowed.stop(),
        1,
        "the allowed listener saw only the control connection"
    );
    assert_eq!(
        outside.stop(),
        0,
        "the listener outside the range saw nothing"
    );
}

/// An echo round trip from `host` to `target` through the overlay.
fn echo_works(host: &Host, target: SocketAddr) -> Result<(), String> {
    let exchange = || -> io::Result<()> {
        let mut tcp = host.connect(target).map_err(io::Error::other)??;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.write_all(b"ping")?;
        let mut reply = [0u8; 4];
        tcp.read_exact(&mut reply)?;
        if &reply == b"ping" {
            Ok(())
        } else {
            Err(io::Error::other(format!("echoed {reply:?}")))
        }
    };
    exchange().map_err(|error| format!("{} -> {target}: {error}", host.name))
}

// ---------------------------------------------------------------------------
// 4. Cleanup.

/// With `manage = true`: the interface and table exist while the daemon
/// runs, are gone after SIGTERM, a restart after `kill -9` leaves exactly
/// one of each (the same table as a clean start), and a final stop leaves
/// none.
#[test]
fn a_managed_overlay_is_removed_at_stop_and_replaced_after_a_crash() {
    let test = "a_managed_overlay_is_removed_at_stop_and_replaced_after_a_crash";
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&NAMES).unwrap();
    let head = lab.host(0);
    let configs: Vec<NodeConfig> = (0..3)
        .map(|index| overlay_config(&lab, index, &[(&["*"], ALL_PORTS)]))
        .collect();
    assert_eq!(overlay_state(head), (0, 0), "a fresh host has no overlay");

    // A clean start and stop, with node-1 using the overlay meanwhile.
    let mut head_daemon = lab.start(0, &configs[0]).unwrap();
    let mut other_daemon = lab.start(1, &configs[1]).unwrap();
    wait_connected(&head_daemon, &["node-1"], Duration::from_secs(30));
    wait_connected(&other_daemon, &["node-0"], Duration::from_secs(30));
    assert_eq!(
        overlay_state(head),
        (1, 1),
        "one table and one interface while running"
    );
    let table = nft_table(head).unwrap();
    let addresses = host_output(head, "ip", &["-o", "-4", "addr", "show", "dev", INTERFACE]).1;
    assert_eq!(
        addresses.matches(&format!("inet {}/", overlay(0))).count(),
        1,
        "{INTERFACE} holds node-0's overlay address once:\n{addresses}"
    );
    let rules = rule_count(&table);
    check_echo(&lab, &[&head_daemon, &other_daemon]);

    head_daemon.terminate();
    let status = head_daemon.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|status| status.success()),
        "SIGTERM: {status:?}\n{}",
        head_daemon.log_since_start()
    );
    let (table_check, table_text) = host_output(head, "nft", &["list", "table", "inet", TABLE]);
    assert!(!table_check, "the table outlived SIGTERM:\n{table_text}");
    let (link_check, link_text) = host_output(head, "ip", &["link", "show", INTERFACE]);
    assert!(!link_check, "the interface outlived SIGTERM:\n{link_text}");
    assert_eq!(overlay_state(head), (0, 0));

    // A crash: kill -9 leaves the table and interface behind ...
    let mut crashed = lab.start(0, &configs[0]).unwrap();
    assert_eq!(overlay_state(head), (1, 1));
    crashed.kill();
    // ... and a restart takes them over: exactly one of each, the same
    // rules as a clean start, and the overlay works again.
    let mut restarted = lab.start(0, &configs[0]).unwrap();
    let tables = host_output(head, "nft", &["list", "tables"]).1;
    assert_eq!(
        tables.matches(&format!("table inet {TABLE}")).count(),
        1,
        "`nft list tables` after the restart:\n{tables}"
    );
    assert_eq!(overlay_state(head), (1, 1));
    let again = nft_table(head).unwrap();
    assert_eq!(
        rule_count(&again),
        rules,
        "the restart left a different table:\n--- first ---\n{table}--- now ---\n{again}"
    );
    let addresses = host_output(head, "ip", &["-o", "-4", "addr", "show", "dev", INTERFACE]).1;
    assert_eq!(
        addresses.matches(&format!("inet {}/", overlay(0))).count(),
        1,
        "{addresses}"
    );
    wait_connected(&restarted, &["node-1"], Duration::from_secs(30));
    check_echo(&lab, &[&restarted, &other_daemon]);

    // A final stop leaves nothing, on either host.
    restarted.terminate();
    other_daemon.terminate();
    assert!(restarted
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|status| status.success()));
    assert!(other_daemon
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|status| status.success()));
    assert_eq!(overlay_state(head), (0, 0), "node-0 after the final stop");
    assert_eq!(
        overlay_state(lab.host(1)),
        (0, 0),
        "node-1 after the final stop"
    );
}

/// With `manage = false` (the default), `meshtun overlay up` sets the host
/// up (idempotently), the daemon carries connections without touching the
/// set-up, leaves it in place when it stops, and `meshtun overlay down`
/// removes it (also idempotently).
#[test]
fn meshtun_overlay_up_and_down_set_up_an_unmanaged_overlay() {
    let test = "meshtun_overlay_up_and_down_set_up_an_unmanaged_overlay";
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&NAMES).unwrap();
    let configs: Vec<NodeConfig> = (0..2)
        .map(|index| {
            let mut config = overlay_config(&lab, index, &[(&["*"], ALL_PORTS)]);
            config.overlay.as_mut().unwrap().manage = None;
            config
        })
        .collect();
    let overlay_command = |index: usize, verb: &str| -> (bool, String) {
        let path = lab.dir.join(format!("{}-overlay.toml", NAMES[index]));
        std::fs::write(&path, configs[index].to_toml()).unwrap();
        let path = path.display().to_string();
        host_output(
            lab.host(index),
            &lab.binary().display().to_string(),
            &["overlay", verb, "-c", &path],
        )
    };
    for (index, name) in NAMES.iter().enumerate().take(2) {
        for round in 0..2 {
            let (ok, text) = overlay_command(index, "up");
            assert!(ok, "overlay up (round {round}) on {name}:\n{text}");
            assert_eq!(overlay_state(lab.host(index)), (1, 1), "{name}");
        }
    }
    let mut daemons: Vec<Daemon> = configs
        .iter()
        .enumerate()
        .map(|(index, config)| lab.start(index, config).unwrap())
        .collect();
    wait_connected(&daemons[0], &["node-1"], Duration::from_secs(30));
    wait_connected(&daemons[1], &["node-0"], Duration::from_secs(30));
    check_echo(&lab, &[&daemons[0], &daemons[1]]);

    for daemon in &mut daemons {
        daemon.terminate();
        assert!(daemon
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|status| status.success()));
    }
    for (index, name) in NAMES.iter().enumerate().take(2) {
        assert_eq!(
            overlay_state(lab.host(index)),
            (1, 1),
            "an unmanaged set-up outlives the daemon on {name}"
        );
        for round in 0..2 {
            let (ok, text) = overlay_command(index, "down");
            assert!(ok, "overlay down (round {round}) on {name}:\n{text}");
            assert_eq!(overlay_state(lab.host(index)), (0, 0), "{name}");
        }
    }
}

/// An echo service on node-0's overlay address, reached from node-1 (retried
/// for up to 30 s while node-1's dialer, which may be backing off for up to
/// `reconnect_max` = 10 s, comes back to a restarted node-0).
fn check_echo(lab: &Lab, daemons: &[&Daemon]) {
    let echo = Echo::start(lab.host(0).listen(on_overlay(0, 0)).unwrap());
    let target = on_overlay(0, echo.port);
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        match echo_works(lab.host(1), target) {
            Ok(()) => true,
            Err(error) => {
                last = error;
                thread::sleep(Duration::from_millis(200));
                false
            }
        }
    });
    let logs: Vec<String> = daemons
        .iter()
        .map(|daemon| format!("--- {} ---\n{}", daemon.host(), daemon.log_since_start()))
        .collect();
    assert!(
        ok,
        "the overlay did not carry an echo: {last}\n{}",
        logs.join("\n")
    );
    echo.stop();
}

/// (tables named [`TABLE`], interfaces named [`INTERFACE`]) in `host`.
fn overlay_state(host: &Host) -> (usize, usize) {
    let tables = host_output(host, "nft", &["list", "tables"]).1;
    let tables = tables
        .lines()
        .filter(|line| line.trim() == format!("table inet {TABLE}"))
        .count();
    let links = host_output(host, "ip", &["-o", "link", "show"]).1;
    let links = links
        .lines()
        .filter(|line| {
            line.split(':')
                .nth(1)
                .is_some_and(|name| name.trim().split('@').next() == Some(INTERFACE))
        })
        .count();
    (tables, links)
}

fn nft_table(host: &Host) -> Option<String> {
    let (ok, text) = host_output(host, "nft", &["list", "table", "inet", TABLE]);
    ok.then_some(text)
}

/// Rule lines in `nft list table` output (lines inside a chain that are
/// not the chain's `type ... hook ...` line or braces).
fn rule_count(table: &str) -> usize {
    table
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line.starts_with("table ")
                && !line.starts_with("chain ")
                && !line.starts_with("type ")
                && !line.starts_with("set ")
                && !line.starts_with("elements ")
                && !line.starts_with("flags ")
                && !line.starts_with("policy ")
                && *line != "}"
        })
        .count()
}

/// Runs `program args` inside `host`: (success, stdout + stderr).
fn host_output(host: &Host, program: &str, args: &[&str]) -> (bool, String) {
    let output = host
        .command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

// ---------------------------------------------------------------------------
// 5. The guard: no way around the tunnel.

/// node-0's admin endpoint, inside its namespace.
const ADMIN: &str = "127.0.0.1:9464";

/// The attack the guard exists for: a host on the same link that runs no
/// meshtun routes node-0's overlay address at node-0's underlay address and
/// connects to a service bound there. With the guard on (the default) the
/// connection gets nowhere, the service never sees it, the drop is counted
/// in `/metrics`, `/status` and nftables, and connections carried by
/// meshtun still arrive. With `overlay.guard = false` the same attempt
/// reaches the service in plain text: the control showing the attack is
/// real in this lab, and that the first half can fail.
#[test]
fn the_guard_drops_and_counts_a_route_around_the_tunnel() {
    let test = "the_guard_drops_and_counts_a_route_around_the_tunnel";
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&["node-0", "node-1", "outsider"]).unwrap();
    let (head, member, outsider) = (lab.host(0), lab.host(1), lab.host(2));
    let head_config = |guard: bool| {
        let mut config = lab
            .config(0)
            .overlay(overlay(0), PREFIX)
            .overlay_manage(true)
            .overlay_allow(&["node-1"], ALL_PORTS)
            .overlay_peer(member, overlay(1));
        if !guard {
            config = config.overlay_lines("guard = false");
        }
        config
            .extra
            .push_str(&format!("\n[admin]\nlisten = \"{ADMIN}\"\n"));
        config
    };
    let member_config = lab
        .config(1)
        .overlay(overlay(1), PREFIX)
        .overlay_manage(true)
        .overlay_allow(&["node-0"], ALL_PORTS)
        .overlay_peer(head, overlay(0));
    let target = on_overlay(0, STORE_PORT);
    // The outsider's route around the tunnel.
    let via = head.addr.to_string();
    let (ok, text) = host_output(
        outsider,
        "ip",
        &["route", "add", &format!("{}/32", overlay(0)), "via", &via],
    );
    assert!(ok, "ip route add: {text}");

    // --- The guard on (the default).
    let mut daemon = lab.start(0, &head_config(true)).unwrap();
    let member_daemon = lab.start(1, &member_config).unwrap();
    wait_connected(&daemon, &["node-1"], Duration::from_secs(30));
    wait_connected(&member_daemon, &["node-0"], Duration::from_secs(30));
    let daemons = || all_logs([&daemon, &member_daemon]);
    let echo = Echo::start(head.listen(target).unwrap());

    let bypass = outsider.connect(target).unwrap();
    assert!(
        bypass.is_err(),
        "the outsider connected around the tunnel with the guard on\n{}",
        daemons()
    );
    // A carried connection still arrives: node-1 through the overlay.
    echo_works(member, target).unwrap_or_else(|error| panic!("{error}\n{}", daemons()));

    // Counted by nftables, and by the daemon (which reads it every 10 s).
    let (ok, listed) = host_output(
        head,
        "nft",
        &["list", "counter", "inet", TABLE, "bypass_dropped"],
    );
    assert!(ok, "{listed}");
    let packets = listed
        .split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|count| count.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no packet count in {listed}"));
    assert!(packets >= 1, "{listed}");
    let mut exported = None;
    let seen = wait_until(Duration::from_secs(25), || {
        exported = admin_get(head, "/metrics").ok().and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("meshtun_overlay_bypass_dropped_total "))
                .and_then(|value| value.trim().parse::<u64>().ok())
        });
        exported.is_some_and(|value| value >= 1)
    });
    assert!(
        seen,
        "/metrics: meshtun_overlay_bypass_dropped_total {exported:?}\n{}",
        daemons()
    );
    let status = admin_get(head, "/status").unwrap();
    let status: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap();
    assert_eq!(status["overlay"]["guard"], true, "{status}");
    assert!(
        status["overlay"]["bypass_dropped"]
            .as_u64()
            .is_some_and(|value| value >= 1),
        "{status}"
    );
    assert_eq!(
        echo.stop(),
        1,
        "the service saw only the carried connection"
    );

    // --- The guard off: the same attempt reaches the service.
    daemon.terminate();
    assert!(
        daemon.wait_exit(Duration::from_secs(15)).is_some(),
        "node-0 did not stop"
    );
    let daemon = lab.start(0, &head_config(false)).unwrap();
    wait_connected(&daemon, &["node-1"], Duration::from_secs(30));
    let log = daemon.log_since_start();
    assert!(
        log.contains("overlay.guard = false"),
        "no warning at start:\n{log}"
    );
    let (_, table) = host_output(head, "nft", &["list", "table", "inet", TABLE]);
    assert!(
        !table.contains("drop"),
        "the guard is still loaded:\n{table}"
    );
    let echo = Echo::start(head.listen(target).unwrap());
    echo_works(outsider, target).unwrap_or_else(|error| {
        panic!("control: without the guard the outsider should reach {target}: {error}")
    });
    assert_eq!(
        echo.stop(),
        1,
        "the outsider reached the service around the tunnel"
    );
    drop(member_daemon);
}

/// A GET to node-0's admin endpoint from inside `host`: the whole response.
fn admin_get(host: &Host, path: &str) -> io::Result<String> {
    let mut tcp = host
        .connect(ADMIN.parse().expect("a socket address"))
        .map_err(io::Error::other)??;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: meshtun\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    Ok(response)
}

/// `[guard]` on a forward-mode node with no overlay: a service that listens
/// on every interface (as torch's TCPStore does) is reachable from another
/// host directly until `meshtun overlay up` loads the port guard (the
/// control); then the direct connection gets nothing and is counted, in
/// nftables and in the daemon's `/status`, while the same service still
/// answers through meshtun's forward. `meshtun overlay down` removes the
/// table again, even once `[guard]` is gone from the config (as after an
/// operator took it out and the unit's stop hook ran).
#[test]
fn the_port_guard_keeps_a_service_on_every_interface_for_meshtun() {
    let test = "the_port_guard_keeps_a_service_on_every_interface_for_meshtun";
    if !require_netns(test) {
        return;
    }
    let lab = Lab::new(&["node-0", "node-1"]).unwrap();
    let (head, member) = (lab.host(0), lab.host(1));
    let port = STORE_PORT;
    let echo = Echo::start(head.listen((Ipv4Addr::UNSPECIFIED, port).into()).unwrap());
    let local: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let mut head_config = lab.config(0).expose("store", local, &["node-1"]);
    head_config.extra.push_str(&format!(
        "\n[guard]\nports = [{port}]\n\n[admin]\nlisten = \"{ADMIN}\"\n"
    ));
    let config_path = lab.dir.join("node-0-guard.toml");
    std::fs::write(&config_path, head_config.to_toml()).unwrap();
    let overlay_command = |action: &str| {
        let output = head
            .command(lab.binary())
            .args(["overlay", action, "-c"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "meshtun overlay {action}: {text}");
        text
    };
    let direct: SocketAddr = (head.addr, port).into();

    // The control: without the guard, the service answers from off the node.
    echo_works(member, direct).unwrap_or_else(|error| panic!("control: {error}"));

    let said = overlay_command("up");
    assert!(
        said.contains(&format!(
            "port guard: new TCP and UDP connections to ports {port}"
        )),
        "{said}"
    );
    let daemon = lab.start(0, &head_config).unwrap();
    let member_daemon = lab
        .start(
            1,
            &lab.config(1).peer(head).forward(local, "node-0", "store"),
        )
        .unwrap();
    wait_connected(&member_daemon, &["node-0"], Duration::from_secs(30));
    let logs = || all_logs([&daemon, &member_daemon]);

    let attempt = member.connect(direct).unwrap();
    assert!(
        attempt.is_err(),
        "connected to {direct} around meshtun\n{}",
        logs()
    );
    echo_works(member, local)
        .unwrap_or_else(|error| panic!("through meshtun: {error}\n{}", logs()));

    let (ok, listed) = host_output(
        head,
        "nft",
        &["list", "counter", "inet", TABLE, "bypass_dropped"],
    );
    assert!(ok && !listed.contains("packets 0 "), "{listed}");
    let mut seen = None;
    let counted = wait_until(Duration::from_secs(25), || {
        seen = admin_get(head, "/status").ok().and_then(|response| {
            let body = response.split("\r\n\r\n").nth(1)?.to_owned();
            let status: serde_json::Value = serde_json::from_str(&body).ok()?;
            status["guard"]["bypass_dropped"].as_u64()
        });
        seen.is_some_and(|dropped| dropped >= 1)
    });
    assert!(
        counted,
        "/status guard.bypass_dropped: {seen:?}\n{}",
        logs()
    );

    drop(member_daemon);
    daemon.terminate();
    let without_guard = lab.config(0).expose("store", local, &["node-1"]);
    std::fs::write(&config_path, without_guard.to_toml()).unwrap();
    overlay_command("down");
    assert!(
        nft_table(head).is_none(),
        "the table is still there after overlay down"
    );
    echo_works(member, direct).unwrap_or_else(|error| panic!("after overlay down: {error}"));
    assert!(
        echo.stop() >= 3,
        "the service saw the control, the carried and the last connection"
    );
}
