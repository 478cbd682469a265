//! Enrollment (meshtun-enroll): the frames `meshtun pki serve` reads from a
//! joining node, and the answers `meshtun join` reads back.
//!
//! The server side runs the real [`Enroller::handle`] with a throwaway CA
//! and a token store in a scratch directory, made once per process, that
//! holds one known token ([`ENROLL_TOKEN`], for node [`ENROLL_NODE`]) so
//! that seeds can reach CSR checking and signing. The token file is written
//! afresh after every certificate issued, so the token is never used up.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshtun_enroll::{
    decode_response, encode_frame, frame_len, CaFingerprint, EnrollError, EnrollResponse, Enroller,
    JoinKey, RefusalCode, TokenStore, MAX_MESSAGE_LEN, TOKENS_FILE,
};
use meshtun_pki::{inspect_pem, Authority, Issuance, IssuedRecord, Ledger, Validity};
use meshtun_proto::NodeName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::check;

/// The cluster of the throwaway CA.
pub const ENROLL_CLUSTER: &str = "fuzz";
/// The node the known token is for.
pub const ENROLL_NODE: &str = "node-7";
/// The known join token the harness's token store holds.
pub const ENROLL_TOKEN: &str =
    "mtjoin1.0123456789abcdef.5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
const TOKEN_ID: &str = "0123456789abcdef";
const TOKEN_SECRET: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
/// The extra names the token grants.
const GRANT_IP: &str = "198.18.0.7";
const GRANT_DNS: &str = "node-7.fuzz.example";
/// The client address the server sees.
const SOURCE: &str = "198.18.0.9:50000";

