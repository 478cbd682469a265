//! `meshtun check`: every problem with a configuration and its certificates,
//! reported at once, so an operator fixes them in one pass. The checks are
//! the daemon's own (see `material`).

use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use crate::EXIT_CONFIG;

pub(crate) fn check(path: &Path) -> ExitCode {
    let (report, _) =
        crate::material::inspect(path, SystemTime::now(), crate::material::Detail::Describe);
    for fact in &report.facts {
        say!("ok: {fact}");
    }
    for warning in &report.warnings {
        say!("warning: {warning}");
    }
    for error in &report.errors {
        say!("error: {error}");
    }
    if report.errors.is_empty() {
        say!("{}: OK", path.display());
        ExitCode::SUCCESS
    } else {
        say!("{}: {} problem(s)", path.display(), report.errors.len());
        ExitCode::from(EXIT_CONFIG)
    }
}
