//! `meshtun-bench`: meshtun against other ways of carrying a TCP
//! connection from one host to another, in one run.
//!
//! Two lab hosts, A and B. On B: an iperf3 server and an echo service. Each
//! contender is a forwarder on each host (except `direct`, plain TCP from A
//! to B's address, the limit); the client runs on A and dials A's loopback.
//! For each link MTU, every contender is started, then each measurement is
//! taken for every contender in turn (the order rotating per repetition),
//! repeated, so that drift on the machine hits them all alike:
//!
//! * throughput: iperf3, 1 and 8 streams, A→B and B→A (Gbit/s, median);
//! * CPU per GiB: the forwarders' CPU time (user and system, both hosts,
//!   forked children included) during each 1-stream iperf3 run, divided by
//!   the bytes it carried (s/GiB, median): what carrying data costs each
//!   contender, apart from how the machine's 2 cores were shared out;
//! * latency: TCP ping-pong with 64 B and 16 KiB messages (µs, median, p99
//!   and p99.9 over every sample of every repetition);
//! * connection rate: connect, 1-byte request, 1-byte response, close, with
//!   several workers (connections/s, median);
//! * memory: the forwarders' RSS (and PSS) summed over both hosts and every
//!   process they forked, idle and while N idle connections are open.
//!
//! The report is a table on stdout (absolute figures and the ratio to
//! meshtun), `bench.json`, `bench.txt` and a chart, `bench.png`.

mod chart;
mod contenders;
mod measure;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

pub use contenders::Kind;
use contenders::{Running, ECHO_PORT, IPERF_PORT};

use meshtun_lab::{Host, Lab};

/// What one bench run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `bench.json`, `bench.txt` and `bench.png` go.
    pub out: PathBuf,
    /// The contenders, in table order.
    pub contenders: Vec<Kind>,
    /// Link MTUs, one pass each.
    pub mtus: Vec<u32>,
    /// Repetitions of each throughput, latency and connection-rate figure.
    pub repetitions: u32,
    /// Seconds of each iperf3 run.
    pub throughput_seconds: u32,
    /// Duration of each ping-pong run.
    pub latency_time: Duration,
    /// Duration of each connection-rate run.
    pub connect_time: Duration,
    /// Concurrent workers of the connection-rate client.
    pub connect_workers: usize,
    /// Idle connections held open for the loaded memory figure.
    pub idle_connections: usize,
    /// How long opening them may take per contender (ssh opens channels
    /// ever more slowly; the figure then notes how many were open).
    pub idle_open_time: Duration,
    /// Install missing contenders with apt-get.
    pub install: bool,
    /// Set by `--quick` (recorded in the report).
    pub quick: bool,
    /// A program whose `echo ADDR` subcommand serves the echo service
    /// (the `meshtun-bench` binary); `None` serves it from this process.
    pub echo_helper: Option<PathBuf>,
}

impl Options {
    /// The defaults of a full run: every contender, MTU 1500 and 9000,
    /// 3 repetitions, 10,000 idle connections (about 15 minutes on 2 cores).
    pub fn full(out: PathBuf) -> Options {
        Options {
            out,
            contenders: Kind::ALL.to_vec(),
            mtus: vec![1500, 9000],
            repetitions: 3,
            throughput_seconds: 2,
            latency_time: Duration::from_millis(1500),
            connect_time: Duration::from_millis(1500),
            connect_workers: 4,
            idle_connections: 10_000,
            idle_open_time: Duration::from_secs(60),
            install: true,
            quick: false,
            echo_helper: None,
        }
    }

    /// A smoke run: direct TCP and meshtun only, 1 repetition of 1 s each,
    /// 100 idle connections.
    pub fn quick(out: PathBuf) -> Options {
        Options {
            contenders: vec![Kind::Direct, Kind::Meshtun],
            repetitions: 1,
            throughput_seconds: 1,
            latency_time: Duration::from_secs(1),
            connect_time: Duration::from_secs(1),
            connect_workers: 2,
            idle_connections: 100,
            idle_open_time: Duration::from_secs(30),
            install: false,
            quick: true,
            ..Options::full(out)
        }
    }
}

