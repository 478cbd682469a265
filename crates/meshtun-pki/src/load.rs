//! Loading what a node runs with: its trust bundle (CA certificates and
//! optional CRLs) and its own credentials (certificate chain and key).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshtun_proto::NodeName;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::time::ASN1Time;

use crate::files;
use crate::identity::{identity_of_parsed, parse_certificate};
use crate::x509::{crypto_provider, fingerprint, unhex};
use crate::PkiError;

/// Label hashed with the private key to derive the QUIC stateless-reset key;
/// it keeps that value unrelated to any other use of the key.
const STATELESS_RESET_LABEL: &[u8] = b"meshtun/1 stateless-reset";

/// The certificates a node trusts: one or more CA certificates (several
/// while a CA is rotated) and optional certificate revocation lists.
///
/// When CRLs are present they are enforced on both sides of every handshake,
/// for every certificate of the chain below the CA, and a certificate whose
/// issuer has no CRL in the set is refused (an unknown revocation status is
/// not trusted). So a CRL file must hold a CRL from every CA in the bundle
/// that issues node certificates. A CRL past its nextUpdate is still used.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
}

impl TrustBundle {
    /// The CA certificates in `ca_pem`; fails if there is none or if one of
    /// them is not a CA certificate (a node certificate in the bundle would
    /// let that node's key vouch for anyone).
    pub fn from_pem(ca_pem: &str) -> Result<Self, PkiError> {
        Self::from_pem_with_origin(ca_pem, "CA bundle")
    }

    /// When a peer's `chain` stops verifying for its dates alone: one
    /// second after the earliest `notAfter` among its certificates (X.509
    /// times are whole seconds, and a certificate is valid through its
    /// `notAfter` second). The trust anchor's own dates are not counted:
    /// certificate verification does not check them either, and meshtun
    /// never issues a node certificate that outlives its CA. `None` if the
    /// chain cannot be parsed (the handshake would not have taken it). No
    /// signature is checked: this only says when to check again.
    pub fn chain_deadline(&self, chain: &[CertificateDer<'_>]) -> Option<SystemTime> {
        let mut deadline: Option<SystemTime> = None;
        for cert in chain {
            let parsed = parse_certificate(cert, "peer certificate").ok()?;
            let not_after = system_time(parsed.validity().not_after, "peer certificate").ok()?;
            deadline = Some(deadline.map_or(not_after, |known| known.min(not_after)));
        }
        deadline.map(|deadline| deadline + Duration::from_secs(1))
    }

    /// Loads the CA bundle at `ca` and, if given, the CRLs at `crl` (PEM
    /// holding one or more `X509 CRL` blocks, or a single DER CRL).
    pub fn load(ca: &Path, crl: Option<&Path>) -> Result<Self, PkiError> {
        let ca_pem = files::read_text(ca)?;
        let bundle = Self::from_pem_with_origin(&ca_pem, &ca.display().to_string())?;
        match crl {
            None => Ok(bundle),
            Some(path) => {
                let bytes = files::read_bytes(path)?;
                bundle.with_crls(&bytes, &path.display().to_string())
            }
        }
    }

    /// Adds the CRLs in `crl_pem` (one or more `X509 CRL` PEM blocks).
    pub fn with_crl_pem(self, crl_pem: &str) -> Result<Self, PkiError> {
        self.with_crls(crl_pem.as_bytes(), "CRL")
    }

    fn from_pem_with_origin(ca_pem: &str, origin: &str) -> Result<Self, PkiError> {
        let certs = certificates_from_pem(ca_pem, origin)?;
        let mut roots = RootCertStore::empty();
        for (index, cert) in certs.iter().enumerate() {
            let parsed = parse_certificate(cert, origin)?;
            if !parsed.is_ca() {
                return Err(PkiError::Certificate {
                    origin: origin.to_string(),
                    detail: format!(
                        "certificate #{} ({}) is not a CA certificate; a trust bundle holds \
                         only CA certificates",
                        index + 1,
                        parsed.subject()
                    ),
                });
            }
            roots
                .add(cert.clone())
                .map_err(|error| PkiError::Certificate {
                    origin: origin.to_string(),
                    detail: format!("certificate #{} is unusable as a CA: {error}", index + 1),
                })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            certs,
            crls: Vec::new(),
        })
    }

