//! `meshtun-bench --quick` end to end: direct TCP and meshtun in two
//! namespace hosts, every measurement at both MTUs, the JSON and the PNG.
//! No performance assertion: one run's figures are noise; only the ratios
//! within a full run mean anything.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod lab_support;

use std::process::Command;

use lab_support::require_tool;
use meshtun_bench::{Options, MEASUREMENTS};
use meshtun_lab::require_netns;

#[test]
fn a_quick_bench_measures_everything_for_direct_tcp_and_meshtun() {
    let test = "a_quick_bench_measures_everything_for_direct_tcp_and_meshtun";
    if !require_netns(test) {
        return;
    }
    if !require_tool(test, "iperf3", Command::new("iperf3").arg("--version")) {
        return;
    }
    let out = std::env::temp_dir().join(format!("meshtun-lab-bench-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let options = Options::quick(out.clone());
    let report = meshtun_bench::run(&options).unwrap();
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let results = json["results"].as_array().unwrap();
    for mtu in [1500u64, 9000] {
        for contender in ["direct", "meshtun"] {
            for measurement in MEASUREMENTS {
                if contender == "direct" && measurement.forwarder_only {
                    // No forwarder, no memory or CPU figure.
                    continue;
                }
                let result = results
                    .iter()
                    .find(|result| {
                        result["mtu"] == mtu
                            && result["contender"] == contender
                            && result["measurement"] == measurement.id
                    })
                    .unwrap_or_else(|| {
                        panic!("no {} for {contender} at MTU {mtu}", measurement.id)
                    });
                let value = result["value"].as_f64().unwrap_or_else(|| {
                    panic!(
                        "{} for {contender} at MTU {mtu} has no value: {result}",
                        measurement.id
                    )
                });
                assert!(
                    value.is_finite() && value > 0.0,
                    "{} for {contender} at MTU {mtu} is {value}",
                    measurement.id
                );
                assert_eq!(result["unit"], measurement.unit);
            }
        }
    }
    // Ratios to meshtun are there, and meshtun's own is 1.
    let meshtun_rate = results
        .iter()
        .find(|r| r["contender"] == "meshtun" && r["measurement"] == "connect_rate")
        .unwrap();
    assert_eq!(meshtun_rate["ratio_to_meshtun"].as_f64(), Some(1.0));
    assert_eq!(json["settings"]["idle_connections"], 100);
    let contenders: Vec<&str> = json["contenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(contenders, ["direct", "meshtun"]);

    let png = std::fs::read(out.join("bench.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "bench.png is not a PNG chart ({} bytes)",
        png.len()
    );
    let table = std::fs::read_to_string(out.join("bench.txt")).unwrap();
    assert!(
        table.contains("MTU 1500") && table.contains("MTU 9000"),
        "{table}"
    );
    // The lab is gone: no namespace of this process is left.
    let mine = format!("{}{}-", meshtun_lab::NAMESPACE_PREFIX, std::process::id());
    assert!(
        !meshtun_lab::lab_namespaces()
            .iter()
            .any(|ns| ns.starts_with(&mine)),
        "namespaces left behind: {:?}",
        meshtun_lab::lab_namespaces()
    );
    let _ = std::fs::remove_dir_all(&out);
}
