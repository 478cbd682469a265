//! The command line of the `meshtun` binary, run as a process: exit codes,
//! the small CA in `meshtun pki`, and `meshtun check` / `meshtun run` on good
//! and bad configurations and certificates (CLI and config schema).

// A panic in test code is a failed test, which is what an expect or a
// panic here means.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{
    hex, init_ca, issue, meshtun, meshtun_with, mode_of, run, set_mode, Finished, TempDir,
    EXIT_CONFIG, EXIT_USAGE,
};
use meshtun_pki::{Authority, NodeCredentials, Validity};
use meshtun_proto::NodeName;
use sha2::{Digest, Sha256};

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------- usage

#[test]
fn usage_errors_exit_64() {
    let dir = TempDir::new("usage");
    let out = path_str(dir.path());
    let cases: &[&[&str]] = &[
        &["frobnicate"],
        &["run"],
        &["check"],
        &[
            "pki", "issue", "--ca", out, "--node", "bad name", "--out", out,
        ],
        &[
            "pki",
            "issue",
            "--ca",
            out,
            "--node",
            "-leading-dash",
            "--out",
            out,
        ],
        &["pki", "issue", "--ca", out, "--node", "", "--out", out],
        &["pki", "init-ca", "--cluster", "Prod", "--out", out],
        &["pki", "init-ca", "--cluster", "", "--out", out],
        &["run", "-c"],
    ];
    for args in cases {
        let finished = meshtun_with(args);
        assert_eq!(finished.code(), EXIT_USAGE, "meshtun {args:?}: {finished}");
        assert!(
            !finished.stderr.trim().is_empty(),
            "meshtun {args:?} says nothing on stderr: {finished}"
        );
    }
    // A usage error never reaches the command: nothing was written.
    assert_eq!(fs::read_dir(dir.path()).expect("read dir").count(), 0);
}

#[test]
fn help_exits_0() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["pki", "issue", "--help"],
    ] {
        let finished = meshtun_with(args).success();
        assert!(
            finished.stdout.contains("Usage"),
            "meshtun {args:?} prints no usage: {finished}"
        );
    }
    let help = meshtun_with(&["--help"]);
    for command in ["run", "check", "pki"] {
        assert!(
            help.stdout.contains(command),
            "--help does not list {command}: {help}"
        );
    }
}

// ---------------------------------------------------------------- pki

#[test]
fn init_ca_writes_a_private_key_and_refuses_to_overwrite_without_force() {
    let dir = TempDir::new("init-ca");
    let ca = dir.join("ca");
    init_ca("c", &ca);
    let cert = ca.join("ca.crt");
    let key = ca.join("ca.key");
    let cert_pem = fs::read_to_string(&cert).expect("ca.crt is readable");
    assert!(
        cert_pem.contains("-----BEGIN CERTIFICATE-----"),
        "{cert_pem}"
    );
    let key_pem = fs::read(&key).expect("ca.key");
    assert!(!key_pem.is_empty());
    assert_eq!(mode_of(&key), 0o600, "ca.key mode");
    assert!(
        Authority::load(&ca).is_ok(),
        "the written CA loads as an authority"
    );

    let again = meshtun_with(&["pki", "init-ca", "--cluster", "c", "--out", path_str(&ca)]);
    assert_ne!(again.code(), 0, "overwrote without --force: {again}");
    assert!(
        again.stderr.contains("--force"),
        "the refusal does not mention --force: {again}"
    );
    assert_eq!(fs::read_to_string(&cert).expect("ca.crt"), cert_pem);
    assert_eq!(fs::read(&key).expect("ca.key"), key_pem);
    assert_eq!(mode_of(&key), 0o600);

    meshtun_with(&[
        "pki",
        "init-ca",
        "--cluster",
        "c",
        "--out",
        path_str(&ca),
        "--force",
    ])
    .success();
    assert_ne!(
        fs::read(&key).expect("ca.key"),
        key_pem,
        "--force wrote a new key"
    );
    assert_ne!(fs::read_to_string(&cert).expect("ca.crt"), cert_pem);
    assert_eq!(mode_of(&key), 0o600, "a replaced key is still 0600");
}

