//! A node's configuration and the certificates it names, loaded and checked
//! together, every problem reported at once: what `meshtun check` prints, and
//! what `meshtun run` (at start and on every reload) refuses to start on.
//! One set of checks, so `check` says exactly what a start would.

use std::path::Path;
use std::time::SystemTime;

use meshtun_config::Config;
use meshtun_pki::{NodeCredentials, PkiError, Serial, TrustBundle};

use crate::watch::{expiry_in_words, seconds_until};

/// Below this many days left, the certificate's expiry is a warning: the
/// daemon's first warning threshold.
const EXPIRY_WARNING_DAYS: u64 = crate::watch::EXPIRY_WARNING_DAYS[0].unsigned_abs();

/// What the checks found, in the order they looked. Any error means the
/// node must not start (or reload) on these files.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) errors: Vec<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) facts: Vec<String>,
}

/// A configuration with its certificates, loaded and checked together.
#[derive(Debug)]
pub(crate) struct Material {
    pub(crate) config: Config,
    pub(crate) credentials: NodeCredentials,
    pub(crate) trust: TrustBundle,
}

/// How much `inspect` says beyond the errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Every fact and warning too, for `meshtun check`.
    Describe,
    /// The errors (and what facts come free), for the daemon at start and
    /// on reload.
    Errors,
}

/// Loads `path` and the files it names and checks them all, at `now`. The
/// material is there only when the report holds no error. Both levels of
/// `detail` find the same errors.
pub(crate) fn inspect(path: &Path, now: SystemTime, detail: Detail) -> (Report, Option<Material>) {
    let mut report = Report::default();
    let config = match meshtun_config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            report.errors.extend(errors.iter().map(ToString::to_string));
            return (report, None);
        }
    };
    report.facts.push(format!(
        "node {}: {} peer(s), {} forward(s), {} expose(s), QUIC on {}",
        config.node,
        config.peers.len(),
        config.forwards.len(),
        config.exposes.len(),
        config.quic.listen
    ));
    let loaded = check_tls(&config, &mut report, now, detail);
    let material = match loaded {
        Some((credentials, trust)) if report.errors.is_empty() => Some(Material {
            config,
            credentials,
            trust,
        }),
        _ => None,
    };
    (report, material)
}

/// [`inspect`] for the daemon: the material, or every error.
pub(crate) fn load(path: &Path) -> Result<Material, Vec<String>> {
    match inspect(path, SystemTime::now(), Detail::Errors) {
        (_, Some(material)) => Ok(material),
        (report, None) => Err(report.errors),
    }
}

/// The `[tls]` files: the CA bundle and CRLs, the key's mode, the
/// certificate and key (and the stateless-reset secret beside the key), the
/// identity, trust, expiry, the cluster name and renewal. The credentials and
/// trust bundle, when both could be loaded.
fn check_tls(
    config: &Config,
    report: &mut Report,
    now: SystemTime,
    detail: Detail,
) -> Option<(NodeCredentials, TrustBundle)> {
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
    if let (Some(crl), Some(trust), Detail::Describe) = (&tls.crl, &trust, detail) {
        describe_crls(trust, crl, report, now);
    }
    let credentials = load_credentials(&tls.cert, &tls.key, report);
    if let Some(credentials) = &credentials {
        check_credentials(config, credentials, trust.as_ref(), report, now);
    }
    // Renewal needs no credentials: checked even when they failed to load.
    if let Some(renew) = &tls.renew {
        check_renewal(config, renew, report);
    }
    credentials.zip(trust)
}

/// The certificate and key, or `None` with the problem in the report.
fn load_credentials(cert: &Path, key: &Path, report: &mut Report) -> Option<NodeCredentials> {
    // A key its group or others may read is an error, but the rest is
    // checked all the same, so that one run names every problem. (A key
    // file that cannot even be looked at is reported once, by the load.)
    let open_key = match meshtun_pki::key_file_mode_problem(key) {
        Ok(Some(problem)) => {
            report.errors.push(format!("tls.key: {problem}"));
            true
        }
        _ => false,
    };
    let loaded = if open_key {
        NodeCredentials::load_ignoring_key_mode(cert, key)
    } else {
        NodeCredentials::load(cert, key)
    };
    loaded
        .map_err(|problem| report.errors.push(credentials_problem(cert, &problem)))
        .ok()
}

/// The loaded credentials against the configuration and the trust bundle
/// (when that loaded): identity, trust, expiry, the cluster name.
fn check_credentials(
    config: &Config,
    credentials: &NodeCredentials,
    trust: Option<&TrustBundle>,
    report: &mut Report,
    now: SystemTime,
) {
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
    if let Some(trust) = trust {
        // So that a reload from changed files cannot install a CA bundle or
        // CRL that cuts this node off (a new CA copied over the old one
        // instead of beside it, say).
        if let Err(problem) = trust.verify_node(credentials, now) {
            report
                .errors
                .push(untrusted_node(config, credentials, &problem));
        }
    }
    expiry(credentials, now, report);
    check_cluster_name(config, credentials, report);
}

/// A certificate and key that could not be loaded; after a renewal cut
/// short, where the previous pair is.
fn credentials_problem(cert: &Path, problem: &PkiError) -> String {
    let mut line = format!("tls.cert/tls.key: {problem}");
    if matches!(problem, PkiError::KeyMismatch { .. })
        && meshtun_enroll::previous_path(cert).exists()
    {
        line.push_str(
            " (if a renewal was cut short, the previous pair is beside them as \
             .prev: copy both back, or renew again)",
        );
    }
    line
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
        .parse::<meshtun_enroll::CaFingerprint>()
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
/// configured, every certificate of such a CA is refused). Described from
/// what `trust` loaded from `path`, not read again.
fn describe_crls(trust: &TrustBundle, path: &Path, report: &mut Report, now: SystemTime) {
    let (crls, cas) = match (trust.inspect_crls(), trust.inspect_cas()) {
        (Ok(crls), Ok(cas)) => (crls, cas),
        // The bundle parsed these very bytes when it loaded, so a start
        // would take them: not an error, but there is nothing to describe.
        (Err(problem), _) | (_, Err(problem)) => {
            return report
                .warnings
                .push(format!("tls.crl: cannot describe the CRLs: {problem}"))
        }
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
fn untrusted_node(config: &Config, credentials: &NodeCredentials, problem: &PkiError) -> String {
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
