//! The only place this crate touches the file system: bounded reads, the
//! private-key permission check, and writes that never widen a key's mode.
//!
//! Keys are created with mode 0600 from the first byte on (`O_CREAT` with the
//! mode), never created wider and narrowed afterwards. Replacing a file with
//! `force` goes through a fresh temporary file renamed over the old one, so an
//! old 0644 file cannot lend its mode to a new key and a crash leaves either
//! the old or the new content, not half of each.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::PkiError;

/// Largest file read, in bytes. Far above any certificate bundle or CRL a
/// cluster uses; it only stops `/dev/zero` or a wrong path from eating memory.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Permission bits that must be clear on a private key file.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Mode of certificate files (public material).
pub const CERT_MODE: u32 = 0o644;

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;

/// Mode of a directory this crate creates.
const DIR_MODE: u32 = 0o700;

/// Reads a whole file (at most [`MAX_FILE_LEN`] bytes).
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, PkiError> {
    let file = File::open(path).map_err(|source| read_error(path, source))?;
    read_bounded(file, path)
}

/// A certificate file and its private key file, read, with their paths as
/// error origins.
pub(crate) struct PemPair {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) cert_origin: String,
    pub(crate) key_origin: String,
}

/// Reads a certificate and its key, refusing a key file that its group or
/// others may read.
pub(crate) fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, PkiError> {
    Ok(PemPair {
        cert_pem: read_text(cert)?,
        key_pem: read_private_text(key)?,
        cert_origin: cert.display().to_string(),
        key_origin: key.display().to_string(),
    })
}

/// Reads a whole file (at most 16 MiB) as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String, PkiError> {
    into_text(read_bytes(path)?, path)
}

/// Reads a private key file as text after checking, on the opened file
/// itself (no race with a `chmod` in between), that neither group nor others
/// may read it.
pub fn read_private_text(path: &Path) -> Result<String, PkiError> {
    let file = File::open(path).map_err(|source| read_error(path, source))?;
    let metadata = file.metadata().map_err(|source| read_error(path, source))?;
    check_key_mode(path, metadata.permissions().mode())?;
    into_text(read_bounded(file, path)?, path)
}

/// `Some(message)` when the key file at `path` can be read or written by
/// its group or by others; the message names the mode and the fix.
///
/// For `meshtun check`, which reports every problem instead of stopping at the
/// first; the loaders refuse such a file with [`PkiError::KeyPermissions`].
pub fn key_file_mode_problem(path: &Path) -> Result<Option<String>, PkiError> {
    let metadata = fs::metadata(path).map_err(|source| read_error(path, source))?;
    Ok(check_key_mode(path, metadata.permissions().mode())
        .err()
        .map(|error| error.to_string()))
}

fn check_key_mode(path: &Path, mode: u32) -> Result<(), PkiError> {
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(PkiError::KeyPermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

fn read_bounded(file: File, path: &Path) -> Result<Vec<u8>, PkiError> {
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| read_error(path, source))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(read_error(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_FILE_LEN} bytes; not a certificate, key or CRL file"),
            ),
        ));
    }
    Ok(bytes)
}

fn into_text(bytes: Vec<u8>, path: &Path) -> Result<String, PkiError> {
    String::from_utf8(bytes).map_err(|error| {
        read_error(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not text (invalid UTF-8 at byte {}); expected PEM",
                    error.utf8_error().valid_up_to()
                ),
            ),
        )
    })
}

fn read_error(path: &Path, source: io::Error) -> PkiError {
    PkiError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_error(path: &Path, source: io::Error) -> PkiError {
    PkiError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes an exclusive advisory lock (flock) on `path`, creating it (0600)
/// if needed; held until the returned handle drops. Every process that
/// changes a shared file of a CA directory takes it first.
pub fn lock_exclusive(path: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(KEY_MODE)
        .open(path)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))
}

/// One file to write: where, what, and with which mode.
#[derive(Debug)]
pub struct NewFile<'a> {
    /// Where.
    pub path: PathBuf,
    /// What.
    pub contents: &'a str,
    /// Its mode from creation on ([`CERT_MODE`], [`KEY_MODE`]).
    pub mode: u32,
}

