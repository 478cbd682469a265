//! The TLS of enrollment: the server proves it holds the CA with a
//! certificate it signs for itself at start
//! ([`enrollment_server_config`]); the client pins the CA by the SHA-256
//! fingerprint of its certificate ([`CaFingerprint`],
//! [`PinnedCaVerifier`]), so a node needs nothing but the token and the
//! fingerprint to join.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use meshtun_pki::{
    crypto_provider, hex, unhex, Authority, NodeCredentials, PkiError, Validity, TLS13_ONLY,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// ALPN of the enrollment protocol (TLS 1.3 over TCP). Distinct from the
/// QUIC ALPN, so neither endpoint can be mistaken for the other.
pub const ENROLL_ALPN: &[u8] = b"meshtun-enroll/1";

/// The ALPN protocol of a node's renewal (mTLS with its current certificate).
pub const RENEW_ALPN: &[u8] = b"meshtun-renew/1";

/// How long the enrollment server's own certificate is valid (it is made
/// again well before, see [`SERVER_CERT_REFRESH`](crate::server::SERVER_CERT_REFRESH)),
/// and how far its start is set back
/// for clock skew.
const SERVER_CERT_LIFETIME: time::Duration = time::Duration::days(1);
const SERVER_CERT_SKEW: time::Duration = time::Duration::hours(1);

/// The SHA-256 fingerprint of a CA certificate's DER, which a joining node
/// pins: written `sha256:<64 hex digits>` (as `meshtun pki inspect` and
/// `meshtun pki token` print it; upper case and `:` between bytes, as
/// `openssl x509 -fingerprint -sha256` prints it, are accepted too).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint(pub(crate) [u8; 32]);

impl CaFingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The fingerprint of a CA's certificate.
    pub fn of_authority(authority: &Authority) -> Self {
        Self::of(authority.cert_der())
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a CA fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a CA fingerprint: expected sha256:<64 hex digits>, as `meshtun pki token` prints it")]
pub struct FingerprintFormatError;

impl FromStr for CaFingerprint {
    type Err = FingerprintFormatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let digits = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("SHA256:"))
            .ok_or(FingerprintFormatError)?;
        let digits: String = digits.chars().filter(|c| *c != ':').collect();
        unhex(&digits).map(Self).ok_or(FingerprintFormatError)
    }
}

/// The server presented a CA other than the pinned one. Carried inside
/// `rustls::Error::InvalidCertificate(Other(..))`, so callers can downcast it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFingerprintMismatch {
    /// The pinned fingerprint.
    pub expected: CaFingerprint,
    /// The fingerprint of the CA certificate the server sent, if it sent one.
    pub presented: Option<CaFingerprint>,
}

impl fmt::Display for CaFingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.presented {
            Some(presented) => write!(
                f,
                "the server's CA has fingerprint {presented}, expected {}: wrong \
                 --ca-fingerprint or a server that is not your CA",
                self.expected
            ),
            None => write!(
                f,
                "the server sent no CA certificate, expected one with fingerprint {}: \
                 not a meshtun enrollment server",
                self.expected
            ),
        }
    }
}

impl std::error::Error for CaFingerprintMismatch {}

