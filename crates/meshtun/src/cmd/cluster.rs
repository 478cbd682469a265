//! `meshtun cluster`: check a cluster manifest, and show what one node gets
//! from it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use meshtun_config::{Allow, Derived, Manifest};
use meshtun_proto::NodeName;

use crate::EXIT_CONFIG;

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Check a cluster manifest: print every problem with its key path,
    /// exit 78 if there is any.
    Check {
        /// The manifest (the same file on every node).
        manifest: PathBuf,
    },
    /// Print the peers, forwards and exposes one node gets from a
    /// manifest, as node-config TOML.
    Show {
        /// The manifest.
        manifest: PathBuf,
        /// The node.
        #[arg(long)]
        node: NodeName,
    },
}

pub(crate) fn cluster(command: ClusterCommand) -> ExitCode {
    match command {
        ClusterCommand::Check { manifest } => {
            let Some(manifest_value) = load(&manifest) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            let count = |count: usize, what: &str| match count {
                1 => format!("1 {what}"),
                count => format!("{count} {what}s"),
            };
            say!(
                "{}: cluster {:?}, {}, {}: OK",
                manifest.display(),
                manifest_value.cluster,
                count(manifest_value.nodes.len(), "node"),
                count(manifest_value.services.len(), "service")
            );
            ExitCode::SUCCESS
        }
        ClusterCommand::Show { manifest, node } => {
            let Some(manifest_value) = load(&manifest) else {
                return ExitCode::from(EXIT_CONFIG);
            };
            match manifest_value.derive(&node) {
                Some(derived) => {
                    print!("{}", render(&manifest_value, &manifest, &node, &derived));
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!(
                        "error: {}: node {node:?} is not a [[node]] of this manifest",
                        manifest.display()
                    );
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// The manifest, or `None` after printing every problem.
fn load(path: &Path) -> Option<Manifest> {
    match meshtun_config::load_manifest(path) {
        Ok(manifest) => Some(manifest),
        Err(errors) => {
            for error in errors.iter() {
                eprintln!("error: {}: {error}", path.display());
            }
            None
        }
    }
}

/// What `node` gets, as the `[[peer]]`, `[[forward]]` and `[[expose]]`
/// entries a node config would hold (and the overlay settings as comments).
fn render(manifest: &Manifest, path: &Path, node: &NodeName, derived: &Derived) -> String {
    let mut out = String::new();
    let quote = |text: &str| format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
    let _ = writeln!(
        out,
        "# What node {node} of cluster {:?} gets from {}.",
        manifest.cluster,
        path.display()
    );
    for peer in &derived.peers {
        let _ = writeln!(out, "\n[[peer]]\nname = {}", quote(peer.name.as_str()));
        let _ = writeln!(out, "addr = {}", quote(&peer.addr.to_string()));
        if let Some(overlay) = peer.overlay {
            // Valid only with [overlay]: a comment, so the output pastes
            // into any node config.
            let _ = writeln!(
                out,
                "# overlay = {}    # in overlay mode",
                quote(&overlay.to_string())
            );
        }
    }
    for forward in &derived.forwards {
        let _ = writeln!(
            out,
            "\n[[forward]]\nlisten = {}\npeer = {}\nservice = {}",
            quote(&forward.listen.to_string()),
            quote(forward.peer.as_str()),
            quote(forward.service.as_str())
        );
    }
    for expose in &derived.exposes {
        let _ = writeln!(
            out,
            "\n[[expose]]\nservice = {}\ntarget = {}\nallow = {}",
            quote(expose.service.as_str()),
            quote(&expose.target.to_string()),
            allow_list(&expose.allow)
        );
    }
    if let Some(address) = derived.overlay_address {
        let _ = writeln!(
            out,
            "\n# [overlay] address = {}",
            quote(&address.to_string())
        );
    }
    for rule in &derived.overlay_allow {
        let _ = writeln!(
            out,
            "# [overlay] allow: peers = {}, ports = \"{}-{}\"",
            allow_list(&rule.peers),
            rule.ports.start(),
            rule.ports.end()
        );
    }
    out
}

fn allow_list(allow: &Allow) -> String {
    match allow {
        Allow::Any => "[\"*\"]".to_owned(),
        Allow::Only(names) => {
            let names: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
            format!("[{}]", names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
cluster = "prod"
[[node]]
name = "node-0"
addr = "10.0.0.1:4433"
[[node]]
name = "node-1"
addr = "10.0.0.2:4433"
[[service]]
name = "torch-store"
node = "node-0"
target = "127.0.0.1:29500"
listen = "127.0.0.1:29500"
allow = ["node-1"]
"#;

    /// The rendered entries, appended to a node config, parse to exactly
    /// what the manifest derives.
    #[test]
    fn what_show_prints_is_the_config_the_manifest_derives() {
        let manifest = meshtun_config::parse_manifest(MANIFEST).expect("manifest");
        for node in ["node-0", "node-1"] {
            let name = NodeName::new(node).expect("name");
            let derived = manifest.derive(&name).expect("derived");
            let shown = render(&manifest, Path::new("cluster.toml"), &name, &derived);
            let config = format!(
                "node = \"{node}\"\n[quic]\nlisten = \"198.18.0.1:4433\"\n\
                 [tls]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n{shown}"
            );
            let parsed = meshtun_config::parse(&config)
                .unwrap_or_else(|errors| panic!("{errors}\n{config}"));
            assert_eq!(parsed.peers, derived.peers, "{shown}");
            assert_eq!(parsed.forwards, derived.forwards, "{shown}");
            assert_eq!(parsed.exposes, derived.exposes, "{shown}");
        }
    }
}
