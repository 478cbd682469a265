//! rustls configurations for both ends of a meshtun QUIC connection, and the
//! verifier that pins the server to the node the client meant to dial.
//!
//! Both ends use the aws-lc-rs provider explicitly (never a process-wide
//! default), TLS 1.3 only, ALPN `meshtun/1`, X25519MLKEM768 first. Session
//! resumption is off on both sides: every connection is a full handshake, so
//! every connection re-checks the chain, validity, CRLs and the peer identity
//! (a peer connection is long-lived, so the saved round trip is worth nothing).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshtun_proto::{NodeName, ALPN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::identity_of;
use crate::load::{NodeCredentials, TrustBundle};
use crate::x509::{crypto_provider, TLS13_ONLY};
use crate::PkiError;

/// The server side: presents `node`'s certificate and requires a client
/// certificate that chains to `trust` (and passes its CRLs).
///
/// The client's identity is then `identity_of(&peer_certificates()[0])`;
/// authorization (which identity may reach which service) is the caller's.
pub fn server_config(
    trust: &TrustBundle,
    node: &NodeCredentials,
) -> Result<ServerConfig, PkiError> {
    let provider = Arc::new(crypto_provider());
    let verifier = client_verifier(trust, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(node.chain.clone(), node.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ignore_client_order = true;
    Ok(config)
}

/// The client side: presents `node`'s certificate, and accepts the server
/// only if its chain verifies against `trust` (with its CRLs) and its
/// identity is exactly `expected_peer`. The TLS server name plays no part
/// in that decision, and no SNI is sent (it would name the peer in clear).
pub fn client_config(
    trust: &TrustBundle,
    node: &NodeCredentials,
    expected_peer: &NodeName,
) -> Result<ClientConfig, PkiError> {
    let provider = Arc::new(crypto_provider());
    let verifier = Arc::new(PeerVerifier::new(trust, &provider, expected_peer.clone())?);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(node.chain.clone(), node.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

impl TrustBundle {
    /// Checks that `node`'s own certificate verifies against this bundle at
    /// `now`, as a client and as a server would see it: chain, validity,
    /// extended key usage and CRLs. For `meshtun check` and start-up, so a
    /// node with a certificate its peers will refuse says so at once.
    pub fn verify_node(&self, node: &NodeCredentials, now: SystemTime) -> Result<(), PkiError> {
        let untrusted = |reason: rustls::Error| PkiError::Untrusted {
            identity: node.identity().to_string(),
            reason,
        };
        let (leaf, intermediates) = node
            .chain
            .split_first()
            .ok_or_else(|| untrusted(rustls::Error::NoCertificatesPresented))?;
        let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let provider = Arc::new(crypto_provider());

        client_verifier(self, &provider)?
            .verify_client_cert(leaf, intermediates, now)
            .map_err(untrusted)?;
        let any_name = ServerName::from(IpAddr::from(Ipv4Addr::UNSPECIFIED));
        PeerVerifier::new(self, &provider, node.identity().clone())?
            .verify_server_cert(leaf, intermediates, &any_name, &[], now)
            .map_err(untrusted)?;
        Ok(())
    }
}

/// Which role a peer's certificate played in the handshake, so it is
/// re-checked the way it was first checked.
#[derive(Debug, Clone, Copy)]
pub enum PeerRole<'a> {
    /// The peer dialled this node: its certificate was a client certificate.
    Dialer,
    /// This node dialled the peer, expecting this identity: its certificate
    /// was a server certificate.
    Acceptor(&'a NodeName),
}

impl TrustBundle {
    /// Checks a peer's certificate chain (as a live connection presented it)
    /// against this bundle at `now`: chain, validity, extended key usage and
    /// CRLs, as the handshake in `role` did. A node uses it after loading a
    /// new CRL or CA bundle, to close connections of peers it would no
    /// longer accept, and on connections whose handshake raced that reload.
    pub fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: PeerRole<'_>,
        now: SystemTime,
    ) -> Result<NodeName, PkiError> {
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| PkiError::Untrusted {
            identity: "(none)".to_string(),
            reason: rustls::Error::NoCertificatesPresented,
        })?;
        let identity = identity_of(leaf)?;
        let untrusted = |reason: rustls::Error| PkiError::Untrusted {
            identity: identity.to_string(),
            reason,
        };
        let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let provider = Arc::new(crypto_provider());
        match role {
            PeerRole::Dialer => {
                client_verifier(self, &provider)?
                    .verify_client_cert(leaf, intermediates, now)
                    .map_err(untrusted)?;
            }
            PeerRole::Acceptor(expected) => {
                let any_name = ServerName::from(IpAddr::from(Ipv4Addr::UNSPECIFIED));
                PeerVerifier::new(self, &provider, expected.clone())?
                    .verify_server_cert(leaf, intermediates, &any_name, &[], now)
                    .map_err(untrusted)?;
            }
        }
        Ok(identity)
    }
}

fn client_verifier(
    trust: &TrustBundle,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&trust.roots), Arc::clone(provider))
            .with_crls(trust.crls.iter().cloned())
            .build()?,
    )
}

