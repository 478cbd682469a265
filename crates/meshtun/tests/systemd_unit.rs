//! The systemd unit in `examples/systemd/`: it holds the directives the
//! daemon's contract and its sandbox depend on, its numbers agree with the
//! config defaults, and `systemd-analyze verify` accepts it without a single
//! complaint about it. A second check feeds `verify` broken copies, to prove
//! that the first one can fail.
//!
//! Without `systemd-analyze` the verify tests print a SKIP line, unless
//! `CI=true` or `MESHTUN_REQUIRE_NETNS=1`, where a skip is a failure.

// A panic in test code is a failed test, which is what an unwrap here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run, Finished, TempDir};

/// The unit's file name; `verify` names the unit by it in every complaint.
const UNIT_NAME: &str = "meshtun.service";

/// Where the unit runs the binary once installed.
const INSTALLED_BINARY: &str = "/usr/local/bin/meshtun";

/// `examples/systemd/` in the workspace.
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/systemd")
}

fn unit_text() -> String {
    fs::read_to_string(examples_dir().join(UNIT_NAME)).unwrap()
}

/// The unit's settings as `(section, key, value)`, in file order, without
/// comments and blank lines.
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a `key=value` line in the unit: {line:?}"));
        found.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    found
}

/// Every value of `section`'s `key`, in file order.
fn values<'a>(all: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    all.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, value)| value.as_str())
        .collect()
}

/// The one value of `section`'s `key`; fails if it is missing or repeated.
fn single<'a>(all: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    match values(all, section, key).as_slice() {
        [value] => value,
        other => panic!("[{section}] {key}= should be set exactly once, found {other:?}"),
    }
}

/// A systemd time span written as `<n>s` or `<n>min` (all this unit uses).
fn time_span(text: &str) -> Duration {
    if let Some(minutes) = text.strip_suffix("min") {
        return Duration::from_secs(minutes.parse::<u64>().unwrap() * 60);
    }
    let seconds = text
        .strip_suffix('s')
        .unwrap_or_else(|| panic!("write time spans as <n>s or <n>min, got {text:?}"));
    Duration::from_secs(seconds.parse().unwrap())
}

#[test]
fn the_unit_holds_the_required_directives() {
    let text = unit_text();
    let all = directives(&text);
    let service = |key| single(&all, "Service", key);

    // The notify protocol the daemon speaks, on systemd 252 (no notify-reload).
    assert_eq!(service("Type"), "notify");
    assert_eq!(service("NotifyAccess"), "main");
    assert_eq!(service("WatchdogSec"), "30s");
    assert_eq!(
        service("ExecStart"),
        "/usr/local/bin/meshtun run --config /etc/meshtun/meshtun.toml"
    );
    assert_eq!(
        service("ExecStartPre"),
        "/usr/local/bin/meshtun check --config /etc/meshtun/meshtun.toml"
    );
    assert_eq!(
        values(&all, "Service", "ExecReload").last().copied(),
        Some("/bin/kill -HUP $MAINPID"),
        "the last reload step must signal the daemon"
    );

    // Restarts, but never for a usage error or a bad config.
    assert_eq!(service("Restart"), "on-failure");
    assert_eq!(service("RestartSec"), "2s");
    assert_eq!(service("RestartPreventExitStatus"), "64 78");
    assert_eq!(service("KillSignal"), "SIGTERM");

    // The sandbox.
    for (key, value) in [
        ("User", "meshtun"),
        ("Group", "meshtun"),
        ("UMask", "0077"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("ProtectSystem", "strict"),
        ("ReadOnlyPaths", "/etc/meshtun"),
        // Renewal writes the certificate and key there, and nowhere else.
        ("ReadWritePaths", "-/etc/meshtun/keys"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ),
        ("LimitNOFILE", "1048576"),
    ] {
        assert_eq!(service(key), value, "[Service] {key}=");
    }
    assert_eq!(
        values(&all, "Service", "SystemCallFilter"),
        ["@system-service", "~@privileged @resources"]
    );

    assert_eq!(single(&all, "Unit", "After"), "network-online.target");
    assert_eq!(single(&all, "Unit", "Wants"), "network-online.target");
    assert_eq!(single(&all, "Install", "WantedBy"), "multi-user.target");
}

#[test]
fn the_unit_and_its_readme_agree_with_the_config_defaults() {
    let defaults = meshtun_config::parse(meshtun_config::EXAMPLE).unwrap();
    let all = directives(&unit_text());

    // Shutdown takes drain_grace, then up to 1 s for reset streams and 2 s
    // for QUIC close frames (meshtun-node's Node::shutdown): systemd must not
    // SIGKILL the daemon in the middle of that.
    let stop_timeout = time_span(single(&all, "Service", "TimeoutStopSec"));
    let grace = defaults.limits.drain_grace;
    assert!(
        stop_timeout >= grace + Duration::from_secs(5),
        "TimeoutStopSec={stop_timeout:?} leaves too little room after the default drain_grace {grace:?}"
    );

    // The sysctl example lets the kernel grant the default buffer sizes.
    let readme = fs::read_to_string(examples_dir().join("README.md")).unwrap();
    for (sysctl, wanted) in [
        ("net.core.rmem_max", defaults.quic.udp_recv_buffer),
        ("net.core.wmem_max", defaults.quic.udp_send_buffer),
    ] {
        let value: usize = readme
            .lines()
            .find_map(|line| line.trim().strip_prefix(sysctl))
            .and_then(|rest| rest.trim().strip_prefix('='))
            .unwrap_or_else(|| panic!("README.md has no `{sysctl} = N` line"))
            .trim()
            .parse()
            .unwrap();
        assert!(
            value >= wanted,
            "{sysctl} = {value} is below the default buffer request of {wanted} bytes"
        );
    }
}

// ------------------------------------------------------- systemd-analyze

/// Whether `systemd-analyze` can be run. Where it is missing, prints a SKIP
/// line and returns `false`, unless CI requires every test to run.
fn require_systemd_analyze(test: &str) -> bool {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(_) => true,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let ci = std::env::var("CI").is_ok_and(|value| value == "true");
            let required = std::env::var("MESHTUN_REQUIRE_NETNS").is_ok_and(|value| value == "1");
            if ci || required {
                panic!("{test}: systemd-analyze is not installed, and CI=true or MESHTUN_REQUIRE_NETNS=1 forbids a skip (install the `systemd` package)");
            }
            println!("SKIP: systemd-analyze not installed");
            false
        }
        Err(error) => panic!("{test}: cannot run systemd-analyze: {error}"),
    }
}