/// Creates `dir` (mode 0700 if it is new) and writes `files` into it.
///
/// Without `force`, every target is checked first, so an existing key does
/// not leave a new certificate beside it; each file is then created with
/// `O_EXCL`, so a file appearing in between is not overwritten either.
pub fn write_files(dir: &Path, files: &[NewFile<'_>], force: bool) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| write_error(dir, source))?;
    if !force {
        if let Some(existing) = files
            .iter()
            .find(|file| file.path.symlink_metadata().is_ok())
        {
            return Err(PkiError::Exists {
                path: existing.path.clone(),
            });
        }
    }
    for file in files {
        if force {
            replace_file(file)?;
        } else {
            create_file(file)?;
        }
    }
    Ok(())
}

/// Creates a file that must not exist yet; removes it again if writing fails.
fn create_file(file: &NewFile<'_>) -> Result<(), PkiError> {
    let path = &file.path;
    let mut handle = open_new(path, file.mode).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists { path: path.clone() }
        } else {
            write_error(path, source)
        }
    })?;
    if let Err(source) = fill(&mut handle, file.contents) {
        // Best effort: the write error is what the caller needs to see.
        let _ = fs::remove_file(path);
        return Err(write_error(path, source));
    }
    Ok(())
}

/// Writes a temporary file beside the target and renames it over the target.
fn replace_file(file: &NewFile<'_>) -> Result<(), PkiError> {
    let path = &file.path;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    // A leftover from a crashed run of this same process id is stale.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(write_error(&temporary, source)),
    }
    let result = open_new(&temporary, file.mode)
        .and_then(|mut handle| fill(&mut handle, file.contents))
        .map_err(|source| write_error(&temporary, source))
        .and_then(|()| fs::rename(&temporary, path).map_err(|source| write_error(path, source)));
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

fn open_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

fn fill(handle: &mut File, contents: &str) -> io::Result<()> {
    handle.write_all(contents.as_bytes())?;
    handle.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_test_support::TempDir;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn writes_with_modes_and_refuses_to_overwrite() {
        let dir = TempDir::new("files");
        let target = dir.path().join("nested");
        let key = target.join("x.key");
        let files = [NewFile {
            path: key.clone(),
            contents: "first",
            mode: KEY_MODE,
        }];
        write_files(&target, &files, false).unwrap();
        assert_eq!(mode_of(&target), 0o700);
        assert_eq!(mode_of(&key), 0o600);

        let again = [NewFile {
            path: key.clone(),
            contents: "second",
            mode: KEY_MODE,
        }];
        let error = write_files(&target, &again, false).unwrap_err();
        assert!(matches!(&error, PkiError::Exists { path } if *path == key));
        assert!(error.to_string().contains("--force"), "{error}");
        assert_eq!(fs::read_to_string(&key).unwrap(), "first");

        // With force, even an old world-readable file is replaced by a 0600 one.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        write_files(&target, &again, true).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "second");
        assert_eq!(mode_of(&key), 0o600);
        let leftovers: Vec<_> = fs::read_dir(&target).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn existing_second_file_stops_before_the_first_is_written() {
        let dir = TempDir::new("pair");
        fs::create_dir_all(dir.path()).unwrap();
        let cert = dir.path().join("n.crt");
        let key = dir.path().join("n.key");
        fs::write(&key, "old").unwrap();
        let files = [
            NewFile {
                path: cert.clone(),
                contents: "cert",
                mode: CERT_MODE,
            },
            NewFile {
                path: key.clone(),
                contents: "key",
                mode: KEY_MODE,
            },
        ];
        let error = write_files(dir.path(), &files, false).unwrap_err();
        assert!(matches!(error, PkiError::Exists { path } if path == key));
        assert!(!cert.exists());
    }

    #[test]
    fn key_mode_problem_names_mode_and_fix() {
        let dir = TempDir::new("mode");
        fs::create_dir_all(dir.path()).unwrap();
        let key = dir.path().join("k.key");
        fs::write(&key, "secret").unwrap();

        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let message = key_file_mode_problem(&key).unwrap().unwrap();
        assert!(message.contains("0640"), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
        assert!(matches!(
            read_private_text(&key),
            Err(PkiError::KeyPermissions { mode: 0o640, .. })
        ));

        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(key_file_mode_problem(&key).unwrap(), None);
        assert_eq!(read_private_text(&key).unwrap(), "secret");

        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(key_file_mode_problem(&key).unwrap(), None);

        let missing = dir.path().join("missing.key");
        assert!(matches!(
            key_file_mode_problem(&missing),
            Err(PkiError::Read { .. })
        ));
    }

    #[test]
    fn reads_are_bounded_and_text_is_checked() {
        let dir = TempDir::new("read");
        fs::create_dir_all(dir.path()).unwrap();
        let binary = dir.path().join("bin.pem");
        fs::write(&binary, b"\xff\xfe").unwrap();
        let error = read_text(&binary).unwrap_err().to_string();
        assert!(
            error.contains("bin.pem") && error.contains("UTF-8"),
            "{error}"
        );

        let big = dir.path().join("big.pem");
        let file = File::create(&big).unwrap();
        file.set_len(MAX_FILE_LEN + 1).unwrap();
        assert!(matches!(read_bytes(&big), Err(PkiError::Read { .. })));
    }
}
