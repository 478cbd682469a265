//! Certificate identity extraction (meshtun-pki): what a node makes of a
//! peer's certificate.

use std::time::{Duration, UNIX_EPOCH};

use meshtun_pki::{identity_of, inspect_pem, serial_and_fingerprint, PkiError};
use rustls_pki_types::CertificateDer;

use crate::check;

/// `identity_of` on arbitrary DER, checked against the other readers of a
/// certificate.
///
/// - it never panics;
/// - it names a node only for a certificate that parses, and
///   `serial_and_fingerprint` parses exactly the certificates it parses;
/// - `inspect_pem` on the same DER in PEM (what `meshtun pki inspect`
///   reads) finds the same identity or, when there is none, says why, and
///   the same fingerprint; its summary never panics.
pub fn identity(data: &[u8]) {
    let der = CertificateDer::from(data);
    let identity = identity_of(&der);
    let serial = serial_and_fingerprint(&der);
    let parsed = match &identity {
        Ok(_) | Err(PkiError::Identity { .. }) => true,
        Err(PkiError::Certificate { .. }) => false,
        Err(other) => crate::violated(format_args!(
            "{data:02x?}: identity_of fails with an unexpected error {other:?}"
        )),
    };
    check!(
        parsed == serial.is_ok(),
        "{data:02x?}: identity_of gives {identity:?} but serial_and_fingerprint {serial:?}"
    );
    if let Err(error) = &identity {
        check!(
            !error.to_string().is_empty(),
            "{data:02x?}: {error:?} displays as nothing"
        );
    }

    // inspect_pem may also refuse a validity it cannot show as a time.
    let pem = pem_certificate(data);
    if let Ok(inspections) = inspect_pem(&pem) {
        check!(
            parsed && inspections.len() == 1,
            "{data:02x?}: identity_of gives {identity:?} but inspect_pem finds {} \
                 certificates",
            inspections.len()
        );
        let inspection = &inspections[0];
        match &identity {
            Ok(name) => check!(
                inspection.identity.as_ref() == Some(name) && inspection.identity_problem.is_none(),
                "{data:02x?}: identity_of gives {name} but inspect_pem {:?} ({:?})",
                inspection.identity,
                inspection.identity_problem
            ),
            Err(_) => check!(
                inspection.identity.is_none() && inspection.identity_problem.is_some(),
                "{data:02x?}: identity_of gives {identity:?} but inspect_pem {:?}",
                inspection.identity
            ),
        }
        if let Ok((_, fingerprint)) = &serial {
            check!(
                *fingerprint == inspection.fingerprint,
                "{data:02x?}: two fingerprints, {fingerprint} and {}",
                inspection.fingerprint
            );
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        check!(
            !inspection.describe(now).is_empty(),
            "{data:02x?}: an empty summary"
        );
    }
}

/// `der` as one PEM `CERTIFICATE` block.
fn pem_certificate(der: &[u8]) -> String {
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    let encoded = base64(der);
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (position, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if position <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_pads_like_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }
}
