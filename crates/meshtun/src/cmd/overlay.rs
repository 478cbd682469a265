//! `meshtun overlay up` / `down`: the host set-up of overlay mode and of
//! the port guard (`[guard]`), for nodes whose daemon does not do it itself
//! (`overlay.manage = false`, the default, so the daemon can run without
//! `CAP_NET_ADMIN`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use meshtun_node::overlay::{self, HostSetup, OverlayError};

use crate::{EXIT_CONFIG, EXIT_RUNTIME};

/// What `meshtun overlay` does.
#[derive(Debug, Subcommand)]
pub(crate) enum OverlayCommand {
    /// Set the host up (root or CAP_NET_ADMIN): for `[overlay]`, the dummy
    /// interface with this node's overlay address, the route for the
    /// prefix, the nftables redirect and the guard; for `[guard]`, the
    /// nftables rule that keeps the listed ports for meshtun. Safe to repeat.
    Up {
        /// The node's configuration file; its `[overlay]` and `[guard]` are read.
        #[arg(short, long, env = "MESHTUN_CONFIG")]
        config: PathBuf,
    },
    /// Remove the nftables table and the interface. Safe to repeat.
    Down {
        /// The node's configuration file; its `[overlay]` and `[guard]` are read.
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
    // `down` removes meshtun's table whatever the config says now: a
    // section taken out of the config must not leave its rules behind.
    let setup = match HostSetup::of(&config) {
        Some(setup) => setup,
        None if !up => HostSetup::default(),
        None => {
            eprintln!(
                "error: {} has neither an [overlay] nor a [guard] section; there is nothing to set up",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = if up {
        overlay::setup_up(&setup, &config.peers)
    } else {
        overlay::setup_down(&setup)
    };
    match result {
        Ok(()) if up => {
            if let Some(settings) = &setup.overlay {
                say!(
                    "{}: {}/32 up, route {} via {}",
                    settings.interface,
                    settings.address,
                    settings.prefix,
                    settings.interface
                );
                say!(
                    "nftables table inet {}: TCP to {} (except {}) redirected to {}",
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
                        "guard: packets for {} arriving other than on lo or {} are dropped and counted (nft list counter inet {} {})",
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
            }
            if let Some(guard) = &setup.guard {
                say!(
                    "port guard: new TCP and UDP connections to ports {} arriving other than on lo are dropped and counted (nft list counter inet {} {})",
                    overlay::port_list(&guard.ports),
                    overlay::TABLE,
                    overlay::BYPASS_COUNTER
                );
            }
            ExitCode::SUCCESS
        }
        Ok(()) => {
            match &setup.overlay {
                Some(settings) => say!(
                    "nftables table inet {} and interface {} removed",
                    overlay::TABLE,
                    settings.interface
                ),
                None => say!("nftables table inet {} removed", overlay::TABLE),
            }
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
