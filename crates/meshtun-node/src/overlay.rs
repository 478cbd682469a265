//! Overlay mode (README, "Overlay mode"): the host set-up that sends TCP for other
//! nodes' overlay addresses to meshtun, and the transparent listener that
//! carries those connections to the peers.
//!
//! Set-up ([`setup_up`], [`setup_down`]) runs the `ip` and `nft` programs.
//! Five idempotent commands are all it takes, so this crate spawns processes
//! rather than pull in a netlink and an nftables crate; the commands are the
//! ones an operator would type, and their errors name themselves.
//!
//! What the set-up builds on a node whose overlay address is A, in prefix P,
//! with the transparent listener on L:
//! - a dummy interface (or a port-less bridge where the kernel has no dummy
//!   driver) holding A/32, and a route for P through it, so a
//!   connect to any overlay address is routable before nftables rewrites it;
//! - a table `inet meshtun_overlay` whose output nat chain redirects TCP
//!   for P, except A itself, to L;
//! - unless `overlay.guard = false`, the guard in the same table: an input
//!   chain that drops every packet for A arriving on any interface but `lo`
//!   and the overlay interface, and a forward chain that drops every packet
//!   for P the node would route, counted in the named counter
//!   `bypass_dropped`. Linux accepts packets for a local address on
//!   any interface, so without it a neighbour that routes A at this node's
//!   underlay address reaches the services bound to A in plain text.
//!   Carried connections never cross it: the acceptor connects to A from
//!   this host, which the kernel delivers over `lo`.
//!
//! The same table holds the port guard of `[guard]`, for forward mode's
//! hosting nodes whose services cannot bind loopback: new TCP and UDP
//! connections to the listed ports that arrive on any interface but `lo`
//! are dropped, and counted in the same counter. A node with only
//! `[guard]` gets the table and no interface.
//!
//! Loop freedom: the rule must never catch meshtun's own connections. The
//! obvious way is to exclude them by mark or uid; this rule excludes by address
//! instead. meshtun connects only to expose targets, which config validation
//! keeps out of P except A, and to A itself (overlay streams), which the rule
//! leaves alone. A uid match would also exclude every application running as
//! meshtun's user, and `SO_MARK` needs `CAP_NET_ADMIN` in the daemon at run
//! time, which the address rule does not. (A target given as a DNS name is
//! checked at connect time instead; see `acceptor::connect`.)

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshtun_config::{Config, Guard, Overlay, Peer};
use meshtun_proto::Preamble;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::accept;
use crate::carrier::Carrier;
use crate::metrics::Metrics;
use crate::opener;
use crate::peer::PeerLinks;
use crate::splice;
use crate::throttle::Throttle;

/// The nftables table meshtun owns; nothing else in it is kept.
pub const TABLE: &str = "meshtun_overlay";

/// The named counter in [`TABLE`] of packets the guard dropped.
pub const BYPASS_COUNTER: &str = "bypass_dropped";

/// How often a connection to an overlay address no peer has is logged at
/// info, per address; the rest go to debug.
const UNKNOWN_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Addresses remembered for [`UNKNOWN_LOG_INTERVAL`]; past this many, stale
/// ones are dropped, so a scan of the prefix cannot grow the map unbounded.
const UNKNOWN_REMEMBERED: usize = 1024;

/// Why the overlay set-up failed. Each variant names the command.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The program could not be run at all.
    #[error("cannot run `{command}`: {source} (are iproute2 and nftables installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        source: io::Error,
    },
    /// The program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed to stderr.
        stderr: String,
    },
    /// The nftables rule needs a fixed port to redirect to.
    #[error("overlay.listen {0} has port 0; the nftables rule needs a fixed port")]
    NoPort(SocketAddr),
    /// Redirected IPv4 connections cannot reach an IPv6 listener.
    #[error(
        "overlay.listen {0} is not an IPv4 address; redirected IPv4 connections cannot reach it"
    )]
    NotIpv4(SocketAddr),
    /// The blocking set-up task did not finish (the runtime is stopping).
    #[error("overlay set-up did not finish: {0}")]
    Interrupted(String),
    /// The program's output was not what it should print.
    #[error("`{command}` printed something unexpected: {output:?}")]
    Unreadable {
        /// The command line.
        command: String,
        /// The start of what it printed.
        output: String,
    },
}

