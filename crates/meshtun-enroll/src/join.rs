//! The joining node's side: a fresh key and its CSR ([`JoinKey`]), the
//! checks of the server's answer ([`JoinKey::accept`]) before anything is
//! written, and the node's files ([`JoinFiles`], [`Enrolled::write`], and
//! [`Enrolled::install`] for a renewal).

use std::fmt;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshtun_pki::{
    first_certificate, hex, NewFile, NodeCredentials, PkiError, TrustBundle, CA_CERT_FILE,
    CERT_MODE, KEY_MODE,
};
use meshtun_proto::NodeName;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};

use crate::error::EnrollError;
use crate::pin::CaFingerprint;
use crate::token::JoinToken;
use crate::wire::{encode_frame, EnrollRequest, EnrollResponse, RenewRequest, PROTOCOL_VERSION};

/// A joining node's fresh P-256 key and the CSR for it. The key stays in
/// memory until [`Enrolled::write`]; it is never sent.
pub struct JoinKey {
    node: NodeName,
    key: KeyPair,
    csr_pem: String,
}

impl JoinKey {
    /// Generates a key and a CSR asking for `node` (CN and DNS SAN); the
    /// server adds the token's other names itself.
    pub fn generate(node: &NodeName) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node.as_str());
        params.subject_alt_names = vec![SanType::DnsName(node.as_str().try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok(Self {
            node: node.clone(),
            key,
            csr_pem,
        })
    }

    /// The node asked for.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The CSR in PEM.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The framed request carrying `token` and the CSR.
    pub fn request(&self, token: &JoinToken) -> Result<Vec<u8>, EnrollError> {
        self.request_for(token, None)
    }

    /// The framed request carrying `token` and the CSR, asking for a
    /// certificate valid for `valid_for` (if less than the token grants).
    pub fn request_for(
        &self,
        token: &JoinToken,
        valid_for: Option<Duration>,
    ) -> Result<Vec<u8>, EnrollError> {
        encode_frame(&EnrollRequest {
            version: PROTOCOL_VERSION,
            token: token.reveal(),
            csr: self.csr_pem.clone(),
            valid_for: valid_for.map(|lifetime| lifetime.as_secs()),
        })
    }

    /// The framed renewal request carrying the CSR (the current
    /// certificate goes in the TLS handshake).
    pub fn renewal_request(&self) -> Result<Vec<u8>, EnrollError> {
        encode_frame(&RenewRequest {
            version: PROTOCOL_VERSION,
            csr: self.csr_pem.clone(),
        })
    }

    /// Checks the server's answer: not a refusal; the CA is the pinned one;
    /// the certificate belongs to this key, names this node, and verifies
    /// against that CA at `now`.
    pub fn accept(
        self,
        response: EnrollResponse,
        pinned: &CaFingerprint,
        now: SystemTime,
    ) -> Result<Enrolled, EnrollError> {
        let (cert_pem, ca_pem) = match response {
            EnrollResponse::Issued { certificate, ca } => (certificate, ca),
            EnrollResponse::Refused { error, message } => {
                return Err(EnrollError::Refused {
                    code: error,
                    message,
                })
            }
        };
        let ca_der = first_certificate(&ca_pem, "the CA certificate in the answer")?;
        let presented = CaFingerprint::of(&ca_der);
        if presented != *pinned {
            return Err(EnrollError::CaMismatch {
                expected: *pinned,
                presented,
            });
        }
        let key_pem = self.key.serialize_pem();
        let credentials = NodeCredentials::from_pem(&cert_pem, &key_pem).map_err(|error| {
            EnrollError::Certificate(format!("it does not go with the key sent: {error}"))
        })?;
        if *credentials.identity() != self.node {
            return Err(EnrollError::Certificate(format!(
                "it is for node {}, not {}",
                credentials.identity(),
                self.node
            )));
        }
        let trust = TrustBundle::from_pem(&ca_pem)?;
        trust
            .verify_node(&credentials, now)
            .map_err(|error| EnrollError::Certificate(error.to_string()))?;
        Ok(Enrolled {
            node: self.node,
            cert_pem,
            key_pem,
            ca_pem,
            credentials,
        })
    }
}

impl fmt::Debug for JoinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinKey")
            .field("node", &self.node)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// Where `meshtun join` writes a node's files in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinFiles {
    /// `DIR/<node>.crt` (0644).
    pub cert: PathBuf,
    /// `DIR/<node>.key` (0600).
    pub key: PathBuf,
    /// `DIR/ca.crt` (0644).
    pub ca: PathBuf,
}