/// One measurement: its id in the JSON, its label in the table and chart.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    /// The key in the JSON.
    pub id: &'static str,
    /// What the table calls it.
    pub label: &'static str,
    /// The unit of its figures.
    pub unit: &'static str,
    /// Whether more is better.
    pub higher_is_better: bool,
    /// Whether it measures the forwarders themselves (memory, CPU): none
    /// for `direct`, which has no forwarder.
    pub forwarder_only: bool,
}

const fn m(
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    forwarder_only: bool,
) -> Measurement {
    Measurement {
        id,
        label,
        unit,
        higher_is_better,
        forwarder_only,
    }
}

/// Every measurement, in table order.
pub const MEASUREMENTS: [Measurement; 19] = [
    m(
        "throughput_1_up",
        "iperf3 1 stream A→B",
        "Gbit/s",
        true,
        false,
    ),
    m(
        "throughput_1_down",
        "iperf3 1 stream B→A",
        "Gbit/s",
        true,
        false,
    ),
    m(
        "throughput_8_up",
        "iperf3 8 streams A→B",
        "Gbit/s",
        true,
        false,
    ),
    m(
        "throughput_8_down",
        "iperf3 8 streams B→A",
        "Gbit/s",
        true,
        false,
    ),
    m(
        "cpu_1_up",
        "CPU per GiB, 1 stream A→B",
        "s/GiB",
        false,
        true,
    ),
    m(
        "cpu_1_down",
        "CPU per GiB, 1 stream B→A",
        "s/GiB",
        false,
        true,
    ),
    m(
        "latency_64_p50",
        "ping-pong 64 B median",
        "µs",
        false,
        false,
    ),
    m("latency_64_p99", "ping-pong 64 B p99", "µs", false, false),
    m(
        "latency_64_p999",
        "ping-pong 64 B p99.9",
        "µs",
        false,
        false,
    ),
    m(
        "latency_16k_p50",
        "ping-pong 16 KiB median",
        "µs",
        false,
        false,
    ),
    m(
        "latency_16k_p99",
        "ping-pong 16 KiB p99",
        "µs",
        false,
        false,
    ),
    m(
        "latency_16k_p999",
        "ping-pong 16 KiB p99.9",
        "µs",
        false,
        false,
    ),
    m("connect_rate", "new connections/s", "conn/s", true, false),
    m("rss_idle", "RSS idle (A+B)", "MiB", false, true),
    m("rss_loaded", "RSS, N idle conns (A+B)", "MiB", false, true),
    m("pss_idle", "PSS idle (A+B)", "MiB", false, true),
    m("pss_loaded", "PSS, N idle conns (A+B)", "MiB", false, true),
    m(
        "rss_per_conn",
        "RSS per idle conn (A+B)",
        "KiB",
        false,
        true,
    ),
    m(
        "pss_per_conn",
        "PSS per idle conn (A+B)",
        "KiB",
        false,
        true,
    ),
];

/// The figure of one measurement of one contender at one MTU.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    /// The figure (median of the repetitions, or a percentile of all
    /// samples); `None` when it could not be measured.
    pub value: Option<f64>,
    /// The figure of each repetition.
    pub samples: Vec<f64>,
    /// Why it is missing or incomplete.
    pub error: Option<String>,
    /// Anything else worth knowing (e.g. connections actually opened).
    pub note: Option<String>,
}

/// Key of a figure: (MTU, contender, measurement id).
type Key = (u32, Kind, &'static str);

/// What a bench run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Every figure.
    pub figures: BTreeMap<Key, Figure>,
    /// Contenders that were skipped, and why.
    pub skipped: Vec<(Kind, String)>,
    /// Contenders that ran, with their version.
    pub ran: Vec<(Kind, String)>,
    /// Things the daemons logged at WARN/ERROR, or did wrong, per MTU.
    pub incidents: Vec<String>,
    /// How long the run took.
    pub wall: Duration,
    /// The open-file limit of the bench and its forwarders.
    pub fd_limit: u64,
    /// Every ping-pong round trip (ns) by (MTU, contender, `*_p50` id),
    /// over all repetitions, until the percentiles are taken.
    latency: BTreeMap<Key, Vec<u64>>,
}

impl Report {
    fn figure(&mut self, mtu: u32, kind: Kind, id: &'static str) -> &mut Figure {
        self.figures.entry((mtu, kind, id)).or_default()
    }

