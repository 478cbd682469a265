//! `meshtun pki`: a small cluster CA. Keys are written 0600 and never
//! overwritten without `--force` (except by `renew --new-key`, whose point
//! that is). The CA's revocation list lives beside it as `DIR/crl.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use meshtun_pki::{
    Authority, Issuance, IssuedRecord, Ledger, PkiError, Reason, RevocationList, RevocationTarget,
    Serial, Validity, CRL_FILE,
};
use meshtun_proto::NodeName;

use crate::EXIT_RUNTIME;

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// Create a cluster CA: writes DIR/ca.crt, DIR/ca.key (0600) and an
    /// empty revocation list DIR/crl.pem.
    InitCa {
        /// The cluster's name (the trust domain in spiffe://<cluster>/node/<name>):
        /// lowercase ASCII letters, digits, '.', '-' and '_', at most 255.
        #[arg(long, value_parser = parse_cluster)]
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
        #[command(flatten)]
        lifetime: LifetimeArgs,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a single-use join token for a node (`meshtun join` on the node
    /// trades it for a certificate); DIR/tokens.json keeps only its hash.
    ///
    /// Prints the token, the CA fingerprint and two lines to run on the
    /// node: `read -rs MESHTUN_JOIN_TOKEN && export MESHTUN_JOIN_TOKEN`, at
    /// whose silent prompt the token is pasted, then `meshtun join` without
    /// the token, which reads it from MESHTUN_JOIN_TOKEN: a token on the
    /// command line would show in `ps` and the shell history.
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
        /// How long the certificate is valid: a number and s, m, h or d,
        /// from 1m to 3650d (e.g. 12h) [default: what `pki serve` issues].
        #[arg(long, value_name = "DURATION", value_parser = parse_lifetime)]
        valid_for: Option<std::time::Duration>,
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
        /// How long the certificates it issues are valid, unless a token
        /// says otherwise; a renewal lasts as long as the certificate it
        /// renews, at most this.
        #[command(flatten)]
        lifetime: LifetimeArgs,
    },
    /// Print subject, SANs, identity, fingerprint and validity of a certificate file
    /// (or issuer, number, dates and revoked serials of a CRL file).
    Inspect {
        /// A PEM file with one or more certificates, or with CRLs.
        file: PathBuf,
    },
    /// Revoke a node certificate: adds its serial to DIR/crl.pem and re-signs
    /// the CRL with the next CRL number.
    #[command(group(clap::ArgGroup::new("revoked").required(true).args(["serial", "cert", "node"])))]
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
        /// Revoke every unexpired certificate the ledger (DIR/issued.json)
        /// records for this node: what it was issued, renewed and joined with.
        #[arg(long, value_name = "NAME")]
        node: Option<NodeName>,
        /// Why, recorded in the CRL.
        #[arg(long, value_parser = reason_parser())]
        reason: Option<Reason>,
        /// Days until the CRL's nextUpdate.
        #[arg(long, default_value_t = DEFAULT_CRL_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        crl_days: u32,
    },
    /// Show the issuance ledger DIR/issued.json: every certificate this CA
    /// issued (by issue, renew, join or a node's own renewal) and whether it
    /// is valid, expired or revoked now.
    List {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Only this node's certificates.
        #[arg(long, value_name = "NAME")]
        node: Option<NodeName>,
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
        #[command(flatten)]
        lifetime: LifetimeArgs,
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
            valid_for,
            ttl,
            server,
            join_out,
        } => {
            let grant = meshtun_enroll::Grant {
                node,
                ips,
                dns,
                valid_for,
            };
            return enroll_token(&ca, grant, ttl, server.as_deref(), &join_out);
        }
        PkiCommand::Serve {
            ca,
            listen,
            lifetime,
        } => return enroll_serve(&ca, listen, lifetime.lifetime()),
        PkiCommand::Issue {
            ca,
            node,
            ips,
            dns,
            lifetime,
            out,
            force,
        } => issue(&ca, &node, &ips, &dns, lifetime.lifetime(), &out, force),
        PkiCommand::List { ca, node } => list(&ca, node.as_ref()),
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
            node,
            reason,
            crl_days,
        } => match node {
            Some(node) => revoke_node(&ca, &node, reason, crl_days),
            None => revoke(&ca, serial, cert.as_deref(), reason, crl_days),
        },
        PkiCommand::Crl { ca, crl_days } => resign_crl(&ca, crl_days),
        PkiCommand::Renew {
            ca,
            cert,
            key,
            new_key,
            lifetime,
            out,
        } => renew(&ca, &cert, key, new_key, lifetime.lifetime(), out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("error: {problem}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `--days` or `--valid-for`: how long a node certificate is valid.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct LifetimeArgs {
    /// Validity in days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Validity as a number and s, m, h or d (e.g. 12h), instead of --days;
    /// from 1m to 3650d. Short-lived certificates renew themselves (see
    /// `[tls] renew` in the configuration).
    #[arg(long, value_name = "DURATION", value_parser = parse_lifetime, conflicts_with = "days")]
    valid_for: Option<std::time::Duration>,
}

impl LifetimeArgs {
    fn lifetime(self) -> std::time::Duration {
        self.valid_for.unwrap_or(std::time::Duration::from_secs(
            u64::from(self.days) * 86_400,
        ))
    }
}

/// The shortest and longest `--valid-for`.
const LIFETIME_RANGE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(60),
    std::time::Duration::from_secs(3650 * 86_400),
);

