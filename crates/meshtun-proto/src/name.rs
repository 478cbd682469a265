//! Names that cross the wire or appear in configuration: node identities and
//! service names. Both are short ASCII tokens so that they are safe in logs,
//! metrics labels, certificate SANs and the stream preamble alike.

use std::fmt;
use std::str::FromStr;

/// Longest name accepted, in bytes. Fits a DNS label, so a node name can be a
/// certificate's DNS SAN unchanged, and keeps the preamble small.
pub const MAX_NAME_LEN: usize = 63;

/// Why a string is not a valid node or service name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The name holds a character outside `A-Z a-z 0-9 - _ .`.
    #[error("name holds {found:?} at byte {at}; only ASCII letters, digits, '-', '_' and '.' are allowed")]
    BadCharacter {
        /// The first offending character.
        found: char,
        /// Its byte offset.
        at: usize,
    },
    /// The name does not start with an ASCII letter or digit.
    #[error("name must start with an ASCII letter or digit")]
    BadStart,
}

fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    for (at, found) in name.char_indices() {
        let allowed = found.is_ascii_alphanumeric() || matches!(found, '-' | '_' | '.');
        if !allowed {
            return Err(NameError::BadCharacter { found, at });
        }
    }
    // The first byte is ASCII here: every character passed the check above.
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(NameError::BadStart);
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $type:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $type(Box<str>);

        impl $type {
            /// Checks `name` against the naming rules and wraps it.
            pub fn new(name: &str) -> Result<Self, NameError> {
                check_name(name)?;
                Ok(Self(name.into()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $type {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, Self::Err> {
                Self::new(name)
            }
        }

        impl TryFrom<&[u8]> for $type {
            type Error = NameError;
            fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
                // Report the first non-ASCII byte the way a bad character is reported.
                match std::str::from_utf8(bytes) {
                    Ok(name) => Self::new(name),
                    Err(error) => {
                        let at = error.valid_up_to();
                        Err(NameError::BadCharacter { found: char::REPLACEMENT_CHARACTER, at })
                    }
                }
            }
        }

        impl AsRef<str> for $type {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

name_type!(
    /// A node's identity: the name its certificate carries (URI SAN
    /// `spiffe://<cluster>/node/<name>`, else the first DNS SAN).
    NodeName
);

name_type!(
    /// The name of a service a node exposes; the dialer names it in the
    /// preamble and the acceptor maps it to a local target.
    ServiceName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["node-1", "gpu01.rack2", "torch_store", "a", "N0"] {
            assert_eq!(
                NodeName::new(name).map(|n| n.to_string()),
                Ok(name.to_string())
            );
            assert!(ServiceName::new(name).is_ok());
        }
        let longest = "x".repeat(MAX_NAME_LEN);
        assert!(NodeName::new(&longest).is_ok());
    }

    #[test]
    fn rejects_each_rule() {
        assert_eq!(NodeName::new(""), Err(NameError::Empty));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(NodeName::new(&long), Err(NameError::TooLong { len: 64 }));
        assert_eq!(
            ServiceName::new("has space"),
            Err(NameError::BadCharacter { found: ' ', at: 3 })
        );
        assert_eq!(
            ServiceName::new("tab\there"),
            Err(NameError::BadCharacter { found: '\t', at: 3 })
        );
        assert_eq!(
            NodeName::new("nœud"),
            Err(NameError::BadCharacter { found: 'œ', at: 1 })
        );
        assert_eq!(
            NodeName::new("a/b"),
            Err(NameError::BadCharacter { found: '/', at: 1 })
        );
        assert_eq!(NodeName::new("-lead"), Err(NameError::BadStart));
        assert_eq!(NodeName::new(".hidden"), Err(NameError::BadStart));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_rejected() {
        let result = ServiceName::try_from(&b"ok\xff"[..]);
        assert!(matches!(result, Err(NameError::BadCharacter { at: 2, .. })));
        assert_eq!(
            ServiceName::try_from(&b"svc"[..]).map(|s| s.to_string()),
            Ok("svc".to_string())
        );
    }
}
