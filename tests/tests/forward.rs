//! The forward-mode data plane on loopback: bytes arrive intact and in full,
//! many connections share one QUIC connection, and half-close is mirrored.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{block, echo_server, NodeSpec, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const MIB: usize = 1024 * 1024;

/// Starts node-b exposing `service` -> `target` to node-a, and node-a
/// forwarding to it. Returns both nodes once node-a is connected.
async fn pair(
    pki: &Pki,
    service: &str,
    target: SocketAddr,
) -> (meshtun_node::Node, meshtun_node::Node) {
    support::init_logging();
    let node_b = NodeSpec::new("node-b")
        .expose(service, target, &["node-a"])
        .start(pki)
        .await;
    let node_a = NodeSpec::new("node-a")
        .peer("node-b", node_b.quic_addr())
        .forward("node-b", service)
        .start(pki)
        .await;
    let missing = node_a.wait_connected(Duration::from_secs(10)).await;
    assert!(missing.is_empty(), "node-a did not connect to {missing:?}");
    (node_a, node_b)
}

/// A service that streams `len` bytes of its own data while hashing what it
/// receives; it reports the hash of what it received once the client's FIN
/// arrives.
async fn duplex_service(len: usize) -> (SocketAddr, oneshot::Receiver<(usize, [u8; 32])>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, reported) = oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        let sender = tokio::spawn(async move {
            for index in 0..(len / MIB) as u64 {
                write
                    .write_all(&block(1_000_000 + index, MIB))
                    .await
                    .unwrap();
            }
            write.shutdown().await.unwrap();
        });
        let mut hash = Sha256::new();
        let mut total = 0;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = read.read(&mut buffer).await.unwrap();
            if read == 0 {
                break;
            }
            total += read;
            hash.update(&buffer[..read]);
        }
        sender.await.unwrap();
        let _ = report.send((total, hash.finalize().into()));
    });
    (addr, reported)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_256_mib_each_way_intact() {
    const LEN: usize = 256 * MIB;
    let pki = Pki::new("test");
    let (service, reported) = duplex_service(LEN).await;
    let (node_a, node_b) = pair(&pki, "duplex", service).await;

    let tcp = TcpStream::connect(node_a.forward_addrs()[0]).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let sender = tokio::spawn(async move {
        let mut hash = Sha256::new();
        for index in 0..(LEN / MIB) as u64 {
            let data = block(index, MIB);
            hash.update(&data);
            write.write_all(&data).await.unwrap();
        }
        write.shutdown().await.unwrap();
        <[u8; 32]>::from(hash.finalize())
    });
    let mut expected = Sha256::new();
    for index in 0..(LEN / MIB) as u64 {
        expected.update(block(1_000_000 + index, MIB));
    }
    let mut received = Sha256::new();
    let mut total = 0;
    let mut buffer = vec![0u8; 256 * 1024];
    let transfer = async {
        loop {
            let read = read.read(&mut buffer).await.unwrap();
            if read == 0 {
                break;
            }
            total += read;
            received.update(&buffer[..read]);
        }
    };
    tokio::time::timeout(Duration::from_secs(300), transfer)
        .await
        .expect("transfer finished in time");
    let sent = sender.await.unwrap();
    assert_eq!(
        total, LEN,
        "client received every byte of the service's stream"
    );
    assert_eq!(
        <[u8; 32]>::from(received.finalize()),
        <[u8; 32]>::from(expected.finalize())
    );
    let (service_total, service_hash) = reported.await.unwrap();
    assert_eq!(
        service_total, LEN,
        "service received every byte the client sent"
    );
    assert_eq!(
        service_hash, sent,
        "service received exactly what the client sent"
    );
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_each_close_cleanly() {
    const CONNECTIONS: usize = 1000;
    const LEN: usize = 32 * 1024;
    let pki = Pki::new("test");
    let echo = echo_server().await;
    let (node_a, node_b) = pair(&pki, "echo", echo).await;
    let forward = node_a.forward_addrs()[0];

    // Open them all first so they are truly concurrent, then move data.
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(TcpStream::connect(forward).await.unwrap());
    }
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for (index, tcp) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let data = block(index as u64, LEN);
            let (mut read, mut write) = tcp.into_split();
            let expected = data.clone();
            let writer = tokio::spawn(async move {
                write.write_all(&data).await.unwrap();
                write.shutdown().await.unwrap();
            });
            let mut back = Vec::with_capacity(LEN);
            read.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            back == expected
        }));
    }
    let all = async {
        let mut intact = 0;
        for task in tasks {
            if task.await.unwrap() {
                intact += 1;
            }
        }
        intact
    };
    let intact = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("all connections finished");
    assert_eq!(
        intact, CONNECTIONS,
        "every connection got its own bytes back and a clean EOF"
    );
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_full_reply() {
    const REPLY: usize = 4 * MIB;
    let pki = Pki::new("test");
    // A server that reads the request to EOF, then sends a long reply.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        tcp.read_to_end(&mut request).await.unwrap();
        for index in 0..(REPLY / MIB) as u64 {
            tcp.write_all(&block(index, MIB)).await.unwrap();
        }
        tcp.shutdown().await.unwrap();
        request
    });
    let (node_a, node_b) = pair(&pki, "reply", service).await;

    let mut tcp = TcpStream::connect(node_a.forward_addrs()[0]).await.unwrap();
    tcp.write_all(b"the whole request").await.unwrap();
    tcp.shutdown().await.unwrap(); // half-close: no more from the client
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .unwrap();
    let expected: Vec<u8> = (0..(REPLY / MIB) as u64)
        .flat_map(|index| block(index, MIB))
        .collect();
    assert_eq!(reply.len(), REPLY);
    assert!(
        reply == expected,
        "reply arrived intact after the client's half-close"
    );
    assert_eq!(server.await.unwrap(), b"the whole request");
    node_a.shutdown(Duration::from_secs(1)).await;
    node_b.shutdown(Duration::from_secs(1)).await;
}
