//! Enrollment without moving the CA key (like `kubeadm join`): the pure
//! parts. The network side (TLS over TCP, timeouts, rate limiting) is in
//! `meshtun-node`; this module opens no socket.
//!
//! The flow:
//! 1. On the CA host, `meshtun pki token` makes a [`JoinToken`] bound to one
//!    node name and its SANs (a [`Grant`]) and records it in
//!    `DIR/tokens.json` ([`TokenStore`]). Only the SHA-256 of the token's
//!    256-bit secret is stored; the token itself is printed once.
//! 2. `meshtun pki serve` answers enrollment requests with an [`Enroller`].
//! 3. On the new node, `meshtun join` generates a P-256 key ([`JoinKey`]),
//!    sends a CSR with the token, and checks what comes back
//!    ([`JoinKey::accept`]) before writing anything ([`Enrolled::write`]).
//!
//! The server proves it holds the CA with a certificate it signs for itself
//! at start ([`enrollment_server_config`]); the client pins the CA by the
//! SHA-256 fingerprint of its certificate ([`enrollment_client_config`]), so
//! a node needs nothing but the token and the fingerprint to join.
//!
//! Wire format (both directions): a 4-byte big-endian length, then that many
//! bytes of JSON, at most [`MAX_MESSAGE_LEN`]. Request
//! `{"version":1,"token":"mtjoin1.<id>.<secret>","csr":"<PEM>"}`; answer
//! `{"certificate":"<PEM>","ca":"<PEM>"}` or
//! `{"error":"<code>","message":"<text>"}` with a code of [`RefusalCode`].
//!
//! Token rules: the secret is compared in constant time against the stored
//! hash; a token is single use (marked used and persisted before the
//! certificate is sent); an expired token is refused; the CSR may ask for
//! nothing or a subset of what the token grants, and the certificate always
//! carries exactly the token's node name and SANs, never the CSR's.

use std::fmt;
use std::fs::DirBuilder;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshtun_proto::NodeName;
use nix::fcntl::Flock;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    UnixTime,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::crl::RevocationList;
use crate::files::{self, NewFile, CERT_MODE, KEY_MODE};
use crate::identity::{node_uri, Serial};
use crate::issue::{Authority, Validity, CA_CERT_FILE};
use crate::ledger::{Issuance, IssuedRecord, Ledger};
use crate::load::{first_certificate, NodeCredentials, TrustBundle};
use crate::x509::{
    crypto_provider, fingerprint, format_unix, hex, system_time, unhex, unix_seconds_unsigned,
    TLS13_ONLY,
};
use crate::PkiError;

/// The file in a CA directory that records join tokens (hashes only), 0600.
pub const TOKENS_FILE: &str = "tokens.json";

/// The lock file beside [`TOKENS_FILE`]; every change of the token file
/// holds an exclusive `flock` on it, so `pki token` and `pki serve` running
/// at once never lose each other's writes.
pub const TOKENS_LOCK_FILE: &str = "tokens.lock";

/// ALPN of the enrollment protocol (TLS 1.3 over TCP). Distinct from the
/// QUIC ALPN, so neither endpoint can be mistaken for the other.
pub const ENROLL_ALPN: &[u8] = b"meshtun-enroll/1";

/// The ALPN protocol of a node's renewal (mTLS with its current certificate).
pub const RENEW_ALPN: &[u8] = b"meshtun-renew/1";

/// The enrollment protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response body, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Records that expired (used or not) more than this long ago are dropped
/// from the token file at its next change. Until then a late attempt gets
/// `token_expired` or `token_used` instead of `unknown_token`.
pub const TOKEN_RECORD_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// First field of every join token: the format and its version.
const TOKEN_PREFIX: &str = "mtjoin1";
/// Bytes of a token's public id (looked up, logged).
const TOKEN_ID_LEN: usize = 8;
/// Bytes of a token's secret (256 bits; only its SHA-256 is stored).
const TOKEN_SECRET_LEN: usize = 32;
/// Version of the token file's layout.
const TOKENS_FILE_VERSION: u32 = 1;

/// How long the enrollment server's own certificate is valid (it is made
/// again well before, see `meshtun-node`), and how far its start is set back
/// for clock skew.
const SERVER_CERT_LIFETIME: time::Duration = time::Duration::days(1);
const SERVER_CERT_SKEW: time::Duration = time::Duration::hours(1);

// ------------------------------------------------------------------ errors

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