/// `--valid-for`: a whole number and a unit s, m, h or d, from 1m to 3650d.
pub(crate) fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let lifetime = parse_duration(text)?;
    let (shortest, longest) = LIFETIME_RANGE;
    if lifetime < shortest || lifetime > longest {
        return Err(format!("{text} is outside 1m..3650d"));
    }
    Ok(lifetime)
}

/// A whole number and a unit s, m, h or d.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 30m, 12h or 2d"))?;
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
    Ok(std::time::Duration::from_secs(number.saturating_mul(unit)))
}

/// A lifetime in its largest whole unit: "365 days", "12 hours", "2 minutes".
fn lifetime_text(lifetime: std::time::Duration) -> String {
    let seconds = lifetime.as_secs();
    let (count, unit) = [(86_400, "day"), (3600, "hour"), (60, "minute")]
        .into_iter()
        .find(|(size, _)| seconds >= *size && seconds % size == 0)
        .map_or((seconds, "second"), |(size, unit)| (seconds / size, unit));
    if count == 1 {
        format!("1 {unit}")
    } else {
        format!("{count} {unit}s")
    }
}

/// `meshtun pki issue`: the certificate is recorded in the ledger before
/// its files are written.
fn issue(
    ca: &Path,
    node: &NodeName,
    ips: &[IpAddr],
    dns: &[String],
    lifetime: std::time::Duration,
    out: &Path,
    force: bool,
) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let issued = authority.issue(node, ips, dns, Validity::from_now(lifetime))?;
    let now = SystemTime::now();
    let record = IssuedRecord::of_pem(&issued.cert_pem, Issuance::Issue, None, now)?;
    let serial = record.serial.clone();
    Ledger::new(ca).record(record, now)?;
    let (cert, key) = issued.write(out, node, force)?;
    say!(
        "wrote {} and {} (node {node}, serial {serial}, {})",
        cert.display(),
        key.display(),
        lifetime_text(lifetime)
    );
    Ok(())
}