impl JoinFiles {
    /// The paths for `node` in `dir`.
    pub fn new(dir: &Path, node: &NodeName) -> Self {
        // A node name holds no '/' and does not start with '.'.
        Self {
            cert: dir.join(format!("{node}.crt")),
            key: dir.join(format!("{node}.key")),
            ca: dir.join(CA_CERT_FILE),
        }
    }

    /// Before a token is spent: creates `dir` (0700) if needed and checks
    /// that nothing would be overwritten without `force`. An existing
    /// `ca.crt` is fine if it is the pinned CA (it is then left alone).
    pub fn prepare(
        dir: &Path,
        node: &NodeName,
        pinned: &CaFingerprint,
        force: bool,
    ) -> Result<Self, PkiError> {
        let paths = Self::new(dir, node);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PkiError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        if force {
            return Ok(paths);
        }
        for path in [&paths.key, &paths.cert] {
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::Exists { path: path.clone() });
            }
        }
        if paths.ca.symlink_metadata().is_ok() && !same_ca(&paths.ca, pinned) {
            return Err(PkiError::Exists {
                path: paths.ca.clone(),
            });
        }
        Ok(paths)
    }
}

/// Whether the file at `path` holds the pinned CA certificate (first).
fn same_ca(path: &Path, pinned: &CaFingerprint) -> bool {
    meshtun_pki::read_text(path)
        .and_then(|pem| first_certificate(&pem, "ca.crt"))
        .is_ok_and(|der| CaFingerprint::of(&der) == *pinned)
}

/// A joined node's certificate, key and CA, checked to belong together.
pub struct Enrolled {
    node: NodeName,
    pub(crate) cert_pem: String,
    key_pem: String,
    ca_pem: String,
    credentials: NodeCredentials,
}

impl Enrolled {
    /// The node's name.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The certificate and key, loaded.
    pub fn credentials(&self) -> &NodeCredentials {
        &self.credentials
    }

    /// Writes `DIR/<node>.key` (0600), `DIR/<node>.crt` and `DIR/ca.crt`,
    /// all or none (each file through a temporary file with `force`). An
    /// existing `ca.crt` holding the same CA is left as it is.
    pub fn write(&self, dir: &Path, force: bool) -> Result<JoinFiles, PkiError> {
        let paths = JoinFiles::new(dir, &self.node);
        let mut targets = vec![
            NewFile {
                path: paths.key.clone(),
                contents: &self.key_pem,
                mode: KEY_MODE,
            },
            NewFile {
                path: paths.cert.clone(),
                contents: &self.cert_pem,
                mode: CERT_MODE,
            },
        ];
        let pinned =
            first_certificate(&self.ca_pem, "CA certificate").map(|der| CaFingerprint::of(&der))?;
        if !(paths.ca.symlink_metadata().is_ok() && same_ca(&paths.ca, &pinned)) {
            targets.push(NewFile {
                path: paths.ca.clone(),
                contents: &self.ca_pem,
                mode: CERT_MODE,
            });
        }
        meshtun_pki::write_files(dir, &targets, force)?;
        meshtun_pki::forget_reset_secret(&paths.key)?;
        Ok(paths)
    }
}

/// Where [`Enrolled::install`] keeps the pair it replaced: `<path>.prev`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

impl Enrolled {
    /// Installs a renewed certificate and key in place of the ones at
    /// `cert` and `key` (`tls.cert`, `tls.key`): the current pair is copied
    /// to `<cert>.prev` and `<key>.prev` first, then the key and the
    /// certificate are each replaced atomically (a temporary file renamed
    /// over it). The CA certificate is not touched. Returns the `.prev`
    /// paths.
    pub fn install(&self, cert: &Path, key: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        let (cert_prev, key_prev) = (previous_path(cert), previous_path(key));
        // One renewal at a time per key (the daemon and `meshtun renew`).
        let mut lock_path = key.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let _lock = meshtun_pki::lock_exclusive(&lock_path).map_err(|source| PkiError::Write {
            path: lock_path.clone(),
            source,
        })?;
        let old_key = meshtun_pki::read_private_text(key)?;
        let old_cert = meshtun_pki::read_text(cert)?;
        // The stateless-reset secret stays what it was: peers of a daemon
        // restarted after this renewal must recognize its resets.
        let reset = meshtun_pki::reset_secret_path(key);
        if !reset.exists() {
            let current = NodeCredentials::load(cert, key)?;
            let secret = hex(&current.stateless_reset_secret());
            let dir = match reset.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let file = NewFile {
                path: reset.clone(),
                contents: &format!("{secret}\n"),
                mode: KEY_MODE,
            };
            meshtun_pki::write_files(dir, &[file], false)?;
        }
        for (path, contents, mode) in [
            (&key_prev, old_key.as_str(), KEY_MODE),
            (&cert_prev, old_cert.as_str(), CERT_MODE),
            (&key.to_path_buf(), self.key_pem.as_str(), KEY_MODE),
            (&cert.to_path_buf(), self.cert_pem.as_str(), CERT_MODE),
        ] {
            let dir = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let file = NewFile {
                path: path.clone(),
                contents,
                mode,
            };
            meshtun_pki::write_files(dir, &[file], true)?;
        }
        Ok((cert_prev, key_prev))
    }
}

