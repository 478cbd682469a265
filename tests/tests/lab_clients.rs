//! Real clients through the tunnel between two lab hosts (issue 3, evidence
//! 5): iperf3 (a control and a data connection to one forwarded port) and a
//! pyzmq ROUTER/DEALER exchange shaped like vLLM's data-parallel handshake.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod lab_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use lab_support::{
    require_netns_and_pyzmq, require_tool, start_recipe_node, wait_listening, Process,
};
use meshtun_lab::{require_netns, Host, Lab};

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Starts node-b exposing `service` at `target` to node-a, and node-a
/// forwarding `forward` to it.
fn pair(
    lab: &Lab,
    service: &str,
    target: SocketAddr,
    forward: SocketAddr,
) -> (meshtun_lab::Daemon, meshtun_lab::Daemon) {
    let daemon_b = lab
        .start(1, &lab.config(1).expose(service, target, &["node-a"]))
        .unwrap();
    let daemon_a = lab
        .start(
            0,
            &lab.config(0)
                .peer(lab.host(1))
                .forward(forward, "node-b", service),
        )
        .unwrap();
    (daemon_a, daemon_b)
}

/// The number after `"key":` at or after `from` in pretty JSON text.
fn json_number_after(text: &str, from: usize, key: &str) -> Option<f64> {
    let at = from + text.get(from..)?.find(&format!("\"{key}\""))?;
    let rest = text.get(at + key.len() + 2..)?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// (e) iperf3 between two hosts through the tunnel: the control connection
/// and the data connection are two forwarded connections to one port.
#[test]
fn iperf3_runs_through_the_tunnel() {
    let test = "iperf3_runs_through_the_tunnel";
    if !require_netns(test) {
        return;
    }
    if !require_tool(test, "iperf3", Command::new("iperf3").arg("--version")) {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let port = 5201;
    let local = addr("127.0.0.1:5201");
    let mut server = b.command("iperf3");
    server.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    let server = Process::spawn(server);
    assert!(wait_listening(b, port), "iperf3 server did not listen");
    let (daemon_a, daemon_b) = pair(&lab, "iperf3", local, local);

    let mut client = a.command("iperf3");
    client.args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "3", "-J"]);
    let (status, json, stderr) = Process::spawn(client).finish(Duration::from_secs(40));
    drop(server);
    let logs = || {
        format!(
            "--- iperf3 stdout ---\n{json}\n--- stderr ---\n{stderr}\n--- A ---\n{}\n--- B ---\n{}",
            daemon_a.log_since_start(),
            daemon_b.log_since_start()
        )
    };
    assert!(
        status.is_some_and(|status| status.success()),
        "iperf3 client failed ({status:?})\n{}",
        logs()
    );
    assert!(
        !json.contains("\"error\""),
        "iperf3 reported an error\n{}",
        logs()
    );
    let end = json
        .find("\"end\"")
        .unwrap_or_else(|| panic!("no end\n{}", logs()));
    let received = json
        .get(end..)
        .and_then(|tail| tail.find("\"sum_received\""))
        .map(|at| end + at)
        .and_then(|at| json_number_after(&json, at, "bits_per_second"));
    assert!(
        received.is_some_and(|bits| bits > 0.0),
        "iperf3 measured a rate\n{}",
        logs()
    );
}

fn zmq_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/zmq_handshake.py")
}