/// `meshtun pki list`.
fn list(ca: &Path, node: Option<&NodeName>) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let revoked = RevocationList::load(ca, &authority)?.unwrap_or_default();
    let ledger = Ledger::new(ca);
    let now = SystemTime::now();
    let records: Vec<IssuedRecord> = ledger
        .records()?
        .into_iter()
        .filter(|record| node.is_none_or(|node| record.node == node.as_str()))
        .collect();
    if records.is_empty() {
        say!(
            "no certificates recorded in {}{}",
            ledger.path().display(),
            node.map(|node| format!(" for node {node}"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    say!(
        "{:<10} {:<20} {:<8} {:<10} {:<20} {}",
        "STATE",
        "NODE",
        "HOW",
        "ISSUED",
        "NOT AFTER",
        "SERIAL"
    );
    for record in &records {
        let state = if record
            .serial()
            .is_ok_and(|serial| revoked.is_revoked(&serial))
        {
            "revoked"
        } else if record.expired_at(now) {
            "expired"
        } else {
            "valid"
        };
        let issued = meshtun_pki::format_utc(record.issued_at_time());
        say!(
            "{:<10} {:<20} {:<8} {:<10} {:<20} {}",
            state,
            record.node,
            record.how,
            issued.get(..10).unwrap_or(&issued),
            meshtun_pki::format_utc(record.not_after_time()),
            record.serial
        );
    }
    Ok(())
}

/// `meshtun pki revoke --node`: every unexpired certificate of the node in
/// the ledger, in one new CRL.
fn revoke_node(
    ca: &Path,
    node: &NodeName,
    reason: Option<Reason>,
    crl_days: u32,
) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let ledger = Ledger::new(ca);
    // Held until the CRL is written: a renewal (which checks the CRL and
    // records under the same lock) cannot slip a new certificate in between.
    let locked = ledger.locked()?;
    let now = SystemTime::now();
    let records: Vec<IssuedRecord> = locked
        .records()?
        .into_iter()
        .filter(|record| record.node == node.as_str() && !record.expired_at(now))
        .collect();
    if records.is_empty() {
        return Err(PkiError::Ledger {
            path: ledger.path(),
            detail: format!(
                "records no unexpired certificate of node {node}; nothing to revoke (a \
                 certificate issued before the ledger existed is revoked with --cert FILE or \
                 --serial HEX)"
            ),
        });
    }
    let mut list = RevocationList::load(ca, &authority)?.unwrap_or_default();
    let mut added = Vec::new();
    for record in &records {
        let serial = record.serial()?;
        if list.revoke(serial.clone(), reason, now) {
            added.push(serial);
        }
    }
    if added.is_empty() {
        say!(
            "every unexpired certificate of node {node} ({}) is already revoked in {}; \
             nothing changed",
            records.len(),
            ca.join(CRL_FILE).display()
        );
        return Ok(());
    }
    let path = list.write(&authority, ca, now, crl_days)?;
    for serial in &added {
        say!("revoked serial {serial} ({node})");
    }
    say!(
        "revoked {} of node {node}; CRL number {} with {} written to {}",
        match added.len() {
            1 => "1 certificate".to_owned(),
            count => format!("{count} certificates"),
        },
        list.number(),
        entries(list.entries().len()),
        path.display()
    );
    say_install_crl(ca, crl_days);
    Ok(())
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

/// `--cluster`: a name `Authority::generate` accepts (a SPIFFE trust
/// domain), so a bad one is a usage error (exit 64) that names the rule,
/// before any key is made or file written.
fn parse_cluster(text: &str) -> Result<String, String> {
    match meshtun_pki::check_cluster(text) {
        Ok(()) => Ok(text.to_owned()),
        Err(PkiError::ClusterName { detail, .. }) => Err(detail),
        Err(other) => Err(other.to_string()),
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
    lifetime: std::time::Duration,
    out: Option<PathBuf>,
) -> Result<(), PkiError> {
    let authority = Authority::load(ca)?;
    let key = (!new_key).then(|| key.unwrap_or_else(|| cert.with_extension("key")));
    let renewed = authority.renew_files(cert, key.as_deref(), Validity::from_now(lifetime))?;
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
    let now = SystemTime::now();
    let record = IssuedRecord::of_pem(
        &renewed.cert_pem,
        Issuance::Renew,
        Some(&renewed.previous_serial),
        now,
    )?;
    Ledger::new(ca).record(record, now)?;
    let (cert_path, key_path) = renewed.write(&out)?;
    let days = lifetime_text(lifetime);
    if let Some(issuer) = &renewed.previous_issuer {
        say!("note: the previous certificate was issued by another CA ({issuer})");
    }
    match (&key_path, &key) {
        (Some(key_path), _) => say!(
            "wrote {} and a new key {} (node {}, serial {}, {days})",
            cert_path.display(),
            key_path.display(),
            renewed.node,
            renewed.serial
        ),
        (None, Some(key)) => say!(
            "wrote {} (node {}, serial {}, {days}), keeping the key in {}",
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
    let ttl = parse_duration(text)?;
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(format!("{text} is outside 1s..30d"));
    }
    Ok(ttl)
}

/// `meshtun pki token`.
fn enroll_token(
    ca: &Path,
    grant: meshtun_enroll::Grant,
    ttl: std::time::Duration,
    server: Option<&str>,
    join_out: &Path,
) -> ExitCode {
    use meshtun_enroll::{CaFingerprint, EnrollError, TokenStore};

    let authority = match Authority::load(ca) {
        Ok(authority) => authority,
        Err(problem) => {
            eprintln!("error: {problem}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    let store = TokenStore::new(ca);
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
        "with `meshtun pki serve --ca {} --listen ADDR` running, run on {node} (bash or zsh), \
         pasting the token at the silent prompt of the first line: in MESHTUN_JOIN_TOKEN it \
         stays out of the process list and the shell history",
        ca.display()
    );
    let server = server.unwrap_or("CA-HOST:PORT");
    for line in join_commands(server, &fingerprint, node, join_out) {
        say!("  {line}");
    }
    ExitCode::SUCCESS
}

/// The shell lines `pki token` prints for the node: a silent prompt that
/// puts the token in `MESHTUN_JOIN_TOKEN`, then `meshtun join` without it.
/// A token on the command line would show in `ps` and the shell history.
fn join_commands(
    server: &str,
    fingerprint: &meshtun_enroll::CaFingerprint,
    node: &NodeName,
    out: &Path,
) -> [String; 2] {
    [
        "read -rs MESHTUN_JOIN_TOKEN && export MESHTUN_JOIN_TOKEN".to_owned(),
        format!(
            "meshtun join --server {server} --ca-fingerprint {fingerprint} --node {node} --out {}",
            out.display()
        ),
    ]
}

/// `meshtun pki serve`.
fn enroll_serve(
    ca: &Path,
    listen: std::net::SocketAddr,
    lifetime: std::time::Duration,
) -> ExitCode {
    use meshtun_enroll::{CaFingerprint, EnrollServer, Enroller, TokenStore, MAX_CONNECTIONS};
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
        let server = match EnrollServer::new(Enroller::new(authority, store.clone(), lifetime)) {
            Ok(server) => server,
            Err(problem) => {
                error!("cannot make the enrollment server's certificate: {problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let (listener, local) = match bind_enrollment(listen).await {
            Ok(bound) => bound,
            Err(problem) => {
                error!("cannot listen on {listen}: {problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let admitting = server.clone();
        let accept = tokio::spawn(meshtun_node::accept_each(
            "enrollment",
            listener,
            MAX_CONNECTIONS,
            stop.clone(),
            move |permit, tcp, source| admitting.admit(permit, tcp, source),
        ));
        say!("listening on {local}");
        say!("CA fingerprint: {fingerprint}");
        info!(
            listen = %local,
            cluster,
            ca = %fingerprint,
            tokens = %store.path().display(),
            recorded_tokens = tokens,
            lifetime = %lifetime_text(lifetime),
            "enrollment server ready"
        );
        let mut health = tokio::time::interval(std::time::Duration::from_secs(1));
        let signal = loop {
            tokio::select! {
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = health.tick() => if accept.is_finished() {
                    error!("the enrollment accept loop has stopped");
                    return ExitCode::from(EXIT_RUNTIME);
                },
            }
        };
        info!(signal, "stopping the enrollment server");
        // No connection is admitted once the accept loop has ended.
        stop.cancel();
        let _ = accept.await;
        server.shutdown(SERVE_GRACE).await;
        ExitCode::SUCCESS
    })
}

/// Binds the listener of `meshtun pki serve` at `listen`, and says where it
/// is (port 0 becomes real).
async fn bind_enrollment(
    listen: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
