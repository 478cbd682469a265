//! Noticing new certificates without a signal, and saying when the current
//! one is about to expire.
//!
//! [`Watched`] polls the files a reload reads (the config, CA bundle, CRL,
//! certificate and key). Polling `stat` every few seconds is cheap, needs no
//! extra dependency, and sees every way a file can be replaced: cert-manager
//! and `meshtun pki` write a new file and rename it over the old one, which
//! changes the inode; an editor that writes in place changes the size or
//! mtime. A change is acted on once the files have stopped changing for one
//! poll, so a certificate and key replaced one after the other are reloaded
//! together.
//!
//! [`ExpiryWarnings`] turns "seconds until expiry" into at most one warning
//! per threshold (30, 7 and 1 days), not a line every hour.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshtun_config::Config;

/// How often the watched files are checked.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    device: u64,
    inode: u64,
    size: u64,
    modified_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        device: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// The files a reload would read, as last seen.
#[derive(Debug)]
pub(crate) struct Watched {
    files: Vec<(PathBuf, Option<Stamp>)>,
    /// Files that changed since the last reload; while not empty, a change
    /// was seen and the files have not been still for a poll yet.
    changed: Vec<PathBuf>,
    settling: bool,
}

impl Watched {
    /// Watches `config_path`, the TLS files `config` names and its cluster
    /// manifest.
    pub(crate) fn new(config_path: &Path, config: &Config) -> Self {
        let tls = &config.tls;
        let mut paths = vec![
            config_path.to_path_buf(),
            tls.ca.clone(),
            tls.cert.clone(),
            tls.key.clone(),
        ];
        paths.extend(tls.crl.clone());
        paths.extend(config.cluster.as_ref().map(|cluster| cluster.path.clone()));
        Self {
            files: paths
                .into_iter()
                .map(|path| {
                    let seen = stamp(&path);
                    (path, seen)
                })
                .collect(),
            changed: Vec::new(),
            settling: false,
        }
    }

    /// The same files as they are now. Taken before a reload reads them, it
    /// is what the reload saw at the latest: a file replaced while the
    /// reload reads it shows as changed afterwards and is reloaded again.
    pub(crate) fn snapshot(&self) -> Vec<(PathBuf, Option<Stamp>)> {
        self.files
            .iter()
            .map(|(path, _)| (path.clone(), stamp(path)))
            .collect()
    }

    /// Uses the stamps of `before` (a [`Watched::snapshot`] taken before
    /// the reload read the files) for the files it covers.
    pub(crate) fn seen_as(mut self, before: &[(PathBuf, Option<Stamp>)]) -> Self {
        for (path, seen) in &mut self.files {
            if let Some((_, earlier)) = before.iter().find(|(known, _)| known == path) {
                *seen = *earlier;
            }
        }
        self
    }

    /// Checks the files once. Returns the files that changed if a reload is
    /// due now: something changed since the last reload and nothing changed
    /// since the previous poll.
    pub(crate) fn poll(&mut self) -> Option<Vec<PathBuf>> {
        let mut changed_now = false;
        for (path, seen) in &mut self.files {
            let current = stamp(path);
            if current != *seen {
                *seen = current;
                changed_now = true;
                if !self.changed.contains(path) {
                    self.changed.push(path.clone());
                }
            }
        }
        if changed_now {
            self.settling = true;
            return None;
        }
        if self.settling {
            self.settling = false;
            return Some(std::mem::take(&mut self.changed));
        }
        None
    }
}

/// How long until a certificate expires, or since it did, in words:
/// "expires in 3 days", "expires in 5 hours", "expires in 40 minutes",
/// "expired 2 hours ago". `meshtun check` and `meshtun run` both say it
/// this way.
///
/// The count is in whole units, rounded down, so it never promises more
/// time than is left; a unit is used from two of it on ("expires in 47
/// hours", not "in 1 day"), so what is said is always more than two
/// thirds of the truth. `expires_in_seconds` of 0 or less means expired.
pub(crate) fn expiry_in_words(expires_in_seconds: i64) -> String {
    match expires_in_seconds {
        0 => "expired just now".to_owned(),
        left if left > 0 => format!("expires in {}", span(left.unsigned_abs())),
        ago => format!("expired {} ago", span(ago.unsigned_abs())),
    }
}

/// Seconds from `now` until `then`, negative once `then` has passed
/// (whole seconds, rounded toward zero; saturating).
pub(crate) fn seconds_until(then: SystemTime, now: SystemTime) -> i64 {
    match then.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(past) => i64::try_from(past.duration().as_secs()).map_or(i64::MIN, |ago| -ago),
    }
}

/// `seconds` as a whole number of the largest unit of which it holds at
/// least two (or seconds), singular or plural as the number needs.
fn span(seconds: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(86_400, "day"), (3_600, "hour"), (60, "minute")];
    let (size, unit) = UNITS
        .iter()
        .copied()
        .find(|(size, _)| seconds >= 2 * size)
        .unwrap_or((1, "second"));
    let count = seconds / size;
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} {unit}{plural}")
}

/// Days before expiry at which the daemon warns, largest first.
pub(crate) const EXPIRY_WARNING_DAYS: [i64; 3] = [30, 7, 1];

