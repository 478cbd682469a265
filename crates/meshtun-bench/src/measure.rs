//! The bench's own load tools: the echo service on host B, TCP ping-pong,
//! connection rate, idle connections, iperf3 runs, and memory readings of
//! process trees. Every loop is bounded in count and in time.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshtun_lab::Host;

/// The most samples one ping-pong run keeps (a bound on memory and time).
const MAX_SAMPLES: usize = 2_000_000;
/// Read/write timeout of every bench socket.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the echo service on `listener` (a listener made inside host B):
/// every connection gets back what it sends, until it closes. Runs on
/// `runtime` until the runtime is dropped.
pub(crate) fn start_echo(
    runtime: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
) -> Result<(), String> {
    listener
        .set_nonblocking(true)
        .map_err(|error| format!("echo listener: {error}"))?;
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|error| format!("echo listener: {error}"))?;
    runtime.spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                // Out of descriptors, say: back off briefly, keep serving.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = tcp.set_nodelay(true);
                let mut buffer = vec![0u8; 16 * 1024];
                loop {
                    match tcp.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tcp.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(tcp)
}

/// One connection, one byte there and back: proof that a path works end to
/// end (a forwarder accepts before it has reached the far side).
pub(crate) fn round_trip(host: &Host, addr: SocketAddr) -> Result<(), String> {
    host.run(move || -> std::io::Result<()> {
        let mut tcp = connect(addr)?;
        tcp.write_all(b"x")?;
        let mut reply = [0u8; 1];
        tcp.read_exact(&mut reply)
    })
    .map_err(|error| error.to_string())?
    .map_err(|error| format!("round trip to {addr}: {error}"))
}

/// TCP ping-pong from `host` to the echo service at `addr`: `size`-byte
/// messages, one in flight, for `duration`. Returns each round trip in
/// nanoseconds (after 50 warm-up round trips that are not counted).
pub(crate) fn ping_pong(
    host: &Host,
    addr: SocketAddr,
    size: usize,
    duration: Duration,
) -> Result<Vec<u64>, String> {
    host.run(move || -> std::io::Result<Vec<u64>> {
        let mut tcp = connect(addr)?;
        let message = vec![0x5au8; size];
        let mut reply = vec![0u8; size];
        for _ in 0..50 {
            tcp.write_all(&message)?;
            tcp.read_exact(&mut reply)?;
        }
        let mut samples = Vec::with_capacity(100_000);
        let deadline = Instant::now() + duration;
        while samples.len() < MAX_SAMPLES {
            let start = Instant::now();
            if start >= deadline {
                break;
            }
            tcp.write_all(&message)?;
            tcp.read_exact(&mut reply)?;
            samples.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        Ok(samples)
    })
    .map_err(|error| error.to_string())?
    .map_err(|error| format!("ping-pong to {addr}: {error}"))
}

/// The share `q` (0..=1) of sorted `samples`, nearest rank.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// What a connection-rate run did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectRate {
    /// Completed connect, 1-byte request, 1-byte response, close.
    pub(crate) completed: u64,
    /// Attempts that failed.
    pub(crate) failed: u64,
    /// How long the run took.
    pub(crate) elapsed: Duration,
}

/// `workers` threads inside `host`, each opening connections to `addr` one
/// after another for `duration`: connect, 1-byte request, 1-byte response,
/// close.
pub(crate) fn connect_rate(
    host: &Host,
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
) -> Result<ConnectRate, String> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let host = host.clone();
            std::thread::spawn(move || {
                host.run(move || {
                    let (mut completed, mut failed) = (0u64, 0u64);
                    while Instant::now() < deadline {
                        let attempt = (|| -> std::io::Result<()> {
                            let mut tcp = connect(addr)?;
                            tcp.write_all(b"r")?;
                            let mut reply = [0u8; 1];
                            tcp.read_exact(&mut reply)
                        })();
                        match attempt {
                            Ok(()) => completed += 1,
                            Err(_) => {
                                failed += 1;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    (completed, failed)
                })
            })
        })
        .collect();
    let mut rate = ConnectRate {
        completed: 0,
        failed: 0,
        elapsed: Duration::ZERO,
    };
    for handle in handles {
        let (completed, failed) = handle
            .join()
            .map_err(|_| "connect-rate worker panicked".to_owned())?
            .map_err(|error| error.to_string())?;
        rate.completed += completed;
        rate.failed += failed;
    }
    rate.elapsed = start.elapsed();
    Ok(rate)
}

