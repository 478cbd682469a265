//! `meshtun overlay up` / `down`: the host set-up of overlay mode, for
//! nodes whose daemon does not manage it itself (`overlay.manage = false`,
//! the default, so the daemon can run without `CAP_NET_ADMIN`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use meshtun_node::overlay::{self, OverlayError};

use crate::{EXIT_CONFIG, EXIT_RUNTIME};

/// What `meshtun overlay` does.
#[derive(Debug, Subcommand)]
pub(crate) enum OverlayCommand {
    /// Create the dummy interface with this node's overlay address, the
    /// route for the prefix, and the nftables redirect (root or
    /// CAP_NET_ADMIN). Safe to repeat.
    Up {
        /// The node's configuration file; its `[overlay]` is read.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
    },
    /// Remove the nftables table and the interface. Safe to repeat.
    Down {
        /// The node's configuration file; its `[overlay]` is read.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
    },
}

pub(crate) fn overlay(command: OverlayCommand) -> ExitCode {
    let (path, up) = match &command {
        OverlayCommand::Up { config } => (config, true),
        OverlayCommand::Down { config } => (config, false),
    };
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Some(settings) = &config.overlay else {
        eprintln!(
            "error: {} has no [overlay] section; overlay mode is not configured",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let result = if up {
        overlay::setup_up(settings, &config.peers)
    } else {
        overlay::setup_down(settings)
    };
    match result {
        Ok(()) if up => {
            say!(
                "{}: {}/32 up, route {} via {}",
                settings.interface,
                settings.address,
                settings.prefix,
                settings.interface
            );
            say!(
                "nftables table ip {}: TCP to {} (except {}) redirected to {}",
                overlay::TABLE,
                settings.prefix,
                settings.address,
                settings.listen
            );
            for peer in &config.peers {
                if let Some(address) = peer.overlay {
                    say!("  {address} -> peer {}", peer.name);
                }
            }
            if settings.guard {
                say!(
                    "guard: packets for {} arriving other than on lo or {} are dropped and counted (nft list counter ip {} {})",
                    settings.prefix,
                    settings.interface,
                    overlay::TABLE,
                    overlay::BYPASS_COUNTER
                );
            } else {
                eprintln!(
                    "warning: overlay.guard = false: packets for {} from off this node are not dropped, so anyone on the link who routes {} at this node reaches its services in plain text",
                    settings.prefix, settings.address
                );
            }
            if settings.manage {
                say!("note: overlay.manage = true, so `meshtun run` does this itself");
            }
            ExitCode::SUCCESS
        }
        Ok(()) => {
            say!(
                "nftables table ip {} and interface {} removed",
                overlay::TABLE,
                settings.interface
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            if error.needs_privilege() {
                eprintln!("hint: run as root, or with CAP_NET_ADMIN");
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

fn load(path: &Path) -> Result<meshtun_config::Config, ExitCode> {
    meshtun_config::load(path).map_err(|errors| {
        for error in &errors {
            eprintln!("error: {error}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// A listener the rule cannot redirect to is a configuration problem; a
/// command that fails is a run-time one.
fn exit_code(error: &OverlayError) -> u8 {
    match error {
        OverlayError::NoPort(_) | OverlayError::NotIpv4(_) => EXIT_CONFIG,
        _ => EXIT_RUNTIME,
    }
}