/// The server presented a trusted certificate of another node than the one
/// dialled. Carried inside `rustls::Error::InvalidCertificate(Other(..))`, so
/// callers can downcast it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMismatch {
    /// The node the client dialled.
    pub expected: NodeName,
    /// The node the server's certificate names.
    pub presented: NodeName,
}

impl fmt::Display for PeerMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server is {} (by its certificate), not the expected peer {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for PeerMismatch {}

/// Verifies a server's certificate chain with webpki, then pins its identity.
///
/// webpki would also match the certificate against the TLS server name; that
/// check is replaced by the identity check. `WebPkiServerVerifier` (rustls
/// 0.23, `src/webpki/server_verifier.rs`) checks the name last, only after
/// the chain, validity, key usage and revocation checks have passed, so its
/// "not valid for name" error means "trusted, but another name": only that
/// error is set aside, every other one rejects the certificate.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: NodeName,
}

impl PeerVerifier {
    fn new(
        trust: &TrustBundle,
        provider: &Arc<CryptoProvider>,
        expected: NodeName,
    ) -> Result<Self, PkiError> {
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&trust.roots),
            Arc::clone(provider),
        )
        .with_crls(trust.crls.iter().cloned())
        .build()?;
        Ok(Self { inner, expected })
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            // Only "trusted, but not valid for this name" (see the type doc): both variants.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(other) => return Err(other),
        }
        let presented = identity_of(end_entity).map_err(|error| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
        })?;
        if presented != self.expected {
            let mismatch = PeerMismatch {
                expected: self.expected.clone(),
                presented,
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, Validity};
    use meshtun_test_support::tls::{handshake, Failure};
    use rustls::{NamedGroup, ProtocolVersion};
    use time::{Duration, OffsetDateTime};

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn ca(cluster: &str) -> Authority {
        Authority::generate(cluster, Validity::days_from_now(30)).unwrap()
    }

    fn credentials(ca: &Authority, name: &str, validity: Validity) -> NodeCredentials {
        let issued = ca.issue(&node(name), &[], &[], validity).unwrap();
        NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn bundle(ca: &Authority) -> TrustBundle {
        TrustBundle::from_pem(&ca.cert_pem()).unwrap()
    }

    fn peer_mismatch(error: &rustls::Error) -> Option<&PeerMismatch> {
        match error {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<PeerMismatch>()
            }
            _ => None,
        }
    }

    #[test]
    fn same_ca_nodes_connect_with_meshtun_parameters() {
        let ca = ca("prod");
        let trust = bundle(&ca);
        let a = credentials(&ca, "node-a", Validity::days_from_now(7));
        let b = credentials(&ca, "node-b", Validity::days_from_now(7));
        let client = client_config(&trust, &a, b.identity()).unwrap();
        let server = server_config(&trust, &b).unwrap();

        // The TLS server name is irrelevant to the decision.
        let (client, server) = handshake(client, server, "unrelated.invalid").unwrap();

        let seen = server.peer_certificates().unwrap();
        assert_eq!(seen[0], a.chain()[0]);
        assert_eq!(identity_of(&seen[0]).unwrap(), *a.identity());
        assert_eq!(
            identity_of(&client.peer_certificates().unwrap()[0]).unwrap(),
            *b.identity()
        );

        for side in [&*client as &rustls::CommonState, &*server] {
            assert_eq!(side.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            assert_eq!(side.alpn_protocol(), Some(ALPN));
            assert_eq!(
                side.negotiated_key_exchange_group().unwrap().name(),
                NamedGroup::X25519MLKEM768
            );
            assert_eq!(
                side.negotiated_cipher_suite().unwrap().suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            );
        }
        assert_eq!(server.server_name(), None, "no SNI is sent");
    }

    #[test]
    fn a_server_that_is_not_the_expected_peer_is_rejected() {
        let ca = ca("prod");
        let trust = bundle(&ca);
        let a = credentials(&ca, "node-a", Validity::days_from_now(7));
        let b = credentials(&ca, "node-b", Validity::days_from_now(7));
        let c = node("node-c");

        // Even when the server name matches the server's DNS SAN, the identity decides.
        for server_name in ["node-b", "node-c", "10.1.2.3"] {
            let client = client_config(&trust, &a, &c).unwrap();
            let server = server_config(&trust, &b).unwrap();
            let Err(Failure::Client(error)) = handshake(client, server, server_name) else {
                panic!("node-b was accepted as node-c (server name {server_name})");
            };
            let mismatch = peer_mismatch(&error).expect("a PeerMismatch");
            assert_eq!(mismatch.expected, c);
            assert_eq!(mismatch.presented, *b.identity());
            let text = error.to_string();
            assert!(text.contains("node-b") && text.contains("node-c"), "{text}");
        }
    }

    #[test]
    fn a_client_certificate_from_another_ca_is_rejected() {
        let ours = ca("prod");
        let theirs = ca("other");
        let a = credentials(&theirs, "node-a", Validity::days_from_now(7));
        let b = credentials(&ours, "node-b", Validity::days_from_now(7));
        // The client trusts both CAs, so only the server's check can fail.
        let both =
            TrustBundle::from_pem(&format!("{}{}", ours.cert_pem(), theirs.cert_pem())).unwrap();
        let client = client_config(&both, &a, b.identity()).unwrap();
        let server = server_config(&bundle(&ours), &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Server(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))) => {}
            other => panic!("expected UnknownIssuer at the server, got {other:?}"),
        }
    }

    #[test]
    fn a_server_certificate_from_another_ca_is_rejected() {
        let ours = ca("prod");
        let theirs = ca("other");
        let a = credentials(&ours, "node-a", Validity::days_from_now(7));
        // Same name as the expected peer, wrong CA: the name must not rescue it.
        let impostor = credentials(&theirs, "node-b", Validity::days_from_now(7));
        let both =
            TrustBundle::from_pem(&format!("{}{}", ours.cert_pem(), theirs.cert_pem())).unwrap();
        let client = client_config(&bundle(&ours), &a, &node("node-b")).unwrap();
        let server = server_config(&both, &impostor).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Client(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))) => {}
            other => panic!("expected UnknownIssuer at the client, got {other:?}"),
        }
    }

    #[test]
    fn a_forged_ca_with_the_same_name_is_rejected() {
        // A certificate naming our CA as issuer, signed by another key.
        let ours = ca("prod");
        let a = credentials(&ours, "node-a", Validity::days_from_now(7));
        let forged_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forged = rcgen::Issuer::from_ca_cert_der(ours.cert_der(), forged_key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node-b".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://prod/node/node-b".try_into().unwrap(),
        ));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &forged).unwrap();
        let impostor = NodeCredentials::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();

        let client = client_config(&bundle(&ours), &a, &node("node-b")).unwrap();
        let server = server_config(&bundle(&ours), &impostor).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Client(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ))) => {}
            other => panic!("expected BadSignature at the client, got {other:?}"),
        }
    }

    #[test]
    fn a_bundle_of_two_cas_accepts_nodes_of_either() {
        // CA rotation: an old and a new CA of the same cluster in one bundle.
        let old = ca("prod");
        let new = ca("prod");
        let both = TrustBundle::from_pem(&format!("{}{}", old.cert_pem(), new.cert_pem())).unwrap();
        let a = credentials(&old, "node-a", Validity::days_from_now(7));
        let b = credentials(&new, "node-b", Validity::days_from_now(7));
        let client = client_config(&both, &a, b.identity()).unwrap();
        let server = server_config(&both, &b).unwrap();
        handshake(client, server, "node-b").unwrap();
        let client = client_config(&both, &b, a.identity()).unwrap();
        let server = server_config(&both, &a).unwrap();
        handshake(client, server, "node-a").unwrap();
        both.verify_node(&a, SystemTime::now()).unwrap();
        both.verify_node(&b, SystemTime::now()).unwrap();
    }

    #[test]
    fn a_client_without_a_certificate_is_rejected() {
        let ca = ca("prod");
        let trust = bundle(&ca);
        let b = credentials(&ca, "node-b", Validity::days_from_now(7));
        let provider = Arc::new(crypto_provider());
        let verifier = Arc::new(PeerVerifier::new(&trust, &provider, node("node-b")).unwrap());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(TLS13_ONLY)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server = server_config(&trust, &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Server(rustls::Error::NoCertificatesPresented)) => {}
            other => panic!("expected NoCertificatesPresented at the server, got {other:?}"),
        }
    }

    #[test]
    fn an_expired_server_certificate_is_rejected() {
        let ca = ca("prod");
        let trust = bundle(&ca);
        let a = credentials(&ca, "node-a", Validity::days_from_now(7));
        let now = OffsetDateTime::now_utc();
        let past = Validity {
            not_before: now - Duration::days(10),
            not_after: now - Duration::days(1),
        };
        let b = credentials(&ca, "node-b", past);
        let client = client_config(&trust, &a, b.identity()).unwrap();
        let server = server_config(&trust, &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Client(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ))) => {}
            other => panic!("expected an expired certificate at the client, got {other:?}"),
        }

        let error = trust.verify_node(&b, SystemTime::now()).unwrap_err();
        assert!(matches!(error, PkiError::Untrusted { .. }), "{error}");
        trust.verify_node(&a, SystemTime::now()).unwrap();
    }

    #[test]
    fn a_client_without_meshtun_alpn_is_rejected() {
        let ca = ca("prod");
        let trust = bundle(&ca);
        let a = credentials(&ca, "node-a", Validity::days_from_now(7));
        let b = credentials(&ca, "node-b", Validity::days_from_now(7));
        let mut client = client_config(&trust, &a, b.identity()).unwrap();
        client.alpn_protocols = vec![b"h3".to_vec()];
        let server = server_config(&trust, &b).unwrap();
        assert!(matches!(
            handshake(client, server, "node-b"),
            Err(Failure::Server(rustls::Error::NoApplicationProtocol))
        ));
    }

    /// A CRL signed by `ca` revoking `revoked`.
    fn crl_revoking(ca: &Authority, revoked: &NodeCredentials) -> String {
        let parsed = crate::identity::parse_certificate(&revoked.chain()[0], "revoked").unwrap();
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(parsed.raw_serial()),
                revocation_time: now - Duration::hours(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&ca.issuer).unwrap().pem().unwrap()
    }

    #[test]
    fn revoked_certificates_are_rejected_on_both_sides() {
        let ca = ca("prod");
        let a = credentials(&ca, "node-a", Validity::days_from_now(7));
        let b = credentials(&ca, "node-b", Validity::days_from_now(7));
        let plain = bundle(&ca);

        // The server holds a CRL revoking the client.
        let revokes_a = bundle(&ca).with_crl_pem(&crl_revoking(&ca, &a)).unwrap();
        assert_eq!(revokes_a.crl_count(), 1);
        let client = client_config(&plain, &a, b.identity()).unwrap();
        let server = server_config(&revokes_a, &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Server(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
            other => panic!("expected Revoked at the server, got {other:?}"),
        }

        // The client holds a CRL revoking the server.
        let revokes_b = bundle(&ca).with_crl_pem(&crl_revoking(&ca, &b)).unwrap();
        let client = client_config(&revokes_b, &a, b.identity()).unwrap();
        let server = server_config(&plain, &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Client(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
            other => panic!("expected Revoked at the client, got {other:?}"),
        }

        // With a CRL that revokes someone else, both still connect.
        let client = client_config(&revokes_b, &a, &node("node-a")).unwrap();
        let server = server_config(&revokes_b, &a).unwrap();
        handshake(client, server, "node-a").unwrap();
        assert!(revokes_b.verify_node(&b, SystemTime::now()).is_err());
    }

    #[test]
    fn crls_of_two_rotated_cas_each_apply_to_their_own_ca() {
        let old = ca("prod");
        let new = ca("prod");
        let a = credentials(&old, "node-a", Validity::days_from_now(7));
        let b = credentials(&new, "node-b", Validity::days_from_now(7));
        let c = credentials(&new, "node-c", Validity::days_from_now(7));
        let decoy = credentials(&old, "node-x", Validity::days_from_now(7));
        let crls = format!("{}{}", crl_revoking(&old, &decoy), crl_revoking(&new, &c));
        let trust = TrustBundle::from_pem(&format!("{}{}", old.cert_pem(), new.cert_pem()))
            .unwrap()
            .with_crl_pem(&crls)
            .unwrap();
        assert_eq!(trust.crl_count(), 2);

        let client = client_config(&trust, &a, b.identity()).unwrap();
        let server = server_config(&trust, &b).unwrap();
        handshake(client, server, "node-b").unwrap();

        let client = client_config(&trust, &c, b.identity()).unwrap();
        let server = server_config(&trust, &b).unwrap();
        match handshake(client, server, "node-b") {
            Err(Failure::Server(rustls::Error::InvalidCertificate(CertificateError::Revoked))) => {}
            other => panic!("expected Revoked at the server, got {other:?}"),
        }

        // A CA without a CRL in the set: its nodes' status is unknown, so refused.
        let only_old = TrustBundle::from_pem(&format!("{}{}", old.cert_pem(), new.cert_pem()))
            .unwrap()
            .with_crl_pem(&crl_revoking(&old, &decoy))
            .unwrap();
        let error = only_old.verify_node(&b, SystemTime::now()).unwrap_err();
        assert!(
            matches!(
                &error,
                PkiError::Untrusted {
                    reason: rustls::Error::InvalidCertificate(
                        CertificateError::UnknownRevocationStatus
                    ),
                    ..
                }
            ),
            "{error}"
        );
        only_old.verify_node(&a, SystemTime::now()).unwrap();
    }

    #[test]
    fn provider_choices() {
        let provider = crypto_provider();
        let groups: Vec<NamedGroup> = provider
            .kx_groups
            .iter()
            .map(|group| group.name())
            .collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519MLKEM768,
                NamedGroup::X25519,
                NamedGroup::secp256r1
            ]
        );
        assert_eq!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert!(provider
            .cipher_suites
            .iter()
            .all(|suite| suite.version() == &rustls::version::TLS13));
    }
}
