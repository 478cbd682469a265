//! The issuance ledger: `DIR/issued.json` in a CA directory holds one record
//! per certificate the CA signed (by `pki issue`, `pki renew`, `meshtun
//! join` or a node's own renewal), so that every certificate of a node can
//! be revoked at once (`pki revoke --node`) and a renewal can be refused for
//! a certificate the CA does not know.
//!
//! A record is written *before* its certificate leaves the CA (is written
//! to a file or sent): a certificate out in the world always has a record,
//! while a failure after the record leaves at most a record of a certificate
//! nobody holds, which costs nothing. Every change reads, changes and
//! rewrites the whole file under an advisory lock (`DIR/issued.lock`) and
//! renames a temporary file over it, so two commands at once never lose
//! each other's records and a reader never sees half a file. Records of
//! certificates expired more than [`EXPIRED_RECORD_KEPT`] ago are dropped.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::Flock;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::files::{self, NewFile, KEY_MODE};
use crate::identity::{describe_name, identity_of_parsed, parse_certificate, Serial};
use crate::load::first_certificate;
use crate::x509::{hex, unix_seconds_unsigned};
use crate::PkiError;

/// The ledger's file in a CA directory.
pub const LEDGER_FILE: &str = "issued.json";

/// The lock file taken around every change of [`LEDGER_FILE`].
pub const LEDGER_LOCK_FILE: &str = "issued.lock";

/// How long a record is kept after its certificate expired: long enough to
/// answer "who held serial X last week", short enough that a cluster of
/// hour-long certificates does not grow the file without end (a record of
/// an expired certificate no longer matters for revocation).
pub const EXPIRED_RECORD_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

const LEDGER_VERSION: u32 = 1;

/// How a certificate came to be issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Issuance {
    /// `meshtun pki issue`, on the CA host.
    Issue,
    /// `meshtun pki renew`, on the CA host.
    Renew,
    /// `meshtun join`, with a join token.
    Join,
    /// A node's own renewal over mTLS (`meshtun renew`, or the daemon).
    SelfRenew,
}

impl Issuance {
    /// The name the ledger and `pki list` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Renew => "renew",
            Self::Join => "join",
            Self::SelfRenew => "self-renew",
        }
    }
}

impl fmt::Display for Issuance {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedRecord {
    /// Its serial number, as `meshtun pki inspect` prints it.
    pub serial: String,
    /// The node it names.
    pub node: String,
    /// Its subject alternative names (`URI:…`, `DNS:…`, `IP:…`).
    pub names: Vec<String>,
    /// Start of validity, Unix seconds.
    pub not_before: u64,
    /// End of validity, Unix seconds.
    pub not_after: u64,
    /// SHA-256 of its SubjectPublicKeyInfo, lowercase hex: which key it
    /// certifies.
    pub public_key_sha256: String,
    /// When the CA signed it, Unix seconds.
    pub issued_at: u64,
    /// How it was asked for.
    pub how: Issuance,
    /// The serial of the certificate it renewed, if it was a renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl IssuedRecord {
    /// The record of the certificate in `cert_pem`, signed at `now`.
    pub fn of_pem(
        cert_pem: &str,
        how: Issuance,
        replaces: Option<&Serial>,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        let der = first_certificate(cert_pem, "issued certificate")?;
        Self::of_der(&der, how, replaces, now)
    }