impl OverlayError {
    /// Whether the failure says the table or the counter does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Failed { stderr, .. } if stderr.contains("No such file or directory"))
    }

    /// Whether the failure looks like missing privileges (not root, no
    /// `CAP_NET_ADMIN`).
    pub fn needs_privilege(&self) -> bool {
        match self {
            Self::Spawn { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            Self::Failed { stderr, .. } => {
                let stderr = stderr.to_ascii_lowercase();
                stderr.contains("operation not permitted") || stderr.contains("permission denied")
            }
            Self::NoPort(_) | Self::NotIpv4(_) | Self::Interrupted(_) | Self::Unreadable { .. } => {
                false
            }
        }
    }
}

/// What meshtun sets up on the host, in its one nftables table: the
/// overlay (its interface, route, redirect and guard), the port guard of
/// `[guard]`, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSetup {
    /// `[overlay]`, with `listen` as bound.
    pub overlay: Option<Overlay>,
    /// `[guard]`.
    pub guard: Option<Guard>,
}

impl HostSetup {
    /// The set-up `config` asks for; `None` if it has neither `[overlay]`
    /// nor `[guard]`.
    pub fn of(config: &Config) -> Option<Self> {
        let setup = Self {
            overlay: config.overlay.clone(),
            guard: config.guard.clone(),
        };
        (setup.overlay.is_some() || setup.guard.is_some()).then_some(setup)
    }

    /// Whether anything in the table drops and counts packets.
    pub fn guards(&self) -> bool {
        self.guard.is_some() || self.overlay.as_ref().is_some_and(|overlay| overlay.guard)
    }
}

/// Sets the host up: for overlay mode the dummy interface with this node's
/// overlay address and the route for the prefix; then meshtun's nftables
/// table, with the overlay's redirect and guard and the port guard.
/// Idempotent: re-applying leaves one interface, one route and one table,
/// the latter replaced whole. Needs root or `CAP_NET_ADMIN`.
pub fn setup_up(setup: &HostSetup, peers: &[Peer]) -> Result<(), OverlayError> {
    let rules = ruleset(setup)?;
    if let Some(overlay) = &setup.overlay {
        let interface = overlay.interface.as_str();
        let address = format!("{}/32", overlay.address);
        let prefix = overlay.prefix.to_string();
        add_interface(interface)?;
        run(
            "ip",
            &["addr", "replace", &address, "dev", interface],
            None,
            &[],
        )?;
        run("ip", &["link", "set", interface, "up"], None, &[])?;
        run(
            "ip",
            &["route", "replace", &prefix, "dev", interface],
            None,
            &[],
        )?;
    }
    run("nft", &["-f", "-"], Some(&rules), &[])?;
    if let Some(overlay) = &setup.overlay {
        let reachable = peers.iter().filter(|peer| peer.overlay.is_some()).count();
        info!(interface = %overlay.interface, address = %overlay.address, prefix = %overlay.prefix, listen = %overlay.listen, guard = overlay.guard, peers = reachable, "overlay set up");
    }
    if let Some(guard) = &setup.guard {
        info!(ports = %port_list(&guard.ports), "port guard set up");
    }
    Ok(())
}

