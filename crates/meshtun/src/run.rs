//! `meshtun run`: load, start, wait for a signal, drain, exit.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use meshtun_node::Node;
use meshtun_pki::{NodeCredentials, TrustBundle};
use tracing::{error, info, warn};

use crate::{init_logging, runtime, EXIT_CONFIG, EXIT_RUNTIME};

pub(crate) fn run(path: &Path) -> ExitCode {
    init_logging("info");
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
        let node = match Node::start(config, credentials, trust).await {
            Ok(node) => node,
            Err(problem) => {
                error!("{problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        match shutdown_signal().await {
            Ok(signal) => info!(signal, "stopping"),
            Err(problem) => {
                error!("cannot listen for signals: {problem}");
                node.shutdown(grace).await;
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
        node.shutdown(grace).await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT, naming which.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
    }
}
