//! The `meshtun` binary: command line, logging, signals. It is thin on
//! purpose: configuration lives in `meshtun-config`, certificates in
//! `meshtun-pki`, and everything that touches the network in `meshtun-node`.
//!
//! Exit codes: 0 ok, 64 usage, 78 bad configuration or
//! certificates, 1 runtime failure.

/// Prints a line to stdout. A closed stdout (`meshtun demo | head`) ends
/// the output, not the program: `println!` would panic there.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod cmd;
mod junk;
mod material;
mod notify;
mod watch;

use cmd::{check, cluster, demo, join, overlay, pki, renew, run, status};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for a command line the program cannot understand (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for a bad configuration or certificate (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code for a failure at run time.
const EXIT_RUNTIME: u8 = 1;

/// meshtun: seals a cluster's inter-node TCP channels inside mutually
/// authenticated QUIC.
#[derive(Debug, Parser)]
#[command(name = "meshtun", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (logs to stderr). SIGHUP reloads, SIGTERM drains.
    Run {
        /// The node's configuration file.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
        /// Log lines as human-readable text or as one JSON object each.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MESHTUN_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Show a running node's peers, streams, bytes and certificate, read
    /// from its admin endpoint.
    Status {
        /// The node's configuration file; its `[admin] listen` is read.
        #[arg(short, long, env = "MESHTUN_CONFIG", required_unless_present = "admin")]
        config: Option<PathBuf>,
        /// The admin endpoint's address, instead of reading the config.
        #[arg(long, conflicts_with = "config")]
        admin: Option<std::net::SocketAddr>,
        /// Print the raw JSON document instead.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration and its certificates; print every problem.
    Check {
        /// The node's configuration file.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
    },
    /// Renew this node's certificate once from `[tls] renew` (`meshtun pki
    /// serve`): a fresh key made here, the current certificate as proof;
    /// the old pair is kept as .prev. The daemon does this by itself.
    Renew {
        /// The node's configuration file.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
    },
    /// Run a self-contained two-node demo on loopback with a throwaway CA.
    Demo {
        /// MiB to push each way through the tunnel.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16384))]
        mib: u64,
    },
    /// The cluster manifest: check it, or show what one node gets from it.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Certificate authority and node certificates.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Join the cluster: get this node's certificate from `meshtun pki
    /// serve` with a join token; the key is made here and never sent.
    Join(join::JoinArgs),
    /// Overlay mode's host set-up: the dummy interface, its route and the
    /// nftables redirect (for `overlay.manage = false`).
    #[command(subcommand)]
    Overlay(overlay::OverlayCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { EXIT_USAGE } else { 0 };
            // Printing help or a usage error to a closed stdout/stderr is not
            // worth a second failure.
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Run { config, log_format } => run::run(&config, log_format),
        Command::Status {
            config,
            admin,
            json,
        } => status::status(config.as_deref(), admin, json),
        Command::Check { config } => check::check(&config),
        Command::Renew { config } => renew::renew_command(&config),
        Command::Demo { mib } => demo::demo(mib),
        Command::Pki(command) => pki::pki(command),
        Command::Cluster(command) => cluster::cluster(command),
        Command::Join(args) => join::join(args),
        Command::Overlay(command) => overlay::overlay(command),
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the stderr logger. `MESHTUN_LOG` (or `RUST_LOG`) takes a
/// tracing filter; the default shows connection-level events. Returns the
/// counter of junk datagrams (see [`junk`]).
fn init_logging(default: &str, format: LogFormat) -> junk::JunkCounter {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let filter = std::env::var("MESHTUN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a human at a terminal: journald and log files get
    // plain text, and NO_COLOR is honoured.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
    .with_filter(filter);
    let counter = junk::JunkCounter::default();
    let junk = junk::JunkLayer::new(counter.clone()).with_filter(
        tracing_subscriber::filter::Targets::new().with_target(junk::TARGET, tracing::Level::TRACE),
    );
    tracing_subscriber::registry()
        .with(output)
        .with(junk)
        .init();
    counter
}

/// A multi-threaded tokio runtime, or the reason there is none.
fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    runtime_with(None)
}

/// A multi-threaded tokio runtime with `workers` threads (default: one per
/// CPU this process may run on).
fn runtime_with(
    workers: Option<std::num::NonZeroUsize>,
) -> Result<tokio::runtime::Runtime, std::io::Error> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers.get());
    }
    builder.enable_all().build()
}