/// Remembers which expiry warnings were given for the current certificate.
#[derive(Debug, Default)]
pub(crate) struct ExpiryWarnings {
    fingerprint: String,
    /// The smallest threshold (in days) already warned about; 0 = expired.
    warned: Option<i64>,
}

impl ExpiryWarnings {
    /// The threshold crossed since the last warning, if any: `Some(days)`
    /// for "expires within `days`", `Some(0)` for "has expired". A new
    /// certificate (another fingerprint) starts afresh.
    pub(crate) fn due(&mut self, fingerprint: &str, expires_in_seconds: i64) -> Option<i64> {
        if fingerprint != self.fingerprint {
            self.fingerprint = fingerprint.to_owned();
            self.warned = None;
        }
        let crossed = if expires_in_seconds <= 0 {
            Some(0)
        } else {
            EXPIRY_WARNING_DAYS
                .iter()
                .copied()
                .filter(|days| expires_in_seconds <= days * 86_400)
                .min()
        }?;
        if self.warned.is_some_and(|warned| warned <= crossed) {
            return None;
        }
        self.warned = Some(crossed);
        Some(crossed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn expiry_is_said_in_the_largest_honest_unit() {
        const HOUR: i64 = 3_600;
        assert_eq!(expiry_in_words(3 * DAY + 5 * HOUR), "expires in 3 days");
        assert_eq!(expiry_in_words(2 * DAY), "expires in 2 days");
        // Under two days, hours: "1 day" would hide most of a day.
        assert_eq!(expiry_in_words(2 * DAY - 1), "expires in 47 hours");
        assert_eq!(expiry_in_words(DAY), "expires in 24 hours");
        assert_eq!(expiry_in_words(5 * HOUR + 59 * 60), "expires in 5 hours");
        assert_eq!(expiry_in_words(40 * 60 + 30), "expires in 40 minutes");
        assert_eq!(expiry_in_words(90), "expires in 90 seconds");
        assert_eq!(expiry_in_words(1), "expires in 1 second");
        assert_eq!(expiry_in_words(0), "expired just now");
        assert_eq!(expiry_in_words(-1), "expired 1 second ago");
        assert_eq!(expiry_in_words(-2 * HOUR - 10), "expired 2 hours ago");
        assert_eq!(expiry_in_words(-400 * DAY), "expired 400 days ago");
        assert_eq!(
            expiry_in_words(i64::MIN),
            format!("expired {} days ago", i64::MIN.unsigned_abs() / 86_400)
        );
        // What `check` said as "0 day(s)" and `run` as "within 1 days".
        assert_eq!(expiry_in_words(DAY / 2), "expires in 12 hours");
    }

    #[test]
    fn seconds_until_is_negative_once_passed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = now + Duration::from_millis(90_500);
        assert_eq!(seconds_until(later, now), 90);
        assert_eq!(seconds_until(now, later), -90);
        assert_eq!(seconds_until(now, now), 0);
    }

    #[test]
    fn each_threshold_warns_once() {
        let mut warnings = ExpiryWarnings::default();
        assert_eq!(warnings.due("a", 90 * DAY), None);
        assert_eq!(warnings.due("a", 29 * DAY), Some(30));
        assert_eq!(warnings.due("a", 28 * DAY), None);
        assert_eq!(warnings.due("a", 6 * DAY), Some(7));
        assert_eq!(warnings.due("a", 5 * DAY), None);
        assert_eq!(warnings.due("a", DAY / 2), Some(1));
        assert_eq!(warnings.due("a", DAY / 4), None);
        assert_eq!(warnings.due("a", 0), Some(0));
        assert_eq!(warnings.due("a", -DAY), None);
    }

    #[test]
    fn a_late_start_warns_only_for_the_nearest_threshold() {
        let mut warnings = ExpiryWarnings::default();
        assert_eq!(warnings.due("a", 3 * DAY), Some(7));
        assert_eq!(warnings.due("a", 2 * DAY), None);
    }

    #[test]
    fn a_renewed_certificate_starts_afresh() {
        let mut warnings = ExpiryWarnings::default();
        assert_eq!(warnings.due("old", 6 * DAY), Some(7));
        assert_eq!(warnings.due("new", 365 * DAY), None);
        assert_eq!(warnings.due("new", 20 * DAY), Some(30));
    }

    #[test]
    fn a_replaced_file_is_reloaded_once_it_settles() {
        let dir = std::env::temp_dir().join(format!("meshtun-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("node.crt");
        std::fs::write(&file, "one").unwrap();
        let other = dir.join("node.key");
        std::fs::write(&other, "key").unwrap();
        let mut watched = Watched {
            files: vec![(file.clone(), stamp(&file)), (other.clone(), stamp(&other))],
            changed: Vec::new(),
            settling: false,
        };
        assert_eq!(watched.poll(), None, "nothing changed");
        // Replaced by rename, as `meshtun pki` and cert-manager do.
        let next = dir.join("node.crt.new");
        std::fs::write(&next, "two").unwrap();
        std::fs::rename(&next, &file).unwrap();
        assert_eq!(watched.poll(), None, "changed: wait one poll to settle");
        assert_eq!(
            watched.poll(),
            Some(vec![file.clone()]),
            "settled: reload, naming only the changed file"
        );
        assert_eq!(watched.poll(), None, "reloaded once");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(watched.poll(), None);
        assert_eq!(
            watched.poll(),
            Some(vec![file]),
            "a removed file is a change too"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
