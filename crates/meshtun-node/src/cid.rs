//! Connection IDs that a restarted daemon still recognizes.
//!
//! quinn answers a packet for an unknown connection with a stateless reset
//! only if the packet's connection ID passes the generator's `validate`.
//! quinn's own generators are keyed per process, so after a restart every
//! old ID would be dropped silently and peers would wait out their idle
//! timeout. Here each ID is a random nonce followed by a tag keyed by a
//! secret derived from the node's private key: the new process accepts the
//! old process's IDs, answers them with a stateless reset (whose key is
//! derived from the same private key), and the peer re-dials at once.
//! Random garbage still fails the tag and costs no reset.

use aws_lc_rs::hmac;
use quinn::{ConnectionId, ConnectionIdGenerator};
use rand::RngCore;

const NONCE_LEN: usize = 8;
const TAG_LEN: usize = 8;

/// Generates and validates `nonce || HMAC(key, nonce)[..8]` connection IDs.
#[derive(Debug, Clone)]
pub(crate) struct KeyedCidGenerator {
    key: hmac::Key,
}

impl KeyedCidGenerator {
    /// `secret` is the node's key-derived stateless-reset secret; the tag key
    /// is derived from it under its own label so the two uses never share a key.
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        let parent = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&parent, b"meshtun/1 connection-id tag key");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; TAG_LEN] {
        let full = hmac::sign(&self.key, nonce);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        tag
    }
}

impl ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; NONCE_LEN + TAG_LEN];
        rand::rng().fill_bytes(&mut bytes[..NONCE_LEN]);
        let tag = self.tag(&bytes[..NONCE_LEN]);
        bytes[NONCE_LEN..].copy_from_slice(&tag);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != NONCE_LEN + TAG_LEN {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(NONCE_LEN);
        match aws_lc_rs::constant_time::verify_slices_are_equal(&self.tag(nonce), tag) {
            Ok(()) => Ok(()),
            Err(_) => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        NONCE_LEN + TAG_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generator_with_the_same_secret_accepts_old_ids() {
        let secret = [7u8; 32];
        let mut old = KeyedCidGenerator::new(&secret);
        let restarted = KeyedCidGenerator::new(&secret);
        let other_node = KeyedCidGenerator::new(&[8u8; 32]);
        for _ in 0..100 {
            let cid = old.generate_cid();
            assert_eq!(cid.len(), 16);
            assert!(restarted.validate(&cid).is_ok());
            assert!(other_node.validate(&cid).is_err());
        }
    }

    #[test]
    fn garbage_and_wrong_lengths_are_rejected() {
        let generator = KeyedCidGenerator::new(&[1u8; 32]);
        assert!(generator.validate(&ConnectionId::new(&[0u8; 16])).is_err());
        assert!(generator.validate(&ConnectionId::new(&[0u8; 8])).is_err());
        assert!(generator.validate(&ConnectionId::new(&[])).is_err());
    }
}
