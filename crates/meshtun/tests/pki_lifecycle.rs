//! The certificate lifecycle through the `meshtun` binary, run as a process:
//! the CRL that `pki init-ca` writes, `pki revoke` by certificate and by
//! serial, `pki crl`, `pki renew` with the same or a new key, and
//! `meshtun check` on a node whose certificate is revoked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{init_ca, issue, meshtun_with, mode_of, Finished, TempDir, EXIT_CONFIG, EXIT_USAGE};
use meshtun_pki::{NodeCredentials, RevocationList, Serial, TrustBundle};

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A CA made by the CLI in `DIR/ca`, and node certificates in `DIR/nodes`.
struct Cluster {
    dir: TempDir,
}

impl Cluster {
    fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        init_ca("c", &dir.join("ca"));
        Self { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn crl(&self) -> PathBuf {
        self.ca().join("crl.pem")
    }

    fn nodes(&self) -> PathBuf {
        self.dir.join("nodes")
    }

    fn cert(&self, node: &str) -> PathBuf {
        self.nodes().join(format!("{node}.crt"))
    }

    fn key(&self, node: &str) -> PathBuf {
        self.nodes().join(format!("{node}.key"))
    }

    fn issue(&self, node: &str) {
        issue(&self.ca(), node, &self.nodes());
    }

    /// `meshtun pki ARGS... --ca DIR/ca`.
    fn pki(&self, args: &[&str]) -> Finished {
        let ca = self.ca();
        let mut all = vec!["pki"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--ca", path_str(&ca)]);
        meshtun_with(&all)
    }

    /// A valid config of `node` with its own files and, if given, `crl`.
    fn config(&self, node: &str, crl: Option<&Path>) -> PathBuf {
        let crl_line = crl
            .map(|crl| format!("crl = \"{}\"\n", path_str(crl)))
            .unwrap_or_default();
        let text = format!(
            "node = \"{node}\"\n\
             [quic]\nlisten = \"127.0.0.1:4434\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{crl_line}\
             [[peer]]\nname = \"node-0\"\naddr = \"127.0.0.1:4433\"\n\
             [[expose]]\nservice = \"store\"\ntarget = \"127.0.0.1:29500\"\nallow = [\"node-0\"]\n",
            path_str(&self.ca().join("ca.crt")),
            path_str(&self.cert(node)),
            path_str(&self.key(node)),
        );
        let path = self.dir.join(&format!("{node}.toml"));
        fs::write(&path, text).expect("write config");
        path
    }

    fn check(&self, node: &str, crl: Option<&Path>) -> Finished {
        meshtun_with(&["check", "-c", path_str(&self.config(node, crl))])
    }

    fn credentials(&self, node: &str) -> NodeCredentials {
        NodeCredentials::load(&self.cert(node), &self.key(node)).expect("node credentials load")
    }

    fn trust(&self) -> TrustBundle {
        TrustBundle::load(&self.ca().join("ca.crt"), Some(&self.crl())).expect("CA and CRL load")
    }

    fn revocation_list(&self) -> RevocationList {
        let authority = meshtun_pki::Authority::load(&self.ca()).expect("CA loads");
        RevocationList::load(&self.ca(), &authority)
            .expect("crl.pem is this CA's")
            .expect("crl.pem exists")
    }
}

fn serial_of(credentials: &NodeCredentials) -> Serial {
    Serial::of_certificate(&credentials.chain()[0]).expect("serial")
}

/// The value of the `pki inspect` line that starts with `label`.
fn inspect_line(file: &Path, label: &str) -> String {
    let inspect = meshtun_with(&["pki", "inspect", path_str(file)]).success();
    inspect
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .map(|value| value.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label:?} line: {inspect}"))
}

/// The lines of `check` output that start with `prefix`.
fn lines_with<'a>(finished: &'a Finished, prefix: &str) -> Vec<&'a str> {
    finished
        .stdout
        .lines()
        .filter(|line| line.starts_with(prefix))
        .collect()
}

