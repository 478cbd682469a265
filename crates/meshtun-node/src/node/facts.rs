//! What `/status` says of the node's configuration, made at start and on
//! reload.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use meshtun_config::{Allow, Config, Expose};
use meshtun_pki::NodeCredentials;

use super::RunningForward;
use crate::overlay;
use crate::shared::{unix_now, Facts};
use crate::status::{CertificateStatus, ExposeStatus, ForwardStatus, GuardStatus, OverlayStatus};

pub(super) fn certificate_status(credentials: &NodeCredentials) -> CertificateStatus {
    let not_after_unix = meshtun_pki::unix_seconds(credentials.not_after());
    let serial = credentials
        .chain()
        .first()
        .and_then(|leaf| meshtun_pki::serial_and_fingerprint(leaf).ok())
        .map(|(serial, _)| serial)
        .unwrap_or_default();
    CertificateStatus {
        identity: credentials.identity().to_string(),
        serial,
        fingerprint: credentials.fingerprint(),
        not_after_unix,
        expires_in_seconds: not_after_unix - unix_now(),
        renewal: None,
    }
}

pub(super) fn expose_statuses(exposes: &[Expose]) -> Vec<ExposeStatus> {
    exposes
        .iter()
        .map(|expose| ExposeStatus {
            service: expose.service.to_string(),
            target: expose.target.to_string(),
            allow: match &expose.allow {
                Allow::Any => vec!["*".to_owned()],
                Allow::Only(names) => names.iter().map(ToString::to_string).collect(),
            },
        })
        .collect()
}

/// The peers' overlay addresses, for `/status`.
pub(super) fn overlay_peers(config: &Config) -> BTreeMap<String, Ipv4Addr> {
    config
        .peers
        .iter()
        .filter_map(|peer| Some((peer.name.to_string(), peer.overlay?)))
        .collect()
}

pub(super) fn forward_statuses(forwards: &[RunningForward]) -> Vec<ForwardStatus> {
    forwards
        .iter()
        .map(|running| ForwardStatus {
            listen: running.local,
            peer: running.config.peer.to_string(),
            service: running.config.service.to_string(),
        })
        .collect()
}

/// The overlay's part of `/status`.
pub(super) fn overlay_status(
    config: &Config,
    transparent: Option<&overlay::Transparent>,
) -> Option<OverlayStatus> {
    config
        .overlay
        .as_ref()
        .zip(transparent)
        .map(|(overlay, transparent)| OverlayStatus {
            address: overlay.address,
            prefix: overlay.prefix.to_string(),
            listen: transparent.local,
            interface: overlay.interface.clone(),
            managed: overlay.manage,
            guard: overlay.guard,
            bypass_dropped: None,
            peers: overlay_peers(config),
        })
}

/// What `/status` says of the node before anything has run.
pub(super) fn initial_facts(
    config: &Config,
    credentials: &NodeCredentials,
    quic_listen: SocketAddr,
    overlay: Option<OverlayStatus>,
) -> Facts {
    Facts {
        quic_listen,
        certificate: certificate_status(credentials),
        forwards: Vec::new(),
        exposes: expose_statuses(&config.exposes),
        overlay,
        guard: config.guard.as_ref().map(|guard| GuardStatus {
            ports: overlay::port_list(&guard.ports),
            bypass_dropped: None,
        }),
        last_reload_unix: None,
        last_reload_error: None,
        renewal: None,
    }
}
