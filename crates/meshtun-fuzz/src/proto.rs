//! The stream preamble and the status answer (meshtun-proto).

use meshtun_proto::{
    Decoded, Preamble, PreambleError, Status, StatusCode, StatusError, MAX_DETAIL_LEN,
    MAX_PREAMBLE_LEN,
};

use crate::check;

/// `Preamble::decode` on bytes a peer sent.
///
/// - a complete preamble took `len <= input.len()` bytes, re-encodes to
///   exactly those bytes, and decodes the same with any bytes behind it;
///   every shorter prefix of it is `Incomplete`;
/// - `Incomplete { needed }` asks for at least one byte, never past
///   [`MAX_PREAMBLE_LEN`], and never for an input that long;
/// - an error is final: more bytes do not change it, and cutting the input
///   back to just before the offending byte is not an error.
pub fn preamble(data: &[u8]) {
    let decoded = Preamble::decode(data);
    check_preamble_input(data, &decoded);
    match decoded {
        Ok(Decoded::Complete { preamble, len }) => {
            let mut encoded = Vec::new();
            preamble.encode(&mut encoded);
            check!(
                encoded.len() == len && preamble.encoded_len() == len,
                "{data:02x?}: decoded {preamble:?} of {len} bytes re-encodes to {encoded:02x?}"
            );
            check!(
                data.get(..len) == Some(&encoded[..]),
                "{data:02x?}: decoded {preamble:?} re-encodes to {encoded:02x?}"
            );
            for cut in 0..len {
                let prefix = &data[..cut];
                let short = Preamble::decode(prefix);
                check_preamble_input(prefix, &short);
                match short {
                    Ok(Decoded::Incomplete { needed }) => check!(
                        cut + needed <= len,
                        "{prefix:02x?} (a prefix of a {len}-byte preamble) asks for {needed} more"
                    ),
                    other => crate::violated(format_args!(
                        "{prefix:02x?} (a prefix of a {len}-byte preamble) decodes to {other:?}"
                    )),
                }
            }
            let mut longer = encoded.clone();
            longer.extend_from_slice(b"\x01payload");
            check!(
                Preamble::decode(&longer) == Ok(Decoded::Complete { preamble, len }),
                "{data:02x?}: payload behind the preamble changes the result"
            );
        }
        Ok(Decoded::Incomplete { needed }) => {
            for cut in 0..data.len() {
                let prefix = &data[..cut];
                let short = Preamble::decode(prefix);
                check_preamble_input(prefix, &short);
                // `cut + needed` is the shortest whole preamble the bytes seen
                // so far allow; more bytes can only raise that bound.
                check!(
                    matches!(short, Ok(Decoded::Incomplete { needed: more })
                        if cut + more <= data.len() + needed),
                    "{prefix:02x?} (a prefix of an incomplete preamble needing {needed} more) \
                     decodes to {short:?}"
                );
            }
        }
        Err(error) => {
            for extra in [0u8, 1, b'a', 0xff] {
                let mut longer = data.to_vec();
                longer.push(extra);
                check!(
                    Preamble::decode(&longer) == Err(error.clone()),
                    "{data:02x?} is {error:?}, but with one more byte it is not"
                );
            }
            // Errors are reported as early as the offending byte is seen: the
            // input without its last byte is a valid prefix or the same error.
            if let Some((_, shorter)) = data.split_last() {
                let before = Preamble::decode(shorter);
                let same_or_prefix = match &before {
                    Ok(Decoded::Incomplete { .. }) => true,
                    Ok(Decoded::Complete { .. }) => false,
                    Err(earlier) => *earlier == error,
                };
                check!(
                    same_or_prefix,
                    "{data:02x?} is {error:?}, but its prefix decodes to {before:?}"
                );
            }
            check!(
                !error.to_string().is_empty(),
                "{error:?} displays as nothing"
            );
            if let PreambleError::UnsupportedVersion(version) = error {
                check!(
                    data.first() == Some(&version),
                    "{data:02x?}: version {version} is not the first byte"
                );
            }
        }
    }
}

