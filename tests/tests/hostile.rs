#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A panic in test code is a failed test, which is what an expect or a
// panic here means.

//! Hostile peers and a hostile network against an acceptor: an
//! authenticated peer that sends every kind of broken preamble and resets
//! at every step, ten thousand streams that never finish their preamble,
//! garbage datagrams, and a flood of handshakes from clients the cluster CA
//! never vouched for. Each is refused with its specific code and counted,
//! and what was established keeps working.
//!
//! The tests of this binary run one at a time (see [`exclusive`]): two of
//! them measure throughput and latency, which a neighbouring flood on a
//! two-core machine would turn into noise.

mod support;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshtun_node::{Node, NodeStatus};
use meshtun_pki::{NodeCredentials, TrustBundle, Validity};
use meshtun_proto::{NodeName, Status, StatusCode, StreamCode, MAX_STATUS_LEN, WELCOME};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, ReadError, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use support::{block, echo_server, Ending, NodeSpec, Pki};

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Running one at a time.

/// Holds a lock shared by every process of this test binary until dropped
/// (or the process dies): an abstract Unix socket name, which the kernel
/// releases with the process. nextest runs each test in its own process,
/// two at a time on this machine.
async fn exclusive(test: &str) -> std::os::unix::net::UnixListener {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "meshtun-tests-hostile-{}",
        std::env::var("USER").unwrap_or_default()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract socket name");
    let started = Instant::now();
    let patience = Duration::from_secs(600);
    loop {
        match std::os::unix::net::UnixListener::bind_addr(&addr) {
            Ok(lock) => return lock,
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                assert!(
                    started.elapsed() < patience,
                    "{test}: another hostile test held the lock for {patience:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{test}: cannot take the test lock: {error}"),
        }
    }
}

// ---------------------------------------------------------------------------
// A raw, authenticated peer.

/// A QUIC client config that presents `credentials` and accepts only the
/// node `peer`, wrapped as meshtun's own dialer wraps it.
fn peer_client_config(
    trust: &TrustBundle,
    credentials: &NodeCredentials,
    peer: &str,
) -> quinn::ClientConfig {
    let peer = NodeName::new(peer).expect("peer name");
    let tls = meshtun_pki::client_config(trust, credentials, &peer).expect("TLS client config");
    let crypto = QuicClientConfig::try_from(tls).expect("QUIC-capable TLS config");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // As meshtun's dialer: a send window for bulk transfers (quic.send_window).
    transport
        .send_window(32 * MIB as u64)
        .keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    config
}

/// Connects to `addr` as node-a of `pki` and waits for the acceptor's
/// welcome, retrying the handshake for up to `patience` (a daemon may still
/// be starting).
async fn raw_peer(pki: &Pki, addr: SocketAddr, patience: Duration) -> (Endpoint, Connection) {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    let config = peer_client_config(&pki.trust, &pki.credentials("node-a"), "node-b");
    let started = Instant::now();
    let connection = loop {
        let connecting = endpoint
            .connect_with(config.clone(), addr, "meshtun")
            .expect("connect");
        match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(connection)) => break connection,
            Ok(Err(error)) if started.elapsed() < patience => {
                println!("raw peer: handshake failed ({error}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(error)) => panic!("raw peer: handshake to {addr} failed: {error}"),
            Err(_) => panic!("raw peer: no handshake with {addr} within 5s"),
        }
    };
    let welcome = async {
        let mut uni = connection.accept_uni().await.expect("welcome stream");
        uni.read_to_end(WELCOME.len() + 16).await.expect("welcome")
    };
    let welcome = tokio::time::timeout(Duration::from_secs(5), welcome)
        .await
        .expect("welcome within 5s");
    assert_eq!(welcome, WELCOME, "the acceptor's welcome");
    (endpoint, connection)
}

/// The preamble asking for `service`, built by hand so tests can also build
/// broken ones.
fn service_preamble(service: &str) -> Vec<u8> {
    let mut bytes = vec![1, 1, u8::try_from(service.len()).expect("short name")];
    bytes.extend_from_slice(service.as_bytes());
    bytes
}

/// What the acceptor answered on a stream.
#[derive(Debug)]
#[allow(dead_code)] // the payloads are read through Debug, in failure messages
enum Answer {
    /// A status, with the payload bytes that came in the same reads.
    Status(Status, Vec<u8>),
    /// The stream ended (FIN) after these bytes, before a whole status.
    Ended(Vec<u8>),
    /// Reading failed (the acceptor reset the stream, or the connection died).
    Failed(ReadError),
    /// The bytes are not a status.
    Garbled(String),
}

async fn read_answer(recv: &mut RecvStream) -> Answer {
    let mut buffer = Vec::new();
    loop {
        match Status::decode(&buffer) {
            Ok(Some((status, len))) => return Answer::Status(status, buffer.split_off(len)),
            Ok(None) => {}
            Err(error) => return Answer::Garbled(format!("{error}: {buffer:?}")),
        }
        if buffer.len() > MAX_STATUS_LEN {
            return Answer::Garbled(format!("{} bytes and no status", buffer.len()));
        }
        match recv.read_chunk(MAX_STATUS_LEN, true).await {
            Ok(Some(chunk)) => buffer.extend_from_slice(&chunk.bytes),
            Ok(None) => return Answer::Ended(buffer),
            Err(error) => return Answer::Failed(error),
        }
    }
}

/// Reads until `want` bytes arrived (beyond `first`), or panics naming `what`.
async fn read_exactly(recv: &mut RecvStream, first: Vec<u8>, want: usize, what: &str) -> Vec<u8> {
    let mut got = first;
    let read = async {
        while got.len() < want {
            match recv.read_chunk(want - got.len(), true).await {
                Ok(Some(chunk)) => got.extend_from_slice(&chunk.bytes),
                Ok(None) => panic!("{what}: stream ended after {} of {want} bytes", got.len()),
                Err(error) => panic!("{what}: read failed after {} bytes: {error}", got.len()),
            }
        }
        got
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("{what}: {want} bytes did not arrive within 5s"))
}

/// Reads and discards until the stream fails or ends (at most 5 s); returns
/// the read error, or `None` for a clean end.
async fn read_until_end(recv: &mut RecvStream, what: &str) -> Option<ReadError> {
    let read = async {
        loop {
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(error) => return Some(error),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("{what}: the stream neither ended nor failed within 5s"))
}

/// One echo round trip on a fresh stream of `connection`: preamble, `len`
/// bytes, FIN; status OK, the same bytes, FIN.
async fn raw_echo(connection: &Connection, service: &str, len: usize) {
    let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
    let payload = block(7, len);
    send.write_all(&service_preamble(service)).await.unwrap();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let first = match tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv)).await {
        Ok(Answer::Status(status, rest)) if status.code == StatusCode::Ok => rest,
        other => panic!("raw echo: expected status OK, got {other:?}"),
    };
    let back = read_exactly(&mut recv, first, len, "raw echo").await;
    assert!(back == payload, "raw echo: the bytes came back changed");
    assert!(
        read_until_end(&mut recv, "raw echo").await.is_none(),
        "raw echo: the stream must end cleanly"
    );
}

