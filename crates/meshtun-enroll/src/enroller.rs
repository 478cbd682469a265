//! The server's side of enrollment, without the network: [`Enroller`]
//! answers a join (a token and a CSR) or a renewal (a CSR from a node that
//! presented its current certificate) with a certificate ([`Granted`]) or
//! a [`Refusal`]. The CSR may ask for nothing or a subset of what the token
//! grants, and the certificate always carries exactly the token's node name
//! and SANs, never the CSR's.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshtun_pki::{
    fingerprint, first_certificate, node_uri, system_time, unix_seconds_unsigned, Authority,
    Issuance, IssuedRecord, Ledger, PkiError, RevocationList, Serial, Validity,
};
use meshtun_proto::NodeName;
use rcgen::{CertificateSigningRequestParams, PublicKeyData};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::error::{Refusal, RefusalCode};
use crate::token::{Grant, JoinToken, TokenFormatError, TokenStore};
use crate::wire::{
    EnrollRequest, EnrollResponse, RenewRequest, MIN_LIFETIME, PROTOCOL_VERSION,
    RENEWED_RETRY_WINDOW,
};

/// A certificate issued to an enrolling node, and what the log needs.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The node it was issued for.
    pub node: NodeName,
    /// The id of the token that was used; `None` for a renewal.
    pub token_id: Option<String>,
    /// `sha256:<hex>` of the certificate.
    pub fingerprint: String,
    /// The certificate in PEM.
    pub certificate_pem: String,
    /// The CA certificate in PEM.
    pub ca_pem: String,
}

/// Answers enrollment and renewal requests with one CA, its token store
/// and its issuance ledger. Blocking (it takes file locks and writes
/// files): callers on an async runtime run [`Enroller::handle`] and
/// [`Enroller::renew`] on a blocking thread.
#[derive(Debug)]
pub struct Enroller {
    authority: Authority,
    store: TokenStore,
    ledger: Ledger,
    lifetime: Duration,
}

impl Enroller {
    /// An enroller for the CA directory of `store`, issuing certificates
    /// valid for `lifetime` unless a token says otherwise; a renewal lasts
    /// as long as the certificate it renews, at most `lifetime`.
    pub fn new(authority: Authority, store: TokenStore, lifetime: Duration) -> Self {
        Self {
            ledger: Ledger::new(store.dir()),
            authority,
            store,
            lifetime,
        }
    }

    /// The CA.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Answers one request body (the JSON, without its length prefix) from
    /// the client at `source`.
    pub fn handle(&self, body: &[u8], source: &str, now: SystemTime) -> Result<Granted, Refusal> {
        let request: EnrollRequest = decode_request(
            body,
            "an enrollment request {\"version\":1,\"token\":..,\"csr\":..}",
        )?;
        check_version(request.version)?;
        let token: JoinToken = request.token.parse().map_err(|error: TokenFormatError| {
            Refusal::new(RefusalCode::UnknownToken, error.to_string())
        })?;
        let csr =
            ParsedCsr::from_pem(&request.csr).map_err(|refusal| refusal.with_token(&token.id()))?;
        let asked = request.valid_for.map(Duration::from_secs);
        if asked.is_some_and(|asked| asked < MIN_LIFETIME) {
            return Err(Refusal::new(
                RefusalCode::BadRequest,
                format!("valid_for must be at least {} s", MIN_LIFETIME.as_secs()),
            )
            .with_token(&token.id()));
        }
        let (node, certificate) = self.store.redeem(&token, now, source, |grant| {
            let granted = grant.valid_for.unwrap_or(self.lifetime);
            let lifetime = asked.map_or(granted, |asked| asked.min(granted));
            let validity = Validity::lasting(OffsetDateTime::from(now), lifetime);
            let pem = sign_request(&self.authority, grant, &csr, validity)?;
            let fingerprint = record(&pem, Issuance::Join, None, now, |record| {
                self.ledger.record(record, now)
            })?;
            Ok((grant.node.clone(), Signed { pem, fingerprint }))
        })?;
        Ok(self.granted(node, Some(token.id()), certificate))
    }

