//! Enrollment with real processes: `meshtun pki token` on the CA host,
//! `meshtun pki serve` answering, `meshtun join` on the new node. The joined
//! certificate passes `meshtun check` and carries traffic between two
//! `meshtun run` daemons; every refusal comes back with its own code, and
//! the server keeps serving valid joins after each refusal and after garbage.
//!
//! Requests that `meshtun join` cannot make (garbage, a rate-limited source)
//! are made by hand over the same TLS, from their own 127.0.0.x source
//! addresses so that the per-address failure limit of one test does not
//! leak into another part of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    echo_server, free_tcp_port, free_udp_port, init_ca, issue, meshtun, meshtun_with, mode_of, run,
    ChildGuard, Finished, TempDir, EXIT_CONFIG,
};
use meshtun_enroll::{CaFingerprint, JoinKey, JoinToken};
use meshtun_proto::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// How long the server may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A CA directory and a `meshtun pki serve` process on 127.0.0.1:0.
struct Server {
    child: ChildGuard,
    addr: SocketAddr,
    fingerprint: String,
    log: PathBuf,
    dir: TempDir,
}

impl Server {
    fn start(label: &str) -> Self {
        let dir = TempDir::new(label);
        init_ca("test", &dir.join("ca"));
        let log = dir.join("serve.log");
        let mut child = ChildGuard::new(
            meshtun()
                .args(["pki", "serve", "--ca"])
                .arg(dir.join("ca"))
                .args(["--listen", "127.0.0.1:0", "--days", "2"])
                .env("MESHTUN_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(Stdio::from(File::create(&log).expect("create log")))
                .spawn()
                .expect("spawn meshtun pki serve"),
        );
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut addr = None;
        let mut fingerprint = None;
        while addr.is_none() || fingerprint.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = received.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "pki serve said nothing in time; its log:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            });
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = Some(rest.parse().expect("listening address"));
            }
            if let Some(rest) = line.strip_prefix("CA fingerprint: ") {
                fingerprint = Some(rest.to_owned());
            }
        }
        Self {
            child,
            addr: addr.expect("address"),
            fingerprint: fingerprint.expect("fingerprint"),
            log,
            dir,
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `meshtun pki token --ca .. --node NODE EXTRA..`; returns the token.
    fn token(&self, node: &str, extra: &[&str]) -> String {
        let ca = self.ca_dir();
        let mut args = vec!["pki", "token", "--ca", path_str(&ca), "--node", node];
        args.extend_from_slice(extra);
        let finished = meshtun_with(&args).success();
        let token = finished
            .stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("mtjoin1.").map(|_| line.trim()))
            .unwrap_or_else(|| panic!("no token printed: {finished}"))
            .to_owned();
        // The printed join command carries the fingerprint, but not the
        // token: a silent prompt before it puts that in MESHTUN_JOIN_TOKEN,
        // out of `ps` and the shell history (`join_with` passes it so).
        let lines: Vec<&str> = finished.stdout.lines().map(str::trim).collect();
        let command = lines
            .iter()
            .position(|line| line.starts_with("meshtun join "))
            .unwrap_or_else(|| panic!("no join command printed: {finished}"));
        assert!(command > 0, "{finished}");
        assert_eq!(
            lines[command - 1],
            "read -rs MESHTUN_JOIN_TOKEN && export MESHTUN_JOIN_TOKEN",
            "{finished}"
        );
        let command = lines[command];
        assert!(!command.contains(&token), "the token is in {command}");
        assert!(!command.contains("--token"), "{command}");
        assert!(command.contains(&self.fingerprint), "{command}");
        assert!(command.contains(&format!("--node {node}")), "{command}");
        assert_eq!(
            finished.stdout.matches(&token).count(),
            1,
            "the token is printed once, on its own line: {finished}"
        );
        token
    }

    /// `meshtun join` against this server with `fingerprint`, the token in
    /// MESHTUN_JOIN_TOKEN as `pki token` tells the operator to pass it.
    fn join_with(&self, fingerprint: &str, token: &str, node: &str, out: &Path) -> Finished {
        run(meshtun().env("MESHTUN_JOIN_TOKEN", token).args([
            "join",
            "--server",
            &self.addr.to_string(),
            "--ca-fingerprint",
            fingerprint,
            "--node",
            node,
            "--out",
            path_str(out),
        ]))
    }

    fn join(&self, token: &str, node: &str, out: &Path) -> Finished {
        self.join_with(&self.fingerprint, token, node, out)
    }