#[test]
fn init_ca_refuses_a_cluster_name_outside_the_rule_as_a_usage_error() {
    let dir = TempDir::new("init-ca-cluster");
    let ca = dir.join("ca");
    let rule = "only lowercase ASCII letters, digits, '.', '-' and '_' are allowed";
    for (cluster, says) in [
        ("Prod", &["'P' at byte 0", rule][..]),
        ("prod/eu", &["'/' at byte 4", rule]),
        ("", &["it is empty"]),
    ] {
        let refused = meshtun_with(&[
            "pki",
            "init-ca",
            "--cluster",
            cluster,
            "--out",
            path_str(&ca),
        ]);
        assert_eq!(
            refused.code(),
            EXIT_USAGE,
            "--cluster {cluster:?}: {refused}"
        );
        // Like any bad argument: clap's error, naming the option, the value,
        // what is wrong with it and the rule, then the pointer to --help.
        let value = format!("'{cluster}'");
        let clap = ["invalid value", "--cluster", &value, "--help"];
        for expected in clap.iter().chain(says) {
            assert!(
                refused.stderr.contains(expected),
                "--cluster {cluster:?}: no {expected:?} in {refused}"
            );
        }
        assert!(!ca.exists(), "--cluster {cluster:?} wrote {}", ca.display());
    }
    // The rule's edge: every character it allows.
    init_ca("gpu-cluster.example_2", &ca);
}

/// `YYYY-MM-DD` of a UTC instant, as `pki inspect` prints dates.
fn date(at: SystemTime) -> String {
    let utc = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}",
        utc.year(),
        u8::from(utc.month()),
        utc.day()
    )
}

#[test]
fn issue_writes_a_node_certificate_and_inspect_describes_it() {
    let dir = TempDir::new("issue");
    let ca = dir.join("ca");
    let nodes = dir.join("nodes");
    init_ca("c", &ca);
    meshtun_with(&[
        "pki",
        "issue",
        "--ca",
        path_str(&ca),
        "--node",
        "node-1",
        "--ip",
        "198.18.0.2",
        "--dns",
        "n1.example",
        "--out",
        path_str(&nodes),
    ])
    .success();
    let cert = nodes.join("node-1.crt");
    let key = nodes.join("node-1.key");
    assert_eq!(mode_of(&key), 0o600, "node-1.key mode");
    let credentials = NodeCredentials::load(&cert, &key).expect("the issued pair loads");
    assert_eq!(credentials.identity().as_str(), "node-1");

    let inspect = meshtun_with(&["pki", "inspect", path_str(&cert)]).success();
    let out = &inspect.stdout;
    let identity_line = out
        .lines()
        .find(|line| line.trim_start().starts_with("identity"))
        .unwrap_or_else(|| panic!("no identity line: {inspect}"));
    assert!(identity_line.contains("node-1"), "{identity_line}");
    for expected in ["spiffe://c/node/node-1", "198.18.0.2", "n1.example"] {
        assert!(
            out.contains(expected),
            "inspect lacks {expected}: {inspect}"
        );
    }
    let leaf = &credentials.chain()[0];
    let fingerprint = format!("sha256:{}", hex(&Sha256::digest(leaf.as_ref())));
    assert!(
        out.contains(&fingerprint),
        "inspect lacks the fingerprint {fingerprint}: {inspect}"
    );
    for instant in [credentials.not_before(), credentials.not_after()] {
        let day = date(instant);
        assert!(
            out.contains(&day),
            "inspect lacks the date {day}: {inspect}"
        );
    }

    let again = meshtun_with(&[
        "pki",
        "issue",
        "--ca",
        path_str(&ca),
        "--node",
        "node-1",
        "--out",
        path_str(&nodes),
    ]);
    assert_ne!(again.code(), 0, "overwrote without --force: {again}");
    assert!(again.stderr.contains("--force"), "{again}");
}

// ---------------------------------------------------------------- check

