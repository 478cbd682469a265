//! Human-readable certificate and CRL summaries for `meshtun pki inspect
//! FILE` and `meshtun check`.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshtun_proto::NodeName;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::crl::{crls_from_bytes, parse_crl, Reason, CRL_PEM_BEGIN};
use crate::files;
use crate::identity::{describe_name, identity_of_parsed, parse_certificate};
use crate::load::{certificates_from_pem, system_time, TrustBundle};
use crate::x509::{fingerprint, format_utc};
use crate::PkiError;

const SECONDS_PER_DAY: u64 = 24 * 60 * 60;

/// What one certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Subject distinguished name, e.g. `CN=node-1`.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number as colon-separated hex.
    pub serial: String,
    /// Subject alternative names, e.g. `URI:spiffe://prod/node/node-1`, `DNS:node-1`, `IP:10.0.0.1`.
    pub sans: Vec<String>,
    /// The node identity (docs/design.md, "Identity"), if the certificate carries one.
    pub identity: Option<NodeName>,
    /// Why there is no identity, when there is none.
    pub identity_problem: Option<String>,
    /// `sha256:<hex>` of the DER.
    pub fingerprint: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basicConstraints marks it as a CA.
    pub is_ca: bool,
}

/// Every certificate in `pem`, in order. Fails if there is none.
pub fn inspect_pem(pem: &str) -> Result<Vec<Inspection>, PkiError> {
    inspect_pem_with_origin(pem, "input")
}

/// [`inspect_pem`] on the file at `path`; errors name the file.
pub fn inspect_file(path: &Path) -> Result<Vec<Inspection>, PkiError> {
    let pem = files::read_text(path)?;
    inspect_pem_with_origin(&pem, &path.display().to_string())
}

fn inspect_pem_with_origin(pem: &str, origin: &str) -> Result<Vec<Inspection>, PkiError> {
    inspect_ders(&certificates_from_pem(pem, origin)?, origin)
}

fn inspect_ders(certs: &[CertificateDer<'_>], origin: &str) -> Result<Vec<Inspection>, PkiError> {
    certs
        .iter()
        .enumerate()
        .map(|(index, cert)| inspect_der(cert, &format!("{origin}, certificate #{}", index + 1)))
        .collect()
}

fn inspect_der(der: &CertificateDer<'_>, origin: &str) -> Result<Inspection, PkiError> {
    let parsed = parse_certificate(der, origin)?;
    let sans = match parsed.subject_alternative_name() {
        Ok(Some(extension)) => extension
            .value
            .general_names
            .iter()
            .map(describe_name)
            .collect(),
        Ok(None) => Vec::new(),
        Err(error) => vec![format!("unreadable subjectAltName: {error}")],
    };
    let (identity, identity_problem) = match identity_of_parsed(&parsed) {
        Ok(identity) => (Some(identity), None),
        Err(problem) => (None, Some(problem)),
    };
    let validity = parsed.validity();
    Ok(Inspection {
        subject: parsed.subject().to_string(),
        issuer: parsed.issuer().to_string(),
        serial: parsed.raw_serial_as_string(),
        sans,
        identity,
        identity_problem,
        fingerprint: fingerprint(der),
        not_before: system_time(validity.not_before, origin)?,
        not_after: system_time(validity.not_after, origin)?,
        is_ca: parsed.is_ca(),
    })
}

impl Inspection {
    /// The multi-line summary, with the remaining lifetime counted from `now`.
    pub fn describe(&self, now: SystemTime) -> String {
        let sans = if self.sans.is_empty() {
            "(none)".to_string()
        } else {
            self.sans.join(", ")
        };
        let identity = match (&self.identity, &self.identity_problem) {
            (Some(identity), _) => identity.to_string(),
            (None, Some(problem)) => format!("(none: {problem})"),
            (None, None) => "(none)".to_string(),
        };
        format!(
            "subject:     {}\n\
             issuer:      {}\n\
             serial:      {}\n\
             SANs:        {sans}\n\
             identity:    {identity}\n\
             CA:          {}\n\
             fingerprint: {}\n\
             not before:  {}{}\n\
             not after:   {} ({})\n",
            self.subject,
            self.issuer,
            self.serial,
            if self.is_ca { "yes" } else { "no" },
            self.fingerprint,
            format_utc(self.not_before),
            not_yet_valid(self.not_before, now),
            format_utc(self.not_after),
            remaining(self.not_after, now),
        )
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(SystemTime::now()))
    }
}

