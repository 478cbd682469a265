//! The operator recipes under `examples/` stay true: every config parses
//! with the real parser and passes `meshtun check` (with certificates this
//! test makes for its nodes), the nodes of each recipe agree with one
//! another (each forward reaches a node of the same recipe that exposes the
//! service to the forwarding node, at the address that node listens on; in
//! overlay mode every node knows every other one at its overlay address and
//! lets it in), and the nftables ruleset is one nft accepts.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use meshtun_config::Config;

/// How many configs the recipes hold at least: two-node (2), vllm-dp-2node
/// (2), vllm-dp-4node (4), vllm-offline-spmd (2), vllm-mindspore (2),
/// mindspore (3), torch-distributed (3), cluster (4 node configs; its
/// manifest is checked apart). Guards against a walk that silently finds
/// nothing.
const MIN_CONFIGS: usize = 22;

/// The file name of a cluster manifest among the recipes.
const MANIFEST: &str = "cluster.toml";

/// Recipes in overlay mode at least (every one that carries ports chosen
/// at run time). Guards against the overlay checks finding nothing.
const MIN_OVERLAY_RECIPES: usize = 7;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every node config (`*.toml` but the cluster manifests) under `dir`,
/// recursively, in a stable order.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    all_toml_files(dir)
        .into_iter()
        .filter(|path| !is_manifest(path))
        .collect()
}

fn is_manifest(path: &Path) -> bool {
    path.file_name().is_some_and(|name| name == MANIFEST)
}

/// Every `*.toml` under `dir`, recursively, in a stable order.
fn all_toml_files(dir: &Path) -> Vec<PathBuf> {
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
    for manifest in all_toml_files(&examples_dir())
        .into_iter()
        .filter(|path| is_manifest(path))
    {
        if let Err(errors) = meshtun_config::load_manifest(&manifest) {
            for error in &errors {
                problems.push(format!("{}: {error}", shown(&manifest)));
            }
        }
    }
    for file in &files {
        // `load`, not `parse`: a config naming a manifest gets its peers,
        // forwards and exposes from it.
        match meshtun_config::load(file) {
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
    let mut overlay_recipes = 0;
    for (dir, nodes) in &recipes {
        check_recipe(dir, nodes, &mut problems);
        if nodes.iter().any(|(_, config)| config.overlay.is_some()) {
            overlay_recipes += 1;
            check_overlay(nodes, &mut problems);
        }
    }
    assert!(
        overlay_recipes >= MIN_OVERLAY_RECIPES,
        "{overlay_recipes} recipe(s) in overlay mode, expected at least {MIN_OVERLAY_RECIPES}"
    );
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

/// The overlay checks of one recipe: every node is in overlay mode, with
/// its own address; each lists every other node as a peer, at that node's
/// QUIC address and overlay address; and each lets every other node reach
/// some port of its overlay address (else nothing could be carried to it).
fn check_overlay(nodes: &[(PathBuf, Config)], problems: &mut Vec<String>) {
    let mut owners: BTreeMap<std::net::Ipv4Addr, String> = BTreeMap::new();
    for (file, config) in nodes {
        let Some(overlay) = &config.overlay else {
            problems.push(format!(
                "{}: has no [overlay] while other nodes of its recipe do",
                shown(file)
            ));
            continue;
        };
        if let Some(other) = owners.insert(overlay.address, shown(file)) {
            problems.push(format!(
                "{}: overlay address {} is also {other}'s",
                shown(file),
                overlay.address
            ));
        }
        if overlay.manage {
            problems.push(format!(
                "{}: overlay.manage = true; the recipes run `meshtun overlay up` from systemd",
                shown(file)
            ));
        }
        if !overlay.guard {
            problems.push(format!("{}: overlay.guard is off", shown(file)));
        }
    }
    for (file, config) in nodes {
        let Some(overlay) = &config.overlay else {
            continue;
        };
        for (other_file, other) in nodes {
            if other.node == config.node {
                continue;
            }
            let Some(other_overlay) = &other.overlay else {
                continue;
            };
            let key = format!("{}: peer {}", shown(file), other.node);
            match config.peer(&other.node) {
                None => problems.push(format!("{key} ({}) is not declared", shown(other_file))),
                Some(peer) => {
                    if peer.overlay != Some(other_overlay.address) {
                        problems.push(format!(
                            "{key}: overlay {:?} but {} has overlay.address {}",
                            peer.overlay,
                            shown(other_file),
                            other_overlay.address
                        ));
                    }
                    if peer.addr.to_socket_addr_if_literal() != Some(other.quic.listen) {
                        problems.push(format!(
                            "{key}: dialled at {} but {} listens on {}",
                            peer.addr,
                            shown(other_file),
                            other.quic.listen
                        ));
                    }
                }
            }
            let admitted = overlay
                .allow
                .iter()
                .any(|rule| rule.peers.permits(&other.node));
            if !admitted {
                problems.push(format!(
                    "{}: overlay.allow lets {} reach no port",
                    shown(file),
                    other.node
                ));
            }
        }
    }
}

/// `meshtun check` on every example config, each with certificates made
/// here for its node (the configs name `/etc/meshtun/`; the copies this
/// test checks name the temporary directory instead). `check` reads the
/// config and the certificates exactly as a start would, without binding
/// anything, so addresses of other hosts are fine.
#[test]
fn meshtun_check_accepts_every_example_config() {
    let binary =
        meshtun_lab::meshtun_binary().expect("the meshtun binary (cargo build -p meshtun)");
    let dir = tempfile_dir("meshtun-examples-check");
    let run = |args: &[&str]| {
        let output = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            output.status,
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let ca = dir.join("ca");
    let out = dir.join("out");
    let (status, text) = run(&[
        "pki",
        "init-ca",
        "--cluster",
        "prod",
        "--out",
        ca.to_str().unwrap(),
    ]);
    assert!(status.success(), "pki init-ca: {text}");
    let mut issued = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let files = toml_files(&examples_dir());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // With the manifest beside it, as the daemon reads it.
        let config = meshtun_config::load_local(file).unwrap_or_else(|errors| {
            panic!(
                "{}: {}",
                shown(file),
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        });
        let node = config.node.to_string();
        if issued.insert(node.clone()) {
            let (status, text) = run(&[
                "pki",
                "issue",
                "--ca",
                ca.to_str().unwrap(),
                "--node",
                &node,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(status.success(), "pki issue {node}: {text}");
        }
        let manifest = file.with_file_name(MANIFEST);
        let local = text
            .replace("/etc/meshtun/ca.crt", ca.join("ca.crt").to_str().unwrap())
            .replace("/etc/meshtun/", &format!("{}/", out.display()))
            .replace(
                &format!("cluster = \"{MANIFEST}\""),
                &format!("cluster = \"{}\"", manifest.display()),
            );
        let copy = dir.join(format!("{}.toml", shown(file).replace('/', "_")));
        std::fs::write(&copy, local).unwrap();
        let (status, text) = run(&["check", "-c", copy.to_str().unwrap()]);
        if !status.success() {
            failures.push(format!("{}: {status}\n{text}", shown(file)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "meshtun check refused:\n{}",
        failures.join("\n")
    );
    assert!(files.len() >= MIN_CONFIGS, "only {} config(s)", files.len());
}

/// A fresh directory under the system's temp dir, unique to this process.
fn tempfile_dir(stem: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{stem}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