    /// The record of the certificate `der`, signed at `now`.
    pub fn of_der(
        der: &CertificateDer<'_>,
        how: Issuance,
        replaces: Option<&Serial>,
        now: SystemTime,
    ) -> Result<Self, PkiError> {
        let origin = "issued certificate";
        let parsed = parse_certificate(der, origin)?;
        let node = identity_of_parsed(&parsed).map_err(|detail| PkiError::Identity {
            origin: origin.to_string(),
            detail,
        })?;
        let names = match parsed.subject_alternative_name() {
            Ok(Some(extension)) => extension
                .value
                .general_names
                .iter()
                .map(describe_name)
                .collect(),
            _ => Vec::new(),
        };
        let validity = parsed.validity();
        Ok(Self {
            serial: Serial::of_parsed(&parsed, origin)?.to_string(),
            node: node.to_string(),
            names,
            not_before: u64::try_from(validity.not_before.timestamp()).unwrap_or(0),
            not_after: u64::try_from(validity.not_after.timestamp()).unwrap_or(0),
            public_key_sha256: hex(&Sha256::digest(parsed.public_key().raw)),
            issued_at: unix_seconds_unsigned(now),
            how,
            replaces: replaces.map(ToString::to_string),
        })
    }

    /// Its serial number, parsed.
    pub fn serial(&self) -> Result<Serial, PkiError> {
        self.serial.parse()
    }

    /// Whether it is past its `not_after` at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        unix_seconds_unsigned(now) > self.not_after
    }

    /// End of validity.
    pub fn not_after_time(&self) -> SystemTime {
        at_unix(self.not_after)
    }

    /// When the CA signed it.
    pub fn issued_at_time(&self) -> SystemTime {
        at_unix(self.issued_at)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerDocument {
    version: u32,
    certificates: Vec<IssuedRecord>,
}

/// `DIR/issued.json` of a CA directory.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    /// The ledger of the CA directory `dir` (nothing is read yet).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// `DIR/issued.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(LEDGER_FILE)
    }

    /// Adds `record`, dropping records expired more than
    /// [`EXPIRED_RECORD_KEPT`] before `now`. A record with the serial of one
    /// already there is refused: serials are random and 126 bits long, so a
    /// repeat means something is badly wrong.
    pub fn record(&self, record: IssuedRecord, now: SystemTime) -> Result<(), PkiError> {
        self.locked()?.record(record, now)
    }

    /// The ledger under its lock, for a decision and a change that must
    /// see no other change in between (a renewal's checks and its record;
    /// `revoke --node`'s read and its CRL). Held until dropped.
    pub fn locked(&self) -> Result<LockedLedger<'_>, PkiError> {
        Ok(LockedLedger {
            _lock: self.lock()?,
            ledger: self,
        })
    }

    /// Every record, oldest first; none if the file does not exist yet.
    pub fn records(&self) -> Result<Vec<IssuedRecord>, PkiError> {
        self.read()
    }

    /// The record of `serial`, if any.
    pub fn find(&self, serial: &Serial) -> Result<Option<IssuedRecord>, PkiError> {
        let wanted = serial.to_string();
        Ok(self
            .read()?
            .into_iter()
            .find(|record| record.serial == wanted))
    }

    /// The records of `node`'s certificates that are unexpired at `now`.
    pub fn unexpired_of(&self, node: &str, now: SystemTime) -> Result<Vec<IssuedRecord>, PkiError> {
        Ok(self
            .read()?
            .into_iter()
            .filter(|record| record.node == node && !record.expired_at(now))
            .collect())
    }

    fn read(&self) -> Result<Vec<IssuedRecord>, PkiError> {
        let path = self.path();
        let text = match files::read_text(&path) {
            Ok(text) => text,
            Err(PkiError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(Vec::new())
            }
            Err(error) => return Err(error),
        };
        let document: LedgerDocument = serde_json::from_str(&text)
            .map_err(|error| self.error(format!("not a meshtun issuance ledger: {error}")))?;
        if document.version != LEDGER_VERSION {
            return Err(self.error(format!(
                "version {} (this meshtun reads version {LEDGER_VERSION})",
                document.version
            )));
        }
        Ok(document.certificates)
    }

    fn write(&self, certificates: Vec<IssuedRecord>) -> Result<(), PkiError> {
        let document = LedgerDocument {
            version: LEDGER_VERSION,
            certificates,
        };
        let mut text = serde_json::to_string_pretty(&document)
            .map_err(|error| self.error(format!("cannot serialize: {error}")))?;
        text.push('\n');
        let file = NewFile {
            path: self.path(),
            contents: &text,
            mode: KEY_MODE,
        };
        files::write_files(&self.dir, &[file], true)
    }

    fn lock(&self) -> Result<Flock<std::fs::File>, PkiError> {
        let path = self.dir.join(LEDGER_LOCK_FILE);
        files::lock_exclusive(&path).map_err(|source| PkiError::Write { path, source })
    }

    fn error(&self, detail: String) -> PkiError {
        PkiError::Ledger {
            path: self.path(),
            detail,
        }
    }
}