/// What one certificate revocation list says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInspection {
    /// Issuer distinguished name (the CA whose certificates it revokes).
    pub issuer: String,
    /// The CRL number, in decimal, if it carries one.
    pub number: Option<String>,
    /// When it was issued.
    pub this_update: SystemTime,
    /// When the next one is due, if it says.
    pub next_update: Option<SystemTime>,
    /// The revoked certificates, in file order.
    pub revoked: Vec<RevokedInspection>,
}

/// One entry of a [`CrlInspection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedInspection {
    /// Serial number as colon-separated hex, as [`Inspection::serial`].
    pub serial: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// The reason, e.g. `key-compromise`, when the entry gives one.
    pub reason: Option<String>,
}

/// Whether `pem` holds a CRL (an `X509 CRL` PEM block), for a caller that
/// must choose between [`inspect_pem`] and [`inspect_crl_pem`].
pub fn is_crl_pem(pem: &str) -> bool {
    pem.contains(CRL_PEM_BEGIN)
}

/// Every CRL in `pem` (one or more `X509 CRL` blocks), in order. Nothing is
/// checked against a CA: this only reads what the file says.
pub fn inspect_crl_pem(pem: &str) -> Result<Vec<CrlInspection>, PkiError> {
    inspect_crl_with_origin(pem.as_bytes(), "input")
}

/// [`inspect_crl_pem`] on the file at `path` (PEM, or one DER CRL); errors
/// name the file.
pub fn inspect_crl_file(path: &Path) -> Result<Vec<CrlInspection>, PkiError> {
    let bytes = files::read_bytes(path)?;
    inspect_crl_with_origin(&bytes, &path.display().to_string())
}

fn inspect_crl_with_origin(bytes: &[u8], origin: &str) -> Result<Vec<CrlInspection>, PkiError> {
    inspect_crls_der(&crls_from_bytes(bytes, origin)?, origin)
}

fn inspect_crls_der(
    crls: &[CertificateRevocationListDer<'_>],
    origin: &str,
) -> Result<Vec<CrlInspection>, PkiError> {
    crls.iter()
        .enumerate()
        .map(|(index, der)| inspect_crl_der(der, &format!("{origin}, CRL #{}", index + 1)))
        .collect()
}

fn inspect_crl_der(der: &[u8], origin: &str) -> Result<CrlInspection, PkiError> {
    let crl = parse_crl(der, origin)?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|entry| {
            Ok(RevokedInspection {
                serial: entry.raw_serial_as_string(),
                revoked_at: system_time(entry.revocation_date, origin)?,
                reason: entry.reason_code().map(|(_, code)| {
                    Reason::from_code(code.0).map_or_else(
                        || format!("reason code {}", code.0),
                        |reason| reason.name().to_string(),
                    )
                }),
            })
        })
        .collect::<Result<_, PkiError>>()?;
    Ok(CrlInspection {
        issuer: crl.issuer().to_string(),
        number: crl.crl_number().map(ToString::to_string),
        this_update: system_time(crl.last_update(), origin)?,
        next_update: crl
            .next_update()
            .map(|next| system_time(next, origin))
            .transpose()?,
        revoked,
    })
}

impl TrustBundle {
    /// Each CA certificate of the bundle, in file order, described from the
    /// DER it holds, as [`inspect_file`] describes a file (the files are not
    /// read again).
    pub fn inspect_cas(&self) -> Result<Vec<Inspection>, PkiError> {
        inspect_ders(&self.certs, "CA bundle")
    }

    /// Each CRL of the bundle, in file order, described from the DER it
    /// holds, as [`inspect_crl_file`] describes a file; empty without CRLs.
    pub fn inspect_crls(&self) -> Result<Vec<CrlInspection>, PkiError> {
        inspect_crls_der(&self.crls, "CRL")
    }
}

