//! Certificate issuance with rcgen: the cluster CA and the node certificates
//! it signs. Everything is ECDSA P-256 with SHA-256.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meshtun_proto::NodeName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::files::{self, NewFile, CERT_MODE, KEY_MODE};
use crate::identity::{
    check_cluster, cluster_of_parsed, cluster_uri, describe_name, identity_of_parsed, ip_from,
    node_uri, parse_certificate, Serial,
};
use crate::load::{first_certificate, private_key_from_pem};
use crate::x509::latest_x509_time;
use crate::PkiError;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";

/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How far `not_before` is set back from "now", to tolerate clock skew
/// between the issuing machine and the nodes; at most a quarter of the
/// lifetime, so a certificate valid for minutes is not mostly in the past.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Random bytes in a serial number (RFC 5280 allows up to 20 octets).
const SERIAL_LEN: usize = 16;

/// The period a certificate is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew) until `days` days from now.
    pub fn days_from_now(days: u32) -> Self {
        Self::days_from(OffsetDateTime::now_utc(), days)
    }

    /// From one hour before `start` until `days` days after it. A period
    /// reaching past 9999-12-31T23:59:59Z (the end of X.509 time) ends there.
    pub fn days_from(start: OffsetDateTime, days: u32) -> Self {
        Self::lasting(
            start,
            std::time::Duration::from_secs(u64::from(days) * 86_400),
        )
    }

    /// From now for `lifetime` (see [`Validity::lasting`]).
    pub fn from_now(lifetime: std::time::Duration) -> Self {
        Self::lasting(OffsetDateTime::now_utc(), lifetime)
    }

    /// Until `lifetime` after `start`, and from somewhat before `start` for
    /// clock skew: an hour, or a quarter of `lifetime` if that is less. A
    /// period reaching past 9999-12-31T23:59:59Z (the end of X.509 time)
    /// ends there.
    pub fn lasting(start: OffsetDateTime, lifetime: std::time::Duration) -> Self {
        let lifetime = Duration::try_from(lifetime).unwrap_or(Duration::MAX);
        // Whole seconds, as X.509 times are: a renewal, which recovers the
        // lifetime from the dates, then gets exactly the same one.
        let skew = Duration::seconds(CLOCK_SKEW.min(lifetime / 4).whole_seconds());
        let not_before = start.checked_sub(skew).unwrap_or(start);
        let not_after = start
            .checked_add(lifetime)
            .map_or_else(latest_x509_time, |end| end.min(latest_x509_time()));
        Self {
            not_before,
            not_after,
        }
    }

    /// The lifetime that [`Validity::lasting`] was given for a certificate
    /// valid from `not_before` to `not_after` (the span less the skew
    /// allowance): what a renewal of it should last.
    pub fn lifetime_of(
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> std::time::Duration {
        let span = not_after
            .duration_since(not_before)
            .unwrap_or(std::time::Duration::ZERO);
        let hour = std::time::Duration::from_secs(3600);
        // A lifetime of 4 h or more was set back a full hour (5 h of span);
        // a shorter one L by floor(L/4) seconds, so the span S is
        // L + floor(L/4) and L is the one whole number in [4S/5, 4S/5 + 4/5).
        if span >= 5 * hour {
            span - hour
        } else {
            std::time::Duration::from_secs((span.as_secs() * 4).div_ceil(5))
        }
    }

    fn check(&self) -> Result<(), PkiError> {
        if self.not_before >= self.not_after {
            return Err(PkiError::Validity {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

/// A cluster certificate authority held in memory: its certificate and key.
///
/// It signs node certificates. It can be generated here or loaded from a CA
/// made elsewhere (openssl, step-ca), provided its certificate is a CA and
/// names the cluster (URI SAN `spiffe://<cluster>` or CN `meshtun CA <cluster>`).
pub struct Authority {
    cluster: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Generates a fresh CA for `cluster`: CN `meshtun CA <cluster>`, O
    /// `meshtun`, OU `ca-<12 hex digits of its key's SHA-256>` (so that the
    /// old and new CA of a rotation have distinct subjects), URI SAN `spiffe://<cluster>` (where the cluster name is read
    /// back from), basicConstraints CA with path length 0 (it signs node
    /// certificates directly), key usage keyCertSign and cRLSign.
    ///
    /// `cluster` must be a SPIFFE trust domain: lowercase ASCII letters,
    /// digits, '.', '-' and '_'.
    pub fn generate(cluster: &str, validity: Validity) -> Result<Self, PkiError> {
        check_cluster(cluster)?;
        validity.check()?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;

        let mut params = base_params(validity, format!("meshtun CA {cluster}"))?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshtun");
        // CRLs are matched to their CA by subject name alone (webpki), so two
        // CAs of one cluster (a rotation) must not share a subject.
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, ca_unit(&key));
        params.subject_alt_names = vec![SanType::URI(cluster_uri(cluster).try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];

        let cert = params.self_signed(&key)?;
        Ok(Self {
            cluster: cluster.to_string(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An authority from its certificate and key in PEM. The certificate
    /// must be a CA, name its cluster, and match the key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Self::from_pem_with_origin(cert_pem, key_pem, "CA certificate", "CA key")
    }

    /// Loads `DIR/ca.crt` and `DIR/ca.key`, refusing a key file that its
    /// group or others may read.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let pair = files::read_pair(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))?;
        Self::from_pem_with_origin(
            &pair.cert_pem,
            &pair.key_pem,
            &pair.cert_origin,
            &pair.key_origin,
        )
    }

    fn from_pem_with_origin(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, PkiError> {
        let cert_der = first_certificate(cert_pem, cert_origin)?;
        let parsed = parse_certificate(&cert_der, cert_origin)?;
        let certificate_error = |detail: &str| PkiError::Certificate {
            origin: cert_origin.to_string(),
            detail: detail.to_string(),
        };
        if !parsed.is_ca() {
            return Err(certificate_error(
                "not a CA certificate (basicConstraints CA:TRUE is missing); \
                 a node certificate cannot sign others",
            ));
        }
        if let Ok(Some(usage)) = parsed.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(certificate_error(
                    "the CA certificate's key usage does not allow keyCertSign",
                ));
            }
        }
        let cluster = cluster_of_parsed(&parsed).ok_or_else(|| {
            certificate_error(
                "the CA certificate does not name its cluster: expected a URI SAN \
                 spiffe://<cluster> or a subject CN \"meshtun CA <cluster>\"",
            )
        })?;

        let key = key_pair_of(&parsed, cert_origin, key_pem, key_origin)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|error| {
            certificate_error(&format!("cannot sign with this CA certificate: {error}"))
        })?;

        Ok(Self {
            cluster,
            cert_pem: pem_block("CERTIFICATE", &cert_der),
            cert_der,
            // The key as given: rcgen would label a SEC1 key "PRIVATE KEY".
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// The cluster (SPIFFE trust domain) this CA signs for.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key in PEM. Secret: write it only with [`Authority::write`].
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Issues a certificate and a fresh P-256 key for `node`.
    ///
    /// The certificate carries the URI SAN `spiffe://<cluster>/node/<node>`,
    /// the DNS SAN `<node>` followed by `dns` (duplicates dropped), the IP
    /// SANs `ips`, extended key usage serverAuth and clientAuth,
    /// basicConstraints CA:FALSE and a random 126-bit serial number.
    pub fn issue(
        &self,
        node: &NodeName,
        ips: &[IpAddr],
        dns: &[String],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let key = new_key()?;
        let cert_pem = self.issue_for_public_key(node, ips, dns, validity, &key)?;
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Re-issues the node certificate in `cert_pem`: the same identity and
    /// the same SANs (URI, DNS and IP, copied in order), a new random serial,
    /// `validity`, and otherwise exactly what [`Authority::issue`] writes.
    ///
    /// With `key_pem` the certificate keeps its key (which must be the
    /// certificate's); without it a fresh P-256 key is generated. The
    /// certificate may come from another CA of the same cluster (renewing
    /// under a new CA is how nodes move during a CA rotation), but a node URI
    /// naming another cluster, or a SAN of another kind, is refused.
    pub fn renew(
        &self,
        cert_pem: &str,
        key_pem: Option<&str>,
        validity: Validity,
    ) -> Result<Renewed, PkiError> {
        self.renew_with_origin(
            cert_pem,
            "node certificate",
            key_pem.map(|key_pem| (key_pem, "node key")),
            validity,
        )
    }

    /// [`Authority::renew`] on the certificate at `cert` and, to keep the
    /// key, the key file at `key` (refused if group or others may read it).
    pub fn renew_files(
        &self,
        cert: &Path,
        key: Option<&Path>,
        validity: Validity,
    ) -> Result<Renewed, PkiError> {
        match key {
            Some(key) => {
                let pair = files::read_pair(cert, key)?;
                self.renew_with_origin(
                    &pair.cert_pem,
                    &pair.cert_origin,
                    Some((&pair.key_pem, &pair.key_origin)),
                    validity,
                )
            }
            None => {
                let cert_pem = files::read_text(cert)?;
                self.renew_with_origin(&cert_pem, &cert.display().to_string(), None, validity)
            }
        }
    }

    fn renew_with_origin(
        &self,
        cert_pem: &str,
        cert_origin: &str,
        key: Option<(&str, &str)>,
        validity: Validity,
    ) -> Result<Renewed, PkiError> {
        let renew_error = |detail: String| PkiError::Renew {
            origin: cert_origin.to_string(),
            detail,
        };
        let der = first_certificate(cert_pem, cert_origin)?;
        let previous = parse_certificate(&der, cert_origin)?;
        if previous.is_ca() {
            return Err(renew_error(
                "it is a CA certificate; `renew` renews node certificates".to_string(),
            ));
        }
        let node = identity_of_parsed(&previous).map_err(|detail| PkiError::Identity {
            origin: cert_origin.to_string(),
            detail,
        })?;
        let names = self.copied_names(&previous).map_err(renew_error)?;
        let ca = parse_certificate(&self.cert_der, "CA certificate")?;
        let previous_issuer = (previous.issuer().as_raw() != ca.subject().as_raw())
            .then(|| previous.issuer().to_string());

        let (cert_pem, key_pem) = match key {
            Some((key_pem, key_origin)) => {
                let key = key_pair_of(&previous, cert_origin, key_pem, key_origin)?;
                (self.sign_node(&node, names, validity, &key)?, None)
            }
            None => {
                let key = new_key()?;
                let cert_pem = self.sign_node(&node, names, validity, &key)?;
                (cert_pem, Some(key.serialize_pem()))
            }
        };
        let renewed = first_certificate(&cert_pem, "renewed certificate")?;
        Ok(Renewed {
            serial: Serial::of_certificate(&renewed)?,
            previous_serial: Serial::of_parsed(&previous, cert_origin)?,
            previous_issuer,
            node,
            cert_pem,
            key_pem,
        })
    }

    /// The SANs of `previous`, for its renewal: URI, DNS and IP names in
    /// their order. The error is a plain reason.
    fn copied_names(&self, previous: &X509Certificate<'_>) -> Result<Vec<SanType>, String> {
        let names = match previous.subject_alternative_name() {
            Ok(Some(extension)) => &extension.value.general_names,
            Ok(None) => return Err("it has no subjectAltName".to_string()),
            Err(error) => return Err(format!("unreadable subjectAltName: {error}")),
        };
        let unusable =
            |name: &GeneralName<'_>, why: &str| format!("its SAN {} {why}", describe_name(name));
        let mut copied = Vec::with_capacity(names.len());
        for name in names {
            let san = match name {
                GeneralName::URI(uri) => {
                    // A node URI of another cluster would mean one thing to
                    // this CA's cluster and another to its own.
                    // `cluster_uri("")` is the bare scheme, "spiffe://".
                    let cluster = uri
                        .strip_prefix(cluster_uri("").as_str())
                        .and_then(|rest| rest.split_once("/node/"))
                        .map(|(cluster, _)| cluster);
                    if let Some(cluster) = cluster.filter(|cluster| *cluster != self.cluster) {
                        return Err(format!(
                            "its URI SAN {uri} names cluster {cluster:?}, but this CA signs \
                             for cluster {:?}; issue a new certificate with `meshtun pki issue`",
                            self.cluster
                        ));
                    }
                    SanType::URI(
                        (*uri)
                            .try_into()
                            .map_err(|_| unusable(name, "is not ASCII"))?,
                    )
                }
                GeneralName::DNSName(dns) => SanType::DnsName(
                    (*dns)
                        .try_into()
                        .map_err(|_| unusable(name, "is not ASCII"))?,
                ),
                GeneralName::IPAddress(bytes) => SanType::IpAddress(
                    ip_from(bytes).ok_or_else(|| unusable(name, "is malformed"))?,
                ),
                other => {
                    return Err(unusable(
                        other,
                        "is of a kind meshtun does not copy (only URI, DNS and IP); \
                         issue a new certificate with `meshtun pki issue`",
                    ))
                }
            };
            copied.push(san);
        }
        Ok(copied)
    }

    /// The one place a node certificate is built: CN `<node>`, the SANs
    /// `names`, basicConstraints CA:FALSE, key usage digitalSignature,
    /// extended key usage serverAuth and clientAuth, the authority key
    /// identifier, a random serial, signed by this CA for `public_key`.
    /// Returns it in PEM.
    fn sign_node(
        &self,
        node: &NodeName,
        names: Vec<SanType>,
        validity: Validity,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        // Never beyond the CA's own end: verification does not check the
        // CA's dates, so a node certificate must not outlive them.
        let mut validity = validity;
        let ca = parse_certificate(&self.cert_der, "CA certificate")?;
        let ca_end = OffsetDateTime::from_unix_timestamp(ca.validity().not_after.timestamp())
            .unwrap_or_else(|_| latest_x509_time());
        validity.not_after = validity.not_after.min(ca_end);
        validity.check()?;
        let mut params = base_params(validity, node.as_str().to_owned())?;
        params.subject_alt_names = names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// Writes `DIR/ca.crt` (0644) and `DIR/ca.key` (0600), creating `DIR`
    /// (0700) if needed. Existing files are kept unless `force` is set.
    /// Returns the certificate and key paths.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), PkiError> {
        write_pair(
            dir,
            dir.join(CA_CERT_FILE),
            &self.cert_pem,
            dir.join(CA_KEY_FILE),
            &self.key_pem,
            force,
        )
    }

    /// Like [`Authority::issue`], for a public key the node generated
    /// itself (enrollment signs a CSR, so the private key never leaves the
    /// node): the same names, extensions and serial rules; returns the
    /// certificate in PEM.
    pub fn issue_for_public_key(
        &self,
        node: &NodeName,
        ips: &[IpAddr],
        dns: &[String],
        validity: Validity,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, PkiError> {
        validity.check()?;
        let mut names = vec![SanType::URI(node_uri(&self.cluster, node).try_into()?)];
        let mut dns_names: Vec<&str> = vec![node.as_str()];
        for name in dns {
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(PkiError::DnsName { name: name.clone() });
            }
            if !dns_names.contains(&name.as_str()) {
                dns_names.push(name);
            }
        }
        for name in dns_names {
            names.push(SanType::DnsName(name.try_into()?));
        }
        let mut seen_ips = Vec::new();
        for ip in ips {
            if !seen_ips.contains(ip) {
                seen_ips.push(*ip);
                names.push(SanType::IpAddress(*ip));
            }
        }
        self.sign_node(node, names, validity, public_key)
    }

    /// A server certificate and a fresh P-256 key, for a server that proves
    /// it holds this CA (the enrollment server's own): the subject holds only
    /// CN `common_name`, no subjectAltName (it carries no node identity),
    /// basicConstraints CA:FALSE, key usage digitalSignature, extended key
    /// usage serverAuth only, a random serial and `validity` as given.
    /// Returns the chain [certificate, CA certificate] and the key (PKCS#8).
    pub fn issue_server_certificate(
        &self,
        common_name: String,
        validity: Validity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        validity.check()?;
        let key = new_key()?;
        let mut params = base_params(validity, common_name)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("cluster", &self.cluster)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// A node certificate and its private key, as issued.
#[derive(Clone)]
pub struct Issued {
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The private key in PEM (PKCS#8). Secret.
    pub key_pem: String,
}

impl Issued {
    /// Writes `DIR/<node>.crt` (0644) and `DIR/<node>.key` (0600), creating
    /// `DIR` (0700) if needed. Existing files are kept unless `force` is set.
    /// Returns the certificate and key paths.
    pub fn write(
        &self,
        dir: &Path,
        node: &NodeName,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        // A node name holds no '/' and does not start with '.', so it is a
        // plain file name inside `dir`.
        let written = write_pair(
            dir,
            dir.join(format!("{node}.crt")),
            &self.cert_pem,
            dir.join(format!("{node}.key")),
            &self.key_pem,
            force,
        )?;
        crate::load::forget_reset_secret(&written.1)?;
        Ok(written)
    }
}

/// What every certificate meshtun issues starts from: its validity, a
/// random serial and a subject holding only `common_name`.
fn base_params(validity: Validity, common_name: String) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial()?);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    Ok(params)
}

/// Writes a certificate (0644) and its key (0600) into `dir`, both or
/// neither, and returns their paths.
fn write_pair(
    dir: &Path,
    cert_path: PathBuf,
    cert_pem: &str,
    key_path: PathBuf,
    key_pem: &str,
    force: bool,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let files = [
        NewFile {
            path: key_path.clone(),
            contents: key_pem,
            mode: KEY_MODE,
        },
        NewFile {
            path: cert_path.clone(),
            contents: cert_pem,
            mode: CERT_MODE,
        },
    ];
    files::write_files(dir, &files, force)?;
    Ok((cert_path, key_path))
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A renewed node certificate, and its new key when one was generated.
#[derive(Clone)]
pub struct Renewed {
    /// The node it stands for (the same as the previous certificate's).
    pub node: NodeName,
    /// The new certificate in PEM.
    pub cert_pem: String,
    /// The new private key in PEM (PKCS#8), or `None` when the certificate
    /// keeps the previous key. Secret.
    pub key_pem: Option<String>,
    /// The new certificate's serial number.
    pub serial: Serial,
    /// The previous certificate's serial number.
    pub previous_serial: Serial,
    /// The previous certificate's issuer, when it was not this CA (a
    /// renewal under a new CA of a rotation).
    pub previous_issuer: Option<String>,
}

impl Renewed {
    /// Writes `DIR/<node>.crt` (0644) and, with a new key, `DIR/<node>.key`
    /// (0600, written first), creating `DIR` (0700) if needed. Existing files
    /// are replaced, each atomically (a temporary file in `DIR` renamed over
    /// it). Returns the certificate path and the new key's path.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, Option<PathBuf>), PkiError> {
        // A node name holds no '/' and does not start with '.'.
        let cert_path = dir.join(format!("{}.crt", self.node));
        match &self.key_pem {
            Some(key_pem) => {
                let key_path = dir.join(format!("{}.key", self.node));
                let (cert, key) =
                    write_pair(dir, cert_path, &self.cert_pem, key_path, key_pem, true)?;
                crate::load::forget_reset_secret(&key)?;
                Ok((cert, Some(key)))
            }
            None => {
                let file = NewFile {
                    path: cert_path.clone(),
                    contents: &self.cert_pem,
                    mode: CERT_MODE,
                };
                files::write_files(dir, &[file], true)?;
                Ok((cert_path, None))
            }
        }
    }
}

impl fmt::Debug for Renewed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renewed")
            .field("node", &self.node)
            .field("serial", &self.serial)
            .field("previous_serial", &self.previous_serial)
            .field("previous_issuer", &self.previous_issuer)
            .field("new_key", &self.key_pem.as_ref().map(|_| "[elided]"))
            .finish_non_exhaustive()
    }
}

/// A fresh P-256 key, as every key meshtun generates.
fn new_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// The key pair in `key_pem`, which must hold the private key of `cert`.
fn key_pair_of(
    cert: &X509Certificate<'_>,
    cert_origin: &str,
    key_pem: &str,
    key_origin: &str,
) -> Result<KeyPair, PkiError> {
    let key_der = private_key_from_pem(key_pem, key_origin)?;
    let key = KeyPair::try_from(&key_der).map_err(|error| PkiError::Key {
        origin: key_origin.to_string(),
        detail: error.to_string(),
    })?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != cert.public_key().raw {
        return Err(PkiError::KeyMismatch {
            cert_origin: cert_origin.to_string(),
            key_origin: key_origin.to_string(),
        });
    }
    Ok(key)
}

/// `ca-` and the first 12 hex digits of the SHA-256 of `key`'s public key.
fn ca_unit(key: &KeyPair) -> String {
    let digest = Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(key));
    format!("ca-{}", crate::x509::hex(&digest[..6]))
}

/// A positive serial number with 126 random bits; the first octet is never
/// zero, so the DER integer is minimal at full length.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_LEN];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// DER wrapped in a PEM block with 64-column base64 lines.
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (index, symbol) in symbols.iter().enumerate() {
            // `chunk` holds 1 to 3 bytes: it yields that many plus one symbols.
            let byte = if index <= chunk.len() {
                ALPHABET[*symbol as usize]
            } else {
                b'='
            };
            encoded.push(byte);
        }
    }
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in encoded.chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_of;
    use crate::load::NodeCredentials;
    use meshtun_test_support::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    #[test]
    fn a_short_lifetime_is_set_back_a_quarter_and_its_renewal_lasts_as_long() {
        let start = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let to_system = |time: OffsetDateTime| std::time::SystemTime::from(time);
        for (lifetime, skew) in [
            (120, 30),
            (4 * 3600, 3600),
            (12 * 3600, 3600),
            (365 * 86_400, 3600),
        ] {
            let lifetime = std::time::Duration::from_secs(lifetime);
            let validity = Validity::lasting(start, lifetime);
            assert_eq!(validity.not_before, start - Duration::seconds(skew));
            assert_eq!(validity.not_after, start + lifetime);
            assert_eq!(
                Validity::lifetime_of(
                    to_system(validity.not_before),
                    to_system(validity.not_after)
                ),
                lifetime
            );
        }
    }

    #[test]
    fn every_lifetime_in_whole_seconds_comes_back_from_its_dates() {
        let start = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        for seconds in (60..=600).chain([3599, 3600, 4 * 3600 - 1, 4 * 3600, 4 * 3600 + 1]) {
            let lifetime = std::time::Duration::from_secs(seconds);
            let validity = Validity::lasting(start, lifetime);
            assert_eq!(
                Validity::lifetime_of(validity.not_before.into(), validity.not_after.into()),
                lifetime,
                "{seconds} s"
            );
        }
    }

    #[test]
    fn validity_is_skewed_and_clamped() {
        let start = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let validity = Validity::days_from(start, 10);
        assert_eq!(validity.not_before, start - Duration::hours(1));
        assert_eq!(validity.not_after, start + Duration::days(10));
        let forever = Validity::days_from(start, u32::MAX);
        assert_eq!(forever.not_after, latest_x509_time());
        assert!(Authority::generate(
            "prod",
            Validity {
                not_before: start,
                not_after: start
            }
        )
        .is_err());
    }

    #[test]
    fn generated_ca_round_trips_through_pem() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        assert_eq!(ca.cluster(), "prod");
        let again = Authority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cluster(), "prod");
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let parsed = parse_certificate(ca.cert_der(), "ca").unwrap();
        assert!(parsed.is_ca());
        assert_eq!(
            parsed
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "meshtun CA prod"
        );
        assert!(format!("{ca:?}").contains("elided"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn issue_round_trips_and_carries_the_identity() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let issued = ca
            .issue(
                &node("node-1"),
                &["10.0.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
                &["node-1.example".to_string(), "node-1".to_string()],
                Validity::days_from_now(7),
            )
            .unwrap();
        let credentials = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(credentials.identity().as_str(), "node-1");
        assert_eq!(
            identity_of(&credentials.chain()[0]).unwrap().as_str(),
            "node-1"
        );

        let parsed = parse_certificate(&credentials.chain()[0], "node").unwrap();
        assert!(!parsed.is_ca());
        let sans: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(describe_name)
            .collect();
        assert_eq!(
            sans,
            [
                "URI:spiffe://prod/node/node-1",
                "DNS:node-1",
                "DNS:node-1.example",
                "IP:10.0.0.1"
            ],
        );
        let usage = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.server_auth && usage.client_auth);
        assert_eq!(parsed.raw_serial().len(), SERIAL_LEN);

        // Serials are random, not derived from the key or the name.
        let other = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let other = NodeCredentials::from_pem(&other.cert_pem, &other.key_pem).unwrap();
        let other_parsed = parse_certificate(&other.chain()[0], "other").unwrap();
        assert_ne!(parsed.raw_serial(), other_parsed.raw_serial());
        assert!(!format!("{issued:?}").contains(&issued.key_pem));
    }

    #[test]
    fn issue_rejects_bad_dns_names() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        for bad in ["", "has space", "a..b"] {
            let result = ca.issue(
                &node("node-1"),
                &[],
                &[bad.to_string()],
                Validity::days_from_now(1),
            );
            assert!(matches!(result, Err(PkiError::DnsName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn from_pem_refuses_a_node_certificate_and_a_foreign_key() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let issued = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let error = Authority::from_pem(&issued.cert_pem, &issued.key_pem).unwrap_err();
        assert!(error.to_string().contains("not a CA"), "{error}");

        let other = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let error = Authority::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(error, PkiError::KeyMismatch { .. }), "{error}");

        assert!(matches!(
            Authority::from_pem("", &ca.key_pem()),
            Err(PkiError::NoCertificate { .. })
        ));
        assert!(matches!(
            Authority::from_pem(&ca.cert_pem(), ""),
            Err(PkiError::NoPrivateKey { .. })
        ));
        assert!(matches!(
            Authority::generate("Prod", Validity::days_from_now(1)),
            Err(PkiError::ClusterName { .. })
        ));
    }

    #[test]
    fn ca_write_and_load() {
        let dir = TempDir::new("ca");
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let (cert, key) = ca.write(dir.path(), false).unwrap();
        assert_eq!(cert, dir.path().join("ca.crt"));
        assert_eq!(key, dir.path().join("ca.key"));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert) & 0o600, 0o600);
        assert_eq!(mode(dir.path()), 0o700);

        let loaded = Authority::load(dir.path()).unwrap();
        assert_eq!(loaded.cluster(), "prod");
        assert_eq!(loaded.cert_der(), ca.cert_der());

        // A second init must not destroy the first CA.
        let other = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let error = other.write(dir.path(), false).unwrap_err();
        assert!(matches!(error, PkiError::Exists { .. }), "{error}");
        assert!(error.to_string().contains("--force"));
        assert_eq!(
            Authority::load(dir.path()).unwrap().cert_der(),
            ca.cert_der()
        );
        other.write(dir.path(), true).unwrap();
        assert_eq!(
            Authority::load(dir.path()).unwrap().cert_der(),
            other.cert_der()
        );

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Authority::load(dir.path()).unwrap_err();
        assert!(matches!(error, PkiError::KeyPermissions { .. }), "{error}");
    }

    #[test]
    fn issued_write_refuses_overwrite_without_force() {
        let dir = TempDir::new("issued");
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let name = node("node-1");
        let issued = ca
            .issue(&name, &[], &[], Validity::days_from_now(7))
            .unwrap();
        let (cert, key) = issued.write(dir.path(), &name, false).unwrap();
        assert_eq!(cert, dir.path().join("node-1.crt"));
        assert_eq!(key, dir.path().join("node-1.key"));
        let key_mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);

        let second = ca
            .issue(&name, &[], &[], Validity::days_from_now(7))
            .unwrap();
        let error = second.write(dir.path(), &name, false).unwrap_err();
        assert!(matches!(error, PkiError::Exists { .. }), "{error}");
        let loaded = NodeCredentials::load(&cert, &key).unwrap();
        let first = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(loaded.fingerprint(), first.fingerprint());

        second.write(dir.path(), &name, true).unwrap();
        let loaded = NodeCredentials::load(&cert, &key).unwrap();
        assert_ne!(loaded.fingerprint(), first.fingerprint());
    }

    /// The SANs of the first certificate in `pem`, as `inspect` shows them.
    fn sans_of(pem: &str) -> Vec<String> {
        crate::inspect_pem(pem).unwrap().remove(0).sans
    }

    fn public_key_of(pem: &str) -> Vec<u8> {
        let der = first_certificate(pem, "cert").unwrap();
        parse_certificate(&der, "cert")
            .unwrap()
            .public_key()
            .raw
            .to_vec()
    }

    #[test]
    fn a_node_certificate_never_outlives_its_ca() {
        let ca = Authority::generate("prod", Validity::days_from_now(10)).unwrap();
        let issued = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(365))
            .unwrap();
        let credentials = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        let ca_end = crate::inspect_pem(&ca.cert_pem())
            .unwrap()
            .remove(0)
            .not_after;
        assert_eq!(credentials.not_after(), ca_end);
    }

    #[test]
    fn renew_keeps_identity_names_and_key_with_a_new_serial() {
        let ca = Authority::generate("prod", Validity::days_from_now(365)).unwrap();
        let name = node("node-1");
        let issued = ca
            .issue(
                &name,
                &["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                &["n1.example".to_string()],
                Validity::days_from_now(7),
            )
            .unwrap();
        let renewed = ca
            .renew(
                &issued.cert_pem,
                Some(&issued.key_pem),
                Validity::days_from_now(90),
            )
            .unwrap();
        assert_eq!(renewed.node, name);
        assert!(renewed.key_pem.is_none());
        assert_eq!(renewed.previous_issuer, None);
        assert_eq!(sans_of(&renewed.cert_pem), sans_of(&issued.cert_pem));
        assert_eq!(
            public_key_of(&renewed.cert_pem),
            public_key_of(&issued.cert_pem)
        );

        // The old key works with the new certificate; serial and fingerprint changed.
        let old = NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
        let new = NodeCredentials::from_pem(&renewed.cert_pem, &issued.key_pem).unwrap();
        assert_eq!(new.identity(), &name);
        assert_ne!(new.fingerprint(), old.fingerprint());
        assert_eq!(
            renewed.previous_serial,
            Serial::of_certificate(&old.chain()[0]).unwrap()
        );
        assert_eq!(
            renewed.serial,
            Serial::of_certificate(&new.chain()[0]).unwrap()
        );
        assert_ne!(renewed.serial, renewed.previous_serial);
        assert!(new.not_after() > old.not_after() + std::time::Duration::from_secs(80 * 86_400));

        // Same extensions as a freshly issued certificate.
        let der = first_certificate(&renewed.cert_pem, "renewed").unwrap();
        let parsed = parse_certificate(&der, "renewed").unwrap();
        assert!(!parsed.is_ca());
        let usage = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.server_auth && usage.client_auth);
        assert_eq!(parsed.subject().to_string(), "CN=node-1");
        crate::TrustBundle::from_pem(&ca.cert_pem())
            .unwrap()
            .verify_node(&new, std::time::SystemTime::now())
            .unwrap();
    }

    #[test]
    fn renew_with_a_new_key() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let issued = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let renewed = ca
            .renew(&issued.cert_pem, None, Validity::days_from_now(7))
            .unwrap();
        let key_pem = renewed.key_pem.clone().unwrap();
        assert_ne!(
            public_key_of(&renewed.cert_pem),
            public_key_of(&issued.cert_pem)
        );
        assert_eq!(sans_of(&renewed.cert_pem), sans_of(&issued.cert_pem));
        let new = NodeCredentials::from_pem(&renewed.cert_pem, &key_pem).unwrap();
        assert_eq!(new.identity().as_str(), "node-1");
        assert!(matches!(
            NodeCredentials::from_pem(&renewed.cert_pem, &issued.key_pem),
            Err(PkiError::KeyMismatch { .. })
        ));
        assert!(!format!("{renewed:?}").contains(&key_pem));

        let dir = TempDir::new("renew");
        let (cert, key) = renewed.write(dir.path()).unwrap();
        let key = key.unwrap();
        assert_eq!(cert, dir.path().join("node-1.crt"));
        assert_eq!(key, dir.path().join("node-1.key"));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        // Renewing again replaces the files (no --force needed: that is the point).
        let again = ca
            .renew_files(&cert, Some(&key), Validity::days_from_now(7))
            .unwrap();
        assert_eq!(again.write(dir.path()).unwrap(), (cert.clone(), None));
        let loaded = NodeCredentials::load(&cert, &key).unwrap();
        assert_eq!(
            Serial::of_certificate(&loaded.chain()[0]).unwrap(),
            again.serial
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn renew_refuses_what_it_cannot_renew_faithfully() {
        let ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let issued = ca
            .issue(&node("node-1"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let other = ca
            .issue(&node("node-2"), &[], &[], Validity::days_from_now(7))
            .unwrap();
        let error = ca
            .renew(
                &issued.cert_pem,
                Some(&other.key_pem),
                Validity::days_from_now(7),
            )
            .unwrap_err();
        assert!(matches!(error, PkiError::KeyMismatch { .. }), "{error}");

        let error = ca
            .renew(&ca.cert_pem(), None, Validity::days_from_now(7))
            .unwrap_err();
        assert!(error.to_string().contains("CA certificate"), "{error}");

        // A node of another cluster keeps its cluster's name: refused.
        let elsewhere = Authority::generate("staging", Validity::days_from_now(30)).unwrap();
        let error = elsewhere
            .renew(&issued.cert_pem, None, Validity::days_from_now(7))
            .unwrap_err();
        assert!(matches!(error, PkiError::Renew { .. }), "{error}");
        assert!(error.to_string().contains("staging"), "{error}");

        // An e-mail SAN cannot be copied.
        let key = new_key().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::DnsName("node-3".try_into().unwrap()),
            SanType::Rfc822Name("ops@example.invalid".try_into().unwrap()),
        ];
        let foreign = params.signed_by(&key, &ca.issuer).unwrap().pem();
        let error = ca
            .renew(&foreign, None, Validity::days_from_now(7))
            .unwrap_err();
        assert!(
            error.to_string().contains("email:ops@example.invalid"),
            "{error}"
        );

        // Another CA of the same cluster (a rotation): renewed, and said so.
        let new_ca = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let moved = new_ca
            .renew(
                &issued.cert_pem,
                Some(&issued.key_pem),
                Validity::days_from_now(7),
            )
            .unwrap();
        assert!(moved.previous_issuer.unwrap().contains("meshtun CA prod"));
        assert_eq!(sans_of(&moved.cert_pem), sans_of(&issued.cert_pem));
    }

    #[test]
    fn pem_block_matches_rcgen() {
        let ca = Authority::generate("prod", Validity::days_from_now(1)).unwrap();
        assert_eq!(pem_block("CERTIFICATE", ca.cert_der()), ca.cert_pem());
        assert_eq!(
            pem_block("X", b"ab"),
            "-----BEGIN X-----\nYWI=\n-----END X-----\n"
        );
        assert_eq!(
            pem_block("X", b"a"),
            "-----BEGIN X-----\nYQ==\n-----END X-----\n"
        );
    }
}