    /// Answers one renewal request body from a node that presented
    /// `client_chain` in the TLS handshake (its leaf verified against this
    /// CA by the handshake), at `source`.
    ///
    /// Refused: no certificate; a certificate the ledger does not know, or
    /// whose record names another node; one that `DIR/crl.pem` revokes; a
    /// CSR that asks for a name the certificate does not carry. The new
    /// certificate has the same node name and SANs, the CSR's key, and the
    /// old certificate's lifetime (at most the server's), from `now`.
    pub fn renew(
        &self,
        body: &[u8],
        client_chain: Option<&[CertificateDer<'static>]>,
        now: SystemTime,
    ) -> Result<Granted, Refusal> {
        let request: RenewRequest =
            decode_request(body, "a renewal request {\"version\":1,\"csr\":..}")?;
        check_version(request.version)?;
        let leaf = client_chain.and_then(<[_]>::first).ok_or_else(|| {
            Refusal::new(
                RefusalCode::CertificateRequired,
                "a renewal must present the node's current certificate",
            )
        })?;
        let current = CurrentCertificate::of(leaf)?;
        let csr = ParsedCsr::from_pem(&request.csr)?;
        // From the checks to the record, under the ledger's lock: a
        // `revoke --node` cannot fall between them.
        let ledger = self.ledger.locked().map_err(Refusal::server_error)?;
        let records = ledger.records().map_err(Refusal::server_error)?;
        let wanted = current.serial.to_string();
        let known = records.iter().find(|record| record.serial == wanted);
        match known {
            None => {
                return Err(Refusal::new(
                    RefusalCode::UnknownCertificate,
                    format!(
                        "certificate {} of node {} is not in this CA's ledger (it was issued \
                         before the ledger existed, or by another CA): get a new one with a \
                         join token or `meshtun pki issue`",
                        current.serial, current.grant.node
                    ),
                ))
            }
            Some(record) if record.node != current.grant.node.as_str() => {
                return Err(Refusal::new(
                    RefusalCode::UnknownCertificate,
                    format!(
                        "the ledger records certificate {} for node {}, not {}",
                        current.serial, record.node, current.grant.node
                    ),
                ))
            }
            Some(_) => {}
        }
        // A certificate renews once. Asking again soon after is a node
        // whose answer was lost; asking again later means two holders of
        // the same key, one of them a thief.
        if let Some(successor) = records
            .iter()
            .find(|record| record.replaces.as_deref() == Some(wanted.as_str()))
        {
            let since = unix_seconds_unsigned(now).saturating_sub(successor.issued_at);
            if since > RENEWED_RETRY_WINDOW.as_secs() {
                return Err(Refusal::new(
                    RefusalCode::AlreadyRenewed,
                    format!(
                        "certificate {} of node {} was renewed already (as {}, {} s ago): a \
                         certificate renews once, so this may be a copy of its key; revoke the \
                         node (`meshtun pki revoke --node {}`) if that node did not ask twice",
                        current.serial,
                        current.grant.node,
                        successor.serial,
                        since,
                        current.grant.node
                    ),
                ));
            }
        }
        let revocations = RevocationList::load(self.store.dir(), &self.authority)
            .map_err(Refusal::server_error)?;
        if revocations.is_some_and(|list| list.is_revoked(&current.serial)) {
            return Err(Refusal::new(
                RefusalCode::Revoked,
                format!(
                    "certificate {} of node {} is revoked; the node must join again",
                    current.serial, current.grant.node
                ),
            ));
        }
        let lifetime = current.lifetime.min(self.lifetime).max(MIN_LIFETIME);
        let validity = Validity::lasting(OffsetDateTime::from(now), lifetime);
        let pem = sign_request(&self.authority, &current.grant, &csr, validity)?;
        let fingerprint = record(
            &pem,
            Issuance::SelfRenew,
            Some(&current.serial),
            now,
            |record| ledger.record(record, now),
        )?;
        Ok(self.granted(current.grant.node, None, Signed { pem, fingerprint }))
    }

    fn granted(&self, node: NodeName, token_id: Option<String>, certificate: Signed) -> Granted {
        Granted {
            node,
            token_id,
            fingerprint: certificate.fingerprint,
            certificate_pem: certificate.pem,
            ca_pem: self.authority.cert_pem(),
        }
    }
}

/// A certificate signed, recorded and about to be sent.
struct Signed {
    pem: String,
    /// `sha256:<hex>` of its DER.
    fingerprint: String,
}

/// Records the certificate in `pem` in the ledger with `store` (which
/// takes the ledger's lock, or holds it already) before it is sent, and
/// returns its fingerprint.
fn record(
    pem: &str,
    how: Issuance,
    replaces: Option<&Serial>,
    now: SystemTime,
    store: impl FnOnce(IssuedRecord) -> Result<(), PkiError>,
) -> Result<String, Refusal> {
    first_certificate(pem, "issued certificate")
        .and_then(|der| {
            store(IssuedRecord::of_der(&der, how, replaces, now)?)?;
            Ok(fingerprint(&der))
        })
        .map_err(|error| {
            Refusal::server_error(format!(
                "the certificate was not sent: cannot record it in the ledger: {error}"
            ))
        })
}

/// A request body as JSON of type `T` (`what` describes it for the
/// refusal). serde's messages can quote the input, which may hold a
/// secret: only the position is reported.
fn decode_request<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|error| {
        Refusal::new(
            RefusalCode::BadRequest,
            format!(
                "not {what} ({:?} error at line {} column {})",
                error.classify(),
                error.line(),
                error.column()
            ),
        )
    })
}

