#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The supply-chain policy in `deny.toml`, enforced offline: the same rules
//! `cargo deny check licenses bans sources` applies, without installing
//! cargo-deny in CI.
//!
//! The graph comes from `cargo metadata --locked` (one run per target in
//! `[graph] targets`); the checks are plain functions over the parsed
//! metadata and policy, so `each_check_reports_every_violation` can feed them
//! a synthetic graph and prove that each rule fails when it should.
//!
//! Only the `deny.toml` keys this file knows are accepted: any other key in
//! `[graph]`, `[licenses]`, `[bans]` or `[sources]` fails the test, so this
//! test and cargo-deny cannot silently read the policy differently.
//
// (A panic in test code is a failed test; that is what an unwrap here means.)

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

// ---------------------------------------------------------------------------
// The parts of `cargo metadata --format-version 1` the checks read.

#[derive(Debug, Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    workspace_members: Vec<String>,
    resolve: Resolve,
}

#[derive(Debug, Deserialize)]
struct Package {
    id: String,
    name: String,
    version: String,
    #[serde(default)]
    license: Option<String>,
    #[serde(default)]
    license_file: Option<String>,
    /// `None` for path (workspace) packages.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    dependencies: Vec<Dependency>,
    #[serde(default)]
    features: BTreeMap<String, Vec<String>>,
    /// `Some([])` is `publish = false`.
    #[serde(default)]
    publish: Option<Vec<String>>,
}

/// One dependency as declared in a package's manifest.
#[derive(Debug, Deserialize)]
struct Dependency {
    name: String,
    #[serde(default)]
    rename: Option<String>,
    req: String,
    /// `None` (normal), `"dev"` or `"build"`.
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    optional: bool,
    /// `None` for a path dependency.
    #[serde(default)]
    source: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    id: String,
    #[serde(default)]
    deps: Vec<NodeDep>,
    /// The features cargo's feature resolver enabled on this package.
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct NodeDep {
    pkg: String,
    dep_kinds: Vec<DepKind>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
struct DepKind {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    target: Option<String>,
}

// ---------------------------------------------------------------------------
// The dependency graph the checks run on.

/// Every package reachable from the workspace members over normal, build
/// and dev edges (dev edges exist only from workspace members: cargo does
/// not resolve the dev-dependencies of dependencies), unioned over the
/// metadata of each target. `[licenses] include-dev = true` in deny.toml
/// makes cargo-deny use this same graph for all three checks.
///
/// An edge counts only if the dependency is really built: cargo's `resolve`
/// lists optional dependencies that the lockfile resolution enabled even
/// when the feature resolver did not (here rustls-webpki -> ring), so an
/// optional dependency counts only when one of the node's enabled features
/// turns it on. The result is the set `cargo tree -e normal,build,dev` shows
/// for the same targets (compared when this test was written).
struct Graph<'m> {
    /// Reachable packages by id.
    packages: BTreeMap<&'m str, &'m Package>,
    /// For each reachable package, the reachable packages that depend on it.
    parents: BTreeMap<&'m str, BTreeSet<&'m str>>,
    members: BTreeSet<&'m str>,
    /// Packages reachable without crossing a dev-dependency edge.
    non_dev: BTreeSet<&'m str>,
}

impl<'m> Graph<'m> {
    fn new(metas: &'m [Metadata]) -> Self {
        let mut packages = BTreeMap::new();
        let mut parents: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut members = BTreeSet::new();
        let mut non_dev = BTreeSet::new();
        for meta in metas {
            let by_id: BTreeMap<&str, &Package> =
                meta.packages.iter().map(|p| (p.id.as_str(), p)).collect();
            let nodes: BTreeMap<&str, &Node> = meta
                .resolve
                .nodes
                .iter()
                .map(|n| (n.id.as_str(), n))
                .collect();
            let edges = |id: &str| -> Vec<(&'m str, bool)> {
                let (Some(node), Some(pkg)) = (nodes.get(id), by_id.get(id)) else {
                    return Vec::new();
                };
                node.deps
                    .iter()
                    .filter_map(|dep| {
                        let target = by_id.get(dep.pkg.as_str())?;
                        edge_kind(pkg, node, target, &dep.dep_kinds)
                            .map(|kind| (target.id.as_str(), kind == EdgeKind::DevOnly))
                    })
                    .collect()
            };

            for pass_dev in [true, false] {
                let mut stack: Vec<&str> =
                    meta.workspace_members.iter().map(String::as_str).collect();
                let mut seen = BTreeSet::new();
                while let Some(id) = stack.pop() {
                    if !seen.insert(id) {
                        continue;
                    }
                    for (child, dev_only) in edges(id) {
                        if dev_only && !pass_dev {
                            continue;
                        }
                        if pass_dev {
                            parents.entry(child).or_default().insert(id);
                        }
                        stack.push(child);
                    }
                }
                for id in seen {
                    if pass_dev {
                        if let Some(p) = by_id.get(id) {
                            packages.insert(p.id.as_str(), *p);
                        }
                    } else {
                        non_dev.insert(id);
                    }
                }
            }
            members.extend(
                meta.workspace_members
                    .iter()
                    .filter_map(|id| by_id.get(id.as_str()))
                    .map(|p| p.id.as_str()),
            );
        }
        Self {
            packages,
            parents,
            members,
            non_dev,
        }
    }

