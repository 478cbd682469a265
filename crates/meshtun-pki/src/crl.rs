//! The cluster CA's certificate revocation list (docs/design.md,
//! "Identity": optional, enforced on both sides), kept as `DIR/crl.pem`
//! beside `ca.crt` and `ca.key`.
//!
//! The CRL file is the only record of what was revoked: `meshtun pki revoke`
//! reads it (checking that this CA signed it), adds a serial, and writes it
//! back signed with the next CRL number. There is no second database that
//! could be lost or fall out of step, and the file an operator installs on
//! the nodes as `tls.crl` is exactly the CA's state.
//!
//! A CRL is public: it is written with mode 0644 (as the CA certificate is),
//! through a temporary file in the same directory that is renamed over the
//! old one, so a node reading it never sees half a file.
//!
//! How nodes use it (see [`TrustBundle`](crate::TrustBundle)): when a CRL is
//! configured, every certificate below the CA is checked against it on both
//! sides of every handshake, a certificate whose CA has no CRL in the file is
//! refused, and a CRL past its nextUpdate is still used (a stale CRL must not
//! turn into "nothing is revoked"). `meshtun pki crl` re-signs it with fresh
//! dates; run it from cron well before nextUpdate.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use meshtun_proto::NodeName;
use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateRevocationListDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;
use x509_parser::num_bigint::BigUint;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::time::ASN1Time;

use crate::files::{self, NewFile, CERT_MODE};
use crate::identity::{identity_of_parsed, parse_certificate, Serial, MAX_NUMBER_LEN};
use crate::load::first_certificate;
use crate::x509::latest_x509_time;
use crate::{Authority, PkiError};

/// File name of the CRL inside a CA directory.
pub const CRL_FILE: &str = "crl.pem";

/// The PEM label of a CRL.
pub(crate) const CRL_PEM_BEGIN: &str = "-----BEGIN X509 CRL-----";

// ---------------------------------------------------------------- reason

/// Why a certificate was revoked (RFC 5280 §5.3.1 reasonCode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No reason given (written as no reasonCode at all, as RFC 5280 asks).
    Unspecified,
    /// The node's private key was (or may have been) disclosed.
    KeyCompromise,
    /// The CA's key was compromised.
    CaCompromise,
    /// The node changed role or owner.
    AffiliationChanged,
    /// A new certificate replaces it.
    Superseded,
    /// The node was decommissioned.
    CessationOfOperation,
    /// Temporarily on hold (nodes treat it as revoked).
    CertificateHold,
    /// Only meaningful in delta CRLs; kept when read, never offered.
    RemoveFromCrl,
    /// The node lost the privilege the certificate granted.
    PrivilegeWithdrawn,
    /// Attribute-authority compromise; kept when read, never offered.
    AaCompromise,
}

/// Every reason with its RFC 5280 code and its command-line name.
const REASONS: [(Reason, u8, &str); 10] = [
    (Reason::Unspecified, 0, "unspecified"),
    (Reason::KeyCompromise, 1, "key-compromise"),
    (Reason::CaCompromise, 2, "ca-compromise"),
    (Reason::AffiliationChanged, 3, "affiliation-changed"),
    (Reason::Superseded, 4, "superseded"),
    (Reason::CessationOfOperation, 5, "cessation-of-operation"),
    (Reason::CertificateHold, 6, "certificate-hold"),
    (Reason::RemoveFromCrl, 8, "remove-from-crl"),
    (Reason::PrivilegeWithdrawn, 9, "privilege-withdrawn"),
    (Reason::AaCompromise, 10, "aa-compromise"),
];

impl Reason {
    /// The reasons `meshtun pki revoke --reason` offers. Not "certificate
    /// hold" (meshtun has no un-revoke), "remove from CRL" (delta CRLs only)
    /// or "AA compromise" (attribute certificates).
    pub const CHOICES: [Reason; 7] = [
        Reason::Unspecified,
        Reason::KeyCompromise,
        Reason::CaCompromise,
        Reason::AffiliationChanged,
        Reason::Superseded,
        Reason::CessationOfOperation,
        Reason::PrivilegeWithdrawn,
    ];

