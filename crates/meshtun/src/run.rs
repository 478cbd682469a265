//! `meshtun run`: load, start, wait for a signal, drain, exit.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_node::Node;
use meshtun_pki::{NodeCredentials, TrustBundle};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::{init_logging, runtime, EXIT_CONFIG, EXIT_RUNTIME};

/// How often dropped junk datagrams are summarized in the log.
const JUNK_REPORT_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) fn run(path: &Path) -> ExitCode {
    let junk = init_logging("info");
    // Everything is parsed and loaded before any port is bound.
    let config = match meshtun_config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            for problem in errors.iter() {
                error!("{}: {problem}", path.display());
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tls = &config.tls;
    let trust = match TrustBundle::load(&tls.ca, tls.crl.as_deref()) {
        Ok(trust) => trust,
        Err(problem) => {
            error!("tls.ca: {problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let credentials = match NodeCredentials::load(&tls.cert, &tls.key) {
        Ok(credentials) => credentials,
        Err(problem) => {
            error!("tls.cert/tls.key: {problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if credentials.identity() != &config.node {
        error!(
            "tls.cert: certificate identity is {:?} but node = {:?}; the certificate must name this node",
            credentials.identity().as_str(),
            config.node.as_str()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    if credentials.not_after() <= SystemTime::now() {
        error!(
            "tls.cert: certificate {} has expired; issue a new one with `meshtun pki issue`",
            tls.cert.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(problem) => {
            error!("cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if let Some(admin) = &config.admin {
        // Say so instead of silently serving nothing on the configured port.
        warn!(listen = %admin.listen, "[admin] is configured, but this build does not serve /metrics or /status yet");
    }
    runtime.block_on(async move {
        let grace = config.limits.drain_grace;
        // Signal handlers go in before any port is bound, so a signal that
        // arrives during start-up still gets an orderly stop.
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(problem) => {
                error!("cannot listen for signals: {problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let node = match Node::start(config, credentials, trust).await {
            Ok(node) => node,
            Err(problem) => {
                error!("{problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        // Ends with the runtime when `run` returns.
        tokio::spawn(crate::junk::report(junk, JUNK_REPORT_INTERVAL));
        let signal = signals.next().await;
        info!(
            signal,
            ?grace,
            "stopping: draining open streams (signal again to stop at once)"
        );
        tokio::select! {
            () = node.shutdown(grace) => ExitCode::SUCCESS,
            signal = signals.next() => {
                warn!(signal, "second signal: exiting without finishing the drain");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT, naming which.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