/// Opens up to `count` connections from `host` to `addr`, each proven with
/// a 1-byte round trip, with 8 workers, giving up at `deadline`. Returns the
/// open connections and the last error, if any.
pub(crate) fn open_idle(
    host: &Host,
    addr: SocketAddr,
    count: usize,
    deadline: Instant,
) -> (Vec<TcpStream>, Option<String>) {
    let workers = 8.min(count.max(1));
    let handles: Vec<_> = (0..workers)
        .map(|worker| {
            let host = host.clone();
            let share = count / workers + usize::from(worker < count % workers);
            std::thread::spawn(move || {
                host.run(move || {
                    let mut open = Vec::with_capacity(share);
                    let mut last_error = None;
                    let mut failures = 0;
                    while open.len() < share && Instant::now() < deadline && failures < 50 {
                        let attempt = (|| -> std::io::Result<TcpStream> {
                            let mut tcp = connect(addr)?;
                            tcp.write_all(b"i")?;
                            let mut reply = [0u8; 1];
                            tcp.read_exact(&mut reply)?;
                            Ok(tcp)
                        })();
                        match attempt {
                            Ok(tcp) => open.push(tcp),
                            Err(error) => {
                                failures += 1;
                                last_error = Some(error.to_string());
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    (open, last_error)
                })
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    let mut error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((open, last_error))) => {
                all.extend(open);
                if last_error.is_some() {
                    error = last_error;
                }
            }
            Ok(Err(lab_error)) => error = Some(lab_error.to_string()),
            Err(_) => error = Some("idle-connection worker panicked".to_owned()),
        }
    }
    (all, error)
}

/// What one iperf3 run carried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    /// The receiver's rate.
    pub gbit_per_second: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
}

/// Runs `iperf3 -c` inside `host` against `addr` and returns what the
/// receiver got. `reverse` is `-R` (the server sends).
pub(crate) fn iperf3(
    host: &Host,
    addr: SocketAddr,
    streams: u32,
    seconds: u32,
    reverse: bool,
) -> Result<Transfer, String> {
    let mut command = host.command("iperf3");
    command
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
        .args(["-J", "--connect-timeout", "5000"]);
    if reverse {
        command.arg("-R");
    }
    let output = run_bounded(&mut command, Duration::from_secs(u64::from(seconds) + 20))?;
    let json: serde_json::Value = serde_json::from_str(&output)
        .map_err(|error| format!("iperf3 printed no JSON ({error}): {output:.200}"))?;
    if let Some(error) = json.get("error").and_then(serde_json::Value::as_str) {
        return Err(format!("iperf3: {error}"));
    }
    let bits = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| "iperf3 JSON has no end.sum_received.bits_per_second".to_owned())?;
    let bytes = json
        .pointer("/end/sum_received/bytes")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| "iperf3 JSON has no end.sum_received.bytes".to_owned())?;
    Ok(Transfer {
        gbit_per_second: bits / 1e9,
        bytes,
    })
}

/// Runs `command` to completion within `limit` (killed after it) and
/// returns its stdout (also when it failed: iperf3 -J reports errors there).
pub(crate) fn run_bounded(command: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("{command:?}: {error}"))?;
    let reader = read_in_background(child.stdout.take());
    let error_reader = read_in_background(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = error_reader.join().unwrap_or_default();
    match status {
        None => Err(format!("{command:?} took longer than {limit:?}")),
        Some(status) if status.success() || !stdout.trim().is_empty() => Ok(stdout),
        Some(status) => Err(format!("{command:?} failed ({status}): {}", stderr.trim())),
    }
}

/// Memory of process trees, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// Sum of `VmRSS` over every process of the trees.
    pub(crate) rss_kib: u64,
    /// Sum of `Pss` (shared pages divided among their users).
    pub(crate) pss_kib: u64,
    /// How many processes the trees hold.
    pub(crate) processes: usize,
}

/// Every process id under (and including) `roots`.
pub(crate) fn process_tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = Vec::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if tree.contains(&pid) || tree.len() > 1_000_000 {
            continue;
        }
        tree.push(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    tree
}

fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// Reads all of `pipe` on a thread of its own, so that a child filling
/// one pipe cannot block on it while the other is read.
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// CPU time (user and system) the processes under `roots` have used, in
/// seconds, with that of their children that have exited and been waited
/// for (socat's per-connection forks).
pub(crate) fn cpu_seconds(roots: &[u32]) -> f64 {
    let mut tree = process_tree(roots);
    tree.sort_unstable();
    tree.dedup();
    let ticks: u64 = tree
        .iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| cpu_ticks(&stat))
        .sum();
    // USER_HZ, which Linux fixes at 100 for /proc on every architecture
    // this runs on.
    ticks as f64 / 100.0
}

/// utime + stime + cutime + cstime of one `/proc/PID/stat` line.
fn cpu_ticks(stat: &str) -> u64 {
    // "pid (comm) state ppid ...": comm may hold spaces and parens; the
    // times are fields 14-17, so 12-15 after the comm.
    stat.rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|field| field.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// The memory of the processes under `roots`.
pub(crate) fn memory(roots: &[u32]) -> Memory {
    let mut memory = Memory::default();
    let mut tree = process_tree(roots);
    tree.sort_unstable();
    tree.dedup();
    for pid in tree {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        memory.processes += 1;
        memory.rss_kib += status_field_kib(&status, "VmRSS:").unwrap_or(0);
        if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            memory.pss_kib += status_field_kib(&rollup, "Pss:").unwrap_or(0);
        }
    }
    memory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_sum_the_four_time_fields_after_the_comm() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 0 0 7 5 3 2 20 0 2 0";
        assert_eq!(cpu_ticks(stat), 7 + 5 + 3 + 2);
        assert_eq!(cpu_ticks("garbage"), 0);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), Some(500));
        assert_eq!(percentile(&samples, 0.99), Some(990));
        assert_eq!(percentile(&samples, 0.999), Some(999));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn the_tree_of_this_process_holds_it() {
        let me = std::process::id();
        assert!(process_tree(&[me]).contains(&me));
        assert!(memory(&[me]).rss_kib > 0);
    }
}