/// `29500, 29550-29560`: ranges as nft and people write them.
pub fn port_list(ports: &[std::ops::RangeInclusive<u16>]) -> String {
    ports
        .iter()
        .map(|range| {
            if range.start() == range.end() {
                range.start().to_string()
            } else {
                format!("{}-{}", range.start(), range.end())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the interface that holds the overlay address: a dummy one, or,
/// on a kernel built without the dummy driver (some VM kernels), a bridge
/// with no ports, which like a dummy sends nothing anywhere. An existing
/// interface of that name is kept.
fn add_interface(interface: &str) -> Result<(), OverlayError> {
    let args = |kind| ["link", "add", interface, "type", kind];
    match run("ip", &args("dummy"), None, &["File exists"]) {
        Err(OverlayError::Failed { stderr, .. }) if stderr.contains("Unknown device type") => {
            info!(%interface, "this kernel has no dummy interfaces; using a bridge without ports");
            run("ip", &args("bridge"), None, &["File exists"])
        }
        other => other,
    }
}

/// Undoes [`setup_up`]: deletes the nftables table (also one left in the
/// `ip` family by an older meshtun) and the overlay's interface (with its
/// address and route). Idempotent: what is already gone is fine.
pub fn setup_down(setup: &HostSetup) -> Result<(), OverlayError> {
    for family in ["inet", "ip"] {
        run(
            "nft",
            &["delete", "table", family, TABLE],
            None,
            &["No such file or directory"],
        )?;
    }
    if let Some(overlay) = &setup.overlay {
        let interface = overlay.interface.as_str();
        run(
            "ip",
            &["link", "del", interface],
            None,
            &["Cannot find device"],
        )?;
        info!(%interface, "overlay removed");
    }
    info!(table = TABLE, "nftables table removed");
    Ok(())
}

/// [`setup_up`] off the async threads.
pub(crate) async fn setup_up_blocking(
    setup: HostSetup,
    peers: Vec<Peer>,
) -> Result<(), OverlayError> {
    tokio::task::spawn_blocking(move || setup_up(&setup, &peers))
        .await
        .unwrap_or_else(|error| Err(OverlayError::Interrupted(error.to_string())))
}

/// [`setup_down`] off the async threads.
pub(crate) async fn setup_down_blocking(setup: HostSetup) -> Result<(), OverlayError> {
    tokio::task::spawn_blocking(move || setup_down(&setup))
        .await
        .unwrap_or_else(|error| Err(OverlayError::Interrupted(error.to_string())))
}

/// The `nft -f` script that (re)defines meshtun's table. Declaring the
/// table, deleting it and defining it again in one transaction replaces
/// whatever was there, atomically, whether or not it existed; a table an
/// older meshtun left in the `ip` family goes the same way. The table is
/// in the `inet` family, so the port guard covers IPv6 as well as IPv4
/// (the overlay itself is IPv4 only).
pub fn ruleset(setup: &HostSetup) -> Result<String, OverlayError> {
    let mut text = format!(
        "table ip {TABLE} {{}}\n\
         delete table ip {TABLE}\n\
         table inet {TABLE} {{}}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n"
    );
    if setup.guards() {
        text.push_str(&format!("\tcounter {BYPASS_COUNTER} {{\n\t}}\n"));
    }
    let mut input = Vec::new();
    let mut forward = Vec::new();
    if let Some(overlay) = &setup.overlay {
        let listen = overlay.listen;
        if listen.port() == 0 {
            return Err(OverlayError::NoPort(listen));
        }
        let SocketAddr::V4(listen) = listen else {
            return Err(OverlayError::NotIpv4(listen));
        };
        // `redirect` sends locally generated packets to 127.0.0.1; any other
        // loopback address needs an explicit `dnat`.
        let verdict = if *listen.ip() == Ipv4Addr::LOCALHOST {
            format!("redirect to :{}", listen.port())
        } else {
            format!("dnat ip to {listen}")
        };
        text.push_str(&format!(
            "\tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr {prefix} ip daddr != {address} meta l4proto tcp {verdict}\n\
             \t}}\n",
            prefix = overlay.prefix,
            address = overlay.address,
        ));
        if overlay.guard {
            // The interface name is quoted: config validation keeps it to
            // characters nft takes inside a string.
            // Input: this node's overlay address, the one local address in
            // the prefix; matching the whole prefix would lock the host out
            // if the prefix were ever to cover an underlay address.
            input.push(format!(
                "ip daddr {address} iifname != {{ \"lo\", \"{interface}\" }} counter name \"{BYPASS_COUNTER}\" drop",
                address = overlay.address,
                interface = overlay.interface,
            ));
            forward.push(format!(
                "ip daddr {prefix} counter name \"{BYPASS_COUNTER}\" drop",
                prefix = overlay.prefix,
            ));
        }
    }
    if let Some(guard) = &setup.guard {
        // New connections only: replies to this node's own outgoing
        // connections may come back to a guarded port number.
        input.push(format!(
            "iifname != \"lo\" ct state new meta l4proto {{ tcp, udp }} th dport {{ {ports} }} counter name \"{BYPASS_COUNTER}\" drop",
            ports = port_list(&guard.ports),
        ));
    }
    for (chain, rules) in [("input", input), ("forward", forward)] {
        if rules.is_empty() {
            continue;
        }
        text.push_str(&format!(
            "\tchain {chain} {{\n\
             \t\ttype filter hook {chain} priority filter; policy accept;\n"
        ));
        for rule in rules {
            text.push_str(&format!("\t\t{rule}\n"));
        }
        text.push_str("\t}\n");
    }
    text.push_str("}\n");
    Ok(text)
}

/// How often the daemon reads the guard's counter.
const GUARD_POLL: Duration = Duration::from_secs(10);

/// Reads the guard's counter into `meshtun_overlay_bypass_dropped_total`
/// and `/status` every [`GUARD_POLL`] until the node closes. A daemon
/// without `CAP_NET_ADMIN` (the usual set-up, with `meshtun overlay up`
/// run by systemd) cannot read it: that is said once at info and the
/// figure stays absent. A counter that is missing (the table was never
/// loaded, or was loaded with the guard off) is warned about once per
/// episode: the overlay then has no guard, whatever the config says.
pub(crate) async fn watch_guard(metrics: Arc<Metrics>, closing: CancellationToken) {
    let mut missing = false;
    loop {
        let read = tokio::task::spawn_blocking(bypass_dropped).await;
        match read {
            Ok(Ok(packets)) => {
                if missing {
                    info!("the overlay guard is in place again");
                }
                missing = false;
                metrics.set_overlay_bypass_dropped(packets);
            }
            Ok(Err(error)) if error.needs_privilege() => {
                metrics.forget_overlay_bypass_dropped();
                info!(%error, "cannot read the guard's counter without CAP_NET_ADMIN; meshtun_overlay_bypass_dropped_total is not exported (as root: nft list counter inet {TABLE} {BYPASS_COUNTER})");
                return;
            }
            Ok(Err(error)) => {
                // A figure that cannot be read now is not shown as current.
                metrics.forget_overlay_bypass_dropped();
                if !missing {
                    if error.is_missing() {
                        warn!(%error, "meshtun's guard is not in place: packets for this node's overlay address or its [guard] ports from off the node are not dropped; run `meshtun overlay up -c FILE` as root (or set overlay.manage = true)");
                    } else {
                        warn!(%error, "cannot read the guard's counter; meshtun_overlay_bypass_dropped_total is not exported until it can");
                    }
                }
                missing = true;
            }
            // The runtime is stopping.
            Err(_) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(GUARD_POLL) => {}
            () = closing.cancelled() => return,
        }
    }
}

/// Packets the guard has dropped since its table was loaded: the
/// `bypass_dropped` counter, read with `nft`. Needs `CAP_NET_ADMIN`, as
/// any read of nftables does.
pub fn bypass_dropped() -> Result<u64, OverlayError> {
    let args = ["--json", "list", "counter", "inet", TABLE, BYPASS_COUNTER];
    let stdout = run_for_output("nft", &args, None, &[])?;
    let command = format!("nft {}", args.join(" "));
    packets_in_counter_json(&stdout).ok_or_else(|| OverlayError::Unreadable {
        command,
        output: stdout.chars().take(200).collect(),
    })
}

/// The `packets` of the one counter in `nft --json list counter` output.
fn packets_in_counter_json(text: &str) -> Option<u64> {
    let document: serde_json::Value = serde_json::from_str(text).ok()?;
    document
        .get("nftables")?
        .as_array()?
        .iter()
        .find_map(|item| item.get("counter")?.get("packets")?.as_u64())
}

/// Runs `program args`, feeding `input` on stdin. A failure whose stderr
/// contains one of `tolerated` counts as success (the state is already
/// what was asked for).
fn run(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    tolerated: &[&str],
) -> Result<(), OverlayError> {
    run_for_output(program, args, input, tolerated).map(drop)
}

/// [`run`], returning what the program printed on stdout.
fn run_for_output(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    tolerated: &[&str],
) -> Result<String, OverlayError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_error = |source| OverlayError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        // The tolerated messages are matched in English.
        .env("LC_ALL", "C")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means the program exited early; its status and
        // stderr below say why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        debug!(%command, "ran");
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if tolerated.iter().any(|message| stderr.contains(message)) {
        debug!(%command, %stderr, "already in the wanted state");
        return Ok(stdout);
    }
    Err(OverlayError::Failed {
        command,
        status: output.status,
        stderr,
    })
}

/// The transparent listener: its bound socket and the peers by overlay address.
#[derive(Debug)]
pub(crate) struct Transparent {
    /// One listener per shard, in shard order, each registered with its
    /// shard's runtime (one `SO_REUSEPORT` group on `local`).
    pub(crate) listeners: Vec<TcpListener>,
    pub(crate) local: SocketAddr,
    pub(crate) routes: Arc<Routes>,
}

/// Which peer each overlay address belongs to; a reload that adds, removes
/// or readdresses peers replaces the map (connections already carried keep
/// their peer).
#[derive(Debug)]
pub(crate) struct Routes {
    peers: std::sync::RwLock<HashMap<Ipv4Addr, Arc<PeerLinks>>>,
    /// When a connection to an unknown address was last logged at info.
    unknown: Throttle<Ipv4Addr>,
}

impl Routes {
    pub(crate) fn new(peers: HashMap<Ipv4Addr, Arc<PeerLinks>>) -> Self {
        Self {
            peers: std::sync::RwLock::new(peers),
            unknown: Throttle::bounded(UNKNOWN_LOG_INTERVAL, UNKNOWN_REMEMBERED),
        }
    }

    /// Routes new connections by `peers` from now on.
    pub(crate) fn replace(&self, peers: HashMap<Ipv4Addr, Arc<PeerLinks>>) {
        *self
            .peers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = peers;
    }

    /// The peer that owns `address`, if any.
    fn peer(&self, address: Ipv4Addr) -> Option<Arc<PeerLinks>> {
        self.peers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&address)
            .cloned()
    }

    /// Whether a connection to `address`, which no peer has, should be
    /// logged at info now (at most once per [`UNKNOWN_LOG_INTERVAL`]).
    fn report_unknown(&self, address: Ipv4Addr, now: Instant) -> bool {
        self.unknown.admit_at(address, now).is_some()
    }
}

/// Accepts redirected connections until the node stops accepting.
/// Runs on `shard`, for that shard's `listener`; each connection's task runs
/// there too.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    shard: usize,
    routes: Arc<Routes>,
    carrier: Arc<Carrier>,
    stop: CancellationToken,
) {
    // The overlay listener's port is fixed (port 0 is refused at start).
    let mut accepting = accept::Accepting::fixed_port(format!("overlay {local}"), listener);
    while let Some((tcp, client)) = accepting.next(&stop, Some(carrier.accept_limits())).await {
        let span = tracing::debug_span!("overlay", shard, %client);
        let task = carry_redirected(tcp, routes.clone(), shard, carrier.clone());
        carrier.streams.spawn(task.instrument(span));
    }
}

/// Finds where a redirected connection was going and carries it to the
/// peer that owns that address, asking for the same port there. Runs on
/// `shard`. The socket is armed to reset on close before anything else.
async fn carry_redirected(
    tcp: TcpStream,
    routes: Arc<Routes>,
    shard: usize,
    carrier: Arc<Carrier>,
) {
    splice::reset_on_close(&tcp);
    let destination = match original_destination(&tcp) {
        Ok(destination) => destination,
        Err(error) => {
            // A connection made straight to the listener, not redirected.
            debug!(%error, "no original destination; resetting");
            return;
        }
    };
    let Some(peer) = routes.peer(*destination.ip()) else {
        if routes.report_unknown(*destination.ip(), Instant::now()) {
            info!(%destination, "no peer has this overlay address; resetting connections to it (logged once a minute)");
        } else {
            debug!(%destination, "no peer has this overlay address; resetting");
        }
        return;
    };
    let span = tracing::debug_span!("route", %destination, peer = %peer.name());
    let preamble = opener::encode_preamble(&Preamble::overlay_port(destination.port()));
    opener::open_stream(tcp, peer, preamble, shard, carrier)
        .instrument(span)
        .await;
}

/// The destination a connection had before nftables redirected it
/// (`SO_ORIGINAL_DST`, from conntrack).
fn original_destination(tcp: &TcpStream) -> io::Result<SocketAddrV4> {
    let raw = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    socket_addr_v4(&raw).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned address family {}", raw.sin_family),
        )
    })
}