// ------------------------------------------------------------------ refusals

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

    fn with_token(mut self, id: &str) -> Self {
        self.token_id = Some(id.to_owned());
        self
    }

    fn server_error(detail: impl fmt::Display) -> Self {
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

// ------------------------------------------------------------------ tokens

/// A join token: `mtjoin1.<id: 16 hex digits>.<secret: 64 hex digits>`.
///
/// The id is public (it is logged and shown in the token file); the secret
/// is 256 random bits, of which only the SHA-256 is stored. `Debug` shows the
/// id only; [`JoinToken::reveal`] is the one way to get the whole token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: [u8; TOKEN_ID_LEN],
    secret: [u8; TOKEN_SECRET_LEN],
}

impl JoinToken {
    fn generate() -> Result<Self, EnrollError> {
        let mut id = [0u8; TOKEN_ID_LEN];
        let mut secret = [0u8; TOKEN_SECRET_LEN];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| EnrollError::Random)?;
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| EnrollError::Random)?;
        Ok(Self { id, secret })
    }

    /// The public id (16 hex digits).
    pub fn id(&self) -> String {
        hex(&self.id)
    }

    /// The whole token, secret included: print it once, never log it.
    pub fn reveal(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}", hex(&self.id), hex(&self.secret))
    }

    /// `sha256:<hex>` of the secret, as the token file stores it.
    fn secret_hash(&self) -> String {
        hex(&Sha256::digest(self.secret))
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id())
            .field("secret", &"[elided]")
            .finish()
    }
}

/// Why a string is not a join token. Says nothing about the string's
/// content, which may be a mistyped secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token: expected {TOKEN_PREFIX}.<16 hex digits>.<64 hex digits>, as `meshtun pki token` prints it")]
pub struct TokenFormatError;

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError);
        };
        Ok(Self {
            id: unhex(id).ok_or(TokenFormatError)?,
            secret: unhex(secret).ok_or(TokenFormatError)?,
        })
    }
}

/// What a token entitles its holder to: a certificate for exactly this node
/// name and these SANs (as [`Authority::issue`] makes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The node name (the identity).
    pub node: NodeName,
    /// IP address SANs.
    pub ips: Vec<IpAddr>,
    /// Extra DNS SANs (the node name is always the first DNS SAN).
    pub dns: Vec<String>,
    /// How long the certificate is valid; the server's default if `None`.
    pub valid_for: Option<Duration>,
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

/// A token just made: the token (shown once) and when it expires.
#[derive(Debug)]
pub struct NewToken {
    /// The token; [`JoinToken::reveal`] gives the text to hand over.
    pub token: JoinToken,
    /// Its last valid instant (exclusive).
    pub expires_at: SystemTime,
}

/// One line of the token file. The secret is only ever here as a hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    id: String,
    /// Lowercase hex SHA-256 of the 32 secret bytes.
    secret_sha256: String,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    dns: Vec<String>,
    /// Unix seconds.
    created_at: u64,
    /// Unix seconds; the token is refused from this instant on.
    expires_at: u64,
    used: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_at: Option<u64>,
    /// The source address that redeemed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_by: Option<String>,
    /// Seconds the certificate is valid for (`pki token --valid-for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    valid_for: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFileDocument {
    version: u32,
    tokens: Vec<TokenRecord>,
}

/// The token file's contents in memory: no I/O, time passed in.
#[derive(Debug, Default)]
pub(crate) struct TokenBook {
    records: Vec<TokenRecord>,
}

impl TokenBook {
    fn from_json(text: &str, path: &Path) -> Result<Self, EnrollError> {
        let document: TokenFileDocument =
            serde_json::from_str(text).map_err(|error| EnrollError::TokensFile {
                path: path.to_path_buf(),
                detail: error.to_string(),
            })?;
        if document.version != TOKENS_FILE_VERSION {
            return Err(EnrollError::TokensFile {
                path: path.to_path_buf(),
                detail: format!(
                    "version {} (this meshtun reads version {TOKENS_FILE_VERSION})",
                    document.version
                ),
            });
        }
        Ok(Self {
            records: document.tokens,
        })
    }

