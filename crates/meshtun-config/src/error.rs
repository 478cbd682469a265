//! The errors `parse` and `load` report: one [`ConfigError`] per problem, each
//! with the key path it concerns, gathered into [`ConfigErrors`] so that an
//! operator sees every problem of a file at once.

use std::fmt;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is, as a key path such as `forward[1].peer`,
    /// `quic.listen` or `expose[0].allow[2]`; empty when it concerns the whole
    /// file (a syntax error, an unreadable file).
    pub key: String,
    /// What is wrong, and where it helps, what to write instead.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config file, in the order the file was read.
/// Never empty when returned by [`parse`](crate::parse) or [`load`](crate::load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The individual problems.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// How many problems were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if no problem is recorded (never the case for a returned error).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ConfigErrors {
    /// One problem per line, without a trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prefixes_the_key_when_there_is_one() {
        let keyed = ConfigError::new("quic.listen", "missing");
        assert_eq!(keyed.to_string(), "quic.listen: missing");
        let whole_file = ConfigError::new("", "cannot read config file x: gone");
        assert_eq!(whole_file.to_string(), "cannot read config file x: gone");
    }

    #[test]
    fn errors_display_one_per_line() {
        let errors = ConfigErrors(vec![
            ConfigError::new("node", "missing"),
            ConfigError::new("forward[0].peer", "unknown peer \"x\""),
        ]);
        assert_eq!(
            errors.to_string(),
            "node: missing\nforward[0].peer: unknown peer \"x\""
        );
        assert_eq!(errors.iter().count(), 2);
        assert_eq!(errors.len(), 2);
    }
}