    /// A fresh token for `node`, joined into a fresh directory: must work.
    fn join_fresh(&self, node: &str) -> PathBuf {
        let token = self.token(node, &[]);
        let out = self.dir.join(&format!("fresh-{node}"));
        let finished = self.join(&token, node, &out);
        assert_eq!(
            finished.code(),
            0,
            "a valid join failed: {finished}\n{}",
            self.log()
        );
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!("===== pki serve log =====\n{}", self.log());
        }
    }
}

/// Asserts a join refused with `code` and exit 78.
fn assert_refused(finished: &Finished, code: &str) {
    assert_eq!(finished.code(), EXIT_CONFIG, "{finished}");
    assert!(finished.stderr.contains(&format!("({code})")), "{finished}");
}

/// One exchange by hand over the enrollment TLS, from `source`: sends
/// `frame` as is and returns the answer's JSON.
async fn exchange(
    server: SocketAddr,
    source: &str,
    fingerprint: &str,
    frame: &[u8],
) -> serde_json::Value {
    let mut tls = connect_tls(server, source, fingerprint).await;
    tls.write_all(frame).await.unwrap();
    tls.flush().await.unwrap();
    let mut prefix = [0u8; 4];
    tls.read_exact(&mut prefix).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    tls.read_exact(&mut body).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

async fn connect_from(server: SocketAddr, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(server).await.unwrap()
}

async fn connect_tls(
    server: SocketAddr,
    source: &str,
    fingerprint: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pinned: CaFingerprint = fingerprint.parse().unwrap();
    let config = meshtun_enroll::enrollment_client_config(&pinned).unwrap();
    let tcp = connect_from(server, source).await;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
        .unwrap()
}

/// A framed request for `node` with `token`, as `meshtun join` sends it.
fn request(node: &str, token: &str) -> Vec<u8> {
    let key = JoinKey::generate(&NodeName::new(node).unwrap()).unwrap();
    key.request(&token.parse::<JoinToken>().unwrap()).unwrap()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body);
    framed
}

fn error_code(answer: &serde_json::Value) -> &str {
    answer["error"].as_str().unwrap_or("(no error)")
}

/// The path as a TOML string.
fn toml(path: &Path) -> String {
    format!("{:?}", path_str(path))
}

