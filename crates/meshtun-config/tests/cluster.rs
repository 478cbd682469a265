//! A node config that names a cluster manifest (`cluster = "PATH"`):
//! `load` adds what the node gets from the manifest, and names both places
//! of every clash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use meshtun_config::{load, Config, ConfigErrors};

const MANIFEST: &str = r#"
cluster = "prod"
[[node]]
name = "node-0"
addr = "198.18.0.1:4433"
overlay = "100.127.0.1"
[[node]]
name = "node-1"
addr = "198.18.0.2:4433"
overlay = "100.127.0.2"
[[node]]
name = "node-2"
addr = "198.18.0.3:4433"
overlay = "100.127.0.3"
[[service]]
name = "torch-store"
node = "node-0"
target = "127.0.0.1:29500"
listen = "127.0.0.1:29500"
allow = ["*"]
[[service]]
name = "metrics"
node = "node-1"
target = "127.0.0.1:9100"
listen = "127.0.0.1:19100"
allow = ["node-0"]
[[overlay_allow]]
peers = ["*"]
ports = "1024-65535"
"#;

/// A directory holding the manifest and a config for `node` with `extra`
/// lines; removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(node: &str, extra: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "meshtun-config-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cluster.toml"), MANIFEST).unwrap();
        // Each node listens where the manifest says peers dial it.
        let index: u8 = node
            .strip_prefix("node-")
            .and_then(|index| index.parse().ok())
            .unwrap_or(9);
        let listen = format!("198.18.0.{}:4433", index + 1);
        let config = format!(
            "node = \"{node}\"\ncluster = \"cluster.toml\"\n\
             [quic]\nlisten = \"{listen}\"\n\
             [tls]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n{extra}"
        );
        std::fs::write(dir.join("node.toml"), config).unwrap();
        Self(dir)
    }

    fn load(&self) -> Result<Config, ConfigErrors> {
        load(&self.0.join("node.toml"))
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn keys(errors: &ConfigErrors) -> Vec<String> {
    errors.iter().map(|error| error.key.clone()).collect()
}

#[test]
fn a_node_gets_its_peers_forwards_and_exposes_from_the_manifest() {
    let files = Files::new(
        "node-0",
        "[[peer]]\nname = \"node-9\"\naddr = \"198.18.0.9:4433\"\n",
    );
    let config = files.load().unwrap_or_else(|errors| panic!("{errors}"));
    let peers: Vec<&str> = config.peers.iter().map(|peer| peer.name.as_str()).collect();
    // The hand-written peer first, then the manifest's.
    assert_eq!(peers, ["node-9", "node-1", "node-2"]);
    // Outside overlay mode, the manifest's overlay addresses are not used.
    assert!(config.peers.iter().all(|peer| peer.overlay.is_none()));
    let forwards: Vec<(&str, &str)> = config
        .forwards
        .iter()
        .map(|forward| (forward.peer.as_str(), forward.service.as_str()))
        .collect();
    assert_eq!(forwards, [("node-1", "metrics")]);
    let exposes: Vec<&str> = config.exposes.iter().map(|e| e.service.as_str()).collect();
    assert_eq!(exposes, ["torch-store"]);
    let cluster = config.cluster.expect("cluster");
    assert_eq!(cluster.name.as_deref(), Some("prod"));
    assert_eq!(cluster.path, files.0.join("cluster.toml"));
}

#[test]
fn in_overlay_mode_the_manifest_gives_addresses_and_the_policy() {
    let files = Files::new(
        "node-2",
        "[overlay]\naddress = \"100.127.0.3\"\nprefix = \"100.127.0.0/16\"\n",
    );
    let config = files.load().unwrap_or_else(|errors| panic!("{errors}"));
    let overlay = config.overlay.as_ref().expect("overlay");
    assert_eq!(overlay.allow.len(), 1, "the manifest's [[overlay_allow]]");
    assert_eq!(
        config.peer(&"node-0".parse().unwrap()).unwrap().overlay,
        Some("100.127.0.1".parse().unwrap())
    );
}

#[test]
fn an_overlay_without_an_address_takes_the_nodes_from_the_manifest() {
    let files = Files::new("node-1", "[overlay]\nprefix = \"100.127.0.0/16\"\n");
    let config = files.load().unwrap_or_else(|errors| panic!("{errors}"));
    let overlay = config.overlay.as_ref().expect("overlay");
    assert_eq!(
        overlay.address,
        "100.127.0.2".parse::<std::net::Ipv4Addr>().unwrap()
    );
    // What `meshtun status` and `renew` read gets it too.
    let local = meshtun_config::load_local(&files.0.join("node.toml"))
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(local.overlay.expect("overlay").address, overlay.address);

    // Without a manifest, the address is required, and the message says
    // where else it may come from.
    let errors = meshtun_config::parse(
        "node = \"node-1\"\n[quic]\nlisten = \"198.18.0.2:4433\"\n\
         [tls]\nca = \"ca.crt\"\ncert = \"c.crt\"\nkey = \"c.key\"\n\
         [overlay]\nprefix = \"100.127.0.0/16\"\n",
    )
    .expect_err("no address");
    assert_eq!(keys(&errors), ["overlay.address"], "{errors}");
    assert!(errors.to_string().contains("cluster manifest"), "{errors}");
}

#[test]
fn an_overlay_address_the_manifest_cannot_give_is_an_error_that_says_why() {
    // The node has no overlay address in the manifest.
    let files = Files::new("node-1", "[overlay]\nprefix = \"100.127.0.0/16\"\n");
    let manifest = MANIFEST.replace("overlay = \"100.127.0.2\"\n", "");
    std::fs::write(files.0.join("cluster.toml"), manifest).unwrap();
    let errors = files.load().expect_err("no address anywhere");
    assert_eq!(keys(&errors), ["overlay.address"], "{errors}");
    assert!(
        errors
            .to_string()
            .contains("has no overlay address in the cluster manifest"),
        "{errors}"
    );

    // The manifest cannot be read: its problem is named, and what only
    // needs the node's own settings still loads, without the overlay.
    std::fs::write(
        files.0.join("cluster.toml"),
        "cluster = \"prod\"\n[[node]]\n",
    )
    .unwrap();
    let errors = files.load().expect_err("broken manifest");
    assert!(keys(&errors).iter().any(|key| key == "cluster"), "{errors}");
    let local = meshtun_config::load_local(&files.0.join("node.toml"))
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert!(local.overlay.is_none());
    assert_eq!(local.node.as_str(), "node-1");
}

#[test]
fn every_clash_names_both_places() {
    let files = Files::new(
        "node-0",
        "[[peer]]\nname = \"node-1\"\naddr = \"198.18.0.2:4433\"\n\
         [[forward]]\nlisten = \"127.0.0.1:19100\"\npeer = \"node-1\"\nservice = \"other\"\n\
         [[expose]]\nservice = \"torch-store\"\ntarget = \"127.0.0.1:1\"\nallow = [\"*\"]\n\
         [overlay]\naddress = \"100.127.0.9\"\nprefix = \"100.127.0.0/16\"\n\
         allow = [{ peers = [\"*\"], ports = \"1-2\" }]\n",
    );
    let errors = files.load().expect_err("clashes");
    assert_eq!(
        keys(&errors),
        [
            "peer[0].name",
            "expose[0].service",
            "forward[0].listen",
            "overlay.address",
            "overlay.allow",
        ],
        "{errors}"
    );
    for error in errors.iter() {
        assert!(error.message.contains("cluster.toml"), "{error}");
    }
}

#[test]
fn a_hand_written_forward_may_use_a_node_of_the_manifest_and_must_listen_where_the_manifest_says() {
    let files = Files::new(
        "node-2",
        "[[forward]]\nlisten = \"127.0.0.1:7000\"\npeer = \"node-1\"\nservice = \"extra\"\n",
    );
    let config = files.load().unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config
        .forwards
        .iter()
        .any(|forward| forward.service.as_str() == "extra"));

    let files = Files::new(
        "node-2",
        "[[forward]]\nlisten = \"127.0.0.1:7000\"\npeer = \"node-8\"\nservice = \"extra\"\n",
    );
    let errors = files.load().expect_err("unknown peer");
    assert_eq!(keys(&errors), ["forward[0].peer"], "{errors}");

    // node-1 listening where the manifest says node-0 is.
    let files = Files::new("node-1", "");
    let text = std::fs::read_to_string(files.0.join("node.toml")).unwrap();
    std::fs::write(
        files.0.join("node.toml"),
        text.replace("198.18.0.2:4433", "198.18.0.1:4433"),
    )
    .unwrap();
    let errors = files.load().expect_err("wrong listen");
    assert_eq!(keys(&errors), ["quic.listen"], "{errors}");
}

#[test]
fn a_node_the_manifest_does_not_name_and_a_broken_manifest_are_refused() {
    let files = Files::new("node-7", "");
    let errors = files.load().expect_err("unknown node");
    assert_eq!(keys(&errors), ["cluster"]);
    assert!(errors.to_string().contains("node-7"), "{errors}");

    let files = Files::new("node-0", "");
    std::fs::write(files.0.join("cluster.toml"), "cluster = \"Prod\"\n").unwrap();
    let errors = files.load().expect_err("broken manifest");
    assert!(keys(&errors).iter().all(|key| key == "cluster"), "{errors}");
    assert!(
        errors.to_string().contains("not a cluster name"),
        "{errors}"
    );

    std::fs::remove_file(files.0.join("cluster.toml")).unwrap();
    let errors = files.load().expect_err("missing manifest");
    assert!(
        errors
            .to_string()
            .contains("cannot read the cluster manifest"),
        "{errors}"
    );
}
