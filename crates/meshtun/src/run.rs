//! `meshtun run`: load, start, wait for a signal, drain, exit.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_config::Config;
use meshtun_node::Node;
use meshtun_pki::{NodeCredentials, TrustBundle};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::notify::Notifier;
use crate::watch::{ExpiryWarnings, Watched, POLL_INTERVAL};
use crate::{init_logging, runtime_with, LogFormat, EXIT_CONFIG, EXIT_RUNTIME};

/// How often dropped junk datagrams are summarized in the log.
const JUNK_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the certificate's remaining validity is looked at.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

pub(crate) fn run(path: &Path, format: LogFormat) -> ExitCode {
    let junk = init_logging("info", format);
    // Everything is parsed and loaded before any port is bound.
    let Material {
        config,
        credentials,
        trust,
    } = match Material::load(path) {
        Ok(material) => material,
        Err(problems) => {
            for problem in problems {
                error!("{problem}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The one setting read before the runtime exists: its thread count.
    let runtime = match runtime_with(config.limits.worker_threads) {
        Ok(runtime) => runtime,
        Err(problem) => {
            error!("cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let notifier = Notifier::from_env();
    let mut watched = Watched::new(path, &config);
    runtime.block_on(async move {
        let mut grace = config.limits.drain_grace;
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
        // `start` returned, so the endpoint and every listener accept.
        notifier.ready(&summary(&node));
        // Ends with the runtime when `run` returns.
        tokio::spawn(crate::junk::report(junk, JUNK_REPORT_INTERVAL));
        // Pings at half the interval systemd allows, from this task: if the
        // runtime wedges or an accept loop dies, the pings stop.
        let mut watchdog = notifier.watchdog().map(|limit| {
            let mut ticks = tokio::time::interval(limit / 2);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        let mut unhealthy = false;
        let mut polls = tokio::time::interval(POLL_INTERVAL);
        polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry_checks = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
        let mut expiry = ExpiryWarnings::default();
        let signal = loop {
            tokio::select! {
                signal = signals.next() => {
                    if signal != "SIGHUP" {
                        break signal;
                    }
                    info!(config = %path.display(), "SIGHUP: reloading configuration and certificates");
                }
                _ = polls.tick() => {
                    let Some(files) = watched.poll() else { continue };
                    let files: Vec<_> = files.iter().map(|file| file.display().to_string()).collect();
                    info!(files = %files.join(", "), "configuration or certificate files changed: reloading");
                }
                _ = expiry_checks.tick() => {
                    warn_expiry(&node, &mut expiry);
                    continue;
                }
                _ = tick(&mut watchdog) => {
                    match node.health() {
                        Ok(()) => {
                            unhealthy = false;
                            notifier.watchdog_ping();
                        }
                        Err(problem) => {
                            if !unhealthy {
                                error!(%problem, "unhealthy: withholding the systemd watchdog ping");
                            }
                            unhealthy = true;
                        }
                    }
                    continue;
                }
            }
            // A SIGHUP or changed files: reload, bracketed for systemd.
            notifier.reloading();
            let before = watched.snapshot();
            if let Some((new_grace, new_watched)) = reload(path, &node) {
                grace = new_grace;
                watched = new_watched.seen_as(&before);
            }
            notifier.ready(&summary(&node));
            warn_expiry(&node, &mut expiry);
        };
        notifier.stopping();
        info!(
            signal,
            ?grace,
            "stopping: draining open streams (signal again to stop at once)"
        );
        tokio::select! {
            () = node.shutdown(grace) => ExitCode::SUCCESS,
            signal = signals.next_stop() => {
                warn!(signal, "second signal: exiting without finishing the drain");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

/// Re-reads the configuration and certificates and hands them to the node.
/// Returns the new drain grace and the files to watch if the reload
/// applied. A failure keeps everything as it was and is logged once, with
/// every problem.
fn reload(path: &Path, node: &Node) -> Option<(Duration, Watched)> {
    let material = match Material::load(path) {
        Ok(material) => material,
        Err(problems) => {
            let joined = problems.join("; ");
            error!(problems = %joined, "reload failed; still running the previous configuration");
            node.reload_failed(&joined);
            return None;
        }
    };
    let grace = material.config.limits.drain_grace;
    let watched = Watched::new(path, &material.config);
    let fingerprint = material.credentials.fingerprint();
    match node.reload(material.config, material.credentials, material.trust) {
        Ok(()) => {
            info!(certificate = %fingerprint, "reloaded; new handshakes and streams use the new configuration");
            Some((grace, watched))
        }
        Err(problem) => {
            error!(%problem, "reload failed; still running the previous configuration");
            None
        }
    }
}

/// Warns once per threshold as the node certificate nears its expiry.
fn warn_expiry(node: &Node, warnings: &mut ExpiryWarnings) {
    let certificate = node.certificate();
    match warnings.due(&certificate.fingerprint, certificate.expires_in_seconds) {
        Some(0) => error!(
            certificate = %certificate.fingerprint,
            "the node certificate has expired: peers refuse new connections from this node; renew it with `meshtun pki renew`, then reload"
        ),
        Some(days) => warn!(
            certificate = %certificate.fingerprint,
            expires_in_hours = certificate.expires_in_seconds / 3600,
            "the node certificate expires within {days} days; renew it with `meshtun pki renew`, then reload"
        ),
        None => {}
    }
}

/// One line for systemd's STATUS= (`systemctl status` shows it), which
/// says when the last reload failed.
fn summary(node: &Node) -> String {
    let status = node.status();
    let reload = match &status.reload.last_error {
        Some(_) => "; LAST RELOAD FAILED, still on the previous configuration (see the journal)",
        None => "",
    };
    format!(
        "serving: {} peers, {} forwards, {} exposes{reload}",
        status.peers.len(),
        status.forwards.len(),
        status.exposes.len()
    )
}

/// The next watchdog tick, or never if the watchdog is off.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A configuration with its certificates, loaded and checked together.
struct Material {
    config: Config,
    credentials: NodeCredentials,
    trust: TrustBundle,
}

impl Material {
    /// Loads `path` and the files it names. Each problem is one line that
    /// names the file or key at fault.
    fn load(path: &Path) -> Result<Self, Vec<String>> {
        let config = meshtun_config::load(path).map_err(|errors| {
            errors
                .iter()
                .map(|problem| format!("{}: {problem}", path.display()))
                .collect::<Vec<_>>()
        })?;
        let tls = &config.tls;
        let trust = TrustBundle::load(&tls.ca, tls.crl.as_deref())
            .map_err(|problem| vec![format!("tls.ca: {problem}")])?;
        let credentials = NodeCredentials::load(&tls.cert, &tls.key)
            .map_err(|problem| vec![format!("tls.cert/tls.key: {problem}")])?;
        if credentials.identity() != &config.node {
            return Err(vec![format!(
                "tls.cert: certificate identity is {:?} but node = {:?}; the certificate must name this node",
                credentials.identity().as_str(),
                config.node.as_str()
            )]);
        }
        if credentials.not_after() <= SystemTime::now() {
            return Err(vec![format!(
                "tls.cert: certificate {} has expired; renew it with `meshtun pki renew`",
                tls.cert.display()
            )]);
        }
        // What `meshtun check` insists on, so that a reload from changed
        // files cannot install a CA bundle or CRL that cuts this node off
        // (a new CA copied over the old one instead of beside it, say).
        if let Err(problem) = trust.verify_node(&credentials, SystemTime::now()) {
            return Err(vec![crate::check::untrusted_node(
                &config,
                &credentials,
                &problem,
            )]);
        }
        Ok(Self {
            config,
            credentials,
            trust,
        })
    }
}

/// SIGTERM, SIGINT and SIGHUP, installed once.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves on the next SIGTERM, SIGINT or SIGHUP, naming which.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }

    /// Resolves on the next SIGTERM or SIGINT; SIGHUP is ignored while
    /// draining.
    async fn next_stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
