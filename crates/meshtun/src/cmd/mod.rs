//! One module per subcommand of the `meshtun` binary; `main.rs` parses the
//! command line and calls in here.

pub(crate) mod check;
pub(crate) mod cluster;
pub(crate) mod demo;
pub(crate) mod join;
pub(crate) mod overlay;
pub(crate) mod pki;
pub(crate) mod renew;
pub(crate) mod run;
pub(crate) mod status;