    fn to_json(&self) -> String {
        let document = TokenFileDocument {
            version: TOKENS_FILE_VERSION,
            tokens: self.records.clone(),
        };
        // Plain strings, numbers and booleans: serialization cannot fail.
        let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Adds a fresh token for `grant` valid for `ttl` from `now`.
    fn add(
        &mut self,
        grant: &Grant,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<NewToken, EnrollError> {
        let created_at = unix_seconds_unsigned(now);
        let expires_at = created_at
            .checked_add(ttl.as_secs())
            .filter(|_| ttl.as_secs() > 0)
            .ok_or(EnrollError::Lifetime(ttl))?;
        let token = loop {
            let token = JoinToken::generate()?;
            // 64 random bits: a collision is never expected, but cheap to rule out.
            if !self.records.iter().any(|record| record.id == token.id()) {
                break token;
            }
        };
        self.records.push(TokenRecord {
            id: token.id(),
            secret_sha256: token.secret_hash(),
            node: grant.node.to_string(),
            ips: grant.ips.clone(),
            dns: grant.dns.clone(),
            created_at,
            expires_at,
            used: false,
            used_at: None,
            used_by: None,
            valid_for: grant.valid_for.map(|lifetime| lifetime.as_secs()),
        });
        Ok(NewToken {
            token,
            expires_at: UNIX_EPOCH + Duration::from_secs(expires_at),
        })
    }

    /// The grant of `token` if it may be redeemed at `now`.
    ///
    /// The record is found by the public id; the secret is then compared, in
    /// constant time, as a hash with the stored hash. An unknown id and a
    /// wrong secret get the same answer, and whether a token is used or
    /// expired is only told to someone who holds its secret.
    fn check(&self, token: &JoinToken, now: SystemTime) -> Result<Grant, Refusal> {
        let id = token.id();
        let unknown = || {
            Refusal::new(
                RefusalCode::UnknownToken,
                "unknown join token: ask the CA operator for a new one (`meshtun pki token`)",
            )
            .with_token(&id)
        };
        let record = self
            .records
            .iter()
            .find(|record| record.id == id)
            .ok_or_else(unknown)?;
        if !hash_matches(&record.secret_sha256, &token.secret) {
            return Err(unknown());
        }
        if record.used {
            let when = record.used_at.map_or_else(
                || "earlier".to_owned(),
                |at| format!("at {}", format_unix(at)),
            );
            let by = record
                .used_by
                .as_deref()
                .map_or_else(String::new, |by| format!(" from {by}"));
            return Err(Refusal::new(
                RefusalCode::TokenUsed,
                format!(
                    "join token {id} was used already ({when}{by}); a token works once: \
                     ask the CA operator for a new one"
                ),
            )
            .with_token(&id));
        }
        if unix_seconds_unsigned(now) >= record.expires_at {
            return Err(Refusal::new(
                RefusalCode::TokenExpired,
                format!(
                    "join token {id} expired at {}; ask the CA operator for a new one",
                    format_unix(record.expires_at)
                ),
            )
            .with_token(&id));
        }
        let node = NodeName::new(&record.node).map_err(|error| {
            Refusal::server_error(format!(
                "token {id} in the token file names an invalid node {:?}: {error}",
                record.node
            ))
            .with_token(&id)
        })?;
        Ok(Grant {
            node,
            ips: record.ips.clone(),
            dns: record.dns.clone(),
            valid_for: record.valid_for.map(Duration::from_secs),
        })
    }

    /// Marks `token` used at `now` by `by`.
    fn mark_used(&mut self, token: &JoinToken, now: SystemTime, by: &str) {
        let id = token.id();
        if let Some(record) = self.records.iter_mut().find(|record| record.id == id) {
            record.used = true;
            record.used_at = Some(unix_seconds_unsigned(now));
            record.used_by = Some(by.to_owned());
        }
    }

    /// Drops records that expired more than [`TOKEN_RECORD_KEPT`] ago.
    fn prune(&mut self, now: SystemTime) {
        let now = unix_seconds_unsigned(now);
        let kept = TOKEN_RECORD_KEPT.as_secs();
        self.records
            .retain(|record| record.expires_at.saturating_add(kept) > now);
    }
}

/// Whether `secret` hashes to `stored` (lowercase hex SHA-256), compared
/// in constant time.
fn hash_matches(stored: &str, secret: &[u8]) -> bool {
    let Some(stored) = unhex::<32>(stored) else {
        return false;
    };
    let presented = Sha256::digest(secret);
    aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &presented).is_ok()
}

/// `DIR/tokens.json` of a CA directory, changed only under the lock.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// The token store of the CA directory `dir` (nothing is read yet).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// `DIR/tokens.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(TOKENS_FILE)
    }

    /// Reads the token file once, to fail early (a server at start-up) on
    /// one that cannot be read. Returns how many records it holds.
    pub fn check(&self) -> Result<usize, EnrollError> {
        let _lock = self.lock()?;
        Ok(self.read()?.records.len())
    }

    /// Makes a token for `grant` that expires `ttl` after `now`, and records
    /// its hash. The grant's DNS names are checked as issuance would.
    pub fn create(
        &self,
        grant: &Grant,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<NewToken, EnrollError> {
        for name in &grant.dns {
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(PkiError::DnsName { name: name.clone() }.into());
            }
        }
        let _lock = self.lock()?;
        let mut book = self.read()?;
        book.prune(now);
        let token = book.add(grant, ttl, now)?;
        self.write(&book)?;
        Ok(token)
    }

    /// Redeems `token` for the client at `by`: checks it, runs `issue` with
    /// its grant, then marks it used and persists that before returning what
    /// `issue` made. A refusal by `issue` leaves the token unused; a failure
    /// to persist the use discards what `issue` made.
    pub fn redeem<T>(
        &self,
        token: &JoinToken,
        now: SystemTime,
        by: &str,
        issue: impl FnOnce(&Grant) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let with_id = |refusal: Refusal| refusal.with_token(&token.id());
        let _lock = self
            .lock()
            .map_err(|error| with_id(Refusal::server_error(error)))?;
        let mut book = self
            .read()
            .map_err(|error| with_id(Refusal::server_error(error)))?;
        let grant = book.check(token, now)?;
        let issued = issue(&grant).map_err(with_id)?;
        book.mark_used(token, now, by);
        book.prune(now);
        self.write(&book).map_err(|error| {
            with_id(Refusal::server_error(format!(
                "the certificate was not sent: cannot record the token as used: {error}"
            )))
        })?;
        Ok(issued)
    }

    fn lock(&self) -> Result<Flock<std::fs::File>, EnrollError> {
        let path = self.dir.join(TOKENS_LOCK_FILE);
        files::lock_exclusive(&path).map_err(|source| EnrollError::Lock { path, source })
    }

    fn read(&self) -> Result<TokenBook, EnrollError> {
        let path = self.path();
        match files::read_private_text(&path) {
            Ok(text) => TokenBook::from_json(&text, &path),
            Err(PkiError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(TokenBook::default())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Writes the whole file through a temporary file renamed over it, 0600.
    fn write(&self, book: &TokenBook) -> Result<(), EnrollError> {
        let text = book.to_json();
        let file = NewFile {
            path: self.path(),
            contents: &text,
            mode: KEY_MODE,
        };
        files::write_files(&self.dir, &[file], true)?;
        Ok(())
    }
}

// ------------------------------------------------------------------ messages

/// A node's renewal request, sent over a connection with ALPN
/// [`RENEW_ALPN`] on which it presented its current certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The CSR for the node's fresh key, in PEM.
    pub csr: String,
}

/// The client's request.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The join token, secret included.
    pub token: String,
    /// The CSR in PEM.
    pub csr: String,
    /// Seconds the node asks its certificate to be valid for (`join
    /// --valid-for`): it may ask for less than the token grants, not more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for: Option<u64>,
}

