//! The lab itself works: two hosts in namespaces, real daemons, a forward
//! from one host's loopback to a service on the other's loopback.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use meshtun_lab::{require_netns, Lab};

#[test]
fn a_forward_carries_bytes_between_two_namespace_hosts() {
    if !require_netns("a_forward_carries_bytes_between_two_namespace_hosts") {
        return;
    }
    let lab = Lab::new(&["node-a", "node-b"]).unwrap();
    let (a, b) = (lab.host(0), lab.host(1));
    let service: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let listener = b.listen(service).unwrap();
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut request = [0u8; 5];
        tcp.read_exact(&mut request).unwrap();
        tcp.write_all(&request).unwrap();
    });
    let _daemon_b = lab
        .start(1, &lab.config(1).expose("echo", service, &["node-a"]))
        .unwrap();
    let forward: SocketAddr = "127.0.0.1:7100".parse().unwrap();
    let _daemon_a = lab
        .start(0, &lab.config(0).peer(b).forward(forward, "node-b", "echo"))
        .unwrap();

    let mut tcp = a.connect(forward).unwrap().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"hello").unwrap();
    let mut reply = [0u8; 5];
    tcp.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"hello");
    server.join().unwrap();
    // Host A cannot reach B's loopback service directly.
    let direct: SocketAddr = SocketAddr::new(b.addr.into(), 7000);
    assert!(
        a.connect(direct).unwrap().is_err(),
        "B's loopback service is not reachable over the wire"
    );
}
