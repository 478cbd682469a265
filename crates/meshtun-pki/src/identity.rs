//! Node identity (docs/design.md, "Identity"): the node name a certificate
//! stands for; also the serial number and the SANs as meshtun shows them.
//!
//! The identity is taken from the URI SAN `spiffe://<cluster>/node/<name>`
//! when the certificate has one, else from its first DNS SAN, and it must be a
//! valid [`NodeName`]. A URI SAN of that shape whose name is invalid is an
//! error, never a reason to fall back to the DNS SAN: a certificate must not
//! mean one thing to meshtun and another to a reader.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use meshtun_proto::NodeName;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::PkiError;

/// The URI scheme of SPIFFE IDs, which meshtun uses for node and cluster names.
const SPIFFE_SCHEME: &str = "spiffe://";

/// Longest cluster name accepted, in bytes (the SPIFFE trust domain limit).
const MAX_CLUSTER_LEN: usize = 255;

/// The node's identity as carried by `cert` (docs/design.md, "Identity").
///
/// Fails when the certificate cannot be parsed, carries neither a URI SAN
/// `spiffe://<cluster>/node/<name>` nor a DNS SAN, carries two different node
/// URIs, or when the name found is not a valid [`NodeName`].
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<NodeName, PkiError> {
    identity_with_origin(cert, "certificate")
}

/// [`identity_of`], with errors naming `origin` (a file or input).
pub(crate) fn identity_with_origin(
    cert: &CertificateDer<'_>,
    origin: &str,
) -> Result<NodeName, PkiError> {
    let parsed = parse_certificate(cert, origin)?;
    identity_of_parsed(&parsed).map_err(|detail| PkiError::Identity {
        origin: origin.to_string(),
        detail,
    })
}

/// The SPIFFE ID meshtun writes into a node certificate.
pub fn node_uri(cluster: &str, node: &NodeName) -> String {
    format!("{SPIFFE_SCHEME}{cluster}/node/{node}")
}

/// The SPIFFE trust domain ID meshtun writes into a CA certificate.
pub(crate) fn cluster_uri(cluster: &str) -> String {
    format!("{SPIFFE_SCHEME}{cluster}")
}

/// Parses one DER certificate, refusing trailing bytes.
/// A certificate's serial number (hex, as `openssl x509 -serial` and
/// `meshtun pki inspect` print it) and SHA-256 fingerprint.
pub fn serial_and_fingerprint(cert: &CertificateDer<'_>) -> Result<(String, String), PkiError> {
    let parsed = parse_certificate(cert, "certificate")?;
    Ok((
        parsed.raw_serial_as_string(),
        crate::x509::fingerprint(cert),
    ))
}

/// Parses the DER certificate `der` (nothing may follow it); errors name
/// `origin`.
pub fn parse_certificate<'a>(der: &'a [u8], origin: &str) -> Result<X509Certificate<'a>, PkiError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(PkiError::Certificate {
            origin: origin.to_string(),
            detail: format!("{} stray bytes after the certificate", rest.len()),
        }),
        Err(error) => Err(PkiError::Certificate {
            origin: origin.to_string(),
            detail: format!("not a valid X.509 certificate: {error}"),
        }),
    }
}

/// The identity rule on a parsed certificate; the error is a plain reason.
pub fn identity_of_parsed(cert: &X509Certificate<'_>) -> Result<NodeName, String> {
    let names = match cert.subject_alternative_name() {
        Ok(Some(extension)) => &extension.value.general_names,
        Ok(None) => {
            return Err("the certificate has no subjectAltName; it needs a URI SAN \
                 spiffe://<cluster>/node/<name> or a DNS SAN"
                .to_string())
        }
        Err(error) => return Err(format!("unreadable subjectAltName: {error}")),
    };

    let mut from_uri: Option<NodeName> = None;
    for name in names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(found) = node_from_uri(uri) else {
            continue;
        };
        let found = found?;
        match &from_uri {
            Some(previous) if *previous != found => {
                return Err(format!(
                    "two node URI SANs name different nodes ({previous} and {found})"
                ))
            }
            _ => from_uri = Some(found),
        }
    }
    if let Some(node) = from_uri {
        return Ok(node);
    }

    let first_dns = names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    });
    match first_dns {
        Some(dns) => NodeName::new(dns)
            .map_err(|error| format!("first DNS SAN {dns:?} is not a valid node name: {error}")),
        None => Err(
            "neither a URI SAN spiffe://<cluster>/node/<name> nor a DNS SAN is present".to_string(),
        ),
    }
}

/// `Some` when `uri` has the shape `spiffe://<cluster>/node/<rest>`: then
/// `rest` must be a valid node name. Other URIs are not node identities.
fn node_from_uri(uri: &str) -> Option<Result<NodeName, String>> {
    let rest = uri.strip_prefix(SPIFFE_SCHEME)?;
    let (cluster, path) = rest.split_once('/')?;
    let name = path.strip_prefix("node/")?;
    if cluster.is_empty() {
        return Some(Err(format!(
            "URI SAN {uri:?} has an empty cluster (trust domain)"
        )));
    }
    Some(
        NodeName::new(name)
            .map_err(|error| format!("URI SAN {uri:?} does not end in a valid node name: {error}")),
    )
}