/// Refuses a request of another protocol version than [`PROTOCOL_VERSION`].
fn check_version(version: u32) -> Result<(), Refusal> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Refusal::new(
        RefusalCode::BadRequest,
        format!(
            "protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}"
        ),
    ))
}

/// What a renewal takes from the certificate the node presented.
struct CurrentCertificate {
    serial: Serial,
    /// Its node name and SANs, which the new certificate carries again.
    grant: Grant,
    lifetime: Duration,
}

impl CurrentCertificate {
    fn of(leaf: &CertificateDer<'_>) -> Result<Self, Refusal> {
        let bad = |detail: String| {
            Refusal::new(
                RefusalCode::BadRequest,
                format!("the presented certificate {detail}"),
            )
        };
        let parsed = meshtun_pki::parse_certificate(leaf, "presented certificate")
            .map_err(|error| bad(error.to_string()))?;
        let node = meshtun_pki::identity_of_parsed(&parsed)
            .map_err(|detail| bad(format!("has no node identity: {detail}")))?;
        let serial = Serial::of_parsed(&parsed, "presented certificate")
            .map_err(|error| bad(error.to_string()))?;
        let mut ips = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(extension)) = parsed.subject_alternative_name() {
            for name in &extension.value.general_names {
                match name {
                    GeneralName::IPAddress(bytes) => ips.extend(meshtun_pki::ip_from(bytes)),
                    GeneralName::DNSName(name) if *name != node.as_str() => {
                        dns.push((*name).to_owned());
                    }
                    _ => {}
                }
            }
        }
        let validity = parsed.validity();
        let time = |at| system_time(at).unwrap_or(UNIX_EPOCH);
        Ok(Self {
            serial,
            lifetime: Validity::lifetime_of(time(validity.not_before), time(validity.not_after)),
            grant: Grant {
                node,
                ips,
                dns,
                valid_for: None,
            },
        })
    }
}

/// A name a CSR asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RequestedName {
    CommonName(String),
    Dns(String),
    Ip(IpAddr),
    Uri(String),
    /// Any other SAN type (email, directory name, ...), described.
    Other(String),
}

