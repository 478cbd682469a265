//! meshtun's certificates and TLS.
//!
//! This crate owns everything about who a node is and whom it trusts:
//! issuing the cluster CA and node certificates with rcgen (ECDSA P-256),
//! loading PEM certificates, keys and CRLs, taking a node's identity from its
//! certificate (DESIGN §3: the URI SAN `spiffe://<cluster>/node/<name>`, else
//! the first DNS SAN), and building the rustls client and server
//! configurations with their verifiers (TLS 1.3 only, ALPN `meshtun/1`,
//! X25519MLKEM768 preferred, client certificates required, the server pinned
//! to the expected peer identity).
//!
//! It must not open sockets, spawn tasks or threads, or read a file anywhere
//! but in the explicit `load`, `write` and `inspect_file` functions (and
//! [`key_file_mode_problem`]). Nothing it is given, by a user or by a peer,
//! makes it panic: every failure is a [`PkiError`] naming what is wrong and,
//! where a file is involved, which file. Private keys are written with mode
//! 0600 from creation and refused on load when group or others may read them.

mod error;
mod files;
mod identity;
mod inspect;
mod issue;
mod load;
mod tls;

pub use error::PkiError;
pub use files::key_file_mode_problem;
pub use identity::{identity_of, node_uri, serial_and_fingerprint};
pub use inspect::{inspect_file, inspect_pem, Inspection};
pub use issue::{Authority, Issued, Validity, CA_CERT_FILE, CA_KEY_FILE};
pub use load::{NodeCredentials, TrustBundle};
pub use tls::{client_config, server_config, PeerMismatch};