    fn sample(&mut self, mtu: u32, kind: Kind, id: &'static str, result: Result<f64, String>) {
        let figure = self.figure(mtu, kind, id);
        match result {
            Ok(value) => figure.samples.push(value),
            Err(error) => {
                eprintln!("  {} {id} at MTU {mtu}: {error}", kind.name());
                figure.error = Some(error);
            }
        }
    }

    /// The value of a figure.
    pub fn value(&self, mtu: u32, kind: Kind, id: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|((m, k, i), _)| *m == mtu && *k == kind && *i == id)
            .and_then(|(_, figure)| figure.value)
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Set by Ctrl-C or SIGTERM: the run stops at the next measurement and
/// cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

fn stopped() -> Result<(), String> {
    if STOP.load(Ordering::Relaxed) {
        Err("interrupted".to_owned())
    } else {
        Ok(())
    }
}

/// Raises this process's open-file limit to its hard limit (inherited by
/// every forwarder it starts) with `prlimit`: 10,000 idle connections need
/// 10,000 descriptors here and up to 20,000 in a forwarder. Returns the
/// limit now in force.
fn raise_fd_limit() -> Result<u64, String> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(|error| format!("/proc/self/limits: {error}"))?;
    let hard = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4))
        .ok_or("no \"Max open files\" in /proc/self/limits")?;
    let output = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("prlimit: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "prlimit: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(hard.parse().unwrap_or(u64::MAX))
}

/// Installs the Debian packages of contenders whose programs are missing;
/// a contender still missing afterwards is skipped.
fn install(options: &Options, report: &mut Report) -> Vec<Kind> {
    let missing = |kind: Kind| {
        !kind
            .packages()
            .1
            .iter()
            .all(|program| contenders::have_program(program))
    };
    let mut packages: Vec<&str> = options
        .contenders
        .iter()
        .filter(|kind| missing(**kind))
        .flat_map(|kind| kind.packages().0.iter().copied())
        .collect();
    if chart::font().is_none() {
        packages.push("fonts-dejavu-core");
    }
    if !packages.is_empty() && options.install {
        println!("installing {}", packages.join(" "));
        let apt = |args: &[&str]| {
            let mut command = Command::new("apt-get");
            command
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null());
            measure::run_bounded(&mut command, Duration::from_secs(600))
        };
        let mut install_args = vec!["install", "-y", "-q", "--no-install-recommends"];
        install_args.extend(packages.iter().copied());
        if apt(&install_args).is_err() {
            let _ = apt(&["update", "-q"]);
            if let Err(error) = apt(&install_args) {
                eprintln!("apt-get install failed: {error}");
            }
        }
    }
    let mut available = Vec::new();
    for &kind in &options.contenders {
        if missing(kind) {
            let why = format!(
                "{} not installed (Debian package {}{})",
                kind.packages().1.join(", "),
                kind.packages().0.join(", "),
                if options.install {
                    ", and apt-get could not install it"
                } else {
                    "; --no-install"
                }
            );
            println!("skipping {}: {why}", kind.name());
            report.skipped.push((kind, why));
        } else {
            available.push(kind);
        }
    }
    available
}

