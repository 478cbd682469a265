//! Join tokens and their store: a [`JoinToken`] is bound to one node name
//! and its SANs (a [`Grant`]) and recorded in `DIR/tokens.json`
//! ([`TokenStore`]). Only the SHA-256 of the token's 256-bit secret is
//! stored; the token itself is printed once.
//!
//! Token rules: the secret is compared in constant time against the stored
//! hash; a token is single use (marked used and persisted before the
//! certificate is sent); an expired token is refused.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshtun_pki::{format_unix, hex, unhex, unix_seconds_unsigned, NewFile, PkiError, KEY_MODE};
use meshtun_proto::NodeName;
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EnrollError, Refusal, RefusalCode};

/// The file in a CA directory that records join tokens (hashes only), 0600.
pub const TOKENS_FILE: &str = "tokens.json";

/// The lock file beside [`TOKENS_FILE`]; every change of the token file
/// holds an exclusive `flock` on it, so `pki token` and `pki serve` running
/// at once never lose each other's writes.
pub(crate) const TOKENS_LOCK_FILE: &str = "tokens.lock";

/// Records that expired (used or not) more than this long ago are dropped
/// from the token file at its next change. Until then a late attempt gets
/// `token_expired` or `token_used` instead of `unknown_token`.
pub(crate) const TOKEN_RECORD_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// First field of every join token: the format and its version.
const TOKEN_PREFIX: &str = "mtjoin1";
/// Bytes of a token's public id (looked up, logged).
const TOKEN_ID_LEN: usize = 8;
/// Bytes of a token's secret (256 bits; only its SHA-256 is stored).
const TOKEN_SECRET_LEN: usize = 32;
/// Version of the token file's layout.
const TOKENS_FILE_VERSION: u32 = 1;

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

    /// The SHA-256 of the secret in hex, as the token file stores it.
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
/// name and these SANs (as [`Authority::issue`](meshtun_pki::Authority::issue)
/// makes them).
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

    /// The CA directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
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
        meshtun_pki::lock_exclusive(&path).map_err(|source| EnrollError::Lock { path, source })
    }

    fn read(&self) -> Result<TokenBook, EnrollError> {
        let path = self.path();
        match meshtun_pki::read_private_text(&path) {
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
        meshtun_pki::write_files(&self.dir, &[file], true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ca_dir, grant, HOUR};
    use std::os::unix::fs::PermissionsExt;

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
}
