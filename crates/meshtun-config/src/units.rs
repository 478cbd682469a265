//! Durations and byte sizes as the config file writes them.
//!
//! A duration is a whole number and a unit: `"250ms"`, `"10s"`, `"2m"`, `"1h"`.
//! A bare number is refused because it is ambiguous (seconds? milliseconds?).
//! A size is a number of bytes, either a TOML integer or a string with a
//! binary unit: `"64KiB"`, `"4MiB"`, `"1GiB"`. Decimal units (`MB`) are refused
//! rather than guessed.

use std::time::Duration;

const DURATION_UNITS: &str = "ms, s, m or h";

/// Parses a duration string such as `"250ms"` or `"10s"`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text);
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" if !number.is_empty() => {
            return Err(format!(
                "\"{text}\" has no unit; write \"{number}s\" or \"{number}ms\" (units: {DURATION_UNITS})"
            ))
        }
        _ => {
            return Err(format!(
                "\"{text}\" is not a duration; write a whole number and a unit ({DURATION_UNITS}), e.g. \"250ms\" or \"10s\""
            ))
        }
    };
    if number.is_empty() {
        return Err(format!(
            "\"{text}\" is not a duration; write a whole number and a unit ({DURATION_UNITS}), e.g. \"250ms\" or \"10s\""
        ));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(millis_per_unit))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\" is too long a duration"))
}

/// Writes a duration the way the config file would: the largest unit that
/// represents it exactly.
pub(crate) fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return format!("{duration:?}");
    }
    let millis = duration.as_millis();
    match millis {
        0 => "0s".to_string(),
        _ if millis % 3_600_000 == 0 => format!("{}h", millis / 3_600_000),
        _ if millis % 60_000 == 0 => format!("{}m", millis / 60_000),
        _ if millis % 1_000 == 0 => format!("{}s", millis / 1_000),
        _ => format!("{millis}ms"),
    }
}

/// One kibibyte.
pub(crate) const KIB: u64 = 1 << 10;
/// One mebibyte.
pub(crate) const MIB: u64 = 1 << 20;
/// One gibibyte.
pub(crate) const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Parses a size string such as `"4MiB"`; integers are handled by the caller.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    let bytes_per_unit = match unit {
        "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "TiB" => TIB,
        "" if !number.is_empty() => 1,
        "k" | "K" | "kB" | "KB" | "M" | "MB" | "G" | "GB" | "T" | "TB" => {
            return Err(format!(
                "\"{text}\": decimal units are ambiguous; use a binary unit (KiB, MiB, GiB) or a number of bytes"
            ))
        }
        _ => {
            return Err(format!(
                "\"{text}\" is not a size; write a number of bytes or a whole number and a unit (B, KiB, MiB, GiB), e.g. \"4MiB\""
            ))
        }
    };
    if number.is_empty() {
        return Err(format!(
            "\"{text}\" is not a size; write a number of bytes or a whole number and a unit (B, KiB, MiB, GiB), e.g. \"4MiB\""
        ));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(bytes_per_unit))
        .ok_or_else(|| format!("\"{text}\" is too large a size"))
}

/// Writes a size with the largest binary unit that represents it exactly.
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

/// Splits `"250ms"` into `("250", "ms")`: the leading ASCII digits and the rest.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn durations_refuse_what_is_ambiguous_or_malformed() {
        let bare = parse_duration("10").unwrap_err();
        assert!(bare.contains("no unit"), "{bare}");
        assert!(bare.contains("\"10s\""), "{bare}");
        for bad in [
            "", "s", "ms", "1.5s", "-1s", "10 s", " 10s", "10S", "10sec", "1d", "10s ",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("is not a duration"), "{bad:?}: {error}");
        }
        let huge = parse_duration("99999999999999999999s").unwrap_err();
        assert!(huge.contains("too long"), "{huge}");
        let overflow = parse_duration("18446744073709551615h").unwrap_err();
        assert!(overflow.contains("too long"), "{overflow}");
    }

    #[test]
    fn durations_format_with_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.5ms");
        for text in ["250ms", "10s", "2m", "1h"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn sizes_with_binary_units_or_bare_bytes() {
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("4MiB"), Ok(4_194_304));
        assert_eq!(parse_size("1GiB"), Ok(1_073_741_824));
        assert_eq!(parse_size("4GiB"), Ok(4 * 1_073_741_824));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1000"), Ok(1000));
    }

    #[test]
    fn sizes_refuse_decimal_and_malformed_units() {
        for decimal in ["4MB", "4M", "1GB", "64kB", "64K"] {
            let error = parse_size(decimal).unwrap_err();
            assert!(error.contains("binary unit"), "{decimal}: {error}");
        }
        for bad in ["", "MiB", "4 MiB", "4mib", "1.5MiB", "-4MiB", "4MiBs"] {
            let error = parse_size(bad).unwrap_err();
            assert!(error.contains("is not a size"), "{bad:?}: {error}");
        }
        let huge = parse_size("99999999999TiB").unwrap_err();
        assert!(huge.contains("too large"), "{huge}");
    }

    #[test]
    fn sizes_format_with_the_largest_exact_unit() {
        assert_eq!(format_size(65_536), "64KiB");
        assert_eq!(format_size(4_194_304), "4MiB");
        assert_eq!(format_size(32 * MIB), "32MiB");
        assert_eq!(format_size(4 * GIB), "4GiB");
        assert_eq!(format_size(65_537), "65537 bytes");
        assert_eq!(format_size(0), "0 bytes");
        assert_eq!(format_size(1536), "1536 bytes");
    }
}
