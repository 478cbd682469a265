//! The acceptor side: incoming QUIC connections, and each stream's preamble,
//! authorization, target connect and status.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshtun_config::{HostPort, OverlayPrefix};
use meshtun_proto::{
    ConnectionCode, Decoded, Kind, NodeName, Preamble, Status, StatusCode, StreamCode,
    MAX_PREAMBLE_LEN, OK_STATUS, WELCOME,
};
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use rustls::AlertDescription;
use tokio::net::TcpStream;
use tracing::{debug, info, Instrument};

use crate::identity::peer_identity;
use crate::metrics::{
    handshake_reason, Direction, HandshakeReason, LabelValue, NodeLimit, OpenStream, Pending,
    RefusalReason,
};
use crate::policy::Policy;
use crate::shared::{Handshaking, Shared};
use crate::splice::{self, FromPeer, Outbound};

/// Accepts incoming QUIC connections until the endpoint closes. While the
/// node drains, new connections are refused at once (the dialer sees a
/// refusal, not a handshake timeout).
///
/// Handshakes are the one thing anyone on the network can make this node
/// do, and they cost a signature each, so they are bounded before any work
/// is spent: past `limits.retry_above` in progress, a client must first
/// echo a Retry token (a stateless round trip that a spoofed or replayed
/// flood cannot complete); past `limits.handshakes`, new ones are refused.
///
/// Runs on `shard`, for the endpoint that shard accepts on; each
/// connection, and every stream it carries, stays there.
pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shard: usize, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.stop_accepting.is_cancelled() {
            incoming.refuse();
            continue;
        }
        let limits = shared.policy().limits.clone();
        let in_progress = shared.handshakes_in_progress();
        let remote = incoming.remote_address();
        if in_progress >= limits.handshakes {
            let verdict = shared.metrics().limit_hit(NodeLimit::Handshakes);
            log_limit!(verdict, %remote, in_progress, "refusing a QUIC handshake: limits.handshakes are in progress");
            incoming.refuse();
            continue;
        }
        if in_progress >= limits.retry_above && !incoming.remote_address_validated() {
            if incoming.may_retry() {
                shared.metrics().retried();
                // Only fails if the client already passed a Retry, which
                // `may_retry` ruled out.
                let _ = incoming.retry();
            } else {
                // A client that echoed a token that did not validate.
                incoming.refuse();
            }
            continue;
        }
        let span = tracing::info_span!("incoming", %remote);
        let (handshaking, _) = shared.handshake_started();
        shared
            .tasks
            .spawn(serve_connection(incoming, handshaking, shard, shared.clone()).instrument(span));
    }
}

/// Completes the handshake under a timeout, learns the peer's identity, and
/// serves its streams.
async fn serve_connection(
    incoming: Incoming,
    handshaking: Handshaking,
    shard: usize,
    shared: Arc<Shared>,
) {
    let Some((connection, identity)) = handshake(incoming, handshaking, &shared).await else {
        return;
    };
    let span = tracing::info_span!("peer", peer = %identity);
    serve_peer(connection, identity, shard, shared)
        .instrument(span)
        .await;
}

