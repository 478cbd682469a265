//! A cluster manifest that changes under running daemons: three namespace
//! hosts driven by one `cluster.toml`. While a transfer between node-0 and
//! node-1 runs, the manifest gains node-2 with a service, loses it again
//! and gains it back; each node reloads by itself (it watches the
//! manifest), the forwards to node-2 come and go, a client of node-2's
//! service that stays connected through the removal keeps working until it
//! hangs up (only then is its connection closed, with code 7), and the
//! transfer finishes with every byte checked.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use meshtun_lab::{require_netns, Daemon, Lab};
use sha2::{Digest, Sha256};

mod lab_support;

use lab_support::{wait_until, Echo};

/// Where node-1's bulk service listens, and where node-0 forwards it.
const BULK_TARGET: &str = "127.0.0.1:7001";
const BULK_LISTEN: &str = "127.0.0.1:17001";
/// Where node-2's service listens, and where the others forward it.
const EXTRA_TARGET: &str = "127.0.0.1:7002";
const EXTRA_LISTEN: &str = "127.0.0.1:17002";
/// The longest the transfer may run, whatever happens.
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);
/// The most the transfer sends.
const TRANSFER_MAX_BYTES: u64 = 2 << 30;
/// How long a reload, the dials it starts and a listener's close may take.
const SETTLE: Duration = Duration::from_secs(15);

/// The manifest: node-0 and node-1 with node-1's bulk service, and with
/// `with_node_2` also node-2 and its service, which everyone may use.
fn manifest(lab: &Lab, with_node_2: bool) -> String {
    let mut text = String::from("cluster = \"lab\"\n");
    let nodes = if with_node_2 { 3 } else { 2 };
    for host in &lab.hosts()[..nodes] {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{}\"\naddr = \"{}\"\n",
            host.name,
            host.quic_addr()
        ));
    }
    text.push_str(&format!(
        "\n[[service]]\nname = \"bulk\"\nnode = \"node-1\"\ntarget = \"{BULK_TARGET}\"\n\
         listen = \"{BULK_LISTEN}\"\nallow = [\"node-0\"]\n"
    ));
    if with_node_2 {
        text.push_str(&format!(
            "\n[[service]]\nname = \"extra\"\nnode = \"node-2\"\ntarget = \"{EXTRA_TARGET}\"\n\
             listen = \"{EXTRA_LISTEN}\"\nallow = [\"*\"]\n"
        ));
    }
    text
}

/// Replaces the manifest in one step (a rename), as a deployment tool
/// should, so no daemon reads half a file.
fn write_manifest(lab: &Lab, text: &str) {
    let path = lab.dir.join("cluster.toml");
    let temporary = lab.dir.join("cluster.toml.new");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, &path).unwrap();
}

/// Node `index`'s config: its own settings, everything else from the
/// manifest next to it.
fn node_config(lab: &Lab, index: usize) -> String {
    let config = lab.config(index);
    format!(
        "node = \"{}\"\ncluster = \"cluster.toml\"\n\n[quic]\nlisten = \"{}\"\n\
         reconnect_max = \"1s\"\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        config.node,
        config.quic_listen,
        config.ca.display().to_string(),
        config.cert.display().to_string(),
        config.key.display().to_string(),
    )
}

/// How many lines `daemon` has logged that hold every one of `parts`.
fn count_logged(daemon: &Daemon, parts: &[&str]) -> usize {
    daemon
        .log_since_start()
        .lines()
        .filter(|line| parts.iter().all(|part| line.contains(part)))
        .count()
}

/// Waits until `daemon` has logged `count` lines that hold every one of
/// `parts`.
fn wait_logged_times(daemon: &Daemon, parts: &[&str], count: usize) {
    let done = wait_until(SETTLE, || count_logged(daemon, parts) >= count);
    assert!(
        done,
        "{} did not log {count} lines with {parts:?}:\n{}",
        daemon.host(),
        daemon.log_since_start()
    );
}

/// Waits until `daemon` has logged a line that holds every one of `parts`.
fn wait_logged(daemon: &Daemon, parts: &[&str]) {
    wait_logged_times(daemon, parts, 1);
}

/// Sends `message` on `tcp` and checks that it comes back.
fn echo_on(tcp: &mut TcpStream, message: &[u8]) {
    tcp.write_all(message).unwrap();
    let mut reply = vec![0u8; message.len()];
    tcp.read_exact(&mut reply).unwrap();
    assert_eq!(reply, message);
}