/// One echo round trip of `len` bytes over a fresh TCP connection to `addr`.
async fn tcp_echo(addr: SocketAddr, len: usize, seed: u64) -> io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    let payload = block(seed, len);
    tcp.write_all(&payload).await?;
    let mut back = vec![0u8; len];
    tcp.read_exact(&mut back).await?;
    if back != payload {
        return Err(io::Error::other("the echo came back changed"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Targets the test can watch.

/// An echo server that reports how each connection ended: a clean end of
/// file from the other side, or a reset.
async fn watched_echo() -> (SocketAddr, mpsc::UnboundedReceiver<Ending>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tell, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tell = tell.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let ending = loop {
                    match tcp.read(&mut buffer).await {
                        Ok(0) => break Ending::CleanEof,
                        Ok(read) => {
                            if tcp.write_all(&buffer[..read]).await.is_err() {
                                break Ending::Reset;
                            }
                        }
                        Err(_) => break Ending::Reset,
                    }
                };
                let _ = tell.send(ending);
            });
        }
    });
    (addr, seen)
}

/// A listening port whose accept queue is full, so a connect to it hangs
/// (the kernel drops the SYNs) until the connector gives up. Returns the
/// address and the connection that fills the queue (keep it).
async fn blackhole() -> (SocketAddr, socket2::Socket, std::net::TcpStream) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let filler = std::net::TcpStream::connect(addr).expect("fill the accept queue");
    // The set-up itself is checked: a further connect must hang.
    let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
    assert!(
        probe.is_err(),
        "the blackhole listener accepted a second connection: {probe:?}"
    );
    (addr, socket, filler)
}

// ---------------------------------------------------------------------------
// Admin endpoint.

/// GET `path` from an admin endpoint over plain HTTP/1.1; the body of a 200.
async fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).map_err(io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no header end in {text:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("not a 200: {head}")));
    }
    Ok(body.to_owned())
}

/// The sum of every sample of `family` whose labels include `labels`.
fn metric_sum(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            match rest.split_once("} ") {
                Some(split) => split,
                None => continue,
            }
        } else if let Some(value) = rest.strip_prefix(' ') {
            ("", value)
        } else {
            continue;
        };
        let found: BTreeMap<&str, &str> = label_text
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key, value.trim_matches('"')))
            .collect();
        if labels
            .iter()
            .all(|(key, value)| found.get(key) == Some(value))
        {
            let value = value.split_whitespace().next().unwrap_or_default();
            sum += value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad sample {line:?}"));
        }
    }
    sum
}

/// node-a as `status` sees it.
fn peer_status<'a>(status: &'a NodeStatus, peer: &str) -> &'a meshtun_node::PeerStatus {
    status
        .peers
        .iter()
        .find(|entry| entry.name == peer)
        .unwrap_or_else(|| panic!("{peer} missing from status: {status:?}"))
}

// ---------------------------------------------------------------------------
// Test 1.

/// node-b's preamble timeout in test 1: short, so the silent case is quick.
const SHORT_PREAMBLE_TIMEOUT: Duration = Duration::from_millis(500);

/// What the opener does after writing a case's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Nothing: the stream stays open.
    Wait,
    /// Finish (FIN).
    Finish,
    /// Reset the sending half.
    Reset,
}