/// The handshake, under `quic.handshake_timeout`, and the identity of the
/// peer; `None` (counted and logged) when either fails.
async fn handshake(
    incoming: Incoming,
    handshaking: Handshaking,
    shared: &Shared,
) -> Option<(Connection, NodeName)> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(error) => {
            debug!(%error, "incoming connection failed");
            return None;
        }
    };
    let handshake = tokio::time::timeout(shared.handshake_timeout, connecting).await;
    drop(handshaking);
    // Anyone can make handshakes fail, as often as it likes: each failure
    // is counted, and logged at warn once per reason and period (the rest
    // at debug), so a client that re-dials every few milliseconds with a
    // certificate this node refuses cannot flood the journal.
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            let reason = handshake_reason(&error);
            let verdict = shared.metrics().incoming_handshake_failed(reason);
            log_limit!(
                verdict,
                reason = reason.as_str(),
                "handshake failed: {}",
                HandshakeFailure(&error)
            );
            return None;
        }
        Err(_) => {
            let reason = HandshakeReason::Timeout;
            let verdict = shared.metrics().incoming_handshake_failed(reason);
            log_limit!(
                verdict,
                reason = reason.as_str(),
                timeout = ?shared.handshake_timeout,
                "handshake failed: not complete within quic.handshake_timeout"
            );
            return None;
        }
    };
    let identity = match peer_identity(&connection) {
        Ok(identity) => identity,
        Err(detail) => {
            let reason = HandshakeReason::NoIdentity;
            let verdict = shared.metrics().incoming_handshake_failed(reason);
            log_limit!(
                verdict,
                reason = reason.as_str(),
                %detail,
                "handshake failed: closing a connection without a usable identity"
            );
            let code = ConnectionCode::NoIdentity;
            connection.close(VarInt::from_u32(code.to_u32()), code.reason());
            return None;
        }
    };
    Some((connection, identity))
}

/// A peer's connection, handshake done: within its limit, still trusted,
/// welcomed; then each stream it opens, refused at a limit or served.
async fn serve_peer(connection: Connection, identity: NodeName, shard: usize, shared: Arc<Shared>) {
    let limit = shared.policy().limits.connections_per_peer;
    let _tracked = match shared.track_incoming(&identity, shard, &connection, limit) {
        Ok(tracked) => tracked,
        Err(open) => {
            let verdict = shared.metrics().limit_hit(NodeLimit::ConnectionsPerPeer);
            log_limit!(
                verdict,
                open,
                "closing a connection: the peer is at limits.connections_per_peer"
            );
            let code = ConnectionCode::ConnectionLimit;
            connection.close(VarInt::from_u32(code.to_u32()), code.reason());
            return;
        }
    };
    // The handshake may have used a trust bundle a reload replaced.
    let stats = shared.metrics().peer(&identity);
    if !crate::policy::still_trusted(
        &connection,
        &shared.trust,
        meshtun_pki::PeerRole::Dialer,
        &stats,
    ) {
        return;
    }
    // Only now, with the identity checked, may the peer open streams
    // (see `endpoint::transport`).
    connection.set_max_concurrent_bi_streams(VarInt::from_u32(shared.max_streams_per_peer));
    if let Err(error) = send_welcome(&connection).await {
        info!(%error, "peer left before the welcome");
        return;
    }
    info!("peer connected (incoming)");
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                info!(reason = %error, "incoming peer connection closed");
                return;
            }
        };
        let stream = stats.stream(Direction::incoming);
        let (pending, pending_before) = stats.pending();
        // One policy for the whole stream, even if a reload lands meanwhile.
        let policy = shared.policy();
        // Over a limit, the stream is refused here, without a task: a
        // peer that opens streams as fast as it can costs no memory
        // beyond quinn's own stream state.
        if let Some((reason, code)) = over_limit(&stream, pending_before, &policy, &shared) {
            let verdict = stats.refused(Direction::incoming, reason);
            log_limit!(
                verdict,
                reason = reason.as_str(),
                code = code.to_u32(),
                "stream reset at a limit"
            );
            refuse_at_limit(send, recv, code);
            continue;
        }
        let span = tracing::debug_span!("stream", id = %send.id());
        let task = serve_stream(
            (send, recv),
            identity.clone(),
            stream,
            pending,
            policy,
            shard,
            shared.clone(),
        );
        shared.carrier.streams.spawn(task.instrument(span));
    }
}

/// TLS alerts that say a certificate was refused (RFC 8446, section 6.2).
const CERTIFICATE_ALERTS: &[AlertDescription] = &[
    AlertDescription::NoCertificate,
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::CertificateUnobtainable,
    AlertDescription::BadCertificateStatusResponse,
    AlertDescription::BadCertificateHashValue,
    AlertDescription::CertificateRequired,
];

