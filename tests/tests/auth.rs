//! Mutual authentication: only cluster certificates get in, a dialer only
//! accepts the exact peer it meant, expired certificates are refused, and
//! per-service policy is enforced by identity.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use meshtun_pki::Validity;
use support::{echo_server, ending, Ending, NodeSpec, Pki};

const NOT_CONNECTED_WITHIN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_rejected_in_the_handshake() {
    support::init_logging();
    let cluster = Pki::new("cluster");
    let rogue_ca = Pki::new("rogue");
    let echo = echo_server().await;
    let node_b = NodeSpec::new("node-b")
        .expose("echo", echo, &["*"])
        .start(&cluster)
        .await;
    // Same name as a legitimate node, trusts the cluster CA, but its own
    // certificate comes from another CA.
    let rogue = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start_with(rogue_ca.credentials("node-a"), cluster.trust.clone())
        .await;
    let missing = rogue.wait_connected(NOT_CONNECTED_WITHIN).await;
    assert_eq!(
        missing.len(),
        1,
        "node-b must refuse a foreign client certificate"
    );
    let (how, _) = ending(rogue.forward_addrs()[0], Duration::from_secs(5)).await;
    assert_eq!(how, Ending::Reset);
    // Both sides count the failure by reason, for /metrics and /status.
    let dialer = peer_status(&rogue, "node-b");
    assert!(
        dialer.handshakes_failed.get("tls").copied().unwrap_or(0) >= 1,
        "the rogue's failed dials should count as TLS failures: {dialer:?}"
    );
    assert_eq!(
        dialer.refused_outgoing.get("not_connected"),
        Some(&1),
        "{dialer:?}"
    );
    let acceptor = node_b.status();
    assert!(
        acceptor
            .incoming_handshakes_failed
            .get("tls")
            .copied()
            .unwrap_or(0)
            >= 1,
        "node-b should count the rejected client certificate: {:?}",
        acceptor.incoming_handshakes_failed
    );

    // The control: a cluster node gets in with the same config.
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start(&cluster)
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    rogue.shutdown(Duration::ZERO).await;
    node_a.shutdown(Duration::ZERO).await;
    node_b.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_answering_for_another_peer_is_rejected() {
    support::init_logging();
    let pki = Pki::new("cluster");
    let echo = echo_server().await;
    // node-c holds a valid cluster certificate, but node-a dials it
    // believing it is node-b (a compromised node impersonating another).
    let node_c = NodeSpec::new("node-c")
        .expose("echo", echo, &["*"])
        .start(&pki)
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_c.quic_addr())
        .forward("node-b", "echo")
        .start(&pki)
        .await;
    let missing = node_a.wait_connected(NOT_CONNECTED_WITHIN).await;
    assert_eq!(
        missing.len(),
        1,
        "node-a must reject a server that is not node-b"
    );
    let (how, _) = ending(node_a.forward_addrs()[0], Duration::from_secs(5)).await;
    assert_eq!(how, Ending::Reset);
    let dialer = peer_status(&node_a, "node-b");
    assert!(
        dialer.handshakes_failed.get("tls").copied().unwrap_or(0) >= 1,
        "rejecting the impersonator should count as a TLS failure: {dialer:?}"
    );
    assert!(dialer.last_error.is_some(), "{dialer:?}");
    node_a.shutdown(Duration::ZERO).await;
    node_c.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_are_rejected_on_either_side() {
    support::init_logging();
    let pki = Pki::new("cluster");
    let echo = echo_server().await;
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };

    // An expired client certificate: node-b refuses it.
    let node_b = NodeSpec::new("node-b")
        .expose("echo", echo, &["*"])
        .start(&pki)
        .await;
    let stale_client = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start_with(pki.credentials_with("node-a", expired), pki.trust.clone())
        .await;
    assert_eq!(
        stale_client
            .wait_connected(NOT_CONNECTED_WITHIN)
            .await
            .len(),
        1
    );

    // An expired server certificate: node-a refuses it.
    let stale_server = NodeSpec::new("node-s")
        .expose("echo", echo, &["*"])
        .start_with(pki.credentials_with("node-s", expired), pki.trust.clone())
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-s", stale_server.quic_addr())
        .forward("node-s", "echo")
        .start(&pki)
        .await;
    assert_eq!(node_a.wait_connected(NOT_CONNECTED_WITHIN).await.len(), 1);
    for node in [stale_client, node_b, stale_server, node_a] {
        node.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exposed_only_to_node_a_refuses_node_b() {
    support::init_logging();
    let pki = Pki::new("cluster");
    let echo = echo_server().await;
    let server = NodeSpec::new("node-s")
        .expose("echo", echo, &["node-a"])
        .start(&pki)
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-s", server.quic_addr())
        .forward("node-s", "echo")
        .start(&pki)
        .await;
    let node_b = NodeSpec::new("node-b")
        .peer("node-s", server.quic_addr())
        .forward("node-s", "echo")
        .start(&pki)
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    assert!(node_b
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());

    // node-b is authenticated (it connected) but not authorized.
    let (how, after) = ending(node_b.forward_addrs()[0], Duration::from_secs(5)).await;
    assert_eq!(how, Ending::Reset);
    assert!(after < Duration::from_secs(1), "refusal took {after:?}");
    // node-a may: its bytes come back and the connection stays open.
    let (how, _) = ending(node_a.forward_addrs()[0], Duration::from_millis(500)).await;
    assert_eq!(how, Ending::Hang);
    for node in [node_a, node_b, server] {
        node.shutdown(Duration::ZERO).await;
    }
}

/// `node`'s view of `peer`, from its status.
fn peer_status(node: &meshtun_node::Node, peer: &str) -> meshtun_node::PeerStatus {
    let status = node.status();
    status
        .peers
        .into_iter()
        .find(|candidate| candidate.name == peer)
        .unwrap_or_else(|| panic!("{peer} missing from {}'s status", status.node))
}

/// The CA rotation the README describes: while every node trusts a bundle
/// of the old and the new CA, a node still on an old-CA certificate and a
/// node already on a new-CA certificate reach each other; a node that
/// trusts only the old CA refuses a new-CA peer, and once the old CA leaves
/// the bundle an old-CA certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_ca_rotation_a_two_ca_bundle_joins_old_and_new_certificates() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::init_logging();
    let old = Pki::new("cluster");
    let new = Pki::new("cluster");
    let both = meshtun_pki::TrustBundle::from_pem(&format!(
        "{}{}",
        old.authority.cert_pem(),
        new.authority.cert_pem()
    ))
    .unwrap();
    let echo = echo_server().await;
    let node_b = NodeSpec::new("node-b")
        .expose("echo", echo, &["*"])
        .start_with(new.credentials("node-b"), both.clone())
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start_with(old.credentials("node-a"), both.clone())
        .await;
    assert!(node_a
        .wait_connected(Duration::from_secs(10))
        .await
        .is_empty());
    let mut tcp = tokio::net::TcpStream::connect(node_a.forward_addrs()[0])
        .await
        .unwrap();
    tcp.write_all(b"rotation").await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"rotation");

    // A node that still trusts only the old CA refuses the new-CA node-b.
    let old_only = NodeSpec::new("node-c")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", "echo")
        .start_with(old.credentials("node-c"), old.trust.clone())
        .await;
    assert_eq!(old_only.wait_connected(NOT_CONNECTED_WITHIN).await.len(), 1);

    // After the overlap: node-b trusts only the new CA, and an old-CA
    // certificate no longer gets in.
    let node_b_new_only = NodeSpec::new("node-b")
        .expose("echo", echo, &["*"])
        .start_with(new.credentials("node-b"), new.trust.clone())
        .await;
    let straggler = NodeSpec::new("node-d")
        .peer("node-b", node_b_new_only.quic_addr())
        .forward("node-b", "echo")
        .start_with(old.credentials("node-d"), both)
        .await;
    assert_eq!(
        straggler.wait_connected(NOT_CONNECTED_WITHIN).await.len(),
        1
    );
    for node in [node_a, old_only, straggler, node_b, node_b_new_only] {
        node.shutdown(Duration::ZERO).await;
    }
}