// ---------------------------------------------------------------- init-ca

#[test]
fn init_ca_writes_an_empty_crl_that_check_accepts() {
    let cluster = Cluster::new("crl-init");
    cluster.issue("node-1");
    let crl = cluster.crl();
    let mode = mode_of(&crl);
    assert_eq!(mode & 0o600, 0o600, "crl.pem mode {mode:o}");
    assert_eq!(mode & 0o022, 0, "crl.pem mode {mode:o}");
    let pem = fs::read_to_string(&crl).expect("crl.pem");
    assert!(pem.starts_with("-----BEGIN X509 CRL-----"), "{pem}");

    assert_eq!(inspect_line(&crl, "CRL number:"), "1");
    assert_eq!(inspect_line(&crl, "revoked:"), "none");
    assert!(inspect_line(&crl, "CRL issuer:").contains("meshtun CA c"));
    assert!(inspect_line(&crl, "next update:").contains("due in 29 days"));

    let finished = cluster.check("node-1", Some(&crl));
    assert_eq!(finished.code(), 0, "{finished}");
    let facts = lines_with(&finished, "ok: tls.crl:");
    assert_eq!(facts.len(), 1, "{finished}");
    assert!(
        facts[0].contains("CRL number 1") && facts[0].contains("revokes 0"),
        "{finished}"
    );
    cluster
        .trust()
        .verify_node(&cluster.credentials("node-1"), SystemTime::now())
        .expect("an empty CRL revokes nothing");
}

// ---------------------------------------------------------------- revoke

#[test]
fn revoke_by_cert_and_check_reports_the_revoked_node() {
    let cluster = Cluster::new("revoke-cert");
    cluster.issue("node-1");
    cluster.issue("node-2");
    let serial = serial_of(&cluster.credentials("node-2"));

    let revoke = cluster
        .pki(&[
            "revoke",
            "--cert",
            path_str(&cluster.cert("node-2")),
            "--reason",
            "key-compromise",
        ])
        .success();
    for expected in [
        &format!("revoked serial {serial} (node-2)"),
        "key-compromise",
        "CRL number 2 with 1 entry",
        path_str(&cluster.crl()),
        "tls.crl",
        "systemctl reload meshtun",
    ] {
        assert!(
            revoke.stdout.contains(expected),
            "lacks {expected:?}: {revoke}"
        );
    }

    let list = cluster.revocation_list();
    assert_eq!(list.number(), "2");
    assert!(list.is_revoked(&serial));
    assert_eq!(list.entries().len(), 1);
    let trust = cluster.trust();
    assert!(trust
        .verify_node(&cluster.credentials("node-2"), SystemTime::now())
        .is_err_and(|error| error.is_revoked()));
    trust
        .verify_node(&cluster.credentials("node-1"), SystemTime::now())
        .expect("node-1 is not revoked");

    // `check` names the revocation, not a generic trust failure.
    let finished = cluster.check("node-2", Some(&cluster.crl()));
    assert_eq!(finished.code(), EXIT_CONFIG, "{finished}");
    let errors = lines_with(&finished, "error:");
    assert_eq!(errors.len(), 1, "{finished}");
    for expected in [
        "tls.cert",
        "revoked",
        "tls.crl",
        &serial.to_string(),
        "renew",
    ] {
        assert!(
            errors[0].contains(expected),
            "lacks {expected:?}: {finished}"
        );
    }
    // Without the CRL configured, the same node checks fine.
    assert_eq!(cluster.check("node-2", None).code(), 0);
    assert_eq!(cluster.check("node-1", Some(&cluster.crl())).code(), 0);

    let inspect = meshtun_with(&["pki", "inspect", path_str(&cluster.crl())]).success();
    assert!(
        inspect.stdout.contains(&format!("  {serial} since ")),
        "{inspect}"
    );
    assert!(inspect.stdout.contains("(key-compromise)"), "{inspect}");
}