// ------------------------------------------------------------ end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_passes_check_and_carries_traffic() {
    let server = Server::start("enroll-e2e");
    let token = server.token("node-j", &["--ip", "127.0.0.2", "--dns", "node-j.test"]);
    let out = server.dir.join("node-j");
    let finished = server.join(&token, "node-j", &out).success();
    assert!(finished.stdout.contains("[tls]"), "{finished}");
    assert!(finished.stdout.contains("node = \"node-j\""), "{finished}");
    assert_eq!(mode_of(&out.join("node-j.key")), 0o600);
    assert_eq!(mode_of(&out), 0o700);
    assert_eq!(
        fs::read(out.join("ca.crt")).unwrap(),
        fs::read(server.ca_dir().join("ca.crt")).unwrap()
    );
    let inspected = meshtun_with(&["pki", "inspect", path_str(&out.join("node-j.crt"))]).success();
    for name in ["spiffe://test/node/node-j", "node-j.test", "127.0.0.2"] {
        assert!(inspected.stdout.contains(name), "{name}: {inspected}");
    }

    // The server logged the issuance with the token's id, never its secret.
    let secret = token.rsplit('.').next().unwrap();
    let log = server.log();
    assert!(log.contains("issued a certificate"), "{log}");
    assert!(log.contains(token.split('.').nth(1).unwrap()), "{log}");
    assert!(
        !log.contains(secret),
        "the token secret is in the server log"
    );

    // node-b has a certificate from `pki issue` of the same CA.
    issue(&server.ca_dir(), "node-b", &server.dir.join("node-b"));
    let echo = echo_server().await;
    let node_b_quic = free_udp_port("127.0.0.3");
    let forward = free_tcp_port("127.0.0.1");
    let ca = server.ca_dir().join("ca.crt");
    let node_b = server.dir.join("node-b.toml");
    fs::write(
        &node_b,
        format!(
            "node = \"node-b\"\n[quic]\nlisten = \"{node_b_quic}\"\n\
             [tls]\nca = {}\ncert = {}\nkey = {}\n\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo}\"\nallow = [\"node-j\"]\n",
            toml(&ca),
            toml(&server.dir.join("node-b/node-b.crt")),
            toml(&server.dir.join("node-b/node-b.key")),
        ),
    )
    .unwrap();
    let node_j = server.dir.join("node-j.toml");
    fs::write(
        &node_j,
        format!(
            "node = \"node-j\"\n[quic]\nlisten = \"127.0.0.2:0\"\n\
             [tls]\nca = {}\ncert = {}\nkey = {}\n\
             [[peer]]\nname = \"node-b\"\naddr = \"{node_b_quic}\"\n\
             [[forward]]\nlisten = \"{forward}\"\npeer = \"node-b\"\nservice = \"echo\"\n",
            toml(&out.join("ca.crt")),
            toml(&out.join("node-j.crt")),
            toml(&out.join("node-j.key")),
        ),
    )
    .unwrap();
    let checked = meshtun_with(&["check", "-c", path_str(&node_j)]).success();
    assert!(checked.stdout.contains("OK"), "{checked}");

    let _node_b = daemon(&node_b, &server.dir.join("node-b.log"));
    let _node_j = daemon(&node_j, &server.dir.join("node-j.log"));
    let started = Instant::now();
    loop {
        match echo_through(forward).await {
            Ok(()) => break,
            Err(error) if started.elapsed() > Duration::from_secs(15) => panic!(
                "no echo through the joined node within 15 s: {error}\n--- node-j ---\n{}\n--- node-b ---\n{}",
                fs::read_to_string(server.dir.join("node-j.log")).unwrap_or_default(),
                fs::read_to_string(server.dir.join("node-b.log")).unwrap_or_default(),
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn daemon(config: &Path, log: &Path) -> ChildGuard {
    let log = File::create(log).unwrap();
    ChildGuard::new(
        meshtun()
            .arg("run")
            .arg("-c")
            .arg(config)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    )
}

async fn echo_through(addr: SocketAddr) -> std::io::Result<()> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let mut tcp = TcpStream::connect(addr).await?;
        let message = b"joined by token";
        tcp.write_all(message).await?;
        let mut back = [0u8; 15];
        tcp.read_exact(&mut back).await?;
        if &back != message {
            return Err(std::io::Error::other("wrong echo"));
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

// ------------------------------------------------------------ refusals

#[test]
fn a_token_and_a_join_set_how_long_the_certificate_lasts() {
    let server = Server::start("enroll-valid-for");
    let lifetime_of = |out: &Path, node: &str| {
        let inspected = meshtun_pki::inspect_file(&out.join(format!("{node}.crt")))
            .expect("certificate")
            .remove(0);
        inspected
            .not_after
            .duration_since(std::time::SystemTime::now())
            .expect("valid")
    };
    // The token grants 12 hours.
    let token = server.token("node-v", &["--valid-for", "12h"]);
    let out = server.dir.join("valid-for-token");
    server.join(&token, "node-v", &out).success();
    let left = lifetime_of(&out, "node-v");
    assert!(
        left > Duration::from_secs(12 * 3600 - 120) && left <= Duration::from_secs(12 * 3600),
        "{left:?}"
    );
    // The node asks for less: it gets less.
    let token = server.token("node-w", &["--valid-for", "12h"]);
    let out = server.dir.join("valid-for-join");
    let joined = run(meshtun().env("MESHTUN_JOIN_TOKEN", &token).args([
        "join",
        "--server",
        &server.addr.to_string(),
        "--ca-fingerprint",
        &server.fingerprint,
        "--node",
        "node-w",
        "--valid-for",
        "1h",
        "--out",
        path_str(&out),
    ]));
    assert_eq!(joined.code(), 0, "{joined}");
    let left = lifetime_of(&out, "node-w");
    assert!(
        left > Duration::from_secs(3600 - 120) && left <= Duration::from_secs(3600),
        "{left:?}"
    );
    // The ledger has both, as joins.
    let list = meshtun_with(&["pki", "list", "--ca", path_str(&server.ca_dir())]).success();
    for node in ["node-v", "node-w"] {
        assert!(
            list.stdout
                .lines()
                .any(|line| line.contains(node) && line.contains(" join ")),
            "{list}"
        );
    }
}

#[test]
fn used_and_expired_tokens_are_refused_and_the_server_keeps_serving() {
    let server = Server::start("enroll-used");
    let token = server.token("node-u", &[]);
    server
        .join(&token, "node-u", &server.dir.join("first"))
        .success();
    let again = server.join(&token, "node-u", &server.dir.join("second"));
    assert_refused(&again, "token_used");
    assert!(again.stderr.contains("pki token"), "{again}");
    assert!(
        !server.dir.join("second/node-u.key").exists(),
        "a refused join writes no key"
    );
    server.join_fresh("node-a");

    let short = server.token("node-e", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    assert_refused(
        &server.join(&short, "node-e", &server.dir.join("late")),
        "token_expired",
    );
    server.join_fresh("node-b");

    let log = server.log();
    for code in ["token_used", "token_expired"] {
        assert!(
            log.contains(&format!("code={code}")) && log.contains("WARN"),
            "{code} not logged at warn:\n{log}"
        );
    }
}

#[test]
fn a_wrong_ca_fingerprint_or_node_name_is_refused() {
    let server = Server::start("enroll-names");
    let other = TempDir::new("enroll-other-ca");
    init_ca("test", &other.join("ca"));
    let other_fingerprint = meshtun_with(&["pki", "inspect", path_str(&other.join("ca/ca.crt"))])
        .success()
        .stdout
        .split_whitespace()
        .find(|word| word.starts_with("sha256:"))
        .unwrap()
        .to_owned();
    assert_ne!(other_fingerprint, server.fingerprint);

    let token = server.token("node-f", &[]);
    let refused = server.join_with(&other_fingerprint, &token, "node-f", &server.dir.join("x"));
    assert_eq!(refused.code(), EXIT_CONFIG, "{refused}");
    let expected = format!(
        "the server's CA has fingerprint {}, expected {other_fingerprint}: wrong --ca-fingerprint or a server that is not your CA",
        server.fingerprint
    );
    assert!(refused.stderr.contains(&expected), "{refused}");
    // The client stopped before sending the token: it still works.
    server
        .join(&token, "node-f", &server.dir.join("f"))
        .success();

    let token = server.token("node-x", &[]);
    let wrong = server.join(&token, "node-y", &server.dir.join("y"));
    assert_refused(&wrong, "wrong_name");
    assert!(
        wrong.stderr.contains("node-x") && wrong.stderr.contains("node-y"),
        "{wrong}"
    );
    // A wrong name does not spend the token.
    server
        .join(&token, "node-x", &server.dir.join("x"))
        .success();
    server.join_fresh("node-c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_the_server_keeps_serving() {
    let server = Server::start("enroll-garbage");

    // Not TLS at all: the handshake fails, the connection closes.
    let mut plain = connect_from(server.addr, "127.0.0.21").await;
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest))
        .await
        .expect("the server closes a non-TLS connection");
    server.join_fresh("node-a");

    // TLS, then a frame of junk, then a length over the limit.
    let answer = exchange(
        server.addr,
        "127.0.0.22",
        &server.fingerprint,
        &frame(b"\x00junk{"),
    )
    .await;
    assert_eq!(error_code(&answer), "bad_request", "{answer}");
    let too_long = (64 * 1024 + 1u32).to_be_bytes();
    let answer = exchange(server.addr, "127.0.0.23", &server.fingerprint, &too_long).await;
    assert_eq!(error_code(&answer), "bad_request", "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("65536"),
        "{answer}"
    );
    server.join_fresh("node-b");

    // A well-formed token the server never made.
    let stranger = format!("mtjoin1.{}.{}", "ab".repeat(8), "cd".repeat(32));
    assert_refused(
        &server.join(&stranger, "node-s", &server.dir.join("s")),
        "unknown_token",
    );
    server.join_fresh("node-c");

    let log = server.log();
    assert!(log.contains("source=127.0.0.21"), "{log}");
    assert!(log.contains("code=bad_request"), "{log}");
    assert!(log.contains("code=unknown_token"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_are_rate_limited() {
    let server = Server::start("enroll-rate");
    let token = server.token("node-r", &[]);
    let source = "127.0.0.30";
    for attempt in 0..5 {
        let stranger = format!("mtjoin1.{:016x}.{}", attempt, "ee".repeat(32));
        let answer = exchange(
            server.addr,
            source,
            &server.fingerprint,
            &request("node-r", &stranger),
        )
        .await;
        assert_eq!(
            error_code(&answer),
            "unknown_token",
            "attempt {attempt}: {answer}"
        );
    }
    // Now even a valid token is turned away from that address ...
    let answer = exchange(
        server.addr,
        source,
        &server.fingerprint,
        &request("node-r", &token),
    )
    .await;
    assert_eq!(error_code(&answer), "rate_limited", "{answer}");
    // ... and stays unused, so it works from another address.
    server
        .join(&token, "node-r", &server.dir.join("r"))
        .success();

    let log = server.log();
    assert!(
        log.contains(&format!("source={source}")) && log.contains("too many failed attempts"),
        "{log}"
    );
    assert!(log.contains("code=rate_limited"), "{log}");
}