/// What every decode result must satisfy, whatever the input.
fn check_preamble_input(data: &[u8], decoded: &Result<Decoded, PreambleError>) {
    match decoded {
        Ok(Decoded::Incomplete { needed }) => {
            check!(*needed >= 1, "{data:02x?}: Incomplete asks for 0 bytes");
            check!(
                data.len() + needed <= MAX_PREAMBLE_LEN,
                "{data:02x?}: Incomplete asks for {needed} more, past {MAX_PREAMBLE_LEN} bytes"
            );
        }
        Ok(Decoded::Complete { len, .. }) => check!(
            (1..=MAX_PREAMBLE_LEN).contains(len) && *len <= data.len(),
            "{data:02x?}: a complete preamble of {len} bytes"
        ),
        Err(_) => {}
    }
}

/// `Status::decode` on bytes an acceptor sent, and `Status::new` on text.
///
/// - a decoded status took `len <= input.len()` bytes, re-encodes to exactly
///   them, and every shorter prefix is `Ok(None)`;
/// - `Ok(None)` only while the announced detail is not all there;
/// - the only error is a detail that really is not UTF-8;
/// - `Status::new` on any text keeps a prefix of at most
///   [`MAX_DETAIL_LEN`] bytes, cut at a character boundary, and that status
///   round-trips.
pub fn status(data: &[u8]) {
    match Status::decode(data) {
        Ok(Some((status, len))) => {
            check!(
                len <= data.len() && len == 2 + status.detail.len(),
                "{data:02x?}: status {status:?} of {len} bytes"
            );
            let mut encoded = Vec::new();
            status.encode(&mut encoded);
            check!(
                data.get(..len) == Some(&encoded[..]) && status.encoded_len() == len,
                "{data:02x?}: decoded {status:?} re-encodes to {encoded:02x?}"
            );
            check!(
                StatusCode::from_byte(status.code.to_byte()) == status.code,
                "{:?} does not survive its byte",
                status.code
            );
            for cut in 0..len {
                check!(
                    Status::decode(&data[..cut]) == Ok(None),
                    "{:02x?} (a prefix of a {len}-byte status) is not Ok(None)",
                    &data[..cut]
                );
            }
        }
        Ok(None) => {
            let announced = data.get(1).map(|&detail_len| 2 + usize::from(detail_len));
            check!(
                announced.is_none_or(|announced| data.len() < announced),
                "{data:02x?}: Ok(None) although the whole status is there"
            );
        }
        Err(StatusError::DetailNotUtf8) => {
            let detail = data
                .get(1)
                .and_then(|&detail_len| data.get(2..2 + usize::from(detail_len)));
            check!(
                detail.is_some_and(|detail| std::str::from_utf8(detail).is_err()),
                "{data:02x?}: DetailNotUtf8 for a detail that is UTF-8 or not all there"
            );
        }
    }

    // Status::new and encode on arbitrary text: the code from the first byte.
    let code = StatusCode::from_byte(data.first().copied().unwrap_or(0));
    let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default());
    let made = Status::new(code, text.as_ref());
    check!(
        made.detail.len() <= MAX_DETAIL_LEN && text.starts_with(made.detail.as_str()),
        "Status::new kept {:?} of {text:?}",
        made.detail
    );
    check!(
        made.detail.len() == text.len() || made.detail.len() + 4 > MAX_DETAIL_LEN,
        "Status::new cut {text:?} to {:?} though it fit",
        made.detail
    );
    let mut encoded = Vec::new();
    made.encode(&mut encoded);
    let round_trip = Status::decode(&encoded);
    check!(
        round_trip == Ok(Some((made.clone(), encoded.len()))),
        "{made:?} encodes to {encoded:02x?}, which decodes to {round_trip:?}"
    );
}
