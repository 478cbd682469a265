//! The cluster manifest: one TOML file, the same on every node, that names
//! every node and every service, from which each node's peers, forwards
//! and exposes follow ([`Manifest::derive`]).
//!
//! ```toml
//! cluster = "prod"                    # the trust domain in node certificates
//! [[node]]
//! name = "node-0"
//! addr = "10.0.0.1:4433"              # the QUIC address peers dial
//! overlay = "100.127.0.1"             # optional; the node's overlay address
//! [[service]]
//! name = "torch-store"
//! node = "node-0"                     # the node that hosts it
//! target = "127.0.0.1:29500"          # where that node connects
//! listen = "127.0.0.1:29500"          # where every other allowed node forwards it
//! allow = ["*"]                       # node names, or "*"; default deny
//! [[overlay_allow]]                   # optional; overlay mode's policy, cluster-wide
//! peers = ["*"]
//! ports = "1024-65535"
//! ```
//!
//! Every problem is reported at once, with its key path, like the node
//! config's.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use meshtun_proto::{NodeName, ServiceName};
use toml::{Table, Value};

use crate::overlay::{check_overlay_addresses, ipv4, port_range};
use crate::read::{
    allow_list, entries, host_port, is_loopback, node_name, overlaps, service_name, socket_addr,
    string, Sink, TableReader,
};
use crate::{
    Allow, Config, ConfigError, ConfigErrors, Expose, Forward, HostPort, OverlayAllow, Peer,
};

const TOP_KEYS: &[&str] = &["cluster", "node", "service", "overlay_allow"];
const NODE_KEYS: &[&str] = &["name", "addr", "overlay"];
const SERVICE_KEYS: &[&str] = &["name", "node", "target", "listen", "allow"];
const OVERLAY_ALLOW_KEYS: &[&str] = &["peers", "ports"];

/// A validated cluster manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The cluster's name: the trust domain of its node certificates.
    pub cluster: String,
    /// Every node, in file order; names, addresses and overlay addresses
    /// are unique.
    pub nodes: Vec<ManifestNode>,
    /// Every service, in file order; each on a declared node, unique by
    /// node and name, and by listen address.
    pub services: Vec<ManifestService>,
    /// Overlay mode's per-port policy, the same on every node.
    pub overlay_allow: Vec<OverlayAllow>,
}

/// A `[[node]]` of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestNode {
    /// Its identity.
    pub name: NodeName,
    /// The QUIC address its peers dial.
    pub addr: HostPort,
    /// Its overlay address, in overlay mode.
    pub overlay: Option<Ipv4Addr>,
}

/// A `[[service]]` of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestService {
    /// Its name, as peers ask for it.
    pub name: ServiceName,
    /// The node that hosts it.
    pub node: NodeName,
    /// Where the hosting node connects for each stream.
    pub target: HostPort,
    /// Where every other allowed node listens for it (loopback).
    pub listen: SocketAddr,
    /// Which nodes may reach it.
    pub allow: Allow,
}

/// What one node gets from the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// Every other node, to dial.
    pub peers: Vec<Peer>,
    /// Every service another node hosts that this node may reach.
    pub forwards: Vec<Forward>,
    /// Every service this node hosts.
    pub exposes: Vec<Expose>,
    /// This node's overlay address, if the manifest gives one.
    pub overlay_address: Option<Ipv4Addr>,
    /// The cluster-wide overlay policy.
    pub overlay_allow: Vec<OverlayAllow>,
}

impl Manifest {
    /// The node called `name`.
    pub fn node(&self, name: &NodeName) -> Option<&ManifestNode> {
        self.nodes.iter().find(|node| &node.name == name)
    }