/// How rustls words a refused certificate; the rest of its message names
/// the problem (`UnknownIssuer`, `Expired`, ...).
const RUSTLS_REFUSAL_PREFIX: &str = "invalid peer certificate: ";

/// A failed incoming handshake in words that say which side gave up, and
/// over whose certificate.
///
/// quinn's own text reads backwards for a TLS alert the peer sent: "aborted
/// by peer: the cryptographic handshake failed: error 48: invalid peer
/// certificate: UnknownIssuer" is the *peer* refusing *this node's*
/// certificate, yet reads like this node refusing the peer's. An alert this
/// node raised arrives as `ConnectionError::TransportError`; one the peer
/// sent, as `ConnectionError::ConnectionClosed`, both with a crypto error
/// code (0x100 + the alert). Text that came from the peer is quoted and
/// escaped: it is the peer's to choose.
struct HandshakeFailure<'a>(&'a quinn::ConnectionError);

impl std::fmt::Display for HandshakeFailure<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use quinn::ConnectionError;
        match self.0 {
            ConnectionError::TransportError(error) => match tls_alert(error.code) {
                Some(alert) => {
                    let reason = error.reason.as_str();
                    if let Some(problem) = reason.strip_prefix(RUSTLS_REFUSAL_PREFIX) {
                        write!(f, "this node refused the peer's certificate ({problem})")
                    } else if CERTIFICATE_ALERTS.contains(&alert) {
                        write!(f, "this node refused the peer's certificate ({alert:?}")?;
                        if !reason.is_empty() {
                            write!(f, ": {reason}")?;
                        }
                        f.write_str(")")
                    } else {
                        write!(f, "this node ended the TLS handshake with alert {alert:?}")?;
                        if !reason.is_empty() {
                            write!(f, " ({reason})")?;
                        }
                        Ok(())
                    }
                }
                None => write!(f, "this node closed the connection: {error}"),
            },
            ConnectionError::ConnectionClosed(close) => {
                let said = String::from_utf8_lossy(&close.reason);
                match tls_alert(close.error_code) {
                    Some(alert) if CERTIFICATE_ALERTS.contains(&alert) => write!(
                        f,
                        "the peer refused this node's certificate with alert {alert:?}"
                    )?,
                    Some(alert) => {
                        write!(f, "the peer ended the TLS handshake with alert {alert:?}")?
                    }
                    None => write!(
                        f,
                        "the peer's QUIC stack closed the connection: {}",
                        close.error_code
                    )?,
                }
                if !said.is_empty() {
                    write!(f, " (the peer says {said:?})")?;
                }
                Ok(())
            }
            ConnectionError::ApplicationClosed(close) => {
                write!(
                    f,
                    "the peer closed the connection with code {}",
                    close.error_code
                )?;
                let said = String::from_utf8_lossy(&close.reason);
                if !said.is_empty() {
                    write!(f, " (the peer says {said:?})")?;
                }
                Ok(())
            }
            other => write!(f, "{other}"),
        }
    }
}

/// The TLS alert a QUIC crypto error code carries (0x100 + the alert), if
/// it is one.
fn tls_alert(code: quinn::TransportErrorCode) -> Option<AlertDescription> {
    let code = u64::from(code);
    (0x100..0x200)
        .contains(&code)
        .then(|| AlertDescription::from((code & 0xff) as u8))
}

/// Tells the dialer its certificate was accepted (see [`WELCOME`]).
async fn send_welcome(connection: &Connection) -> Result<(), quinn::WriteError> {
    let mut stream = connection.open_uni().await?;
    stream.write_all(WELCOME).await?;
    // Finishing only fails if the stream is already closed, which the write
    // above would have reported.
    let _ = stream.finish();
    Ok(())
}

/// Why a stream is refused, as the status the opener will see.
fn refuse(code: StatusCode, detail: String) -> Status {
    Status::new(code, detail)
}