/// Converts the kernel's `sockaddr_in`, whose port and address are in
/// network byte order, to a [`SocketAddrV4`].
fn socket_addr_v4(raw: &nix::libc::sockaddr_in) -> Option<SocketAddrV4> {
    if i32::from(raw.sin_family) != nix::libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_config::{Allow, OverlayAllow, OverlayPrefix};

    fn overlay(listen: &str) -> Overlay {
        Overlay {
            address: Ipv4Addr::new(100, 127, 0, 2),
            prefix: OverlayPrefix {
                network: Ipv4Addr::new(100, 127, 0, 0),
                len: 16,
            },
            listen: listen.parse().expect("a test address"),
            interface: "meshtun0".to_owned(),
            manage: true,
            guard: true,
            allow: vec![OverlayAllow {
                peers: Allow::Any,
                ports: 1024..=65535,
            }],
        }
    }

    fn overlay_only(listen: &str) -> HostSetup {
        HostSetup {
            overlay: Some(overlay(listen)),
            guard: None,
        }
    }

    /// Replaces a legacy `ip` table and the `inet` table in one transaction.
    const PRELUDE: &str = "table ip meshtun_overlay {}\n\
                           delete table ip meshtun_overlay\n\
                           table inet meshtun_overlay {}\n\
                           delete table inet meshtun_overlay\n";

    #[test]
    fn ruleset_redirects_the_prefix_except_this_node_and_guards_it() {
        let text = ruleset(&overlay_only("127.0.0.1:15001")).expect("a valid overlay");
        assert_eq!(
            text,
            format!(
                "{PRELUDE}\
                 table inet meshtun_overlay {{\n\
                 \tcounter bypass_dropped {{\n\
                 \t}}\n\
                 \tchain output {{\n\
                 \t\ttype nat hook output priority -100; policy accept;\n\
                 \t\tip daddr 100.127.0.0/16 ip daddr != 100.127.0.2 meta l4proto tcp redirect to :15001\n\
                 \t}}\n\
                 \tchain input {{\n\
                 \t\ttype filter hook input priority filter; policy accept;\n\
                 \t\tip daddr 100.127.0.2 iifname != {{ \"lo\", \"meshtun0\" }} counter name \"bypass_dropped\" drop\n\
                 \t}}\n\
                 \tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy accept;\n\
                 \t\tip daddr 100.127.0.0/16 counter name \"bypass_dropped\" drop\n\
                 \t}}\n\
                 }}\n"
            )
        );
    }

    #[test]
    fn ruleset_without_the_guard_only_redirects() {
        let mut setup = overlay_only("127.0.0.1:15001");
        if let Some(overlay) = &mut setup.overlay {
            overlay.guard = false;
        }
        let text = ruleset(&setup).expect("a valid overlay");
        assert!(text.contains("redirect to :15001"), "{text}");
        for absent in ["drop", "counter", "chain input", "chain forward"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    #[test]
    fn ruleset_of_a_port_guard_alone_has_no_overlay() {
        let setup = HostSetup {
            overlay: None,
            guard: Some(Guard {
                ports: vec![29500..=29500, 29550..=29560],
            }),
        };
        let text = ruleset(&setup).expect("a valid guard");
        assert_eq!(
            text,
            format!(
                "{PRELUDE}\
                 table inet meshtun_overlay {{\n\
                 \tcounter bypass_dropped {{\n\
                 \t}}\n\
                 \tchain input {{\n\
                 \t\ttype filter hook input priority filter; policy accept;\n\
                 \t\tiifname != \"lo\" ct state new meta l4proto {{ tcp, udp }} th dport {{ 29500, 29550-29560 }} counter name \"bypass_dropped\" drop\n\
                 \t}}\n\
                 }}\n"
            )
        );
    }

    #[test]
    fn ruleset_of_both_guards_puts_both_rules_in_one_input_chain() {
        let setup = HostSetup {
            guard: Some(Guard {
                ports: vec![8000..=8000],
            }),
            ..overlay_only("127.0.0.1:15001")
        };
        let text = ruleset(&setup).expect("a valid set-up");
        assert_eq!(text.matches("chain input").count(), 1, "{text}");
        assert_eq!(text.matches("counter bypass_dropped").count(), 1, "{text}");
        assert!(text.contains("th dport { 8000 }"), "{text}");
        assert!(
            text.contains("iifname != { \"lo\", \"meshtun0\" }"),
            "{text}"
        );
    }

    #[test]
    fn the_guard_counter_is_read_from_nft_json() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "ip", "name": "bypass_dropped", "table": "meshtun_overlay", "handle": 4, "packets": 17, "bytes": 1020}}]}"#;
        assert_eq!(packets_in_counter_json(listed), Some(17));
        assert_eq!(packets_in_counter_json(r#"{"nftables": []}"#), None);
        assert_eq!(packets_in_counter_json("table ip meshtun_overlay {"), None);
    }

    #[test]
    fn ruleset_uses_dnat_for_other_loopback_addresses() {
        let text = ruleset(&overlay_only("127.0.0.9:15002")).expect("a valid overlay");
        assert!(
            text.contains("meta l4proto tcp dnat ip to 127.0.0.9:15002\n"),
            "{text}"
        );
    }

    #[test]
    fn ruleset_refuses_what_it_cannot_redirect_to() {
        assert!(matches!(
            ruleset(&overlay_only("127.0.0.1:0")),
            Err(OverlayError::NoPort(_))
        ));
        assert!(matches!(
            ruleset(&overlay_only("[::1]:15001")),
            Err(OverlayError::NotIpv4(_))
        ));
    }

    #[test]
    fn original_destination_is_read_in_network_byte_order() {
        let raw = nix::libc::sockaddr_in {
            sin_family: nix::libc::AF_INET as nix::libc::sa_family_t,
            sin_port: 29500u16.to_be(),
            sin_addr: nix::libc::in_addr {
                s_addr: u32::from(Ipv4Addr::new(100, 127, 0, 3)).to_be(),
            },
            sin_zero: [0; 8],
        };
        assert_eq!(
            socket_addr_v4(&raw),
            Some("100.127.0.3:29500".parse().expect("a test address"))
        );
        let other = nix::libc::sockaddr_in {
            sin_family: nix::libc::AF_INET6 as nix::libc::sa_family_t,
            ..raw
        };
        assert_eq!(socket_addr_v4(&other), None);
    }

    #[test]
    fn unknown_addresses_are_reported_once_a_minute() {
        let routes = Routes::new(HashMap::new());
        let start = Instant::now();
        let address = Ipv4Addr::new(100, 127, 0, 9);
        assert!(routes.report_unknown(address, start));
        assert!(!routes.report_unknown(address, start + Duration::from_secs(30)));
        assert!(routes.report_unknown(Ipv4Addr::new(100, 127, 0, 10), start));
        assert!(routes.report_unknown(address, start + UNKNOWN_LOG_INTERVAL));
    }

    #[test]
    fn privilege_errors_are_recognized() {
        use std::os::unix::process::ExitStatusExt as _;
        let failed = |stderr: &str| OverlayError::Failed {
            command: "ip link add meshtun0 type dummy".to_owned(),
            status: ExitStatus::from_raw(2 << 8),
            stderr: stderr.to_owned(),
        };
        assert!(failed("RTNETLINK answers: Operation not permitted").needs_privilege());
        assert!(failed("Error: Could not process rule: Operation not permitted").needs_privilege());
        assert!(!failed("Error: syntax error").needs_privilege());
    }
}