fn package_version(kind: Kind, meshtun: &Path) -> String {
    let output = match kind.version_package() {
        Some(package) => Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", package])
            .stdin(Stdio::null())
            .output(),
        None if matches!(kind, Kind::Meshtun | Kind::MeshtunOneShard) => Command::new(meshtun)
            .arg("--version")
            .stdin(Stdio::null())
            .output(),
        None => return "kernel TCP".to_owned(),
    };
    output
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|version| !version.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn sysctl(host: &Host, setting: &str) {
    let _ = host
        .command("sysctl")
        .args(["-q", "-w", setting])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs the bench: builds the lab, measures, writes the report files into
/// `options.out`, prints the table, and removes everything it made.
pub fn run(options: &Options) -> Result<Report, String> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    std::fs::create_dir_all(&options.out)
        .map_err(|error| format!("{}: {error}", options.out.display()))?;
    let fd_limit = raise_fd_limit()?;
    if !contenders::have_program("iperf3") {
        return Err("iperf3 is not installed (apt-get install iperf3)".to_owned());
    }
    let mut report = Report {
        fd_limit,
        ..Report::default()
    };
    let kinds = install(options, &mut report);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| format!("tokio runtime: {error}"))?;
    runtime.spawn(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        eprintln!("stopping: finishing the current measurement, then cleaning up");
        STOP.store(true, Ordering::Relaxed);
    });

    let lab = Lab::new(&["node-a", "node-b"]).map_err(|error| error.to_string())?;
    let meshtun = lab.binary().to_path_buf();
    for kind in &kinds {
        report.ran.push((*kind, package_version(*kind, &meshtun)));
    }
    println!(
        "lab up: A {} and B {}; meshtun binary {}",
        lab.host(0).addr,
        lab.host(1).addr,
        meshtun.display()
    );
    let privsep_made = kinds.contains(&Kind::Ssh)
        && !Path::new(contenders::PRIVSEP_DIR).exists()
        && { std::fs::create_dir_all(contenders::PRIVSEP_DIR).is_ok() };
    let result = measure_all(&lab, &runtime, options, &kinds, &mut report);
    contenders::remove_privsep_dir(privsep_made);
    drop(lab);
    runtime.shutdown_timeout(Duration::from_secs(2));
    result?;
    report.wall = started.elapsed();
    write_report(options, &report, started_at)?;
    Ok(report)
}

fn measure_all(
    lab: &Lab,
    runtime: &tokio::runtime::Runtime,
    options: &Options,
    kinds: &[Kind],
    report: &mut Report,
) -> Result<(), String> {
    let (a, b) = (lab.host(0).clone(), lab.host(1).clone());
    for host in [&a, &b] {
        // Connection-rate runs leave many sockets in TIME_WAIT.
        sysctl(host, "net.ipv4.ip_local_port_range=1024 65000");
        sysctl(host, "net.ipv4.tcp_tw_reuse=1");
    }
    let dir = lab.dir.join("bench");
    std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    let _echo_helper = start_echo_service(&a, &b, runtime, options)?;
    let _iperf_server = start_iperf_server(&b, &dir)?;
    for &mtu in &options.mtus {
        measure_mtu(lab, &a, &dir, options, kinds, mtu, report)?;
    }
    finish_figures(report, options);
    Ok(())
}

