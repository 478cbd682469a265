//! Human-readable certificate summaries for `meshtun pki inspect FILE` and
//! `meshtun check`.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshtun_proto::NodeName;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::files;
use crate::identity::{identity_of_parsed, parse_certificate};
use crate::load::{certificates_from_pem, fingerprint, system_time};
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
    /// The node identity (DESIGN §3), if the certificate carries one.
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
    certificates_from_pem(pem, origin)?
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

pub(crate) fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::IPAddress(bytes) => match ip_from(bytes) {
            Some(ip) => format!("IP:{ip}"),
            None => format!("IP:<{} malformed bytes>", bytes.len()),
        },
        other => format!("other:{other}"),
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
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
            rfc3339(self.not_before),
            not_yet_valid(self.not_before, now),
            rfc3339(self.not_after),
            remaining(self.not_after, now),
        )
    }
}

impl fmt::Display for Inspection {
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

/// `YYYY-MM-DDTHH:MM:SSZ`, in UTC.
fn rfc3339(at: SystemTime) -> String {
    let seconds = match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs())
            .ok()
            .map(|seconds| -seconds),
    };
    match seconds.and_then(|seconds| OffsetDateTime::from_unix_timestamp(seconds).ok()) {
        Some(utc) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            utc.year(),
            u8::from(utc.month()),
            utc.day(),
            utc.hour(),
            utc.minute(),
            utc.second()
        ),
        None => format!("{at:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::tests::TempDir;
    use crate::{Authority, Validity};

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
    fn formats_times_before_the_epoch() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(SECONDS_PER_DAY)),
            "1969-12-31T00:00:00Z"
        );
    }
}