    /// What `node` gets: every other node as a peer (with its overlay
    /// address), a forward on each service's `listen` for every service
    /// another node hosts that `node` is allowed to reach, and an expose of
    /// every service `node` hosts. `None` if the manifest has no such node.
    pub fn derive(&self, node: &NodeName) -> Option<Derived> {
        let own = self.node(node)?;
        let peers = self
            .nodes
            .iter()
            .filter(|other| &other.name != node)
            .map(|other| Peer {
                name: other.name.clone(),
                addr: other.addr.clone(),
                overlay: other.overlay,
            })
            .collect();
        let forwards = self
            .services
            .iter()
            .filter(|service| &service.node != node && service.allow.permits(node))
            .map(|service| Forward {
                listen: service.listen,
                peer: service.node.clone(),
                service: service.name.clone(),
                allow_non_loopback: false,
            })
            .collect();
        let exposes = self
            .services
            .iter()
            .filter(|service| &service.node == node)
            .map(|service| Expose {
                service: service.name.clone(),
                target: service.target.clone(),
                allow: service.allow.clone(),
            })
            .collect();
        Some(Derived {
            peers,
            forwards,
            exposes,
            overlay_address: own.overlay,
            overlay_allow: self.overlay_allow.clone(),
        })
    }
}

/// Adds what `config`'s node gets from `manifest` (at `path`) to what the
/// config writes by hand. Every clash is an error naming both places: a
/// peer, expose or forward listen address in both, an overlay address or
/// `allow` policy in both that differ.
pub(crate) fn apply(
    config: &mut Config,
    manifest: &Manifest,
    path: &Path,
) -> Result<(), ConfigErrors> {
    let sink = &mut Sink::default();
    let Some(derived) = manifest.derive(&config.node) else {
        return Err(ConfigError::new(
            "cluster",
            format!(
                "node \"{}\" is not a [[node]] of the cluster manifest {}",
                config.node,
                path.display()
            ),
        )
        .into());
    };
    check_written_twice(config, manifest, &derived, path, sink);
    check_listeners(config, &derived, path, sink);
    check_overlay(config, &derived, path, sink);
    check_own_node(config, manifest, &derived, path, sink);
    no_errors(sink)?;
    merge(config, derived);
    if config.overlay.is_some() {
        recheck_overlay(config, path, sink);
        no_errors(sink)?;
    }
    if let Some(cluster) = &mut config.cluster {
        cluster.name = Some(manifest.cluster.clone());
    }
    Ok(())
}

/// The errors `sink` holds so far, if any.
fn no_errors(sink: &mut Sink) -> Result<(), ConfigErrors> {
    if sink.errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(std::mem::take(&mut sink.errors)))
    }
}

/// `what` of the cluster manifest at `path`, for messages.
fn from(what: &str, path: &Path) -> String {
    format!("{what} of the cluster manifest {}", path.display())
}

/// A peer or a service written both by hand and in the manifest.
fn check_written_twice(
    config: &Config,
    manifest: &Manifest,
    derived: &Derived,
    path: &Path,
    sink: &mut Sink,
) {
    for (index, peer) in config.peers.iter().enumerate() {
        if manifest.node(&peer.name).is_some() {
            sink.error(
                format!("peer[{index}].name"),
                format!(
                    "\"{}\" is also a {}; write it in one place",
                    peer.name,
                    from("[[node]]", path)
                ),
            );
        }
    }
    for (index, expose) in config.exposes.iter().enumerate() {
        if derived
            .exposes
            .iter()
            .any(|derived| derived.service == expose.service)
        {
            sink.error(
                format!("expose[{index}].service"),
                format!(
                    "\"{}\" is also a {} hosted by this node; write it in one place",
                    expose.service,
                    from("[[service]]", path)
                ),
            );
        }
    }
}

