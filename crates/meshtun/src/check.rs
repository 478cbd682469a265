//! `meshtun check`: every problem with a configuration and its certificates,
//! reported at once, so an operator fixes them in one pass.

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use meshtun_config::Config;
use meshtun_pki::{NodeCredentials, PkiError, Serial, TrustBundle};

use crate::watch::{expiry_in_words, seconds_until};
use crate::EXIT_CONFIG;

/// Below this many days left, `check` warns about the certificate's expiry:
/// the daemon's first warning threshold.
const EXPIRY_WARNING_DAYS: u64 = crate::watch::EXPIRY_WARNING_DAYS[0].unsigned_abs();

/// What `check` found, in the order it looked.
#[derive(Debug, Default)]
struct Report {
    errors: Vec<String>,
    warnings: Vec<String>,
    facts: Vec<String>,
}

pub(crate) fn check(path: &Path) -> ExitCode {
    let mut report = Report::default();
    match meshtun_config::load(path) {
        Ok(config) => {
            report.facts.push(format!(
                "node {}: {} peer(s), {} forward(s), {} expose(s), QUIC on {}",
                config.node,
                config.peers.len(),
                config.forwards.len(),
                config.exposes.len(),
                config.quic.listen
            ));
            check_tls(&config, &mut report, SystemTime::now());
        }
        Err(errors) => {
            report.errors.extend(errors.iter().map(ToString::to_string));
        }
    }
    for fact in &report.facts {
        say!("ok: {fact}");
    }
    for warning in &report.warnings {
        say!("warning: {warning}");
    }
    for error in &report.errors {
        say!("error: {error}");
    }
    if report.errors.is_empty() {
        say!("{}: OK", path.display());
        ExitCode::SUCCESS
    } else {
        say!("{}: {} problem(s)", path.display(), report.errors.len());
        ExitCode::from(EXIT_CONFIG)
    }
}

fn check_tls(config: &Config, report: &mut Report, now: SystemTime) {
    let tls = &config.tls;
    let trust = match TrustBundle::load(&tls.ca, tls.crl.as_deref()) {
        Ok(trust) => {
            report.facts.push(format!(
                "tls.ca: {} CA certificate(s) in {}",
                trust.len(),
                tls.ca.display()
            ));
            Some(trust)
        }
        Err(problem @ PkiError::Crl { .. }) => {
            report.errors.push(format!("tls.crl: {problem}"));
            None
        }
        Err(problem) => {
            report.errors.push(format!("tls.ca: {problem}"));
            None
        }
    };
    if let (Some(crl), Some(_)) = (&tls.crl, &trust) {
        describe_crls(&tls.ca, crl, report, now);
    }
    // A key file that cannot even be looked at (missing, say) is reported
    // once, by the read below, which fails on it too.
    if let Ok(Some(problem)) = meshtun_pki::key_file_mode_problem(&tls.key) {
        report.errors.push(format!("tls.key: {problem}"));
    }
    // Read the files directly so that a key with bad permissions still gets
    // its other checks (identity, key match, expiry) in the same run.
    let cert_pem = std::fs::read_to_string(&tls.cert)
        .map_err(|error| {
            report.errors.push(format!(
                "tls.cert: cannot read {}: {error}",
                tls.cert.display()
            ))
        })
        .ok();
    let key_pem = std::fs::read_to_string(&tls.key)
        .map_err(|error| {
            report.errors.push(format!(
                "tls.key: cannot read {}: {error}",
                tls.key.display()
            ))
        })
        .ok();
    let (Some(cert_pem), Some(key_pem)) = (cert_pem, key_pem) else {
        return;
    };
    let credentials = match NodeCredentials::from_pem(&cert_pem, &key_pem) {
        Ok(credentials) => credentials,
        Err(problem) => {
            report.errors.push(format!("tls.cert/tls.key: {problem}"));
            return;
        }
    };
    if credentials.identity() != &config.node {
        report.errors.push(format!(
            "tls.cert: certificate identity is {:?} but node = {:?}; the certificate must name this node",
            credentials.identity().as_str(),
            config.node.as_str()
        ));
    } else {
        report.facts.push(format!(
            "tls.cert: identity {} matches node, key matches certificate",
            credentials.identity()
        ));
    }
    if let Some(trust) = &trust {
        if let Err(problem) = trust.verify_node(&credentials, now) {
            report
                .errors
                .push(untrusted_node(config, &credentials, &problem));
        }
    }
    expiry(&credentials, now, report);
    check_cluster_name(config, &credentials, report);
    if let Some(renew) = &tls.renew {
        check_renewal(config, renew, report);
    }
}

/// The manifest's `cluster` must be the trust domain of this node's
/// certificate (`spiffe://<cluster>/node/<name>`), if it names one.
fn check_cluster_name(config: &Config, credentials: &NodeCredentials, report: &mut Report) {
    let Some(manifest_cluster) = config.cluster.as_ref().and_then(|c| c.name.as_deref()) else {
        return;
    };
    let Some(leaf) = credentials.chain().first() else {
        return;
    };
    let certificate_cluster = meshtun_pki::node_cluster_of(leaf);
    match certificate_cluster {
        Some(cluster) if cluster != manifest_cluster => report.errors.push(format!(
            "cluster: the manifest is for cluster {manifest_cluster:?}, but tls.cert is a \
             certificate of cluster {cluster:?}"
        )),
        Some(_) => report.facts.push(format!(
            "cluster: manifest of cluster {manifest_cluster:?}, as the certificate"
        )),
        None => report.warnings.push(format!(
            "cluster: tls.cert names no cluster (no URI SAN spiffe://<cluster>/node/<name>), so \
             it cannot be checked against the manifest's {manifest_cluster:?}"
        )),
    }
}