/// (f) A pyzmq ROUTER (host B) and two DEALERs (host A) exchange 20 rounds
/// of "ready" + payload / "config" through the tunnel, as vLLM's
/// data-parallel ranks do with their coordinator.
#[test]
fn zmq_router_dealer_handshake_runs_through_the_tunnel() {
    let test = "zmq_router_dealer_handshake_runs_through_the_tunnel";
    if !require_netns_and_pyzmq(test) {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let port = "5555";
    let local = addr("127.0.0.1:5555");
    let script = zmq_script();
    let (dealers, rounds) = ("2", "20");
    let arguments = ["--port", port, "--dealers", dealers, "--rounds", rounds];

    let mut server = b.command("python3");
    server
        .arg(&script)
        .arg("server")
        .args(arguments)
        .args(["--timeout", "40"]);
    let server = Process::spawn(server);
    assert!(wait_listening(b, 5555), "ROUTER did not listen");
    let (daemon_a, daemon_b) = pair(&lab, "zmq", local, local);

    let mut client = a.command("python3");
    client
        .arg(&script)
        .arg("client")
        .args(arguments)
        .args(["--timeout", "30"]);
    let (client_status, client_out, client_err) =
        Process::spawn(client).finish(Duration::from_secs(45));
    let (server_status, server_out, server_err) = server.finish(Duration::from_secs(15));
    let logs = format!(
        "--- client ---\n{client_out}{client_err}\n--- server ---\n{server_out}{server_err}\n--- A ---\n{}\n--- B ---\n{}",
        daemon_a.log_since_start(),
        daemon_b.log_since_start()
    );
    assert!(
        client_status.is_some_and(|status| status.success()),
        "DEALER side failed ({client_status:?})\n{logs}"
    );
    assert!(
        server_status.is_some_and(|status| status.success()),
        "ROUTER side failed ({server_status:?})\n{logs}"
    );
    assert!(
        client_out.contains("client OK rounds=20 dealers=2 messages=40"),
        "{logs}"
    );
    assert!(server_out.contains("server OK messages=40"), "{logs}");
}

/// Whether a TCP connect from `host` to `target` is answered within `wait`
/// (`Some(true)` connected, `Some(false)` refused), or `None` when nothing
/// answers at all: the SYN was dropped.
fn probe(host: &Host, target: SocketAddr, wait: Duration) -> Option<bool> {
    host.run(
        move || match std::net::TcpStream::connect_timeout(&target, wait) {
            Ok(_) => Some(true),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => Some(false),
            Err(_) => None,
        },
    )
    .unwrap()
}

/// The two-node vLLM recipe (`examples/vllm-dp-2node/`) run as written
/// (`meshtun overlay up`, then the daemon, on both nodes), with the
/// nftables guard (`examples/nftables/`) loaded on the head, and pyzmq
/// standing in for vLLM's DP handshake socket, bound where
/// `--data-parallel-address` puts it, on the head's overlay address: the
/// handshake goes through meshtun, the public API port stays reachable,
/// and a service that listens on every interface (as torch's TCPStore
/// does) is not reachable from the other node any more. `meshtun status`
/// on the headless node shows the head connected and the overlay guard on.
#[test]
fn the_vllm_two_node_recipe_runs_as_written_behind_the_nftables_guard() {
    let test = "the_vllm_two_node_recipe_runs_as_written_behind_the_nftables_guard";
    if !require_netns_and_pyzmq(test) {
        return;
    }
    let lab = Lab::new(&["node-0", "node-1"]).unwrap();
    let (head, headless) = (lab.host(0), lab.host(1));
    // The recipe's addresses are the lab's.
    assert_eq!(head.quic_addr(), addr("198.18.0.11:4433"));
    assert_eq!(headless.quic_addr(), addr("198.18.0.12:4433"));
    let guard = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/nftables/meshtun.nft"),
    )
    .unwrap();
    head.nft(&guard).unwrap();

    let head_daemon = start_recipe_node(&lab, 0, "vllm-dp-2node/head.toml");
    let headless_daemon = start_recipe_node(&lab, 1, "vllm-dp-2node/headless.toml");
    lab_support::wait_connected(&headless_daemon, &["node-0"], Duration::from_secs(30));
    // The recipe's `--data-parallel-address`.
    let readme = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/vllm-dp-2node/README.md"),
    )
    .unwrap();
    assert!(
        readme.contains("--data-parallel-address 100.127.0.1"),
        "the recipe no longer puts the DP address on the head's overlay address"
    );

    // On the head: the DP handshake socket on the overlay address (as
    // `--data-parallel-address` binds it), a public API port and a store
    // that listen on every interface.
    let port = "13345";
    let script = zmq_script();
    let arguments = [
        "--address",
        "100.127.0.1",
        "--port",
        port,
        "--dealers",
        "2",
        "--rounds",
        "5",
    ];
    let mut server = head.command("python3");
    server
        .arg(&script)
        .arg("server")
        .args(arguments)
        .args(["--timeout", "40"]);
    let server = Process::spawn(server);
    assert!(wait_listening(head, 13345), "ROUTER did not listen");
    let api = head.listen(addr("0.0.0.0:8000")).unwrap();
    let store = head.listen(addr("0.0.0.0:29500")).unwrap();

    let mut client = headless.command("python3");
    client
        .arg(&script)
        .arg("client")
        .args(arguments)
        .args(["--timeout", "30"]);
    let (client_status, client_out, client_err) =
        Process::spawn(client).finish(Duration::from_secs(45));
    let (server_status, server_out, server_err) = server.finish(Duration::from_secs(15));
    let logs = format!(
        "--- client ---\n{client_out}{client_err}\n--- server ---\n{server_out}{server_err}\n--- head ---\n{}\n--- headless ---\n{}",
        head_daemon.log_since_start(),
        headless_daemon.log_since_start()
    );
    assert!(
        client_status.is_some_and(|status| status.success())
            && server_status.is_some_and(|status| status.success()),
        "the DP handshake through the recipe failed\n{logs}"
    );

    // The guard: the public API answers, everything else is dropped.
    let wait = Duration::from_secs(2);
    assert_eq!(
        probe(headless, addr("198.18.0.11:8000"), wait),
        Some(true),
        "the API port must stay reachable"
    );
    assert_eq!(
        probe(headless, addr("198.18.0.11:29500"), wait),
        None,
        "a store listening on every interface must be dropped by the guard"
    );
    assert_eq!(
        probe(headless, addr("198.18.0.11:13345"), wait),
        None,
        "the handshake port must not be reachable directly"
    );
    drop((api, store));

    // `meshtun status` on the headless node, reading its recipe's [admin].
    let config_path = lab.dir.join("node-1.toml");
    let output = headless
        .command(lab.binary())
        .arg("status")
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "meshtun status: {output:?}");
    // One connection per shard of the node, all of them up (and, since
    // the head lists this node as a peer too, the head's as well).
    let dialled = text
        .split("state: connected (")
        .nth(1)
        .and_then(|rest| rest.split(" dialled").next())
        .and_then(|counts| counts.split_once('/'));
    assert!(
        dialled.is_some_and(|(up, configured)| up == configured && up != "0"),
        "no \"state: connected (N/N dialled...)\" in:\n{text}"
    );
    for expected in [
        "peer: node-0",
        "opened here",
        "shard 0: dials from",
        // The count comes from nftables: the table really is loaded.
        "overlay guard: on, ",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
}