impl CrlInspection {
    /// The multi-line summary, with nextUpdate judged from `now`.
    pub fn describe(&self, now: SystemTime) -> String {
        let next_update = match self.next_update {
            None => "(none)".to_string(),
            Some(next) => format!("{} ({})", format_utc(next), self.next_update_state(now)),
        };
        let mut text = format!(
            "CRL issuer:  {}\n\
             CRL number:  {}\n\
             this update: {}\n\
             next update: {next_update}\n\
             revoked:     {}\n",
            self.issuer,
            self.number.as_deref().unwrap_or("(none)"),
            format_utc(self.this_update),
            match self.revoked.len() {
                0 => "none".to_string(),
                1 => "1 certificate".to_string(),
                count => format!("{count} certificates"),
            },
        );
        for entry in &self.revoked {
            text.push_str(&format!(
                "  {} since {}{}\n",
                entry.serial,
                format_utc(entry.revoked_at),
                entry
                    .reason
                    .as_ref()
                    .map(|reason| format!(" ({reason})"))
                    .unwrap_or_default()
            ));
        }
        text
    }

    /// `due in N days`, or how long ago nextUpdate passed and what that means.
    pub fn next_update_state(&self, now: SystemTime) -> String {
        match self.next_update.map(|next| next.duration_since(now)) {
            None => "no nextUpdate".to_string(),
            Some(Ok(left)) => format!("due in {}", days(left)),
            Some(Err(past)) => format!(
                "PASSED {} ago: meshtun still enforces it; re-sign it with `meshtun pki crl`",
                days(past.duration())
            ),
        }
    }
}

impl fmt::Display for CrlInspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(SystemTime::now()))
    }
}

fn days(duration: Duration) -> String {
    let days = duration.as_secs() / SECONDS_PER_DAY;
    if days == 1 {
        "1 day".to_string()
    } else {
        format!("{days} days")
    }
}

fn remaining(not_after: SystemTime, now: SystemTime) -> String {
    match not_after.duration_since(now) {
        Ok(left) => format!("expires in {}", days(left)),
        Err(past) => format!("EXPIRED {} ago", days(past.duration())),
    }
}