/// One hostile stream and what node-b must answer.
struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    then: Then,
    code: StatusCode,
    /// Text the status detail must hold.
    detail: &'static str,
    /// The refusal reason node-b counts.
    reason: &'static str,
    /// The STOP_SENDING code the opener must see, for streams node-b still
    /// had something to stop (neither finished nor reset by the opener).
    stop: Option<StreamCode>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_preambles_each_get_their_specific_refusal() {
    let _serial = exclusive("hostile_preambles").await;
    support::init_logging();
    let pki = Pki::new("test");
    let echo = echo_server().await;
    let (watched_reset, mut reset_seen) = watched_echo().await;
    let (watched_stop, mut stop_seen) = watched_echo().await;
    let (blackhole_addr, _blackhole, _filler) = blackhole().await;
    let mut config = NodeSpec::new("node-b")
        .expose("echo", echo, &["node-a"])
        .expose("private", echo, &["node-c"])
        .expose("watched-reset", watched_reset, &["node-a"])
        .expose("watched-stop", watched_stop, &["node-a"])
        .expose("blackhole", blackhole_addr, &["node-a"])
        .config();
    config.limits.preamble_timeout = SHORT_PREAMBLE_TIMEOUT;
    config.limits.connect_timeout = Duration::from_secs(1);
    let node_b = Node::start(config, pki.credentials("node-b"), pki.trust.clone())
        .await
        .expect("node-b starts");
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start(&pki)
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    let (_endpoint, connection) = raw_peer(&pki, node_b.quic_addr(), Duration::ZERO).await;
    // The control: the raw peer is a working peer.
    raw_echo(&connection, "echo", 1024).await;

    let bad = |what, bytes: &[u8], detail| Case {
        what,
        bytes: bytes.to_vec(),
        then: Then::Wait,
        code: StatusCode::BadPreamble,
        detail,
        reason: "bad_preamble",
        stop: Some(StreamCode::BadPreamble),
    };
    let partial = service_preamble("echo")[..4].to_vec();
    let mut cases = vec![
        bad(
            "unknown version",
            &[[2, 1, 4].as_slice(), b"echo"].concat(),
            "unsupported preamble version 2",
        ),
        bad(
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: node-b\r\n\r\n",
            "unsupported preamble version 71",
        ),
        bad("unknown kind", &[1, 9], "unknown preamble kind 9"),
        bad(
            "name length 0",
            &[1, 1, 0],
            "service name length 0 is out of range",
        ),
        bad(
            "name length 200",
            &[[1, 1, 200].as_slice(), &[b'a'; 100]].concat(),
            "service name length 200 is out of range",
        ),
        bad(
            "a name with a slash",
            &[[1, 1, 4].as_slice(), b"ec/o"].concat(),
            "name holds '/' at byte 2",
        ),
        bad(
            "a name starting with '-'",
            &[[1, 1, 4].as_slice(), b"-cho"].concat(),
            "must start with an ASCII letter or digit",
        ),
        bad(
            "a name that is not UTF-8",
            &[1, 1, 2, 0xc3, 0x28],
            "bad service name in preamble",
        ),
        bad(
            "overlay port 0",
            &[1, 2, 0, 0],
            "overlay port 0 is not a valid destination",
        ),
        Case {
            what: "an unknown service",
            bytes: service_preamble("nosuch"),
            then: Then::Wait,
            code: StatusCode::UnknownService,
            detail: "service \"nosuch\" is not exposed by node-b",
            reason: "unknown_service",
            stop: Some(StreamCode::Refused),
        },
        Case {
            what: "an overlay port without overlay mode",
            bytes: vec![1, 2, 0x1f, 0x90],
            then: Then::Wait,
            code: StatusCode::UnknownService,
            detail: "overlay port 8080: overlay mode is not enabled on node-b",
            reason: "unknown_service",
            stop: Some(StreamCode::Refused),
        },
        Case {
            what: "a forbidden service",
            bytes: service_preamble("private"),
            then: Then::Wait,
            code: StatusCode::Forbidden,
            detail: "node-a may not reach service \"private\" on node-b",
            reason: "forbidden",
            stop: Some(StreamCode::Refused),
        },
        Case {
            what: "an empty stream, finished",
            bytes: Vec::new(),
            then: Then::Finish,
            code: StatusCode::BadPreamble,
            detail: "stream ended inside the preamble",
            reason: "bad_preamble",
            stop: None,
        },
        Case {
            what: "a partial preamble, finished",
            bytes: partial.clone(),
            then: Then::Finish,
            code: StatusCode::BadPreamble,
            detail: "stream ended inside the preamble",
            reason: "bad_preamble",
            stop: None,
        },
        Case {
            what: "a partial preamble, reset",
            bytes: partial.clone(),
            then: Then::Reset,
            code: StatusCode::BadPreamble,
            detail: "stream failed inside the preamble",
            reason: "bad_preamble",
            stop: None,
        },
        Case {
            what: "a partial preamble, then silence",
            bytes: partial.clone(),
            then: Then::Wait,
            code: StatusCode::BadPreamble,
            detail: "no complete preamble within 500ms (limits.preamble_timeout)",
            reason: "preamble_timeout",
            stop: Some(StreamCode::PreambleTimeout),
        },
        Case {
            what: "the version byte alone, then silence",
            bytes: vec![1],
            then: Then::Wait,
            code: StatusCode::BadPreamble,
            detail: "no complete preamble within 500ms",
            reason: "preamble_timeout",
            stop: Some(StreamCode::PreambleTimeout),
        },
    ];

    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for case in cases.drain(..) {
        let started = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
        if !case.bytes.is_empty() {
            send.write_all(&case.bytes).await.unwrap();
        }
        match case.then {
            Then::Wait => {}
            Then::Finish => send.finish().unwrap(),
            Then::Reset => send.reset(VarInt::from_u32(0x4d)).unwrap(),
        }
        let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv))
            .await
            .unwrap_or_else(|_| panic!("{}: no answer within 5s", case.what));
        let elapsed = started.elapsed();
        let status = match answer {
            Answer::Status(status, rest) => {
                assert!(rest.is_empty(), "{}: bytes after a refusal", case.what);
                status
            }
            other => panic!("{}: expected a status, got {other:?}", case.what),
        };
        assert_eq!(status.code, case.code, "{}: {status:?}", case.what);
        assert!(
            status.detail.contains(case.detail),
            "{}: the detail {:?} should say {:?}",
            case.what,
            status.detail,
            case.detail
        );
        // A refusal is the whole answer: the acceptor finishes its side.
        assert!(
            read_until_end(&mut recv, case.what).await.is_none(),
            "{}: the acceptor must finish (not reset) after a refusal",
            case.what
        );
        match case.then {
            Then::Wait => {
                let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
                    .await
                    .unwrap_or_else(|_| panic!("{}: no STOP_SENDING within 5s", case.what))
                    .unwrap_or_else(|error| panic!("{}: {error}", case.what));
                let want = case.stop.map(|code| VarInt::from_u32(code.to_u32()));
                assert_eq!(stopped, want, "{}: STOP_SENDING code", case.what);
            }
            // Nothing left to stop after a FIN the acceptor read to the end:
            // finishing is acknowledged (None), or stopped with the code.
            Then::Finish => {
                let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
                    .await
                    .unwrap_or_else(|_| panic!("{}: FIN not acknowledged in 5s", case.what))
                    .unwrap_or_else(|error| panic!("{}: {error}", case.what));
                let bad = VarInt::from_u32(StreamCode::BadPreamble.to_u32());
                assert!(
                    stopped.is_none() || stopped == Some(bad),
                    "{}: unexpected STOP_SENDING {stopped:?}",
                    case.what
                );
            }
            // Our own reset ended the sending half; there is nothing to stop.
            Then::Reset => {}
        }
        if case.reason == "preamble_timeout" {
            assert!(
                elapsed >= SHORT_PREAMBLE_TIMEOUT
                    && elapsed < SHORT_PREAMBLE_TIMEOUT + Duration::from_secs(3),
                "{}: answered after {elapsed:?}, expected just after {SHORT_PREAMBLE_TIMEOUT:?}",
                case.what
            );
        } else {
            assert!(
                elapsed < Duration::from_secs(2),
                "{}: answered only after {elapsed:?}",
                case.what
            );
        }
        *expected.entry(case.reason.to_owned()).or_default() += 1;
    }

    // A reset right behind a valid preamble: the acceptor sees the reset
    // inside the preamble (its buffered bytes are discarded with the
    // reset), or, if it read the preamble first, connects and then resets.
    {
        let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
        send.write_all(&service_preamble("echo")).await.unwrap();
        send.reset(VarInt::from_u32(0x4e)).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv))
            .await
            .expect("an answer to a reset stream within 5s");
        let tcp_reset = VarInt::from_u32(StreamCode::TcpReset.to_u32());
        match answer {
            Answer::Status(status, _) if status.code == StatusCode::BadPreamble => {
                assert!(
                    status.detail.contains("stream failed inside the preamble"),
                    "{status:?}"
                );
                *expected.entry("bad_preamble".to_owned()).or_default() += 1;
            }
            Answer::Status(status, _) if status.code == StatusCode::Ok => {
                let end = read_until_end(&mut recv, "reset behind a preamble").await;
                assert!(
                    matches!(end, Some(ReadError::Reset(code)) if code == tcp_reset),
                    "after OK the acceptor must reset with TCP_RESET, got {end:?}"
                );
            }
            Answer::Failed(ReadError::Reset(code)) if code == tcp_reset => {}
            other => panic!("reset behind a valid preamble: unexpected {other:?}"),
        }
    }

    // A reset while node-b is still connecting the target (the status is
    // not out yet): the connect runs into connect_timeout and the opener,
    // whose receiving half is intact, reads why.
    {
        let started = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
        send.write_all(&service_preamble("blackhole"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        send.reset(VarInt::from_u32(0x4e)).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv))
            .await
            .expect("an answer within 5s");
        match answer {
            Answer::Status(status, _) if status.code == StatusCode::Unreachable => {
                assert!(
                    status.detail.contains("connect timed out after 1s"),
                    "{status:?}"
                );
                assert!(started.elapsed() >= Duration::from_secs(1));
                *expected.entry("unreachable".to_owned()).or_default() += 1;
            }
            // node-b was too slow to read the preamble in 300 ms.
            Answer::Status(status, _) if status.code == StatusCode::BadPreamble => {
                assert!(status.detail.contains("inside the preamble"), "{status:?}");
                *expected.entry("bad_preamble".to_owned()).or_default() += 1;
            }
            other => panic!("reset while the target connects: unexpected {other:?}"),
        }
        assert!(
            read_until_end(&mut recv, "blackhole").await.is_none(),
            "the refusal ends cleanly"
        );
    }

    // A reset mid-transfer, after status OK: the target sees the
    // connection cut, and the opener's receiving half is reset too.
    {
        let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
        let payload = block(11, 32 * 1024);
        send.write_all(&service_preamble("watched-reset"))
            .await
            .unwrap();
        send.write_all(&payload).await.unwrap();
        let first = match tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv)).await
        {
            Ok(Answer::Status(status, rest)) if status.code == StatusCode::Ok => rest,
            other => panic!("mid-transfer reset: expected OK, got {other:?}"),
        };
        let back = read_exactly(&mut recv, first, payload.len(), "mid-transfer reset").await;
        assert!(back == payload, "the echo came back changed");
        send.write_all(&block(12, 8 * 1024)).await.unwrap();
        send.reset(VarInt::from_u32(0x4f)).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(3), reset_seen.recv())
            .await
            .expect("the target sees the end within 3s")
            .expect("watched target");
        assert!(
            matches!(seen, Ending::Reset | Ending::CleanEof),
            "target saw {seen:?}"
        );
        let end = read_until_end(&mut recv, "mid-transfer reset").await;
        let tcp_reset = VarInt::from_u32(StreamCode::TcpReset.to_u32());
        assert!(
            matches!(end, Some(ReadError::Reset(code)) if code == tcp_reset),
            "the acceptor must reset its half with TCP_RESET, got {end:?}"
        );
    }

    // STOP_SENDING from the opener after status OK: the acceptor gives up
    // the stream, resets the target and stops the opener's half.
    {
        let (mut send, mut recv) = connection.open_bi().await.expect("open stream");
        let payload = block(13, 32 * 1024);
        send.write_all(&service_preamble("watched-stop"))
            .await
            .unwrap();
        send.write_all(&payload).await.unwrap();
        let first = match tokio::time::timeout(Duration::from_secs(5), read_answer(&mut recv)).await
        {
            Ok(Answer::Status(status, rest)) if status.code == StatusCode::Ok => rest,
            other => panic!("stop after OK: expected OK, got {other:?}"),
        };
        let back = read_exactly(&mut recv, first, payload.len(), "stop after OK").await;
        assert!(back == payload, "the echo came back changed");
        recv.stop(VarInt::from_u32(0x50)).unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(3), send.stopped())
            .await
            .expect("the acceptor stops our half within 3s")
            .expect("stopped");
        assert_eq!(
            stopped,
            Some(VarInt::from_u32(StreamCode::TcpReset.to_u32())),
            "STOP_SENDING code after our stop"
        );
        let seen = tokio::time::timeout(Duration::from_secs(3), stop_seen.recv())
            .await
            .expect("the target sees the end within 3s")
            .expect("watched target");
        assert!(
            matches!(seen, Ending::Reset | Ending::CleanEof),
            "target saw {seen:?}"
        );
    }

    // Garbage on node-b's UDP port: random bytes, and random bytes shaped
    // like QUIC long headers (Initial-sized, version 1 or unknown) and short
    // headers, so quinn's parsing paths all see some.
    {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        for index in 0..1000u64 {
            let noise = block(1_000 + index, 1500);
            let len = 1 + (usize::from(noise[0]) << 8 | usize::from(noise[1])) % 1400;
            let mut datagram = noise[2..2 + len].to_vec();
            match index % 4 {
                0 | 1 => {
                    datagram = noise[..1200].to_vec();
                    datagram[0] = 0xc0 | (datagram[0] & 0x3f);
                    if index % 4 == 0 {
                        datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                    }
                    datagram[5] %= 21;
                }
                2 => datagram[0] = 0x40 | (datagram[0] & 0x3f),
                _ => {}
            }
            socket
                .send_to(&datagram, node_b.quic_addr())
                .expect("send garbage");
            if index % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    // After all of it: node-b serves the raw peer and node-a's forward.
    raw_echo(&connection, "echo", 4096).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        tcp_echo(node_a.forward_addrs()[0], 4096, 21),
    )
    .await
    .expect("echo through node-a within 5s")
    .expect("echo through node-a");
    assert!(
        connection.close_reason().is_none(),
        "the raw peer's connection was closed: {:?}",
        connection.close_reason()
    );

    let deadline = Instant::now() + Duration::from_secs(2);
    let refused = loop {
        let status = node_b.status();
        let refused = peer_status(&status, "node-a").refused_incoming.clone();
        if refused == expected || Instant::now() >= deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        refused, expected,
        "node-b's refusal counts for node-a, by reason"
    );
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}

