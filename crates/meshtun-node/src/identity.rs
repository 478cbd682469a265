//! Who is on the other end of a QUIC connection: the certificate chain it
//! presented in the handshake, and the node name its leaf stands for.

use meshtun_proto::NodeName;
use quinn::Connection;
use rustls::pki_types::CertificateDer;

/// Why a connection has no usable peer identity.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerIdentityError {
    /// The handshake left no peer certificate (it cannot, with mTLS).
    #[error("no peer certificate")]
    NoCertificate,
    /// quinn's peer identity was not a rustls certificate chain.
    #[error("unexpected peer identity type")]
    UnexpectedType,
    /// The chain was empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// The leaf names no node meshtun accepts.
    #[error(transparent)]
    Certificate(#[from] meshtun_pki::PkiError),
}

/// The certificate chain the peer presented in the handshake.
pub(crate) fn peer_chain(
    connection: &Connection,
) -> Result<Vec<CertificateDer<'static>>, PeerIdentityError> {
    let identity = connection
        .peer_identity()
        .ok_or(PeerIdentityError::NoCertificate)?;
    identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map(|chain| *chain)
        .map_err(|_| PeerIdentityError::UnexpectedType)
}

/// The node name the peer's leaf certificate stands for.
pub(crate) fn peer_identity(connection: &Connection) -> Result<NodeName, PeerIdentityError> {
    let chain = peer_chain(connection)?;
    let leaf = chain.first().ok_or(PeerIdentityError::EmptyChain)?;
    Ok(meshtun_pki::identity_of(leaf)?)
}