    /// The name on the command line and in messages, e.g. `key-compromise`.
    pub fn name(self) -> &'static str {
        REASONS
            .iter()
            .find(|(reason, _, _)| *reason == self)
            .map_or("unspecified", |(_, _, name)| name)
    }

    /// The reason with RFC 5280 code `code`, if it is one.
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        REASONS
            .iter()
            .find(|(_, known, _)| *known == code)
            .map(|(reason, _, _)| *reason)
    }

    fn to_rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::CaCompromise => RevocationReason::CaCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::CertificateHold => RevocationReason::CertificateHold,
            Reason::RemoveFromCrl => RevocationReason::RemoveFromCrl,
            Reason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
            Reason::AaCompromise => RevocationReason::AaCompromise,
        }
    }
}

impl FromStr for Reason {
    type Err = PkiError;

    fn from_str(text: &str) -> Result<Self, PkiError> {
        REASONS
            .iter()
            .find(|(_, _, name)| *name == text)
            .map(|(reason, _, _)| *reason)
            .ok_or_else(|| PkiError::Reason {
                input: text.to_string(),
            })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------- list

/// One revoked certificate in a [`RevocationList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial number.
    pub serial: Serial,
    /// When the CA revoked it (whole seconds).
    pub revoked_at: SystemTime,
    /// Why, when a reason other than "unspecified" was given.
    pub reason: Option<Reason>,
    /// When the key is known or suspected to have been compromised, if a
    /// CRL made elsewhere says so (kept when the list is rewritten).
    pub invalidity_date: Option<SystemTime>,
}

/// The CA's revocation list: which serials are revoked, and the number and
/// dates of the CRL it was read from or last signed as.
///
/// Read one with [`RevocationList::load`], add entries with
/// [`RevocationList::revoke`], and [`RevocationList::write`] it back: every
/// write signs it with the next CRL number (RFC 5280 §5.2.3: CRL numbers
/// only go up), `thisUpdate` = now and `nextUpdate` = now + the given days.
#[derive(Debug, Clone, Default)]
pub struct RevocationList {
    number: BigUint,
    this_update: Option<SystemTime>,
    next_update: Option<SystemTime>,
    entries: Vec<Revoked>,
}

impl RevocationList {
    /// An empty list that was never signed; its first CRL gets number 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// The list in `DIR/crl.pem`, or `None` if that file does not exist.
    /// Fails if the file is not a single CRL signed by `authority`.
    pub fn load(dir: &Path, authority: &Authority) -> Result<Option<Self>, PkiError> {
        let path = dir.join(CRL_FILE);
        match files::read_bytes(&path) {
            Ok(bytes) => {
                Self::from_bytes_with_origin(&bytes, authority, &path.display().to_string())
                    .map(Some)
            }
            Err(PkiError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// The list in `pem` (one `X509 CRL` block), which `authority` must have
    /// signed.
    pub fn from_pem(pem: &str, authority: &Authority) -> Result<Self, PkiError> {
        Self::from_bytes_with_origin(pem.as_bytes(), authority, "CRL")
    }

    fn from_bytes_with_origin(
        bytes: &[u8],
        authority: &Authority,
        origin: &str,
    ) -> Result<Self, PkiError> {
        let crl_error = |detail: String| PkiError::Crl {
            origin: origin.to_string(),
            detail,
        };
        let mut crls = crls_from_bytes(bytes, origin)?;
        let der = match (crls.pop(), crls.is_empty()) {
            (Some(der), true) => der,
            _ => {
                return Err(crl_error(format!(
                    "holds {} CRLs; the CA directory's {CRL_FILE} must hold exactly one, \
                     this CA's",
                    crls.len() + 1
                )))
            }
        };
        let crl = parse_crl(&der, origin)?;

        let ca = parse_certificate(authority.cert_der(), "CA certificate")?;
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(crl_error(format!(
                "was issued by \"{}\", not by this CA (\"{}\"); it cannot be updated with \
                 this CA's key",
                crl.issuer(),
                ca.subject()
            )));
        }
        // x509-parser verifies with aws-lc-rs here: rcgen's `aws_lc_rs`
        // feature turns on its `verify-aws` feature.
        crl.verify_signature(ca.public_key()).map_err(|error| {
            crl_error(format!(
                "its signature does not verify with this CA's key ({error}); it was not \
                 signed by this CA"
            ))
        })?;
        if let Some(extension) = crl.extensions().iter().find(|extension| {
            extension.critical
                && !matches!(extension.parsed_extension(), ParsedExtension::CRLNumber(_))
        }) {
            return Err(crl_error(format!(
                "carries a critical extension ({}) that meshtun cannot carry over; \
                 it only maintains complete CRLs of its own CA",
                extension.oid
            )));
        }

        let mut entries = Vec::new();
        for entry in crl.iter_revoked_certificates() {
            let serial = Serial::from_der_integer(entry.raw_serial()).map_err(|detail| {
                crl_error(format!("an entry has an unusable serial number: {detail}"))
            })?;
            let entry_error = |detail: String| crl_error(format!("entry {serial}: {detail}"));
            if let Some(extension) = entry
                .extensions()
                .iter()
                .find(|extension| extension.critical)
            {
                return Err(entry_error(format!(
                    "carries a critical extension ({}) that meshtun cannot carry over",
                    extension.oid
                )));
            }
            let reason = match entry.reason_code() {
                None => None,
                Some((_, code)) => match Reason::from_code(code.0) {
                    Some(Reason::Unspecified) => None,
                    Some(reason) => Some(reason),
                    None => return Err(entry_error(format!("unknown reason code {}", code.0))),
                },
            };
            let invalidity_date = entry
                .invalidity_date()
                .map(|(_, date)| system_time(date, origin))
                .transpose()?;
            entries.push(Revoked {
                revoked_at: system_time(entry.revocation_date, origin)?,
                serial,
                reason,
                invalidity_date,
            });
        }
        Ok(Self {
            number: crl.crl_number().cloned().unwrap_or_default(),
            this_update: Some(system_time(crl.last_update(), origin)?),
            next_update: crl
                .next_update()
                .map(|next| system_time(next, origin))
                .transpose()?,
            entries,
        })
    }

    /// The CRL number it was read with or last signed with (0: never signed).
    pub fn number(&self) -> String {
        self.number.to_string()
    }

    /// thisUpdate of the CRL it was read from or last signed as.
    pub fn this_update(&self) -> Option<SystemTime> {
        self.this_update
    }

    /// nextUpdate of the CRL it was read from or last signed as.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.next_update
    }

    /// The revoked certificates, oldest first.
    pub fn entries(&self) -> &[Revoked] {
        &self.entries
    }

    /// Whether `serial` is on the list.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.entries.iter().any(|entry| entry.serial == *serial)
    }

