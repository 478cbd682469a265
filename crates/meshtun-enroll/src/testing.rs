//! Fixtures the unit tests of several modules share: a CA directory with
//! its token store, a grant, request bodies, and a node that has joined.

use std::time::{Duration, SystemTime};

use meshtun_pki::{Authority, Validity};
use meshtun_proto::NodeName;
use meshtun_test_support::TempDir;

use crate::wire::{EnrollRequest, PROTOCOL_VERSION};
use crate::{CaFingerprint, EnrollResponse, Enrolled, Enroller, Grant, JoinKey, TokenStore};

pub(crate) fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

pub(crate) fn grant(name: &str) -> Grant {
    Grant {
        node: node(name),
        ips: vec!["198.18.0.5".parse().unwrap()],
        dns: vec![format!("{name}.cluster.example")],
        valid_for: None,
    }
}

/// A CA written to a fresh directory, and its token store.
pub(crate) fn ca_dir(label: &str) -> (TempDir, Authority, TokenStore) {
    let dir = TempDir::new(label);
    let authority = Authority::generate("prod", Validity::days_from_now(30)).unwrap();
    authority.write(dir.path(), false).unwrap();
    let store = TokenStore::new(dir.path());
    (dir, authority, store)
}

pub(crate) const HOUR: Duration = Duration::from_secs(3600);
pub(crate) const DAY: Duration = Duration::from_secs(86_400);

pub(crate) fn body(token: &str, csr: &str) -> Vec<u8> {
    serde_json::to_vec(&EnrollRequest {
        version: PROTOCOL_VERSION,
        token: token.to_owned(),
        csr: csr.to_owned(),
        valid_for: None,
    })
    .unwrap()
}

/// A node joined with a token valid for `valid_for`: its enroller and
/// its credentials.
pub(crate) fn joined(
    label: &str,
    valid_for: Option<Duration>,
) -> (TempDir, Enroller, Enrolled, CaFingerprint) {
    let (dir, authority, store) = ca_dir(label);
    let pinned = CaFingerprint::of_authority(&authority);
    let now = SystemTime::now();
    let mut granted = grant("node-x");
    granted.valid_for = valid_for;
    let token = store.create(&granted, HOUR, now).unwrap().token;
    let enroller = Enroller::new(authority, store, 30 * DAY);
    let key = JoinKey::generate(&node("node-x")).unwrap();
    let answer = enroller
        .handle(&body(&token.reveal(), key.csr_pem()), "a", now)
        .unwrap();
    let enrolled = key
        .accept(EnrollResponse::from(&Ok(answer)), &pinned, now)
        .unwrap();
    (dir, enroller, enrolled, pinned)
}

pub(crate) fn renewal_body(key: &JoinKey) -> Vec<u8> {
    let frame = key.renewal_request().unwrap();
    frame[meshtun_proto::FRAME_PREFIX_LEN..].to_vec()
}
