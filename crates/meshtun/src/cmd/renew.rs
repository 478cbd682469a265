//! A node renewing its own certificate (`[tls] renew`): `meshtun renew`
//! once from the command line, and the daemon on a schedule.
//!
//! One renewal: make a fresh P-256 key here, connect to `meshtun pki serve`
//! with ALPN `meshtun-renew/1`, present the certificate in force (mTLS) and
//! send a CSR for the new key. The server checks that certificate against
//! its ledger and CRL and answers with a certificate for the same node and
//! names. The answer must come from the pinned CA, be for the new key and
//! this node, and verify against this node's own `tls.ca` (and `tls.crl`):
//! only then are the files replaced, the old pair kept as `.prev`. No key
//! ever leaves the node, and the CA's key never leaves the CA host.
//!
//! When: at `at` (default two thirds) of the certificate's lifetime, less a
//! random jitter of up to a twentieth of it so that nodes issued together do
//! not renew together. A failure is retried every twentieth of the lifetime
//! (between 5 s and 10 min) until the certificate expires.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_config::{Config, Renew};
use meshtun_enroll::{request_renewal, CaFingerprint, JoinKey};
use meshtun_pki::{NodeCredentials, TrustBundle, Validity};

use crate::{EXIT_CONFIG, EXIT_RUNTIME};

/// How long one renewal exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds of the pause between failed attempts.
const RETRY_BOUNDS: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(600));

/// A renewal that was installed.
#[derive(Debug)]
pub(crate) struct Installed {
    /// `sha256:…` of the new certificate.
    pub(crate) fingerprint: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// Renews the certificate `config` names, once. The error is one line
/// that says what failed.
pub(crate) async fn renew_once(config: &Config) -> Result<Installed, String> {
    let tls = &config.tls;
    let settings = tls
        .renew
        .as_ref()
        .ok_or("tls.renew is not set: nothing says where to renew")?;
    let pinned: CaFingerprint = settings
        .ca_fingerprint
        .parse()
        .map_err(|error| format!("tls.renew.ca_fingerprint: {error}"))?;
    let current = NodeCredentials::load(&tls.cert, &tls.key)
        .map_err(|error| format!("tls.cert/tls.key: {error}"))?;
    if current.not_after() <= SystemTime::now() {
        return Err(format!(
            "the certificate in {} has expired; an expired certificate cannot renew itself: \
             join again with a token (`meshtun pki token`, then `meshtun join`)",
            tls.cert.display()
        ));
    }
    let key = JoinKey::generate(current.identity()).map_err(|error| error.to_string())?;
    let request = key.renewal_request().map_err(|error| error.to_string())?;
    let server = settings.server.to_string();
    let response = request_renewal(&server, &pinned, &current, &request, EXCHANGE_TIMEOUT)
        .await
        .map_err(|error| error.to_string())?;
    let renewed = key
        .accept(response, &pinned, SystemTime::now())
        .map_err(|error| format!("{server}: {error}"))?;
    // What a reload will insist on: refuse to install a certificate this
    // node's own trust would not accept.
    let trust = TrustBundle::load(&tls.ca, tls.crl.as_deref())
        .map_err(|error| format!("tls.ca: {error}"))?;
    trust
        .verify_node(renewed.credentials(), SystemTime::now())
        .map_err(|error| {
            format!(
                "the renewed certificate does not verify against tls.ca ({}): {error}; \
                 nothing was written",
                tls.ca.display()
            )
        })?;
    renewed
        .install(&tls.cert, &tls.key)
        .map_err(|error| format!("cannot install the renewed certificate: {error}"))?;
    Ok(Installed {
        fingerprint: renewed.credentials().fingerprint(),
        not_before: renewed.credentials().not_before(),
        not_after: renewed.credentials().not_after(),
    })
}

/// When a certificate valid from `not_before` to `not_after` is due for
/// renewal under `settings`, before jitter.
pub(crate) fn due_at(
    settings: &Renew,
    not_before: SystemTime,
    not_after: SystemTime,
) -> SystemTime {
    let lifetime = Validity::lifetime_of(not_before, not_after);
    let issued = not_after.checked_sub(lifetime).unwrap_or(not_before);
    issued + lifetime * u32::from(settings.at_percent) / 100
}

/// Up to a twentieth of the lifetime, drawn at random: how much earlier
/// than [`due_at`] this node renews.
pub(crate) fn jitter(not_before: SystemTime, not_after: SystemTime) -> Duration {
    let lifetime = Validity::lifetime_of(not_before, not_after);
    let mut bytes = [0u8; 4];
    // Without randomness, no jitter: renewing on time matters more.
    if getrandom_fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    let draw = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    (lifetime / 20).mul_f64(draw)
}

/// The pause after a failed attempt: a twentieth of the lifetime, within
/// [`RETRY_BOUNDS`].
pub(crate) fn retry_after(not_before: SystemTime, not_after: SystemTime) -> Duration {
    let (shortest, longest) = RETRY_BOUNDS;
    (Validity::lifetime_of(not_before, not_after) / 20).clamp(shortest, longest)
}

fn getrandom_fill(bytes: &mut [u8]) -> Result<(), ()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(bytes))
        .map_err(|_| ())
}