/// Every `*.toml` below `dir`, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries =
            fs::read_dir(&next).unwrap_or_else(|error| panic!("read {}: {error}", next.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "toml")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Makes a CA and a certificate for the config's node with the CLI, points
/// the config's `/etc/meshtun/` paths at them, and runs `meshtun check`.
fn check_example(label: &str, text: &str, beside: Option<&Path>) -> Finished {
    let dir = TempDir::new("example");
    assert!(
        text.contains("/etc/meshtun/"),
        "{label} names no /etc/meshtun/ file to rewrite"
    );
    let mut rewritten = text.replace("/etc/meshtun/", &dir.prefix());
    // A manifest named relative to the example stays where it is.
    if let Some(beside) = beside {
        let manifest = beside.join("cluster.toml");
        rewritten = rewritten.replace(
            "cluster = \"cluster.toml\"",
            &format!("cluster = \"{}\"", path_str(&manifest)),
        );
    }
    let path = dir.join("node.toml");
    fs::write(&path, rewritten).expect("write config");
    // What the node gets from a manifest (its overlay address, say) is
    // read from there, as `meshtun check` will.
    let config = meshtun_config::load_local(&path)
        .unwrap_or_else(|errors| panic!("{label} does not parse:\n{errors}"));
    // The cluster of the example manifest (examples/cluster/cluster.toml).
    init_ca("prod", dir.path());
    issue(dir.path(), config.node.as_str(), dir.path());
    meshtun_with(&["check", "-c", path_str(&path)])
}

#[test]
fn check_accepts_every_example_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let files = toml_files(&examples);
    assert!(
        !files.is_empty(),
        "no *.toml found under {}",
        examples.display()
    );
    // Cluster manifests are checked by `meshtun cluster check`
    // (tests/cluster.rs), through the node configs that name them.
    for file in files
        .iter()
        .filter(|file| file.file_name().is_some_and(|name| name != "cluster.toml"))
    {
        let text = fs::read_to_string(file).expect("read example");
        let label = file.display().to_string();
        let finished = check_example(&label, &text, file.parent());
        assert_eq!(finished.code(), 0, "{label}: {finished}");
        assert!(finished.stdout.contains("OK"), "{label}: {finished}");
    }
}

#[test]
fn check_accepts_the_built_in_example() {
    let finished = check_example("meshtun_config::EXAMPLE", meshtun_config::EXAMPLE, None);
    assert_eq!(finished.code(), 0, "{finished}");
}

/// A CA made by the CLI and node-1's certificate, in one temp dir.
struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        init_ca("c", dir.path());
        issue(dir.path(), "node-1", dir.path());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A valid config of node-1 with the given TLS files, plus `extra`.
    fn config(&self, ca: &Path, cert: &Path, key: &Path, quic: &str, forward: &str) -> PathBuf {
        let text = format!(
            "node = \"node-1\"\n\
             [quic]\nlisten = \"{quic}\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [[peer]]\nname = \"node-0\"\naddr = \"127.0.0.1:4433\"\n\
             [[forward]]\nlisten = \"{forward}\"\npeer = \"node-0\"\nservice = \"svc\"\n\
             [[expose]]\nservice = \"store\"\ntarget = \"127.0.0.1:29500\"\nallow = [\"node-0\"]\n",
            path_str(ca),
            path_str(cert),
            path_str(key)
        );
        let path = self.path("node-1.toml");
        fs::write(&path, text).expect("write config");
        path
    }

    /// [`Setup::config`] with node-1's own files.
    fn default_config(&self) -> PathBuf {
        self.config(
            &self.path("ca.crt"),
            &self.path("node-1.crt"),
            &self.path("node-1.key"),
            "127.0.0.1:4434",
            "127.0.0.1:29550",
        )
    }
}

/// `meshtun check -c CONFIG`, which must exit 78; returns its error lines.
fn check_fails(config: &Path) -> (Finished, Vec<String>) {
    let finished = meshtun_with(&["check", "-c", path_str(config)]);
    assert_eq!(finished.code(), EXIT_CONFIG, "{finished}");
    let errors: Vec<String> = finished
        .stdout
        .lines()
        .filter(|line| line.starts_with("error:"))
        .map(str::to_owned)
        .collect();
    assert!(
        !errors.is_empty(),
        "exit 78 without an error line: {finished}"
    );
    let summary = format!("{} problem(s)", errors.len());
    assert!(
        finished.stdout.contains(&summary),
        "the summary does not count {} problem(s): {finished}",
        errors.len()
    );
    (finished, errors)
}