impl fmt::Display for RequestedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CommonName(name) => write!(f, "CN={name}"),
            Self::Dns(name) => write!(f, "DNS:{name}"),
            Self::Ip(ip) => write!(f, "IP:{ip}"),
            Self::Uri(uri) => write!(f, "URI:{uri}"),
            Self::Other(other) => f.write_str(other),
        }
    }
}

/// A CSR whose self-signature verified, with its key and requested names.
#[derive(Debug)]
pub(crate) struct ParsedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
    names: Vec<RequestedName>,
}

impl ParsedCsr {
    fn from_pem(pem: &str) -> Result<Self, Refusal> {
        let bad = |detail: &str| Refusal::new(RefusalCode::BadRequest, format!("the CSR {detail}"));
        let der = {
            use rustls_pki_types::pem::PemObject;
            CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| bad("is not a PEM block \"BEGIN CERTIFICATE REQUEST\""))?
        };
        // rcgen checks the self-signature and refuses extensions it does not know.
        CertificateSigningRequestParams::from_der(&der)
            .map_err(|error| bad(&format!("is not acceptable: {error}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(&der)
            .map_err(|_| bad("is not a valid PKCS#10 request"))?;
        if !rest.is_empty() {
            return Err(bad("has stray bytes after it"));
        }
        let info = &csr.certification_request_info;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
            .map_err(|error| bad(&format!("holds an unusable public key: {error}")))?;
        if public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad(
                "must hold an ECDSA P-256 public key (as `meshtun join` makes)",
            ));
        }
        let mut names = Vec::new();
        for cn in info.subject.iter_common_name() {
            let cn = cn
                .as_str()
                .map_err(|_| bad("has a common name that is not text"))?;
            names.push(RequestedName::CommonName(cn.to_owned()));
        }
        for extension in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = extension {
                for name in &san.general_names {
                    names.push(match name {
                        GeneralName::DNSName(dns) => RequestedName::Dns((*dns).to_owned()),
                        GeneralName::URI(uri) => RequestedName::Uri((*uri).to_owned()),
                        GeneralName::IPAddress(bytes) => meshtun_pki::ip_from(bytes).map_or_else(
                            || RequestedName::Other(meshtun_pki::describe_name(name)),
                            RequestedName::Ip,
                        ),
                        other => RequestedName::Other(meshtun_pki::describe_name(other)),
                    });
                }
            }
        }
        Ok(Self { public_key, names })
    }
}

/// Checks that `csr` asks for nothing the grant does not allow, then signs
/// its key for exactly the grant's names.
fn sign_request(
    authority: &Authority,
    grant: &Grant,
    csr: &ParsedCsr,
    validity: Validity,
) -> Result<String, Refusal> {
    let refused: Vec<String> = csr
        .names
        .iter()
        .filter(|name| !grant.allows(authority.cluster(), name))
        .map(ToString::to_string)
        .collect();
    if !refused.is_empty() {
        return Err(Refusal::new(
            RefusalCode::WrongName,
            format!(
                "the token is for node {}, but the request asks for {}",
                grant.node,
                refused.join(", ")
            ),
        ));
    }
    authority
        .issue_for_public_key(
            &grant.node,
            &grant.ips,
            &grant.dns,
            validity,
            &csr.public_key,
        )
        .map_err(Refusal::server_error)
}

impl Grant {
    /// Every name a certificate for this grant carries, as a CSR might ask
    /// for them: the node's SPIFFE URI, DNS names and IP addresses.
    fn allows(&self, cluster: &str, name: &RequestedName) -> bool {
        match name {
            RequestedName::CommonName(cn) => cn == self.node.as_str(),
            RequestedName::Dns(dns) => {
                dns == self.node.as_str() || self.dns.iter().any(|granted| granted == dns)
            }
            RequestedName::Ip(ip) => self.ips.contains(ip),
            RequestedName::Uri(uri) => *uri == node_uri(cluster, &self.node),
            RequestedName::Other(_) => false,
        }
    }
}

