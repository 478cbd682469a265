//! The one error type of this crate. Every variant says what is wrong and,
//! where a file or a PEM input is involved, which one (`origin`), so the CLI
//! can print it unchanged.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while issuing, loading or checking
/// certificates and building TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// A file or directory could not be created or written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// A file that would be written already exists and `force` was not given.
    #[error("{} already exists; refusing to overwrite it (pass --force to replace it)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },

    /// A private key file can be read by its group or by others.
    #[error(
        "{} has mode {mode:04o}: a private key must not be readable by group or others; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// The input is not well-formed PEM.
    #[error("{origin}: not valid PEM: {detail}")]
    Pem {
        /// The file or input that was parsed.
        origin: String,
        /// What the PEM parser said.
        detail: String,
    },

    /// The input holds no certificate.
    #[error("{origin}: holds no certificate (expected a PEM block \"BEGIN CERTIFICATE\")")]
    NoCertificate {
        /// The file or input that was parsed.
        origin: String,
    },

    /// The input holds no private key.
    #[error("{origin}: holds no private key (expected a PEM block \"BEGIN PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")")]
    NoPrivateKey {
        /// The file or input that was parsed.
        origin: String,
    },

    /// A certificate could not be parsed or is unfit for its role.
    #[error("{origin}: {detail}")]
    Certificate {
        /// The file or input that holds the certificate.
        origin: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A private key could not be parsed or used.
    #[error("{origin}: unusable private key: {detail}")]
    Key {
        /// The file or input that holds the key.
        origin: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate revocation list could not be parsed.
    #[error("{origin}: unusable certificate revocation list: {detail}")]
    Crl {
        /// The file or input that holds the CRL.
        origin: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A serial number given by a user is not hex or too long.
    #[error(
        "invalid serial number {input:?}: {detail}; expected hex digits as `meshtun pki inspect` \
         prints them (colons optional), e.g. 4a:1b:2c"
    )]
    Serial {
        /// The rejected text.
        input: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A revocation reason given by a user is not one of RFC 5280's.
    #[error("unknown revocation reason {input:?}")]
    Reason {
        /// The rejected text.
        input: String,
    },

    /// A certificate cannot be renewed as it is.
    #[error("{origin}: cannot renew it: {detail}")]
    Renew {
        /// The file or input that holds the certificate.
        origin: String,
        /// Why.
        detail: String,
    },

    /// The private key does not belong to the certificate.
    #[error("{key_origin} does not hold the private key of the certificate in {cert_origin}")]
    KeyMismatch {
        /// Where the certificate came from.
        cert_origin: String,
        /// Where the key came from.
        key_origin: String,
    },

    /// A certificate carries no usable node identity (docs/design.md, "Identity").
    #[error("{origin}: no node identity: {detail}")]
    Identity {
        /// The file or input that holds the certificate.
        origin: String,
        /// Why no identity could be taken from it.
        detail: String,
    },

    /// A cluster name is not usable as a SPIFFE trust domain.
    #[error("invalid cluster name {name:?}: {detail}")]
    ClusterName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        detail: String,
    },

    /// An extra DNS name for a certificate is not a valid DNS name.
    #[error("invalid DNS name {name:?} for a certificate: only a syntactically valid host name is accepted")]
    DnsName {
        /// The rejected name.
        name: String,
    },

    /// A validity period is empty or reversed.
    #[error("invalid validity: not_before {not_before} is not before not_after {not_after}")]
    Validity {
        /// Start of the rejected period.
        not_before: time::OffsetDateTime,
        /// End of the rejected period.
        not_after: time::OffsetDateTime,
    },

    /// rcgen refused to build or sign a certificate.
    #[error("cannot issue the certificate: {0}")]
    Issue(#[from] rcgen::Error),

    /// The system random number generator failed.
    #[error("cannot draw random bytes for a certificate serial number")]
    Random,

    /// rustls refused the configuration (for example a key it cannot use).
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    /// rustls refused to build a certificate verifier from the trust bundle.
    #[error("cannot build a certificate verifier from the trust bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    /// The issuance ledger of a CA directory cannot be used.
    #[error("{}: {detail}", path.display())]
    Ledger {
        /// The ledger file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// A certificate does not verify against the trust bundle.
    #[error("the certificate of {identity} is not trusted: {reason}")]
    Untrusted {
        /// The identity the certificate claims.
        identity: String,
        /// Why verification failed.
        reason: rustls::Error,
    },
}

impl PkiError {
    /// Whether a certificate was refused because a CRL revokes it.
    pub fn is_revoked(&self) -> bool {
        matches!(
            self,
            PkiError::Untrusted {
                reason: rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked),
                ..
            }
        )
    }

    /// Whether a certificate was refused because it, or a certificate of
    /// its chain, is past its validity.
    pub fn is_expired(&self) -> bool {
        matches!(
            self,
            PkiError::Untrusted {
                reason: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                        | rustls::CertificateError::ExpiredRevocationList
                        | rustls::CertificateError::ExpiredRevocationListContext { .. }
                ),
                ..
            }
        )
    }

    /// Whether a certificate was refused because CRLs are configured but
    /// none of them is from its CA (so its revocation status is unknown).
    pub fn is_unknown_revocation_status(&self) -> bool {
        matches!(
            self,
            PkiError::Untrusted {
                reason: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownRevocationStatus
                ),
                ..
            }
        )
    }
}