#[test]
fn revoking_twice_changes_nothing_and_says_so() {
    let cluster = Cluster::new("revoke-twice");
    cluster.issue("node-1");
    let cert = cluster.cert("node-1");
    cluster
        .pki(&["revoke", "--cert", path_str(&cert)])
        .success();
    let before = fs::read(cluster.crl()).expect("crl.pem");

    let again = cluster
        .pki(&["revoke", "--cert", path_str(&cert)])
        .success();
    assert!(again.stdout.contains("already revoked"), "{again}");
    assert!(again.stdout.contains("nothing changed"), "{again}");
    assert_eq!(fs::read(cluster.crl()).expect("crl.pem"), before);

    // The same serial given by hand, as inspect prints it, is the same entry.
    let serial = inspect_line(&cert, "serial:");
    let by_serial = cluster.pki(&["revoke", "--serial", &serial]).success();
    assert!(by_serial.stdout.contains("already revoked"), "{by_serial}");
    assert_eq!(fs::read(cluster.crl()).expect("crl.pem"), before);
}

#[test]
fn revoke_by_serial_in_any_hex_spelling() {
    let cluster = Cluster::new("revoke-serial");
    cluster.issue("node-1");
    cluster.issue("node-2");
    cluster.issue("node-3");
    let one = serial_of(&cluster.credentials("node-1"));
    let two = serial_of(&cluster.credentials("node-2"));

    // As inspect prints it (colons), and as plain upper-case hex.
    let printed = inspect_line(&cluster.cert("node-1"), "serial:");
    assert_eq!(printed, one.to_string());
    let revoke = cluster.pki(&["revoke", "--serial", &printed]).success();
    assert!(
        revoke.stdout.contains(&format!("revoked serial {one};")),
        "{revoke}"
    );
    let plain = two.to_string().replace(':', "").to_uppercase();
    let revoke = cluster.pki(&["revoke", "--serial", &plain]).success();
    assert!(
        revoke.stdout.contains("CRL number 3 with 2 entries"),
        "{revoke}"
    );

    let list = cluster.revocation_list();
    assert!(list.is_revoked(&one) && list.is_revoked(&two));
    let trust = cluster.trust();
    for node in ["node-1", "node-2"] {
        assert!(
            trust
                .verify_node(&cluster.credentials(node), SystemTime::now())
                .is_err_and(|error| error.is_revoked()),
            "{node} is not refused"
        );
    }
    trust
        .verify_node(&cluster.credentials("node-3"), SystemTime::now())
        .expect("node-3 is not revoked");

    // `pki crl` re-signs with the next number and keeps every entry.
    let crl = cluster.pki(&["crl", "--crl-days", "7"]).success();
    assert!(crl.stdout.contains("CRL number 4 with 2 entries"), "{crl}");
    assert!(inspect_line(&cluster.crl(), "next update:").contains("due in 6 days"));
    let list = cluster.revocation_list();
    assert!(list.is_revoked(&one) && list.is_revoked(&two));
}

#[test]
fn a_bad_serial_or_reason_is_a_usage_error_naming_the_flag() {
    let cluster = Cluster::new("revoke-usage");
    let before = fs::read(cluster.crl()).expect("crl.pem");
    for (args, flag) in [
        (&["revoke", "--serial", "not-hex"][..], "--serial"),
        (&["revoke", "--serial", ""], "--serial"),
        (
            &["revoke", "--serial", "12", "--reason", "stolen"],
            "--reason",
        ),
        (&["revoke"], "--serial"),
        (
            &["revoke", "--serial", "12", "--crl-days", "0"],
            "--crl-days",
        ),
    ] {
        let finished = cluster.pki(args);
        assert_eq!(finished.code(), EXIT_USAGE, "{args:?}: {finished}");
        assert!(finished.stderr.contains(flag), "{args:?}: {finished}");
    }
    let finished = cluster.pki(&["revoke", "--serial", "not-hex"]);
    assert!(finished.stderr.contains("not-hex"), "{finished}");
    assert!(finished.stderr.contains("hex digit"), "{finished}");
    assert_eq!(fs::read(cluster.crl()).expect("crl.pem"), before);
}