fn not_yet_valid(not_before: SystemTime, now: SystemTime) -> String {
    match not_before.duration_since(now) {
        Ok(ahead) if !ahead.is_zero() => format!(" (NOT YET VALID: starts in {})", days(ahead)),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, Validity};
    use meshtun_test_support::TempDir;
    use std::time::UNIX_EPOCH;
    use time::OffsetDateTime;

    #[test]
    fn inspects_every_certificate_in_a_file() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let name = NodeName::new("node-1").unwrap();
        let issued = ca
            .issue(
                &name,
                &["10.0.0.1".parse().unwrap()],
                &[],
                Validity::days_from_now(7),
            )
            .unwrap();
        let both = format!("{}{}", issued.cert_pem, ca.cert_pem());
        let found = inspect_pem(&both).unwrap();
        assert_eq!(found.len(), 2);

        let leaf = &found[0];
        assert_eq!(leaf.subject, "CN=node-1");
        assert!(leaf.issuer.contains("meshtun CA prod"), "{}", leaf.issuer);
        assert_eq!(leaf.identity, Some(name));
        assert!(!leaf.is_ca);
        assert_eq!(
            leaf.sans,
            ["URI:spiffe://prod/node/node-1", "DNS:node-1", "IP:10.0.0.1"]
        );
        assert!(leaf.fingerprint.starts_with("sha256:"));

        let root = &found[1];
        assert!(root.is_ca);
        assert_eq!(root.identity, None);
        assert!(root.identity_problem.is_some());
        assert_eq!(root.sans, ["URI:spiffe://prod"]);
    }

    #[test]
    fn describes_dates_and_expiry() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let start = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap(); // 2026-01-01T00:00:00Z
        let validity = Validity {
            not_before: start,
            not_after: start + time::Duration::days(10),
        };
        let issued = ca
            .issue(&NodeName::new("node-1").unwrap(), &[], &[], validity)
            .unwrap();
        let inspection = inspect_pem(&issued.cert_pem).unwrap().remove(0);
        let at =
            |days: u64| UNIX_EPOCH + Duration::from_secs(1_767_225_600 + days * SECONDS_PER_DAY);

        let text = inspection.describe(at(3));
        assert!(
            text.contains("not before:  2026-01-01T00:00:00Z\n"),
            "{text}"
        );
        assert!(
            text.contains("not after:   2026-01-11T00:00:00Z (expires in 7 days)"),
            "{text}"
        );
        assert!(text.contains("identity:    node-1"), "{text}");
        assert!(inspection.describe(at(9)).contains("(expires in 1 day)"));
        assert!(inspection.describe(at(15)).contains("(EXPIRED 5 days ago)"));
        let early = inspection
            .describe(UNIX_EPOCH + Duration::from_secs(1_767_225_600 - 2 * SECONDS_PER_DAY));
        assert!(early.contains("NOT YET VALID: starts in 2 days"), "{early}");
        assert!(inspection.to_string().contains("EXPIRED"));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            inspect_pem(""),
            Err(PkiError::NoCertificate { .. })
        ));
        let dir = TempDir::new("inspect");
        let missing = dir.path().join("nothing.crt");
        let error = inspect_file(&missing).unwrap_err();
        assert!(error.to_string().contains("nothing.crt"), "{error}");
        let garbage = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let error = inspect_pem(garbage).unwrap_err();
        assert!(error.to_string().contains("certificate #1"), "{error}");
    }

    #[test]
    fn inspects_a_crl() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let empty = crate::RevocationList::new()
            .sign(&ca, UNIX_EPOCH + Duration::from_secs(1_767_225_600), 30)
            .unwrap();
        assert!(is_crl_pem(&empty));
        assert!(!is_crl_pem(&ca.cert_pem()));
        let found = inspect_crl_pem(&empty).unwrap();
        assert_eq!(found.len(), 1);
        let text = found[0].describe(at_day(3));
        assert!(text.contains("CRL issuer:  CN=meshtun CA prod"), "{text}");
        assert!(text.contains("CRL number:  1\n"), "{text}");
        assert!(text.contains("this update: 2026-01-01T00:00:00Z"), "{text}");
        assert!(
            text.contains("next update: 2026-01-31T00:00:00Z (due in 27 days)"),
            "{text}"
        );
        assert!(text.contains("revoked:     none"), "{text}");
        assert!(found[0].describe(at_day(40)).contains("PASSED 10 days ago"));

        let mut list = crate::RevocationList::from_pem(&empty, &ca).unwrap();
        let serial: crate::Serial = "4a:1b".parse().unwrap();
        list.revoke(serial, Some(crate::Reason::KeyCompromise), at_day(2));
        list.revoke("7f".parse().unwrap(), None, at_day(2));
        let pem = list.sign(&ca, at_day(2), 30).unwrap();
        let text = inspect_crl_pem(&pem).unwrap()[0].describe(at_day(3));
        assert!(text.contains("CRL number:  2\n"), "{text}");
        assert!(text.contains("revoked:     2 certificates"), "{text}");
        assert!(
            text.contains("  4a:1b since 2026-01-03T00:00:00Z (key-compromise)\n"),
            "{text}"
        );
        assert!(text.contains("  7f since 2026-01-03T00:00:00Z\n"), "{text}");

        assert!(matches!(
            inspect_crl_pem("-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n"),
            Err(PkiError::Crl { .. })
        ));
        let dir = TempDir::new("inspect-crl");
        let error = inspect_crl_file(&dir.path().join("crl.pem")).unwrap_err();
        assert!(error.to_string().contains("crl.pem"), "{error}");
    }

    #[test]
    fn a_trust_bundle_describes_what_it_holds() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let crl = crate::RevocationList::new()
            .sign(&ca, UNIX_EPOCH + Duration::from_secs(1_767_225_600), 30)
            .unwrap();
        let bundle = TrustBundle::from_pem(&ca.cert_pem()).unwrap();
        assert_eq!(
            bundle.inspect_cas().unwrap(),
            inspect_pem(&ca.cert_pem()).unwrap()
        );
        assert_eq!(bundle.inspect_crls().unwrap(), []);
        let bundle = bundle.with_crl_pem(&crl).unwrap();
        assert_eq!(
            bundle.inspect_crls().unwrap(),
            inspect_crl_pem(&crl).unwrap()
        );
    }

    /// 2026-01-01T00:00:00Z plus `days`.
    fn at_day(days: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600 + days * SECONDS_PER_DAY)
    }

    #[test]
    fn formats_times_before_the_epoch() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_utc(UNIX_EPOCH - Duration::from_secs(SECONDS_PER_DAY)),
            "1969-12-31T00:00:00Z"
        );
    }
}
