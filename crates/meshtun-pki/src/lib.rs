//! meshtun's certificates and TLS.
//!
//! This crate owns everything about who a node is and whom it trusts:
//! issuing the cluster CA and node certificates with rcgen (ECDSA P-256),
//! loading PEM certificates, keys and CRLs, taking a node's identity from its
//! certificate (docs/design.md, "Identity": the URI SAN `spiffe://<cluster>/node/<name>`, else
//! the first DNS SAN), and building the rustls client and server
//! configurations with their verifiers (TLS 1.3 only, ALPN `meshtun/1`,
//! X25519MLKEM768 preferred, client certificates required, the server pinned
//! to the expected peer identity).
//!
//! It must not open sockets, spawn tasks or threads, or read a file anywhere
//! but in the explicit `load`, `load_ignoring_key_mode`, `write`,
//! `inspect_file`, `inspect_crl_file` and `renew_files` functions (and [`key_file_mode_problem`], and the file
//! helpers it lends to meshtun-enroll: [`read_text`], [`read_private_text`],
//! [`write_files`], [`lock_exclusive`]). Nothing it is given, by a user or by
//! a peer, makes it panic: every failure is a [`PkiError`] naming what is wrong and,
//! where a file is involved, which file. Private keys are written with mode
//! 0600 from creation and refused on load when group or others may read them.
//!
//! Enrollment (`meshtun pki token|serve`, `meshtun join`, `meshtun renew`)
//! is meshtun-enroll's; it builds on the public helpers here (file writes
//! and their lock, certificate parsing, hex, times, the crypto provider, and
//! [`Authority::issue_for_public_key`] to sign a CSR's key).

mod crl;
mod error;
mod files;
mod identity;
mod inspect;
mod issue;
mod ledger;
mod load;
mod tls;
mod x509;

pub use crl::{Reason, RevocationList, RevocationTarget, Revoked, CRL_FILE};
pub use error::PkiError;
pub use files::{
    key_file_mode_problem, lock_exclusive, read_private_text, read_text, write_files, NewFile,
    CERT_MODE, KEY_MODE,
};
pub use identity::{
    check_cluster, describe_name, identity_of, identity_of_parsed, ip_from, node_cluster_of,
    node_uri, parse_certificate, serial_and_fingerprint, Serial,
};
pub use inspect::{
    inspect_crl_file, inspect_crl_pem, inspect_file, inspect_pem, is_crl_pem, CrlInspection,
    Inspection, RevokedInspection,
};
pub use issue::{Authority, Issued, Renewed, Validity, CA_CERT_FILE, CA_KEY_FILE};
pub use ledger::{
    Issuance, IssuedRecord, Ledger, LockedLedger, EXPIRED_RECORD_KEPT, LEDGER_FILE,
    LEDGER_LOCK_FILE,
};
pub use load::{
    first_certificate, forget_reset_secret, reset_secret_path, NodeCredentials, TrustBundle,
};
pub use tls::{client_config, server_config, PeerMismatch, PeerRole};
pub use x509::{
    crypto_provider, fingerprint, format_unix, format_utc, hex, system_time, unhex, unix_seconds,
    unix_seconds_unsigned, TLS13_ONLY,
};