/// The one error line that contains every fragment of `expected`.
fn error_with<'a>(errors: &'a [String], expected: &[&str], finished: &Finished) -> &'a str {
    errors
        .iter()
        .find(|line| expected.iter().all(|fragment| line.contains(fragment)))
        .unwrap_or_else(|| panic!("no error line contains all of {expected:?}: {finished}"))
}

#[test]
fn check_accepts_the_setup_config() {
    // The baseline every failing case below departs from by one change.
    let setup = Setup::new("check-ok");
    let finished = meshtun_with(&["check", "-c", path_str(&setup.default_config())]);
    assert_eq!(finished.code(), 0, "{finished}");
    assert!(!finished.stdout.contains("error:"), "{finished}");
}

#[test]
fn check_reports_every_config_error_in_one_run() {
    let setup = Setup::new("check-many");
    let text = format!(
        "node = \"node-1\"\n\
         bogus = 1\n\
         [quic]\n\
         idle_timeout = \"10s\"\n\
         [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [[peer]]\nname = \"node-0\"\naddr = \"127.0.0.1:4433\"\n\
         [[forward]]\nlisten = \"127.0.0.1:29550\"\npeer = \"node-9\"\nservice = \"svc\"\n\
         [[forward]]\nlisten = \"198.18.0.5:29551\"\npeer = \"node-0\"\nservice = \"other\"\n\
         [[expose]]\nservice = \"store\"\ntarget = \"127.0.0.1:29500\"\nallow = [\"node-0\"]\n\
         [[expose]]\nservice = \"store\"\ntarget = \"127.0.0.1:29501\"\nallow = [\"node-0\"]\n",
        ca = path_str(&setup.path("ca.crt")),
        cert = path_str(&setup.path("node-1.crt")),
        key = path_str(&setup.path("node-1.key")),
    );
    let config = setup.path("many.toml");
    fs::write(&config, text).expect("write config");
    let (finished, errors) = check_fails(&config);
    error_with(&errors, &["bogus", "unknown key"], &finished);
    error_with(&errors, &["forward[0].peer", "node-9"], &finished);
    error_with(
        &errors,
        &["forward[1].listen", "198.18.0.5", "loopback"],
        &finished,
    );
    error_with(&errors, &["expose[1].service", "store"], &finished);
    error_with(&errors, &["quic.listen"], &finished);
    assert_eq!(errors.len(), 5, "each mistake is reported once: {finished}");
}

#[test]
fn check_reports_a_key_readable_by_others() {
    let setup = Setup::new("check-mode");
    let key = setup.path("node-1.key");
    set_mode(&key, 0o644);
    let (finished, errors) = check_fails(&setup.default_config());
    let line = error_with(&errors, &["tls.key", "0644", "chmod 600"], &finished);
    assert!(line.contains(path_str(&key)), "{line}");
    assert_eq!(errors.len(), 1, "only the mode is wrong: {finished}");
}

#[test]
fn check_reports_a_missing_key_once() {
    let setup = Setup::new("check-no-key");
    let key = setup.path("node-1.key");
    fs::remove_file(&key).expect("remove the key");
    let (finished, errors) = check_fails(&setup.default_config());
    let line = error_with(&errors, &["tls.key", "cannot read"], &finished);
    assert!(line.contains(path_str(&key)), "{line}");
    assert_eq!(
        finished.stdout.matches("cannot read").count(),
        1,
        "the unreadable key is reported once: {finished}"
    );
    assert_eq!(errors.len(), 1, "only the key is missing: {finished}");
}