#[test]
fn revoke_needs_the_ca_key_and_a_certificate_of_this_ca() {
    let cluster = Cluster::new("revoke-no-key");
    cluster.issue("node-1");
    let public = cluster.dir.join("public");
    fs::create_dir_all(&public).expect("mkdir");
    fs::copy(cluster.ca().join("ca.crt"), public.join("ca.crt")).expect("copy ca.crt");
    let finished = meshtun_with(&[
        "pki",
        "revoke",
        "--ca",
        path_str(&public),
        "--serial",
        "4a:1b",
    ]);
    assert_eq!(finished.code(), 1, "{finished}");
    assert!(
        finished.stderr.contains(path_str(&public.join("ca.key"))),
        "{finished}"
    );
    assert!(!public.join("crl.pem").exists());

    // A certificate of another CA cannot be revoked by this one.
    let other = cluster.dir.join("other");
    init_ca("c", &other);
    let before = fs::read(other.join("crl.pem")).expect("crl.pem");
    let finished = meshtun_with(&[
        "pki",
        "revoke",
        "--ca",
        path_str(&other),
        "--cert",
        path_str(&cluster.cert("node-1")),
    ]);
    assert_eq!(finished.code(), 1, "{finished}");
    assert!(
        finished.stderr.contains("not issued by this CA"),
        "{finished}"
    );
    assert_eq!(fs::read(other.join("crl.pem")).expect("crl.pem"), before);

    // A CRL that another CA signed is not updated with this CA's key.
    fs::copy(cluster.crl(), other.join("crl.pem")).expect("copy crl");
    let finished = meshtun_with(&["pki", "crl", "--ca", path_str(&other)]);
    assert_eq!(finished.code(), 1, "{finished}");
    assert!(finished.stderr.contains("crl.pem"), "{finished}");
}

#[test]
fn crl_creates_the_list_for_a_ca_that_has_none() {
    let cluster = Cluster::new("crl-missing");
    cluster.issue("node-1");
    fs::remove_file(cluster.crl()).expect("rm crl.pem");
    cluster
        .pki(&["revoke", "--cert", path_str(&cluster.cert("node-1"))])
        .success();
    assert_eq!(cluster.revocation_list().number(), "1");
    fs::remove_file(cluster.crl()).expect("rm crl.pem");
    let crl = cluster.pki(&["crl"]).success();
    assert!(crl.stdout.contains("CRL number 1 with 0 entries"), "{crl}");
}

// ---------------------------------------------------------------- renew

#[test]
fn renew_keeps_the_key_identity_and_names_with_a_new_serial() {
    let cluster = Cluster::new("renew-same-key");
    let ca = cluster.ca();
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
        "--days",
        "10",
        "--out",
        path_str(&cluster.nodes()),
    ])
    .success();
    let cert = cluster.cert("node-1");
    let key = cluster.key("node-1");
    let old = cluster.credentials("node-1");
    let old_key = fs::read(&key).expect("key");
    let old_sans = inspect_line(&cert, "SANs:");

    let renew = cluster
        .pki(&["renew", "--cert", path_str(&cert), "--days", "90"])
        .success();
    assert!(renew.stdout.contains(path_str(&cert)), "{renew}");
    assert!(renew.stdout.contains("keeping the key"), "{renew}");

    // The key file is untouched and still the certificate's key: the
    // public key did not change.
    assert_eq!(fs::read(&key).expect("key"), old_key);
    let new = cluster.credentials("node-1");
    assert_eq!(new.identity().as_str(), "node-1");
    assert_ne!(new.fingerprint(), old.fingerprint());
    assert_ne!(serial_of(&new), serial_of(&old));
    assert!(
        renew.stdout.contains(&serial_of(&new).to_string()),
        "{renew}"
    );
    assert_eq!(inspect_line(&cert, "SANs:"), old_sans);
    assert!(old_sans.contains("198.18.0.2") && old_sans.contains("n1.example"));
    let days = new
        .not_after()
        .duration_since(SystemTime::now())
        .expect("valid")
        .as_secs()
        / 86_400;
    assert_eq!(days, 89, "renewed for --days 90");
    assert_eq!(cluster.check("node-1", Some(&cluster.crl())).code(), 0);
    let files = fs::read_dir(cluster.nodes()).expect("nodes").count();
    assert_eq!(files, 2, "no temporary or backup file is left");
}