/// `[tls] renew`: says where and when, and that the daemon can write the
/// files it will replace (as the user `check` runs as: run it as the
/// service's user, as the systemd unit does).
fn check_renewal(config: &Config, renew: &meshtun_config::Renew, report: &mut Report) {
    report.facts.push(format!(
        "tls.renew: renews from {} at {}% of the certificate's lifetime",
        renew.server, renew.at_percent
    ));
    if renew
        .ca_fingerprint
        .parse::<meshtun_pki::CaFingerprint>()
        .is_err()
    {
        report.errors.push(format!(
            "tls.renew.ca_fingerprint: {:?} is not a CA fingerprint",
            renew.ca_fingerprint
        ));
    }
    for (key, path) in [("tls.cert", &config.tls.cert), ("tls.key", &config.tls.key)] {
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if let Err(errno) = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) {
            report.errors.push(format!(
                "{key}: tls.renew replaces {} and its .prev copy, but {} is not writable for \
                 this user ({errno}); under systemd keep the certificate and key in \
                 /etc/meshtun/keys (see examples/systemd/README.md)",
                path.display(),
                dir.display()
            ));
        }
    }
}

/// One line per CRL in `tls.crl`: whose it is, its number, how many it
/// revokes and when the next is due; a warning when that date has passed,
/// and one for each CA in `tls.ca` that has no CRL in the file (with CRLs
/// configured, every certificate of such a CA is refused).
fn describe_crls(ca: &Path, path: &Path, report: &mut Report, now: SystemTime) {
    // TrustBundle::load read both a moment ago; say so if they changed since.
    let crls = match meshtun_pki::inspect_crl_file(path) {
        Ok(crls) => crls,
        Err(problem) => return report.errors.push(format!("tls.crl: {problem}")),
    };
    let cas = match meshtun_pki::inspect_file(ca) {
        Ok(cas) => cas,
        Err(problem) => return report.errors.push(format!("tls.ca: {problem}")),
    };
    for ca in cas
        .iter()
        .filter(|ca| !crls.iter().any(|crl| crl.issuer == ca.subject))
    {
        report.warnings.push(format!(
            "tls.crl: holds no CRL of the CA \"{}\" in tls.ca, so nodes refuse every \
             certificate that CA issued; add its CRL to {} (`meshtun pki crl` writes one)",
            ca.subject,
            path.display()
        ));
    }
    for crl in &crls {
        let line = format!(
            "tls.crl: CRL number {} of \"{}\" revokes {} certificate(s); next update {}",
            crl.number.as_deref().unwrap_or("(none)"),
            crl.issuer,
            crl.revoked.len(),
            crl.next_update_state(now)
        );
        if crl.next_update.is_some_and(|next| next <= now) {
            report.warnings.push(line);
        } else {
            report.facts.push(line);
        }
    }
}

/// Why this node's own certificate fails against its trust bundle, in the
/// operator's terms: revoked by tls.crl, no CRL of its CA in tls.crl, or
/// not chaining to tls.ca.
pub(crate) fn untrusted_node(
    config: &Config,
    credentials: &NodeCredentials,
    problem: &PkiError,
) -> String {
    let crl = config
        .tls
        .crl
        .as_ref()
        .map(|path| path.display().to_string())
        .unwrap_or_default();
    let serial = credentials
        .chain()
        .first()
        .and_then(|leaf| Serial::of_certificate(leaf).ok())
        .map(|serial| serial.to_string())
        .unwrap_or_default();
    if problem.is_revoked() {
        format!(
            "tls.cert: certificate {serial} of {} is revoked by tls.crl ({crl}): peers that \
             load this CRL refuse it; give this node a new certificate and key \
             (`meshtun pki renew --new-key`)",
            credentials.identity()
        )
    } else if problem.is_unknown_revocation_status() {
        format!(
            "tls.cert: tls.crl ({crl}) holds no CRL from the CA that issued this certificate, \
             so its revocation status is unknown and peers that load this CRL refuse it; add \
             that CA's CRL to the file (`meshtun pki crl` writes one)"
        )
    } else {
        format!("tls.cert: does not verify against tls.ca: {problem}")
    }
}

fn expiry(credentials: &NodeCredentials, now: SystemTime, report: &mut Report) {
    if credentials.not_before() > now {
        report
            .errors
            .push("tls.cert: certificate is not valid yet (check the clock)".to_owned());
    }
    let left = seconds_until(credentials.not_after(), now);
    let line = format!("tls.cert: certificate {}", expiry_in_words(left));
    if left <= 0 {
        report
            .errors
            .push(format!("{line}; renew it with `meshtun pki renew`"));
    } else if left.unsigned_abs() < EXPIRY_WARNING_DAYS * 86_400 {
        report
            .warnings
            .push(format!("{line}; renew it with `meshtun pki renew`"));
    } else {
        report.facts.push(line);
    }
}
