//! What goes wrong in enrollment: [`EnrollError`] (the token file,
//! randomness, the joining node's checks of an answer), and a [`Refusal`]
//! of a request, whose [`RefusalCode`] the client gets as `{"error": code}`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use meshtun_pki::PkiError;

use crate::pin::CaFingerprint;

/// What can go wrong in enrollment outside a refusal sent to a client:
/// the token file, randomness, or the client's checks of an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// A certificate, key or file problem.
    #[error(transparent)]
    Pki(#[from] PkiError),

    /// The token file exists but cannot be understood.
    #[error("{}: not a meshtun token file: {detail}", path.display())]
    TokensFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// The lock around the token file could not be taken.
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// The system random number generator failed.
    #[error("cannot draw random bytes for a join token")]
    Random,

    /// A token's time to live is zero or too long to represent.
    #[error("invalid token lifetime {0:?}")]
    Lifetime(Duration),

    /// The server refused the request.
    #[error("the enrollment server refused: {} ({code})", message)]
    Refused {
        /// The code as sent (one of [`RefusalCode`], or a newer one).
        code: String,
        /// The server's explanation.
        message: String,
    },

    /// The server's answer is not what the protocol allows.
    #[error("the enrollment server's answer is malformed: {0}")]
    Response(String),

    /// The answer names a CA other than the pinned one.
    #[error("the server answered with the CA {presented}, expected {expected}")]
    CaMismatch {
        /// The pinned fingerprint.
        expected: CaFingerprint,
        /// The fingerprint of the CA in the answer.
        presented: CaFingerprint,
    },

    /// The certificate in the answer is not the one asked for.
    #[error("the issued certificate is unusable: {0}")]
    Certificate(String),
}

impl EnrollError {
    /// The refusal code, when the server refused.
    pub fn refusal(&self) -> Option<RefusalCode> {
        match self {
            Self::Refused { code, .. } => RefusalCode::parse(code),
            _ => None,
        }
    }
}

/// Why the server refused a request: one code per cause, sent to the
/// client as `{"error": code}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// No such token, or the secret does not match.
    UnknownToken,
    /// The token was used already (tokens are single use).
    TokenUsed,
    /// The token's time to live is over.
    TokenExpired,
    /// The CSR asks for a name the token does not grant.
    WrongName,
    /// The request is not a well-formed enrollment request.
    BadRequest,
    /// Too many failed attempts from this address; wait and retry.
    RateLimited,
    /// A renewal without the node's current certificate.
    CertificateRequired,
    /// A renewal for a certificate the CA's ledger does not know.
    UnknownCertificate,
    /// A renewal for a revoked certificate.
    Revoked,
    /// A renewal for a certificate renewed already, past the retry window.
    AlreadyRenewed,
    /// The server could not complete a valid request (its log says why).
    ServerError,
}

impl RefusalCode {
    /// Every code, for tests and documentation.
    pub const ALL: [RefusalCode; 11] = [
        Self::UnknownToken,
        Self::TokenUsed,
        Self::TokenExpired,
        Self::WrongName,
        Self::BadRequest,
        Self::RateLimited,
        Self::CertificateRequired,
        Self::UnknownCertificate,
        Self::Revoked,
        Self::AlreadyRenewed,
        Self::ServerError,
    ];

    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownToken => "unknown_token",
            Self::TokenUsed => "token_used",
            Self::TokenExpired => "token_expired",
            Self::WrongName => "wrong_name",
            Self::BadRequest => "bad_request",
            Self::RateLimited => "rate_limited",
            Self::CertificateRequired => "certificate_required",
            Self::UnknownCertificate => "unknown_certificate",
            Self::Revoked => "revoked",
            Self::AlreadyRenewed => "already_renewed",
            Self::ServerError => "server_error",
        }
    }

    /// The code for a wire string, if it is one this build knows.
    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|known| known.as_str() == code)
    }

    /// Whether the client is at fault, so the attempt counts against its
    /// address's rate limit (a rate-limited or server-side failure does not).
    pub fn is_client_failure(self) -> bool {
        !matches!(self, Self::RateLimited | Self::ServerError)
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: the code and message the client gets, the token id
/// (public; for the log) and, for server-side failures, a detail that only
/// the log gets. Never holds a token secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub code: RefusalCode,
    /// The explanation sent to the client.
    pub message: String,
    /// The id of the token presented, when it parsed.
    pub token_id: Option<String>,
    /// More for the server's log only (a path, an OS error).
    pub log_detail: Option<String>,
}

impl Refusal {
    /// A refusal with `code` and the client's `message`.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            token_id: None,
            log_detail: None,
        }
    }

    pub(crate) fn with_token(mut self, id: &str) -> Self {
        self.token_id = Some(id.to_owned());
        self
    }

    pub(crate) fn server_error(detail: impl fmt::Display) -> Self {
        Self {
            log_detail: Some(detail.to_string()),
            ..Self::new(
                RefusalCode::ServerError,
                "the enrollment server cannot complete the request; its log says why",
            )
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