/// The cluster (trust domain) of a node certificate: the `<cluster>` of its
/// URI SAN `spiffe://<cluster>/node/<name>`, if it has one.
pub fn node_cluster_of(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = parse_certificate(cert, "certificate").ok()?;
    let extension = parsed.subject_alternative_name().ok()??;
    extension
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri
                .strip_prefix(SPIFFE_SCHEME)
                .and_then(|rest| rest.split_once("/node/"))
                .map(|(cluster, _)| cluster.to_owned()),
            _ => None,
        })
}

/// The cluster named by a CA certificate: its URI SAN `spiffe://<cluster>`,
/// else a subject CN of the form `meshtun CA <cluster>`.
pub(crate) fn cluster_of_parsed(cert: &X509Certificate<'_>) -> Option<String> {
    if let Ok(Some(extension)) = cert.subject_alternative_name() {
        for name in &extension.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(cluster) = uri.strip_prefix(SPIFFE_SCHEME) {
                    let cluster = cluster.strip_suffix('/').unwrap_or(cluster);
                    if check_cluster(cluster).is_ok() {
                        return Some(cluster.to_string());
                    }
                }
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .filter_map(|cn| cn.strip_prefix("meshtun CA "))
        .find(|cluster| check_cluster(cluster).is_ok())
        .map(str::to_string)
}

/// A cluster name must be a SPIFFE trust domain: 1 to 255 bytes of lowercase
/// ASCII letters, digits, '.', '-' and '_'. The error
/// ([`PkiError::ClusterName`]) says which rule `name` breaks; the command
/// line checks names with it before any work is done.
pub fn check_cluster(name: &str) -> Result<(), PkiError> {
    let reject = |detail: String| PkiError::ClusterName {
        name: name.to_string(),
        detail,
    };
    if name.is_empty() {
        return Err(reject("it is empty".to_string()));
    }
    if name.len() > MAX_CLUSTER_LEN {
        return Err(reject(format!(
            "it is {} bytes long; at most {MAX_CLUSTER_LEN} are allowed",
            name.len()
        )));
    }
    if let Some((at, found)) = name
        .char_indices()
        .find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(reject(format!(
            "{found:?} at byte {at}; only lowercase ASCII letters, digits, '.', '-' and '_' \
             are allowed (it becomes the SPIFFE trust domain)"
        )));
    }
    Ok(())
}

/// Longest serial number and CRL number accepted, in octets of magnitude
/// (RFC 5280 §4.1.2.2 and §5.2.3: at most 20 octets).
pub(crate) const MAX_NUMBER_LEN: usize = 20;

/// A certificate serial number as a certificate and a CRL entry carry it: a
/// non-negative integer in its minimal DER encoding (big-endian, with a
/// leading zero octet only where the first octet has its high bit set).
/// webpki matches CRL entries to certificates by exactly these bytes.
///
/// Parsed from hex: `4a1b2c…`, `4a:1b:2c…` (as `meshtun pki inspect`
/// prints it) or `0x4a1b2c…`. Displayed like `meshtun pki inspect`:
/// colon-separated lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The serial number of the certificate `der`.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<Self, PkiError> {
        let parsed = parse_certificate(der, "certificate")?;
        Self::of_parsed(&parsed, "certificate")
    }

    /// The serial number of a parsed certificate; errors name `origin`.
    pub fn of_parsed(cert: &X509Certificate<'_>, origin: &str) -> Result<Self, PkiError> {
        Self::from_der_integer(cert.raw_serial()).map_err(|detail| PkiError::Certificate {
            origin: origin.to_string(),
            detail: format!("unusable serial number: {detail}"),
        })
    }

    /// From the content octets of a DER INTEGER; refuses a negative one.
    pub(crate) fn from_der_integer(bytes: &[u8]) -> Result<Self, String> {
        match bytes.first() {
            None => Err("it is empty".to_string()),
            Some(first) if first & 0x80 != 0 => Err("it is negative".to_string()),
            Some(_) => Ok(Self::from_magnitude(bytes)),
        }
    }

    /// From big-endian magnitude octets (leading zeros allowed).
    fn from_magnitude(bytes: &[u8]) -> Self {
        let magnitude = match bytes.iter().position(|byte| *byte != 0) {
            Some(start) => &bytes[start..],
            None => &[0u8][..],
        };
        let mut der = Vec::with_capacity(magnitude.len() + 1);
        if magnitude.first().is_some_and(|first| first & 0x80 != 0) {
            der.push(0);
        }
        der.extend_from_slice(magnitude);
        Self(der)
    }

    /// The content octets of its DER INTEGER.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FromStr for Serial {
    type Err = PkiError;

    fn from_str(text: &str) -> Result<Self, PkiError> {
        let reject = |detail: String| PkiError::Serial {
            input: text.to_string(),
            detail,
        };
        let trimmed = text.trim();
        let body = trimmed
            .strip_prefix("0x")
            .or_else(|| trimmed.strip_prefix("0X"))
            .unwrap_or(trimmed);
        let digits: Vec<u8> = body.bytes().filter(|byte| *byte != b':').collect();
        if digits.is_empty() {
            return Err(reject("it holds no hex digits".to_string()));
        }
        if let Some(bad) = body.chars().find(|c| *c != ':' && !c.is_ascii_hexdigit()) {
            return Err(reject(format!("{bad:?} is not a hex digit")));
        }
        let value = |digit: u8| match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        // An odd count of digits has an implied leading zero.
        let mut bytes = Vec::with_capacity(digits.len() / 2 + 1);
        let mut rest = &digits[..];
        if digits.len() % 2 == 1 {
            bytes.push(value(digits[0]));
            rest = &digits[1..];
        }
        for pair in rest.chunks(2) {
            bytes.push((value(pair[0]) << 4) | value(pair[1]));
        }
        let serial = Self::from_magnitude(&bytes);
        let magnitude_len = serial.0.iter().skip_while(|byte| **byte == 0).count();
        if magnitude_len > MAX_NUMBER_LEN {
            return Err(reject(format!(
                "it is {magnitude_len} octets long; a serial number has at most {MAX_NUMBER_LEN}"
            )));
        }
        Ok(serial)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// A SAN as `pki inspect` and error messages show it: `URI:…`, `DNS:…`,
/// `IP:…`.
pub fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::IPAddress(bytes) => match ip_from(bytes) {
            Some(ip) => format!("IP:{ip}"),
            None => format!("IP:<{} malformed bytes>", bytes.len()),
        },
        other => format!("other:{other}"),
    }
}

