//! `meshtun pki`: a small cluster CA. Keys are written 0600 and never
//! overwritten without `--force` (except by `renew --new-key`, whose point
//! that is). The CA's revocation list lives beside it as `DIR/crl.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use meshtun_pki::{
    Authority, PkiError, Reason, RevocationList, RevocationTarget, Serial, Validity, CRL_FILE,
};
use meshtun_proto::NodeName;

use crate::EXIT_RUNTIME;

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// Create a cluster CA: writes DIR/ca.crt, DIR/ca.key (0600) and an
    /// empty revocation list DIR/crl.pem.
    InitCa {
        /// The cluster's name (the trust domain in spiffe://<cluster>/node/<name>).
        #[arg(long)]
        cluster: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Validity of the CA certificate in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: writes DIR/NAME.crt and DIR/NAME.key (0600).
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The node's name: its identity in the cluster.
        #[arg(long)]
        node: NodeName,
        /// An IP address SAN (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// An extra DNS SAN (repeatable); the node name is always the first.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a single-use join token for a node (`meshtun join` on the node
    /// trades it for a certificate); DIR/tokens.json keeps only its hash.
    Token {
        /// Directory holding ca.crt and ca.key; the token is recorded in DIR/tokens.json.
        #[arg(long)]
        ca: PathBuf,
        /// The node the token is for: its certificate will name exactly this node.
        #[arg(long)]
        node: NodeName,
        /// An IP address SAN (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// An extra DNS SAN (repeatable); the node name is always the first.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// How long the token may be used: a number and s, m, h or d (at most 30d).
        #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
        ttl: std::time::Duration,
        /// The enrollment server's address as the node reaches it, for the
        /// printed `meshtun join` command.
        #[arg(long, value_name = "HOST:PORT")]
        server: Option<String>,
        /// The node's output directory, for the printed `meshtun join` command.
        #[arg(long, default_value = "/etc/meshtun")]
        join_out: PathBuf,
    },
    /// Answer enrollment requests (`meshtun join`) with this CA until
    /// SIGTERM/SIGINT; prints "listening on ADDR", logs to stderr.
    Serve {
        /// Directory holding ca.crt, ca.key and tokens.json.
        #[arg(long)]
        ca: PathBuf,
        /// Address to listen on (TCP, TLS 1.3), e.g. 0.0.0.0:4434; port 0 picks one.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Validity in days of the certificates issued.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// Print subject, SANs, identity, fingerprint and validity of a certificate file
    /// (or issuer, number, dates and revoked serials of a CRL file).
    Inspect {
        /// A PEM file with one or more certificates, or with CRLs.
        file: PathBuf,
    },
    /// Revoke a node certificate: adds its serial to DIR/crl.pem and re-signs
    /// the CRL with the next CRL number.
    #[command(group(clap::ArgGroup::new("revoked").required(true).args(["serial", "cert"])))]
    Revoke {
        /// Directory holding ca.crt and ca.key; the CRL is DIR/crl.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The serial number to revoke, in hex as `meshtun pki inspect` prints it.
        #[arg(long, value_name = "HEX")]
        serial: Option<Serial>,
        /// The certificate to revoke (this CA must have issued it).
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Why, recorded in the CRL.
        #[arg(long, value_parser = reason_parser())]
        reason: Option<Reason>,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = DEFAULT_CRL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        crl_days: u32,
    },
    /// Re-sign DIR/crl.pem with fresh dates and the next CRL number (run it
    /// from cron before nextUpdate); writes an empty CRL if there is none.
    Crl {
        /// Directory holding ca.crt and ca.key; the CRL is DIR/crl.pem.
        #[arg(long)]
        ca: PathBuf,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = DEFAULT_CRL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        crl_days: u32,
    },
    /// Re-issue a node certificate with the same identity and SANs and a new
    /// serial: replaces OUT/NAME.crt (and OUT/NAME.key with --new-key).
    Renew {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The node certificate to renew.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Its private key, kept in the new certificate [default: FILE with .crt replaced by .key].
        #[arg(long, value_name = "FILE", conflicts_with = "new_key")]
        key: Option<PathBuf>,
        /// Generate a new key instead (do this when the old one may be compromised).
        #[arg(long)]
        new_key: bool,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Directory to write into [default: the directory of --cert].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub(crate) fn pki(command: PkiCommand) -> ExitCode {
    let result = match command {
        PkiCommand::InitCa {
            cluster,
            out,
            days,
            force,
        } => init_ca(&cluster, &out, days, force),
        PkiCommand::Token {
            ca,
            node,
            ips,
            dns,
            ttl,
            server,
            join_out,
        } => return enroll_token(&ca, node, ips, dns, ttl, server.as_deref(), &join_out),
        PkiCommand::Serve { ca, listen, days } => return enroll_serve(&ca, listen, days),
        PkiCommand::Issue {
            ca,
            node,
            ips,
            dns,
            days,
            out,
            force,
        } => Authority::load(&ca)
            .and_then(|authority| authority.issue(&node, &ips, &dns, Validity::days_from_now(days)))
            .and_then(|issued| issued.write(&out, &node, force))
            .map(|(cert, key)| {
                say!(
                    "wrote {} and {} (node {node}, {days} days)",
                    cert.display(),
                    key.display()
                );
            }),
        PkiCommand::Inspect { file } => match std::fs::read_to_string(&file) {
            Ok(pem) if meshtun_pki::is_crl_pem(&pem) => {
                meshtun_pki::inspect_crl_pem(&pem).map(|crls| {
                    for (index, crl) in crls.iter().enumerate() {
                        if index > 0 {
                            say!();
                        }
                        say!("{crl}");
                    }
                })
            }
            Ok(pem) => meshtun_pki::inspect_pem(&pem).map(|certificates| {
                for (index, certificate) in certificates.iter().enumerate() {
                    if index > 0 {
                        say!();
                    }
                    say!("{certificate}");
                }
            }),
            Err(error) => {
                eprintln!("error: cannot read {}: {error}", file.display());
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
        PkiCommand::Revoke {
            ca,
            serial,
            cert,
            reason,
            crl_days,
        } => revoke(&ca, serial, cert.as_deref(), reason, crl_days),
        PkiCommand::Crl { ca, crl_days } => resign_crl(&ca, crl_days),
        PkiCommand::Renew {
            ca,
            cert,
            key,
            new_key,
            days,
            out,
        } => renew(&ca, &cert, key, new_key, days, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("error: {problem}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Days a CRL written by `init-ca`, `revoke` and `crl` stays current (its
/// nextUpdate). Nodes keep enforcing a CRL after that; re-sign it anyway.
const DEFAULT_CRL_DAYS: u32 = 30;

/// `--reason`: the RFC 5280 reasons `revoke` offers, by name.
fn reason_parser() -> impl clap::builder::TypedValueParser<Value = Reason> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(Reason::CHOICES.map(Reason::name))
        .try_map(|name| name.parse::<Reason>())
}

/// The steps that follow a new CRL, for the operator.
fn say_install_crl(ca: &Path, crl_days: u32) {
    say!(
        "install it on every node as tls.crl; a running meshtun picks up a changed file within \
         seconds (or run `systemctl reload meshtun`)"
    );
    say!(
        "it is current for {crl_days} days (nodes keep enforcing it after that): re-sign it \
         before then with `meshtun pki crl --ca {}`",
        ca.display()
    );
}

fn entries(count: usize) -> String {
    match count {
        1 => "1 entry".to_string(),
        count => format!("{count} entries"),
    }
}

fn init_ca(cluster: &str, out: &Path, days: u32, force: bool) -> Result<(), PkiError> {
    let authority = Authority::generate(cluster, Validity::days_from_now(days))?;
    let (cert, key) = authority.write(out, force)?;
    say!(
        "wrote {} and {} (cluster {cluster:?}, {days} days)",
        cert.display(),
        key.display()
    );
    // Any CRL already there belongs to another CA (a new CA was just
    // written), so it is replaced by this CA's empty one.
    let crl = RevocationList::new().write(&authority, out, SystemTime::now(), DEFAULT_CRL_DAYS)?;
    say!(
        "wrote {} (an empty revocation list; configure it as tls.crl to enforce revocation \
         from day one)",
        crl.display()
    );
    say!("keep ca.key offline or on one trusted host; copy only ca.crt and crl.pem to the nodes");
    Ok(())
}

fn revoke(
    ca: &Path,
    serial: Option<Serial>,
    cert: Option<&Path>,
    reason: Option<Reason>,
    crl_days: u32,
) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let target = match (cert, serial) {
        (Some(cert), _) => RevocationTarget::load(cert, &authority)?,
        (None, Some(serial)) => RevocationTarget { serial, node: None },
        (None, None) => {
            // clap requires one of the two; keep the function total anyway.
            return Err(PkiError::Serial {
                input: String::new(),
                detail: "give --serial HEX or --cert FILE".to_string(),
            });
        }
    };
    let who = target
        .node
        .as_ref()
        .map(|node| format!(" ({node})"))
        .unwrap_or_default();
    let mut list = RevocationList::load(ca, &authority)?.unwrap_or_default();
    let now = SystemTime::now();
    if !list.revoke(target.serial.clone(), reason, now) {
        say!(
            "serial {}{who} is already revoked in {} (CRL number {}, {}); nothing changed",
            target.serial,
            ca.join(CRL_FILE).display(),
            list.number(),
            entries(list.entries().len())
        );
        return Ok(());
    }
    let path = list.write(&authority, ca, now, crl_days)?;
    let why = reason
        .map(|reason| format!(", reason {reason}"))
        .unwrap_or_default();
    say!(
        "revoked serial {}{who}{why}; CRL number {} with {} written to {}",
        target.serial,
        list.number(),
        entries(list.entries().len()),
        path.display()
    );
    say_install_crl(ca, crl_days);
    Ok(())
}

fn resign_crl(ca: &Path, crl_days: u32) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let mut list = RevocationList::load(ca, &authority)?.unwrap_or_default();
    let path = list.write(&authority, ca, SystemTime::now(), crl_days)?;
    say!(
        "CRL number {} with {} written to {}",
        list.number(),
        entries(list.entries().len()),
        path.display()
    );
    say_install_crl(ca, crl_days);
    Ok(())
}

fn renew(
    ca: &Path,
    cert: &Path,
    key: Option<PathBuf>,
    new_key: bool,
    days: u32,
    out: Option<PathBuf>,
) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let key = (!new_key).then(|| key.unwrap_or_else(|| cert.with_extension("key")));
    let renewed = authority.renew_files(cert, key.as_deref(), Validity::days_from_now(days))?;
    // Extending a revoked certificate's key would undo the revocation.
    if key.is_some() {
        if let Some(list) = RevocationList::load(ca, &authority)? {
            if list.is_revoked(&renewed.previous_serial) {
                return Err(PkiError::Renew {
                    origin: cert.display().to_string(),
                    detail: format!(
                        "its serial {} is revoked in {}; its key may be compromised, so \
                         renew it only with --new-key",
                        renewed.previous_serial,
                        ca.join(CRL_FILE).display()
                    ),
                });
            }
        }
    }
    let out = out.unwrap_or_else(|| match cert.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    });
    let (cert_path, key_path) = renewed.write(&out)?;
    if let Some(issuer) = &renewed.previous_issuer {
        say!("note: the previous certificate was issued by another CA ({issuer})");
    }
    match (&key_path, &key) {
        (Some(key_path), _) => say!(
            "wrote {} and a new key {} (node {}, serial {}, {days} days)",
            cert_path.display(),
            key_path.display(),
            renewed.node,
            renewed.serial
        ),
        (None, Some(key)) => say!(
            "wrote {} (node {}, serial {}, {days} days), keeping the key in {}",
            cert_path.display(),
            renewed.node,
            renewed.serial,
            key.display()
        ),
        (None, None) => say!("wrote {}", cert_path.display()),
    }
    if key_path.is_some() {
        say!(
            "the previous certificate (serial {}) and key stay valid until it expires; revoke \
             it with `meshtun pki revoke --ca {} --serial {}` once the node runs the new one",
            renewed.previous_serial,
            ca.display(),
            renewed.previous_serial
        );
    }
    Ok(())
}

// ------------------------------------------------------------ enrollment

/// The longest a join token may be valid.
const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How long `pki serve` lets exchanges in progress finish on a signal.
const SERVE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// `--ttl`: a whole number and a unit s, m, h or d, from 1s to 30d.
fn parse_token_ttl(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 30m, 1h or 2d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    let ttl = std::time::Duration::from_secs(number.saturating_mul(unit));
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(format!("{text} is outside 1s..30d"));
    }
    Ok(ttl)
}

/// `meshtun pki token`.
fn enroll_token(
    ca: &Path,
    node: NodeName,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
    ttl: std::time::Duration,
    server: Option<&str>,
    join_out: &Path,
) -> ExitCode {
    use meshtun_pki::{CaFingerprint, EnrollError, Grant, TokenStore};

    let authority = match Authority::load(ca) {
        Ok(authority) => authority,
        Err(problem) => {
            eprintln!("error: {problem}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    let store = TokenStore::new(ca);
    let grant = Grant { node, ips, dns };
    let made = match store.create(&grant, ttl, SystemTime::now()) {
        Ok(made) => made,
        Err(problem) => {
            eprintln!("error: {problem}");
            let code = match &problem {
                EnrollError::Pki(PkiError::DnsName { .. }) => crate::EXIT_USAGE,
                EnrollError::TokensFile { .. }
                | EnrollError::Pki(PkiError::KeyPermissions { .. }) => crate::EXIT_CONFIG,
                _ => EXIT_RUNTIME,
            };
            return ExitCode::from(code);
        }
    };
    let node = &grant.node;
    let fingerprint = CaFingerprint::of_authority(&authority);
    let token = made.token.reveal();
    say!(
        "join token for {node} (single use, valid until {}):",
        meshtun_pki::format_utc(made.expires_at)
    );
    say!("  {token}");
    say!("CA fingerprint: {fingerprint}");
    say!(
        "{} keeps only the token's SHA-256; this is the only time the token is shown.",
        store.path().display()
    );
    say!(
        "with `meshtun pki serve --ca {} --listen ADDR` running, run on {node}:",
        ca.display()
    );
    say!(
        "  meshtun join --server {} --ca-fingerprint {fingerprint} --token {token} --node {node} --out {}",
        server.unwrap_or("CA-HOST:PORT"),
        join_out.display()
    );
    ExitCode::SUCCESS
}

/// `meshtun pki serve`.
fn enroll_serve(ca: &Path, listen: std::net::SocketAddr, days: u32) -> ExitCode {
    use meshtun_node::enroll::EnrollServer;
    use meshtun_pki::{CaFingerprint, Enroller, TokenStore};
    use tokio::signal::unix::{signal, SignalKind};
    use tracing::{error, info};

    let _junk = crate::init_logging("info", crate::LogFormat::Text);
    let authority = match Authority::load(ca) {
        Ok(authority) => authority,
        Err(problem) => {
            error!("{problem}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    let store = TokenStore::new(ca);
    let tokens = match store.check() {
        Ok(tokens) => tokens,
        Err(problem) => {
            error!("{problem}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    let fingerprint = CaFingerprint::of_authority(&authority);
    let cluster = authority.cluster().to_owned();
    let runtime = match crate::runtime() {
        Ok(runtime) => runtime,
        Err(problem) => {
            error!("cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async move {
        let (mut terminate, mut interrupt) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
            (Err(problem), _) | (_, Err(problem)) => {
                error!("cannot listen for signals: {problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let server = match EnrollServer::start(
            listen,
            Enroller::new(authority, store.clone(), days),
        )
        .await
        {
            Ok(server) => server,
            Err(problem) => {
                error!("{problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let local = server.local_addr();
        say!("listening on {local}");
        say!("CA fingerprint: {fingerprint}");
        info!(
            listen = %local,
            cluster,
            ca = %fingerprint,
            tokens = %store.path().display(),
            recorded_tokens = tokens,
            days,
            "enrollment server ready"
        );
        let mut health = tokio::time::interval(std::time::Duration::from_secs(1));
        let signal = loop {
            tokio::select! {
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = health.tick() => if !server.is_running() {
                    error!("the enrollment accept loop has stopped");
                    return ExitCode::from(EXIT_RUNTIME);
                },
            }
        };
        info!(signal, "stopping the enrollment server");
        server.shutdown(SERVE_GRACE).await;
        ExitCode::SUCCESS
    })
}
