//! `meshtun run`: load, start, wait for a signal, drain, exit.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_config::Config;
use meshtun_node::Node;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::material::{self, Material};
use crate::notify::Notifier;
use crate::watch::{expiry_in_words, ExpiryWarnings, Watched, POLL_INTERVAL};
use crate::{init_logging, runtime_with, LogFormat, EXIT_CONFIG, EXIT_RUNTIME};

/// How often dropped junk datagrams are summarized in the log.
const JUNK_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the certificate's remaining validity is looked at.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

pub(crate) fn run(path: &Path, format: LogFormat) -> ExitCode {
    let junk = init_logging("info", format);
    // Everything is parsed and loaded before any port is bound.
    let material = match material::load(path) {
        Ok(material) => material,
        Err(problems) => {
            for problem in problems {
                error!(config = %path.display(), "{problem}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The one setting read before the runtime exists: its thread count.
    let runtime = match runtime_with(material.config.limits.worker_threads) {
        Ok(runtime) => runtime,
        Err(problem) => {
            error!("cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(serve(path, material, junk))
}

/// Starts the node, keeps it (reloads, renewals, expiry warnings, the
/// systemd watchdog) until SIGTERM or SIGINT, then drains it.
async fn serve(path: &Path, material: Material, junk: crate::junk::JunkCounter) -> ExitCode {
    let Material {
        config,
        credentials,
        trust,
    } = material;
    let notifier = Notifier::from_env();
    let mut supervisor = Supervisor {
        watched: Watched::new(path, &config),
        renewal: Renewal::new(
            config.clone(),
            (credentials.not_before(), credentials.not_after()),
        ),
    };
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
    let signal = supervisor
        .until_stopped(path, &node, &notifier, &mut signals)
        .await;
    notifier.stopping();
    let grace = supervisor.grace();
    info!(
        signal = signal.name(),
        ?grace,
        "stopping: draining open streams (signal again to stop at once)"
    );
    tokio::select! {
        () = node.shutdown(grace) => ExitCode::SUCCESS,
        signal = signals.next_stop() => {
            warn!(signal = signal.name(), "second signal: exiting without finishing the drain");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// What the run loop keeps between events.
struct Supervisor {
    watched: Watched,
    renewal: Renewal,
}

impl Supervisor {
    /// How long a stop lets open streams drain: the applied config's.
    fn grace(&self) -> Duration {
        self.renewal.config.limits.drain_grace
    }

    /// Reloads on SIGHUP or changed files, renews when due, warns of
    /// expiry and pings the watchdog, until SIGTERM or SIGINT, which it
    /// returns.
    async fn until_stopped(
        &mut self,
        path: &Path,
        node: &Node,
        notifier: &Notifier,
        signals: &mut Signals,
    ) -> Stop {
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
        self.renewal.publish(node);
        let (renewed_tx, mut renewed_rx) = tokio::sync::mpsc::channel(1);
        loop {
            let renewal_due = self.renewal.due();
            tokio::select! {
                () = sleep_until(renewal_due) => {
                    self.renewal.start(renewed_tx.clone());
                    self.renewal.publish(node);
                    continue;
                }
                Some(finished) = renewed_rx.recv() => {
                    let renewed = self.renewal.finish(finished);
                    self.renewal.publish(node);
                    if !renewed {
                        continue;
                    }
                }
                signal = signals.next() => {
                    if signal != Stop::Hangup {
                        break signal;
                    }
                    info!(config = %path.display(), "SIGHUP: reloading configuration and certificates");
                }
                _ = polls.tick() => {
                    let Some(files) = self.watched.poll() else { continue };
                    let files: Vec<_> = files.iter().map(|file| file.display().to_string()).collect();
                    info!(files = %files.join(", "), "configuration or certificate files changed: reloading");
                }
                _ = expiry_checks.tick() => {
                    warn_expiry(node, &mut expiry);
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
            let before = self.watched.snapshot();
            if let Some(applied) = reload(path, node) {
                self.watched = applied.watched.seen_as(&before);
                self.renewal.replan(applied.config, applied.validity);
                self.renewal.publish(node);
            }
            notifier.ready(&summary(node));
            warn_expiry(node, &mut expiry);
        }
    }
}

/// What a reload applied, for the run loop.
struct Applied {
    watched: Watched,
    config: Config,
    /// The new certificate's not_before and not_after.
    validity: (SystemTime, SystemTime),
}

/// Re-reads the configuration and certificates and hands them to the node.
/// Returns what the run loop keeps of them if the reload applied. A
/// failure keeps everything as it was and is logged once, with every
/// problem.
fn reload(path: &Path, node: &Node) -> Option<Applied> {
    let material = match material::load(path) {
        Ok(material) => material,
        Err(problems) => {
            let joined = format!("{}: {}", path.display(), problems.join("; "));
            error!(problems = %joined, "reload failed; still running the previous configuration");
            node.reload_failed(&joined);
            return None;
        }
    };
    let watched = Watched::new(path, &material.config);
    let fingerprint = material.credentials.fingerprint();
    let config = material.config.clone();
    let validity = (
        material.credentials.not_before(),
        material.credentials.not_after(),
    );
    match node.reload(material.config, material.credentials, material.trust) {
        Ok(()) => {
            info!(certificate = %fingerprint, "reloaded; new handshakes and streams use the new configuration");
            Some(Applied {
                watched,
                config,
                validity,
            })
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
    let words = expiry_in_words(certificate.expires_in_seconds);
    // With self-renewal working, a near expiry is the plan, not news; the
    // renewal's own failures are logged where they happen.
    if let Some(renewal) = &certificate.renewal {
        if renewal.last_error.is_none() && certificate.expires_in_seconds > 0 {
            return;
        }
    }
    match warnings.due(&certificate.fingerprint, certificate.expires_in_seconds) {
        Some(0) => error!(
            certificate = %certificate.fingerprint,
            "the node certificate {words}: peers refuse new connections from this node; renew it with `meshtun pki renew`, then reload"
        ),
        Some(_) => warn!(
            certificate = %certificate.fingerprint,
            expires_in_hours = certificate.expires_in_seconds / 3600,
            "the node certificate {words}; renew it with `meshtun pki renew`, then reload"
        ),
        None => {}
    }
}

/// The daemon's own certificate renewal (`[tls] renew`): when the next
/// attempt is due, the attempt in flight, and what `/status` shows.
struct Renewal {
    /// The configuration last applied: at start, or by the last reload.
    config: Config,
    /// When the next attempt starts; `None` while one runs or when off.
    next: Option<tokio::time::Instant>,
    next_wall: Option<SystemTime>,
    /// Whether an attempt runs now (its result comes over a channel).
    running: bool,
    /// The certificate's validity, for the retry pause.
    validity: (SystemTime, SystemTime),
    successes: u64,
    failures: u64,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
}

impl Renewal {
    /// Renewal under `config` of a certificate valid over `validity`
    /// (not_before, not_after).
    fn new(config: Config, validity: (SystemTime, SystemTime)) -> Self {
        let mut renewal = Self {
            config,
            next: None,
            next_wall: None,
            running: false,
            validity,
            successes: 0,
            failures: 0,
            last_attempt: None,
            last_error: None,
        };
        renewal.plan();
        renewal
    }

    /// A reload applied `config` and a certificate valid over `validity`:
    /// plan from them (an attempt in flight finishes first and plans again
    /// then).
    fn replan(&mut self, config: Config, validity: (SystemTime, SystemTime)) {
        self.config = config;
        self.validity = validity;
        if !self.running {
            self.plan();
        }
    }

    fn plan(&mut self) {
        let Some(settings) = &self.config.tls.renew else {
            self.schedule(None);
            return;
        };
        let (not_before, not_after) = self.validity;
        let due = crate::cmd::renew::due_at(settings, not_before, not_after)
            .checked_sub(crate::cmd::renew::jitter(not_before, not_after))
            .unwrap_or(not_before);
        info!(
            at = %meshtun_pki::format_utc(due),
            server = %settings.server,
            "certificate renewal planned"
        );
        self.schedule(Some(due));
    }

    fn schedule(&mut self, at: Option<SystemTime>) {
        self.next_wall = at;
        self.next = at.map(|at| {
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::Instant::now() + wait
        });
    }

    /// When an attempt is due (never while one runs, or when off).
    fn due(&self) -> Option<tokio::time::Instant> {
        self.next.filter(|_| !self.running)
    }

    /// Starts an attempt in its own task; its result is sent to `done`.
    fn start(
        &mut self,
        done: tokio::sync::mpsc::Sender<Result<crate::cmd::renew::Installed, String>>,
    ) {
        self.schedule(None);
        self.running = true;
        self.last_attempt = Some(SystemTime::now());
        let config = self.config.clone();
        info!("renewing the node certificate");
        tokio::spawn(async move {
            let attempt = tokio::spawn(async move { crate::cmd::renew::renew_once(&config).await });
            let result = attempt
                .await
                .unwrap_or_else(|error| Err(format!("the renewal task failed: {error}")));
            // The run loop holds the receiver until the daemon exits.
            let _ = done.send(result).await;
        });
    }

    /// Records an attempt's result; true if new files were installed (the
    /// caller reloads, which plans the next renewal). A failure is retried
    /// after a twentieth of the lifetime.
    fn finish(&mut self, result: Result<crate::cmd::renew::Installed, String>) -> bool {
        self.running = false;
        match result {
            Ok(installed) => {
                self.successes += 1;
                self.last_error = None;
                info!(
                    certificate = %installed.fingerprint,
                    not_after = %meshtun_pki::format_utc(installed.not_after),
                    "renewed the node certificate; reloading to use it"
                );
                // Planned from the new certificate now, so a reload that
                // fails (a bad edit of the config, say) does not stop
                // renewals; a reload that applies plans again.
                self.validity = (installed.not_before, installed.not_after);
                self.plan();
                true
            }
            Err(problem) => {
                self.failures += 1;
                let (not_before, not_after) = self.validity;
                let now = SystemTime::now();
                if now >= not_after {
                    error!(
                        %problem,
                        failures = self.failures,
                        "certificate renewal failed and the certificate has expired: it can no \
                         longer renew itself; join again with a new token (`meshtun pki token`, \
                         then `meshtun join`)"
                    );
                    self.last_error = Some(problem);
                    self.schedule(None);
                    return false;
                }
                let retry = crate::cmd::renew::retry_after(not_before, not_after);
                warn!(
                    %problem,
                    retry_in = ?retry,
                    failures = self.failures,
                    "certificate renewal failed; the current certificate stays in use"
                );
                self.last_error = Some(problem);
                self.schedule(Some(now + retry));
                false
            }
        }
    }

    /// Hands the state to the node for `/status` and `/metrics`.
    fn publish(&self, node: &Node) {
        let Some(settings) = &self.config.tls.renew else {
            node.set_renewal(None);
            return;
        };
        node.set_renewal(Some(meshtun_node::RenewalStatus {
            server: settings.server.to_string(),
            at_percent: settings.at_percent,
            in_progress: self.running,
            next_attempt_unix: self.next_wall.map(meshtun_pki::unix_seconds),
            last_attempt_unix: self.last_attempt.map(meshtun_pki::unix_seconds),
            last_error: self.last_error.clone(),
            successes: self.successes,
            failures: self.failures,
        }));
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

/// Sleeps until `at`, or forever if `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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

/// A signal `run` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain, then exit.
    Terminate,
    /// SIGINT: as SIGTERM.
    Interrupt,
    /// SIGHUP: reload.
    Hangup,
}

impl Stop {
    /// The signal's name, as logs and `kill -l` write it.
    fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Hangup => "SIGHUP",
        }
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
    async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.terminate.recv() => Stop::Terminate,
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.hangup.recv() => Stop::Hangup,
        }
    }

    /// Resolves on the next SIGTERM or SIGINT; SIGHUP is ignored while
    /// draining.
    async fn next_stop(&mut self) -> Stop {
        tokio::select! {
            _ = self.terminate.recv() => Stop::Terminate,
            _ = self.interrupt.recv() => Stop::Interrupt,
        }
    }
}