// ---------------------------------------------------------------------------
// A daemon process.

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshtun-hostile-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `meshtun run` as a child process, killed (and its log printed if the
/// test is failing) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

/// A process's memory, from /proc/<pid>/status, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
}

impl Daemon {
    fn spawn(config: &Path, log: PathBuf) -> Self {
        let binary = meshtun_lab::meshtun_binary()
            .unwrap_or_else(|error| panic!("{error} (run `cargo build -p meshtun` first)"));
        let file = File::create(&log).expect("create log");
        let child = Command::new(&binary)
            .arg("run")
            .arg("-c")
            .arg(config)
            .env_remove("MESHTUN_CONFIG")
            .env_remove("RUST_LOG")
            .env("MESHTUN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().expect("clone log")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        Self { child, log }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn memory(&self) -> Memory {
        let text = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_else(|error| error.to_string());
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("===== node-b log (last 200 lines) =====");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("free UDP port")
}

fn free_tcp_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free TCP port")
}

// ---------------------------------------------------------------------------
// Test 2.

/// The bulk transfer: this many MiB, cycling through [`POOL`] distinct blocks.
const BULK_MIB: usize = 128;
const POOL: usize = 8;
/// Silent streams opened against the daemon in each round.
const SILENT: usize = 10_000;
/// Paired rounds of (unloaded bulk, bulk with 10,000 silent streams).
const ROUNDS: usize = 5;
/// `[limits] preamble_timeout` of the daemon in test 2.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(2);
/// The default `limits.pending_streams_per_peer`.
const PENDING_LIMIT: usize = 1024;
/// How long after preamble_timeout a silent stream may still be waiting
/// for its answer: generous, the machine is shared.
const ANSWER_MARGIN: Duration = Duration::from_secs(8);

/// A sink: checks every byte against the block pool, then answers the byte
/// count and the offset of the first wrong byte (u64::MAX if none), and
/// closes.
async fn sink_server(pool: Arc<Vec<Bytes>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 256 * 1024];
                let mut offset = 0u64;
                let mut wrong = u64::MAX;
                loop {
                    let read = match tcp.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(read) => read,
                        Err(_) => return,
                    };
                    let mut data = &buffer[..read];
                    while !data.is_empty() {
                        let at = (offset % MIB as u64) as usize;
                        let expected = &pool[(offset / MIB as u64) as usize % POOL][at..];
                        let take = data.len().min(expected.len());
                        if wrong == u64::MAX && data[..take] != expected[..take] {
                            wrong = offset;
                        }
                        offset += take as u64;
                        data = &data[take..];
                    }
                }
                let mut answer = offset.to_be_bytes().to_vec();
                answer.extend_from_slice(&wrong.to_be_bytes());
                let _ = tcp.write_all(&answer).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// Opens a stream to the sink and waits for status OK.
