//! The enrollment server and client over loopback TCP, behind the accept
//! loop `meshtun pki serve` runs: a join, a wrong pin, a renewal, and
//! nobody listening.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use meshtun_enroll::{
    request_certificate, request_renewal, CaFingerprint, EnrollClientError, EnrollServer, Enroller,
    Grant, JoinKey, TokenStore, MAX_CONNECTIONS,
};
use meshtun_pki::{Authority, Validity};
use meshtun_test_support::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A CA in a fresh directory (removed on drop).
fn ca_dir(label: &str) -> (TempDir, Authority) {
    let dir = TempDir::new(label);
    let authority = Authority::generate("test", Validity::days_from_now(2)).expect("CA");
    authority.write(dir.path(), false).expect("write CA");
    (dir, authority)
}

/// Serves with `server` on a loopback port, as `meshtun pki serve` does:
/// the address, the accept loop's stop, and its task.
async fn serve(server: EnrollServer) -> (String, CancellationToken, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let stop = CancellationToken::new();
    let accept = tokio::spawn(meshtun_node::accept_each(
        "enrollment",
        listener,
        MAX_CONNECTIONS,
        stop.clone(),
        move |permit, tcp, source| server.admit(permit, tcp, source),
    ));
    (addr, stop, accept)
}

#[tokio::test]
async fn a_join_over_the_network_and_a_wrong_pin() {
    let (dir, authority) = ca_dir("join");
    let pinned = CaFingerprint::of_authority(&authority);
    let store = TokenStore::new(dir.path());
    let node = meshtun_proto::NodeName::new("node-n").expect("name");
    let grant = Grant {
        node: node.clone(),
        ips: Vec::new(),
        dns: Vec::new(),
        valid_for: None,
    };
    let token = store
        .create(&grant, Duration::from_secs(60), SystemTime::now())
        .expect("token")
        .token;
    let server = EnrollServer::new(Enroller::new(authority, store, Duration::from_secs(86_400)))
        .expect("start");
    let (addr, stop, accept) = serve(server.clone()).await;
    let key = JoinKey::generate(&node).expect("key");
    let request = key.request(&token).expect("request");

    let wrong = CaFingerprint::of(b"another CA");
    match request_certificate(&addr, &wrong, &request, Duration::from_secs(10)).await {
        Err(EnrollClientError::CaMismatch(mismatch)) => {
            assert_eq!(mismatch.expected, wrong);
            assert_eq!(mismatch.presented, Some(pinned));
        }
        other => panic!("expected a CA mismatch, got {other:?}"),
    }

    let response = request_certificate(&addr, &pinned, &request, Duration::from_secs(10))
        .await
        .expect("answer");
    let enrolled = key
        .accept(response, &pinned, SystemTime::now())
        .expect("certificate");
    assert_eq!(enrolled.node(), &node);
    assert!(!accept.is_finished());

    // The node renews with the certificate it got: a new key, the same node.
    let current = enrolled.credentials();
    let fresh = JoinKey::generate(&node).expect("key");
    let renewal = fresh.renewal_request().expect("request");
    let response = request_renewal(&addr, &pinned, current, &renewal, Duration::from_secs(10))
        .await
        .expect("answer");
    let renewed = fresh
        .accept(response, &pinned, SystemTime::now())
        .expect("renewed certificate");
    assert_eq!(renewed.node(), &node);
    assert_ne!(
        renewed.credentials().fingerprint(),
        current.fingerprint(),
        "a new certificate"
    );
    // Without a client certificate (the join ALPN and a renewal body),
    // the server refuses as a bad request: no token.
    let response = request_certificate(&addr, &pinned, &renewal, Duration::from_secs(10))
        .await
        .expect("answer");
    assert!(
        matches!(&response, meshtun_enroll::EnrollResponse::Refused { error, .. } if error == "bad_request"),
        "{response:?}"
    );

    // Nobody listening: a connect error, promptly.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    assert!(matches!(
        request_certificate(&closed, &pinned, &request, Duration::from_secs(10)).await,
        Err(EnrollClientError::Connect { .. })
    ));
    stop.cancel();
    accept.await.expect("the accept loop");
    server.shutdown(Duration::from_secs(1)).await;
}
