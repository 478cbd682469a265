//! Short-lived certificates with real daemons: nodes renewing their own
//! certificates against `meshtun pki serve` under load, a live connection
//! cut when its peer's certificate expires, and `pki revoke --node` cutting
//! every certificate of a node, renewed or not.
//!
//! node-a forwards `echo` to node-b, which exposes it. Certificates come
//! from a CA in the test's directory, are recorded in its ledger, and live
//! in `DIR/keys`, which the daemons may rewrite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use common::{
    echo_checked, echo_server, free_tcp_ports, free_udp_port, meshtun, meshtun_with, peer_serials,
    peer_status, status_of, ChildGuard, Daemon, TempDir, MIB_BYTES,
};
use meshtun_pki::{Authority, Issuance, IssuedRecord, Ledger, RevocationList, Validity, CRL_FILE};
use meshtun_proto::NodeName;

/// How long the daemons may take to carry a first echo.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// `meshtun pki serve` as a child process, with what it printed.
struct CaServer {
    _child: ChildGuard,
    addr: String,
    fingerprint: String,
}

impl CaServer {
    fn start(ca: &Path) -> Self {
        let mut child = meshtun()
            .args(["pki", "serve", "--ca"])
            .arg(ca)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pki serve");
        let stdout = child.stdout.take().expect("stdout");
        let child = ChildGuard::new(child);
        let mut addr = None;
        let mut fingerprint = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read pki serve output");
            if let Some(rest) = line.strip_prefix("listening on ") {
                addr = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("CA fingerprint: ") {
                fingerprint = Some(rest.trim().to_owned());
            }
            if addr.is_some() && fingerprint.is_some() {
                break;
            }
        }
        Self {
            _child: child,
            addr: addr.expect("pki serve says where it listens"),
            fingerprint: fingerprint.expect("pki serve prints the CA fingerprint"),
        }
    }
}

/// The CA, the ledger, and each node's files.
struct Pki {
    dir: TempDir,
    authority: Authority,
}

impl Pki {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        let authority =
            Authority::generate("test", Validity::days_from_now(2)).expect("generate CA");
        authority.write(&dir.join("ca"), false).expect("write CA");
        RevocationList::new()
            .write(&authority, &dir.join("ca"), SystemTime::now(), 30)
            .expect("write an empty CRL");
        Self { dir, authority }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn keys(&self) -> PathBuf {
        self.dir.join("keys")
    }

    fn cert(&self, node: &str) -> PathBuf {
        self.keys().join(format!("{node}.crt"))
    }

    /// Issues `node` a certificate valid for `lifetime` from now, recorded
    /// in the ledger as `pki issue` does, into `DIR/keys`.
    fn issue(&self, node: &str, lifetime: Duration) {
        let name = NodeName::new(node).expect("node name");
        let issued = self
            .authority
            .issue(&name, &[], &[], Validity::from_now(lifetime))
            .expect("issue");
        let now = SystemTime::now();
        let record =
            IssuedRecord::of_pem(&issued.cert_pem, Issuance::Issue, None, now).expect("record");
        Ledger::new(&self.ca()).record(record, now).expect("ledger");
        issued
            .write(&self.keys(), &name, true)
            .expect("write node files");
    }

    fn serial(&self, node: &str) -> String {
        meshtun_pki::inspect_file(&self.cert(node))
            .expect("certificate")
            .remove(0)
            .serial
    }
}

/// Two daemons: node-b exposes `echo`, node-a forwards to it.
struct Pair {
    node_a: Daemon,
    // Kept alive for the test; dropping it kills the daemon.
    _node_b: Daemon,
    echo: SocketAddr,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
}

/// `[tls]` of `node` in `pki`, with `renew` if given and the CA's CRL.
fn tls_section(pki: &Pki, node: &str, renew: Option<(&CaServer, f64)>) -> String {
    let path = |path: PathBuf| path.to_str().expect("UTF-8 path").to_owned();
    let renew = renew
        .map(|(server, at)| {
            format!(
                "renew = {{ server = \"{}\", ca_fingerprint = \"{}\", at = {at} }}\n",
                server.addr, server.fingerprint
            )
        })
        .unwrap_or_default();
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncrl = \"{}\"\n{renew}",
        path(pki.ca().join("ca.crt")),
        path(pki.cert(node)),
        path(pki.keys().join(format!("{node}.key"))),
        path(pki.ca().join(CRL_FILE)),
    )
}