    fn parents_of(&self, id: &str) -> String {
        let names: Vec<String> = self
            .parents
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|p| self.packages.get(p))
            .map(|p| format!("{}@{}", p.name, p.version))
            .collect();
        if names.is_empty() {
            "a workspace member".to_owned()
        } else {
            names.join(", ")
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum EdgeKind {
    /// Normal or build: part of what the workspace ships or builds with.
    Built,
    DevOnly,
}

/// Whether `node` really depends on `target` (and how), given the features
/// the feature resolver enabled on `node`. `None`: the edge is never built.
fn edge_kind(pkg: &Package, node: &Node, target: &Package, kinds: &[DepKind]) -> Option<EdgeKind> {
    let mut result = None;
    for kind in kinds {
        let decls: Vec<&Dependency> = pkg
            .dependencies
            .iter()
            .filter(|d| d.name == target.name && d.kind == kind.kind && d.target == kind.target)
            .collect();
        // No matching declaration would be a metadata shape we do not know:
        // keep the edge rather than hide a package from the checks.
        let active = decls.is_empty()
            || decls
                .iter()
                .any(|d| !d.optional || optional_dep_enabled(pkg, node, d));
        if !active {
            continue;
        }
        if kind.kind.as_deref() == Some("dev") {
            result.get_or_insert(EdgeKind::DevOnly);
        } else {
            result = Some(EdgeKind::Built);
        }
    }
    result
}

/// An optional dependency is built when an enabled feature names it as
/// `dep:NAME`, `NAME/feature` (not the weak `NAME?/feature`), or is its
/// implicit feature (which `cargo metadata` lists as `NAME = ["dep:NAME"]`).
fn optional_dep_enabled(pkg: &Package, node: &Node, dep: &Dependency) -> bool {
    let key = dep.rename.as_deref().unwrap_or(&dep.name);
    let dep_ref = format!("dep:{key}");
    let dep_feature = format!("{key}/");
    node.features
        .iter()
        .any(|feature| match pkg.features.get(feature) {
            Some(enables) => enables
                .iter()
                .any(|e| *e == dep_ref || e.starts_with(&dep_feature)),
            None => feature == key,
        })
}

// ---------------------------------------------------------------------------
// The policy: deny.toml, in cargo-deny's format.

const CRATES_IO_GIT_INDEX: &str = "https://github.com/rust-lang/crates.io-index";
const CRATES_IO_SPARSE: &str = "sparse+https://index.crates.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lint {
    Allow,
    Warn,
    Deny,
}

/// A cargo-deny package spec: `name` or `name@exact-version`.
#[derive(Debug)]
struct Spec {
    name: String,
    version: Option<String>,
}

impl Spec {
    fn parse(s: &str) -> Result<Self, String> {
        if s.contains(':') {
            return Err(format!(
                "package spec `{s}`: version requirements (`name:req`) are not supported by \
                 this test; use `name` or `name@version`"
            ));
        }
        Ok(match s.split_once('@') {
            Some((name, version)) => Self {
                name: name.to_owned(),
                version: Some(version.to_owned()),
            },
            None => Self {
                name: s.to_owned(),
                version: None,
            },
        })
    }

    fn matches(&self, p: &Package) -> bool {
        self.name == p.name && self.version.as_ref().is_none_or(|v| *v == p.version)
    }
}

#[derive(Debug)]
struct Policy {
    targets: Vec<String>,
    licenses: LicensePolicy,
    bans: BanPolicy,
    sources: SourcePolicy,
}

#[derive(Debug)]
struct LicensePolicy {
    allow: Vec<(String, spdx::Licensee)>,
    exceptions: Vec<(Spec, Vec<spdx::Licensee>)>,
    clarify: Vec<(Spec, String)>,
    include_dev: bool,
    unused_allowed_license: Lint,
}

#[derive(Debug)]
struct BanPolicy {
    multiple_versions: Lint,
    wildcards: Lint,
    allow_wildcard_paths: bool,
    deny: Vec<Ban>,
}

#[derive(Debug)]
struct Ban {
    spec: Spec,
    reason: Option<String>,
    use_instead: Option<String>,
}

#[derive(Debug)]
struct SourcePolicy {
    unknown_registry: Lint,
    unknown_git: Lint,
    allow_registry: Vec<String>,
    allow_git: Vec<String>,
}

/// A table of deny.toml, with the keys this test understands.
struct Section<'t> {
    name: &'static str,
    table: Option<&'t toml::Table>,
}

impl<'t> Section<'t> {
    fn new(
        parent: &'t toml::Table,
        name: &'static str,
        known: &[&str],
    ) -> Result<Section<'t>, String> {
        let table = match parent.get(name) {
            None => None,
            Some(v) => Some(
                v.as_table()
                    .ok_or_else(|| format!("[{name}] must be a table"))?,
            ),
        };
        for key in table.into_iter().flat_map(|t| t.keys()) {
            if !known.contains(&key.as_str()) {
                return Err(format!(
                    "[{name}] `{key}` is not understood by tests/tests/supply_chain.rs \
                     (it knows {known:?}); teach the test the key, or cargo-deny and the \
                     test would read deny.toml differently"
                ));
            }
        }
        Ok(Section { name, table })
    }