/// One echo through `addr` from inside host `index`, retried until it
/// works or [`SETTLE`] passes.
fn echo_through(lab: &Lab, index: usize, addr: SocketAddr) {
    let host = lab.host(index);
    let mut last = String::new();
    let done = wait_until(SETTLE, || {
        let attempt = || -> io::Result<()> {
            let mut tcp = host.connect(addr).unwrap()?;
            tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
            tcp.write_all(b"through node-2")?;
            let mut reply = [0u8; 14];
            tcp.read_exact(&mut reply)?;
            if &reply != b"through node-2" {
                return Err(io::Error::other(format!("echoed {reply:?}")));
            }
            Ok(())
        };
        match attempt() {
            Ok(()) => true,
            Err(error) => {
                last = error.to_string();
                false
            }
        }
    });
    assert!(done, "{} could not echo through {addr}: {last}", host.name);
}

/// Waits until connecting to `addr` from inside host `index` is refused
/// (nothing listens there any more).
fn wait_refused(lab: &Lab, index: usize, addr: SocketAddr) {
    let host = lab.host(index);
    let mut last = String::new();
    let refused = wait_until(SETTLE, || match host.connect(addr).unwrap() {
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => true,
        other => {
            last = format!("{other:?}");
            false
        }
    });
    assert!(refused, "{}: {addr} still answers: {last}", host.name);
}

/// A transfer through node-0's forward of the bulk service: one thread
/// writes a seeded pseudo-random stream until told to stop, another reads
/// the echo; both hash what they saw.
struct Transfer {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    writer: JoinHandle<io::Result<(u64, [u8; 32])>>,
    reader: JoinHandle<io::Result<(u64, [u8; 32])>>,
}

impl Transfer {
    fn start(tcp: TcpStream) -> Transfer {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let mut sending = tcp.try_clone().unwrap();
        let mut receiving = tcp;
        receiving
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        sending
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = {
            let stop = stop.clone();
            thread::spawn(move || {
                let started = Instant::now();
                let mut hash = Sha256::new();
                let mut state = 0x9e37_79b9_7f4a_7c15u64;
                let mut chunk = vec![0u8; 16 * 1024];
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < TRANSFER_LIMIT
                    && sent < TRANSFER_MAX_BYTES
                {
                    for word in chunk.chunks_mut(8) {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        word.copy_from_slice(&state.to_le_bytes());
                    }
                    sending.write_all(&chunk)?;
                    hash.update(&chunk);
                    sent += chunk.len() as u64;
                    // About 16 MiB/s: steady traffic that leaves the
                    // machine's two cores to the daemons' reloads.
                    thread::sleep(Duration::from_millis(1));
                }
                sending.shutdown(Shutdown::Write)?;
                Ok((sent, hash.finalize().into()))
            })
        };
        let reader = {
            let echoed = echoed.clone();
            thread::spawn(move || {
                let mut hash = Sha256::new();
                let mut buffer = vec![0u8; 64 * 1024];
                let mut received = 0u64;
                loop {
                    let read = receiving.read(&mut buffer)?;
                    if read == 0 {
                        return Ok((received, hash.finalize().into()));
                    }
                    hash.update(&buffer[..read]);
                    received += read as u64;
                    echoed.store(received, Ordering::Relaxed);
                }
            })
        };
        Transfer {
            stop,
            echoed,
            writer,
            reader,
        }
    }

    /// Bytes echoed so far.
    fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Waits until the echo has grown past what it is now.
    fn assert_flowing(&self, when: &str) {
        let before = self.echoed();
        assert!(
            wait_until(Duration::from_secs(10), || self.echoed() > before),
            "the transfer stalled {when} at {before} bytes"
        );
    }

    /// Stops sending, waits for the rest of the echo; returns the bytes.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, sent_hash) = self.writer.join().unwrap().expect("the transfer's writes");
        let (received, received_hash) = self.reader.join().unwrap().expect("the transfer's reads");
        assert_eq!(received, sent, "bytes echoed against bytes sent");
        assert_eq!(received_hash, sent_hash, "SHA-256 of the echo");
        sent
    }
}

