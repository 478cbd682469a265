//! The node's QUIC endpoints: their UDP sockets, transport tuning and TLS.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use meshtun_config::Quic;
use meshtun_pki::{NodeCredentials, TrustBundle};
use meshtun_proto::NodeName;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use crate::cid::KeyedCidGenerator;
use crate::NodeError;

/// The error for a socket of the QUIC endpoint that cannot be set up.
fn bind_error(addr: SocketAddr) -> impl Fn(std::io::Error) -> NodeError {
    move |source| NodeError::Bind {
        what: "QUIC endpoint (quic.listen)",
        addr,
        source,
    }
}

/// Binds the UDP sockets the shards accept on: with one shard, one socket
/// on `quic.listen`; with more, one per shard, all on `quic.listen` in one
/// `SO_REUSEPORT` group (see shard.rs).
///
/// `SO_REUSEPORT` would also let a second meshtun on the same port (a stale
/// process, a copy started by hand) join the group without an error and
/// take part of the traffic. So the address is first bound alone, which
/// fails while anything else holds it; that also turns port 0 into the
/// real port the group then shares.
pub(crate) fn bind_listen_group(quic: &Quic, count: usize) -> Result<Vec<UdpSocket>, NodeError> {
    let requested = quic.listen;
    if count <= 1 {
        return Ok(vec![bind_udp(quic, requested, false, true)?]);
    }
    let addr = {
        let probe = bind_udp(quic, requested, false, false)?;
        probe.local_addr().map_err(bind_error(requested))?
    };
    (0..count)
        .map(|index| bind_udp(quic, addr, true, index == 0))
        .collect()
}

/// Binds the socket one shard dials from: an ephemeral port on the
/// `quic.listen` address (see shard.rs).
pub(crate) fn bind_dial(quic: &Quic) -> Result<UdpSocket, NodeError> {
    let addr = SocketAddr::new(quic.listen.ip(), 0);
    bind_udp(quic, addr, false, false).map_err(|error| match error {
        NodeError::Bind { source, .. } => NodeError::Bind {
            what: "a shard's QUIC dial socket (quic.listen's address, any port)",
            addr,
            source,
        },
        other => other,
    })
}

/// Binds one UDP socket with the configured buffer sizes; `warn_caps` logs
/// a buffer the kernel capped (once per node, not once per socket).
///
/// Large buffers let the kernel absorb bursts at high rates instead of
/// dropping datagrams (which QUIC then treats as congestion). Linux caps the
/// request at `net.core.rmem_max` / `wmem_max`; a shortfall is logged with the
/// sysctl to raise.
fn bind_udp(
    quic: &Quic,
    addr: SocketAddr,
    reuse_port: bool,
    warn_caps: bool,
) -> Result<UdpSocket, NodeError> {
    let bind_error = bind_error(quic.listen);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(&bind_error)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(&bind_error)?;
    }
    if let Err(error) = socket.set_recv_buffer_size(quic.udp_recv_buffer) {
        warn!(%error, "cannot set UDP receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(quic.udp_send_buffer) {
        warn!(%error, "cannot set UDP send buffer");
    }
    // Linux grants min(request, net.core.*mem_max) and reports twice what it
    // granted (the kernel's bookkeeping overhead), so a full grant reads back
    // as at least twice the request; anything less means the cap applied.
    if let Ok(got) = socket.recv_buffer_size() {
        if warn_caps && got < quic.udp_recv_buffer.saturating_mul(2) {
            warn!(
                requested = quic.udp_recv_buffer,
                granted = got / 2,
                "UDP receive buffer capped by the kernel; raise net.core.rmem_max (see examples/systemd/README.md)"
            );
        }
    }
    if let Ok(got) = socket.send_buffer_size() {
        if warn_caps && got < quic.udp_send_buffer.saturating_mul(2) {
            warn!(
                requested = quic.udp_send_buffer,
                granted = got / 2,
                "UDP send buffer capped by the kernel; raise net.core.wmem_max (see examples/systemd/README.md)"
            );
        }
    }
    socket.bind(&addr.into()).map_err(&bind_error)?;
    Ok(socket.into())
}

/// Largest UDP payload MTU discovery probes for, and the largest this node
/// accepts (`max_udp_payload_size`): what a 9000-byte link carries over
/// IPv6 (9000 - 40 - 8), and 20 bytes short of it over IPv4.
///
/// quinn's defaults stop at 1452/1472 bytes, which on a jumbo-frame link (or
/// loopback) wastes most of the path: the cost of a QUIC transfer is mostly
/// per packet (framing, AEAD setup, ACK bookkeeping, one GSO segment each),
/// so jumbo packets cut the CPU per gigabyte by half or more there. On a
/// 1500-byte path the larger probes are simply lost (probes never count as
/// congestion) and packets settle at 1466 bytes (the binary search's last
/// step below the 1472 that fits). quinn 0.11 sends GSO batches of up to 10
/// segments, and 10 x 8952 bytes overflow what one `sendmsg` takes; the
/// endpoints' socket splits such batches ([`crate::gso`]), without which
/// every batch failed and black-hole detection dropped the MTU to 1200.
const MAX_UDP_PAYLOAD: u16 = 8952;

/// Packets acknowledged after a missing one before it counts as lost: high
/// enough that only the time threshold decides (see `transport`).
const REORDER_PACKET_THRESHOLD: u32 = 100_000;
/// RTTs after which an unacknowledged packet counts as lost.
const REORDER_TIME_THRESHOLD: f32 = 4.0;

