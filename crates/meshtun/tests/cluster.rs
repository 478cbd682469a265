//! `meshtun cluster check|show` and `meshtun check` of a node config that
//! names a cluster manifest, run as processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{init_ca, issue, meshtun_with, TempDir, EXIT_CONFIG};

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn example_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster/cluster.toml")
}

#[test]
fn cluster_check_accepts_the_example_and_names_every_problem_of_a_broken_one() {
    let ok = meshtun_with(&["cluster", "check", path_str(&example_manifest())]).success();
    assert!(
        ok.stdout
            .contains("cluster \"prod\", 4 nodes, 1 service: OK"),
        "{ok}"
    );

    let dir = TempDir::new("cluster-check");
    let broken = dir.join("cluster.toml");
    fs::write(
        &broken,
        "cluster = \"prod\"\n\
         [[node]]\nname = \"node-0\"\naddr = \"10.0.0.1:4433\"\n\
         [[node]]\nname = \"node-0\"\naddr = \"10.0.0.1:4433\"\n\
         [[service]]\nname = \"s\"\nnode = \"node-9\"\ntarget = \"127.0.0.1:1\"\n\
         listen = \"127.0.0.1:2\"\nallow = [\"node-8\"]\n",
    )
    .unwrap();
    let refused = meshtun_with(&["cluster", "check", path_str(&broken)]);
    assert_eq!(refused.code(), EXIT_CONFIG, "{refused}");
    for key in [
        "node[1].name",
        "node[1].addr",
        "service[0].node",
        "service[0].allow[0]",
    ] {
        assert!(refused.stderr.contains(key), "{key} not named: {refused}");
    }
}

#[test]
fn cluster_show_prints_what_a_node_gets() {
    let shown = meshtun_with(&[
        "cluster",
        "show",
        path_str(&example_manifest()),
        "--node",
        "node-2",
    ])
    .success();
    for line in [
        "name = \"node-0\"",
        "[[forward]]",
        "listen = \"127.0.0.1:18000\"",
        "service = \"vllm-api\"",
    ] {
        assert!(shown.stdout.contains(line), "{line}: {shown}");
    }
    assert!(!shown.stdout.contains("name = \"node-2\""), "{shown}");
    let unknown = meshtun_with(&[
        "cluster",
        "show",
        path_str(&example_manifest()),
        "--node",
        "node-9",
    ]);
    assert_eq!(unknown.code(), EXIT_CONFIG, "{unknown}");
    assert!(unknown.stderr.contains("node-9"), "{unknown}");
}

#[test]
fn check_and_run_refuse_a_manifest_of_another_cluster_than_the_certificate() {
    let dir = TempDir::new("cluster-name");
    init_ca("dev", dir.path());
    issue(dir.path(), "node-0", dir.path());
    fs::write(
        dir.join("cluster.toml"),
        "cluster = \"prod\"\n[[node]]\nname = \"node-0\"\naddr = \"127.0.0.1:4433\"\n\
         [[node]]\nname = \"node-1\"\naddr = \"127.0.0.1:4434\"\n",
    )
    .unwrap();
    let config = dir.join("node-0.toml");
    fs::write(
        &config,
        format!(
            "node = \"node-0\"\ncluster = \"cluster.toml\"\n[quic]\nlisten = \"127.0.0.1:4433\"\n\
             [tls]\nca = \"{0}ca.crt\"\ncert = \"{0}node-0.crt\"\nkey = \"{0}node-0.key\"\n",
            dir.prefix()
        ),
    )
    .unwrap();
    let refused = meshtun_with(&["check", "-c", path_str(&config)]);
    assert_eq!(refused.code(), EXIT_CONFIG, "{refused}");
    assert!(
        refused
            .stdout
            .contains("the manifest is for cluster \"prod\", but tls.cert is a certificate of cluster \"dev\""),
        "{refused}"
    );
    // `run` shares check's checks: it refuses to start on the same error.
    let not_started = meshtun_with(&["run", "-c", path_str(&config)]);
    assert_eq!(not_started.code(), EXIT_CONFIG, "{not_started}");
    assert!(
        not_started
            .stderr
            .contains("the manifest is for cluster \"prod\", but tls.cert is a certificate of cluster \"dev\""),
        "{not_started}"
    );
    // The same manifest for cluster "dev": accepted, node-1 a peer.
    fs::write(
        dir.join("cluster.toml"),
        "cluster = \"dev\"\n[[node]]\nname = \"node-0\"\naddr = \"127.0.0.1:4433\"\n\
         [[node]]\nname = \"node-1\"\naddr = \"127.0.0.1:4434\"\n",
    )
    .unwrap();
    let accepted = meshtun_with(&["check", "-c", path_str(&config)]);
    assert_eq!(accepted.code(), 0, "{accepted}");
}