#[test]
fn renew_with_a_new_key_replaces_both_files() {
    let cluster = Cluster::new("renew-new-key");
    cluster.issue("node-1");
    let cert = cluster.cert("node-1");
    let key = cluster.key("node-1");
    let old = cluster.credentials("node-1");
    let old_key = fs::read_to_string(&key).expect("key");

    let renew = cluster
        .pki(&["renew", "--cert", path_str(&cert), "--new-key"])
        .success();
    assert!(renew.stdout.contains("a new key"), "{renew}");
    assert!(renew.stdout.contains("revoke"), "{renew}");
    assert_ne!(fs::read_to_string(&key).expect("key"), old_key);
    assert_eq!(mode_of(&key), 0o600);
    let new = cluster.credentials("node-1");
    assert_eq!(new.identity().as_str(), "node-1");
    assert_ne!(serial_of(&new), serial_of(&old));
    let mismatch = NodeCredentials::from_pem(&fs::read_to_string(&cert).expect("cert"), &old_key);
    assert!(
        mismatch.is_err(),
        "the old key does not fit the new certificate"
    );
    assert_eq!(cluster.check("node-1", Some(&cluster.crl())).code(), 0);

    // --out writes elsewhere and leaves the originals alone.
    let elsewhere = cluster.dir.join("elsewhere");
    let before = fs::read(&cert).expect("cert");
    cluster
        .pki(&[
            "renew",
            "--cert",
            path_str(&cert),
            "--out",
            path_str(&elsewhere),
        ])
        .success();
    assert_eq!(fs::read(&cert).expect("cert"), before);
    assert!(elsewhere.join("node-1.crt").exists());
    assert!(!elsewhere.join("node-1.key").exists(), "the key was kept");
    NodeCredentials::load(&elsewhere.join("node-1.crt"), &key).expect("same key");
}

#[test]
fn renew_refuses_to_extend_a_revoked_key() {
    let cluster = Cluster::new("renew-revoked");
    cluster.issue("node-1");
    let cert = cluster.cert("node-1");
    cluster
        .pki(&[
            "revoke",
            "--cert",
            path_str(&cert),
            "--reason",
            "key-compromise",
        ])
        .success();
    let before = fs::read(&cert).expect("cert");
    let finished = cluster.pki(&["renew", "--cert", path_str(&cert)]);
    assert_eq!(finished.code(), 1, "{finished}");
    assert!(
        finished.stderr.contains("revoked") && finished.stderr.contains("--new-key"),
        "{finished}"
    );
    assert_eq!(fs::read(&cert).expect("cert"), before);

    cluster
        .pki(&["renew", "--cert", path_str(&cert), "--new-key"])
        .success();
    assert_eq!(cluster.check("node-1", Some(&cluster.crl())).code(), 0);

    // --key and --new-key contradict each other.
    let finished = cluster.pki(&[
        "renew",
        "--cert",
        path_str(&cert),
        "--key",
        path_str(&cluster.key("node-1")),
        "--new-key",
    ]);
    assert_eq!(finished.code(), EXIT_USAGE, "{finished}");
}