#[test]
fn check_says_how_long_the_certificate_has_left_in_hours_under_two_days() {
    let setup = Setup::new("check-hours-left");
    let authority = Authority::load(setup.dir.path()).expect("the CLI's CA loads");
    let now = time::OffsetDateTime::now_utc();
    let short = Validity {
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::hours(12),
    };
    let node = NodeName::new("node-1").expect("node name");
    authority
        .issue(&node, &[], &[], short)
        .expect("issue a certificate that expires in 12 hours")
        .write(setup.dir.path(), &node, true)
        .expect("write it");
    let finished = meshtun_with(&["check", "-c", path_str(&setup.default_config())]);
    assert_eq!(finished.code(), 0, "expiring soon is a warning: {finished}");
    // Not "expires in 0 day(s)": the hours that are left, rounded down.
    let warning = finished
        .stdout
        .lines()
        .find(|line| line.starts_with("warning: tls.cert: certificate expires in"))
        .unwrap_or_else(|| panic!("no expiry warning: {finished}"));
    assert!(
        warning.starts_with("warning: tls.cert: certificate expires in 11 hours;")
            || warning.starts_with("warning: tls.cert: certificate expires in 12 hours;"),
        "{warning}"
    );
    assert!(warning.contains("meshtun pki renew"), "{warning}");
}

#[test]
fn check_reports_the_renewal_settings() {
    let setup = Setup::new("check-renew");
    let config = setup.default_config();
    let text = fs::read_to_string(&config).expect("config");
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let renewing = text.replacen(
        "[tls]\n",
        &format!(
            "[tls]\nrenew = {{ server = \"127.0.0.1:7443\", ca_fingerprint = \"{fingerprint}\", at = 0.5 }}\n"
        ),
        1,
    );
    assert_ne!(renewing, text, "the config has a [tls] line: {text}");
    fs::write(&config, renewing).expect("write config");
    let finished = meshtun_with(&["check", "-c", path_str(&config)]);
    assert_eq!(finished.code(), 0, "{finished}");
    assert!(
        finished
            .stdout
            .contains("tls.renew: renews from 127.0.0.1:7443 at 50% of the certificate's lifetime"),
        "{finished}"
    );
}

#[test]
fn check_reports_renewal_problems_even_without_a_certificate() {
    let setup = Setup::new("check-renew-no-cert");
    // A certificate in a directory that is not there: it cannot load, and
    // a renewal could not write it.
    let cert = setup.path("gone").join("node-1.crt");
    let config = setup.config(
        &setup.path("ca.crt"),
        &cert,
        &setup.path("node-1.key"),
        "127.0.0.1:4434",
        "127.0.0.1:29550",
    );
    let text = fs::read_to_string(&config).expect("config");
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let renewing = text.replacen(
        "[tls]\n",
        &format!(
            "[tls]\nrenew = {{ server = \"127.0.0.1:7443\", ca_fingerprint = \"{fingerprint}\" }}\n"
        ),
        1,
    );
    assert_ne!(renewing, text, "the config has a [tls] line: {text}");
    fs::write(&config, renewing).expect("write config");
    let (finished, errors) = check_fails(&config);
    error_with(&errors, &["tls.cert/tls.key", "node-1.crt"], &finished);
    error_with(
        &errors,
        &["tls.cert: tls.renew replaces", "is not writable"],
        &finished,
    );
    assert_eq!(errors.len(), 2, "{finished}");
}

#[test]
fn check_reports_a_certificate_of_another_node() {
    let setup = Setup::new("check-identity");
    issue(setup.dir.path(), "node-2", setup.dir.path());
    let config = setup.config(
        &setup.path("ca.crt"),
        &setup.path("node-2.crt"),
        &setup.path("node-2.key"),
        "127.0.0.1:4434",
        "127.0.0.1:29550",
    );
    let (finished, errors) = check_fails(&config);
    error_with(&errors, &["tls.cert", "node-2", "node-1"], &finished);
}

#[test]
fn check_reports_a_key_that_does_not_match_the_certificate() {
    let setup = Setup::new("check-mismatch");
    let other = setup.path("other");
    issue(setup.dir.path(), "node-1", &other);
    let config = setup.config(
        &setup.path("ca.crt"),
        &setup.path("node-1.crt"),
        &other.join("node-1.key"),
        "127.0.0.1:4434",
        "127.0.0.1:29550",
    );
    let (finished, errors) = check_fails(&config);
    error_with(
        &errors,
        &["does not hold the private key of the certificate"],
        &finished,
    );
}