/// Which per-peer stream limit, if any, a new stream is over: a reason for
/// the refusal counter and the code to reset it with.
fn over_limit(
    stream: &OpenStream,
    pending_before: u32,
    policy: &Policy,
    shared: &Shared,
) -> Option<(RefusalReason, StreamCode)> {
    if stream.open_before() >= i64::from(shared.max_streams_per_peer) {
        Some((RefusalReason::StreamLimit, StreamCode::StreamLimit))
    } else if pending_before >= policy.limits.pending_streams_per_peer {
        Some((RefusalReason::PendingLimit, StreamCode::PendingLimit))
    } else {
        None
    }
}

/// Resets both halves of a stream refused at a limit. No status is sent:
/// writing one would need a task per refused stream, which is what the
/// limits bound. The code says which limit (`StreamCode`).
fn refuse_at_limit(mut send: SendStream, mut recv: RecvStream, code: StreamCode) {
    let code = VarInt::from_u32(code.to_u32());
    // Either half may already be closed by the peer; then it knows.
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Serves one incoming stream until it ends or the carrier's `abort`
/// token fires; the guards on the stream and the target socket make a
/// cancellation a reset on both sides.
async fn serve_stream(
    (send, recv): (SendStream, RecvStream),
    identity: NodeName,
    stream: OpenStream,
    pending: Pending,
    policy: Arc<Policy>,
    shard: usize,
    shared: Arc<Shared>,
) {
    let _counted = shared.carrier.shard(shard).streams.opened();
    let send = Outbound::new(send);
    tokio::select! {
        () = answer_stream(send, recv, identity, &stream, pending, &policy, &shared) => {}
        () = shared.carrier.abort.cancelled() => debug!("reset by shutdown"),
    }
}

/// Reads the preamble, authorizes, connects, answers, then splices.
async fn answer_stream(
    mut send: Outbound,
    mut recv: RecvStream,
    identity: NodeName,
    stream: &OpenStream,
    pending: Pending,
    policy: &Policy,
    shared: &Shared,
) {
    let stats = stream.stats();
    let limits = &policy.limits;
    let (preamble, payload) = match read_preamble(&mut recv, limits.preamble_timeout).await {
        Ok(read) => read,
        Err(failure) => {
            let (reason, code) = match failure {
                PreambleFailure::Timeout(_) => {
                    (RefusalReason::PreambleTimeout, StreamCode::PreambleTimeout)
                }
                PreambleFailure::Invalid(_) => {
                    (RefusalReason::BadPreamble, StreamCode::BadPreamble)
                }
            };
            let status = refuse(StatusCode::BadPreamble, failure.to_string());
            let verdict = stats.refused(Direction::incoming, reason);
            log_refusal!(verdict, reason = reason.as_str(), detail = %status.detail, "bad stream preamble");
            answer_refusal(&mut send, &mut recv, &status, code).await;
            return;
        }
    };
    let target = match authorize(&shared.node, policy, &preamble, &identity) {
        Ok(target) => target,
        Err(status) => {
            let verdict = stats.refused(Direction::incoming, status.code.into());
            log_refusal!(verdict, code = status.code.as_str(), detail = %status.detail, "stream refused");
            answer_refusal(&mut send, &mut recv, &status, StreamCode::Refused).await;
            return;
        }
    };
    if shared.stop_accepting.is_cancelled() {
        let status = refuse(StatusCode::Unavailable, "node is shutting down".to_owned());
        let verdict = stats.refused(Direction::incoming, status.code.into());
        log_refusal!(verdict, "stream refused: node is draining");
        answer_refusal(&mut send, &mut recv, &status, StreamCode::Refused).await;
        return;
    }
    let span = tracing::debug_span!("target", to = %target.label, target = %target.addr);
    // Overlay streams go to this node's own overlay address; every other
    // overlay address is off limits (see overlay.rs on loop freedom).
    let forbidden = policy
        .overlay
        .as_ref()
        .map(|overlay| (overlay.prefix, overlay.address));
    async {
        let mut tcp = match connect(&target.addr, forbidden, limits.connect_timeout).await {
            Ok(tcp) => tcp,
            Err(status) => {
                let verdict = stats.refused(Direction::incoming, status.code.into());
                log_refusal!(verdict, code = status.code.as_str(), detail = %status.detail, "target unavailable");
                answer_refusal(&mut send, &mut recv, &status, StreamCode::Refused).await;
                return;
            }
        };
        splice::reset_on_close(&tcp);
        if let Err(error) = tcp.set_nodelay(true) {
            debug!(%error, "cannot set TCP_NODELAY");
        }
        // Answered from here on: the stream no longer counts as pending.
        drop(pending);

        let from_peer = FromPeer::Ready(payload);
        match splice::carry(
            &mut tcp,
            &mut send,
            &mut recv,
            Bytes::from_static(OK_STATUS),
            from_peer,
            stats,
            shared.carrier.splice_context(),
        )
        .await
        {
            Ok(totals) => debug!(received = totals.received, sent = totals.sent, "closed"),
            Err((failure, totals)) => {
                debug!(%failure, received = totals.received, sent = totals.sent, "reset")
            }
        }
    }
    .instrument(span)
    .await;
}

/// Where an authorized stream is connected, and what it asked for (for
/// spans and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    addr: HostPort,
    label: String,
}