/// Transport parameters shared by both directions.
///
/// Windows are sized for the bandwidth-delay product the config names (the
/// defaults cover 25 Gbit/s at 1 ms). Keep-alive stays below the idle timeout
/// so a quiet but healthy connection never idles out, while a dead peer is
/// noticed within one idle timeout.
fn transport(quic: &Quic, accept_streams: bool) -> Result<TransportConfig, NodeError> {
    let mut transport = TransportConfig::default();
    let idle = IdleTimeout::try_from(quic.idle_timeout)
        .map_err(|_| NodeError::Quic("quic.idle_timeout is out of QUIC's range".to_owned()))?;
    let window = |value: u64, key: &str| {
        VarInt::from_u64(value).map_err(|_| NodeError::Quic(format!("quic.{key} is too large")))
    };
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(quic.keep_alive))
        .stream_receive_window(window(quic.stream_window, "stream_window")?)
        .receive_window(window(quic.connection_window, "connection_window")?)
        .send_window(quic.send_window)
        .datagram_receive_buffer_size(None);
    // Forwarded streams flow from the dialer to the acceptor only: a peer may
    // not open them on a connection this node dialled. The acceptor opens a
    // single unidirectional stream, its welcome, to the dialer.
    //
    // The acceptor grants no stream credit in the handshake: quinn sets up
    // state for every stream it allows as soon as a connection is accepted,
    // about 80 bytes each, and 16384 of them (1.3 MiB) for a client that
    // never proves who it is would let a handshake flood pin memory. The
    // credit (`quic.max_streams_per_peer`) is granted once the peer's
    // identity is checked (acceptor.rs, `serve_peer`).
    let (bidi, uni) = if accept_streams {
        (VarInt::from_u32(0), VarInt::from_u32(0))
    } else {
        (VarInt::from_u32(0), VarInt::from_u32(1))
    };
    transport
        .max_concurrent_bidi_streams(bidi)
        .max_concurrent_uni_streams(uni);
    // Loss detection that tolerates reordering. quinn's defaults (a packet
    // is lost once 3 later ones are acknowledged, or after 9/8 of an RTT)
    // read a reordering path (20 ms +- 5 ms jitter in the lab) as constant
    // loss; quinn 0.11 never undoes a spurious loss, so the window collapsed
    // to a few KB and throughput to ~0.1 MiB/s. Declaring loss by time only,
    // after 4 RTTs, keeps the window open there (2.5-4.7 MiB/s each way,
    // limited by quinn's own ACK handling) and also helped plain random loss
    // (5% loss: 3.9 -> 7.6 MiB/s). The price is slower detection of real
    // loss: 4 RTTs, which is 0.4 ms on a 100 us data-centre path.
    transport
        .packet_threshold(REORDER_PACKET_THRESHOLD)
        .time_threshold(REORDER_TIME_THRESHOLD);
    // Left at quinn's defaults, on purpose:
    // - Segmentation offload (GSO) on send and GRO on receive: quinn batches
    //   up to 10 packets per transmit, which the socket (gso.rs) joins
    //   into calls of up to 64 KiB (or splits above 6,550-byte packets),
    //   and on the lab's veth links a `recvmmsg` returns a call's packets
    //   as one buffer.
    // - No ACK frequency extension: asking the peer to acknowledge every
    //   10th packet (within 2 ms) cost as much CPU per GiB as quinn's
    //   ACK-every-other-packet (7.0-7.9 against 6.5-7.9 s/GiB over both
    //   daemons in one A/B, one iperf3 stream at MTU 1500 in the lab):
    //   quinn already acknowledges at most once per batch of datagrams it
    //   processes, so there was little to save.
    // - Congestion control: CUBIC. BBR, tried earlier, did not raise
    //   throughput in the lab.
    let mut mtu_discovery = MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu_discovery));
    Ok(transport)
}

/// The stateless-reset key, derived from the node's private key: a restarted
/// daemon answers packets of its previous incarnation's connections with
/// reset tokens the peer accepts, so the peer re-dials at once instead of
/// waiting out the idle timeout.
pub(crate) fn endpoint_config(credentials: &NodeCredentials) -> EndpointConfig {
    let secret = credentials.stateless_reset_secret();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    let mut config = EndpointConfig::new(Arc::new(key));
    // The reset is only sent for connection IDs the new process recognizes.
    let generator = KeyedCidGenerator::new(&secret);
    config.cid_generator(move || Box::new(generator.clone()));
    // Within QUIC's range (1200..=65527), so this cannot fail.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    config
}

/// Server side: every client must present a cluster certificate.
pub(crate) fn server_config(
    quic: &Quic,
    trust: &TrustBundle,
    credentials: &NodeCredentials,
) -> Result<quinn::ServerConfig, NodeError> {
    let tls = meshtun_pki::server_config(trust, credentials)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|error| {
        NodeError::Quic(format!("TLS server config unusable for QUIC: {error}"))
    })?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport(quic, true)?));
    Ok(server)
}

/// Client side for one peer: the server must prove it is `peer`.
pub(crate) fn client_config(
    quic: &Quic,
    trust: &TrustBundle,
    credentials: &NodeCredentials,
    peer: &NodeName,
) -> Result<quinn::ClientConfig, NodeError> {
    let tls = meshtun_pki::client_config(trust, credentials, peer)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|error| {
        NodeError::Quic(format!("TLS client config unusable for QUIC: {error}"))
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport(quic, false)?));
    Ok(client)
}

/// The address the endpoint actually bound (port 0 resolved).
pub(crate) fn local_addr(
    endpoint: &quinn::Endpoint,
    requested: SocketAddr,
) -> Result<SocketAddr, NodeError> {
    endpoint.local_addr().map_err(|source| NodeError::Bind {
        what: "QUIC endpoint (quic.listen)",
        addr: requested,
        source,
    })
}
