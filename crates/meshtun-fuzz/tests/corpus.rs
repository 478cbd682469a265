#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every seed in `corpus/<target>/` and every kept crash in
//! `regressions/<target>/` goes through its fuzz target on each test run, so
//! the seeds stay meaningful and a fixed crash stays fixed without a fuzzer.
//!
//! `write_seeds` (ignored) wrote the generated seeds; run it again with
//! `cargo test -p meshtun-fuzz --test corpus -- --ignored write_seeds` after
//! a wire format changes. Its certificates and CSRs have fresh keys each time.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use meshtun_fuzz::{ENROLL_NODE, ENROLL_TOKEN, TARGETS};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir/<target>/`, sorted; none if the directory is absent.
fn inputs(dir: &Path, target: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir.join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `dir` through its target; fails naming each input
/// that violates a property, with the message.
///
/// An input whose name starts with `open-` is a crash found in a crate this
/// one does not fix (reported to its owner): it must still fail, so that the
/// fix is noticed and the file renamed into a plain regression.
fn run_all(dir: &Path) -> usize {
    let mut failures = Vec::new();
    let mut count = 0;
    for (target, run) in TARGETS {
        for path in inputs(dir, target) {
            let data = fs::read(&path).unwrap();
            let open = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("open-"));
            count += 1;
            match catch_unwind(AssertUnwindSafe(|| run(&data))) {
                Err(panic) if !open => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: {message}", path.display()));
                }
                Ok(()) if open => failures.push(format!(
                    "{} passes now: the bug is fixed, so drop `open-` from its name",
                    path.display()
                )),
                _ => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    count
}

#[test]
fn every_target_has_seeds_and_nothing_else_is_there() {
    let corpus = crate_dir().join("corpus");
    for (target, _) in TARGETS {
        assert!(
            inputs(&corpus, target).len() >= 3,
            "corpus/{target} needs seeds"
        );
    }
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(crate_dir().join(dir)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name();
            let name = name.to_string_lossy();
            assert!(
                TARGETS.iter().any(|(target, _)| *target == name),
                "{dir}/{name} is not a fuzz target"
            );
        }
    }
}

#[test]
fn every_seed_holds_every_property() {
    let count = run_all(&crate_dir().join("corpus"));
    assert!(count >= 5 * 3, "only {count} seeds");
}

#[test]
fn every_kept_crash_stays_fixed() {
    run_all(&crate_dir().join("regressions"));
}

#[test]
fn the_seeds_reach_past_the_first_check() {
    // The enrollment seeds include a request that is granted and one that is
    // refused for its names, so signing is fuzzed, not only JSON.
    let seeds = inputs(&crate_dir().join("corpus"), "enrollment");
    let bodies: Vec<String> = seeds
        .iter()
        .map(|path| String::from_utf8_lossy(&fs::read(path).unwrap()).into_owned())
        .collect();
    assert!(bodies.iter().any(|body| body.contains(ENROLL_TOKEN)));
    assert!(bodies
        .iter()
        .any(|body| body.contains("BEGIN CERTIFICATE REQUEST")));
    assert!(bodies.iter().any(|body| body.contains("\"certificate\"")));
}

// ------------------------------------------------------------------ seeds

fn write(target: &str, name: &str, data: impl AsRef<[u8]>) {
    let dir = crate_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn rcgen_cert(names: Vec<rcgen::SanType>, cn: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = names;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn csr(cn: &str, names: Vec<rcgen::SanType>) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = names;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(version: u32, token: &str, csr: &str) -> Vec<u8> {
    let body = format!(
        "{{\"version\":{version},\"token\":{token:?},\"csr\":{}}}",
        json_string(csr)
    );
    frame(body.as_bytes())
}

fn json_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('\n', "\\n"))
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    use meshtun_pki::{Authority, Validity};
    use meshtun_proto::{NodeName, Preamble, ServiceName, Status, StatusCode, MAX_NAME_LEN};
    use rcgen::SanType;

    // preamble
    let encode = |preamble: Preamble| {
        let mut bytes = Vec::new();
        preamble.encode(&mut bytes);
        bytes
    };
    let service = encode(Preamble::service(ServiceName::new("vllm-dp-rpc").unwrap()));
    write("preamble", "service", &service);
    let mut with_payload = service.clone();
    with_payload.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    write("preamble", "service-then-payload", with_payload);
    write(
        "preamble",
        "service-longest-name",
        encode(Preamble::service(
            ServiceName::new(&"x".repeat(MAX_NAME_LEN)).unwrap(),
        )),
    );
    write("preamble", "service-truncated", &service[..6]);
    write(
        "preamble",
        "overlay-port",
        encode(Preamble::overlay_port(29500)),
    );
    write("preamble", "overlay-port-truncated", [1u8, 2, 0x73]);
    write("preamble", "overlay-port-zero", [1u8, 2, 0, 0]);
    write(
        "preamble",
        "service-bad-character",
        [1u8, 1, 3, b'a', b' ', b'b'],
    );
    write("preamble", "service-name-too-long", [1u8, 1, 64, b'a']);
    write("preamble", "unknown-kind", [1u8, 9]);
    write("preamble", "version-only", [1u8]);
    write("preamble", "http-not-meshtun", b"GET / HTTP/1.1\r\n");

    // status
    let encode = |status: Status| {
        let mut bytes = Vec::new();
        status.encode(&mut bytes);
        bytes
    };
    write("status", "ok", encode(Status::ok()));
    let refused = encode(Status::new(
        StatusCode::Refused,
        "127.0.0.1:29500: connection refused",
    ));
    write("status", "refused", &refused);
    write("status", "refused-truncated", &refused[..10]);
    let mut with_payload = encode(Status::ok());
    with_payload.extend_from_slice(b"server bytes");
    write("status", "ok-then-payload", with_payload);
    write(
        "status",
        "unknown-code-longest-detail",
        encode(Status::new(StatusCode::Other(200), "é".repeat(200))),
    );
    write("status", "detail-not-utf8", [3u8, 2, 0xff, 0xfe]);
    write("status", "code-only", [2u8]);

    // config
    write("config", "example.toml", meshtun_config::EXAMPLE);
    let quic = "node = \"node-1\"\n[quic]\nlisten = \"0.0.0.0:4433\"\n";
    let tls = "[tls]\nca = \"ca.crt\"\ncert = \"node-1.crt\"\nkey = \"node-1.key\"\n";
    let minimal = format!("{quic}{tls}");
    write("config", "minimal.toml", &minimal);
    write(
        "config",
        "syntax-error.toml",
        "node = \"node-1\n[quic\nlisten = 4433\n",
    );
    write(
        "config",
        "unknown-and-missing-keys.toml",
        "nodes = \"node-1\"\n[quic]\nlisen = \"0.0.0.0:4433\"\n[tls]\nca = \"ca.crt\"\n",
    );
    write(
        "config",
        "forward-to-unknown-peer.toml",
        format!(
            "{minimal}[[peer]]\nname = \"node 0\"\naddr = \"198.18.0.1:4433\"\n\
             [[forward]]\nlisten = \"0.0.0.0:29550\"\npeer = \"node-9\"\nservice = \"svc\"\n\
             [[forward]]\nlisten = \"127.0.0.1:0\"\npeer = \"node-1\"\nservice = \"-bad\"\n"
        ),
    );
    write(
        "config",
        "overlay-mistakes.toml",
        format!(
            "{minimal}[[peer]]\nname = \"node-0\"\naddr = \"node-0.example:4433\"\noverlay = \"100.127.0.2\"\n\
             [[expose]]\nservice = \"svc\"\ntarget = \"100.127.0.9:80\"\nallow = [\"*\", \"node-0\"]\n\
             [overlay]\naddress = \"100.127.0.2\"\nprefix = \"100.127.0.1/16\"\n\
             allow = [{{ peers = [], ports = \"9-3\" }}]\n"
        ),
    );
    write(
        "config",
        "windows-and-timers.toml",
        format!(
            "{quic}idle_timeout = \"2s\"\nkeep_alive = \"2s\"\nstream_window = \"8MiB\"\n\
             connection_window = \"4MiB\"\nreconnect_min = \"1m\"\nreconnect_max = \"1s\"\n\
             {tls}[limits]\ndrain_grace = \"0s\"\n[admin]\nlisten = \"[::ffff:127.0.0.1]:9464\"\n"
        ),
    );

    // identity
    let authority = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
    write("identity", "ca.der", authority.cert_der());
    let node = NodeName::new("node-1").unwrap();
    let issued = authority
        .issue(
            &node,
            &["198.18.0.2".parse().unwrap()],
            &["node-1.prod.example".to_string()],
            Validity::days_from_now(30),
        )
        .unwrap();
    let node_der = der_of(&issued.cert_pem);
    write("identity", "node-spiffe-uri.der", &node_der);
    write(
        "identity",
        "node-truncated.der",
        &node_der[..node_der.len() / 2],
    );
    let mut trailing = node_der.clone();
    trailing.push(0);
    write("identity", "node-stray-byte.der", trailing);
    write(
        "identity",
        "dns-only.der",
        rcgen_cert(
            vec![SanType::DnsName("node-2".try_into().unwrap())],
            "node-2",
        ),
    );
    write("identity", "no-san.der", rcgen_cert(Vec::new(), "node-3"));
    write(
        "identity",
        "two-node-uris.der",
        rcgen_cert(
            vec![
                SanType::URI("spiffe://prod/node/node-4".try_into().unwrap()),
                SanType::URI("spiffe://prod/node/node-5".try_into().unwrap()),
                SanType::DnsName("node-4".try_into().unwrap()),
            ],
            "node-4",
        ),
    );
    write(
        "identity",
        "bad-uri-name.der",
        rcgen_cert(
            vec![
                SanType::URI("spiffe:///node/node-6".try_into().unwrap()),
                SanType::URI("spiffe://prod/node/bad name".try_into().unwrap()),
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
            ],
            "node-6",
        ),
    );
    write("identity", "not-der", b"-----BEGIN CERTIFICATE-----\n");

    // enrollment: requests to the server, then answers to the client
    let granted_names = csr(
        ENROLL_NODE,
        vec![
            SanType::DnsName(ENROLL_NODE.try_into().unwrap()),
            SanType::DnsName("node-7.fuzz.example".try_into().unwrap()),
            SanType::IpAddress("198.18.0.7".parse().unwrap()),
            SanType::URI(
                format!(
                    "spiffe://{}/node/{ENROLL_NODE}",
                    meshtun_fuzz::ENROLL_CLUSTER
                )
                .as_str()
                .try_into()
                .unwrap(),
            ),
        ],
    );
    write(
        "enrollment",
        "request-granted",
        request(1, ENROLL_TOKEN, &granted_names),
    );
    let join_key = meshtun_enroll::JoinKey::generate(&NodeName::new(ENROLL_NODE).unwrap()).unwrap();
    write(
        "enrollment",
        "request-as-join-makes-it",
        join_key.request(&ENROLL_TOKEN.parse().unwrap()).unwrap(),
    );
    write(
        "enrollment",
        "request-wrong-name",
        request(
            1,
            ENROLL_TOKEN,
            &csr(
                "node-8",
                vec![
                    SanType::DnsName("node-8".try_into().unwrap()),
                    SanType::IpAddress("198.18.0.8".parse().unwrap()),
                ],
            ),
        ),
    );
    let unknown_token =
        "mtjoin1.fedcba9876543210.0000000000000000000000000000000000000000000000000000000000000000";
    write(
        "enrollment",
        "request-unknown-token",
        request(1, unknown_token, &granted_names),
    );
    write(
        "enrollment",
        "request-bad-token",
        request(1, "mtjoin1.0123", &granted_names),
    );
    write(
        "enrollment",
        "request-version-2",
        request(2, ENROLL_TOKEN, &granted_names),
    );
    write(
        "enrollment",
        "request-csr-not-pem",
        request(
            1,
            ENROLL_TOKEN,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
        ),
    );
    write(
        "enrollment",
        "request-unknown-field",
        frame(br#"{"version":1,"token":"x","csr":"y","extra":true}"#),
    );
    write("enrollment", "not-json", frame(b"GET / HTTP/1.1\r\n\r\n"));
    write("enrollment", "zero-length", [0u8, 0, 0, 0]);
    write("enrollment", "too-long", [0u8, 1, 0, 1, b'{', b'}']);
    let ca_authority =
        Authority::generate(meshtun_fuzz::ENROLL_CLUSTER, Validity::days_from_now(30)).unwrap();
    let issued = ca_authority
        .issue(
            &NodeName::new(ENROLL_NODE).unwrap(),
            &[],
            &[],
            Validity::days_from_now(30),
        )
        .unwrap();
    write(
        "enrollment",
        "response-issued",
        frame(
            format!(
                "{{\"certificate\":{},\"ca\":{}}}",
                json_string(&issued.cert_pem),
                json_string(&ca_authority.cert_pem())
            )
            .as_bytes(),
        ),
    );
    write(
        "enrollment",
        "response-refused",
        frame(
            br#"{"error":"unknown_token","message":"unknown join token: ask the CA operator for a new one"}"#,
        ),
    );
}
