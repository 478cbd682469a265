//! Enrollment without moving the CA key (like `kubeadm join`), for
//! `meshtun pki token|serve`, `meshtun join` and `meshtun renew`: join
//! tokens and their store, the protocol, CSR checks and signing, the
//! pinned-CA TLS, the joining node's checks and files, and the network on
//! both ends (the server's connections, the client's request).
//!
//! The flow:
//! 1. On the CA host, `meshtun pki token` makes a [`JoinToken`] bound to one
//!    node name and its SANs (a [`Grant`]) and records it in
//!    `DIR/tokens.json` ([`TokenStore`]). Only the SHA-256 of the token's
//!    256-bit secret is stored; the token itself is printed once.
//! 2. `meshtun pki serve` answers enrollment requests with an [`Enroller`]
//!    behind an [`EnrollServer`].
//! 3. On the new node, `meshtun join` generates a P-256 key ([`JoinKey`]),
//!    sends a CSR with the token ([`request_certificate`]), and checks what
//!    comes back ([`JoinKey::accept`]) before writing anything
//!    ([`Enrolled::write`]).
//!
//! The server proves it holds the CA with a certificate it signs for itself
//! at start ([`enrollment_server_config`]); the client pins the CA by the
//! SHA-256 fingerprint of its certificate ([`enrollment_client_config`]), so
//! a node needs nothing but the token and the fingerprint to join.
//!
//! Wire format (both directions): a 4-byte big-endian length, then that many
//! bytes of JSON, at most [`MAX_MESSAGE_LEN`]. Request
//! `{"version":1,"token":"mtjoin1.<id>.<secret>","csr":"<PEM>"}`; answer
//! `{"certificate":"<PEM>","ca":"<PEM>"}` or
//! `{"error":"<code>","message":"<text>"}` with a code of [`RefusalCode`].
//!
//! Token rules: the secret is compared in constant time against the stored
//! hash; a token is single use (marked used and persisted before the
//! certificate is sent); an expired token is refused; the CSR may ask for
//! nothing or a subset of what the token grants, and the certificate always
//! carries exactly the token's node name and SANs, never the CSR's.
//!
//! Only `server.rs` and `client.rs` touch the network, and the server does
//! not listen itself: its caller binds the listener and runs the accept
//! loop (`meshtun pki serve` with `meshtun_node::accept_each`), so this
//! crate does not depend on meshtun-node.

mod client;
mod enroller;
mod error;
mod join;
mod limiter;
mod pin;
mod server;
mod token;
mod wire;

#[cfg(test)]
mod testing;

pub use client::{request_certificate, request_renewal, EnrollClientError};
pub use enroller::{Enroller, Granted};
pub use error::{EnrollError, Refusal, RefusalCode};
pub use join::{previous_path, Enrolled, JoinFiles, JoinKey};
pub use pin::{
    enrollment_client_config, enrollment_server_config, CaFingerprint, CaFingerprintMismatch,
    FingerprintFormatError, PinnedCaVerifier, ENROLL_ALPN, RENEW_ALPN,
};
pub use server::{EnrollServer, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE};
pub use token::{Grant, JoinToken, NewToken, TokenFormatError, TokenStore, TOKENS_FILE};
pub use wire::{decode_response, encode_frame, frame_len, EnrollResponse, MAX_MESSAGE_LEN};