/// The enrollment server's TLS configuration: TLS 1.3 only, ALPN
/// [`ENROLL_ALPN`] or [`RENEW_ALPN`], a client certificate optional (a
/// joining node has none, its token authenticates it; a renewing node
/// presents its current one, which must verify against the CA), no session
/// resumption, and a certificate chain [own certificate, CA certificate]
/// made here, in memory, with a fresh key.
///
/// The server certificate is valid for a day from `now` (set back an hour
/// for clock skew), has key usage serverAuth only and no subjectAltName: it
/// carries no node identity, so it can never stand for a node, and without
/// clientAuth no meshtun server would take it from a client either.
pub fn enrollment_server_config(
    authority: &Authority,
    now: SystemTime,
) -> Result<ServerConfig, PkiError> {
    let now = OffsetDateTime::from(now);
    let (chain, key) = authority.issue_server_certificate(
        format!("meshtun enrollment server {}", authority.cluster()),
        Validity {
            not_before: now - SERVER_CERT_SKEW,
            not_after: now + SERVER_CERT_LIFETIME,
        },
    )?;

    // A joining node has no certificate yet (its token authenticates it); a
    // renewing node presents its current one, verified here against the CA.
    let provider = Arc::new(crypto_provider());
    let mut roots = RootCertStore::empty();
    roots.add(authority.cert_der().clone())?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec(), RENEW_ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The joining node's TLS configuration: TLS 1.3 only, ALPN
/// [`ENROLL_ALPN`], no client certificate, no resumption, no SNI, and the
/// server accepted only as [`PinnedCaVerifier`] decides.
pub fn enrollment_client_config(pinned: &CaFingerprint) -> Result<ClientConfig, PkiError> {
    pinned_client_config(pinned, ENROLL_ALPN, None)
}

/// A renewing node's TLS configuration: as [`enrollment_client_config`],
/// with ALPN [`RENEW_ALPN`] and `current` (the node's certificate and key
/// in force) as the client certificate.
pub(crate) fn renewal_client_config(
    pinned: &CaFingerprint,
    current: &NodeCredentials,
) -> Result<ClientConfig, PkiError> {
    pinned_client_config(pinned, RENEW_ALPN, Some(current))
}

/// A client of `pki serve`: the server accepted only as
/// [`PinnedCaVerifier`] decides, ALPN `alpn`, `client` as the client
/// certificate if given, no resumption, no SNI.
fn pinned_client_config(
    pinned: &CaFingerprint,
    alpn: &[u8],
    client: Option<&NodeCredentials>,
) -> Result<ClientConfig, PkiError> {
    let provider = Arc::new(crypto_provider());
    let verifier = Arc::new(PinnedCaVerifier {
        pinned: *pinned,
        provider: Arc::clone(&provider),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some(current) => {
            builder.with_client_auth_cert(current.chain().to_vec(), current.key().clone_key())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

/// Accepts an enrollment server only if it holds the pinned CA.
///
/// Why a custom verifier: the joining node has no trust store yet (getting
/// one is the point of joining) and no name to check (the server is reached
/// by whatever address the operator typed, and its certificate is made on
/// the fly). What it has is the CA's fingerprint, from the operator. So:
/// 1. among the certificates the server sent after its own, find the one
///    whose SHA-256 equals the pinned fingerprint, else fail with
///    [`CaFingerprintMismatch`] (the handshake stops; nothing of the
///    request, the token least of all, has been sent);
/// 2. verify the server's certificate with webpki against that CA as the
///    only root (signature, validity, key usage serverAuth);
/// 3. the server certificate has no name by design, so webpki's last check,
///    the name, fails with "not valid for name" after everything else passed
///    (as in meshtun-pki's `tls.rs`): that error alone is set aside.
///
/// The handshake signature is then checked by rustls with the verified key,
/// so the server proves it holds the key of a certificate the pinned CA
/// signed, and only the CA key's holder can make one.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pinned: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|cert| CaFingerprint::of(cert) == self.pinned)
        else {
            let mismatch = CaFingerprintMismatch {
                expected: self.pinned,
                presented: intermediates.last().map(|cert| CaFingerprint::of(cert)),
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|error| rustls::Error::General(error.to_string()))?;
        match inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(other) => Err(other),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_pki::identity_of;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
    use rustls::{ClientConnection, ServerConnection};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let authority = Authority::generate("prod", Validity::days_from_now(1)).unwrap();
        let fingerprint = CaFingerprint::of_authority(&authority);
        let text = fingerprint.to_string();
        assert_eq!(text, meshtun_pki::fingerprint(authority.cert_der()));
        assert_eq!(text.parse::<CaFingerprint>().unwrap(), fingerprint);
        let openssl: String = text["sha256:".len()..]
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            format!("SHA256:{openssl}")
                .parse::<CaFingerprint>()
                .unwrap(),
            fingerprint
        );
        for bad in [
            "",
            "sha256:",
            &text[..text.len() - 2],
            &text.replace("sha256", "sha1"),
        ] {
            assert!(bad.parse::<CaFingerprint>().is_err(), "{bad}");
        }
    }
    /// Runs a handshake between in-memory connections; the error is the
    /// client's or the server's, whichever failed.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        meshtun_test_support::tls::handshake(client, server, "127.0.0.1")
            .map_err(|failure| failure.error())
    }
    #[test]
    fn the_client_accepts_only_a_server_of_the_pinned_ca() {
        let ours = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let theirs = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        let pinned = CaFingerprint::of_authority(&ours);
        let server = enrollment_server_config(&ours, SystemTime::now()).unwrap();
        let (client, _) =
            handshake(enrollment_client_config(&pinned).unwrap(), server.clone()).unwrap();
        assert_eq!(client.alpn_protocol(), Some(ENROLL_ALPN));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );

        // The server certificate is no node: no identity, no clientAuth.
        let chain = client.peer_certificates().unwrap();
        assert_eq!(chain.len(), 2);
        assert!(identity_of(&chain[0]).is_err());
        let parsed = meshtun_pki::parse_certificate(&chain[0], "server").unwrap();
        let usage = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.server_auth && !usage.client_auth);

        // Another CA: refused with both fingerprints.
        let other = enrollment_server_config(&theirs, SystemTime::now()).unwrap();
        let error = handshake(enrollment_client_config(&pinned).unwrap(), other).unwrap_err();
        let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = &error else {
            panic!("expected a fingerprint mismatch, got {error:?}");
        };
        let mismatch = other.0.downcast_ref::<CaFingerprintMismatch>().unwrap();
        assert_eq!(mismatch.expected, pinned);
        assert_eq!(
            mismatch.presented,
            Some(CaFingerprint::of_authority(&theirs))
        );
        let text = mismatch.to_string();
        assert!(text.contains(&pinned.to_string()) && text.contains("wrong --ca-fingerprint"));

        // A server that sends our CA certificate but signed its own with
        // another key: the chain check fails.
        let forged_issuer =
            rcgen::Issuer::from_ca_cert_der(ours.cert_der(), KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let forged = params.signed_by(&key, &forged_issuer).unwrap();
        let forged_server = ServerConfig::builder_with_provider(Arc::new(crypto_provider()))
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![forged.der().clone(), ours.cert_der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let mut forged_server = forged_server;
        forged_server.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
        let error =
            handshake(enrollment_client_config(&pinned).unwrap(), forged_server).unwrap_err();
        assert!(
            matches!(
                error,
                rustls::Error::InvalidCertificate(CertificateError::BadSignature)
            ),
            "{error:?}"
        );
    }
}