#[test]
fn check_warns_about_a_ca_without_a_crl() {
    // A CA rotation: the bundle holds the old and the new CA, the CRL file
    // only the old CA's CRL, so nodes of the new CA would be refused.
    let cluster = Cluster::new("check-rotation");
    cluster.issue("node-1");
    let new_ca = cluster.dir.join("new-ca");
    init_ca("c", &new_ca);
    let bundle = format!(
        "{}{}",
        fs::read_to_string(cluster.ca().join("ca.crt")).expect("old ca.crt"),
        fs::read_to_string(new_ca.join("ca.crt")).expect("new ca.crt")
    );
    let config = cluster.config("node-1", Some(&cluster.crl()));
    let text = fs::read_to_string(&config).expect("config").replace(
        path_str(&cluster.ca().join("ca.crt")),
        path_str(&cluster.dir.join("bundle.crt")),
    );
    fs::write(cluster.dir.join("bundle.crt"), bundle).expect("write bundle");
    fs::write(&config, text).expect("write config");
    let finished = meshtun_with(&["check", "-c", path_str(&config)]);
    assert_eq!(finished.code(), 0, "{finished}");
    let warnings = lines_with(&finished, "warning: tls.crl:");
    assert_eq!(warnings.len(), 1, "{finished}");
    let new_subject = inspect_line(&new_ca.join("ca.crt"), "subject:");
    assert!(warnings[0].contains(&new_subject), "{finished}");

    // Both CRLs in one file: no warning.
    let both = format!(
        "{}{}",
        fs::read_to_string(cluster.crl()).expect("old crl"),
        fs::read_to_string(new_ca.join("crl.pem")).expect("new crl")
    );
    fs::write(cluster.crl(), both).expect("write crls");
    let finished = meshtun_with(&["check", "-c", path_str(&config)]);
    assert_eq!(finished.code(), 0, "{finished}");
    assert!(
        lines_with(&finished, "warning: tls.crl:").is_empty(),
        "{finished}"
    );
    assert_eq!(lines_with(&finished, "ok: tls.crl:").len(), 2, "{finished}");
}

// ---------------------------------------------------------------- ledger

/// The ledger's records of `node`, as `pki list --node` prints them:
/// (state, how, serial).
fn listed(cluster: &Cluster, node: &str) -> Vec<(String, String, String)> {
    let list = cluster.pki(&["list", "--node", node]).success();
    list.stdout
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "{line}");
            (
                fields[0].to_owned(),
                fields[2].to_owned(),
                fields[5].to_owned(),
            )
        })
        .collect()
}

#[test]
fn issue_and_renew_are_recorded_and_revoke_by_node_revokes_them_all() {
    let cluster = Cluster::new("ledger-revoke-node");
    cluster.issue("node-5");
    cluster.issue("node-6");
    let first = serial_of(&cluster.credentials("node-5")).to_string();
    // A copy of the first certificate, as an attacker who stole it holds it.
    let stolen = cluster.dir.join("stolen.crt");
    fs::copy(cluster.cert("node-5"), &stolen).expect("copy");
    cluster
        .pki(&["renew", "--cert", path_str(&cluster.cert("node-5"))])
        .success();
    let renewed = serial_of(&cluster.credentials("node-5")).to_string();
    assert_ne!(first, renewed);

    assert_eq!(
        listed(&cluster, "node-5"),
        [
            ("valid".to_owned(), "issue".to_owned(), first.clone()),
            ("valid".to_owned(), "renew".to_owned(), renewed.clone()),
        ]
    );
    let ledger = fs::read_to_string(cluster.ca().join("issued.json")).expect("ledger");
    assert!(
        ledger.contains(&format!("\"replaces\": \"{first}\"")),
        "{ledger}"
    );
    assert_eq!(mode_of(&cluster.ca().join("issued.json")), 0o600);

    let revoke = cluster.pki(&["revoke", "--node", "node-5"]).success();
    assert!(
        revoke
            .stdout
            .contains("revoked 2 certificates of node node-5"),
        "{revoke}"
    );
    let list = cluster.revocation_list();
    for serial in [&first, &renewed] {
        assert!(
            list.is_revoked(&serial.parse().expect("serial")),
            "{serial} is in the CRL"
        );
    }
    assert_eq!(list.entries().len(), 2, "node-6 is untouched");
    assert!(listed(&cluster, "node-5")
        .iter()
        .all(|(state, _, _)| state == "revoked"));
    assert_eq!(listed(&cluster, "node-6")[0].0, "valid");

    // Neither the renewed certificate nor the stolen copy is trusted now.
    let trust = cluster.trust();
    assert!(trust
        .verify_node(&cluster.credentials("node-5"), SystemTime::now())
        .is_err());
    let stolen_pem = fs::read_to_string(&stolen).expect("stolen");
    let key_pem = fs::read_to_string(cluster.key("node-5")).expect("key");
    let stolen = NodeCredentials::from_pem(&stolen_pem, &key_pem).expect("same key");
    assert!(trust.verify_node(&stolen, SystemTime::now()).is_err());

    // Again: nothing new to revoke, said so.
    let again = cluster.pki(&["revoke", "--node", "node-5"]).success();
    assert!(again.stdout.contains("already revoked"), "{again}");
    // A node the ledger does not know: an error naming the ledger.
    let unknown = cluster.pki(&["revoke", "--node", "node-9"]);
    assert_eq!(unknown.code(), 1, "{unknown}");
    assert!(unknown.stderr.contains("issued.json"), "{unknown}");
    assert!(unknown.stderr.contains("node-9"), "{unknown}");
}