    fn with_crls(mut self, bytes: &[u8], origin: &str) -> Result<Self, PkiError> {
        let crl_error = |detail: String| PkiError::Crl {
            origin: origin.to_string(),
            detail,
        };
        let mut crls = Vec::new();
        if bytes.windows(11).any(|window| window == b"-----BEGIN ") {
            for item in CertificateRevocationListDer::pem_slice_iter(bytes) {
                crls.push(item.map_err(|error| crl_error(format!("not valid PEM: {error}")))?);
            }
            if crls.is_empty() {
                return Err(crl_error("holds no \"BEGIN X509 CRL\" block".to_string()));
            }
        } else {
            crls.push(CertificateRevocationListDer::from(bytes.to_vec()));
        }
        // Parse them now, so a bad file fails at load time, not at the first handshake.
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&self.roots),
            Arc::new(crypto_provider()),
        )
        .with_crls(crls.iter().cloned())
        .build()
        .map_err(|error| crl_error(error.to_string()))?;
        self.crls.extend(crls);
        Ok(self)
    }

    /// Number of CA certificates in the bundle.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle holds no CA certificate (never true for a bundle
    /// built by this crate).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The CA certificates, in file order.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Number of CRLs in the bundle.
    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }
}

/// A node's own certificate chain and private key, checked to belong
/// together, with the identity the certificate carries.
pub struct NodeCredentials {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    /// The stateless-reset secret kept beside the key across renewals
    /// (`<key>.reset`), if there is one.
    reset_secret: Option<[u8; 32]>,
    identity: NodeName,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl NodeCredentials {
    /// The certificate chain in `cert_pem` (the node's certificate first,
    /// then any intermediates) and the key in `key_pem`. Fails if the key is
    /// not the certificate's, if the certificate is a CA, or if it carries no
    /// valid node identity. Validity is not checked here (see
    /// [`TrustBundle::verify_node`]).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Self::from_pem_with_origin(cert_pem, key_pem, "node certificate", "node key")
    }

    /// Loads the certificate chain at `cert` and the key at `key`, refusing a
    /// key file that its group or others may read.
    ///
    /// A file `<key>.reset` beside the key (written by a renewal, 0600)
    /// holds the stateless-reset secret to use instead of one derived from
    /// the key, so that it outlives the key (see
    /// [`NodeCredentials::stateless_reset_secret`]).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        Self::load_with(files::read_pair(cert, key)?, key)
    }

    /// As [`load`](Self::load), but a key file its group or others may read
    /// is read all the same: for `meshtun check`, which reports that problem
    /// itself ([`key_file_mode_problem`](crate::key_file_mode_problem)) and
    /// goes on to check the rest.
    pub fn load_ignoring_key_mode(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let pair = files::PemPair {
            cert_pem: files::read_text(cert)?,
            key_pem: files::read_text(key)?,
            cert_origin: cert.display().to_string(),
            key_origin: key.display().to_string(),
        };
        Self::load_with(pair, key)
    }

    fn load_with(pair: files::PemPair, key: &Path) -> Result<Self, PkiError> {
        let mut credentials = Self::from_pem_with_origin(
            &pair.cert_pem,
            &pair.key_pem,
            &pair.cert_origin,
            &pair.key_origin,
        )?;
        let reset = reset_secret_path(key);
        match files::read_private_text(&reset) {
            Ok(text) => {
                let secret = unhex::<32>(text.trim()).ok_or_else(|| PkiError::Key {
                    origin: reset.display().to_string(),
                    detail: "not a stateless-reset secret (64 hex digits); delete it to \
                             derive one from the key again"
                        .to_string(),
                })?;
                credentials.reset_secret = Some(secret);
            }
            Err(PkiError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(error) => return Err(error),
        }
        Ok(credentials)
    }

    fn from_pem_with_origin(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, PkiError> {
        let chain = certificates_from_pem(cert_pem, cert_origin)?;
        let (not_before, not_after, identity) = {
            let leaf = chain.first().ok_or_else(|| PkiError::NoCertificate {
                origin: cert_origin.to_string(),
            })?;
            let parsed = parse_certificate(leaf, cert_origin)?;
            if parsed.is_ca() {
                return Err(PkiError::Certificate {
                    origin: cert_origin.to_string(),
                    detail: "is a CA certificate; a node needs a certificate of its own \
                             (`meshtun pki issue`)"
                        .to_string(),
                });
            }
            let identity = identity_of_parsed(&parsed).map_err(|detail| PkiError::Identity {
                origin: cert_origin.to_string(),
                detail,
            })?;
            let validity = parsed.validity();
            (
                system_time(validity.not_before, cert_origin)?,
                system_time(validity.not_after, cert_origin)?,
                identity,
            )
        };

        let key = private_key_from_pem(key_pem, key_origin)?;
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|error| PkiError::Key {
                origin: key_origin.to_string(),
                detail: error.to_string(),
            })?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(PkiError::KeyMismatch {
                    cert_origin: cert_origin.to_string(),
                    key_origin: key_origin.to_string(),
                })
            }
            Err(error) => {
                return Err(PkiError::Key {
                    origin: key_origin.to_string(),
                    detail: format!("cannot check it against the certificate: {error}"),
                })
            }
        }

        Ok(Self {
            chain,
            key,
            reset_secret: None,
            identity,
            not_before,
            not_after,
        })
    }

    /// The node name this certificate stands for.
    pub fn identity(&self) -> &NodeName {
        &self.identity
    }

    /// The certificate chain, the node's own certificate first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key. Secret: for a TLS configuration that presents this
    /// certificate, never to be written or sent.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// Start of the node certificate's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the node certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// `sha256:<hex>` of the node certificate's DER.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(|leaf| fingerprint(leaf))
            .unwrap_or_default()
    }

    /// 32 bytes derived from the private key: SHA-256 over the label
    /// `meshtun/1 stateless-reset` followed by the key's DER. A restarted
    /// daemon with the same key produces the same QUIC stateless-reset key,
    /// so peers drop connections to the old process at once (docs/design.md, "Identity").
    ///
    /// With a `<key>.reset` file (see [`NodeCredentials::load`]), its
    /// secret instead: a renewal writes the secret of the key it replaces
    /// there, so a daemon restarted after any number of renewals still
    /// sends resets its peers recognize.
    pub fn stateless_reset_secret(&self) -> [u8; 32] {
        if let Some(secret) = self.reset_secret {
            return secret;
        }
        let mut hash = Sha256::new();
        hash.update(STATELESS_RESET_LABEL);
        hash.update(self.key.secret_der());
        hash.finalize().into()
    }
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            reset_secret: self.reset_secret,
            identity: self.identity.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("identity", &self.identity)
            .field("fingerprint", &self.fingerprint())
            .field("chain_len", &self.chain.len())
            .field("key", &"[elided]")
            .finish()
    }
}