    fn get(&self, key: &str) -> Option<&'t toml::Value> {
        self.table.and_then(|t| t.get(key))
    }

    fn lint(&self, key: &str, default: Lint) -> Result<Lint, String> {
        match self.get(key).map(|v| v.as_str()) {
            None => Ok(default),
            Some(Some("allow")) => Ok(Lint::Allow),
            Some(Some("warn")) => Ok(Lint::Warn),
            Some(Some("deny")) => Ok(Lint::Deny),
            Some(_) => Err(format!(
                "[{}] `{key}` must be \"allow\", \"warn\" or \"deny\"",
                self.name
            )),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_bool()
                .ok_or_else(|| format!("[{}] `{key}` must be a boolean", self.name))
        })
    }

    fn array(&self, key: &str) -> Result<&'t [toml::Value], String> {
        self.get(key).map_or(Ok(&[]), |v| {
            v.as_array()
                .map(Vec::as_slice)
                .ok_or_else(|| format!("[{}] `{key}` must be an array", self.name))
        })
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("[{}] `{key}` must hold strings", self.name))
            })
            .collect()
    }
}

/// An inline table entry (`{ crate = "...", ... }`) with its known keys.
fn entry<'t>(v: &'t toml::Value, what: &str, known: &[&str]) -> Result<&'t toml::Table, String> {
    let t = v
        .as_table()
        .ok_or_else(|| format!("{what} entries must be tables"))?;
    if let Some(key) = t.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "{what}: `{key}` is not understood by tests/tests/supply_chain.rs (it knows {known:?})"
        ));
    }
    Ok(t)
}

fn entry_str<'t>(t: &'t toml::Table, key: &str, what: &str) -> Result<&'t str, String> {
    t.get(key)
        .and_then(toml::Value::as_str)
        .ok_or_else(|| format!("{what}: `{key}` must be a string"))
}

/// cargo-deny parses allowed licensees this way (deprecated ids allowed for
/// the GNU family, nothing else lax).
fn parse_licensee(s: &str) -> Result<spdx::Licensee, String> {
    spdx::Licensee::parse_mode(
        s,
        spdx::ParseMode {
            allow_deprecated: true,
            ..spdx::ParseMode::STRICT
        },
    )
    .map_err(|e| format!("`{s}` is not an SPDX licensee: {e}"))
}