/// The address in an iPAddress SAN's 4 or 16 octets.
pub fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// A self-signed certificate with exactly `sans`.
    fn cert_with(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(value: &str) -> SanType {
        SanType::URI(value.try_into().unwrap())
    }

    fn dns(value: &str) -> SanType {
        SanType::DnsName(value.try_into().unwrap())
    }

    #[test]
    fn identity_comes_from_the_uri_san_first() {
        let cert = cert_with(vec![
            dns("dns-name"),
            uri("spiffe://prod/node/node-7"),
            uri("https://example.invalid/other"),
        ]);
        assert_eq!(identity_of(&cert).unwrap().as_str(), "node-7");
    }

    #[test]
    fn identity_falls_back_to_the_first_dns_san() {
        let cert = cert_with(vec![
            SanType::IpAddress([10, 0, 0, 1].into()),
            dns("gpu01.rack2"),
            dns("second"),
        ]);
        assert_eq!(identity_of(&cert).unwrap().as_str(), "gpu01.rack2");

        // A SPIFFE ID of another shape is not a node identity.
        let cert = cert_with(vec![uri("spiffe://prod/ns/default/sa/x"), dns("node-2")]);
        assert_eq!(identity_of(&cert).unwrap().as_str(), "node-2");
    }

    #[test]
    fn no_identity_is_an_error() {
        let cert = cert_with(vec![SanType::IpAddress([10, 0, 0, 1].into())]);
        assert!(matches!(identity_of(&cert), Err(PkiError::Identity { .. })));
        let cert = cert_with(vec![]);
        assert!(matches!(identity_of(&cert), Err(PkiError::Identity { .. })));
    }

    #[test]
    fn bad_names_are_errors_not_fallbacks() {
        // An invalid name in the node URI must not fall back to the DNS SAN.
        let cert = cert_with(vec![uri("spiffe://prod/node/a/b"), dns("node-1")]);
        let error = identity_of(&cert).unwrap_err().to_string();
        assert!(error.contains("spiffe://prod/node/a/b"), "{error}");

        let cert = cert_with(vec![uri("spiffe:///node/x")]);
        assert!(identity_of(&cert).is_err());

        let cert = cert_with(vec![
            uri("spiffe://prod/node/one"),
            uri("spiffe://prod/node/two"),
        ]);
        let error = identity_of(&cert).unwrap_err().to_string();
        assert!(error.contains("one") && error.contains("two"), "{error}");

        let cert = cert_with(vec![dns("*.wildcard.example")]);
        assert!(identity_of(&cert).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x01", &[0xff; 64]] {
            let error = identity_of(&CertificateDer::from(bytes.to_vec())).unwrap_err();
            assert!(matches!(error, PkiError::Certificate { .. }), "{error}");
        }
        // Trailing bytes after a valid certificate are refused.
        let mut der = cert_with(vec![dns("node-1")]).to_vec();
        der.push(0);
        assert!(identity_of(&CertificateDer::from(der)).is_err());
    }

    #[test]
    fn cluster_names() {
        assert!(check_cluster("prod").is_ok());
        assert!(check_cluster("gpu-cluster.example_2").is_ok());
        assert!(check_cluster("").is_err());
        assert!(check_cluster("Prod").is_err());
        assert!(check_cluster("a/b").is_err());
        assert!(check_cluster(&"x".repeat(256)).is_err());
    }
}