#[test]
fn a_manifest_change_adds_and_removes_a_node_without_touching_a_running_transfer() {
    if !require_netns(
        "a_manifest_change_adds_and_removes_a_node_without_touching_a_running_transfer",
    ) {
        return;
    }
    let lab = Lab::new(&["node-0", "node-1", "node-2"]).unwrap();
    let bulk_listen: SocketAddr = BULK_LISTEN.parse().unwrap();
    let extra_listen: SocketAddr = EXTRA_LISTEN.parse().unwrap();
    let bulk = Echo::start(lab.host(1).listen(BULK_TARGET.parse().unwrap()).unwrap());
    let extra = Echo::start(lab.host(2).listen(EXTRA_TARGET.parse().unwrap()).unwrap());

    // Two nodes, and the transfer between them.
    write_manifest(&lab, &manifest(&lab, false));
    let node_1 = lab.start_toml(1, &node_config(&lab, 1)).unwrap();
    let node_0 = lab.start_toml(0, &node_config(&lab, 0)).unwrap();
    lab_support::wait_connected(&node_0, &["node-1"], SETTLE);
    let mut tcp = None;
    wait_until(SETTLE, || {
        tcp = lab.host(0).connect(bulk_listen).unwrap().ok();
        tcp.is_some()
    });
    let transfer = Transfer::start(tcp.expect("a connection to node-0's bulk forward"));
    transfer.assert_flowing("at the start");
    // Nothing listens where node-2's service will be forwarded.
    wait_refused(&lab, 0, extra_listen);

    // The manifest gains node-2 and its service: node-2 starts with it,
    // node-0 and node-1 reload by themselves, dial node-2 and forward its
    // service.
    write_manifest(&lab, &manifest(&lab, true));
    let node_2 = lab.start_toml(2, &node_config(&lab, 2)).unwrap();
    for node in [&node_0, &node_1] {
        wait_logged(node, &["peer added", "peer=node-2"]);
        wait_logged(node, &["forwarding", &format!("listen={EXTRA_LISTEN}")]);
    }
    lab_support::wait_connected(&node_0, &["node-2"], SETTLE);
    echo_through(&lab, 0, extra_listen);
    echo_through(&lab, 1, extra_listen);
    transfer.assert_flowing("after node-2 joined");

    // A client of node-2's service that stays connected while node-2
    // leaves the manifest.
    let mut held = lab.host(0).connect(extra_listen).unwrap().unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    echo_on(&mut held, b"before the removal");

    // node-2 leaves the manifest: the others drop its forwards and stop
    // dialling it. (node-2's own reload fails: it is not in the manifest
    // any more, so it keeps running on what it had.)
    write_manifest(&lab, &manifest(&lab, false));
    for node in [&node_0, &node_1] {
        wait_logged(node, &["peer removed", "peer=node-2"]);
        wait_logged(
            node,
            &["forward removed", &format!("listen={EXTRA_LISTEN}")],
        );
    }
    wait_refused(&lab, 0, extra_listen);
    wait_refused(&lab, 1, extra_listen);
    transfer.assert_flowing("after node-2 left");
    // node-2, no longer in the manifest, refused the change and said why.
    wait_logged(
        &node_2,
        &[
            "reload failed",
            "node-2",
            "is not a [[node]] of the cluster manifest",
        ],
    );
    // The connections dialled to node-2 close with the "removed" code
    // once the streams on them are done: node-1's at once (it carries
    // none), node-0's but the one that carries the held client.
    let removed = |host: usize| {
        let remote = format!("remote={}:", lab.host(host).addr);
        count_logged(
            &node_2,
            &[&remote, "peer removed from the configuration (code 7)"],
        )
    };
    let shards_0 = lab_support::shards_in_log(&node_0.log_since_start()).unwrap();
    let shards_1 = lab_support::shards_in_log(&node_1.log_since_start()).unwrap();
    assert!(
        wait_until(SETTLE, || removed(1) == shards_1),
        "node-1's connections to node-2:\n{}",
        node_2.log_since_start()
    );
    assert!(
        wait_until(SETTLE, || removed(0) == shards_0 - 1),
        "node-0's idle connections to node-2:\n{}",
        node_2.log_since_start()
    );
    // Well past the 2 s a connection no longer needed is left alone, the
    // held client still works, and its connection is still there.
    thread::sleep(Duration::from_secs(3));
    echo_on(&mut held, b"after the removal");
    assert_eq!(removed(0), shards_0 - 1, "{}", node_2.log_since_start());
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(held);
    assert!(
        wait_until(SETTLE, || removed(0) == shards_0),
        "node-0's last connection to node-2:\n{}",
        node_2.log_since_start()
    );

    // node-2 comes back: dialled and forwarded again.
    write_manifest(&lab, &manifest(&lab, true));
    for node in [&node_0, &node_1] {
        wait_logged_times(node, &["peer added", "peer=node-2"], 2);
    }
    echo_through(&lab, 0, extra_listen);
    echo_through(&lab, 1, extra_listen);
    transfer.assert_flowing("after node-2 came back");

    let carried = transfer.finish();
    assert!(
        carried >= 16 << 20,
        "the transfer carried only {carried} bytes"
    );
    // node-0 never lost or replaced its connections to node-1: one
    // "peer connected" per shard, at the start.
    let log_0 = node_0.log_since_start();
    let shards = lab_support::shards_in_log(&log_0).expect("node-0's shard count");
    let dials = log_0
        .lines()
        .filter(|line| {
            line.contains("peer{peer=node-1 ") && line.contains("peer connected remote=")
        })
        .count();
    assert_eq!(dials, shards, "node-0 redialled node-1:\n{log_0}");
    for node in [&node_0, &node_1] {
        let log = node.log_since_start();
        assert_eq!(
            log.matches("reload failed").count(),
            0,
            "{}: a reload failed:\n{log}",
            node.host()
        );
    }
    assert!(extra.stop() >= 2, "node-2's service saw both echoes");
    assert!(bulk.stop() >= 1);
}