/// Decides whether `identity` may have what `preamble` asks for, under
/// `policy`, and if so where to connect.
fn authorize(
    node: &NodeName,
    policy: &Policy,
    preamble: &Preamble,
    identity: &NodeName,
) -> Result<Target, Status> {
    let service = match &preamble.kind {
        Kind::Service(service) => service,
        Kind::OverlayPort(port) => {
            let Some(overlay) = &policy.overlay else {
                return Err(refuse(
                    StatusCode::UnknownService,
                    format!("overlay port {port}: overlay mode is not enabled on {node}"),
                ));
            };
            if !overlay.permits(identity, *port) {
                return Err(refuse(
                    StatusCode::Forbidden,
                    format!("{identity} may not reach overlay port {port} on {node}"),
                ));
            }
            return Ok(Target {
                addr: HostPort {
                    host: overlay.address.to_string(),
                    port: *port,
                },
                label: format!("overlay port {port}"),
            });
        }
    };
    let expose = policy
        .exposes
        .iter()
        .find(|expose| &expose.service == service)
        .ok_or_else(|| {
            refuse(
                StatusCode::UnknownService,
                format!("service {service:?} is not exposed by {node}"),
            )
        })?;
    if !expose.allow.permits(identity) {
        return Err(refuse(
            StatusCode::Forbidden,
            format!("{identity} may not reach service {service:?} on {node}"),
        ));
    }
    Ok(Target {
        addr: expose.target.clone(),
        label: format!("service {service}"),
    })
}

/// Why no preamble was read.
#[derive(Debug, thiserror::Error)]
enum PreambleFailure {
    #[error("no complete preamble within {0:?} (limits.preamble_timeout)")]
    Timeout(Duration),
    #[error("{0}")]
    Invalid(String),
}

