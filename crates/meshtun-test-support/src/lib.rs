//! What meshtun's test suites share: a TCP echo server, ports with nothing
//! behind them, a probe of how a connection ended (reset, clean end, or
//! hang), deterministic test data, a scratch directory removed on drop, and
//! TLS handshakes in memory ([`tls`]). Used by the loopback integration
//! tests in `tests/`, by the binary's tests in `crates/meshtun/tests/`, and
//! by the unit tests of meshtun-pki and meshtun-enroll.
//!
//! Test tooling: a helper that cannot set itself up (bind, connect) panics,
//! which fails the test that called it.
#![allow(clippy::expect_used, clippy::panic)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod tls;

/// An echo server: every byte comes back; the client's FIN is mirrored.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A TCP port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// A UDP port with nothing listening on it (a peer that is down).
pub fn dead_udp_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket.local_addr().expect("addr")
}

/// How a connection through a forward ended, from the client's side.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The connection was reset (RST).
    Reset,
    /// It ended with a FIN.
    CleanEof,
    /// Nothing happened within the time given.
    Hang,
}

/// Connects, sends a few bytes, and reports how the connection ended and
/// after how long, waiting at most `within`.
pub async fn ending(addr: SocketAddr, within: Duration) -> (Ending, Duration) {
    let started = Instant::now();
    let attempt = async {
        let mut tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            // On loopback the reset can land before connect() returns.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ending::Reset,
            Err(error) => panic!("connect to {addr}: {error}"),
        };
        let _ = tcp.write_all(b"hello").await;
        let mut buffer = [0u8; 64];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) => return Ending::CleanEof,
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                    return Ending::Reset
                }
                Err(error) => panic!("unexpected error from {addr}: {error}"),
            }
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(ending) => (ending, started.elapsed()),
        Err(_) => (Ending::Hang, started.elapsed()),
    }
}

/// Deterministic, incompressible bytes: block `index` of `len` bytes.
pub fn block(index: u64, len: usize) -> Vec<u8> {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fresh directory path under the system temp dir, removed on drop. The
/// directory itself is not created: what a test writes there makes it (with
/// the mode it chooses).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A path unique to this process and call, with `label` in its name.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "meshtun-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