#[test]
fn valid_for_gives_lifetimes_shorter_than_a_day() {
    let cluster = Cluster::new("valid-for");
    let ca = cluster.ca();
    let issued = meshtun_with(&[
        "pki",
        "issue",
        "--ca",
        path_str(&ca),
        "--node",
        "node-1",
        "--valid-for",
        "2h",
        "--out",
        path_str(&cluster.nodes()),
    ])
    .success();
    assert!(issued.stdout.contains("2 hours"), "{issued}");
    let credentials = cluster.credentials("node-1");
    let left = credentials
        .not_after()
        .duration_since(SystemTime::now())
        .expect("valid")
        .as_secs();
    assert!((7100..=7200).contains(&left), "{left} s left");
    // Set back a quarter of the lifetime at most (30 min), not a full hour.
    let span = credentials
        .not_after()
        .duration_since(credentials.not_before())
        .expect("ordered")
        .as_secs();
    assert_eq!(span, 2 * 3600 + 1800);

    for bad in ["30s", "2w", "h", "3651d"] {
        let refused = meshtun_with(&[
            "pki",
            "issue",
            "--ca",
            path_str(&ca),
            "--node",
            "node-2",
            "--valid-for",
            bad,
            "--out",
            path_str(&cluster.nodes()),
        ]);
        assert_eq!(refused.code(), EXIT_USAGE, "--valid-for {bad}: {refused}");
        assert!(refused.stderr.contains("--valid-for"), "{refused}");
    }
    let both = cluster.pki(&[
        "issue",
        "--node",
        "node-3",
        "--days",
        "3",
        "--valid-for",
        "2h",
        "--out",
        "x",
    ]);
    assert_eq!(both.code(), EXIT_USAGE, "{both}");
}

#[test]
fn two_issues_at_once_both_land_in_the_ledger_with_distinct_serials() {
    let cluster = Cluster::new("ledger-concurrent");
    let ca = cluster.ca();
    let nodes = cluster.nodes();
    // Eight `pki issue` processes started together, each racing for the lock.
    let children: Vec<_> = (0..8)
        .map(|index| {
            common::meshtun()
                .args([
                    "pki",
                    "issue",
                    "--ca",
                    path_str(&ca),
                    "--node",
                    &format!("node-{index}"),
                    "--out",
                    path_str(&nodes),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn meshtun")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut serials = Vec::new();
    for index in 0..8 {
        let node = format!("node-{index}");
        let records = listed(&cluster, &node);
        assert_eq!(records.len(), 1, "{node}: {records:?}");
        assert_eq!(
            records[0].2,
            serial_of(&cluster.credentials(&node)).to_string(),
            "{node}'s file and record agree"
        );
        serials.push(records[0].2.clone());
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 8, "distinct serials");
}
