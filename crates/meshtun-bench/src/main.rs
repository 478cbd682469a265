//! `meshtun-bench`: meshtun side by side with direct TCP, stunnel, `ssh -L`,
//! spiped and socat in two lab hosts (see the library's documentation).
//!
//! ```text
//! meshtun-bench [OPTIONS]     one run; bench.json, bench.txt, bench.png in --out
//! meshtun-bench chart DIR     draw DIR/bench.png again from DIR/bench.json
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use meshtun_bench::{Kind, Options};

#[derive(Debug, Parser)]
#[command(
    name = "meshtun-bench",
    about = "meshtun against direct TCP, stunnel, ssh -L, spiped and socat in two lab hosts",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Draw DIR/bench.png again from DIR/bench.json, without a new run.
    Chart { dir: PathBuf },
    /// The echo service behind the tunnels, until stdin closes (the bench
    /// starts it inside host B).
    #[command(hide = true)]
    Echo { addr: SocketAddr },
}

/// One run's options; each one left out takes the default of a full run,
/// or of `--quick`.
#[derive(Debug, Args)]
struct RunArgs {
    /// Where bench.json, bench.txt and bench.png go.
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    out: PathBuf,
    /// A short run: direct TCP and meshtun, 1 repetition of 1 s, 100 idle
    /// connections.
    #[arg(long)]
    quick: bool,
    /// The contenders, comma-separated (meshtun always runs).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = contender)]
    contenders: Option<Vec<Kind>>,
    /// Link MTUs, one pass each.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1280..=65535))]
    mtu: Option<Vec<u32>>,
    /// Repetitions of each throughput, latency and connection-rate figure.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    repetitions: Option<u32>,
    /// Seconds of each iperf3 run.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u32).range(1..=60))]
    throughput_seconds: Option<u32>,
    /// Milliseconds of each ping-pong run.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    latency_ms: Option<u64>,
    /// Milliseconds of each connection-rate run.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    connect_ms: Option<u64>,
    /// Concurrent workers of the connection-rate client.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    connect_workers: Option<u16>,
    /// Idle connections held open for the loaded memory figure.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=50_000))]
    idle_connections: Option<u32>,
    /// How long opening them may take per contender, in seconds.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=600))]
    idle_open_seconds: Option<u64>,
    /// Do not install missing contenders with apt-get.
    #[arg(long)]
    no_install: bool,
}

fn contender(name: &str) -> Result<Kind, String> {
    Kind::from_name(name.trim()).ok_or_else(|| {
        format!(
            "unknown contender {name:?} (known: {})",
            Kind::ALL.map(Kind::name).join(", ")
        )
    })
}

impl RunArgs {
    fn options(self) -> Options {
        let mut options = if self.quick {
            Options::quick(self.out)
        } else {
            Options::full(self.out)
        };
        if let Some(mut contenders) = self.contenders {
            contenders.push(Kind::Meshtun);
            contenders.sort();
            contenders.dedup();
            options.contenders = contenders;
        }
        if let Some(mtus) = self.mtu {
            options.mtus = mtus;
        }
        if let Some(repetitions) = self.repetitions {
            options.repetitions = repetitions;
        }
        if let Some(seconds) = self.throughput_seconds {
            options.throughput_seconds = seconds;
        }
        if let Some(ms) = self.latency_ms {
            options.latency_time = Duration::from_millis(ms);
        }
        if let Some(ms) = self.connect_ms {
            options.connect_time = Duration::from_millis(ms);
        }
        if let Some(workers) = self.connect_workers {
            options.connect_workers = usize::from(workers);
        }
        if let Some(connections) = self.idle_connections {
            // At most 50,000 (the parser's range), which fits any usize.
            options.idle_connections = usize::try_from(connections).unwrap_or(usize::MAX);
        }
        if let Some(seconds) = self.idle_open_seconds {
            options.idle_open_time = Duration::from_secs(seconds);
        }
        if self.no_install {
            options.install = false;
        }
        // The echo service runs as this binary's `echo` in host B.
        options.echo_helper = std::env::current_exe().ok();
        options
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (what, outcome) = match cli.command {
        Some(Command::Chart { dir }) => ("chart", meshtun_bench::redraw_chart(&dir)),
        Some(Command::Echo { addr }) => ("echo", meshtun_bench::serve_echo(addr)),
        None => ("error", meshtun_bench::run(&cli.run.options()).map(drop)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{what}: {error}");
            ExitCode::from(1)
        }
    }
}