/// A forward the manifest adds on a port a hand-written listener takes.
fn check_listeners(config: &Config, derived: &Derived, path: &Path, sink: &mut Sink) {
    let mut listeners: Vec<(String, SocketAddr)> = config
        .forwards
        .iter()
        .enumerate()
        .map(|(index, forward)| (format!("forward[{index}].listen"), forward.listen))
        .collect();
    listeners.extend(
        config
            .admin
            .as_ref()
            .map(|admin| ("admin.listen".to_owned(), admin.listen)),
    );
    listeners.extend(
        config
            .overlay
            .as_ref()
            .map(|overlay| ("overlay.listen".to_owned(), overlay.listen)),
    );
    for forward in &derived.forwards {
        if let Some((key, _)) = listeners
            .iter()
            .find(|(_, listen)| overlaps(*listen, forward.listen))
        {
            sink.error(
                key.clone(),
                format!(
                    "{} is also where this node forwards service \"{}\" of {}, as a {}",
                    forward.listen,
                    forward.service,
                    forward.peer,
                    from("[[service]]", path)
                ),
            );
        }
    }
}

/// The manifest's overlay address and policy against `[overlay]`: the
/// policy may be written in one of the two only.
fn check_overlay(config: &Config, derived: &Derived, path: &Path, sink: &mut Sink) {
    if let Some(overlay) = &config.overlay {
        if let Some(address) = derived.overlay_address {
            if address != overlay.address {
                sink.error(
                    "overlay.address",
                    format!(
                        "{} but the {} gives this node {address}",
                        overlay.address,
                        from("[[node]]", path)
                    ),
                );
            }
        }
        for peer in &derived.peers {
            if let Some(address) = peer
                .overlay
                .filter(|address| !overlay.prefix.contains(*address))
            {
                sink.error(
                        "cluster",
                        format!(
                            "{}: node \"{}\"'s overlay address {address} is not inside overlay.prefix {}",
                            path.display(),
                            peer.name,
                            overlay.prefix
                        ),
                    );
            }
        }
        if !derived.overlay_allow.is_empty() && !overlay.allow.is_empty() {
            sink.error(
                "overlay.allow",
                format!(
                    "the {} sets the overlay policy too; write it in one place",
                    from("[[overlay_allow]]", path)
                ),
            );
        }
    }
}

/// This node's own address, the peers its forwards name, and the ports its
/// own services are reached at.
fn check_own_node(
    config: &Config,
    manifest: &Manifest,
    derived: &Derived,
    path: &Path,
    sink: &mut Sink,
) {
    // This node is dialled where the manifest says: its own quic.listen.
    let own = manifest.node(&config.node);
    if let Some(addr) = own.and_then(|own| own.addr.to_socket_addr_if_literal()) {
        let listen = config.quic.listen;
        if addr.port() != listen.port()
            || (!listen.ip().is_unspecified() && addr.ip() != listen.ip())
        {
            sink.error(
                "quic.listen",
                format!(
                    "{listen}, but the {} says peers dial this node at {addr}",
                    from("[[node]]", path)
                ),
            );
        }
    }
    // A hand-written forward may name a node only the manifest declares.
    for (index, forward) in config.forwards.iter().enumerate() {
        let declared = config.peers.iter().any(|peer| peer.name == forward.peer)
            || derived.peers.iter().any(|peer| peer.name == forward.peer);
        if !declared {
            sink.error(
                format!("forward[{index}].peer"),
                format!(
                    "unknown peer \"{}\": neither a [[peer]] here nor a {}",
                    forward.peer,
                    from("[[node]]", path)
                ),
            );
        }
    }
    // A forward must not take a port this node's own services bind.
    let own_targets: Vec<(String, SocketAddr)> = config
        .exposes
        .iter()
        .chain(&derived.exposes)
        .filter_map(|expose| {
            let target = expose.target.to_socket_addr_if_literal()?;
            is_loopback(target.ip()).then(|| (expose.service.to_string(), target))
        })
        .collect();
    for forward in config.forwards.iter().chain(&derived.forwards) {
        if let Some((service, target)) = own_targets
            .iter()
            .find(|(_, target)| overlaps(*target, forward.listen))
        {
            sink.error(
                "cluster",
                format!(
                    "{}: this node would forward service \"{}\" of {} on {}, where its own \
                     service \"{service}\" is reached ({target}); give one of them another port",
                    path.display(),
                    forward.service,
                    forward.peer,
                    forward.listen
                ),
            );
        }
    }
}