    /// Adds `serial`, revoked at `at` for `reason`. Returns `false` (and
    /// changes nothing) if it is already on the list.
    pub fn revoke(&mut self, serial: Serial, reason: Option<Reason>, at: SystemTime) -> bool {
        if self.is_revoked(&serial) {
            return false;
        }
        self.entries.push(Revoked {
            serial,
            revoked_at: at,
            reason: reason.filter(|reason| *reason != Reason::Unspecified),
            invalidity_date: None,
        });
        true
    }

    /// Signs the list with `authority` as the next CRL: number + 1,
    /// thisUpdate `now`, nextUpdate `days` days later (`days` must be at
    /// least 1). Returns the CRL in PEM.
    pub fn sign(
        &mut self,
        authority: &Authority,
        now: SystemTime,
        days: u32,
    ) -> Result<String, PkiError> {
        let crl_error = |detail: String| PkiError::Crl {
            origin: "new CRL".to_string(),
            detail,
        };
        let this_update = OffsetDateTime::from(now);
        let next_update = this_update
            .checked_add(Duration::days(i64::from(days)))
            .map_or_else(latest_x509_time, |end| end.min(latest_x509_time()));
        if next_update <= this_update {
            return Err(crl_error(format!(
                "nextUpdate must come after thisUpdate ({days} days given)"
            )));
        }
        let number = &self.number + 1u32;
        let number_bytes = number.to_bytes_be();
        if number_bytes.len() > MAX_NUMBER_LEN {
            return Err(crl_error(format!(
                "the next CRL number {number} is longer than {MAX_NUMBER_LEN} octets"
            )));
        }
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from_slice(&number_bytes),
            issuing_distribution_point: None,
            revoked_certs: self
                .entries
                .iter()
                .map(|entry| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(entry.serial.as_bytes()),
                    revocation_time: OffsetDateTime::from(entry.revoked_at),
                    reason_code: entry.reason.map(Reason::to_rcgen),
                    invalidity_date: entry.invalidity_date.map(OffsetDateTime::from),
                })
                .collect(),
            key_identifier_method: key_identifier_method(authority)?,
        };
        let pem = params
            .signed_by(&authority.issuer)
            .and_then(|crl| crl.pem())
            .map_err(|error| crl_error(format!("cannot sign it: {error}")))?;
        self.number = number;
        self.this_update = Some(now);
        self.next_update = Some(next_update.into());
        Ok(pem)
    }

    /// [`RevocationList::sign`], then replaces `DIR/crl.pem` atomically (a
    /// temporary file in `DIR` renamed over it; mode 0644). Returns the path.
    pub fn write(
        &mut self,
        authority: &Authority,
        dir: &Path,
        now: SystemTime,
        days: u32,
    ) -> Result<PathBuf, PkiError> {
        let pem = self.sign(authority, now, days)?;
        let path = dir.join(CRL_FILE);
        let file = NewFile {
            path: path.clone(),
            contents: &pem,
            mode: CERT_MODE,
        };
        files::write_files(dir, &[file], true)?;
        Ok(path)
    }
}