#[test]
fn check_reports_a_certificate_from_another_ca() {
    let setup = Setup::new("check-other-ca");
    let other = setup.path("other-ca");
    init_ca("c", &other);
    let config = setup.config(
        &other.join("ca.crt"),
        &setup.path("node-1.crt"),
        &setup.path("node-1.key"),
        "127.0.0.1:4434",
        "127.0.0.1:29550",
    );
    let (finished, errors) = check_fails(&config);
    error_with(&errors, &["tls.cert", "tls.ca"], &finished);
    assert_eq!(errors.len(), 1, "only the CA is wrong: {finished}");
}

#[test]
fn check_reports_an_expired_certificate() {
    let setup = Setup::new("check-expired");
    let authority = Authority::load(setup.dir.path()).expect("the CLI's CA loads");
    let now = time::OffsetDateTime::now_utc();
    let past = Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    };
    let node = NodeName::new("node-1").expect("node name");
    authority
        .issue(&node, &[], &[], past)
        .expect("issue an expired certificate")
        .write(setup.dir.path(), &node, true)
        .expect("write it");
    let (finished, errors) = check_fails(&setup.default_config());
    error_with(&errors, &["tls.cert", "expired 24 hours ago"], &finished);
}

// ---------------------------------------------------------------- run

/// Holds a TCP and a UDP loopback port, and returns them so that a config
/// can name them. A daemon that bound anything before checking its config
/// would fail on these with a bind error (exit 1), not exit 78.
fn occupied_ports() -> (TcpListener, UdpSocket) {
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind TCP");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    (tcp, udp)
}

fn run_fails_with_config_error(config: &Path, expected: &[&str]) {
    let finished = run(meshtun().args(["run", "-c", path_str(config)]));
    assert_eq!(finished.code(), EXIT_CONFIG, "{finished}");
    for fragment in expected {
        assert!(
            finished.stderr.contains(fragment),
            "stderr does not name {fragment:?}: {finished}"
        );
    }
    assert!(
        !finished.stderr.contains("cannot bind"),
        "tried to bind before refusing the config: {finished}"
    );
}

#[test]
fn run_with_a_bad_config_exits_78_before_binding() {
    let setup = Setup::new("run-bad");
    let (tcp, udp) = occupied_ports();
    let config = setup.config(
        &setup.path("ca.crt"),
        &setup.path("node-1.crt"),
        &setup.path("node-1.key"),
        &udp.local_addr().expect("udp addr").to_string(),
        &tcp.local_addr().expect("tcp addr").to_string(),
    );
    let mut text = fs::read_to_string(&config).expect("read config");
    text.insert_str(0, "bogus_setting = true\n");
    fs::write(&config, text).expect("write config");
    run_fails_with_config_error(&config, &["bogus_setting", "unknown key"]);

    let missing = setup.path("missing.toml");
    run_fails_with_config_error(&missing, &["missing.toml"]);
}

#[test]
fn run_with_bad_certificates_exits_78_before_binding() {
    let setup = Setup::new("run-bad-cert");
    issue(setup.dir.path(), "node-2", setup.dir.path());
    let (tcp, udp) = occupied_ports();
    let quic = udp.local_addr().expect("udp addr").to_string();
    let forward = tcp.local_addr().expect("tcp addr").to_string();
    let config = setup.config(
        &setup.path("ca.crt"),
        &setup.path("node-2.crt"),
        &setup.path("node-2.key"),
        &quic,
        &forward,
    );
    run_fails_with_config_error(&config, &["tls.cert", "node-2", "node-1"]);

    let key = setup.path("node-1.key");
    set_mode(&key, 0o644);
    let config = setup.config(
        &setup.path("ca.crt"),
        &setup.path("node-1.crt"),
        &key,
        &quic,
        &forward,
    );
    run_fails_with_config_error(&config, &["0644", "chmod 600"]);
}