/// The echo service on host B. It holds one descriptor per idle
/// connection, as the client does: in a process of its own when there is
/// one to run, so that each side fits in the open-file limit.
fn start_echo_service(
    a: &Host,
    b: &Host,
    runtime: &tokio::runtime::Runtime,
    options: &Options,
) -> Result<Option<ChildGuard>, String> {
    let echo_addr = SocketAddr::from(([0, 0, 0, 0], ECHO_PORT));
    Ok(match &options.echo_helper {
        Some(program) => {
            let mut command = b.command(program);
            command.arg("echo").arg(echo_addr.to_string());
            let helper = ChildGuard(
                command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|error| format!("{} echo: {error}", program.display()))?,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            let direct = SocketAddr::from((b.addr, ECHO_PORT));
            while let Err(error) = measure::round_trip(a, direct) {
                if Instant::now() > deadline {
                    return Err(format!("the echo helper did not answer: {error}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(helper)
        }
        None => {
            let echo = b.listen(echo_addr).map_err(|error| error.to_string())?;
            measure::start_echo(runtime, echo)?;
            None
        }
    })
}

/// The iperf3 server on host B.
fn start_iperf_server(b: &Host, dir: &Path) -> Result<ChildGuard, String> {
    let mut iperf_server = b.command("iperf3");
    iperf_server.args(["-s", "-p", &IPERF_PORT.to_string()]);
    let iperf_log = std::fs::File::create(dir.join("iperf3-server.log"))
        .map_err(|error| format!("iperf3 log: {error}"))?;
    let mut iperf_server = ChildGuard(
        iperf_server
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(iperf_log)
            .spawn()
            .map_err(|error| format!("iperf3 -s: {error}"))?,
    );
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = iperf_server.0.try_wait() {
        return Err(format!("the iperf3 server exited: {status}"));
    }
    Ok(iperf_server)
}

/// One pass at link MTU `mtu`: every contender started, idle memory, the
/// repetitions, loaded memory, and what went wrong.
fn measure_mtu(
    lab: &Lab,
    a: &Host,
    dir: &Path,
    options: &Options,
    kinds: &[Kind],
    mtu: u32,
    report: &mut Report,
) -> Result<(), String> {
    stopped()?;
    lab.set_mtu(mtu).map_err(|error| error.to_string())?;
    println!("\n== MTU {mtu} ==");
    let mut running: Vec<Running> = Vec::new();
    for &kind in kinds {
        match contenders::start(lab, kind, dir) {
            Ok(contender) => running.push(contender),
            Err(error) => {
                eprintln!("  {} did not start at MTU {mtu}: {error}", kind.name());
                report
                    .incidents
                    .push(format!("MTU {mtu}: {} did not start: {error}", kind.name()));
                for measurement in MEASUREMENTS {
                    report.figure(mtu, kind, measurement.id).error =
                        Some(format!("did not start: {error}"));
                }
            }
        }
    }
    // Idle memory: started, one round trip done (by the readiness check).
    std::thread::sleep(Duration::from_secs(1));
    for contender in running.iter().filter(|c| c.kind != Kind::Direct) {
        let memory = measure::memory(&contender.roots());
        report.sample(
            mtu,
            contender.kind,
            "rss_idle",
            Ok(memory.rss_kib as f64 / 1024.0),
        );
        report.sample(
            mtu,
            contender.kind,
            "pss_idle",
            Ok(memory.pss_kib as f64 / 1024.0),
        );
    }
    for repetition in 0..options.repetitions {
        measure_repetition(a, &running, options, mtu, repetition, report)?;
    }
    for contender in running.iter_mut() {
        stopped()?;
        if contender.kind == Kind::Direct {
            continue;
        }
        loaded_memory(a, contender, options, mtu, report);
    }
    for contender in running.iter_mut() {
        if let Some(why) = contender.died() {
            report
                .incidents
                .push(format!("MTU {mtu}: {} died: {why}", contender.kind.name()));
        }
        for warning in contender.warnings() {
            report.incidents.push(format!("MTU {mtu}: {warning}"));
        }
    }
    Ok(())
}

/// One repetition of the throughput, latency and connection-rate figures,
/// each taken for every contender in turn, in an order that rotates with
/// `repetition`.
fn measure_repetition(
    a: &Host,
    running: &[Running],
    options: &Options,
    mtu: u32,
    repetition: u32,
    report: &mut Report,
) -> Result<(), String> {
    println!("repetition {}/{}", repetition + 1, options.repetitions);
    let n = running.len().max(1);
    let order: Vec<usize> = (0..running.len())
        .map(|i| (i + repetition as usize) % n)
        .collect();
    for (streams, reverse, id) in [
        (1, false, "throughput_1_up"),
        (1, true, "throughput_1_down"),
        (8, false, "throughput_8_up"),
        (8, true, "throughput_8_down"),
    ] {
        for &index in &order {
            stopped()?;
            let contender = &running[index];
            let cpu_before = measure::cpu_seconds(&contender.roots());
            let result = measure::iperf3(
                a,
                contender.iperf,
                streams,
                options.throughput_seconds,
                reverse,
            );
            let cpu = measure::cpu_seconds(&contender.roots()) - cpu_before;
            if streams == 1 && contender.kind != Kind::Direct {
                // The forwarders' own CPU time per GiB carried: what
                // a gigabyte costs them, however busy the machine.
                let cpu_id = if reverse { "cpu_1_down" } else { "cpu_1_up" };
                let per_gib = match &result {
                    Ok(transfer) if transfer.bytes > 0 => {
                        Ok(cpu / (transfer.bytes as f64 / f64::from(1u32 << 30)))
                    }
                    Ok(_) => Err("iperf3 carried no bytes".to_owned()),
                    Err(error) => Err(error.clone()),
                };
                report.sample(mtu, contender.kind, cpu_id, per_gib);
            }
            report.sample(mtu, contender.kind, id, result.map(|t| t.gbit_per_second));
        }
    }
    for (size, prefix) in [(64usize, "latency_64"), (16 * 1024, "latency_16k")] {
        for &index in &order {
            stopped()?;
            let contender = &running[index];
            match measure::ping_pong(a, contender.echo, size, options.latency_time) {
                Ok(samples) => latency_samples(report, mtu, contender.kind, prefix, samples),
                Err(error) => {
                    report.sample(mtu, contender.kind, latency_id(prefix, "p50"), Err(error))
                }
            }
        }
    }
    for &index in &order {
        stopped()?;
        let contender = &running[index];
        let result = measure::connect_rate(
            a,
            contender.echo,
            options.connect_workers,
            options.connect_time,
        )
        .map(|rate| {
            if rate.failed > 0 {
                let note = format!("{} failed attempts", rate.failed);
                report.figure(mtu, contender.kind, "connect_rate").note = Some(note);
            }
            rate.completed as f64 / rate.elapsed.as_secs_f64().max(1e-9)
        });
        report.sample(mtu, contender.kind, "connect_rate", result);
    }
    Ok(())
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn latency_id(prefix: &str, which: &str) -> &'static str {
    MEASUREMENTS
        .iter()
        .find(|m| m.id.strip_prefix(prefix) == Some(&format!("_{which}")))
        .map_or("latency_64_p50", |m| m.id)
}

fn latency_samples(report: &mut Report, mtu: u32, kind: Kind, prefix: &str, samples: Vec<u64>) {
    let mut sorted = samples;
    sorted.sort_unstable();
    for (which, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
        let id = latency_id(prefix, which);
        let value = measure::percentile(&sorted, q)
            .map(|ns| ns as f64 / 1000.0)
            .ok_or_else(|| "no samples".to_owned());
        report.sample(mtu, kind, id, value);
    }
    let note = format!("{} round trips", sorted.len());
    let id = latency_id(prefix, "p50");
    report
        .latency
        .entry((mtu, kind, id))
        .or_default()
        .extend(sorted);
    let figure = report.figure(mtu, kind, id);
    figure.note = Some(match figure.note.take() {
        Some(previous) => format!("{previous}; {note}"),
        None => note,
    });
}

fn loaded_memory(
    a: &Host,
    contender: &mut Running,
    options: &Options,
    mtu: u32,
    report: &mut Report,
) {
    let count = options.idle_connections;
    let kind = contender.kind;
    println!("  {}: opening {count} idle connections", kind.name());
    let start = Instant::now();
    let (open, error) =
        measure::open_idle(a, contender.echo, count, start + options.idle_open_time);
    let opened = open.len();
    // Let the forwarders settle (buffers, forked children).
    std::thread::sleep(Duration::from_secs(2));
    let memory = measure::memory(&contender.roots());
    let note = format!(
        "{opened} of {count} connections open ({} processes, {:.1} s to open){}",
        memory.processes,
        start.elapsed().as_secs_f64() - 2.0,
        error
            .as_ref()
            .map(|error| format!("; last error: {error}"))
            .unwrap_or_default()
    );
    println!("  {}: {note}", kind.name());
    let result = |kib: u64| {
        if opened == 0 {
            Err(format!(
                "no idle connection could be opened: {}",
                error.clone().unwrap_or_default()
            ))
        } else {
            Ok(kib as f64 / 1024.0)
        }
    };
    report.sample(mtu, kind, "rss_loaded", result(memory.rss_kib));
    report.sample(mtu, kind, "pss_loaded", result(memory.pss_kib));
    for (idle, loaded, id) in [
        ("rss_idle", memory.rss_kib, "rss_per_conn"),
        ("pss_idle", memory.pss_kib, "pss_per_conn"),
    ] {
        let idle_mib = report.figure(mtu, kind, idle).samples.last().copied();
        let per_connection = match idle_mib {
            Some(idle_mib) if opened > 0 => {
                Ok((loaded as f64 - idle_mib * 1024.0).max(0.0) / opened as f64)
            }
            _ => Err("no idle figure or no connection".to_owned()),
        };
        report.sample(mtu, kind, id, per_connection);
    }
    for id in ["rss_loaded", "pss_loaded", "rss_per_conn", "pss_per_conn"] {
        report.figure(mtu, kind, id).note = Some(note.clone());
    }
    if opened < count {
        report
            .incidents
            .push(format!("MTU {mtu}: {}: {note}", kind.name()));
    }
    drop(open);
    // Wait for the forwarders to let go (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && measure::process_tree(&contender.roots()).len() > contender.roots().len() + 4
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
}

/// Turns samples into values: medians, and latency percentiles over all
/// samples.
fn finish_figures(report: &mut Report, options: &Options) {
    let all = std::mem::take(&mut report.latency);
    let keys: Vec<Key> = report.figures.keys().copied().collect();
    for key in keys {
        let (mtu, kind, id) = key;
        let figure = report.figure(mtu, kind, id);
        figure.value = median(&figure.samples);
        if let Some(prefix) = ["latency_64", "latency_16k"]
            .into_iter()
            .find(|prefix| id.starts_with(prefix))
        {
            let p50 = latency_id(prefix, "p50");
            if let Some(samples) = all.get(&(mtu, kind, p50)) {
                let mut sorted = samples.clone();
                sorted.sort_unstable();
                let q = match id.rsplit('_').next() {
                    Some("p99") => 0.99,
                    Some("p999") => 0.999,
                    _ => 0.5,
                };
                figure.value = measure::percentile(&sorted, q).map(|ns| ns as f64 / 1000.0);
            }
        }
        if figure.error.is_some() && !figure.samples.is_empty() {
            let partial = format!(
                "{} of {} repetitions measured",
                figure.samples.len(),
                options.repetitions
            );
            figure.note = Some(match figure.note.take() {
                Some(note) => format!("{note}; {partial}"),
                None => partial,
            });
        }
    }
}

fn format_value(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else if value >= 100.0 {
        format!("{value:.1}")
    } else if value >= 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The table: one block per MTU, rows are measurements, columns are
/// contenders, each cell the figure and its ratio to meshtun.
pub fn table(report: &Report, options: &Options) -> String {
    let kinds: Vec<Kind> = report.ran.iter().map(|(kind, _)| *kind).collect();
    let mut text = String::new();
    let label_width = 32;
    let cell = 20;
    for &mtu in &options.mtus {
        let _ = writeln!(
            text,
            "\nMTU {mtu}: figure (ratio to meshtun); throughput and connections/s: higher is better"
        );
        let _ = write!(text, "{:<label_width$}", "measurement");
        for kind in &kinds {
            let _ = write!(text, "{:>cell$}", kind.name());
        }
        text.push('\n');
        for measurement in MEASUREMENTS {
            let label = format!("{} [{}]", measurement.label, measurement.unit);
            let _ = write!(text, "{label:<label_width$}");
            let base = report.value(mtu, Kind::Meshtun, measurement.id);
            for &kind in &kinds {
                let cell_text = match report.value(mtu, kind, measurement.id) {
                    Some(value) => match base {
                        Some(base) if base > 0.0 => {
                            format!("{} ({:.2}x)", format_value(value), value / base)
                        }
                        _ => format_value(value),
                    },
                    None if kind == Kind::Direct && measurement.forwarder_only => "-".to_owned(),
                    None => "n/a".to_owned(),
                };
                let _ = write!(text, "{cell_text:>cell$}");
            }
            text.push('\n');
        }
    }
    let _ = writeln!(
        text,
        "\nN idle conns = {}; memory is summed over both hosts' forwarder processes and their children.",
        options.idle_connections
    );
    text
}

fn write_report(options: &Options, report: &Report, started_at: SystemTime) -> Result<(), String> {
    let table = table(report, options);
    println!("{table}");
    for (kind, why) in &report.skipped {
        println!("skipped {}: {why}", kind.name());
    }
    for incident in &report.incidents {
        println!("incident: {incident}");
    }
    let write = |name: &str, bytes: &[u8]| {
        let path = options.out.join(name);
        std::fs::write(&path, bytes).map_err(|error| format!("{}: {error}", path.display()))
    };
    write("bench.txt", table.as_bytes())?;
    let chart_note = match chart::draw(&options.out.join("bench.png"), report, options) {
        Ok(note) => note,
        Err(error) => {
            eprintln!("chart: {error}");
            Some(format!("chart failed: {error}"))
        }
    };
    let json = json(options, report, started_at, chart_note);
    let text = serde_json::to_string_pretty(&json).map_err(|error| error.to_string())?;
    write("bench.json", text.as_bytes())?;
    println!(
        "wrote {0}/bench.json, {0}/bench.txt and {0}/bench.png in {1:.0} s",
        options.out.display(),
        report.wall.as_secs_f64()
    );
    Ok(())
}

fn json(
    options: &Options,
    report: &Report,
    started_at: SystemTime,
    chart_note: Option<String>,
) -> serde_json::Value {
    use serde_json::json;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mut results = Vec::new();
    for (&(mtu, kind, id), figure) in &report.figures {
        let Some(measurement) = MEASUREMENTS.iter().find(|m| m.id == id) else {
            continue;
        };
        let ratio = |base: Kind| {
            let base = report.value(mtu, base, id)?;
            let value = figure.value?;
            (base > 0.0).then(|| value / base)
        };
        results.push(json!({
            "mtu": mtu,
            "contender": kind.name(),
            "measurement": id,
            "unit": measurement.unit,
            "value": figure.value,
            "samples": figure.samples,
            "ratio_to_meshtun": ratio(Kind::Meshtun),
            "ratio_to_direct": ratio(Kind::Direct),
            "error": figure.error,
            "note": figure.note,
        }));
    }
    json!({
        "tool": "meshtun-bench",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "started_unix": started_at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "wall_seconds": report.wall.as_secs_f64(),
        "environment": { "cpus": cpus, "kernel": kernel, "open_file_limit": report.fd_limit },
        "settings": {
            "quick": options.quick,
            "mtus": options.mtus,
            "repetitions": options.repetitions,
            "throughput_seconds": options.throughput_seconds,
            "latency_seconds": options.latency_time.as_secs_f64(),
            "connect_seconds": options.connect_time.as_secs_f64(),
            "connect_workers": options.connect_workers,
            "idle_connections": options.idle_connections,
            "idle_open_seconds": options.idle_open_time.as_secs_f64(),
        },
        "contenders": report.ran.iter().map(|(kind, version)| json!({
            "name": kind.name(), "ran": true, "version": version,
        })).chain(report.skipped.iter().map(|(kind, why)| json!({
            "name": kind.name(), "ran": false, "skipped": why,
        }))).collect::<Vec<_>>(),
        "measurements": MEASUREMENTS.iter().map(|m| json!({
            "id": m.id, "label": m.label, "unit": m.unit,
            "higher_is_better": m.higher_is_better,
            "applies_to_direct": !m.forwarder_only,
        })).collect::<Vec<_>>(),
        "results": results,
        "incidents": report.incidents,
        "chart": { "file": "bench.png", "note": chart_note },
    })
}

/// Draws `dir/bench.png` again from `dir/bench.json` (after a change to
/// the chart, without a new run).
pub fn redraw_chart(dir: &Path) -> Result<(), String> {
    let path = dir.join("bench.json");
    let text =
        std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut options = Options::full(dir.to_path_buf());
    let settings = &json["settings"];
    options.mtus = settings["mtus"]
        .as_array()
        .map(|mtus| {
            mtus.iter()
                .filter_map(|mtu| mtu.as_u64().and_then(|mtu| u32::try_from(mtu).ok()))
                .collect()
        })
        .unwrap_or_default();
    options.idle_connections = settings["idle_connections"]
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let mut report = Report::default();
    for contender in json["contenders"].as_array().into_iter().flatten() {
        let kind = contender["name"].as_str().and_then(Kind::from_name);
        if let (Some(kind), Some(true)) = (kind, contender["ran"].as_bool()) {
            report.ran.push((kind, String::new()));
        }
    }
    for result in json["results"].as_array().into_iter().flatten() {
        let kind = result["contender"].as_str().and_then(Kind::from_name);
        let id = MEASUREMENTS
            .iter()
            .find(|m| result["measurement"].as_str() == Some(m.id))
            .map(|m| m.id);
        let mtu = result["mtu"]
            .as_u64()
            .and_then(|mtu| u32::try_from(mtu).ok());
        if let (Some(kind), Some(id), Some(mtu)) = (kind, id, mtu) {
            report.figure(mtu, kind, id).value = result["value"].as_f64();
        }
    }
    chart::draw(&dir.join("bench.png"), &report, &options).map(drop)
}

/// The echo service on `addr`, until stdin closes (the bench that started
/// it went away).
pub fn serve_echo(addr: SocketAddr) -> Result<(), String> {
    raise_fd_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| format!("tokio runtime: {error}"))?;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|error| format!("listening on {addr}: {error}"))?;
    measure::start_echo(&runtime, listener)?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(std::io::stdin(), 1 << 20),
        &mut sink,
    );
    Ok(())
}