/// What the manifest adds, added: its overlay policy too, where `[overlay]`
/// writes none ([`check_overlay`] refused one written in both).
fn merge(config: &mut Config, derived: Derived) {
    let overlay_on = config.overlay.is_some();
    config
        .peers
        .extend(derived.peers.into_iter().map(|mut peer| {
            // Outside overlay mode a peer's overlay address means nothing.
            if !overlay_on {
                peer.overlay = None;
            }
            peer
        }));
    config.forwards.extend(derived.forwards);
    config.exposes.extend(derived.exposes);
    if let Some(overlay) = config
        .overlay
        .as_mut()
        .filter(|overlay| overlay.allow.is_empty())
    {
        overlay.allow = derived.overlay_allow;
    }
}

/// The overlay checks the node config had, now over what the manifest
/// added too.
fn recheck_overlay(config: &Config, path: &Path, sink: &mut Sink) {
    // Underlay addresses outside the prefix, overlay addresses unique and
    // not this node's, no expose target at another node's overlay address.
    let peer_paths: Vec<String> = config
        .peers
        .iter()
        .map(|peer| format!("cluster ({}: node \"{}\")", path.display(), peer.name))
        .collect();
    let expose_paths: Vec<String> = config
        .exposes
        .iter()
        .map(|expose| {
            format!(
                "cluster ({}: service \"{}\")",
                path.display(),
                expose.service
            )
        })
        .collect();
    check_overlay_addresses(
        sink,
        config.overlay.as_ref(),
        Some(config.quic.listen),
        config.peers.iter().zip(&peer_paths),
        config.exposes.iter().zip(&expose_paths),
    );
}

/// Parses and validates a manifest's text.
pub fn parse_manifest(text: &str) -> Result<Manifest, ConfigErrors> {
    let table = text
        .parse::<Table>()
        .map_err(|error| ConfigErrors::from(crate::syntax_error(text, &error)))?;
    manifest(&table)
}

/// Reads and validates the manifest at `path`.
pub fn load_manifest(path: &Path) -> Result<Manifest, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::new("", format!("cannot read the cluster manifest: {error}"))
    })?;
    parse_manifest(&text)
}

fn manifest(table: &Table) -> Result<Manifest, ConfigErrors> {
    let sink = &mut Sink::default();
    let root = TableReader::new(sink, String::new(), table, TOP_KEYS, "a cluster manifest");
    let cluster = root.required(
        sink,
        "cluster",
        "the cluster's name, the trust domain of its node certificates, e.g. \"prod\"",
        cluster_name,
    );
    let nodes = nodes(&root, sink);
    let known: Vec<&NodeName> = nodes.iter().map(|node| &node.name).collect();
    let services = services(&root, sink, &known);
    let overlay_allow = overlay_allow(&root, sink, &known);
    if nodes.is_empty() && sink.errors.is_empty() {
        sink.error("node", "missing: a manifest names at least one [[node]]");
    }
    match cluster {
        Some(cluster) if sink.errors.is_empty() => Ok(Manifest {
            cluster,
            nodes,
            services,
            overlay_allow,
        }),
        _ => {
            if sink.errors.is_empty() {
                sink.error("", "internal error: a value was refused without a reason");
            }
            Err(ConfigErrors(std::mem::take(&mut sink.errors)))
        }
    }
}

/// A SPIFFE trust domain, as `meshtun pki init-ca --cluster` takes it.
fn cluster_name(value: &Value) -> Result<String, String> {
    let text = string(value)?;
    let valid = !text.is_empty()
        && text.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b".-_".contains(&byte)
        });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a cluster name: only lowercase ASCII letters, digits, '.', '-' and \
             '_' (the trust domain in spiffe://<cluster>/node/<name>)"
        ))
    }
}