/// The systemd version `systemd-analyze --version` reports ("systemd 252 (...)").
fn systemd_version() -> u32 {
    let output = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a version from {text:?}"))
}

/// The unit with its command lines pointing at `binary`. `verify` checks
/// that every `Exec*=` executable exists, and the test machine has no
/// installed `/usr/local/bin/meshtun` (or an old one): the unit is checked
/// against the binary this build produced.
fn with_binary(text: &str, binary: &str) -> String {
    assert!(text.contains(INSTALLED_BINARY));
    text.replace(INSTALLED_BINARY, binary)
}

/// What `systemd-analyze verify` said about one unit file.
#[derive(Debug)]
struct Verdict {
    finished: Finished,
    /// The output lines that name the unit: warnings about unknown keys or
    /// bad values, missing executables. Other lines are the environment's
    /// (for example a container without D-Bus) and are not held against it.
    complaints: Vec<String>,
}

impl Verdict {
    fn accepted(&self) -> bool {
        self.finished.status.success() && self.complaints.is_empty()
    }
}

/// Writes `text` as `dir/meshtun.service` and runs `systemd-analyze verify` on it.
fn verify(dir: &TempDir, text: &str) -> Verdict {
    let path = dir.join(UNIT_NAME);
    fs::write(&path, text).unwrap();
    let finished = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        // Warnings must reach stderr, whatever the caller's environment says.
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env_remove("SYSTEMD_UNIT_PATH"));
    // `verify` exits 0 after most warnings (an unknown key or value is
    // "ignoring"), so the lines that name the unit decide.
    let complaints = finished
        .stdout
        .lines()
        .chain(finished.stderr.lines())
        .filter(|line| line.contains(UNIT_NAME))
        .map(str::to_owned)
        .collect();
    Verdict {
        finished,
        complaints,
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if !require_systemd_analyze("systemd_analyze_verify_accepts_the_unit") {
        return;
    }
    let dir = TempDir::new("systemd-unit");
    let unit = with_binary(&unit_text(), env!("CARGO_BIN_EXE_meshtun"));
    let verdict = verify(&dir, &unit);
    assert!(
        verdict.accepted(),
        "systemd-analyze verify refused the unit; complaints: {:#?}\nfull output: {}",
        verdict.complaints,
        verdict.finished
    );
}

#[test]
fn systemd_analyze_verify_rejects_broken_units() {
    if !require_systemd_analyze("systemd_analyze_verify_rejects_broken_units") {
        return;
    }
    let dir = TempDir::new("systemd-broken");
    let good = with_binary(&unit_text(), env!("CARGO_BIN_EXE_meshtun"));
    let missing_binary = dir.join("no-such-meshtun");
    let mut broken = vec![
        (
            "a misspelt type",
            good.replace("Type=notify", "Type=notify-reloadd"),
        ),
        (
            "a misspelt key",
            good.replace("ProtectSystem=strict", "ProtectSystm=strict"),
        ),
        (
            "a bad value",
            good.replace("ProtectSystem=strict", "ProtectSystem=very"),
        ),
        (
            "an unknown address family",
            good.replace("AF_NETLINK", "AF_NETLNK"),
        ),
        (
            "a missing executable",
            with_binary(&unit_text(), missing_binary.to_str().unwrap()),
        ),
    ];
    // The reason the unit says Type=notify: this systemd predates notify-reload.
    if systemd_version() < 253 {
        broken.push((
            "Type=notify-reload before systemd 253",
            good.replace("Type=notify", "Type=notify-reload"),
        ));
    }
    for (what, unit) in broken {
        assert_ne!(unit, good, "{what}: the replacement did not apply");
        let verdict = verify(&dir, &unit);
        assert!(
            !verdict.accepted(),
            "{what}: systemd-analyze verify accepted a broken unit\nfull output: {}",
            verdict.finished
        );
    }
}