async fn sink_stream(connection: &Connection) -> (SendStream, RecvStream) {
    let (mut send, mut recv) = connection.open_bi().await.expect("open bulk stream");
    send.write_all(&service_preamble("sink")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), read_answer(&mut recv)).await {
        Ok(Answer::Status(status, rest)) if status.code == StatusCode::Ok && rest.is_empty() => {}
        other => panic!("bulk stream: expected status OK, got {other:?}"),
    }
    (send, recv)
}

/// Sends `chunks` and FIN on an answered sink stream, and waits for the
/// sink's verdict; returns the time from the first byte to the verdict.
async fn bulk(mut send: SendStream, mut recv: RecvStream, chunks: &[Bytes]) -> Duration {
    let total: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
    let started = Instant::now();
    let write = async {
        for chunk in chunks {
            send.write_chunk(chunk.clone()).await.expect("bulk write");
        }
        send.finish().expect("finish");
    };
    let read = async { recv.read_to_end(64).await.expect("sink verdict") };
    let ((), verdict) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(write, read)
    })
    .await
    .expect("bulk transfer within 120s");
    let elapsed = started.elapsed();
    assert_eq!(verdict.len(), 16, "sink verdict {verdict:?}");
    let received = u64::from_be_bytes(verdict[..8].try_into().unwrap());
    let wrong = u64::from_be_bytes(verdict[8..].try_into().unwrap());
    assert_eq!(received, total, "the sink got every byte");
    assert_eq!(wrong, u64::MAX, "the sink saw a wrong byte at {wrong}");
    elapsed
}