/// Every certificate in `pem`, in order; an error if there is none.
pub(crate) fn certificates_from_pem(
    pem: &str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certs.push(item.map_err(|error| pem_error(origin, error))?);
    }
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            origin: origin.to_string(),
        });
    }
    Ok(certs)
}

/// The first certificate in `pem`; errors name `origin`.
pub fn first_certificate(pem: &str, origin: &str) -> Result<CertificateDer<'static>, PkiError> {
    certificates_from_pem(pem, origin)?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::NoCertificate {
            origin: origin.to_string(),
        })
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub(crate) fn private_key_from_pem(
    pem: &str,
    origin: &str,
) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|error| match error {
        pem::Error::NoItemsFound => PkiError::NoPrivateKey {
            origin: origin.to_string(),
        },
        other => pem_error(origin, other),
    })
}

fn pem_error(origin: &str, error: pem::Error) -> PkiError {
    PkiError::Pem {
        origin: origin.to_string(),
        detail: error.to_string(),
    }
}

/// `<key>.reset`: where a renewal keeps the stateless-reset secret.
pub fn reset_secret_path(key: &Path) -> std::path::PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".reset");
    std::path::PathBuf::from(name)
}

/// Removes `<key>.reset` after a new key was written in place by hand (a
/// join with --force, `pki renew --new-key`, `pki issue --force`): a
/// secret derived from the replaced, perhaps compromised, key must not
/// outlive it.
pub fn forget_reset_secret(key: &Path) -> Result<(), PkiError> {
    let path = reset_secret_path(key);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Write { path, source }),
    }
}

