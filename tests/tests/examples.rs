//! The operator recipes under `examples/` stay true: every config parses
//! with the real parser, the nodes of each recipe agree with one another
//! (each forward reaches a node of the same recipe that exposes the service
//! to the forwarding node, at the address that node listens on), and the
//! nftables ruleset is one nft accepts.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use meshtun_config::Config;

/// How many configs the recipes hold at least: two-node (2), vllm-dp-2node
/// (2), vllm-dp-4node (4), mindspore (2), torch-distributed (2). Guards
/// against a walk that silently finds nothing.
const MIN_CONFIGS: usize = 12;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every `*.toml` under `dir`, recursively, in a stable order.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "toml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The path as shown in failures: relative to `examples/`.
fn shown(path: &Path) -> String {
    path.strip_prefix(examples_dir())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_example_config_parses_and_each_recipe_is_consistent() {
    let files = toml_files(&examples_dir());
    let mut problems = Vec::new();
    // Recipe directory -> the configs in it, with their files.
    let mut recipes: BTreeMap<PathBuf, Vec<(PathBuf, Config)>> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        match meshtun_config::parse(&text) {
            Ok(config) => {
                let dir = file.parent().unwrap().to_path_buf();
                recipes.entry(dir).or_default().push((file.clone(), config));
            }
            Err(errors) => {
                for error in &errors {
                    problems.push(format!("{}: {error}", shown(file)));
                }
            }
        }
    }
    for (dir, nodes) in &recipes {
        check_recipe(dir, nodes, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in examples/:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        files.len() >= MIN_CONFIGS,
        "found {} config(s) under {}, expected at least {MIN_CONFIGS}: {:?}",
        files.len(),
        examples_dir().display(),
        files.iter().map(|file| shown(file)).collect::<Vec<_>>()
    );
    println!(
        "checked {} config(s) in {} recipe(s)",
        files.len(),
        recipes.len()
    );
}

/// The cross-node checks of one recipe directory: node names are unique;
/// each `[[forward]]` names a node of this directory, which exposes the
/// service and allows the forwarding node; and the forwarding node dials
/// that node where its `[quic] listen` is.
fn check_recipe(dir: &Path, nodes: &[(PathBuf, Config)], problems: &mut Vec<String>) {
    let mut by_name: BTreeMap<&str, (&Path, &Config)> = BTreeMap::new();
    for (file, config) in nodes {
        if let Some((other, _)) = by_name.insert(config.node.as_str(), (file, config)) {
            problems.push(format!(
                "{}: node {} is also the node of {}",
                shown(file),
                config.node,
                shown(other)
            ));
        }
    }
    for (file, config) in nodes {
        let file = shown(file);
        for (index, forward) in config.forwards.iter().enumerate() {
            let key = format!("{file}: forward[{index}]");
            let Some((peer_file, peer)) = by_name.get(forward.peer.as_str()) else {
                problems.push(format!(
                    "{key}: peer {} is not a node in {} (nodes: {:?})",
                    forward.peer,
                    shown(dir),
                    by_name.keys().collect::<Vec<_>>()
                ));
                continue;
            };
            let peer_file = shown(peer_file);
            match peer.expose(&forward.service) {
                None => problems.push(format!(
                    "{key}: {} ({peer_file}) does not expose service {}",
                    forward.peer, forward.service
                )),
                Some(expose) if !expose.allow.permits(&config.node) => problems.push(format!(
                    "{key}: {} ({peer_file}) exposes {} but its allow list does not permit {}",
                    forward.peer, forward.service, config.node
                )),
                Some(_) => {}
            }
            if let Some(declared) = config.peer(&forward.peer) {
                let dialled = declared.addr.to_socket_addr_if_literal();
                if dialled != Some(peer.quic.listen) {
                    problems.push(format!(
                        "{file}: peer {} is dialled at {} but {peer_file} listens on {}",
                        forward.peer, declared.addr, peer.quic.listen
                    ));
                }
            }
        }
    }
}

/// Effective user id 0, read from /proc (no libc call needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn nftables_ruleset_passes_nft_check() {
    let test = "nftables_ruleset_passes_nft_check";
    let ruleset = examples_dir().join("nftables/meshtun.nft");
    assert!(ruleset.is_file(), "{} is missing", ruleset.display());
    let missing = if !nft_available() {
        Some("the `nft` command (nftables) is missing")
    } else if !is_root() {
        Some("not running as root (`nft -c` needs CAP_NET_ADMIN)")
    } else {
        None
    };
    if let Some(reason) = missing {
        if std::env::var("MESHTUN_REQUIRE_NETNS").is_ok_and(|value| value == "1") {
            panic!("{test}: MESHTUN_REQUIRE_NETNS=1 but {reason}");
        }
        println!("SKIP {test}: {reason}");
        return;
    }
    // `-c` parses and validates against the kernel without changing anything.
    let output = Command::new("nft")
        .arg("-c")
        .arg("-f")
        .arg(&ruleset)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "nft -c -f {} failed ({}):\n{}{}",
        ruleset.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