/// How long after a certificate's renewal the same certificate may ask
/// again (the node never got the first answer); later, it is refused.
pub const RENEWED_RETRY_WINDOW: Duration = Duration::from_secs(30 * 60);

/// The shortest lifetime a node may ask for when it joins.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("version", &self.version)
            .field("token", &"[elided]")
            .field("csr_len", &self.csr.len())
            .finish()
    }
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnrollResponse {
    /// The certificate and the CA certificate, both PEM.
    Issued {
        /// The node's new certificate.
        certificate: String,
        /// The CA certificate that signed it.
        ca: String,
    },
    /// A refusal.
    Refused {
        /// A [`RefusalCode`] string.
        error: String,
        /// What to do about it.
        message: String,
    },
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

/// `message` as JSON behind its 4-byte big-endian length.
pub fn encode_frame(message: &impl Serialize) -> Result<Vec<u8>, EnrollError> {
    let body = serde_json::to_vec(message)
        .map_err(|error| EnrollError::Response(format!("cannot encode: {error}")))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| (*len as usize) <= MAX_MESSAGE_LEN)
        .ok_or_else(|| {
            EnrollError::Response(format!(
                "message of {} bytes is over the {MAX_MESSAGE_LEN}-byte limit",
                body.len()
            ))
        })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a frame's 4-byte prefix announces, if it is within
/// 1..=[`MAX_MESSAGE_LEN`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Refusal> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_MESSAGE_LEN {
        return Err(Refusal::new(
            RefusalCode::BadRequest,
            format!(
                "a message is a 4-byte big-endian length of 1 to {MAX_MESSAGE_LEN} and that many \
                 bytes of JSON; this one announced {len} bytes"
            ),
        ));
    }
    Ok(len)
}

/// Parses a response body.
pub fn decode_response(body: &[u8]) -> Result<EnrollResponse, EnrollError> {
    serde_json::from_slice(body).map_err(|error| EnrollError::Response(error.to_string()))
}