/// The ledger with its lock held (see [`Ledger::locked`]).
#[derive(Debug)]
pub struct LockedLedger<'a> {
    ledger: &'a Ledger,
    _lock: Flock<std::fs::File>,
}

impl LockedLedger<'_> {
    /// Every record, oldest first.
    pub fn records(&self) -> Result<Vec<IssuedRecord>, PkiError> {
        self.ledger.read()
    }

    /// Adds `record` (see [`Ledger::record`]).
    pub fn record(&self, record: IssuedRecord, now: SystemTime) -> Result<(), PkiError> {
        let mut records = self.ledger.read()?;
        if records.iter().any(|known| known.serial == record.serial) {
            return Err(self.ledger.error(format!(
                "serial {} is recorded already; refusing to record it twice",
                record.serial
            )));
        }
        let kept = EXPIRED_RECORD_KEPT.as_secs();
        let now = unix_seconds_unsigned(now);
        records.retain(|known| known.not_after.saturating_add(kept) > now);
        records.push(record);
        self.ledger.write(records)
    }
}

/// `seconds` after the epoch, or the latest time this system can hold (a
/// damaged ledger must not make a command panic).
fn at_unix(seconds: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .or_else(|| UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64 / 2)))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{Authority, Validity};
    use meshtun_proto::NodeName;
    use meshtun_test_support::TempDir;

    fn issue(authority: &Authority, node: &str, days: u32) -> String {
        let node = NodeName::new(node).expect("node name");
        authority
            .issue(
                &node,
                &["198.18.0.1".parse().expect("ip")],
                &[],
                Validity::days_from_now(days),
            )
            .expect("issue")
            .cert_pem
    }

    #[test]
    fn a_record_names_the_certificate_its_key_and_how() {
        let authority = Authority::generate("lab", Validity::days_from_now(30)).expect("ca");
        let pem = issue(&authority, "node-1", 5);
        let der = first_certificate(&pem, "test").expect("der");
        let now = SystemTime::now();
        let record = IssuedRecord::of_pem(&pem, Issuance::Join, None, now).expect("record");
        assert_eq!(record.node, "node-1");
        assert_eq!(
            record.serial,
            Serial::of_certificate(&der).expect("serial").to_string()
        );
        assert_eq!(
            record.names,
            [
                "URI:spiffe://lab/node/node-1",
                "DNS:node-1",
                "IP:198.18.0.1"
            ]
        );
        assert_eq!(record.public_key_sha256.len(), 64);
        assert_eq!(record.how, Issuance::Join);
        assert!(record.not_after > record.not_before);
        assert!(!record.expired_at(now));
        assert!(record.expired_at(record.not_after_time() + Duration::from_secs(1)));
    }

    #[test]
    fn records_persist_and_find_by_serial_and_node() {
        let dir = TempDir::new("ledger-find");
        std::fs::create_dir_all(dir.path()).expect("dir");
        let ledger = Ledger::new(dir.path());
        assert!(ledger.records().expect("empty").is_empty());
        let authority = Authority::generate("lab", Validity::days_from_now(30)).expect("ca");
        let now = SystemTime::now();
        let first =
            IssuedRecord::of_pem(&issue(&authority, "node-1", 5), Issuance::Issue, None, now)
                .expect("record");
        let other =
            IssuedRecord::of_pem(&issue(&authority, "node-2", 5), Issuance::Issue, None, now)
                .expect("record");
        let renewed = IssuedRecord::of_pem(
            &issue(&authority, "node-1", 5),
            Issuance::Renew,
            Some(&first.serial().expect("serial")),
            now,
        )
        .expect("record");
        for record in [&first, &other, &renewed] {
            ledger.record(record.clone(), now).expect("record");
        }
        let again = Ledger::new(dir.path());
        assert_eq!(
            again.records().expect("read"),
            [first.clone(), other, renewed.clone()]
        );
        assert_eq!(
            again.find(&first.serial().expect("serial")).expect("find"),
            Some(first.clone())
        );
        assert_eq!(
            again.unexpired_of("node-1", now).expect("of node"),
            [first.clone(), renewed.clone()]
        );
        assert_eq!(renewed.replaces.as_deref(), Some(first.serial.as_str()));
        // Past their end, they are no longer "unexpired".
        let later = first.not_after_time() + Duration::from_secs(10);
        assert!(again
            .unexpired_of("node-1", later)
            .expect("of node")
            .is_empty());
        assert!(matches!(
            again.record(first, now),
            Err(PkiError::Ledger { .. })
        ));
    }

    #[test]
    fn long_expired_records_are_dropped_on_the_next_change() {
        let dir = TempDir::new("ledger-prune");
        std::fs::create_dir_all(dir.path()).expect("dir");
        let ledger = Ledger::new(dir.path());
        let authority = Authority::generate("lab", Validity::days_from_now(30)).expect("ca");
        let now = SystemTime::now();
        let old = IssuedRecord::of_pem(&issue(&authority, "node-1", 1), Issuance::Issue, None, now)
            .expect("record");
        ledger.record(old.clone(), now).expect("record");
        let much_later = old.not_after_time() + EXPIRED_RECORD_KEPT + Duration::from_secs(1);
        let new = IssuedRecord::of_pem(&issue(&authority, "node-2", 1), Issuance::Issue, None, now)
            .expect("record");
        ledger.record(new.clone(), much_later).expect("record");
        assert_eq!(ledger.records().expect("read"), [new]);
    }

    #[test]
    fn a_damaged_ledger_is_refused_with_its_path() {
        let dir = TempDir::new("ledger-damaged");
        std::fs::create_dir_all(dir.path()).expect("dir");
        std::fs::write(dir.path().join(LEDGER_FILE), "{not json").expect("write");
        let error = Ledger::new(dir.path()).records().expect_err("damaged");
        let message = error.to_string();
        assert!(message.contains(LEDGER_FILE), "{message}");
        assert!(
            message.contains("not a meshtun issuance ledger"),
            "{message}"
        );
    }

    #[test]
    fn concurrent_writers_lose_no_record() {
        let dir = TempDir::new("ledger-concurrent");
        std::fs::create_dir_all(dir.path()).expect("dir");
        let authority = Authority::generate("lab", Validity::days_from_now(30)).expect("ca");
        let now = SystemTime::now();
        let records: Vec<IssuedRecord> = (0..16)
            .map(|index| {
                IssuedRecord::of_pem(
                    &issue(&authority, &format!("node-{index}"), 5),
                    Issuance::Issue,
                    None,
                    now,
                )
                .expect("record")
            })
            .collect();
        std::thread::scope(|scope| {
            for record in &records {
                let dir = dir.path().to_path_buf();
                scope.spawn(move || {
                    Ledger::new(&dir)
                        .record(record.clone(), now)
                        .expect("record")
                });
            }
        });
        let mut written: Vec<String> = Ledger::new(dir.path())
            .records()
            .expect("read")
            .into_iter()
            .map(|record| record.serial)
            .collect();
        written.sort();
        let mut expected: Vec<String> = records.into_iter().map(|record| record.serial).collect();
        expected.sort();
        assert_eq!(written, expected);
    }
}