/// An X.509 time as a `SystemTime`, or an error naming `origin`.
pub(crate) fn system_time(time: ASN1Time, origin: &str) -> Result<SystemTime, PkiError> {
    crate::x509::system_time(time).ok_or_else(|| PkiError::Certificate {
        origin: origin.to_string(),
        detail: format!("validity date {time} is outside the range this system can represent"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, Validity};
    use meshtun_test_support::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::time::UNIX_EPOCH;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn ca() -> Authority {
        Authority::generate("prod", Validity::days_from_now(30)).unwrap()
    }

    #[test]
    fn credentials_report_identity_validity_and_fingerprint() {
        let ca = ca();
        let validity = Validity::days_from_now(7);
        let issued = ca.issue(&node("node-1"), &[], &[], validity).unwrap();
        let credentials = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(credentials.identity().as_str(), "node-1");
        let expected_end =
            UNIX_EPOCH + Duration::from_secs(validity.not_after.unix_timestamp() as u64);
        assert_eq!(credentials.not_after(), expected_end);
        assert!(credentials.not_before() < SystemTime::now());

        let print = credentials.fingerprint();
        assert!(print.starts_with("sha256:"));
        assert_eq!(print.len(), 7 + 64);
        assert!(print[7..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(!format!("{credentials:?}").contains("PRIVATE"));
    }

    #[test]
    fn key_of_another_node_is_detected() {
        let ca = ca();
        let one = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let two = ca
            .issue(&node("node-2"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let error = NodeCredentials::from_pem(&one.cert_pem, &two.key_pem).unwrap_err();
        assert!(matches!(error, PkiError::KeyMismatch { .. }), "{error}");
        assert!(error.to_string().contains("node key"), "{error}");
    }

    #[test]
    fn a_ca_certificate_is_not_node_credentials() {
        let ca = ca();
        let error = NodeCredentials::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap_err();
        assert!(error.to_string().contains("CA certificate"), "{error}");
    }

    #[test]
    fn stateless_reset_secret_follows_the_key() {
        let ca = ca();
        let one = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let two = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let first = NodeCredentials::from_pem(&one.cert_pem, &one.key_pem).unwrap();
        let again = NodeCredentials::from_pem(&one.cert_pem, &one.key_pem).unwrap();
        let other = NodeCredentials::from_pem(&two.cert_pem, &two.key_pem).unwrap();
        assert_eq!(
            first.stateless_reset_secret(),
            again.stateless_reset_secret()
        );
        assert_ne!(
            first.stateless_reset_secret(),
            other.stateless_reset_secret()
        );
        assert_ne!(first.stateless_reset_secret(), [0; 32]);
    }

    #[test]
    fn key_file_mode_is_enforced_on_load() {
        let dir = TempDir::new("creds");
        let ca = ca();
        let name = node("node-1");
        let issued = ca
            .issue(&name, &[], &[], Validity::days_from_now(7))
            .unwrap();
        let (cert, key) = issued.write(dir.path(), &name, false).unwrap();

        let loaded = NodeCredentials::load(&cert, &key).unwrap();
        assert_eq!(loaded.identity(), &name);

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = NodeCredentials::load(&cert, &key).unwrap_err();
        assert!(
            matches!(&error, PkiError::KeyPermissions { mode: 0o644, path } if *path == key),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("0644") && message.contains("chmod 600"),
            "{message}"
        );

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(NodeCredentials::load(&cert, &key).is_ok());

        let missing = dir.path().join("missing.crt");
        let error = NodeCredentials::load(&missing, &key).unwrap_err();
        assert!(error.to_string().contains("missing.crt"), "{error}");
    }

    #[test]
    fn trust_bundle_holds_only_ca_certificates() {
        let one = ca();
        let two = ca();
        let bundle =
            TrustBundle::from_pem(&format!("{}{}", one.cert_pem(), two.cert_pem())).unwrap();
        assert_eq!(bundle.len(), 2);
        assert!(!bundle.is_empty());

        assert!(matches!(
            TrustBundle::from_pem("no pem here"),
            Err(PkiError::NoCertificate { .. })
        ));
        let issued = one
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let error = TrustBundle::from_pem(&issued.cert_pem).unwrap_err();
        assert!(error.to_string().contains("not a CA"), "{error}");

        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustBundle::from_pem(broken),
            Err(PkiError::Pem { .. })
        ));
        let not_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustBundle::from_pem(not_der),
            Err(PkiError::Certificate { .. })
        ));
    }

    #[test]
    fn trust_bundle_load_names_the_bad_crl_file() {
        let dir = TempDir::new("bundle");
        let ca = ca();
        ca.write(dir.path(), false).unwrap();
        let ca_path = dir.path().join("ca.crt");
        assert_eq!(TrustBundle::load(&ca_path, None).unwrap().len(), 1);

        let crl_path = dir.path().join("crl.pem");
        std::fs::write(&crl_path, b"\x30\x00").unwrap();
        let error = TrustBundle::load(&ca_path, Some(&crl_path)).unwrap_err();
        assert!(matches!(error, PkiError::Crl { .. }), "{error}");
        assert!(error.to_string().contains("crl.pem"), "{error}");

        std::fs::write(
            &crl_path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = TrustBundle::load(&ca_path, Some(&crl_path)).unwrap_err();
        assert!(matches!(error, PkiError::Crl { .. }), "{error}");
    }
}