// ------------------------------------------------------------------ server

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
            ledger: Ledger::new(&store.dir),
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
        let (node, certificate_pem) = self.store.redeem(&token, now, source, |grant| {
            let granted = grant.valid_for.unwrap_or(self.lifetime);
            let lifetime = asked.map_or(granted, |asked| asked.min(granted));
            let validity = Validity::lasting(OffsetDateTime::from(now), lifetime);
            let pem = sign_request(&self.authority, grant, &csr, validity)?;
            self.record(&pem, Issuance::Join, None, now)?;
            Ok((grant.node.clone(), pem))
        })?;
        Ok(self.granted(node, Some(token.id()), certificate_pem))
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
        let revocations = RevocationList::load(&self.store.dir, &self.authority)
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
        IssuedRecord::of_pem(&pem, Issuance::SelfRenew, Some(&current.serial), now)
            .and_then(|record| ledger.record(record, now))
            .map_err(|error| {
                Refusal::server_error(format!(
                    "the certificate was not sent: cannot record it in the ledger: {error}"
                ))
            })?;
        Ok(self.granted(current.grant.node, None, pem))
    }

    /// Records a certificate in the ledger before it is sent.
    fn record(
        &self,
        pem: &str,
        how: Issuance,
        replaces: Option<&Serial>,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        IssuedRecord::of_pem(pem, how, replaces, now)
            .and_then(|record| self.ledger.record(record, now))
            .map_err(|error| {
                Refusal::server_error(format!(
                    "the certificate was not sent: cannot record it in the ledger: {error}"
                ))
            })
    }

    fn granted(
        &self,
        node: NodeName,
        token_id: Option<String>,
        certificate_pem: String,
    ) -> Granted {
        let fingerprint = first_certificate(&certificate_pem, "issued certificate")
            .map(|der| fingerprint(&der))
            .unwrap_or_default();
        Granted {
            node,
            token_id,
            fingerprint,
            certificate_pem,
            ca_pem: self.authority.cert_pem(),
        }
    }
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
        let parsed = crate::identity::parse_certificate(leaf, "presented certificate")
            .map_err(|error| bad(error.to_string()))?;
        let node = crate::identity::identity_of_parsed(&parsed)
            .map_err(|detail| bad(format!("has no node identity: {detail}")))?;
        let serial = Serial::of_parsed(&parsed, "presented certificate")
            .map_err(|error| bad(error.to_string()))?;
        let mut ips = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(extension)) = parsed.subject_alternative_name() {
            for name in &extension.value.general_names {
                match name {
                    GeneralName::IPAddress(bytes) => ips.extend(crate::identity::ip_from(bytes)),
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
                        GeneralName::IPAddress(bytes) => match crate::identity::ip_from(bytes) {
                            Some(ip) => RequestedName::Ip(ip),
                            None => RequestedName::Other(format!("IP:{bytes:02x?}")),
                        },
                        other => RequestedName::Other(crate::identity::describe_name(other)),
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
// ------------------------------------------------------------------ TLS

/// The SHA-256 fingerprint of a CA certificate's DER, which a joining node
/// pins: written `sha256:<64 hex digits>` (as `meshtun pki inspect` and
/// `meshtun pki token` print it; upper case and `:` between bytes, as
/// `openssl x509 -fingerprint -sha256` prints it, are accepted too).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint([u8; 32]);

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
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.not_before = now - SERVER_CERT_SKEW;
    params.not_after = now + SERVER_CERT_LIFETIME;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| PkiError::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("meshtun enrollment server {}", authority.cluster()),
    );
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &authority.issuer)?;
    let chain = vec![cert.der().clone(), authority.cert_der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

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
pub fn renewal_client_config(
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
            builder.with_client_auth_cert(current.chain.clone(), current.key.clone_key())?
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
///    (as in `tls.rs`): that error alone is set aside.
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

// ------------------------------------------------------------------ client

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
    files::read_text(path)
        .and_then(|pem| first_certificate(&pem, "ca.crt"))
        .is_ok_and(|der| CaFingerprint::of(&der) == *pinned)
}

/// A joined node's certificate, key and CA, checked to belong together.
pub struct Enrolled {
    node: NodeName,
    cert_pem: String,
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
        files::write_files(dir, &targets, force)?;
        crate::load::forget_reset_secret(&paths.key)?;
        Ok(paths)
    }
}

impl Enrolled {
    /// Installs a renewed certificate and key in place of the ones at
    /// `cert` and `key` (`tls.cert`, `tls.key`): the current pair is copied
    /// to `<cert>.prev` and `<key>.prev` first, then the key and the
    /// certificate are each replaced atomically (a temporary file renamed
    /// over it). The CA certificate is not touched. Returns the `.prev`
    /// paths.
    pub fn install(&self, cert: &Path, key: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        let previous = |path: &Path| {
            let mut name = path.as_os_str().to_owned();
            name.push(".prev");
            PathBuf::from(name)
        };
        let (cert_prev, key_prev) = (previous(cert), previous(key));
        // One renewal at a time per key (the daemon and `meshtun renew`).
        let mut lock_path = key.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let _lock = files::lock_exclusive(&lock_path).map_err(|source| PkiError::Write {
            path: lock_path.clone(),
            source,
        })?;
        let old_key = files::read_private_text(key)?;
        let old_cert = files::read_text(cert)?;
        // The stateless-reset secret stays what it was: peers of a daemon
        // restarted after this renewal must recognize its resets.
        let reset = crate::load::reset_secret_path(key);
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
            files::write_files(dir, &[file], false)?;
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
            files::write_files(dir, &[file], true)?;
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

// ------------------------------------------------------------------ helpers

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_of;
    use crate::issue::pem_block;
    use meshtun_test_support::TempDir;
    use rustls::{ClientConnection, ServerConnection};
    use std::os::unix::fs::PermissionsExt;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn grant(name: &str) -> Grant {
        Grant {
            node: node(name),
            ips: vec!["198.18.0.5".parse().unwrap()],
            dns: vec![format!("{name}.cluster.example")],
            valid_for: None,
        }
    }

    /// A CA written to a fresh directory, and its token store.
    fn ca_dir(label: &str) -> (TempDir, Authority, TokenStore) {
        let dir = TempDir::new(label);
        let authority = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
        authority.write(dir.path(), false).unwrap();
        let store = TokenStore::new(dir.path());
        (dir, authority, store)
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn tokens_round_trip_and_hide_their_secret() {
        let token = JoinToken::generate().unwrap();
        let text = token.reveal();
        assert!(text.starts_with("mtjoin1."), "{text}");
        assert_eq!(text.len(), "mtjoin1.".len() + 16 + 1 + 64);
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        let upper = text.to_uppercase().replace("MTJOIN1", "mtjoin1");
        assert_eq!(upper.parse::<JoinToken>().unwrap(), token);
        assert_eq!(format!(" {text}\n").parse::<JoinToken>().unwrap(), token);
        let debug = format!("{token:?}");
        assert!(debug.contains(&token.id()), "{debug}");
        assert!(!debug.contains(&hex(&token.secret)), "{debug}");
        for bad in [
            "",
            "mtjoin1",
            "mtjoin2.0011223344556677.".to_owned().as_str(),
            &text[..text.len() - 1],
            &format!("{text}.x"),
            &text.replace("mtjoin1", "mtjoin2"),
            &format!("{}g", &text[..text.len() - 1]),
        ] {
            // The error is a unit: it cannot carry what was typed.
            assert_eq!(bad.parse::<JoinToken>(), Err(TokenFormatError), "{bad:?}");
        }
    }

    #[test]
    fn the_store_keeps_a_hash_not_the_secret_in_a_0600_file() {
        let (dir, _authority, store) = ca_dir("tokens-hash");
        let now = SystemTime::now();
        let made = store.create(&grant("node-x"), HOUR, now).unwrap();
        let text = std::fs::read_to_string(store.path()).unwrap();
        let secret = hex(&made.token.secret);
        assert!(
            !text.contains(&secret),
            "the secret is in the file:\n{text}"
        );
        assert!(text.contains(&made.token.id()));
        assert!(text.contains(&hex(&Sha256::digest(made.token.secret))));
        assert!(text.contains("\"node\": \"node-x\""), "{text}");
        assert!(text.contains("198.18.0.5") && text.contains("node-x.cluster.example"));
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(mode(&dir.path().join(TOKENS_LOCK_FILE)), 0o600);
        assert_eq!(
            made.expires_at,
            UNIX_EPOCH + Duration::from_secs(unix_seconds_unsigned(now) + 3600)
        );
        // No temporary file is left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|name| !name.contains(".tmp")), "{names:?}");

        // A widened file is refused, like a key.
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            store.check(),
            Err(EnrollError::Pki(PkiError::KeyPermissions { .. }))
        ));
    }

    #[test]
    fn the_secret_is_compared_as_a_hash_in_constant_time() {
        let secret = [7u8; 32];
        let stored = hex(&Sha256::digest(secret));
        assert!(hash_matches(&stored, &secret));
        let mut other = secret;
        other[31] ^= 1;
        assert!(!hash_matches(&stored, &other));
        // A damaged record matches nothing.
        assert!(!hash_matches(&stored[..62], &secret));
        assert!(!hash_matches("zz", &secret));
        assert!(!hash_matches(
            &stored.to_uppercase().replace('A', "g"),
            &secret
        ));
    }

    #[test]
    fn redeem_checks_secret_expiry_and_single_use() {
        let (_dir, _authority, store) = ca_dir("tokens-redeem");
        let now = SystemTime::now();
        let made = store.create(&grant("node-x"), HOUR, now).unwrap();
        let issue = |grant: &Grant| Ok::<_, Refusal>(grant.node.to_string());
        let code = |result: Result<String, Refusal>| result.unwrap_err().code;

        // Same id, another secret: unknown, like an unknown id.
        let mut forged = made.token.clone();
        forged.secret[0] ^= 0x80;
        assert_eq!(
            code(store.redeem(&forged, now, "a", issue)),
            RefusalCode::UnknownToken
        );
        let stranger = JoinToken::generate().unwrap();
        let refusal = store.redeem(&stranger, now, "a", issue).unwrap_err();
        assert_eq!(refusal.code, RefusalCode::UnknownToken);
        assert_eq!(refusal.token_id, Some(stranger.id()));

        // Expired from `expires_at` on.
        let later = now + HOUR + Duration::from_secs(1);
        let refusal = store.redeem(&made.token, later, "a", issue).unwrap_err();
        assert_eq!(refusal.code, RefusalCode::TokenExpired);
        assert!(refusal.message.contains("expired at"), "{refusal}");

        // A refusal by the issuer leaves the token unused.
        let refusal = store
            .redeem(&made.token, now, "a", |_| {
                Err::<String, _>(Refusal::new(RefusalCode::WrongName, "no"))
            })
            .unwrap_err();
        assert_eq!(refusal.code, RefusalCode::WrongName);
        assert_eq!(refusal.token_id, Some(made.token.id()));

        assert_eq!(
            store
                .redeem(&made.token, now, "198.18.0.9:4000", issue)
                .unwrap(),
            "node-x"
        );
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(
            text.contains("\"used\": true") && text.contains("198.18.0.9:4000"),
            "{text}"
        );
        let refusal = store.redeem(&made.token, now, "b", issue).unwrap_err();
        assert_eq!(refusal.code, RefusalCode::TokenUsed);
        assert!(refusal.message.contains("198.18.0.9:4000"), "{refusal}");
        // A used token says so even once expired.
        assert_eq!(
            code(store.redeem(&made.token, later, "b", issue)),
            RefusalCode::TokenUsed
        );
        // Nothing the client is told holds the secret.
        assert!(!refusal.message.contains(&hex(&made.token.secret)));
    }

    #[test]
    fn old_records_are_pruned_and_bad_lifetimes_refused() {
        let (_dir, _authority, store) = ca_dir("tokens-prune");
        let then = SystemTime::now() - TOKEN_RECORD_KEPT - 2 * HOUR;
        let old = store.create(&grant("node-old"), HOUR, then).unwrap();
        let recent = store
            .create(&grant("node-new"), HOUR, SystemTime::now())
            .unwrap();
        let issue = |grant: &Grant| Ok::<_, Refusal>(grant.node.to_string());
        let now = SystemTime::now();
        assert_eq!(
            store.check().unwrap(),
            1,
            "the old record went at the second create"
        );
        assert_eq!(
            store.redeem(&old.token, now, "a", issue).unwrap_err().code,
            RefusalCode::UnknownToken
        );
        store.redeem(&recent.token, now, "a", issue).unwrap();
        assert!(matches!(
            store.create(&grant("node-x"), Duration::ZERO, now),
            Err(EnrollError::Lifetime(_))
        ));
        let mut bad = grant("node-x");
        bad.dns = vec!["not a name".to_owned()];
        assert!(matches!(
            store.create(&bad, HOUR, now),
            Err(EnrollError::Pki(PkiError::DnsName { .. }))
        ));
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let (_dir, _authority, store) = ca_dir("tokens-lock");
        let made: Vec<Vec<JoinToken>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|worker| {
                    let store = store.clone();
                    scope.spawn(move || {
                        (0..8)
                            .map(|index| {
                                let name = format!("node-{worker}-{index}");
                                store
                                    .create(&grant(&name), HOUR, SystemTime::now())
                                    .unwrap()
                                    .token
                            })
                            .collect()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap())
                .collect()
        });
        assert_eq!(store.check().unwrap(), 32);
        // Each token is redeemed once even when two threads race for it.
        let tokens: Vec<JoinToken> = made.into_iter().flatten().collect();
        let wins: usize = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let store = store.clone();
                    let tokens = tokens.clone();
                    scope.spawn(move || {
                        tokens
                            .iter()
                            .filter(|token| {
                                store
                                    .redeem(token, SystemTime::now(), "racer", |_| Ok(()))
                                    .is_ok()
                            })
                            .count()
                    })
                })
                .collect();
            racers.into_iter().map(|racer| racer.join().unwrap()).sum()
        });
        assert_eq!(wins, 32);
    }

    #[test]
    fn a_damaged_token_file_is_an_error_not_an_empty_store() {
        let (_dir, _authority, store) = ca_dir("tokens-damaged");
        store
            .create(&grant("node-x"), HOUR, SystemTime::now())
            .unwrap();
        let mut options = std::fs::OpenOptions::new();
        options.append(true);
        use std::io::Write as _;
        writeln!(options.open(store.path()).unwrap(), "garbage").unwrap();
        assert!(matches!(store.check(), Err(EnrollError::TokensFile { .. })));
        let token = JoinToken::generate().unwrap();
        let refusal = store
            .redeem(&token, SystemTime::now(), "a", |_| Ok(()))
            .unwrap_err();
        assert_eq!(refusal.code, RefusalCode::ServerError);
        assert!(refusal.log_detail.unwrap().contains(TOKENS_FILE));
        assert!(
            !refusal.message.contains(TOKENS_FILE),
            "paths stay in the log"
        );
    }

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
        let parsed = crate::identity::parse_certificate(&der, "test").unwrap();
        parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(crate::identity::describe_name)
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

    fn body(token: &str, csr: &str) -> Vec<u8> {
        serde_json::to_vec(&EnrollRequest {
            version: PROTOCOL_VERSION,
            token: token.to_owned(),
            csr: csr.to_owned(),
            valid_for: None,
        })
        .unwrap()
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

    /// A node joined with a token valid for `valid_for`: its enroller and
    /// its credentials.
    fn joined(
        label: &str,
        valid_for: Option<Duration>,
    ) -> (TempDir, Enroller, Enrolled, CaFingerprint) {
        let (dir, authority, store) = ca_dir(label);
        let pinned = CaFingerprint::of_authority(&authority);
        let now = SystemTime::now();
        let mut granted = grant("node-x");
        granted.valid_for = valid_for;
        let token = store.create(&granted, HOUR, now).unwrap().token;
        let enroller = Enroller::new(authority, store, 30 * DAY);
        let key = JoinKey::generate(&node("node-x")).unwrap();
        let answer = enroller
            .handle(&body(&token.reveal(), key.csr_pem()), "a", now)
            .unwrap();
        let enrolled = key
            .accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
            .unwrap();
        (dir, enroller, enrolled, pinned)
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
            let answer = enroller.handle(&frame[4..], "a", now).unwrap();
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
        let refusal = enroller.handle(&frame[4..], "a", now).unwrap_err();
        assert_eq!(refusal.code, RefusalCode::BadRequest);
    }

    fn renewal_body(key: &JoinKey) -> Vec<u8> {
        let frame = key.renewal_request().unwrap();
        frame[4..].to_vec()
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
        let describe = |credentials: &NodeCredentials| {
            crate::inspect_pem(&pem_block("CERTIFICATE", &credentials.chain()[0]))
                .unwrap()
                .remove(0)
                .sans
        };
        assert_eq!(describe(new), describe(current));

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

    #[test]
    fn install_keeps_the_previous_pair_beside_the_new_one() {
        let (_dir, enroller, joined, pinned) = joined("install", None);
        let current = joined.credentials();
        let out = TempDir::new("install-out");
        std::fs::create_dir_all(out.path()).unwrap();
        let cert = out.path().join("node-x.crt");
        let key_path = out.path().join("node-x.key");
        let pem = |der: &CertificateDer<'_>| pem_block("CERTIFICATE", der);
        let old_cert = pem(&current.chain()[0]);
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
    fn frames_and_messages() {
        let frame = encode_frame(&EnrollResponse::Refused {
            error: "bad_request".to_owned(),
            message: "m".to_owned(),
        })
        .unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(
            decode_response(&frame[4..]).unwrap(),
            EnrollResponse::Refused {
                error: "bad_request".to_owned(),
                message: "m".to_owned()
            }
        );
        assert_eq!(
            String::from_utf8(frame[4..].to_vec()).unwrap(),
            r#"{"error":"bad_request","message":"m"}"#
        );
        let issued = encode_frame(&EnrollResponse::Issued {
            certificate: "c".to_owned(),
            ca: "a".to_owned(),
        })
        .unwrap();
        assert_eq!(&issued[4..], br#"{"certificate":"c","ca":"a"}"#);
        for prefix in [0u32, MAX_MESSAGE_LEN as u32 + 1, u32::MAX] {
            assert_eq!(
                frame_len(prefix.to_be_bytes()).unwrap_err().code,
                RefusalCode::BadRequest
            );
        }
        assert!(encode_frame(&"x".repeat(MAX_MESSAGE_LEN)).is_err());
        for code in RefusalCode::ALL {
            assert_eq!(RefusalCode::parse(code.as_str()), Some(code));
        }
        let request = EnrollRequest {
            version: 1,
            token: "mtjoin1.secret".to_owned(),
            csr: String::new(),
            valid_for: None,
        };
        assert!(!format!("{request:?}").contains("secret"));
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let authority = Authority::generate("prod", Validity::days_from_now(1)).unwrap();
        let fingerprint = CaFingerprint::of_authority(&authority);
        let text = fingerprint.to_string();
        assert_eq!(text, crate::x509::fingerprint(authority.cert_der()));
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
        let parsed = crate::identity::parse_certificate(&chain[0], "server").unwrap();
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
