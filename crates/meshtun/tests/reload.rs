//! Peers that change on reload, with real daemons on loopback: a peer
//! whose address changes is dialled at the new one, while a stream open on
//! the old connection carries on to its end, and only then does the old
//! connection close.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    echo_server, free_tcp_ports, free_udp_port, init_ca, issue, peer_status, status_of, Daemon,
    TempDir, MIB_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the daemons may take to start, connect and reload.
const SETTLE: Duration = Duration::from_secs(15);

/// Polls `check` every 50 ms until it holds or [`SETTLE`] passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SETTLE;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one MiB of `seed`-derived bytes on `tcp` and checks that the same
/// comes back.
async fn round_trip(tcp: &mut TcpStream, seed: u8) {
    let block: Vec<u8> = (0..MIB_BYTES)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let (mut read, mut write) = tcp.split();
    let sending = write.write_all(&block);
    let receiving = async {
        let mut back = vec![0u8; MIB_BYTES];
        read.read_exact(&mut back).await.map(|_| back)
    };
    let (sent, back) = tokio::time::timeout(SETTLE, async { tokio::join!(sending, receiving) })
        .await
        .expect("a MiB echoed in time");
    sent.expect("send a MiB");
    assert!(back.expect("read a MiB back") == block, "the echo differs");
}

/// One short echo through `forward`.
async fn echo_once(forward: SocketAddr) -> bool {
    let attempt = async {
        let mut tcp = TcpStream::connect(forward).await?;
        tcp.write_all(b"ping").await?;
        let mut reply = [0u8; 4];
        tcp.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(&reply == b"ping")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_moves_is_dialled_at_its_new_address_while_its_old_connection_finishes_its_streams(
) {
    let dir = TempDir::new("moved-peer");
    init_ca("test", &dir.join("ca"));
    issue(&dir.join("ca"), "node-a", dir.path());
    issue(&dir.join("ca"), "node-b", dir.path());
    let echo = echo_server().await;
    let old_addr = free_udp_port("127.0.0.3");
    let new_addr = free_udp_port("127.0.0.4");
    let ports = free_tcp_ports("127.0.0.1", 4);
    let (forward, admin_a, admin_old, admin_new) = (ports[0], ports[1], ports[2], ports[3]);
    let tls = |node: &str| {
        format!("[tls]\nca = \"ca/ca.crt\"\ncert = \"{node}.crt\"\nkey = \"{node}.key\"\n")
    };
    // Two daemons with node-b's identity, one at each address, as a node
    // that moved to another machine would be.
    let node_b = |quic: SocketAddr, admin: SocketAddr| {
        format!(
            "node = \"node-b\"\n[quic]\nlisten = \"{quic}\"\n{}\
             [[expose]]\nservice = \"echo\"\ntarget = \"{echo}\"\nallow = [\"node-a\"]\n\
             [admin]\nlisten = \"{admin}\"\n",
            tls("node-b")
        )
    };
    let node_a = |peer: SocketAddr| {
        format!(
            "node = \"node-a\"\n[quic]\nlisten = \"127.0.0.2:0\"\nreconnect_max = \"1s\"\n{}\
             [[peer]]\nname = \"node-b\"\naddr = \"{peer}\"\n\
             [[forward]]\nlisten = \"{forward}\"\npeer = \"node-b\"\nservice = \"echo\"\n\
             [admin]\nlisten = \"{admin_a}\"\n",
            tls("node-a")
        )
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        fs::write(&path, text).expect("write config");
        path
    };
    let _old = Daemon::spawn(
        "node-b (old address)",
        write("node-b-old.toml", node_b(old_addr, admin_old)),
        dir.join("node-b-old.log"),
    );
    let _new = Daemon::spawn(
        "node-b (new address)",
        write("node-b-new.toml", node_b(new_addr, admin_new)),
        dir.join("node-b-new.log"),
    );
    let config_a = write("node-a.toml", node_a(old_addr));
    let mut a = Daemon::spawn("node-a", config_a.clone(), dir.join("node-a.log"));
    eventually("an echo through node-a's forward", || echo_once(forward)).await;

    // A stream that stays open across the move.
    let mut long = TcpStream::connect(forward).await.expect("connect");
    round_trip(&mut long, 1).await;
    let incoming = |admin| async move {
        peer_status(admin, "node-a").await["connections_incoming"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(incoming(admin_old).await >= 1);
    assert_eq!(
        incoming(admin_new).await,
        0,
        "nothing dialled the new address yet"
    );

    fs::write(&config_a, node_a(new_addr)).expect("move the peer");
    a.signal("HUP");
    eventually("node-a's reload", || async {
        status_of(admin_a).await["reload"]["successes"] == 1
    })
    .await;
    let status = peer_status(admin_a, "node-b").await;
    assert_eq!(status["addr"], new_addr.to_string(), "{status}");
    // New streams go to the new address.
    eventually("node-a dialled node-b's new address", || async {
        incoming(admin_new).await >= 1
    })
    .await;
    // Until every shard's replacement is up, a new stream may still take
    // an old connection; soon they all go to the new address.
    let carried = |admin| async move {
        peer_status(admin, "node-a").await["streams_incoming"]
            .as_u64()
            .unwrap_or(0)
    };
    eventually("an echo through the new address", || async {
        echo_once(forward).await && carried(admin_new).await >= 1
    })
    .await;

    // The old connection outlives the move while its stream is open (well
    // past the 2 s a replaced connection is left alone) ...
    tokio::time::sleep(Duration::from_secs(3)).await;
    round_trip(&mut long, 2).await;
    assert!(
        incoming(admin_old).await >= 1,
        "the connection carrying an open stream was closed"
    );
    // ... and closes once it is done.
    long.shutdown().await.expect("close the long stream");
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.expect("the echo's end");
    assert!(rest.is_empty());
    drop(long);
    eventually("the old connection closed", || async {
        incoming(admin_old).await == 0
    })
    .await;
    // It was closed on purpose, not lost: node-a counts no reconnect.
    assert_eq!(peer_status(admin_a, "node-b").await["reconnects"], 0);
}