/// An enrollment frame: 4-byte big-endian length, then a JSON body.
///
/// - `frame_len` accepts exactly the lengths 1..=[`MAX_MESSAGE_LEN`], and
///   refuses the others as a bad request;
/// - the server's `Enroller::renew` on the body, from a node presenting a
///   recorded certificate, never panics, renews only for that node with
///   exactly that certificate's names, and refuses only as a client's fault;
/// - the server's `Enroller::handle` on the body (all bytes after the
///   prefix, whatever it announced) never panics; it answers with a
///   certificate only for the known token, for node [`ENROLL_NODE`] and with
///   only the names the token grants; it refuses only as a client's fault
///   (never `server_error`: the store and CA work), and no refusal quotes
///   the token's secret;
/// - the client's `decode_response` on the same body never panics; what it
///   decodes re-encodes and decodes to the same answer; `JoinKey::accept`
///   of it never panics, passes a refusal on as it was sent, and never
///   accepts a certificate that is not for the joining key.
pub fn enrollment(data: &[u8]) {
    let Some((prefix, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    check_frame_len(*prefix);
    server(body);
    client(body);
}

fn check_frame_len(prefix: [u8; 4]) {
    let announced = u32::from_be_bytes(prefix) as usize;
    match frame_len(prefix) {
        Ok(len) => check!(
            len == announced && (1..=MAX_MESSAGE_LEN).contains(&len),
            "frame_len({prefix:02x?}) = {len}"
        ),
        Err(refusal) => check!(
            (announced == 0 || announced > MAX_MESSAGE_LEN)
                && refusal.code == RefusalCode::BadRequest,
            "frame_len({prefix:02x?}) refuses {refusal:?}"
        ),
    }
}

fn server(body: &[u8]) {
    let server = match SERVER.get_or_init(|| Server::start().map(Mutex::new)) {
        Ok(server) => server.lock().unwrap_or_else(PoisonError::into_inner),
        Err(error) => crate::violated(format_args!("cannot set up the enrollment server: {error}")),
    };
    renewal(&server, body);
    let result = server.enroller.handle(body, SOURCE, server.now);
    match result {
        Ok(granted) => {
            // The token is used now: put it back for the next input first.
            let reset = server.write_tokens();
            check!(reset.is_ok(), "cannot rewrite the token file: {reset:?}");
            check!(
                granted.node.as_str() == ENROLL_NODE
                    && granted.token_id.as_deref() == Some(TOKEN_ID),
                "{body:02x?}: granted {} with token {:?}",
                granted.node,
                granted.token_id
            );
            let inspected = inspect_pem(&granted.certificate_pem);
            let Ok([inspection]) = inspected.as_deref() else {
                crate::violated(format_args!(
                    "{body:02x?}: the issued certificate does not inspect: {inspected:?}"
                ))
            };
            let allowed = [
                format!("URI:spiffe://{ENROLL_CLUSTER}/node/{ENROLL_NODE}"),
                format!("DNS:{ENROLL_NODE}"),
                format!("DNS:{GRANT_DNS}"),
                format!("IP:{GRANT_IP}"),
            ];
            check!(
                inspection.identity.as_ref().map(NodeName::as_str) == Some(ENROLL_NODE)
                    && !inspection.is_ca
                    && inspection.sans.iter().all(|san| allowed.contains(san)),
                "{body:02x?}: issued {inspection:?}"
            );
        }
        Err(refusal) => {
            check!(
                matches!(
                    refusal.code,
                    RefusalCode::BadRequest | RefusalCode::UnknownToken | RefusalCode::WrongName
                ),
                "{body:02x?}: refused {refusal:?}"
            );
            let shown = format!(
                "{refusal} {} {}",
                refusal.message,
                refusal.log_detail.as_deref().unwrap_or_default()
            )
            .to_ascii_lowercase();
            check!(
                !shown.contains(TOKEN_SECRET),
                "{body:02x?}: the refusal quotes the token secret: {refusal:?}"
            );
            if let Some(id) = &refusal.token_id {
                check!(
                    id.len() == 16 && id.bytes().all(|byte| byte.is_ascii_hexdigit()),
                    "{body:02x?}: refusal names token id {id:?}"
                );
            }
        }
    }
}

/// `Enroller::renew` on the body, from a node presenting a recorded
/// certificate: it never panics, issues only for [`ENROLL_NODE`] with that
/// certificate's names, and refuses only as a client's fault.
fn renewal(server: &Server, body: &[u8]) {
    match server
        .enroller
        .renew(body, Some(&server.current), server.now)
    {
        Ok(granted) => {
            let inspected = inspect_pem(&granted.certificate_pem);
            let Ok([inspection]) = inspected.as_deref() else {
                crate::violated(format_args!(
                    "{body:02x?}: the renewed certificate does not inspect: {inspected:?}"
                ))
            };
            let expected = [
                format!("URI:spiffe://{ENROLL_CLUSTER}/node/{ENROLL_NODE}"),
                format!("DNS:{ENROLL_NODE}"),
                format!("DNS:{GRANT_DNS}"),
                format!("IP:{GRANT_IP}"),
            ];
            check!(
                granted.token_id.is_none()
                    && inspection.identity.as_ref().map(NodeName::as_str) == Some(ENROLL_NODE)
                    && !inspection.is_ca
                    && inspection.sans == expected,
                "{body:02x?}: renewed as {inspection:?}"
            );
        }
        Err(refusal) => check!(
            matches!(
                refusal.code,
                RefusalCode::BadRequest | RefusalCode::WrongName
            ),
            "{body:02x?}: renewal refused {refusal:?}"
        ),
    }
}

fn client(body: &[u8]) {
    let Ok(response) = decode_response(body) else {
        return;
    };
    if let Ok(frame) = encode_frame(&response) {
        let again = frame
            .split_first_chunk::<4>()
            .map(|(prefix, rest)| (frame_len(*prefix).ok(), decode_response(rest).ok()));
        check!(
            again == Some((Some(frame.len() - 4), Some(response.clone()))),
            "{body:02x?}: {response:?} re-encodes to {frame:02x?}, read back as {again:?}"
        );
    }

    // The joining node pins the CA the answer presents, to get past that
    // check to the certificate's.
    let pinned = match &response {
        EnrollResponse::Issued { ca, .. } => CertificateDer::pem_slice_iter(ca.as_bytes())
            .next()
            .and_then(Result::ok)
            .map_or_else(|| CaFingerprint::of(b""), |der| CaFingerprint::of(&der)),
        EnrollResponse::Refused { .. } => CaFingerprint::of(b""),
    };
    let Ok(node) = NodeName::new(ENROLL_NODE) else {
        crate::violated(format_args!("{ENROLL_NODE} is not a node name"))
    };
    let key = match JoinKey::generate(&node) {
        Ok(key) => key,
        Err(error) => crate::violated(format_args!("cannot make a join key: {error}")),
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    match (response.clone(), key.accept(response, &pinned, now)) {
        (EnrollResponse::Refused { error, message }, result) => check!(
            matches!(&result, Err(EnrollError::Refused { code, message: said })
                if *code == error && *said == message),
            "{body:02x?}: a refusal accepted as {result:?}"
        ),
        (EnrollResponse::Issued { .. }, Ok(enrolled)) => crate::violated(format_args!(
            "{body:02x?}: a certificate for a key just made accepted: {enrolled:?}"
        )),
        (EnrollResponse::Issued { .. }, Err(error)) => check!(
            !error.to_string().is_empty(),
            "{body:02x?}: {error:?} displays as nothing"
        ),
    }
}

static SERVER: OnceLock<Result<Mutex<Server>, String>> = OnceLock::new();

const THIRTY_DAYS: Duration = Duration::from_secs(30 * 86_400);

/// A certificate of [`ENROLL_NODE`] recorded in the ledger of `dir`, as a
/// renewing node presents it.
fn current_certificate(
    authority: &Authority,
    dir: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let node = NodeName::new(ENROLL_NODE).map_err(|error| error.to_string())?;
    let issued = authority
        .issue(
            &node,
            &[GRANT_IP.parse().map_err(|_| "bad GRANT_IP".to_owned())?],
            &[GRANT_DNS.to_owned()],
            Validity::days_from_now(30),
        )
        .map_err(|error| format!("cannot issue: {error}"))?;
    let record = IssuedRecord::of_pem(&issued.cert_pem, Issuance::Issue, None, SystemTime::now())
        .map_err(|error| format!("cannot describe the certificate: {error}"))?;
    Ledger::new(dir)
        .record(record, SystemTime::now())
        .map_err(|error| format!("cannot record the certificate: {error}"))?;
    CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("cannot read the certificate back: {error}"))
}

/// The enrollment server of this process.
struct Server {
    enroller: Enroller,
    /// The certificate a renewing node presents.
    current: Vec<CertificateDer<'static>>,
    dir: PathBuf,
    now: SystemTime,
}

impl Server {
    fn start() -> Result<Self, String> {
        let dir = scratch_dir()?;
        let authority = Authority::generate(ENROLL_CLUSTER, Validity::days_from_now(3650))
            .map_err(|error| format!("cannot make a CA: {error}"))?;
        let server = Self {
            current: current_certificate(&authority, &dir)?,
            enroller: Enroller::new(authority, TokenStore::new(&dir), THIRTY_DAYS),
            dir,
            now: SystemTime::now(),
        };
        server.write_tokens()?;
        Ok(server)
    }

    /// Writes the token file holding the known token, unused.
    fn write_tokens(&self) -> Result<(), String> {
        let secret = (0..TOKEN_SECRET.len() / 2)
            .map(|at| u8::from_str_radix(&TOKEN_SECRET[2 * at..2 * at + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|error| error.to_string())?;
        let hash: String = Sha256::digest(&secret)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let now = self
            .now
            .duration_since(UNIX_EPOCH)
            .map_err(|error| error.to_string())?
            .as_secs();
        let text = format!(
            "{{\"version\":1,\"tokens\":[{{\"id\":\"{TOKEN_ID}\",\"secret_sha256\":\"{hash}\",\
             \"node\":\"{ENROLL_NODE}\",\"ips\":[\"{GRANT_IP}\"],\"dns\":[\"{GRANT_DNS}\"],\
             \"created_at\":{},\"expires_at\":{},\"used\":false}}]}}\n",
            now - 60,
            now + 365 * 24 * 3600
        );
        let path = self.dir.join(TOKENS_FILE);
        fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|error| format!("cannot write {}: {error}", path.display()))
    }
}

/// `$TMPDIR/meshtun-fuzz-enroll/<pid>`, made empty; the directories of
/// processes that have ended are removed (a fuzzer forks many).
fn scratch_dir() -> Result<PathBuf, String> {
    let parent = std::env::temp_dir().join("meshtun-fuzz-enroll");
    let dir = parent.join(std::process::id().to_string());
    if let Ok(entries) = fs::read_dir(&parent) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ended = name
                .to_str()
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists());
            if ended {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .recursive(true)
        .create(&dir)
        .map_err(|error| format!("cannot make {}: {error}", dir.display()))?;
    Ok(dir)
}