/// `meshtun renew -c FILE`.
pub(crate) fn renew_command(path: &Path) -> ExitCode {
    let config = match meshtun_config::load_local(path) {
        Ok(config) => config,
        Err(errors) => {
            for problem in errors.iter() {
                eprintln!("error: {}: {problem}", path.display());
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.tls.renew.is_none() {
        eprintln!(
            "error: {}: tls.renew is not set; add renew = {{ server = \"CA-HOST:PORT\", \
             ca_fingerprint = \"sha256:…\" }} to [tls] (both as `meshtun pki serve` prints them)",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match crate::runtime() {
        Ok(runtime) => runtime,
        Err(problem) => {
            eprintln!("error: cannot start the async runtime: {problem}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(renew_once(&config)) {
        Ok(installed) => {
            say!(
                "renewed: wrote {} and a new key {} (certificate {}, valid until {}); the \
                 previous pair is kept as .prev",
                config.tls.cert.display(),
                config.tls.key.display(),
                installed.fingerprint,
                meshtun_pki::format_utc(installed.not_after)
            );
            say!("a running meshtun picks up the new files within seconds");
            ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("error: renewal failed: {problem}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(at_percent: u8) -> Renew {
        Renew {
            server: "127.0.0.1:4434".parse().expect("host:port"),
            ca_fingerprint: format!("sha256:{}", "00".repeat(32)),
            at_percent,
        }
    }

    #[test]
    fn due_at_the_share_of_the_lifetime_from_issuance() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (lifetime, at, after) in [
            (120, 50, 60),
            (12 * 3600, 67, 12 * 3600 * 67 / 100),
            (365 * 86_400, 67, 365 * 86_400 * 67 / 100),
        ] {
            let validity = Validity::lasting(issued.into(), Duration::from_secs(lifetime));
            let due = due_at(
                &settings(at),
                validity.not_before.into(),
                validity.not_after.into(),
            );
            assert_eq!(
                due,
                issued + Duration::from_secs(after),
                "{lifetime} s at {at}%"
            );
            let jitter = jitter(validity.not_before.into(), validity.not_after.into());
            assert!(jitter <= Duration::from_secs(lifetime) / 20);
        }
    }

    #[test]
    fn retries_come_at_a_twentieth_of_the_lifetime_within_bounds() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let retry = |lifetime: u64| {
            let validity = Validity::lasting(issued.into(), Duration::from_secs(lifetime));
            retry_after(validity.not_before.into(), validity.not_after.into())
        };
        assert_eq!(retry(120), Duration::from_secs(6));
        assert_eq!(retry(60), Duration::from_secs(5));
        assert_eq!(retry(12 * 3600), Duration::from_secs(600));
    }
}
