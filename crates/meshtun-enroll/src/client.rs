//! The client's side of the network: one request to `meshtun pki serve`
//! and its answer, for `meshtun join` ([`request_certificate`]) and a
//! node's renewal ([`request_renewal`]), over TLS 1.3 with the CA pinned by
//! its fingerprint, all within a time limit.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use meshtun_pki::{NodeCredentials, PkiError};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pin::{
    enrollment_client_config, renewal_client_config, CaFingerprint, CaFingerprintMismatch,
};
use crate::wire::{decode_response, read_frame, EnrollResponse};

/// Why `meshtun join` could not get an answer from the server.
#[derive(Debug, thiserror::Error)]
pub enum EnrollClientError {
    /// The server address did not resolve.
    #[error("cannot resolve {server}: {source}")]
    Resolve {
        /// The address as given.
        server: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// No address of the server accepted a connection.
    #[error("cannot connect to {server}: {source}")]
    Connect {
        /// The address as given.
        server: String,
        /// The last connection error.
        source: io::Error,
    },
    /// The server does not hold the pinned CA. Nothing was sent.
    #[error("{0}")]
    CaMismatch(CaFingerprintMismatch),
    /// The TLS handshake failed for another reason (for example a clock far
    /// off, which makes the server's day-long certificate look invalid).
    #[error("TLS handshake with {server} failed: {source}")]
    Handshake {
        /// The address as given.
        server: String,
        /// What rustls said.
        source: io::Error,
    },
    /// The exchange broke off.
    #[error("enrollment exchange with {server} failed: {source}")]
    Io {
        /// The address as given.
        server: String,
        /// The error.
        source: io::Error,
    },
    /// The server answered something that is not an enrollment answer.
    #[error("{server} answered something that is not an enrollment answer: {detail}")]
    Response {
        /// The address as given.
        server: String,
        /// What is wrong.
        detail: String,
    },
    /// The whole exchange took too long.
    #[error("no answer from {server} within {after:?}")]
    Timeout {
        /// The address as given.
        server: String,
        /// The limit.
        after: Duration,
    },
    /// The client's TLS configuration could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// Sends one framed `request` to the enrollment server at `server`
/// (`host:port`) and returns its answer, all within `timeout`. The server is
/// accepted only if it holds the CA with fingerprint `pinned`; if it does
/// not, the handshake stops before anything of the request is sent.
pub async fn request_certificate(
    server: &str,
    pinned: &CaFingerprint,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    let config = Arc::new(enrollment_client_config(pinned)?);
    exchange_with(config, server, request, timeout).await
}

/// Like [`request_certificate`], for a renewal: presents `current` (the
/// node's certificate and key in force) in the handshake and sends the
/// framed renewal `request`.
pub async fn request_renewal(
    server: &str,
    pinned: &CaFingerprint,
    current: &NodeCredentials,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    let config = Arc::new(renewal_client_config(pinned, current)?);
    exchange_with(config, server, request, timeout).await
}

async fn exchange_with(
    config: Arc<rustls::ClientConfig>,
    server: &str,
    request: &[u8],
    timeout: Duration,
) -> Result<EnrollResponse, EnrollClientError> {
    tokio::time::timeout(timeout, async {
        let tcp = connect(server).await?;
        let peer = tcp.peer_addr().map_err(|source| EnrollClientError::Io {
            server: server.to_owned(),
            source,
        })?;
        let mut tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
            .map_err(|source| match fingerprint_mismatch(&source) {
                Some(mismatch) => EnrollClientError::CaMismatch(mismatch),
                None => EnrollClientError::Handshake {
                    server: server.to_owned(),
                    source,
                },
            })?;
        let io_error = |source| EnrollClientError::Io {
            server: server.to_owned(),
            source,
        };
        tls.write_all(request).await.map_err(io_error)?;
        tls.flush().await.map_err(io_error)?;
        let body = match read_frame(&mut tls).await.map_err(io_error)? {
            Ok(body) => body,
            Err(refusal) => {
                return Err(EnrollClientError::Response {
                    server: server.to_owned(),
                    detail: refusal.message,
                })
            }
        };
        decode_response(&body).map_err(|error| EnrollClientError::Response {
            server: server.to_owned(),
            detail: error.to_string(),
        })
    })
    .await
    .unwrap_or_else(|_| {
        Err(EnrollClientError::Timeout {
            server: server.to_owned(),
            after: timeout,
        })
    })
}

/// Connects to the first address of `server` that answers.
async fn connect(server: &str) -> Result<TcpStream, EnrollClientError> {
    let addrs =
        tokio::net::lookup_host(server)
            .await
            .map_err(|source| EnrollClientError::Resolve {
                server: server.to_owned(),
                source,
            })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(error) => last = error,
        }
    }
    Err(EnrollClientError::Connect {
        server: server.to_owned(),
        source: last,
    })
}

/// The pinned-CA mismatch inside a failed handshake, if that is what it was.
fn fingerprint_mismatch(error: &io::Error) -> Option<CaFingerprintMismatch> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = tls else {
        return None;
    };
    other.0.downcast_ref::<CaFingerprintMismatch>().cloned()
}
