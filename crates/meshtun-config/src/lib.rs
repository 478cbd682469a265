//! meshtun's configuration: the TOML file turned into a validated [`Config`].
//!
//! This crate owns the config schema (`example.toml`): it parses the text,
//! rejects unknown keys, applies defaults, checks every value and every
//! cross-reference (a forward's peer is declared, a service is exposed once,
//! listeners do not collide), and reports every problem at once, each with
//! its key path, so `meshtun check` can list them all. A [`Config`] that
//! exists is valid: runtime code never re-checks or unwraps it.
//!
//! It must not do I/O beyond reading the config file in [`load`]: no network,
//! no DNS (host names are kept as written and resolved by the node on every
//! dial), no reading of the certificate files it names, no spawning.
//!
//! serde stops at the first error, so the file is parsed into a plain TOML
//! table and walked key by key instead of being deserialized into structs in
//! one go; that is what lets one run report every problem.

mod build;
mod cluster;
mod error;
mod host_port;
mod model;
mod overlay;
mod read;
mod units;

use std::path::Path;

pub use cluster::{
    load_manifest, parse_manifest, Derived, Manifest, ManifestNode, ManifestService,
};
pub use error::{ConfigError, ConfigErrors};
pub use host_port::{HostPort, HostPortError};
pub use model::{
    Admin, Allow, ClusterSource, Config, Expose, Forward, Guard, Limits, Overlay, OverlayAllow,
    OverlayPrefix, Peer, Quic, Renew, Tls,
};

/// A complete, commented configuration of node-1 in a two-node cluster,
/// with every optional key shown at its default. [`parse`] accepts it.
pub const EXAMPLE: &str = include_str!("example.toml");

/// Parses and validates a config file's text. Relative paths in `[tls]` are
/// kept as written; [`load`] resolves them.
///
/// ```
/// let config = meshtun_config::parse(meshtun_config::EXAMPLE).expect("the example is valid");
/// assert_eq!(config.node.as_str(), "node-1");
///
/// let errors = meshtun_config::parse("node = \"node-1\"\n[tls]\nca = \"ca.crt\"\n").unwrap_err();
/// let keys: Vec<&str> = errors.iter().map(|error| error.key.as_str()).collect();
/// assert_eq!(keys, ["quic.listen", "tls.cert", "tls.key"]);
/// ```
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    match text.parse::<toml::Table>() {
        Ok(table) => build::config(&table),
        Err(error) => Err(syntax_error(text, &error).into()),
    }
}

/// Reads the file, parses it, resolves relative paths in `[tls]` and
/// `cluster` against the config file's directory, and adds what the node
/// gets from its cluster manifest, if it names one.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut config = load_local(path)?;
    if let Some(cluster) = config.cluster.clone() {
        let manifest = load_manifest(&cluster.path).map_err(|errors| {
            ConfigErrors(
                errors
                    .iter()
                    .map(|error| {
                        ConfigError::new("cluster", format!("{}: {error}", cluster.path.display()))
                    })
                    .collect(),
            )
        })?;
        cluster::apply(&mut config, &manifest, &cluster.path)?;
    }
    Ok(config)
}

/// Like [`load`], without reading the cluster manifest: for what needs
/// only the node's own settings (its admin address, its certificate), so
/// that a broken manifest does not stop `meshtun status` or `renew`.
pub fn load_local(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::new(
            "",
            format!("cannot read config file {}: {error}", path.display()),
        )
    })?;
    let mut config = parse(&text)?;
    if let Some(directory) = path.parent() {
        config.tls.resolve_relative_to(directory);
        if let Some(cluster) = &mut config.cluster {
            if cluster.path.is_relative() {
                cluster.path = directory.join(&cluster.path);
            }
        }
    }
    Ok(config)
}

/// A TOML syntax error as one [`ConfigError`] giving line and column.
pub(crate) fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return ConfigError::new("", format!("TOML syntax error: {message}"));
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    ConfigError::new(
        "",
        format!("TOML syntax error at line {line}, column {column}: {message}"),
    )
}