impl Policy {
    fn parse(text: &str) -> Result<Self, String> {
        let root: toml::Table = text.parse().map_err(|e| format!("deny.toml: {e}"))?;
        // [advisories] and [output] need a network database or only shape
        // cargo-deny's printing: this test does not read them.
        const TOP: &[&str] = &[
            "graph",
            "licenses",
            "bans",
            "sources",
            "advisories",
            "output",
        ];
        if let Some(key) = root.keys().find(|k| !TOP.contains(&k.as_str())) {
            return Err(format!("deny.toml: top-level `{key}` is not understood"));
        }

        let graph = Section::new(&root, "graph", &["targets"])?;
        let targets = graph
            .array("targets")?
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Table(_) => entry_str(
                    entry(v, "[graph] targets", &["triple"])?,
                    "triple",
                    "targets",
                )
                .map(str::to_owned),
                _ => Err("[graph] targets must be triples".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let lic = Section::new(
            &root,
            "licenses",
            &[
                "version",
                "allow",
                "confidence-threshold",
                "include-dev",
                "exceptions",
                "clarify",
                "unused-allowed-license",
            ],
        )?;
        let allow = lic
            .strings("allow")?
            .into_iter()
            .map(|s| parse_licensee(&s).map(|l| (s, l)))
            .collect::<Result<Vec<_>, _>>()?;
        let exceptions = lic
            .array("exceptions")?
            .iter()
            .map(|v| {
                let t = entry(v, "[licenses] exceptions", &["crate", "allow"])?;
                let spec = Spec::parse(entry_str(t, "crate", "exceptions")?)?;
                let allow = t
                    .get("allow")
                    .and_then(toml::Value::as_array)
                    .ok_or("[licenses] exceptions: `allow` must be an array")?
                    .iter()
                    .map(|l| {
                        l.as_str()
                            .ok_or_else(|| "exception licenses must be strings".to_owned())
                            .and_then(parse_licensee)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((spec, allow))
            })
            .collect::<Result<Vec<_>, String>>()?;
        // `license-files` pins the clarification to the crate's license
        // texts by hash in cargo-deny; this test does not hash files, so a
        // clarification applies to the named crate (and version, if given).
        let clarify = lic
            .array("clarify")?
            .iter()
            .map(|v| {
                let t = entry(
                    v,
                    "[[licenses.clarify]]",
                    &["crate", "expression", "license-files"],
                )?;
                let spec = Spec::parse(entry_str(t, "crate", "clarify")?)?;
                let expression = entry_str(t, "expression", "clarify")?.to_owned();
                spdx::Expression::parse(&expression)
                    .map_err(|e| format!("clarify `{}`: {e}", spec.name))?;
                Ok((spec, expression))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let licenses = LicensePolicy {
            allow,
            exceptions,
            clarify,
            include_dev: lic.bool("include-dev", false)?,
            unused_allowed_license: lic.lint("unused-allowed-license", Lint::Warn)?,
        };

        let bans = Section::new(
            &root,
            "bans",
            &[
                "multiple-versions",
                "wildcards",
                "allow-wildcard-paths",
                "deny",
            ],
        )?;
        let deny = bans
            .array("deny")?
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(Ban {
                    spec: Spec::parse(s)?,
                    reason: None,
                    use_instead: None,
                }),
                _ => {
                    let t = entry(v, "[bans] deny", &["crate", "reason", "use-instead"])?;
                    let opt = |k: &str| t.get(k).and_then(toml::Value::as_str).map(str::to_owned);
                    Ok(Ban {
                        spec: Spec::parse(entry_str(t, "crate", "[bans] deny")?)?,
                        reason: opt("reason"),
                        use_instead: opt("use-instead"),
                    })
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        let bans = BanPolicy {
            multiple_versions: bans.lint("multiple-versions", Lint::Warn)?,
            wildcards: bans.lint("wildcards", Lint::Warn)?,
            allow_wildcard_paths: bans.bool("allow-wildcard-paths", false)?,
            deny,
        };

        let src = Section::new(
            &root,
            "sources",
            &[
                "unknown-registry",
                "unknown-git",
                "allow-registry",
                "allow-git",
            ],
        )?;
        let allow_registry = match src.get("allow-registry") {
            // cargo-deny's default: crates.io only.
            None => vec![CRATES_IO_GIT_INDEX.to_owned()],
            Some(_) => src.strings("allow-registry")?,
        };
        let sources = SourcePolicy {
            unknown_registry: src.lint("unknown-registry", Lint::Warn)?,
            unknown_git: src.lint("unknown-git", Lint::Warn)?,
            allow_registry,
            allow_git: src.strings("allow-git")?,
        };

        Ok(Self {
            targets,
            licenses,
            bans,
            sources,
        })
    }
}

// ---------------------------------------------------------------------------
// The checks.

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Finding {
    krate: String,
    version: String,
    /// `licenses`, `bans` or `sources`.
    check: &'static str,
    /// A short rule name, e.g. `license-not-allowed`, `banned`, `wildcard`.
    rule: &'static str,
    message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.version.is_empty() {
            write!(f, "{}: ", self.krate)?;
        } else {
            write!(f, "{}@{}: ", self.krate, self.version)?;
        }
        write!(f, "[{}] {}: {}", self.check, self.rule, self.message)
    }
}

/// Errors (policy violations) and warnings, as cargo-deny would print them.
#[derive(Debug, Default)]
struct Report {
    errors: Vec<Finding>,
    warnings: Vec<Finding>,
}

impl Report {
    fn push(
        &mut self,
        lint: Lint,
        p: &Package,
        check: &'static str,
        rule: &'static str,
        message: String,
    ) {
        let finding = Finding {
            krate: p.name.clone(),
            version: p.version.clone(),
            check,
            rule,
            message,
        };
        match lint {
            Lint::Allow => {}
            Lint::Warn => self.warnings.push(finding),
            Lint::Deny => self.errors.push(finding),
        }
    }

    fn sorted(mut self) -> Self {
        self.errors.sort();
        self.errors.dedup();
        self.warnings.sort();
        self.warnings.dedup();
        self
    }
}

/// Every package's (workspace members included) license expression must be
/// satisfied by `[licenses] allow`, plus any `exceptions` for that crate.
fn check_licenses(graph: &Graph<'_>, policy: &LicensePolicy, report: &mut Report) {
    let mut used = vec![false; policy.allow.len()];
    for (id, p) in &graph.packages {
        if !policy.include_dev && !graph.non_dev.contains(id) {
            continue;
        }
        let clarified = policy.clarify.iter().find(|(spec, _)| spec.matches(p));
        let (text, parsed) = match (clarified, p.license.as_deref().filter(|l| !l.is_empty())) {
            (Some((_, expr)), _) => (expr.as_str(), spdx::Expression::parse(expr)),
            // As cargo-deny: strict SPDX first, then the lax form crates.io
            // used to accept ("MIT/Apache-2.0", imprecise names).
            (None, Some(l)) => (
                l,
                spdx::Expression::parse_mode(l, spdx::ParseMode::STRICT)
                    .or_else(|_| spdx::Expression::parse_mode(l, spdx::ParseMode::LAX)),
            ),
            (None, None) => {
                let file = p.license_file.as_deref().map_or_else(
                    || "no license_file either".to_owned(),
                    |f| format!("only license_file = {f:?}"),
                );
                let rule = if graph.members.contains(id) {
                    "workspace member without a `license` field"
                } else {
                    "no `license` field"
                };
                report.push(
                    Lint::Deny,
                    p,
                    "licenses",
                    "license-missing",
                    format!(
                        "{rule} ({file}); add an SPDX `license` or a [[licenses.clarify]] \
                         entry in deny.toml"
                    ),
                );
                continue;
            }
        };
        let expr = match parsed {
            Ok(expr) => expr,
            Err(e) => {
                report.push(
                    Lint::Deny,
                    p,
                    "licenses",
                    "license-unparseable",
                    format!("license `{text}` is not a valid SPDX expression: {e}"),
                );
                continue;
            }
        };
        let exception = policy
            .exceptions
            .iter()
            .find(|(spec, _)| spec.matches(p))
            .map(|(_, allow)| allow.as_slice())
            .unwrap_or_default();
        let result = expr.evaluate_with_failures(|req| {
            if exception.iter().any(|l| l.satisfies(req)) {
                return true;
            }
            let mut ok = false;
            for (i, (_, licensee)) in policy.allow.iter().enumerate() {
                if licensee.satisfies(req) {
                    used[i] = true;
                    ok = true;
                }
            }
            ok
        });
        if let Err(failed) = result {
            let failed: Vec<String> = failed.iter().map(|r| r.req.to_string()).collect();
            report.push(
                Lint::Deny,
                p,
                "licenses",
                "license-not-allowed",
                format!(
                    "license `{text}` is not satisfied by [licenses] allow (terms not allowed: {})",
                    failed.join(", ")
                ),
            );
        }
    }
    for ((name, _), used) in policy.allow.iter().zip(used) {
        if !used {
            let finding = Finding {
                krate: name.clone(),
                version: String::new(),
                check: "licenses",
                rule: "license-not-encountered",
                message: "allowed in deny.toml but no crate in the graph uses it".to_owned(),
            };
            match policy.unused_allowed_license {
                Lint::Allow => {}
                Lint::Warn => report.warnings.push(finding),
                Lint::Deny => report.errors.push(finding),
            }
        }
    }
}

/// No crate in the graph may match `[bans] deny`; no dependency may be a
/// `*` requirement (path and git dependencies of `publish = false` crates,
/// and of dev-dependencies, excepted when `allow-wildcard-paths` is set);
/// duplicate versions are reported at `multiple-versions`.
fn check_bans(graph: &Graph<'_>, policy: &BanPolicy, report: &mut Report) {
    let mut versions: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
    for (id, p) in &graph.packages {
        versions.entry(p.name.as_str()).or_default().push(p);

        for ban in policy.deny.iter().filter(|b| b.spec.matches(p)) {
            let mut why = String::from("crate is banned by deny.toml");
            if let Some(reason) = &ban.reason {
                why.push_str(&format!(" ({reason})"));
            }
            if let Some(instead) = &ban.use_instead {
                why.push_str(&format!("; use {instead} instead"));
            }
            report.push(
                Lint::Deny,
                p,
                "bans",
                "banned",
                format!("{why}; pulled in by {}", graph.parents_of(id)),
            );
        }

        let git = p.source.as_deref().is_some_and(|s| s.starts_with("git+"));
        if policy.wildcards == Lint::Allow || git {
            continue;
        }
        let private = p.publish.as_ref().is_some_and(Vec::is_empty);
        for dep in p.dependencies.iter().filter(|d| d.req == "*") {
            let registry = dep
                .source
                .as_deref()
                .is_some_and(|s| s.starts_with("registry+") || s.starts_with("sparse+"));
            let dev = dep.kind.as_deref() == Some("dev");
            if (policy.allow_wildcard_paths && !registry && (private || dev)) || dep.name == p.name
            {
                continue;
            }
            let kind = dep.kind.as_deref().unwrap_or("normal");
            report.push(
                policy.wildcards,
                p,
                "bans",
                "wildcard",
                format!(
                    "{kind} dependency `{} = \"*\"` has a wildcard version",
                    dep.name
                ),
            );
        }
    }
    for (name, list) in versions.into_iter().filter(|(_, l)| l.len() > 1) {
        // One finding per crate, reported at its first version.
        let all: Vec<&str> = list.iter().map(|p| p.version.as_str()).collect();
        report.push(
            policy.multiple_versions,
            list[0],
            "bans",
            "duplicate",
            format!("{name} is in the graph at versions {}", all.join(", ")),
        );
    }
}

/// Every non-path package comes from an allowed registry (crates.io, in its
/// git or sparse form) or an allowed git repository.
fn check_sources(graph: &Graph<'_>, policy: &SourcePolicy, report: &mut Report) {
    let crates_io_allowed = policy
        .allow_registry
        .iter()
        .any(|r| r == CRATES_IO_GIT_INDEX || r == CRATES_IO_SPARSE);
    for p in graph.packages.values() {
        let Some(source) = p.source.as_deref() else {
            continue; // a path package: the workspace itself
        };
        if let Some(url) = source.strip_prefix("git+") {
            let base = url.split(['?', '#']).next().unwrap_or(url);
            let norm = |u: &str| u.trim_end_matches('/').trim_end_matches(".git").to_owned();
            if !policy.allow_git.iter().any(|g| norm(g) == norm(base)) {
                report.push(
                    policy.unknown_git,
                    p,
                    "sources",
                    "unknown-git",
                    format!("source `{source}` is a git repository not in [sources] allow-git"),
                );
            }
            continue;
        }
        let url = source.strip_prefix("registry+").unwrap_or(source);
        let crates_io = url == CRATES_IO_GIT_INDEX || source == CRATES_IO_SPARSE;
        let allowed =
            (crates_io && crates_io_allowed) || policy.allow_registry.iter().any(|r| r == url);
        if !allowed {
            report.push(
                policy.unknown_registry,
                p,
                "sources",
                "unknown-registry",
                format!("source `{source}` is not a registry in [sources] allow-registry"),
            );
        }
    }
}

fn check_all(graph: &Graph<'_>, policy: &Policy) -> Report {
    let mut report = Report::default();
    check_licenses(graph, &policy.licenses, &mut report);
    check_bans(graph, &policy.bans, &mut report);
    check_sources(graph, &policy.sources, &mut report);
    report.sorted()
}

// ---------------------------------------------------------------------------
// Running cargo.

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `cargo metadata --locked --offline`, for one target or all of them.
///
/// `--offline` works wherever the build already ran, as in CI. It can fail
/// on a fresh cargo home all the same: metadata reads the manifest of every
/// package in the filtered resolve, including optional ones the build never
/// downloads (here ring, through rustls-webpki's disabled `ring` feature).
/// Then the run is repeated without `--offline`, still `--locked`, so the
/// lockfile can never change under the check.
fn cargo_metadata(root: &Path, target: Option<&str>) -> Metadata {
    let run = |offline: bool| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(root)
            .args(["metadata", "--format-version", "1", "--locked"])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"));
        if offline {
            cmd.arg("--offline");
        }
        if let Some(t) = target {
            cmd.args(["--filter-platform", t]);
        }
        cmd.output().expect("run cargo metadata")
    };
    let mut out = run(true);
    if !out.status.success() {
        eprintln!(
            "cargo metadata --offline failed; retrying online (still --locked):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out = run(false);
    }
    assert!(
        out.status.success(),
        "cargo metadata --locked failed (is Cargo.lock up to date?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parse cargo metadata output")
}

fn render(findings: &[Finding]) -> String {
    findings.iter().map(|f| format!("  {f}\n")).collect()
}

#[test]
fn dependency_graph_obeys_deny_toml() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("deny.toml")).expect("read deny.toml");
    let policy = Policy::parse(&text).unwrap_or_else(|e| panic!("deny.toml: {e}"));

    let metas: Vec<Metadata> = if policy.targets.is_empty() {
        vec![cargo_metadata(&root, None)]
    } else {
        policy
            .targets
            .iter()
            .map(|t| cargo_metadata(&root, Some(t)))
            .collect()
    };
    let graph = Graph::new(&metas);
    assert!(
        graph.members.len() > 1 && graph.packages.len() > graph.members.len(),
        "the graph is implausibly small: {} packages, {} members",
        graph.packages.len(),
        graph.members.len()
    );

    let report = check_all(&graph, &policy);
    assert!(
        report.errors.is_empty(),
        "{} supply-chain violation(s) of deny.toml (the same rules as \
         `cargo deny check licenses bans sources`):\n{}\
         and warnings (allowed by deny.toml):\n{}",
        report.errors.len(),
        render(&report.errors),
        render(&report.warnings)
    );
}

// ---------------------------------------------------------------------------
// Each rule can fail.

const SYNTHETIC_POLICY: &str = r#"
[graph]
targets = ["x86_64-unknown-linux-gnu"]

[licenses]
allow = ["Apache-2.0", "MIT"]
exceptions = [{ crate = "excepted", allow = ["ISC"] }]
include-dev = true

[[licenses.clarify]]
crate = "clarified@1.0.0"
expression = "MIT"
license-files = [{ path = "LICENSE", hash = 0x12345678 }]

[bans]
multiple-versions = "warn"
wildcards = "deny"
allow-wildcard-paths = true
deny = ["openssl-sys", { crate = "ring", reason = "one crypto provider", use-instead = "aws-lc-rs" }]

[sources]
unknown-registry = "deny"
unknown-git = "deny"
allow-registry = ["https://github.com/rust-lang/crates.io-index"]
"#;

const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

fn pkg(
    name: &str,
    version: &str,
    license: Option<&str>,
    source: Option<&str>,
) -> serde_json::Value {
    let source = source.map(str::to_owned);
    let id = match &source {
        Some(s) => format!("{s}#{name}@{version}"),
        None => format!("path+file:///ws/{name}#{version}"),
    };
    serde_json::json!({
        "id": id, "name": name, "version": version, "license": license,
        "license_file": license.is_none().then_some("LICENSE.txt"),
        "source": source, "dependencies": [], "features": {},
        "publish": serde_json::Value::Null,
    })
}

fn dep(
    name: &str,
    req: &str,
    kind: Option<&str>,
    optional: bool,
    source: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "name": name, "req": req, "kind": kind, "optional": optional,
        "source": source, "target": null, "rename": null,
    })
}

fn synthetic_metadata() -> Metadata {
    let git = "git+https://example.invalid/forked/gitdep?rev=abc#abc";
    let other_registry = "registry+https://registry.example.invalid/index";
    let mut packages = vec![
        // 0: the workspace member, publish = false.
        pkg("app", "0.1.0", Some("Apache-2.0"), None),
        pkg("gpl", "1.0.0", Some("GPL-3.0-only"), Some(CRATES_IO)),
        pkg("gitdep", "0.1.0", Some("MIT"), Some(git)),
        pkg("openssl-sys", "0.9.0", Some("MIT"), Some(CRATES_IO)),
        pkg("starred", "1.0.0", Some("MIT"), Some(CRATES_IO)),
        pkg("unlicensed", "1.0.0", None, Some(CRATES_IO)),
        pkg("clarified", "1.0.0", None, Some(CRATES_IO)),
        pkg("elsewhere", "1.0.0", Some("MIT"), Some(other_registry)),
        // Passes: lax "/" syntax, an OR with a copyleft option, an exception.
        pkg("slashed", "1.0.0", Some("MIT/Apache-2.0"), Some(CRATES_IO)),
        pkg(
            "dual",
            "1.0.0",
            Some("MIT OR LGPL-2.1-or-later"),
            Some(CRATES_IO),
        ),
        pkg(
            "excepted",
            "1.0.0",
            Some("ISC AND (MIT OR Apache-2.0)"),
            Some(CRATES_IO),
        ),
        // Fails: an AND needs every part; WITH is a distinct license.
        pkg(
            "anded",
            "1.0.0",
            Some("MIT AND (BSD-3-Clause OR Zlib)"),
            Some(CRATES_IO),
        ),
        pkg(
            "llvm",
            "1.0.0",
            Some("Apache-2.0 WITH LLVM-exception"),
            Some(CRATES_IO),
        ),
        // In the resolve but never built: an optional dependency whose
        // feature is off. Must not be reported, though GPL and banned.
        pkg("ring", "0.17.0", Some("GPL-3.0-only"), Some(CRATES_IO)),
        // Only a dev-dependency of the member, and twice in the graph.
        pkg("devtool", "1.0.0", Some("AGPL-3.0-only"), Some(CRATES_IO)),
        pkg("dupe", "1.0.0", Some("MIT"), Some(CRATES_IO)),
        pkg("dupe", "2.0.0", Some("MIT"), Some(CRATES_IO)),
        // A path sibling depended on as `*`: fine for a private crate.
        pkg("sibling", "0.1.0", Some("MIT"), None),
    ];
    packages[0]["publish"] = serde_json::json!([]);
    packages[0]["dependencies"] = serde_json::json!([
        dep("gpl", "^1", None, false, Some(CRATES_IO)),
        dep("gitdep", "^0.1", None, false, Some(git)),
        dep("openssl-sys", "^0.9", None, false, Some(CRATES_IO)),
        dep("starred", "*", None, false, Some(CRATES_IO)),
        dep("unlicensed", "^1", None, false, Some(CRATES_IO)),
        dep("clarified", "^1", None, false, Some(CRATES_IO)),
        dep("elsewhere", "^1", None, false, Some(other_registry)),
        dep("slashed", "^1", None, false, Some(CRATES_IO)),
        dep("dual", "^1", None, false, Some(CRATES_IO)),
        dep("excepted", "^1", None, false, Some(CRATES_IO)),
        dep("anded", "^1", None, false, Some(CRATES_IO)),
        dep("llvm", "^1", None, false, Some(CRATES_IO)),
        dep("ring", "^0.17", None, true, Some(CRATES_IO)),
        dep("devtool", "^1", Some("dev"), false, Some(CRATES_IO)),
        dep("dupe", "^1", None, false, Some(CRATES_IO)),
        dep("dupe", "^2", Some("build"), false, Some(CRATES_IO)),
        dep("sibling", "*", None, false, None),
    ]);
    packages[0]["features"] = serde_json::json!({ "ring": ["dep:ring"], "default": [] });
    let ids: Vec<String> = packages
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    let kind_of = |i: usize| match packages[i]["name"].as_str().unwrap() {
        "devtool" => serde_json::json!([{ "kind": "dev", "target": null }]),
        "dupe" if i == 16 => serde_json::json!([{ "kind": "build", "target": null }]),
        _ => serde_json::json!([{ "kind": null, "target": null }]),
    };
    let deps: Vec<serde_json::Value> = (1..ids.len())
        .map(|i| serde_json::json!({ "name": "x", "pkg": ids[i], "dep_kinds": kind_of(i) }))
        .collect();
    let mut nodes =
        vec![serde_json::json!({ "id": ids[0], "deps": deps, "features": ["default"] })];
    nodes.extend(
        ids[1..]
            .iter()
            .map(|id| serde_json::json!({ "id": id, "deps": [] })),
    );
    serde_json::from_value(serde_json::json!({
        "packages": packages,
        "workspace_members": [ids[0]],
        "resolve": { "nodes": nodes },
    }))
    .unwrap()
}

#[test]
fn each_check_reports_every_violation() {
    let policy = Policy::parse(SYNTHETIC_POLICY).unwrap();
    let metas = [synthetic_metadata()];
    let graph = Graph::new(&metas);
    assert!(
        !graph.packages.values().any(|p| p.name == "ring"),
        "a disabled optional dependency is not part of the graph"
    );
    assert!(graph.packages.values().any(|p| p.name == "devtool"));

    let report = check_all(&graph, &policy);
    let errors: BTreeSet<(&str, &str)> = report
        .errors
        .iter()
        .map(|f| (f.krate.as_str(), f.rule))
        .collect();
    let expected: BTreeSet<(&str, &str)> = [
        ("gpl", "license-not-allowed"),
        ("devtool", "license-not-allowed"),
        ("anded", "license-not-allowed"),
        ("llvm", "license-not-allowed"),
        ("unlicensed", "license-missing"),
        ("openssl-sys", "banned"),
        ("app", "wildcard"),
        ("gitdep", "unknown-git"),
        ("elsewhere", "unknown-registry"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        errors,
        expected,
        "all violations, and only those:\n{}",
        render(&report.errors)
    );

    // The messages name crate, version and rule.
    let text = render(&report.errors);
    for needle in [
        "gpl@1.0.0: [licenses] license-not-allowed: license `GPL-3.0-only`",
        "anded@1.0.0: [licenses] license-not-allowed: license `MIT AND (BSD-3-Clause OR Zlib)` \
         is not satisfied by [licenses] allow (terms not allowed: BSD-3-Clause, Zlib)",
        "unlicensed@1.0.0: [licenses] license-missing: no `license` field (only license_file = \
         \"LICENSE.txt\")",
        "openssl-sys@0.9.0: [bans] banned: crate is banned by deny.toml; pulled in by app@0.1.0",
        "app@0.1.0: [bans] wildcard: normal dependency `starred = \"*\"`",
        "gitdep@0.1.0: [sources] unknown-git: source `git+https://example.invalid/forked/gitdep",
        "elsewhere@1.0.0: [sources] unknown-registry: source \
         `registry+https://registry.example.invalid/index`",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // The path dependency `sibling = "*"` of a private crate is allowed.
    assert!(!text.contains("sibling"), "{text}");

    // Warnings: the duplicate crate, and no allowed license unused.
    let warnings: BTreeSet<(&str, &str)> = report
        .warnings
        .iter()
        .map(|f| (f.krate.as_str(), f.rule))
        .collect();
    assert_eq!(
        warnings,
        [("dupe", "duplicate")].into_iter().collect(),
        "{}",
        render(&report.warnings)
    );

    // Without include-dev, a dev-only crate's license is not checked; with
    // a banned crate turned on by its feature, the ban fires.
    let lax = Policy::parse(&SYNTHETIC_POLICY.replace("include-dev = true", "")).unwrap();
    let report = check_all(&graph, &lax);
    assert!(!report.errors.iter().any(|f| f.krate == "devtool"));
    let mut metas = [synthetic_metadata()];
    metas[0].resolve.nodes[0].features.push("ring".to_owned());
    let report = check_all(&Graph::new(&metas), &policy);
    let ring: Vec<String> = report
        .errors
        .iter()
        .filter(|f| f.krate == "ring")
        .map(ToString::to_string)
        .collect();
    assert_eq!(ring.len(), 2, "{ring:?}");
    assert!(ring.iter().any(|f| f.contains(
        "[bans] banned: crate is banned by deny.toml (one crypto provider); use aws-lc-rs instead"
    )));
}

#[test]
fn policy_rejects_keys_it_does_not_understand() {
    for (text, needle) in [
        ("[bans]\nskip-tree = []\n", "`skip-tree` is not understood"),
        (
            "[licenses]\nprivate = { ignore = true }\n",
            "`private` is not understood",
        ),
        (
            "[bans]\ndeny = [{ crate = \"x\", wrappers = [\"y\"] }]\n",
            "`wrappers` is not understood",
        ),
        ("[bans]\ndeny = [\"x:<1\"]\n", "not supported"),
        (
            "[licenses]\nallow = [\"NotALicense\"]\n",
            "not an SPDX licensee",
        ),
        ("[license]\nallow = []\n", "top-level `license`"),
    ] {
        let err = Policy::parse(text).unwrap_err();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    // The real policy parses.
    let text = std::fs::read_to_string(workspace_root().join("deny.toml")).unwrap();
    Policy::parse(&text).unwrap();
}