fn nodes(root: &TableReader<'_>, sink: &mut Sink) -> Vec<ManifestNode> {
    let mut nodes = Vec::new();
    let mut names: HashMap<NodeName, String> = HashMap::new();
    let mut addrs: HashMap<String, String> = HashMap::new();
    let mut overlays: HashMap<Ipv4Addr, String> = HashMap::new();
    for (path, table) in entries(root, sink, "node") {
        let node = TableReader::new(sink, path.clone(), table, NODE_KEYS, "each [[node]]");
        let name = node.required(sink, "name", "the node's name, e.g. \"node-0\"", node_name);
        let addr = node.required(
            sink,
            "addr",
            "the QUIC address its peers dial, as host:port, e.g. \"10.0.0.1:4433\"",
            host_port,
        );
        let overlay = node.optional(sink, "overlay", ipv4);
        let mut valid = true;
        if let Some(name) = &name {
            if let Some(first) = names.insert(name.clone(), path.clone()) {
                sink.error(
                    node.key("name"),
                    format!("node \"{name}\" is already {first}"),
                );
                valid = false;
            }
        }
        if let Some(addr) = &addr {
            if let Some(first) = addrs.insert(addr.to_string(), path.clone()) {
                sink.error(
                    node.key("addr"),
                    format!("{addr} is already the address of {first}"),
                );
                valid = false;
            }
        }
        if let Some(Some(overlay)) = &overlay {
            if let Some(first) = overlays.insert(*overlay, path.clone()) {
                sink.error(
                    node.key("overlay"),
                    format!("{overlay} is already the overlay address of {first}"),
                );
                valid = false;
            }
        }
        if let (Some(name), Some(addr), Some(overlay), true) = (name, addr, overlay, valid) {
            nodes.push(ManifestNode {
                name,
                addr,
                overlay,
            });
        }
    }
    nodes
}

fn services(root: &TableReader<'_>, sink: &mut Sink, known: &[&NodeName]) -> Vec<ManifestService> {
    let mut services = Vec::new();
    let mut names: HashMap<(NodeName, ServiceName), String> = HashMap::new();
    let mut listens: HashMap<SocketAddr, String> = HashMap::new();
    for (path, table) in entries(root, sink, "service") {
        let service = TableReader::new(sink, path.clone(), table, SERVICE_KEYS, "each [[service]]");
        let name = service.required(
            sink,
            "name",
            "the name nodes ask for, e.g. \"torch-store\"",
            service_name,
        );
        let node = service.required(sink, "node", "the node that hosts it", node_name);
        let target = service.required(
            sink,
            "target",
            "where the hosting node connects, as host:port, e.g. \"127.0.0.1:29500\"",
            host_port,
        );
        let listen = service.required(
            sink,
            "listen",
            "where every other allowed node listens for it, e.g. \"127.0.0.1:29500\"",
            socket_addr,
        );
        let allow = allow_list(&service, sink, "allow");
        let mut valid = true;
        if let Some(node) = &node {
            if !known.contains(&node) {
                sink.error(
                    service.key("node"),
                    format!("\"{node}\" is not a [[node]] of this manifest"),
                );
                valid = false;
            }
        }
        if let (Some(name), Some(node)) = (&name, &node) {
            if let Some(first) = names.insert((node.clone(), name.clone()), path.clone()) {
                sink.error(
                    service.key("name"),
                    format!("node \"{node}\" already hosts service \"{name}\" ({first})"),
                );
                valid = false;
            }
        }
        if let Some(listen) = &listen {
            if !is_loopback(listen.ip()) {
                sink.error(
                    service.key("listen"),
                    format!(
                        "{listen} is not a loopback address; forwards derived from the manifest \
                         listen on loopback only"
                    ),
                );
                valid = false;
            } else if listen.port() == 0 {
                sink.error(
                    service.key("listen"),
                    "port 0: applications must know where to connect; choose a port",
                );
                valid = false;
            } else if let Some((_, first)) =
                listens.iter().find(|(other, _)| overlaps(**other, *listen))
            {
                sink.error(
                    service.key("listen"),
                    format!("{listen} is already the listen address of {first}"),
                );
                valid = false;
            } else {
                listens.insert(*listen, path.clone());
            }
        }
        if let Some(allow) = &allow {
            valid &= all_known(sink, &service.key("allow"), allow, known);
        }
        if let (Some(name), Some(node), Some(target), Some(listen), Some(allow), true) =
            (name, node, target, listen, allow, valid)
        {
            services.push(ManifestService {
                name,
                node,
                target,
                listen,
                allow,
            });
        }
    }
    services
}