impl fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolled")
            .field("node", &self.node)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{body, ca_dir, grant, joined, node, renewal_body, DAY, HOUR};
    use crate::Enroller;
    use meshtun_test_support::TempDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn install_keeps_the_previous_pair_beside_the_new_one() {
        let (_dir, enroller, joined, pinned) = joined("install", None);
        let current = joined.credentials();
        let out = TempDir::new("install-out");
        std::fs::create_dir_all(out.path()).unwrap();
        let cert = out.path().join("node-x.crt");
        let key_path = out.path().join("node-x.key");
        let old_cert = joined.cert_pem.clone();
        std::fs::write(&cert, &old_cert).unwrap();
        std::fs::write(&key_path, &joined.key_pem).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let key = JoinKey::generate(&node("node-x")).unwrap();
        let now = SystemTime::now();
        let answer = enroller
            .renew(&renewal_body(&key), Some(current.chain()), now)
            .unwrap();
        let renewed = key
            .accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
            .unwrap();
        let (cert_prev, key_prev) = renewed.install(&cert, &key_path).unwrap();
        assert_eq!(std::fs::read_to_string(&cert_prev).unwrap(), old_cert);
        assert_eq!(std::fs::read_to_string(&key_prev).unwrap(), joined.key_pem);
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_prev), 0o600);
        assert_eq!(mode(&key_path), 0o600);
        let loaded = NodeCredentials::load(&cert, &key_path).unwrap();
        assert_eq!(loaded.fingerprint(), renewed.credentials().fingerprint());
        // The stateless-reset secret is the previous key's, kept beside it.
        let reset = out.path().join("node-x.key.reset");
        assert_eq!(mode(&reset), 0o600);
        assert_ne!(
            loaded.stateless_reset_secret(),
            renewed.credentials().stateless_reset_secret(),
            "not derived from the new key"
        );
        let first_secret = loaded.stateless_reset_secret();
        // A second renewal keeps it.
        let current = loaded;
        let key = JoinKey::generate(&node("node-x")).unwrap();
        let answer = enroller
            .renew(&renewal_body(&key), Some(current.chain()), now)
            .unwrap();
        key.accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
            .unwrap()
            .install(&cert, &key_path)
            .unwrap();
        let again = NodeCredentials::load(&cert, &key_path).unwrap();
        assert_eq!(again.stateless_reset_secret(), first_secret);
    }
    #[test]
    fn join_files_are_written_all_or_nothing() {
        let (_dir, authority, store) = ca_dir("join-files");
        let out = TempDir::new("join-out");
        let pinned = CaFingerprint::of_authority(&authority);
        let token = store
            .create(&grant("node-x"), HOUR, SystemTime::now())
            .unwrap()
            .token;
        let enroller = Enroller::new(authority, store, 30 * DAY);
        let key = JoinKey::generate(&node("node-x")).unwrap();
        let granted = enroller
            .handle(
                &body(&token.reveal(), key.csr_pem()),
                "a",
                SystemTime::now(),
            )
            .unwrap();
        let enrolled = key
            .accept(
                EnrollResponse::from(&Ok(granted)),
                &pinned,
                SystemTime::now(),
            )
            .unwrap();

        let paths = JoinFiles::prepare(out.path(), &node("node-x"), &pinned, false).unwrap();
        let written = enrolled.write(out.path(), false).unwrap();
        assert_eq!(paths, written);
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&written.key), 0o600);
        assert_eq!(mode(out.path()), 0o700);
        NodeCredentials::load(&written.cert, &written.key).unwrap();
        TrustBundle::load(&written.ca, None).unwrap();

        // Again: the node's files exist; ca.crt alone would be fine.
        assert!(matches!(
            JoinFiles::prepare(out.path(), &node("node-x"), &pinned, false),
            Err(PkiError::Exists { .. })
        ));
        JoinFiles::prepare(out.path(), &node("node-y"), &pinned, false).unwrap();
        // A ca.crt of another CA is not overwritten without force.
        assert!(matches!(
            JoinFiles::prepare(out.path(), &node("node-y"), &CaFingerprint([1; 32]), false),
            Err(PkiError::Exists { .. })
        ));
        enrolled.write(out.path(), true).unwrap();
    }
}
