//! Every way a forwarded connection can be refused ends in a prompt reset of
//! the local client: never a hang, never a clean EOF that hides a failure.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::{closed_port, dead_udp_port, echo_server, ending, Ending, NodeSpec, Pki};

const PROMPT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_unknown_and_forbidden_targets_reset_the_client_within_a_second() {
    support::init_logging();
    let pki = Pki::new("test");
    let echo = echo_server().await;
    let closed = closed_port().await;
    let node_b = NodeSpec::new("node-b")
        .expose("closed", closed, &["node-a"])
        .expose("private", echo, &["node-c"])
        .expose("open", echo, &["node-a"])
        .start(&pki)
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "closed")
        .forward("node-b", "no-such-service")
        .forward("node-b", "private")
        .forward("node-b", "open")
        .start(&pki)
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    let forwards = node_a.forward_addrs().to_vec();

    for (addr, what) in [
        (forwards[0], "target refuses"),
        (forwards[1], "unknown service"),
        (forwards[2], "forbidden identity"),
    ] {
        let (how, after) = ending(addr, Duration::from_secs(5)).await;
        assert_eq!(how, Ending::Reset, "{what}: client must see a reset");
        assert!(after < PROMPT, "{what}: reset took {after:?}");
    }
    // The control: the allowed service works on the same connection.
    let (how, _) = ending(forwards[3], Duration::from_millis(500)).await;
    assert_eq!(
        how,
        Ending::Hang,
        "the open echo service keeps the connection up"
    );
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_down_resets_the_client_within_a_second() {
    support::init_logging();
    let pki = Pki::new("test");
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", dead_udp_port())
        .forward("node-b", "anything")
        .start(&pki)
        .await;
    // Right at start a dial is in flight; later the dialer is backing off.
    // Both must end in a prompt reset.
    for _ in 0..3 {
        let (how, after) = ending(node_a.forward_addrs()[0], Duration::from_secs(5)).await;
        assert_eq!(how, Ending::Reset);
        assert!(after < PROMPT, "reset took {after:?}");
    }
    node_a.shutdown(Duration::from_secs(1)).await;
}
