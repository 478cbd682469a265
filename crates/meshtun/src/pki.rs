//! `meshtun pki`: a small cluster CA. Keys are written 0600 and never
//! overwritten without `--force`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use meshtun_pki::{Authority, Validity};
use meshtun_proto::NodeName;

use crate::EXIT_RUNTIME;

#[derive(Debug, Subcommand)]
pub(crate) enum PkiCommand {
    /// Create a cluster CA: writes DIR/ca.crt and DIR/ca.key (0600).
    InitCa {
        /// The cluster's name (the trust domain in spiffe://<cluster>/node/<name>).
        #[arg(long)]
        cluster: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Validity of the CA certificate in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: writes DIR/NAME.crt and DIR/NAME.key (0600).
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The node's name: its identity in the cluster.
        #[arg(long)]
        node: NodeName,
        /// An IP address SAN (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// An extra DNS SAN (repeatable); the node name is always the first.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print subject, SANs, identity, fingerprint and validity of a certificate file.
    Inspect {
        /// A PEM file with one or more certificates.
        file: PathBuf,
    },
}

pub(crate) fn pki(command: PkiCommand) -> ExitCode {
    let result = match command {
        PkiCommand::InitCa {
            cluster,
            out,
            days,
            force,
        } => Authority::generate(&cluster, Validity::days_from_now(days))
            .and_then(|authority| authority.write(&out, force))
            .map(|(cert, key)| {
                say!(
                    "wrote {} and {} (cluster {cluster:?}, {days} days)",
                    cert.display(),
                    key.display()
                );
                say!("keep ca.key offline or on one trusted host; copy only ca.crt to the nodes");
            }),
        PkiCommand::Issue {
            ca,
            node,
            ips,
            dns,
            days,
            out,
            force,
        } => Authority::load(&ca)
            .and_then(|authority| authority.issue(&node, &ips, &dns, Validity::days_from_now(days)))
            .and_then(|issued| issued.write(&out, &node, force))
            .map(|(cert, key)| {
                say!(
                    "wrote {} and {} (node {node}, {days} days)",
                    cert.display(),
                    key.display()
                );
            }),
        PkiCommand::Inspect { file } => match std::fs::read_to_string(&file) {
            Ok(pem) => meshtun_pki::inspect_pem(&pem).map(|certificates| {
                for (index, certificate) in certificates.iter().enumerate() {
                    if index > 0 {
                        say!();
                    }
                    say!("{certificate}");
                }
            }),
            Err(error) => {
                eprintln!("error: cannot read {}: {error}", file.display());
                return ExitCode::from(EXIT_RUNTIME);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("error: {problem}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