/// A certificate named for revocation: its serial and, when it carries one,
/// its node identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationTarget {
    /// The certificate's serial number.
    pub serial: Serial,
    /// The node it was issued to, if it names one.
    pub node: Option<NodeName>,
}

impl RevocationTarget {
    /// The certificate in the file at `path`, which `authority` must have
    /// issued (a CRL only revokes certificates of its own CA).
    pub fn load(path: &Path, authority: &Authority) -> Result<Self, PkiError> {
        let pem = files::read_text(path)?;
        Self::from_pem_with_origin(&pem, authority, &path.display().to_string())
    }

    /// The first certificate in `pem`, which `authority` must have issued.
    pub fn from_pem(pem: &str, authority: &Authority) -> Result<Self, PkiError> {
        Self::from_pem_with_origin(pem, authority, "certificate")
    }

    fn from_pem_with_origin(
        pem: &str,
        authority: &Authority,
        origin: &str,
    ) -> Result<Self, PkiError> {
        let der = first_certificate(pem, origin)?;
        let parsed = parse_certificate(&der, origin)?;
        let ca = parse_certificate(authority.cert_der(), "CA certificate")?;
        let issued_here = parsed.issuer().as_raw() == ca.subject().as_raw()
            && parsed.verify_signature(Some(ca.public_key())).is_ok();
        if !issued_here {
            return Err(PkiError::Certificate {
                origin: origin.to_string(),
                detail: format!(
                    "was not issued by this CA (its issuer is \"{}\", the CA is \"{}\"); \
                     only the CA that issued a certificate can revoke it",
                    parsed.issuer(),
                    ca.subject()
                ),
            });
        }
        Ok(Self {
            serial: Serial::of_parsed(&parsed, origin)?,
            node: identity_of_parsed(&parsed).ok(),
        })
    }
}

/// The CRLs in `bytes`: PEM with one or more `X509 CRL` blocks, or one DER
/// CRL.
pub(crate) fn crls_from_bytes(
    bytes: &[u8],
    origin: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let crl_error = |detail: String| PkiError::Crl {
        origin: origin.to_string(),
        detail,
    };
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())]);
    }
    let mut crls = Vec::new();
    for item in CertificateRevocationListDer::pem_slice_iter(bytes) {
        crls.push(item.map_err(|error| crl_error(format!("not valid PEM: {error}")))?);
    }
    if crls.is_empty() {
        return Err(crl_error(format!("holds no \"{CRL_PEM_BEGIN}\" block")));
    }
    Ok(crls)
}

/// Parses one DER CRL, refusing trailing bytes.
pub(crate) fn parse_crl<'a>(
    der: &'a [u8],
    origin: &str,
) -> Result<CertificateRevocationList<'a>, PkiError> {
    match x509_parser::parse_x509_crl(der) {
        Ok(([], crl)) => Ok(crl),
        Ok((rest, _)) => Err(PkiError::Crl {
            origin: origin.to_string(),
            detail: format!("{} stray bytes after the CRL", rest.len()),
        }),
        Err(error) => Err(PkiError::Crl {
            origin: origin.to_string(),
            detail: format!("not a valid X.509 CRL: {error}"),
        }),
    }
}