fn mib_per_second(chunks: &[Bytes], elapsed: Duration) -> f64 {
    let bytes: usize = chunks.iter().map(Bytes::len).sum();
    bytes as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// How a silent stream ended.
#[derive(Debug)]
struct Silent {
    /// The STOP_SENDING code, if one came.
    stop: Option<u64>,
    /// The RESET_STREAM code, if node-b reset its half instead of answering.
    reset: Option<u64>,
    /// The status node-b answered, if any.
    status: Option<Status>,
    /// From the open to the answer.
    after: Duration,
    /// Why the stream did not end as a refusal should.
    problem: Option<String>,
}

async fn watch_silent(
    send: SendStream,
    mut recv: RecvStream,
    opened: Instant,
    deadline: Duration,
) -> Silent {
    let answer = async {
        let answer = read_answer(&mut recv).await;
        let stopped = send.stopped().await;
        (answer, stopped)
    };
    let until = tokio::time::Instant::from_std(opened + deadline);
    match tokio::time::timeout_at(until, answer).await {
        Ok((answer, stopped)) => {
            let after = opened.elapsed();
            let stop = match stopped {
                Ok(Some(code)) => Some(code.into_inner()),
                _ => None,
            };
            match answer {
                Answer::Status(status, _) => Silent {
                    stop,
                    reset: None,
                    status: Some(status),
                    after,
                    problem: None,
                },
                // A stream refused at a limit is reset without a status.
                Answer::Failed(ReadError::Reset(code)) => Silent {
                    stop,
                    reset: Some(code.into_inner()),
                    status: None,
                    after,
                    problem: None,
                },
                other => Silent {
                    stop,
                    reset: None,
                    status: None,
                    after,
                    problem: Some(format!("no status: {other:?}; stopped {stopped:?}")),
                },
            }
        }
        Err(_) => Silent {
            stop: None,
            reset: None,
            status: None,
            after: opened.elapsed(),
            problem: Some(format!("still hanging after {deadline:?}")),
        },
    }
}

/// Opens `count` streams that each carry only the preamble's version byte,
/// and watches each until node-b ends it. Returns the watchers and how long
/// opening took.
async fn open_silent(
    connection: Connection,
    count: usize,
    deadline: Duration,
) -> (Vec<tokio::task::JoinHandle<Silent>>, Duration) {
    let started = Instant::now();
    let mut watchers = Vec::with_capacity(count);
    for _ in 0..count {
        // Taken first, so node-b's timer cannot have started before it.
        let opened = Instant::now();
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(10), connection.open_bi())
            .await
            .expect("stream credit within 10s")
            .expect("open a silent stream");
        // A stream with nothing written does not exist on the wire.
        send.write_all(&[1]).await.expect("write the version byte");
        watchers.push(tokio::spawn(watch_silent(send, recv, opened, deadline)));
    }
    (watchers, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_streams_are_bounded_and_bulk_keeps_half_its_throughput() {
    let _serial = exclusive("silent_streams").await;
    support::init_logging();
    let pki = Pki::new("test");
    let dir = TempDir::new("silent");
    pki.authority
        .write(dir.path(), false)
        .expect("write the CA");
    let node_b = NodeName::new("node-b").unwrap();
    pki.authority
        .issue(&node_b, &[], &[], Validity::days_from_now(2))
        .expect("issue node-b")
        .write(dir.path(), &node_b, false)
        .expect("write node-b's certificate");

    let pool: Arc<Vec<Bytes>> = Arc::new(
        (0..POOL as u64)
            .map(|index| Bytes::from(block(100 + index, MIB)))
            .collect(),
    );
    let chunks: Vec<Bytes> = (0..BULK_MIB)
        .map(|index| pool[index % POOL].clone())
        .collect();
    let sink = sink_server(pool.clone()).await;
    let quic = free_udp_port();
    let admin = free_tcp_port();
    let config = dir.path().join("node-b.toml");
    fs::write(
        &config,
        format!(
            "node = \"node-b\"\n\
             [quic]\nlisten = \"{quic}\"\n\
             [tls]\nca = \"ca.crt\"\ncert = \"node-b.crt\"\nkey = \"node-b.key\"\n\
             [[expose]]\nservice = \"sink\"\ntarget = \"{sink}\"\nallow = [\"node-a\"]\n\
             [limits]\npreamble_timeout = \"{}s\"\n\
             [admin]\nlisten = \"{admin}\"\n",
            PREAMBLE_TIMEOUT.as_secs()
        ),
    )
    .expect("write config");
    let mut daemon = Daemon::spawn(&config, dir.path().join("node-b.log"));

    // Up when the admin endpoint answers.
    let started = Instant::now();
    loop {
        assert!(daemon.is_running(), "node-b exited during start-up");
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(2), http_get(admin, "/metrics")).await
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node-b's admin endpoint did not answer within 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_endpoint, connection) = raw_peer(&pki, quic, Duration::from_secs(10)).await;

    // Warm up (connection windows, the daemon's allocator).
    let (send, recv) = sink_stream(&connection).await;
    bulk(send, recv, &chunks[..16]).await;
    let baseline = daemon.memory();
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_rss(daemon.child.id(), sampling.clone()));

    // Paired rounds: the throughput of one transfer on this shared two-core
    // machine swings by 2x between identical runs, so one unloaded and one
    // loaded transfer, side by side, make a pair, and the median pair
    // decides.
    let mut ratios = Vec::new();
    let mut counted = refused_counts(admin).await;
    for round in 1..=ROUNDS {
        let (send, recv) = sink_stream(&connection).await;
        let unloaded = mib_per_second(&chunks, bulk(send, recv, &chunks).await);
        let episode = episode(&connection, &chunks).await;
        let ratio = episode.loaded / unloaded;
        ratios.push(ratio);
        assert!(
            episode.problems.is_empty(),
            "round {round}: {} silent streams did not end with PENDING_LIMIT or PREAMBLE_TIMEOUT \
             within {:?}; first few: {:?}",
            episode.problems.len(),
            PREAMBLE_TIMEOUT + ANSWER_MARGIN,
            episode.problems.iter().take(5).collect::<Vec<_>>()
        );
        assert_eq!(episode.pending_limited + episode.timed_out, SILENT);
        // Only streams that found a free pending slot wait for their
        // preamble: the first 1024, plus, had opening taken longer than the
        // timeout, those that found a slot a timed-out one freed.
        let windows = 1 + (episode.opening.as_nanos() / PREAMBLE_TIMEOUT.as_nanos()) as usize;
        assert!(
            episode.timed_out >= PENDING_LIMIT && episode.timed_out <= PENDING_LIMIT * windows,
            "round {round}: {} streams timed out; expected {PENDING_LIMIT} (opening took {:?})",
            episode.timed_out,
            episode.opening
        );
        assert!(
            episode.first_timeout >= PREAMBLE_TIMEOUT,
            "round {round}: a PREAMBLE_TIMEOUT came {:?} after its stream opened, \
             before the {PREAMBLE_TIMEOUT:?} timeout",
            episode.first_timeout
        );
        // node-b counted each refusal under its reason, and nothing else.
        let now = refused_counts(admin).await;
        let delta =
            |reason: &str| now.get(reason).unwrap_or(&0) - counted.get(reason).unwrap_or(&0);
        assert_eq!(
            delta("pending_limit") + delta("preamble_timeout"),
            SILENT as u64
        );
        assert_eq!(delta("pending_limit"), episode.pending_limited as u64);
        assert_eq!(delta("preamble_timeout"), episode.timed_out as u64);
        assert_eq!(
            now.values().sum::<u64>() - counted.values().sum::<u64>(),
            SILENT as u64,
            "round {round}: refusals under other reasons: {now:?}"
        );
        counted = now;
        assert!(daemon.is_running(), "node-b died in round {round}");
    }
    sampling.cancel();
    let peak_sampled = sampler.await.expect("sampler");
    let after = daemon.memory();
    let growth = after.hwm.max(peak_sampled).saturating_sub(baseline.rss);
    // The bound, from the limits. Only 1024 silent streams stay
    // (pending_streams_per_peer), each a task, a quinn stream and a
    // preamble buffer of at most 66 bytes: about 4-5 KiB in this debug
    // build, so 5 MiB. Every other stream is reset as it arrives, in the
    // accept loop, with no task. quinn keeps state for each stream the
    // connection may open (16384 x ~80 bytes, 1.3 MiB), and the bulk
    // stream's window is 4 MiB. Measured: 20-25 MiB of growth over 5
    // rounds, most of it allocator arenas of the two worker threads, which
    // stop growing after a round. 64 MiB leaves room for that on a busy
    // machine; a daemon that kept refused streams (5 x 10,000 x 5 KiB =
    // 250 MiB), spawned a task per refused stream (a first round then grew
    // by 37-50 MiB), or read more than a preamble from a silent one fails.
    let bound_kib = 64 * 1024;
    assert!(
        growth < bound_kib,
        "node-b grew by {growth} KiB over {ROUNDS} rounds (bound {bound_kib} KiB): RSS {} KiB \
         before the rounds, peak {peak_sampled} KiB sampled, VmHWM {} KiB after",
        baseline.rss,
        after.hwm
    );
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!(
        median >= 0.5,
        "bulk under 10,000 silent streams kept only {median:.2}x of its unloaded \
         throughput (median of {ratios:.2?})"
    );

    // Still alive and serving.
    let (send, recv) = sink_stream(&connection).await;
    bulk(send, recv, &chunks[..16]).await;
    assert!(
        connection.close_reason().is_none(),
        "the raw peer's connection closed"
    );
    assert!(daemon.is_running(), "node-b died");
}

/// node-b's refused-stream counters for node-a (incoming), by reason, read
/// from /metrics.
async fn refused_counts(admin: SocketAddr) -> BTreeMap<String, u64> {
    let metrics = tokio::time::timeout(Duration::from_secs(5), http_get(admin, "/metrics"))
        .await
        .expect("/metrics within 5s")
        .expect("/metrics");
    let mut counts = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(
            "meshtun_peer_streams_refused_total{peer=\"node-a\",direction=\"incoming\",reason=\"",
        ) else {
            continue;
        };
        let (reason, value) = rest.split_once("\"} ").expect("a sample");
        counts.insert(reason.to_owned(), value.parse::<u64>().expect("a count"));
    }
    counts
}

/// The highest VmRSS of `pid` seen every 20 ms until `stop` (at most 120 s).
async fn sample_rss(pid: u32, stop: CancellationToken) -> u64 {
    let mut peak = 0u64;
    for _ in 0..6000 {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(rss) = text
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
            {
                peak = peak.max(rss);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = stop.cancelled() => break,
        }
    }
    peak
}

/// What one loaded round showed.
struct Episode {
    loaded: f64,
    opening: Duration,
    pending_limited: usize,
    timed_out: usize,
    first_timeout: Duration,
    problems: Vec<Silent>,
}

