//! Shared helpers for the loopback integration tests: an in-memory PKI,
//! node configs with OS-chosen ports, in-process nodes, and small TCP
//! services (echo, sink) with helpers to observe resets.
#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshtun_config::Config;
use meshtun_node::Node;
use meshtun_pki::{Authority, NodeCredentials, TrustBundle, Validity};
use meshtun_proto::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A throwaway cluster CA, kept in memory.
pub struct Pki {
    pub authority: Authority,
    pub trust: TrustBundle,
}

impl Pki {
    pub fn new(cluster: &str) -> Self {
        let authority =
            Authority::generate(cluster, Validity::days_from_now(2)).expect("generate CA");
        let trust = TrustBundle::from_pem(&authority.cert_pem()).expect("CA bundle");
        Self { authority, trust }
    }

    pub fn credentials(&self, name: &str) -> NodeCredentials {
        self.credentials_with(name, Validity::days_from_now(2))
    }

    pub fn credentials_with(&self, name: &str, validity: Validity) -> NodeCredentials {
        let node = NodeName::new(name).expect("node name");
        let issued = self
            .authority
            .issue(&node, &[], &[], validity)
            .expect("issue");
        NodeCredentials::from_pem(&issued.cert_pem, &issued.key_pem).expect("credentials")
    }
}

/// Describes one node's config; every listener uses port 0.
#[derive(Default)]
pub struct NodeSpec {
    pub name: String,
    pub peers: Vec<(String, SocketAddr)>,
    /// (peer, service)
    pub forwards: Vec<(String, String)>,
    /// (service, target, allow list as TOML array text)
    pub exposes: Vec<(String, SocketAddr, String)>,
    /// Extra lines for [quic].
    pub quic_extra: String,
}

impl NodeSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    pub fn peer(mut self, name: &str, addr: SocketAddr) -> Self {
        self.peers.push((name.to_owned(), addr));
        self
    }

    pub fn forward(mut self, peer: &str, service: &str) -> Self {
        self.forwards.push((peer.to_owned(), service.to_owned()));
        self
    }

    pub fn expose(mut self, service: &str, target: SocketAddr, allow: &[&str]) -> Self {
        let allow = allow
            .iter()
            .map(|name| format!("{name:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.exposes
            .push((service.to_owned(), target, format!("[{allow}]")));
        self
    }

    pub fn config(&self) -> Config {
        let mut text = format!(
            "node = {:?}\n[quic]\nlisten = \"127.0.0.1:0\"\n{}\n[tls]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n",
            self.name, self.quic_extra
        );
        for (name, addr) in &self.peers {
            text.push_str(&format!("[[peer]]\nname = {name:?}\naddr = \"{addr}\"\n"));
        }
        for (index, (peer, service)) in self.forwards.iter().enumerate() {
            // The config format wants fixed forward ports; tests switch to
            // port 0 after parsing so the OS picks free ones.
            text.push_str(&format!(
                "[[forward]]\nlisten = \"127.0.0.1:{}\"\npeer = {peer:?}\nservice = {service:?}\n",
                index + 1
            ));
        }
        for (service, target, allow) in &self.exposes {
            text.push_str(&format!(
                "[[expose]]\nservice = {service:?}\ntarget = \"{target}\"\nallow = {allow}\n"
            ));
        }
        let mut config = meshtun_config::parse(&text)
            .unwrap_or_else(|errors| panic!("test config:\n{errors}\n{text}"));
        for forward in &mut config.forwards {
            forward.listen.set_port(0);
        }
        config
    }

    pub async fn start(&self, pki: &Pki) -> Node {
        self.start_with(pki.credentials(&self.name), pki.trust.clone())
            .await
    }

    pub async fn start_with(&self, credentials: NodeCredentials, trust: TrustBundle) -> Node {
        Node::start(self.config(), credentials, trust)
            .await
            .expect("node starts")
    }
}

/// Logs to the test's captured output when MESHTUN_TEST_LOG is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("MESHTUN_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

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
    Reset,
    CleanEof,
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