impl From<&Result<Granted, Refusal>> for EnrollResponse {
    fn from(result: &Result<Granted, Refusal>) -> Self {
        match result {
            Ok(granted) => Self::Issued {
                certificate: granted.certificate_pem.clone(),
                ca: granted.ca_pem.clone(),
            },
            Err(refusal) => Self::Refused {
                error: refusal.code.as_str().to_owned(),
                message: refusal.message.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{body, ca_dir, grant, joined, node, renewal_body, DAY, HOUR};
    use crate::{CaFingerprint, EnrollError, Enrolled, JoinKey};
    use meshtun_pki::{identity_of, NodeCredentials, TrustBundle};
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    /// CSR parameters asking for `dns` names, with no subject (rcgen's
    /// default subject is a CN of its own).
    fn asking_for(dns: &[&str]) -> CertificateParams {
        let mut params = CertificateParams::new(
            dns.iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
    }
    fn csr_for(params: CertificateParams) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }
    fn sans_of(pem: &str) -> Vec<String> {
        let der = first_certificate(pem, "test").unwrap();
        let parsed = meshtun_pki::parse_certificate(&der, "test").unwrap();
        parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(meshtun_pki::describe_name)
            .collect()
    }
    #[test]
    fn a_csr_is_signed_for_exactly_the_grant() {
        let authority = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let grant = grant("node-x");
        // A CSR naming nothing, one naming the node, one asking for a subset.
        let mut subset = asking_for(&["node-x.cluster.example"]);
        subset
            .subject_alt_names
            .push(SanType::IpAddress("198.18.0.5".parse().unwrap()));
        subset.subject_alt_names.push(SanType::URI(
            "spiffe://prod/node/node-x".try_into().unwrap(),
        ));
        for params in [asking_for(&[]), asking_for(&["node-x"]), subset] {
            let (key, csr) = csr_for(params);
            let csr = ParsedCsr::from_pem(&csr).unwrap();
            let pem = sign_request(&authority, &grant, &csr, Validity::days_from_now(7)).unwrap();
            let credentials = NodeCredentials::from_pem(&pem, &key.serialize_pem()).unwrap();
            assert_eq!(credentials.identity().as_str(), "node-x");
            assert_eq!(
                sans_of(&pem),
                [
                    "URI:spiffe://prod/node/node-x",
                    "DNS:node-x",
                    "DNS:node-x.cluster.example",
                    "IP:198.18.0.5"
                ]
            );
            let trust = TrustBundle::from_pem(&authority.cert_pem()).unwrap();
            trust.verify_node(&credentials, SystemTime::now()).unwrap();
        }
    }
    #[test]
    fn a_csr_asking_for_more_than_the_grant_is_wrong_name() {
        let authority = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let grant = grant("node-x");
        let mut common_name = asking_for(&[]);
        common_name
            .distinguished_name
            .push(DnType::CommonName, "node-y");
        let mut other_cluster = asking_for(&[]);
        other_cluster.subject_alt_names.push(SanType::URI(
            "spiffe://other/node/node-x".try_into().unwrap(),
        ));
        let mut extra_ip = asking_for(&["node-x"]);
        extra_ip
            .subject_alt_names
            .push(SanType::IpAddress("198.18.0.6".parse().unwrap()));
        let cases = [
            (asking_for(&["node-y"]), "DNS:node-y"),
            (common_name, "CN=node-y"),
            (other_cluster, "URI:spiffe://other/node/node-x"),
            (extra_ip, "IP:198.18.0.6"),
        ];
        for (params, named) in cases {
            let (_key, csr) = csr_for(params);
            let csr = ParsedCsr::from_pem(&csr).unwrap();
            let refusal =
                sign_request(&authority, &grant, &csr, Validity::days_from_now(7)).unwrap_err();
            assert_eq!(refusal.code, RefusalCode::WrongName, "{named}");
            assert!(refusal.message.contains(named), "{refusal}");
            assert!(refusal.message.contains("node-x"), "{refusal}");
        }
    }
    #[test]
    fn bad_csrs_are_bad_requests() {
        let (_key, good) = csr_for(CertificateParams::new(vec!["node-x".to_owned()]).unwrap());
        // Change one base64 digit of the last line, inside the signature:
        // the self-signature fails.
        let tampered = {
            let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
            let last = lines.len() - 2;
            let first = lines[last].remove(0);
            lines[last].insert(0, if first == 'A' { 'B' } else { 'A' });
            lines.join("\n")
        };
        let p384 = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
            CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        };
        for csr in [
            String::new(),
            "not pem".to_owned(),
            good.replace("REQUEST", "ZZZ"),
            tampered,
            p384,
        ] {
            let refusal = ParsedCsr::from_pem(&csr).unwrap_err();
            assert_eq!(refusal.code, RefusalCode::BadRequest, "{csr}: {refusal}");
        }
        // A P-256 key is recognised as such.
        assert!(ParsedCsr::from_pem(&good).is_ok());
    }
    #[test]
    fn the_enroller_answers_each_case_with_its_code() {
        let (_dir, authority, store) = ca_dir("enroller");
        let ca_pem = authority.cert_pem();
        let now = SystemTime::now();
        let token = store.create(&grant("node-x"), HOUR, now).unwrap().token;
        let enroller = Enroller::new(authority, store.clone(), 30 * DAY);
        let key = JoinKey::generate(&node("node-x")).unwrap();
        let code = |result: Result<Granted, Refusal>| result.unwrap_err().code;

        let wrong = JoinKey::generate(&node("node-y")).unwrap();
        assert_eq!(
            code(enroller.handle(&body(&token.reveal(), wrong.csr_pem()), "a", now)),
            RefusalCode::WrongName
        );
        assert_eq!(
            code(enroller.handle(b"garbage", "a", now)),
            RefusalCode::BadRequest
        );
        let secret_in_wrong_place = format!(
            "{{\"version\":\"{}\",\"token\":1,\"csr\":\"\"}}",
            token.reveal()
        );
        let refusal = enroller
            .handle(secret_in_wrong_place.as_bytes(), "a", now)
            .unwrap_err();
        assert_eq!(refusal.code, RefusalCode::BadRequest);
        assert!(!refusal.message.contains(&token.reveal()), "{refusal}");
        let mut newer: serde_json::Value =
            serde_json::from_slice(&body(&token.reveal(), key.csr_pem())).unwrap();
        newer["version"] = 2.into();
        assert_eq!(
            code(enroller.handle(newer.to_string().as_bytes(), "a", now)),
            RefusalCode::BadRequest
        );
        assert_eq!(
            code(enroller.handle(&body("mtjoin1.x.y", key.csr_pem()), "a", now)),
            RefusalCode::UnknownToken
        );
        assert_eq!(
            code(enroller.handle(&body(&token.reveal(), "junk"), "a", now)),
            RefusalCode::BadRequest
        );

        // After all that the token is still good, once.
        let granted = enroller
            .handle(&body(&token.reveal(), key.csr_pem()), "198.18.0.9:1", now)
            .unwrap();
        assert_eq!(granted.node.as_str(), "node-x");
        assert_eq!(granted.token_id, Some(token.id()));
        assert_eq!(granted.ca_pem, ca_pem);
        assert!(granted.fingerprint.starts_with("sha256:"));
        assert_eq!(
            code(enroller.handle(&body(&token.reveal(), key.csr_pem()), "a", now)),
            RefusalCode::TokenUsed
        );

        // The client side accepts that answer for its key.
        let pinned: CaFingerprint = CaFingerprint::of(enroller.authority().cert_der());
        let response = EnrollResponse::from(&Ok(granted.clone()));
        let enrolled = key.accept(response.clone(), &pinned, now).unwrap();
        assert_eq!(enrolled.node().as_str(), "node-x");
        assert_eq!(
            identity_of(&enrolled.credentials().chain()[0])
                .unwrap()
                .as_str(),
            "node-x"
        );
        // ... but not for another key, another node or another CA.
        let other_key = JoinKey::generate(&node("node-x")).unwrap();
        assert!(matches!(
            other_key.accept(response.clone(), &pinned, now),
            Err(EnrollError::Certificate(_))
        ));
        let other_node = JoinKey::generate(&node("node-z")).unwrap();
        assert!(matches!(
            other_node.accept(response.clone(), &pinned, now),
            Err(EnrollError::Certificate(_))
        ));
        let elsewhere = CaFingerprint([9; 32]);
        let key = JoinKey::generate(&node("node-x")).unwrap();
        assert!(matches!(
            key.accept(response, &elsewhere, now),
            Err(EnrollError::CaMismatch { .. })
        ));
        let refused = EnrollResponse::Refused {
            error: "token_used".to_owned(),
            message: "m".to_owned(),
        };
        let error = JoinKey::generate(&node("node-x"))
            .unwrap()
            .accept(refused, &pinned, now)
            .unwrap_err();
        assert_eq!(error.refusal(), Some(RefusalCode::TokenUsed));
    }
    #[test]
    fn a_join_may_ask_for_a_shorter_lifetime_than_the_token_grants_not_a_longer_one() {
        let (_dir, authority, store) = ca_dir("join-valid-for");
        let pinned = CaFingerprint::of_authority(&authority);
        let now = SystemTime::now();
        let mut granted = grant("node-x");
        granted.valid_for = Some(2 * HOUR);
        let enroller = Enroller::new(authority, store.clone(), 30 * DAY);
        for (asked, expected) in [
            (Some(HOUR), HOUR),
            (Some(5 * HOUR), 2 * HOUR),
            (None, 2 * HOUR),
        ] {
            let token = store.create(&granted, HOUR, now).unwrap().token;
            let key = JoinKey::generate(&node("node-x")).unwrap();
            let frame = key.request_for(&token, asked).unwrap();
            let answer = enroller
                .handle(&frame[meshtun_proto::FRAME_PREFIX_LEN..], "a", now)
                .unwrap();
            let enrolled = key
                .accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
                .unwrap();
            let left = enrolled
                .credentials()
                .not_after()
                .duration_since(now)
                .unwrap();
            assert!(
                left <= expected && left > expected - Duration::from_secs(60),
                "asked {asked:?}: {left:?}"
            );
        }
        let token = store.create(&granted, HOUR, now).unwrap().token;
        let key = JoinKey::generate(&node("node-x")).unwrap();
        let frame = key
            .request_for(&token, Some(Duration::from_secs(5)))
            .unwrap();
        let refusal = enroller
            .handle(&frame[meshtun_proto::FRAME_PREFIX_LEN..], "a", now)
            .unwrap_err();
        assert_eq!(refusal.code, RefusalCode::BadRequest);
    }
    #[test]
    fn a_renewal_keeps_the_names_and_lifetime_takes_the_new_key_and_is_recorded() {
        let (dir, enroller, joined, pinned) = joined("renew", Some(2 * HOUR));
        let current = joined.credentials();
        let now = SystemTime::now();
        let lifetime = current.not_after().duration_since(now).unwrap();
        assert!(lifetime <= 2 * HOUR && lifetime > 2 * HOUR - 60 * Duration::from_secs(1));

        let key = JoinKey::generate(&node("node-x")).unwrap();
        let answer = enroller
            .renew(&renewal_body(&key), Some(current.chain()), now)
            .unwrap();
        assert_eq!(answer.token_id, None);
        let renewed = key
            .accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
            .unwrap();
        let new = renewed.credentials();
        assert_eq!(new.identity().as_str(), "node-x");
        let left = new.not_after().duration_since(now).unwrap();
        assert!(
            left > 2 * HOUR - Duration::from_secs(60) && left <= 2 * HOUR,
            "{left:?}"
        );
        let describe = |enrolled: &Enrolled| {
            meshtun_pki::inspect_pem(&enrolled.cert_pem)
                .unwrap()
                .remove(0)
                .sans
        };
        assert_eq!(describe(&renewed), describe(&joined));

        let ledger = Ledger::new(dir.path()).records().unwrap();
        assert_eq!(ledger.len(), 2, "the join and the renewal are recorded");
        assert_eq!(ledger[0].how, Issuance::Join);
        assert_eq!(ledger[1].how, Issuance::SelfRenew);
        let old_serial = Serial::of_certificate(&current.chain()[0]).unwrap();
        assert_eq!(ledger[1].replaces, Some(old_serial.to_string()));
        assert_eq!(
            ledger[1].serial,
            Serial::of_certificate(&new.chain()[0]).unwrap().to_string()
        );
    }
    #[test]
    fn a_renewal_is_refused_without_a_known_unrevoked_certificate_or_for_another_name() {
        let (dir, enroller, joined, _) = joined("renew-refused", None);
        let current = joined.credentials();
        let now = SystemTime::now();
        let code = |result: Result<Granted, Refusal>| result.unwrap_err().code;
        let key = JoinKey::generate(&node("node-x")).unwrap();

        assert_eq!(
            code(enroller.renew(&renewal_body(&key), None, now)),
            RefusalCode::CertificateRequired
        );
        let other = JoinKey::generate(&node("node-y")).unwrap();
        assert_eq!(
            code(enroller.renew(&renewal_body(&other), Some(current.chain()), now)),
            RefusalCode::WrongName
        );
        assert_eq!(
            code(enroller.renew(b"{\"version\":1}", Some(current.chain()), now)),
            RefusalCode::BadRequest
        );
        // Issued by this CA, but outside the ledger (as before it existed).
        let unrecorded = enroller
            .authority()
            .issue(&node("node-x"), &[], &[], Validity::days_from_now(1))
            .unwrap();
        let unrecorded =
            NodeCredentials::from_pem(&unrecorded.cert_pem, &unrecorded.key_pem).unwrap();
        assert_eq!(
            code(enroller.renew(&renewal_body(&key), Some(unrecorded.chain()), now)),
            RefusalCode::UnknownCertificate
        );
        // Revoked.
        let mut list = RevocationList::new();
        list.revoke(
            Serial::of_certificate(&current.chain()[0]).unwrap(),
            None,
            now,
        );
        list.write(enroller.authority(), dir.path(), now, 30)
            .unwrap();
        assert_eq!(
            code(enroller.renew(&renewal_body(&key), Some(current.chain()), now)),
            RefusalCode::Revoked
        );
        assert_eq!(
            Ledger::new(dir.path()).records().unwrap().len(),
            1,
            "nothing issued"
        );
    }
    #[test]
    fn a_certificate_renews_once_and_again_only_within_the_retry_window() {
        let (_dir, enroller, joined, _) = joined("renew-twice", None);
        let current = joined.credentials();
        let now = SystemTime::now();
        let renew = |at: SystemTime| {
            let key = JoinKey::generate(&node("node-x")).unwrap();
            enroller.renew(&renewal_body(&key), Some(current.chain()), at)
        };
        renew(now).unwrap();
        // The answer was lost: the node asks again with the same certificate.
        renew(now + Duration::from_secs(60)).unwrap();
        // Much later the same certificate asks again: someone else holds it.
        let refusal = renew(now + RENEWED_RETRY_WINDOW + Duration::from_secs(120)).unwrap_err();
        assert_eq!(refusal.code, RefusalCode::AlreadyRenewed, "{refusal}");
        assert!(
            refusal.message.contains("revoke --node node-x"),
            "{refusal}"
        );
    }
}