/// The bulk transfer again, with 10,000 silent streams opened on the same
/// connection while it runs; waits until every silent stream ended (each
/// by its own deadline) and tallies how.
async fn episode(connection: &Connection, chunks: &[Bytes]) -> Episode {
    // The bulk stream is answered first: once 1024 silent streams are
    // pending, a new stream of this peer is refused, by design.
    let (send, recv) = sink_stream(connection).await;
    let opener = tokio::spawn(open_silent(
        connection.clone(),
        SILENT,
        PREAMBLE_TIMEOUT + ANSWER_MARGIN,
    ));
    let loaded = mib_per_second(chunks, bulk(send, recv, chunks).await);
    let (watchers, opening) = tokio::time::timeout(Duration::from_secs(60), opener)
        .await
        .expect("10,000 streams opened within 60s")
        .expect("opener task");
    let mut outcomes = Vec::with_capacity(SILENT);
    for watcher in watchers {
        // Each watcher ends by its own deadline.
        let outcome = tokio::time::timeout(PREAMBLE_TIMEOUT + ANSWER_MARGIN * 2, watcher)
            .await
            .expect("watcher ends by its deadline")
            .expect("watcher task");
        outcomes.push(outcome);
    }
    let pending_code = u64::from(StreamCode::PendingLimit.to_u32());
    let timeout_code = u64::from(StreamCode::PreambleTimeout.to_u32());
    let mut episode = Episode {
        loaded,
        opening,
        pending_limited: 0,
        timed_out: 0,
        first_timeout: Duration::MAX,
        problems: Vec::new(),
    };
    for outcome in outcomes {
        let status = outcome.status.as_ref().map(|status| status.code);
        match (outcome.stop, status, &outcome.problem) {
            (Some(code), None, None)
                if code == pending_code && outcome.reset == Some(pending_code) =>
            {
                episode.pending_limited += 1;
            }
            (Some(code), Some(StatusCode::BadPreamble), None) if code == timeout_code => {
                episode.timed_out += 1;
                episode.first_timeout = episode.first_timeout.min(outcome.after);
            }
            _ => episode.problems.push(outcome),
        }
    }
    episode
}

// ---------------------------------------------------------------------------
// Test 3.

/// The flood: attempts per second, for how long, and its hard bounds.
const FLOOD_RATE: u64 = 5_000;
const FLOOD_FOR: Duration = Duration::from_secs(10);
const FLOOD_MAX_ATTEMPTS: u64 = 50_000;
const FLOOD_HARD_STOP: Duration = Duration::from_secs(15);
/// An echo round trip during the flood fails if it errs, comes back
/// changed, or takes longer than the default `quic.idle_timeout`: a link
/// that quiet would have been declared dead. Latency below that is not
/// asserted. When node-b cannot keep up, its UDP socket overflows (a
/// failed echo's message says how many datagrams it dropped) and node-a's
/// packets are lost with the flood's: recovery costs the established
/// connection seconds, and a stream whose first packet is lost can run
/// into node-b's preamble_timeout (node-a then resets its client).
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt is kept before it is dropped: long enough to
/// answer node-b's Retry and to run an admitted handshake.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// The attempt rate the test insists on. The generator costs ~100-140 us
/// of CPU per attempt (quinn and rustls set up a connection each time; a
/// rate below the floor says what it used), so 5,000/s needs 60-70% of a
/// core, and on this shared two-core machine it competes with both nodes
/// and with other tenants for it: it reached 4,300-5,000/s when it got its
/// share and 2,700-3,500/s when it did not. Half the target still keeps
/// node-b past limits.retry_above (8) and limits.handshakes (64) for the
/// whole flood, which the test checks through node-b's counters.
const FLOOD_RATE_FLOOR: f64 = 2_500.0;

#[derive(Debug, Default)]
struct FloodReport {
    /// `connect` calls made.
    attempts: u64,
    elapsed: Duration,
    /// CPU seconds the generator's thread used.
    cpu: f64,
}