impl Pair {
    async fn start(pki: &Pki, renew: Option<(&CaServer, f64)>) -> Self {
        let echo_target = echo_server().await;
        let node_b_quic = free_udp_port("127.0.0.3");
        let [echo, admin_a, admin_b] = free_tcp_ports("127.0.0.1", 3)[..] else {
            unreachable!("three ports asked for")
        };
        let quic = "idle_timeout = \"3s\"\nkeep_alive = \"1s\"\nreconnect_max = \"1s\"\n";
        let node_b_config = format!(
            "node = \"node-b\"\n[quic]\nlisten = \"{node_b_quic}\"\n{quic}{}\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo_target}\"\nallow = [\"node-a\"]\n\
             [limits]\nshards = 2\n[admin]\nlisten = \"{admin_b}\"\n",
            tls_section(pki, "node-b", renew)
        );
        let node_a_config = format!(
            "node = \"node-a\"\n[quic]\nlisten = \"127.0.0.2:0\"\n{quic}{}\
             [[peer]]\nname = \"node-b\"\naddr = \"{node_b_quic}\"\n\
             [[forward]]\nlisten = \"{echo}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [limits]\nshards = 2\n[admin]\nlisten = \"{admin_a}\"\n",
            tls_section(pki, "node-a", renew)
        );
        let write = |name: &str, text: &str| {
            let path = pki.dir.join(name);
            fs::write(&path, text).expect("write config");
            path
        };
        let node_b = Daemon::spawn(
            "node-b",
            write("node-b.toml", &node_b_config),
            pki.dir.join("node-b.log"),
        );
        let node_a = Daemon::spawn(
            "node-a",
            write("node-a.toml", &node_a_config),
            pki.dir.join("node-a.log"),
        );
        let pair = Self {
            node_a,
            _node_b: node_b,
            echo,
            admin_a,
            admin_b,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match echo_checked(pair.echo, MIB_BYTES, |_| {}).await {
                Ok((received, None)) if received == MIB_BYTES => break,
                outcome => assert!(
                    Instant::now() < deadline,
                    "no echo through node-a within {READY_TIMEOUT:?}: {outcome:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pair
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_under_load_keeps_every_byte_and_every_stream() {
    let pki = Pki::new("renew-load");
    let lifetime = Duration::from_secs(120);
    pki.issue("node-a", lifetime);
    pki.issue("node-b", lifetime);
    let first = (pki.serial("node-a"), pki.serial("node-b"));
    let server = CaServer::start(&pki.ca());
    let pair = Pair::start(&pki, Some((&server, 0.5))).await;

    // Three minutes of echoes, 2 MiB each on a connection of its own:
    // every byte is checked, and any reset, refusal or short echo fails.
    let until = Instant::now() + Duration::from_secs(180);
    let mut echoes = 0u64;
    let mut bytes = 0u64;
    while Instant::now() < until {
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            echo_checked(pair.echo, 2 * MIB_BYTES, |_| {}),
        )
        .await
        .unwrap_or_else(|_| panic!("echo {echoes} took over 30 s"));
        match outcome {
            Ok((received, None)) if received == 2 * MIB_BYTES => {
                echoes += 1;
                bytes += received as u64;
            }
            other => panic!("echo {echoes} after {bytes} bytes failed: {other:?}"),
        }
    }
    let status_a = status_of(pair.admin_a).await;
    let status_b = status_of(pair.admin_b).await;
    for (node, status, old) in [
        ("node-a", &status_a, &first.0),
        ("node-b", &status_b, &first.1),
    ] {
        let renewal = &status["certificate"]["renewal"];
        assert!(
            renewal["successes"].as_u64() >= Some(1),
            "{node} renewed at least once: {renewal}"
        );
        assert_eq!(renewal["failures"], 0, "{node}: {renewal}");
        assert_eq!(renewal["last_error"], serde_json::Value::Null, "{node}");
        let serial = status["certificate"]["serial"].as_str().expect("serial");
        assert_ne!(serial, old, "{node} runs a renewed certificate");
        assert_eq!(serial, pki.serial(node), "{node} runs the file it wrote");
        // The previous pair is kept beside the new one.
        assert!(pki.keys().join(format!("{node}.crt.prev")).exists());
        assert!(pki.keys().join(format!("{node}.key.prev")).exists());
    }
    // No stream was refused or reset, and no connection was cut for an
    // expired certificate: connections were replaced in time.
    let peer = peer_status(pair.admin_a, "node-b").await;
    assert_eq!(peer["refused_outgoing"], serde_json::json!({}), "{peer}");
    assert_eq!(peer["connections_cut"], serde_json::Value::Null, "{peer}");
    let peer = peer_status(pair.admin_b, "node-a").await;
    assert_eq!(peer["refused_incoming"], serde_json::json!({}), "{peer}");
    assert_eq!(peer["connections_cut"], serde_json::Value::Null, "{peer}");
    // The ledger holds the first certificates and every renewal.
    let ledger = Ledger::new(&pki.ca()).records().expect("ledger");
    // Each side's connections carry renewed certificates of the other, not
    // the first ones (long expired), though perhaps not the very latest.
    for (admin, peer, first) in [
        (pair.admin_a, "node-b", &first.1),
        (pair.admin_b, "node-a", &first.0),
    ] {
        let seen = peer_serials(admin, peer).await;
        assert!(!seen.is_empty(), "{peer} is connected");
        for serial in &seen {
            assert_ne!(serial, first, "{peer}'s first certificate is still in use");
            assert!(
                ledger
                    .iter()
                    .any(|record| &record.serial == serial && record.how == Issuance::SelfRenew),
                "{peer}'s certificate {serial} in use is a renewal in the ledger"
            );
        }
    }
    let renewals = ledger
        .iter()
        .filter(|record| record.how == Issuance::SelfRenew)
        .count() as u64;
    let successes = status_a["certificate"]["renewal"]["successes"]
        .as_u64()
        .unwrap_or(0)
        + status_b["certificate"]["renewal"]["successes"]
            .as_u64()
            .unwrap_or(0);
    assert_eq!(renewals, successes, "{ledger:#?}");
    drop(pair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_certificate_cuts_its_idle_connection_and_new_streams_are_refused() {
    let pki = Pki::new("expiry-cut");
    // node-a, the dialer, holds a certificate that expires 25 s from now;
    // no renewal is configured.
    pki.issue("node-a", Duration::from_secs(25));
    pki.issue("node-b", Duration::from_secs(86_400));
    let expires = SystemTime::now() + Duration::from_secs(25);
    let pair = Pair::start(&pki, None).await;
    assert!(peer_status(pair.admin_b, "node-a").await["connections_incoming"].as_u64() >= Some(1));

    // Idle until the certificate expires, then a few seconds at most.
    let wait = expires
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(wait).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let peer = peer_status(pair.admin_b, "node-a").await;
        if peer["connections_incoming"] == 0
            && peer["connections_cut"]["expired"].as_u64() >= Some(1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-b still holds node-a's connections 5 s after its certificate expired: {peer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The dialer heard why.
    let log_a = fs::read_to_string(&pair.node_a.log).expect("node-a log");
    assert!(log_a.contains("certificate expired"), "{log_a}");
    // A client's new stream is refused: node-a cannot connect any more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = echo_checked(pair.echo, MIB_BYTES, |_| {}).await;
    assert!(
        !matches!(refused, Ok((received, None)) if received == MIB_BYTES),
        "an echo went through after the certificate expired: {refused:?}"
    );
    assert_eq!(
        peer_status(pair.admin_a, "node-b").await["connections_up"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_node_cuts_its_renewed_and_its_old_certificate() {
    let pki = Pki::new("revoke-node");
    pki.issue("node-a", Duration::from_secs(3600));
    pki.issue("node-b", Duration::from_secs(3600));
    let server = CaServer::start(&pki.ca());
    let pair = Pair::start(&pki, Some((&server, 0.67))).await;
    let old_serial = pki.serial("node-a");

    // node-a renews by hand; the running daemon picks the files up.
    let renewed =
        meshtun_with(&["renew", "-c", pki.dir.join("node-a.toml").to_str().unwrap()]).success();
    assert!(renewed.stdout.contains("renewed"), "{renewed}");
    let new_serial = pki.serial("node-a");
    assert_ne!(new_serial, old_serial);
    let deadline = Instant::now() + Duration::from_secs(15);
    while status_of(pair.admin_a).await["certificate"]["serial"] != new_serial.as_str() {
        assert!(
            Instant::now() < deadline,
            "node-a did not load its renewed certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A second node-a daemon runs the previous pair (.prev): both
    // certificates are in use at once, as a thief's copy would be.
    let old = pki.dir.join("old");
    fs::create_dir_all(&old).expect("dir");
    fs::copy(pki.keys().join("node-a.crt.prev"), old.join("node-a.crt")).expect("copy");
    fs::copy(pki.keys().join("node-a.key.prev"), old.join("node-a.key")).expect("copy");
    let node_a_config = fs::read_to_string(pki.dir.join("node-a.toml")).expect("config");
    // Distinct from each other; the pair's own ports are taken by now.
    let [admin_old, echo_old] = free_tcp_ports("127.0.0.1", 2)[..] else {
        unreachable!("two ports asked for")
    };
    let old_config = node_a_config
        .replace(
            pki.keys().join("node-a.crt").to_str().unwrap(),
            old.join("node-a.crt").to_str().unwrap(),
        )
        .replace(
            pki.keys().join("node-a.key").to_str().unwrap(),
            old.join("node-a.key").to_str().unwrap(),
        )
        .replace(&pair.admin_a.to_string(), &admin_old.to_string())
        .replace(&pair.echo.to_string(), &echo_old.to_string())
        .lines()
        .filter(|line| !line.starts_with("renew ="))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(pki.dir.join("node-a-old.toml"), old_config).expect("write");
    let mut node_a_old = Daemon::spawn(
        "node-a-old",
        pki.dir.join("node-a-old.toml"),
        pki.dir.join("node-a-old.log"),
    );
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((received, None)) = echo_checked(echo_old, MIB_BYTES, |_| {}).await {
            if received == MIB_BYTES {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the old certificate did not connect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seen = peer_serials(pair.admin_b, "node-a").await;
    seen.sort();
    let mut both = vec![old_serial.clone(), new_serial.clone()];
    both.sort();
    assert_eq!(seen, both, "node-b sees both certificates of node-a in use");

    // Revoke every certificate of node-a; node-b reloads its CRL by itself.
    let revoke = meshtun_with(&[
        "pki",
        "revoke",
        "--ca",
        pki.ca().to_str().unwrap(),
        "--node",
        "node-a",
    ])
    .success();
    assert!(revoke.stdout.contains("revoked 2 certificates"), "{revoke}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let peer = peer_status(pair.admin_b, "node-a").await;
        if peer["connections_incoming"] == 0
            && peer["connections_cut"]["revoked"].as_u64() >= Some(2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-b still holds node-a's connections after the CRL: {peer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Neither certificate connects again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, admin, echo) in [
        ("renewed", pair.admin_a, pair.echo),
        ("old", admin_old, echo_old),
    ] {
        let peer = peer_status(admin, "node-b").await;
        assert_eq!(peer["connections_up"], 0, "{name}: {peer}");
        let refused = echo_checked(echo, MIB_BYTES, |_| {}).await;
        assert!(
            !matches!(refused, Ok((received, None)) if received == MIB_BYTES),
            "{name}: an echo went through after revocation"
        );
    }
    assert_eq!(
        peer_status(pair.admin_b, "node-a").await["connections_incoming"],
        0
    );
    // And the renewal server refuses the revoked node.
    let again = meshtun_with(&["renew", "-c", pki.dir.join("node-a.toml").to_str().unwrap()]);
    assert_eq!(again.code(), 1, "{again}");
    assert!(again.stderr.contains("revoked"), "{again}");
    node_a_old.kill();
}
