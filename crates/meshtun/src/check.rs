//! `meshtun check`: every problem with a configuration and its certificates,
//! reported at once, so an operator fixes them in one pass.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_config::Config;
use meshtun_pki::{NodeCredentials, TrustBundle};

use crate::EXIT_CONFIG;

/// Below this many days left, `check` warns about the certificate's expiry.
const EXPIRY_WARNING_DAYS: u64 = 30;

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
        Err(problem) => {
            report.errors.push(format!("tls.ca: {problem}"));
            None
        }
    };
    match meshtun_pki::key_file_mode_problem(&tls.key) {
        Ok(None) => {}
        Ok(Some(problem)) => report.errors.push(format!("tls.key: {problem}")),
        Err(problem) => report.errors.push(format!("tls.key: {problem}")),
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
            report.errors.push(format!(
                "tls.cert: does not verify against tls.ca: {problem}"
            ));
        }
    }
    expiry(&credentials, now, report);
}

fn expiry(credentials: &NodeCredentials, now: SystemTime, report: &mut Report) {
    if credentials.not_before() > now {
        report
            .errors
            .push("tls.cert: certificate is not valid yet (check the clock)".to_owned());
    }
    match credentials.not_after().duration_since(now) {
        Ok(left) => {
            let days = left.as_secs() / 86_400;
            let line = format!("tls.cert: certificate expires in {days} day(s)");
            if left < Duration::from_secs(EXPIRY_WARNING_DAYS * 86_400) {
                report
                    .warnings
                    .push(format!("{line}; renew it with `meshtun pki issue`"));
            } else {
                report.facts.push(line);
            }
        }
        Err(_) => report.errors.push(
            "tls.cert: certificate has expired; issue a new one with `meshtun pki issue`"
                .to_owned(),
        ),
    }
}
