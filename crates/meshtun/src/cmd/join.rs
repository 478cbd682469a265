//! `meshtun join`: a new node gets its certificate from `meshtun pki serve`
//! with a join token, without the CA key leaving the CA host and without
//! the node's key leaving the node (like `kubeadm join`).
//!
//! The key is generated here and kept in memory; nothing is written until
//! the server's certificate has been checked (it belongs to this key, names
//! this node, and chains to the pinned CA), then the key (0600), the
//! certificate and `ca.crt` are written together. Before the token is
//! spent, the output directory is made and checked, so an existing file
//! stops the command while the token is still good.
//!
//! Exit codes (the CLI's, see main.rs): 78 when the credentials are at fault (the
//! server is not the pinned CA; the token is unknown, used, expired or for
//! another node), 64 for a malformed argument, 1 for everything else
//! (network, a busy or failing server, files).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use meshtun_enroll::{
    request_certificate, CaFingerprint, EnrollClientError, EnrollError, JoinFiles, JoinKey,
    JoinToken, RefusalCode,
};
use meshtun_proto::NodeName;

use crate::{runtime, EXIT_CONFIG, EXIT_RUNTIME};

/// `meshtun join`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct JoinArgs {
    /// The enrollment server (`meshtun pki serve`), as host:port.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// The CA certificate's fingerprint, as `meshtun pki token` prints it;
    /// the server must prove it holds this CA.
    #[arg(long, value_name = "sha256:HEX")]
    ca_fingerprint: CaFingerprint,
    /// The join token from `meshtun pki token` (single use). The variable
    /// keeps it out of the process list.
    #[arg(long, env = "MESHTUN_JOIN_TOKEN", hide_env_values = true)]
    token: JoinToken,
    /// This node's name: the one the token was made for.
    #[arg(long)]
    node: NodeName,
    /// Directory to write NAME.key (0600), NAME.crt and ca.crt into.
    #[arg(long)]
    out: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
    /// Ask for a certificate valid this long (a number and s, m, h or d,
    /// from 1m): less than the token grants, never more [default: what the
    /// token grants].
    #[arg(long, value_name = "DURATION", value_parser = crate::cmd::pki::parse_lifetime)]
    valid_for: Option<std::time::Duration>,
    /// Seconds to wait for the whole exchange with the server.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

pub(crate) fn join(args: JoinArgs) -> ExitCode {
    match enroll(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            if let Some(hint) = failure.hint {
                eprintln!("{hint}");
            }
            ExitCode::from(failure.code)
        }
    }
}

/// Why joining failed: what to print and the exit code.
struct Failure {
    message: String,
    hint: Option<String>,
    code: u8,
}

impl Failure {
    fn runtime(message: impl ToString) -> Self {
        Self {
            message: message.to_string(),
            hint: None,
            code: EXIT_RUNTIME,
        }
    }

    fn credentials(message: impl ToString, hint: impl Into<Option<String>>) -> Self {
        Self {
            message: message.to_string(),
            hint: hint.into(),
            code: EXIT_CONFIG,
        }
    }
}

fn enroll(args: &JoinArgs) -> Result<(), Failure> {
    let pinned = &args.ca_fingerprint;
    // Before the token is spent: the directory exists and nothing would be
    // overwritten.
    JoinFiles::prepare(&args.out, &args.node, pinned, args.force).map_err(Failure::runtime)?;
    let key = JoinKey::generate(&args.node).map_err(Failure::runtime)?;
    let request = key
        .request_for(&args.token, args.valid_for)
        .map_err(Failure::runtime)?;
    let runtime = runtime()
        .map_err(|error| Failure::runtime(format!("cannot start the async runtime: {error}")))?;
    let response = runtime
        .block_on(request_certificate(
            &args.server,
            pinned,
            &request,
            Duration::from_secs(args.timeout),
        ))
        .map_err(|error| match error {
            EnrollClientError::CaMismatch(mismatch) => Failure::credentials(
                mismatch,
                "nothing was sent to that server; the token is still unused".to_owned(),
            ),
            other => Failure::runtime(other),
        })?;
    let enrolled = key
        .accept(response, pinned, SystemTime::now())
        .map_err(|error| refused(&error, &args.node))?;
    let files = enrolled
        .write(&args.out, args.force)
        .map_err(|error| Failure {
            message: error.to_string(),
            hint: Some(
                "the certificate was issued but could not be saved; the token is used up: \
             ask the CA operator for a new one"
                    .to_owned(),
            ),
            code: EXIT_RUNTIME,
        })?;

    let credentials = enrolled.credentials();
    say!(
        "joined as {}: wrote {} (0600), {} and {}",
        args.node,
        files.key.display(),
        files.cert.display(),
        files.ca.display()
    );
    say!(
        "certificate {}, valid until {}",
        credentials.fingerprint(),
        meshtun_pki::format_utc(credentials.not_after())
    );
    say!(
        "next: put these lines in {}'s configuration, then run `meshtun check -c FILE`:",
        args.node
    );
    say!();
    say!("node = \"{}\"", args.node);
    say!();
    say!("[tls]");
    say!("ca = {}", toml_path(&files.ca));
    say!("cert = {}", toml_path(&files.cert));
    say!("key = {}", toml_path(&files.key));
    Ok(())
}

/// The failure for an answer that is not a usable certificate.
fn refused(error: &EnrollError, node: &NodeName) -> Failure {
    let new_token =
        format!("ask the CA operator for a new token: `meshtun pki token --ca DIR --node {node}`");
    match (error, error.refusal()) {
        (EnrollError::Refused { code, message }, Some(known)) => {
            let text = format!("the enrollment server refused ({code}): {message}");
            match known {
                RefusalCode::UnknownToken => Failure::credentials(
                    text,
                    format!(
                        "check the token for typos and that the server uses the CA directory \
                         it was made with; else {new_token}"
                    ),
                ),
                RefusalCode::TokenUsed | RefusalCode::TokenExpired => {
                    Failure::credentials(text, new_token)
                }
                RefusalCode::WrongName => Failure::credentials(
                    text,
                    format!("pass the --node the token was made for, or {new_token}"),
                ),
                RefusalCode::RateLimited => Failure {
                    hint: Some(
                        "too many failed attempts from this address: wait a minute".to_owned(),
                    ),
                    ..Failure::runtime(text)
                },
                // Renewal refusals: a join never gets them from a server
                // that speaks the protocol.
                RefusalCode::BadRequest
                | RefusalCode::ServerError
                | RefusalCode::CertificateRequired
                | RefusalCode::UnknownCertificate
                | RefusalCode::Revoked
                | RefusalCode::AlreadyRenewed => Failure::runtime(text),
            }
        }
        (EnrollError::CaMismatch { .. }, _) => Failure::credentials(error, None),
        _ => Failure::runtime(error),
    }
}

/// `path` as a TOML string, absolute where it can be made so.
fn toml_path(path: &Path) -> String {
    let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let text = absolute.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
