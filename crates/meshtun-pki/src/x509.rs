//! The helpers the rest of this crate (and meshtun-enroll) stands on, each
//! written once: certificate fingerprints, X.509 and Unix times, RFC 3339
//! dates, hex, the crypto provider and the one TLS version. Nothing here
//! uses another module of the crate.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::time::ASN1Time;

/// The only protocol version meshtun speaks, on the data path and in
/// enrollment alike.
pub static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The aws-lc-rs provider with meshtun's choices: key exchange
/// X25519MLKEM768, then X25519, then secp256r1; cipher suites AES-128-GCM
/// (QUIC's initial suite, and the fastest with AES instructions), then
/// AES-256-GCM, then ChaCha20-Poly1305.
pub fn crypto_provider() -> CryptoProvider {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
        aws_lc_rs::kx_group::SECP256R1,
    ];
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    provider
}

/// `sha256:<lowercase hex>` of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// `bytes` as lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Exactly `N` bytes from `2N` hex digits (either case).
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = u8::try_from(high * 16 + low).ok()?;
    }
    Some(out)
}

/// An X.509 time as a `SystemTime`; `None` outside what this system can
/// represent (the caller names the certificate or CRL in its error).
pub fn system_time(time: ASN1Time) -> Option<SystemTime> {
    let seconds = time.timestamp();
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// Seconds since the Unix epoch, negative before it.
pub fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Seconds since the Unix epoch, 0 before it: the form the token store and
/// the ledger keep.
pub fn unix_seconds_unsigned(time: SystemTime) -> u64 {
    u64::try_from(unix_seconds(time)).unwrap_or(0)
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`, in UTC.
pub fn format_utc(time: SystemTime) -> String {
    utc(unix_seconds(time)).unwrap_or_else(|| format!("{time:?}"))
}

/// A stored Unix time (see `unix_seconds_unsigned`) as `format_utc` writes
/// it, or `@<seconds>` where no date can show it.
pub fn format_unix(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(utc)
        .unwrap_or_else(|| format!("@{unix}"))
}

fn utc(unix: i64) -> Option<String> {
    let utc = OffsetDateTime::from_unix_timestamp(unix).ok()?;
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    ))
}

/// 9999-12-31T23:59:59Z, the latest time X.509 can express.
pub(crate) fn latest_x509_time() -> OffsetDateTime {
    // The constant is in range for every `time` configuration; the fallback
    // only keeps this function total.
    OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(unhex::<3>("00AB7f"), Some([0x00, 0xab, 0x7f]));
        assert_eq!(unhex::<3>("00ab7"), None);
        assert_eq!(unhex::<2>("0g12"), None);
    }

    #[test]
    fn dates_before_the_epoch_keep_their_sign() {
        let before = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(unix_seconds(before), -86_400);
        assert_eq!(unix_seconds_unsigned(before), 0);
        assert_eq!(format_utc(before), "1969-12-31T00:00:00Z");
        assert_eq!(format_unix(86_400), "1970-01-02T00:00:00Z");
        assert_eq!(format_unix(u64::MAX), format!("@{}", u64::MAX));
    }
}