/// The authority key identifier a CRL of `authority` carries: the CA
/// certificate's subject key identifier when it has one (so a CA made by
/// openssl, whose identifier is a SHA-1, is matched too), else SHA-256.
fn key_identifier_method(authority: &Authority) -> Result<KeyIdMethod, PkiError> {
    let ca = parse_certificate(authority.cert_der(), "CA certificate")?;
    let subject_key_id =
        ca.extensions()
            .iter()
            .find_map(|extension| match extension.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
    Ok(subject_key_id.map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified))
}

/// An X.509 time as a `SystemTime`, for CRL dates.
fn system_time(time: ASN1Time, origin: &str) -> Result<SystemTime, PkiError> {
    crate::x509::system_time(time).ok_or_else(|| PkiError::Crl {
        origin: origin.to_string(),
        detail: format!("date {time} is outside the range this system can represent"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeCredentials, TrustBundle, Validity};
    use meshtun_test_support::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::time::UNIX_EPOCH;

    fn ca() -> Authority {
        Authority::generate("prod", Validity::days_from_now(30)).unwrap()
    }

    fn node_credentials(ca: &Authority, name: &str) -> NodeCredentials {
        let issued = ca
            .issue(
                &NodeName::new(name).unwrap(),
                &[],
                &[],
                Validity::days_from_now(7),
            )
            .unwrap();
        NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn serial_of(credentials: &NodeCredentials) -> Serial {
        Serial::of_certificate(&credentials.chain()[0]).unwrap()
    }

    /// Whole seconds: CRL dates carry no fractions.
    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(seconds)
    }

    #[test]
    fn serials_parse_from_hex_in_every_spelling() {
        let plain: Serial = "4a1b2c".parse().unwrap();
        assert_eq!(plain.as_bytes(), [0x4a, 0x1b, 0x2c]);
        for same in ["4a:1b:2c", "0x4A1B2C", " 004a1b2c ", "00:4a:1b:2c"] {
            assert_eq!(same.parse::<Serial>().unwrap(), plain, "{same}");
        }
        assert_eq!(plain.to_string(), "4a:1b:2c");
        // Odd digit counts have an implied leading zero; a high first bit
        // gets the DER sign octet, as certificates carry it.
        assert_eq!("abc".parse::<Serial>().unwrap().as_bytes(), [0x0a, 0xbc]);
        let high: Serial = "8f01".parse().unwrap();
        assert_eq!(high.as_bytes(), [0x00, 0x8f, 0x01]);
        assert_eq!(high.to_string(), "00:8f:01");
        assert_eq!("00".parse::<Serial>().unwrap().as_bytes(), [0]);
        assert_eq!(
            "ff".repeat(20).parse::<Serial>().unwrap().as_bytes().len(),
            21
        );

        for bad in ["", "0x", ":", "xyz", "12 34", "4a-1b", &"ff".repeat(21)] {
            let error = bad.parse::<Serial>().unwrap_err();
            assert!(matches!(error, PkiError::Serial { .. }), "{bad:?}: {error}");
        }
        let error = "12g4".parse::<Serial>().unwrap_err().to_string();
        assert!(error.contains("'g'") && error.contains("12g4"), "{error}");
    }

    #[test]
    fn serial_of_a_certificate_matches_inspect() {
        let ca = ca();
        let name = NodeName::new("node-1").unwrap();
        let issued = ca
            .issue(&name, &[], &[], Validity::days_from_now(1))
            .unwrap();
        let credentials = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        let serial = serial_of(&credentials);
        let inspected = crate::inspect_pem(&issued.cert_pem).unwrap();
        assert_eq!(inspected[0].serial, serial.to_string());
        assert_eq!(serial.to_string().parse::<Serial>().unwrap(), serial);
    }

    #[test]
    fn reasons_have_names() {
        for reason in Reason::CHOICES {
            assert_eq!(reason.name().parse::<Reason>().unwrap(), reason);
        }
        assert_eq!(Reason::KeyCompromise.to_string(), "key-compromise");
        assert!(matches!(
            "stolen".parse::<Reason>(),
            Err(PkiError::Reason { .. })
        ));
        assert_eq!(Reason::from_code(7), None);
        assert_eq!(Reason::from_code(9), Some(Reason::PrivilegeWithdrawn));
    }

    #[test]
    fn an_empty_crl_is_accepted_and_revokes_nothing() {
        let ca = ca();
        let one = node_credentials(&ca, "node-1");
        let mut list = RevocationList::new();
        assert_eq!(list.number(), "0");
        let pem = list.sign(&ca, SystemTime::now(), 30).unwrap();
        assert!(pem.starts_with(CRL_PEM_BEGIN), "{pem}");
        assert_eq!(list.number(), "1");

        let trust = TrustBundle::from_pem(&ca.cert_pem())
            .unwrap()
            .with_crl_pem(&pem)
            .unwrap();
        assert_eq!(trust.crl_count(), 1);
        trust.verify_node(&one, SystemTime::now()).unwrap();

        let again = RevocationList::from_pem(&pem, &ca).unwrap();
        assert_eq!(again.number(), "1");
        assert!(again.entries().is_empty());
    }

    #[test]
    fn a_revoked_certificate_is_refused_and_the_others_pass() {
        let ca = ca();
        let one = node_credentials(&ca, "node-1");
        let two = node_credentials(&ca, "node-2");
        let mut list = RevocationList::new();
        assert!(list.revoke(
            serial_of(&one),
            Some(Reason::KeyCompromise),
            SystemTime::now()
        ));
        let pem = list.sign(&ca, SystemTime::now(), 30).unwrap();
        let trust = TrustBundle::from_pem(&ca.cert_pem())
            .unwrap()
            .with_crl_pem(&pem)
            .unwrap();
        let error = trust.verify_node(&one, SystemTime::now()).unwrap_err();
        assert!(
            matches!(
                &error,
                PkiError::Untrusted {
                    reason: rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked),
                    ..
                }
            ),
            "{error}"
        );
        trust.verify_node(&two, SystemTime::now()).unwrap();
    }

    #[test]
    fn the_list_round_trips_and_the_number_goes_up() {
        let ca = ca();
        let one = node_credentials(&ca, "node-1");
        let two = node_credentials(&ca, "node-2");
        let mut list = RevocationList::new();
        assert!(list.revoke(serial_of(&one), Some(Reason::Superseded), at(1_767_225_600)));
        // "Unspecified" is written as no reason at all.
        assert!(list.revoke(
            serial_of(&two),
            Some(Reason::Unspecified),
            at(1_767_225_601)
        ));
        assert!(!list.revoke(serial_of(&one), None, at(1_767_225_602)));
        let big: Serial = "ff".repeat(20).parse().unwrap();
        assert!(list.revoke(big.clone(), None, at(1_767_225_603)));
        let now = at(1_767_300_000);
        let pem = list.sign(&ca, now, 10).unwrap();

        let mut read = RevocationList::from_pem(&pem, &ca).unwrap();
        assert_eq!(read.number(), "1");
        assert_eq!(read.entries(), list.entries());
        assert_eq!(read.entries()[0].reason, Some(Reason::Superseded));
        assert_eq!(read.entries()[1].reason, None);
        assert!(read.is_revoked(&big));
        assert_eq!(read.this_update(), Some(now));
        assert_eq!(
            read.next_update(),
            Some(now + std::time::Duration::from_secs(10 * 86_400))
        );

        let later = at(1_767_400_000);
        let pem = read.sign(&ca, later, 30).unwrap();
        let reread = RevocationList::from_pem(&pem, &ca).unwrap();
        assert_eq!(reread.number(), "2");
        assert_eq!(reread.entries(), list.entries());
        assert_eq!(reread.this_update(), Some(later));

        assert!(read.sign(&ca, later, 0).is_err());
    }

    #[test]
    fn a_crl_of_another_ca_or_a_forged_one_is_refused() {
        let ca = ca();
        let mut list = RevocationList::new();
        let foreign = list.sign(&self::ca(), SystemTime::now(), 1).unwrap();
        let error = RevocationList::from_pem(&foreign, &ca).unwrap_err();
        assert!(error.to_string().contains("not by this CA"), "{error}");

        // Same subject, other key: only the signature tells them apart.
        let now = OffsetDateTime::now_utc();
        let forged = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&impostor_of(&ca))
        .unwrap()
        .pem()
        .unwrap();
        let error = RevocationList::from_pem(&forged, &ca).unwrap_err();
        assert!(error.to_string().contains("signature"), "{error}");

        let two = format!(
            "{}{}",
            RevocationList::new()
                .sign(&ca, SystemTime::now(), 1)
                .unwrap(),
            RevocationList::new()
                .sign(&ca, SystemTime::now(), 1)
                .unwrap()
        );
        let error = RevocationList::from_pem(&two, &ca).unwrap_err();
        assert!(error.to_string().contains("exactly one"), "{error}");
        assert!(matches!(
            RevocationList::from_pem("nothing", &ca),
            Err(PkiError::Crl { .. })
        ));
        let not_a_crl = "-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n";
        assert!(matches!(
            RevocationList::from_pem(not_a_crl, &ca),
            Err(PkiError::Crl { .. })
        ));
    }

    /// An issuer with `ca`'s name but another key.
    fn impostor_of(ca: &Authority) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::Issuer::from_ca_cert_der(ca.cert_der(), key).unwrap()
    }

    #[test]
    fn a_loaded_authority_signs_crls_nodes_accept() {
        // A CA read back from its files (as the CLI uses it) must encode its
        // name exactly as the certificates it issued carry it.
        let dir = TempDir::new("crl-loaded");
        let generated = ca();
        generated.write(dir.path(), false).unwrap();
        let loaded = Authority::load(dir.path()).unwrap();
        let one = node_credentials(&generated, "node-1");
        let two = node_credentials(&loaded, "node-2");

        assert_eq!(
            RevocationList::load(dir.path(), &loaded)
                .unwrap()
                .map(|l| l.number()),
            None
        );
        let mut list = RevocationList::new();
        list.revoke(serial_of(&two), None, SystemTime::now());
        let path = list
            .write(&loaded, dir.path(), SystemTime::now(), 30)
            .unwrap();
        assert_eq!(path, dir.path().join(CRL_FILE));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600, "{mode:o}");
        assert_eq!(mode & 0o022, 0, "{mode:o}");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(
            leftovers, 3,
            "ca.crt, ca.key, crl.pem and no temporary file"
        );

        let trust = TrustBundle::load(&dir.path().join("ca.crt"), Some(&path)).unwrap();
        trust.verify_node(&one, SystemTime::now()).unwrap();
        assert!(trust.verify_node(&two, SystemTime::now()).is_err());

        let read = RevocationList::load(dir.path(), &generated)
            .unwrap()
            .unwrap();
        assert_eq!(read.number(), "1");
        assert!(read.is_revoked(&serial_of(&two)));
    }

    #[test]
    fn a_stale_crl_is_still_enforced() {
        let ca = ca();
        let one = node_credentials(&ca, "node-1");
        let two = node_credentials(&ca, "node-2");
        let mut list = RevocationList::new();
        list.revoke(serial_of(&one), None, SystemTime::now());
        let long_ago = SystemTime::now() - std::time::Duration::from_secs(3 * 86_400);
        let pem = list.sign(&ca, long_ago, 1).unwrap();
        let trust = TrustBundle::from_pem(&ca.cert_pem())
            .unwrap()
            .with_crl_pem(&pem)
            .unwrap();
        assert!(trust.verify_node(&one, SystemTime::now()).is_err());
        trust.verify_node(&two, SystemTime::now()).unwrap();
    }

    #[test]
    fn revocation_targets_must_come_from_this_ca() {
        let ca = ca();
        let name = NodeName::new("node-1").unwrap();
        let issued = ca
            .issue(&name, &[], &[], Validity::days_from_now(1))
            .unwrap();
        let target = RevocationTarget::from_pem(&issued.cert_pem, &ca).unwrap();
        assert_eq!(target.node, Some(name.clone()));
        let credentials = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(target.serial, serial_of(&credentials));

        let error = RevocationTarget::from_pem(&issued.cert_pem, &self::ca()).unwrap_err();
        assert!(
            error.to_string().contains("not issued by this CA"),
            "{error}"
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node-1".to_string()]).unwrap();
        params.use_authority_key_identifier_extension = true;
        let forged = params.signed_by(&key, &impostor_of(&ca)).unwrap().pem();
        let error = RevocationTarget::from_pem(&forged, &ca).unwrap_err();
        assert!(
            error.to_string().contains("not issued by this CA"),
            "{error}"
        );
    }
}
