//! Enrollment without moving the CA key (like `kubeadm join`): the join
//! tokens, the protocol, the CSR checks and signing, the pinned-CA TLS, and
//! the joining node's checks and files, for `meshtun pki token|serve`,
//! `meshtun join` and `meshtun renew`. The network side (TLS over TCP,
//! timeouts, rate limiting) is still in meshtun-node's `enroll` module.
//!
//! The flow:
//! 1. On the CA host, `meshtun pki token` makes a [`JoinToken`] bound to one
//!    node name and its SANs (a [`Grant`]) and records it in
//!    `DIR/tokens.json` ([`TokenStore`]). Only the SHA-256 of the token's
//!    256-bit secret is stored; the token itself is printed once.
//! 2. `meshtun pki serve` answers enrollment requests with an [`Enroller`].
//! 3. On the new node, `meshtun join` generates a P-256 key ([`JoinKey`]),
//!    sends a CSR with the token, and checks what comes back
//!    ([`JoinKey::accept`]) before writing anything ([`Enrolled::write`]).
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

mod enroller;
mod error;
mod join;
mod pin;
mod token;
mod wire;

#[cfg(test)]
mod testing;

pub use enroller::{Enroller, Granted};
pub use error::{EnrollError, Refusal, RefusalCode};
pub use join::{Enrolled, JoinFiles, JoinKey};
pub use pin::{
    enrollment_client_config, enrollment_server_config, renewal_client_config, CaFingerprint,
    CaFingerprintMismatch, FingerprintFormatError, PinnedCaVerifier, ENROLL_ALPN, RENEW_ALPN,
};
pub use token::{
    Grant, JoinToken, NewToken, TokenFormatError, TokenStore, TOKENS_FILE, TOKENS_LOCK_FILE,
    TOKEN_RECORD_KEPT,
};
pub use wire::{
    decode_response, encode_frame, frame_len, EnrollRequest, EnrollResponse, RenewRequest,
    MAX_MESSAGE_LEN, MIN_LIFETIME, PROTOCOL_VERSION, RENEWED_RETRY_WINDOW,
};