/// Reads the preamble (at most [`MAX_PREAMBLE_LEN`] bytes) under `timeout`;
/// returns it with any client bytes that arrived behind it.
async fn read_preamble(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<(Preamble, Bytes), PreambleFailure> {
    let read = async {
        let mut buffer = BytesMut::new();
        loop {
            match Preamble::decode(&buffer) {
                Ok(Decoded::Complete { preamble, len }) => {
                    let payload = buffer.split_off(len).freeze();
                    return Ok((preamble, payload));
                }
                Ok(Decoded::Incomplete { .. }) => {}
                Err(error) => return Err(PreambleFailure::Invalid(error.to_string())),
            }
            let wanted = MAX_PREAMBLE_LEN.saturating_sub(buffer.len()).max(1);
            match recv.read_chunk(wanted, true).await {
                Ok(Some(chunk)) => buffer.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(PreambleFailure::Invalid(
                        "stream ended inside the preamble".to_owned(),
                    ))
                }
                Err(error) => {
                    return Err(PreambleFailure::Invalid(format!(
                        "stream failed inside the preamble: {error}"
                    )))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(PreambleFailure::Timeout(timeout)),
    }
}

/// Sends a refusal and closes the stream both ways. The status goes out
/// before the stop, so the opener reads the reason rather than just a stop;
/// it then resets its local client.
async fn answer_refusal(
    send: &mut Outbound,
    recv: &mut RecvStream,
    status: &Status,
    code: StreamCode,
) {
    let mut bytes = BytesMut::with_capacity(status.encoded_len());
    status.encode(&mut bytes);
    if send.stream.write_chunk(bytes.freeze()).await.is_ok() {
        // A failed finish means the stream is gone; the opener knows.
        let _ = send.finish();
    } else {
        send.reset(code);
    }
    let _ = recv.stop(VarInt::from_u32(code.to_u32()));
}

/// Connects to an expose target, trying each resolved address in turn, all
/// within `timeout`. Errors become the status the opener sees. With
/// overlay mode on (`overlay` is its prefix and this node's address), a
/// name that resolves to another node's overlay address is refused: the
/// connection would be redirected back into meshtun.
async fn connect(
    target: &HostPort,
    overlay: Option<(OverlayPrefix, std::net::Ipv4Addr)>,
    timeout: Duration,
) -> Result<TcpStream, Status> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match target.to_socket_addr_if_literal() {
            Some(addr) => vec![addr],
            None => tokio::net::lookup_host(target.to_string())
                .await
                .map_err(|error| {
                    refuse(
                        StatusCode::Unreachable,
                        format!("cannot resolve {target}: {error}"),
                    )
                })?
                .collect(),
        };
        let mut last: Option<io::Error> = None;
        for addr in addrs {
            if let (Some((prefix, own)), std::net::IpAddr::V4(ip)) = (overlay, addr.ip()) {
                if prefix.contains(ip) && ip != own {
                    last = Some(io::Error::other(format!(
                        "{addr} is another node's overlay address; not connecting (it would loop)"
                    )));
                    continue;
                }
            }
            match TcpStream::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(error) => last = Some(error),
            }
        }
        Err(match last {
            Some(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                refuse(StatusCode::Refused, format!("{target}: connection refused"))
            }
            Some(error) => refuse(StatusCode::Unreachable, format!("{target}: {error}")),
            None => refuse(StatusCode::Unreachable, format!("{target}: no addresses")),
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(refuse(
            StatusCode::Unreachable,
            format!("{target}: connect timed out after {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_proto::ServiceName;

    fn name(text: &str) -> NodeName {
        NodeName::new(text).expect("a test name")
    }

    /// The example config's policy: node-1, exposing `torch-store` to
    /// node-0, overlay address 100.127.0.2 open to node-0 on 1024-65535.
    fn policy() -> Policy {
        let config = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
        Policy::from_config(&config)
    }

    /// A TLS alert as quinn reports one this node raised.
    fn raised(alert: AlertDescription, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::TransportError(quinn_proto::TransportError {
            code: quinn::TransportErrorCode::crypto(u8::from(alert)),
            frame: None,
            reason: reason.to_owned(),
        })
    }

    /// A TLS alert as quinn reports one the peer sent.
    fn received(alert: AlertDescription, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(u8::from(alert)),
            frame_type: None,
            reason: Bytes::copy_from_slice(reason.as_bytes()),
        })
    }

    #[test]
    fn handshake_failures_say_who_refused_whose_certificate() {
        let words = |error: &quinn::ConnectionError| HandshakeFailure(error).to_string();
        // This node refused the peer: rustls's reason, without its prefix.
        let ours = raised(
            AlertDescription::UnknownCA,
            "invalid peer certificate: UnknownIssuer",
        );
        assert_eq!(
            words(&ours),
            "this node refused the peer's certificate (UnknownIssuer)"
        );
        assert_eq!(handshake_reason(&ours), HandshakeReason::Tls);
        assert_eq!(
            words(&raised(AlertDescription::CertificateRequired, "")),
            "this node refused the peer's certificate (CertificateRequired)"
        );
        // The peer refused this node: the same alert, received. quinn would
        // say "aborted by peer: ... invalid peer certificate: UnknownIssuer".
        let theirs = received(
            AlertDescription::UnknownCA,
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(
            theirs.to_string().starts_with("aborted by peer"),
            "{theirs}"
        );
        assert_eq!(
            words(&theirs),
            "the peer refused this node's certificate with alert UnknownCA \
             (the peer says \"invalid peer certificate: UnknownIssuer\")"
        );
        assert_eq!(handshake_reason(&theirs), HandshakeReason::Tls);
        assert_eq!(
            words(&received(AlertDescription::BadCertificate, "")),
            "the peer refused this node's certificate with alert BadCertificate"
        );
        // Other alerts are not about certificates.
        assert_eq!(
            words(&raised(
                AlertDescription::NoApplicationProtocol,
                "peer doesn't support any known protocol"
            )),
            "this node ended the TLS handshake with alert NoApplicationProtocol \
             (peer doesn't support any known protocol)"
        );
        assert_eq!(
            words(&received(AlertDescription::NoApplicationProtocol, "")),
            "the peer ended the TLS handshake with alert NoApplicationProtocol"
        );
        // What the peer says is escaped: it cannot forge log lines.
        let forged = words(&received(
            AlertDescription::BadCertificate,
            "no\nWARN fake line\u{1b}[31m",
        ));
        assert!(
            !forged.contains('\n') && !forged.contains('\u{1b}'),
            "{forged}"
        );
        // Not a TLS alert: quinn's words, which are right there.
        assert_eq!(words(&quinn::ConnectionError::TimedOut), "timed out");
        assert_eq!(words(&quinn::ConnectionError::Reset), "reset by peer");
    }

    #[test]
    fn overlay_ports_follow_the_overlay_allow_rules() {
        let policy = policy();
        let node = name("node-1");
        let target = authorize(
            &node,
            &policy,
            &Preamble::overlay_port(29500),
            &name("node-0"),
        )
        .expect("node-0 may reach 29500");
        assert_eq!(target.addr.to_string(), "100.127.0.2:29500");

        let low = authorize(&node, &policy, &Preamble::overlay_port(22), &name("node-0"))
            .expect_err("22 is outside the allowed range");
        assert_eq!(low.code, StatusCode::Forbidden);
        assert!(
            low.detail.contains("node-0") && low.detail.contains("22"),
            "{}",
            low.detail
        );

        let stranger = authorize(
            &node,
            &policy,
            &Preamble::overlay_port(29500),
            &name("node-7"),
        )
        .expect_err("node-7 is not allowed");
        assert_eq!(stranger.code, StatusCode::Forbidden);
    }

    #[test]
    fn overlay_ports_are_unknown_without_overlay_mode() {
        let mut policy = policy();
        policy.overlay = None;
        let refused = authorize(
            &name("node-1"),
            &policy,
            &Preamble::overlay_port(29500),
            &name("node-0"),
        )
        .expect_err("overlay mode is off");
        assert_eq!(refused.code, StatusCode::UnknownService);
        assert!(refused.detail.contains("node-1"), "{}", refused.detail);
    }

    #[test]
    fn services_still_map_to_their_targets() {
        let policy = policy();
        let service = ServiceName::new("torch-store").expect("a test name");
        let target = authorize(
            &name("node-1"),
            &policy,
            &Preamble::service(service.clone()),
            &name("node-0"),
        )
        .expect("node-0 may reach torch-store");
        assert_eq!(target.addr.to_string(), "127.0.0.1:29500");
        let refused = authorize(
            &name("node-1"),
            &policy,
            &Preamble::service(service),
            &name("node-7"),
        )
        .expect_err("node-7 may not");
        assert_eq!(refused.code, StatusCode::Forbidden);
    }
}