/// Whether every node `allow` names is one of `known`; reports each other
/// one at `key[index]`.
fn all_known(sink: &mut Sink, key: &str, allow: &Allow, known: &[&NodeName]) -> bool {
    let Allow::Only(allowed) = allow else {
        return true;
    };
    let mut all = true;
    for (index, entry) in allowed.iter().enumerate() {
        if !known.contains(&entry) {
            sink.error(
                format!("{key}[{index}]"),
                format!("\"{entry}\" is not a [[node]] of this manifest"),
            );
            all = false;
        }
    }
    all
}

fn overlay_allow(
    root: &TableReader<'_>,
    sink: &mut Sink,
    known: &[&NodeName],
) -> Vec<OverlayAllow> {
    let mut rules = Vec::new();
    for (path, table) in entries(root, sink, "overlay_allow") {
        let rule = TableReader::new(
            sink,
            path.clone(),
            table,
            OVERLAY_ALLOW_KEYS,
            "each [[overlay_allow]]",
        );
        let peers = allow_list(&rule, sink, "peers");
        let ports = rule.required(
            sink,
            "ports",
            "the overlay ports the peers may reach, e.g. \"1024-65535\" or \"29500\"",
            port_range,
        );
        let mut valid = true;
        if let Some(peers) = &peers {
            valid &= all_known(sink, &rule.key("peers"), peers, known);
        }
        if let (Some(peers), Some(ports), true) = (peers, ports, valid) {
            rules.push(OverlayAllow { peers, ports });
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOUR_NODES: &str = r#"
cluster = "prod"
[[node]]
name = "node-0"
addr = "10.0.0.1:4433"
overlay = "100.127.0.1"
[[node]]
name = "node-1"
addr = "10.0.0.2:4433"
overlay = "100.127.0.2"
[[node]]
name = "node-2"
addr = "node-2.cluster:4433"
[[node]]
name = "node-3"
addr = "10.0.0.4:4433"
[[service]]
name = "torch-store"
node = "node-0"
target = "127.0.0.1:29500"
listen = "127.0.0.1:29500"
allow = ["*"]
[[service]]
name = "vllm-dp"
node = "node-0"
target = "127.0.0.1:13345"
listen = "127.0.0.1:13345"
allow = ["node-1", "node-2"]
[[service]]
name = "metrics"
node = "node-3"
target = "127.0.0.1:9100"
listen = "127.0.0.1:19100"
allow = ["node-0"]
[[overlay_allow]]
peers = ["*"]
ports = "1024-65535"
"#;

    fn name(text: &str) -> NodeName {
        NodeName::new(text).unwrap()
    }

    fn errors(text: &str) -> Vec<(String, String)> {
        parse_manifest(text)
            .expect_err("errors")
            .iter()
            .map(|error| (error.key.clone(), error.message.clone()))
            .collect()
    }

    #[test]
    fn each_node_gets_its_peers_forwards_and_exposes() {
        let manifest = parse_manifest(FOUR_NODES).expect("valid");
        assert_eq!(manifest.cluster, "prod");

        let node_0 = manifest.derive(&name("node-0")).expect("node-0");
        let peers: Vec<&str> = node_0.peers.iter().map(|peer| peer.name.as_str()).collect();
        assert_eq!(peers, ["node-1", "node-2", "node-3"]);
        assert_eq!(node_0.peers[0].overlay, Some(Ipv4Addr::new(100, 127, 0, 2)));
        assert_eq!(node_0.overlay_address, Some(Ipv4Addr::new(100, 127, 0, 1)));
        let exposed: Vec<&str> = node_0.exposes.iter().map(|e| e.service.as_str()).collect();
        assert_eq!(exposed, ["torch-store", "vllm-dp"]);
        // node-3's metrics allow node-0 only.
        assert_eq!(node_0.forwards.len(), 1);
        assert_eq!(node_0.forwards[0].service.as_str(), "metrics");
        assert_eq!(node_0.forwards[0].peer.as_str(), "node-3");
        assert_eq!(
            node_0.forwards[0].listen,
            "127.0.0.1:19100".parse().unwrap()
        );

        let node_1 = manifest.derive(&name("node-1")).expect("node-1");
        let forwarded: Vec<(&str, &str)> = node_1
            .forwards
            .iter()
            .map(|f| (f.peer.as_str(), f.service.as_str()))
            .collect();
        assert_eq!(
            forwarded,
            [("node-0", "torch-store"), ("node-0", "vllm-dp")]
        );
        assert!(node_1.exposes.is_empty());

        // node-3 may reach the store ("*") but not vllm-dp.
        let node_3 = manifest.derive(&name("node-3")).expect("node-3");
        let forwarded: Vec<&str> = node_3.forwards.iter().map(|f| f.service.as_str()).collect();
        assert_eq!(forwarded, ["torch-store"]);
        assert_eq!(node_3.overlay_address, None);
        assert_eq!(node_3.overlay_allow.len(), 1);

        assert_eq!(manifest.derive(&name("node-9")), None);
    }

    #[test]
    fn every_problem_is_named_with_its_key() {
        let broken = r#"
cluster = "Prod"
[[node]]
name = "node-0"
addr = "10.0.0.1:4433"
overlay = "100.127.0.1"
[[node]]
name = "node-0"
addr = "10.0.0.1:4433"
overlay = "100.127.0.1"
[[node]]
name = "node-2"
addr = "10.0.0.3:4433"
[[service]]
name = "store"
node = "node-7"
target = "127.0.0.1:29500"
listen = "127.0.0.1:29500"
allow = ["*"]
[[service]]
name = "other"
node = "node-2"
target = "127.0.0.1:1"
listen = "127.0.0.1:29500"
allow = ["node-5"]
[[service]]
name = "public"
node = "node-2"
target = "127.0.0.1:2"
listen = "0.0.0.0:2000"
allow = ["*"]
[[overlay_allow]]
peers = ["node-8"]
ports = "1-2"
"#;
        let found = errors(broken);
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cluster",
                "node[1].name",
                "node[1].addr",
                "node[1].overlay",
                "service[0].node",
                "service[1].listen",
                "service[1].allow[0]",
                "service[2].listen",
                "overlay_allow[0].peers[0]",
            ],
            "{found:#?}"
        );
        assert!(found[1].1.contains("already node[0]"), "{found:#?}");
        assert!(found[4].1.contains("not a [[node]]"), "{found:#?}");
        assert!(
            found[5]
                .1
                .contains("already the listen address of service[0]"),
            "{found:#?}"
        );
        assert!(found[7].1.contains("loopback"), "{found:#?}");
    }

    #[test]
    fn a_manifest_needs_a_cluster_and_a_node() {
        let found = errors("");
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["cluster"]);
        let found = errors("cluster = \"prod\"\n");
        assert_eq!(found[0].0, "node");
        let found = errors("cluster = \"prod\"\n[[nodes]]\nname = \"x\"\n");
        assert!(found
            .iter()
            .any(|(key, message)| key == "nodes" && message.contains("unknown key")));
    }
}