/// Datagrams dropped by the loopback UDP socket bound to `port` (the
/// `drops` column of /proc/net/udp), for a failure message.
fn udp_socket_drops(port: u16) -> u64 {
    let table = fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = fields.get(1)?.split_once(':')?;
            let matches = u16::from_str_radix(local_port, 16).ok()? == port;
            matches
                .then(|| fields.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The machine's count of UDP datagrams dropped for a full receive buffer
/// (`RcvbufErrors` in /proc/net/snmp), for a failure message.
fn udp_receive_buffer_errors() -> u64 {
    let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Starts `probe(round)` every `period`, each on its own task, until `stop`
/// (at most `rounds` times), then waits for all of them (each must bound
/// itself). Returns how many succeeded and the errors of the others.
async fn every<F, P>(
    period: Duration,
    rounds: u64,
    stop: CancellationToken,
    probe: P,
) -> (usize, Vec<String>)
where
    P: Fn(u64) -> F,
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut tick = tokio::time::interval(period);
    let mut running = Vec::new();
    for round in 0..rounds {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        running.push(tokio::spawn(probe(round)));
    }
    let (mut succeeded, mut failures) = (0, Vec::new());
    for (round, task) in running.into_iter().enumerate() {
        match task.await.expect("probe task") {
            Ok(()) => succeeded += 1,
            Err(error) => failures.push(format!("round {round}: {error}")),
        }
    }
    (succeeded, failures)
}

/// CPU seconds (user + system) the calling thread has used.
fn thread_cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/thread-self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The flood's client endpoint, on its own loopback address, with a
/// receive buffer large enough that node-b's answers (Retry packets, mostly)
/// are not dropped while the generator is busy.
fn flood_endpoint() -> Endpoint {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("udp socket");
    // Capped by net.core.rmem_max; a smaller buffer only loses answers.
    let _ = socket.set_recv_buffer_size(4 * MIB);
    socket
        .bind(&"127.0.0.9:0".parse::<SocketAddr>().unwrap().into())
        .expect("bind the flood socket");
    Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("flood endpoint")
}

/// The flood's TLS: it knows the cluster CA (which is public) and checks
/// node-b against it, but presents a certificate of its own CA claiming to
/// be node-a. It offers X25519 alone, the cheapest key exchange node-b
/// accepts, so the generator spends as little as it can per attempt.
fn rogue_client_config(pki: &Pki) -> quinn::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let rogue = Pki::new("rogue");
    let issued = rogue
        .authority
        .issue(
            &NodeName::new("node-a").unwrap(),
            &[],
            &[],
            Validity::days_from_now(2),
        )
        .expect("issue a rogue certificate");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("rogue chain");
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("rogue key");
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(pki.authority.cert_der().clone())
        .expect("cluster CA");
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("server verifier");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    tls.alpn_protocols = vec![meshtun_proto::ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = QuicClientConfig::try_from(tls).expect("QUIC-capable TLS config");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // No streams for node-b to open: quinn sets up state for every stream
    // a connection allows the peer up front, which the generator does not
    // need to pay for on each attempt.
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    config
}

/// Starts a fresh QUIC connection to `target` [`FLOOD_RATE`] times a
/// second for [`FLOOD_FOR`], on this thread's own runtime, and drops each
/// after [`ATTEMPT_TIMEOUT`]. Every attempt has a new connection ID, so each
/// is a new handshake for node-b (a replayed datagram would be routed to
/// the first), and is kept long enough to answer node-b's Retry and, if
/// admitted, to run the handshake: that is what costs node-b work.
fn flood(target: SocketAddr, config: quinn::ClientConfig) -> FloodReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("flood runtime");
    runtime.block_on(async move {
        let endpoint = flood_endpoint();
        let mut report = FloodReport::default();
        // Attempts in the order they started; no task of our own per attempt
        // (quinn runs one per connection already).
        let mut alive: std::collections::VecDeque<(Instant, quinn::Connecting)> =
            std::collections::VecDeque::new();
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while started.elapsed() < FLOOD_FOR.min(FLOOD_HARD_STOP)
            && report.attempts < FLOOD_MAX_ATTEMPTS
        {
            tick.tick().await;
            let now = Instant::now();
            while alive
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= ATTEMPT_TIMEOUT)
            {
                alive.pop_front();
            }
            let due = ((started.elapsed().as_secs_f64() * FLOOD_RATE as f64) as u64)
                .min(FLOOD_MAX_ATTEMPTS);
            // At most 50 per tick, so a late tick does not become a burst
            // that starves the connections' own tasks.
            for _ in report.attempts..due.min(report.attempts + 50) {
                report.attempts += 1;
                if let Ok(attempt) = endpoint.connect_with(config.clone(), target, "node-b") {
                    alive.push_back((now, attempt));
                }
            }
        }
        report.elapsed = started.elapsed();
        // The last attempts get their time too.
        tokio::time::sleep(ATTEMPT_TIMEOUT).await;
        alive.clear();
        endpoint.close(VarInt::from_u32(0), b"flood over");
        report.cpu = thread_cpu_seconds();
        report
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_handshakes_leaves_established_flows_and_admin_responsive() {
    let _serial = exclusive("handshake_flood").await;
    support::init_logging();
    let pki = Pki::new("test");
    let echo = echo_server().await;
    let mut config = NodeSpec::new("node-b")
        .expose("echo", echo, &["node-a"])
        .config();
    config.admin = Some(meshtun_config::Admin {
        listen: "127.0.0.1:0".parse().unwrap(),
    });
    let node_b = Node::start(config, pki.credentials("node-b"), pki.trust.clone())
        .await
        .expect("node-b starts");
    let admin_b = node_b.admin_addr().expect("admin endpoint");
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start(&pki)
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    let forward = node_a.forward_addrs()[0];
    tcp_echo(forward, 1024, 1)
        .await
        .expect("echo before the flood");
    let reconnects_before = peer_status(&node_a.status(), "node-b").reconnects;

    // The flood's clients know the cluster CA (it is public) but present a
    // certificate of their own CA, claiming to be node-a.
    let flood_config = rogue_client_config(&pki);
    let target = node_b.quic_addr();
    let udp_drops_before = udp_receive_buffer_errors();
    let flooding = std::thread::Builder::new()
        .name("flood".to_owned())
        .spawn(move || flood(target, flood_config))
        .expect("spawn the flood thread");
    let started = Instant::now();

    let stop = CancellationToken::new();
    let node_a = Arc::new(node_a);
    // Both probes keep their cadence whatever the latency: each round runs
    // on its own task.
    let echo_probe = tokio::spawn(every(
        Duration::from_millis(100),
        300,
        stop.clone(),
        move |round| async move {
            match tokio::time::timeout(ECHO_TIMEOUT, tcp_echo(forward, 1024, round)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no echo within {ECHO_TIMEOUT:?}")),
            }
        },
    ));
    let admin_probe = tokio::spawn(every(
        Duration::from_millis(500),
        60,
        stop.clone(),
        move |_| async move {
            match tokio::time::timeout(Duration::from_secs(2), http_get(admin_b, "/metrics")).await
            {
                Ok(Ok(body)) if body.contains("# EOF") => Ok(()),
                Ok(Ok(body)) => Err(format!("truncated: {body}")),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("no answer within 2s".to_owned()),
            }
        },
    ));
    let connected_probe = {
        let node_a = node_a.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let peer = NodeName::new("node-b").unwrap();
            let mut disconnected = 0;
            for _ in 0..1000 {
                if !node_a.is_connected(&peer) {
                    disconnected += 1;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    () = stop.cancelled() => break,
                }
            }
            disconnected
        })
    };
    while !flooding.is_finished() {
        assert!(
            started.elapsed() < FLOOD_HARD_STOP + ATTEMPT_TIMEOUT + Duration::from_secs(10),
            "the flood generator did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = flooding.join().expect("flood thread");
    stop.cancel();
    let (echoes, echo_failures) = echo_probe.await.expect("echo probe");
    let (scrapes, admin_failures) = admin_probe.await.expect("admin probe");
    let disconnected = connected_probe.await.expect("connection probe");

    let rate = report.attempts as f64 / report.elapsed.as_secs_f64();
    // Datagrams dropped for a full receive buffer, for a failed echo.
    let node_b_drops = udp_socket_drops(node_b.quic_addr().port());
    let machine_drops = udp_receive_buffer_errors().saturating_sub(udp_drops_before);

    let metrics = tokio::time::timeout(Duration::from_secs(5), http_get(admin_b, "/metrics"))
        .await
        .expect("/metrics within 5s")
        .expect("/metrics");
    let retries = metric_sum(&metrics, "meshtun_incoming_retries_total", &[]);
    let handshake_limit = metric_sum(
        &metrics,
        "meshtun_limit_hits_total",
        &[("limit", "handshakes")],
    );
    let failed = metric_sum(
        &metrics,
        "meshtun_peer_handshakes_failed_total",
        &[("peer", ""), ("direction", "incoming")],
    );
    let status_b = node_b.status();
    let status_a = node_a.status();
    let peer = peer_status(&status_a, "node-b");

    assert!(
        echo_failures.is_empty(),
        "echo round trips failed during the flood: {echo_failures:?}; UDP datagrams \
         dropped for a full receive buffer: {node_b_drops} at node-b's socket, \
         {machine_drops} on the whole machine"
    );
    assert!(
        echoes >= 40,
        "only {echoes} echo round trips ran during the flood"
    );
    assert!(
        admin_failures.is_empty(),
        "/metrics did not answer within 2s: {admin_failures:?}"
    );
    assert!(scrapes >= 10, "only {scrapes} scrapes ran during the flood");
    assert!(
        rate >= FLOOD_RATE_FLOOR,
        "the generator reached only {rate:.0} attempts/s (floor {FLOOD_RATE_FLOOR}/s): \
         {} attempts in {:?}, {:.1} CPU seconds used",
        report.attempts,
        report.elapsed,
        report.cpu
    );
    assert!(
        retries > 0.0 || handshake_limit > 0.0,
        "the flood never met limits.retry_above or limits.handshakes"
    );
    assert!(failed > 0.0, "no failed incoming handshake was counted");
    assert_eq!(
        disconnected, 0,
        "node-a saw no connection to node-b during the flood (last error {:?})",
        peer.last_error
    );
    assert_eq!(
        peer.reconnects, reconnects_before,
        "node-a's connection to node-b was lost and re-dialled (last error {:?})",
        peer.last_error
    );
    assert_eq!(
        peer.connections_up, peer.connections_configured,
        "every shard of node-a kept its connection to node-b"
    );
    assert!(peer.connections_up >= 1);
    assert_eq!(
        peer_status(&status_b, "node-a").connections_incoming,
        peer.connections_up,
        "node-b holds node-a's connections, one per shard of node-a"
    );
    tcp_echo(forward, 1024, 999)
        .await
        .expect("echo after the flood");
    let node_a = Arc::into_inner(node_a).expect("probes are done");
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}
