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
/// gets from its cluster manifest, if it names one (including, when
/// `[overlay]` leaves out `address`, the node's overlay address).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut table = read_table(path)?;
    let cluster = cluster_path(&table, path);
    let manifest = cluster.as_deref().map(read_manifest);
    let unfilled = match (&manifest, &cluster) {
        (Some(Ok(manifest)), Some(cluster)) => overlay_address_from(&mut table, manifest, cluster),
        _ => None,
    };
    let mut config = match build::config(&table) {
        Ok(config) => config,
        Err(mut errors) => {
            // Say why the manifest gave no address, rather than only that
            // the key is missing; and what is wrong with the manifest.
            if let Some(unfilled) = unfilled {
                errors.0.retain(|error| error.key != "overlay.address");
                errors.0.push(unfilled);
            }
            if let Some(Err(manifest_errors)) = manifest {
                errors.0.extend(manifest_errors.0);
            }
            return Err(errors);
        }
    };
    locate(&mut config, path);
    if let Some(cluster) = config.cluster.clone() {
        // `cluster_path` found the same key `build` read.
        let manifest = match manifest {
            Some(manifest) => manifest?,
            None => read_manifest(&cluster.path)?,
        };
        cluster::apply(&mut config, &manifest, &cluster.path)?;
    }
    Ok(config)
}

/// Like [`load`], without requiring the cluster manifest: for what needs
/// only the node's own settings (its admin address, its certificate), so
/// that a broken manifest does not stop `meshtun status` or `renew`. An
/// `[overlay]` that leaves its address to the manifest gets it when the
/// manifest can be read; when it cannot, `overlay` is left out of the
/// result (nothing that reads only the node's own settings uses it).
pub fn load_local(path: &Path) -> Result<Config, ConfigErrors> {
    let mut table = read_table(path)?;
    if let Some(cluster) = cluster_path(&table, path) {
        let unfilled = match load_manifest(&cluster) {
            Ok(manifest) => overlay_address_from(&mut table, &manifest, &cluster).is_some(),
            Err(_) => overlay_lacks_address(&table),
        };
        if unfilled {
            table.remove("overlay");
        }
    }
    let mut config = build::config(&table)?;
    locate(&mut config, path);
    Ok(config)
}

/// The manifest at `path`, its errors each under the key `cluster`.
fn read_manifest(path: &Path) -> Result<Manifest, ConfigErrors> {
    load_manifest(path).map_err(|errors| {
        ConfigErrors(
            errors
                .iter()
                .map(|error| ConfigError::new("cluster", format!("{}: {error}", path.display())))
                .collect(),
        )
    })
}

/// The config file at `path` as a TOML table.
fn read_table(path: &Path) -> Result<toml::Table, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::new(
            "",
            format!("cannot read config file {}: {error}", path.display()),
        )
    })?;
    text.parse::<toml::Table>()
        .map_err(|error| syntax_error(&text, &error).into())
}

/// Resolves the relative paths of a config read from `path` against its
/// directory.
fn locate(config: &mut Config, path: &Path) {
    if let Some(directory) = path.parent() {
        config.tls.resolve_relative_to(directory);
        if let Some(cluster) = &mut config.cluster {
            if cluster.path.is_relative() {
                cluster.path = directory.join(&cluster.path);
            }
        }
    }
}

/// The manifest the top-level `cluster` key of the config at `path`
/// names, resolved as [`locate`] does; `None` if the key is absent or not
/// a string (building the config reports that).
fn cluster_path(table: &toml::Table, path: &Path) -> Option<std::path::PathBuf> {
    let cluster = Path::new(table.get("cluster")?.as_str()?);
    Some(match path.parent() {
        Some(directory) if cluster.is_relative() => directory.join(cluster),
        _ => cluster.to_path_buf(),
    })
}

/// Whether the config has an `[overlay]` table without `address`.
fn overlay_lacks_address(table: &toml::Table) -> bool {
    matches!(table.get("overlay"), Some(toml::Value::Table(overlay)) if !overlay.contains_key("address"))
}

/// With a cluster manifest, `[overlay]` may leave out `address`: it is the
/// node's `overlay` in the manifest (at `path`), written into `table`
/// here, before the config is built. If the manifest has none for the
/// node, returns the error that says so.
fn overlay_address_from(
    table: &mut toml::Table,
    manifest: &Manifest,
    path: &Path,
) -> Option<ConfigError> {
    if !overlay_lacks_address(table) {
        return None;
    }
    let node = table.get("node").and_then(toml::Value::as_str)?.to_owned();
    let Some(own) = node.parse().ok().and_then(|name| manifest.node(&name)) else {
        return Some(ConfigError::new(
            "overlay.address",
            format!(
                "missing, and node \"{node}\" is not a [[node]] of the cluster manifest {} to take it from",
                path.display()
            ),
        ));
    };
    let Some(address) = own.overlay else {
        return Some(ConfigError::new(
            "overlay.address",
            format!(
                "missing, and node \"{node}\" has no overlay address in the cluster manifest {}; set one there or here",
                path.display()
            ),
        ));
    };
    if let Some(toml::Value::Table(overlay)) = table.get_mut("overlay") {
        overlay.insert("address".to_owned(), address.to_string().into());
    }
    None
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
