//! Shared helpers for the loopback integration tests: an in-memory PKI,
//! node configs with OS-chosen ports and in-process nodes; the small TCP
//! services and probes come from `meshtun-test-support`.
#![allow(dead_code, unreachable_pub, unused_imports)] // each test file uses a different subset

use std::net::SocketAddr;

use meshtun_config::Config;
use meshtun_node::Node;
use meshtun_pki::{Authority, NodeCredentials, TrustBundle, Validity};
use meshtun_proto::NodeName;
pub use meshtun_test_support::{block, closed_port, dead_udp_port, echo_server, ending, Ending};

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
