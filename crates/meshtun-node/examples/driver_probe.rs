//! How much would a QUIC driver of meshtun's own save over quinn's?
//!
//! A measurement for the performance work, not part of the daemon. It moves
//! the same bulk transfer (one unidirectional stream, 64 KiB `Bytes`
//! chunks handed over without a copy) between two endpoints on loopback, at
//! 1472-byte packets (what a 1500-byte MTU allows), twice:
//!
//! - `quinn`: quinn's `Endpoint` and `Connection`, each endpoint on a
//!   `current_thread` runtime of its own thread, as a meshtun shard runs
//!   them: an endpoint task, a connection task and the application task,
//!   which wake one another, and at most 10 packets per `sendmsg`;
//! - `driver`: the same `quinn-proto` state machines driven by one loop per
//!   endpoint (also on a `current_thread` runtime of its own thread) that
//!   receives a batch, feeds the connection, moves stream data and sends
//!   up to `--segments` packets per `sendmsg` (44 by default, and at most:
//!   one `sendmsg` carries 64 KiB) through `quinn-udp`, with no task in
//!   between.
//!
//! Both use the same transport settings, TLS 1.3 and cipher (aws-lc-rs,
//! AES-128-GCM), so the difference is the driving alone. It prints, for
//! each round, throughput and the CPU time of the whole process per GiB.
//!
//! ```sh
//! cargo run --release -p meshtun-node --example driver_probe -- --gib 2 --rounds 3
//! ```

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit as UdpTransmit, UdpSockRef, UdpSocketState, BATCH_SIZE};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, ServerConfig, StreamEvent, StreamId, TransportConfig, VarInt,
};

/// A 1500-byte MTU less the IPv4 and UDP headers.
const PACKET: u16 = 1472;
/// The application's chunk.
const CHUNK: usize = 64 * 1024;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut gib = 2u64;
    let mut rounds = 3u32;
    let mut segments = 44usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--gib" => gib = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--segments" => segments = value()?.parse()?,
            other => return Err(format!("unknown argument {other}; see the file's doc").into()),
        }
    }
    if gib == 0 || rounds == 0 || segments == 0 {
        return Err("--gib, --rounds and --segments must be above 0".into());
    }
    let total = gib << 30;
    let (server, client) = tls()?;
    println!(
        "{total} bytes per transfer, {PACKET}-byte packets, the driver asks for up to {segments} per sendmsg (44 at most)"
    );
    println!("round  variant  Gbit/s  CPU s/GiB");
    for round in 1..=rounds {
        for variant in ["quinn", "driver"] {
            let cpu_before = process_cpu()?;
            let started = Instant::now();
            let received = match variant {
                "quinn" => with_quinn(&server, &client, total)?,
                _ => with_driver(&server, &client, total, segments)?,
            };
            let wall = started.elapsed();
            let cpu = process_cpu()? - cpu_before;
            if received != total {
                return Err(format!("{variant}: received {received} of {total} bytes").into());
            }
            let gib = total as f64 / f64::from(1u32 << 30);
            println!(
                "{round:>5}  {variant:<7}  {:>6.2}  {:>9.2}",
                total as f64 * 8.0 / wall.as_secs_f64() / 1e9,
                cpu.as_secs_f64() / gib
            );
        }
    }
    Ok(())
}

/// The CPU time (user and system) of this process so far.
fn process_cpu() -> Result<Duration, Error> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("unexpected /proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // after the state field, which is the first one here.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or("short /proc/self/stat")?
        .iter()
        .map(|field| field.parse::<u64>())
        .sum::<Result<_, _>>()?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// A self-signed certificate for "probe", and the configs that use it.
fn tls() -> Result<(ServerConfig, ClientConfig), Error> {
    let certified = rcgen::generate_simple_self_signed(vec!["probe".to_owned()])?;
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())?;
    let mut server = ServerConfig::with_single_cert(vec![cert.clone()], key)?;
    server.transport_config(Arc::new(transport()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client = ClientConfig::with_root_certificates(Arc::new(roots))?;
    client.transport_config(Arc::new(transport()));
    Ok((server, client))
}

/// Windows for a bulk transfer, and packets fixed at [`PACKET`] bytes.
fn transport() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(VarInt::from_u32(16 << 20))
        .receive_window(VarInt::from_u32(64 << 20))
        .send_window(32 << 20)
        .initial_mtu(PACKET)
        .mtu_discovery_config(None)
        .max_concurrent_uni_streams(VarInt::from_u32(1));
    transport
}

/// The socket buffers of both variants (the Linux default, about 200 KiB,
/// overflows under bursts of 44 packets).
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket on a loopback port, with [`SOCKET_BUFFER`]s.
fn udp_socket() -> Result<std::net::UdpSocket, Error> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A quinn endpoint on [`udp_socket`].
fn quinn_endpoint(server: Option<ServerConfig>) -> Result<quinn::Endpoint, Error> {
    Ok(quinn::Endpoint::new(
        EndpointConfig::default(),
        server,
        udp_socket()?,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// The chunk every write hands over.
fn chunk() -> Bytes {
    Bytes::from(vec![0x5au8; CHUNK])
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The transfer through quinn; returns the bytes the server read.
fn with_quinn(server: &ServerConfig, client: &ClientConfig, total: u64) -> Result<u64, Error> {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = server.clone();
    let receiver = std::thread::spawn(move || -> Result<u64, Error> {
        runtime()?.block_on(async move {
            let endpoint = quinn_endpoint(Some(server))?;
            addr_tx.send(endpoint.local_addr()?)?;
            let connection = endpoint.accept().await.ok_or("no connection")?.await?;
            let mut stream = connection.accept_uni().await?;
            let mut received = 0u64;
            while let Some(chunk) = stream.read_chunk(usize::MAX, true).await? {
                received += chunk.bytes.len() as u64;
            }
            connection.close(VarInt::from_u32(0), b"done");
            endpoint.wait_idle().await;
            Ok(received)
        })
    });
    let addr = addr_rx.recv()?;
    let client = client.clone();
    let sender = std::thread::spawn(move || -> Result<(), Error> {
        runtime()?.block_on(async move {
            let mut endpoint = quinn_endpoint(None)?;
            endpoint.set_default_client_config(client);
            let connection = endpoint.connect(addr, "probe")?.await?;
            let mut stream = connection.open_uni().await?;
            let data = chunk();
            let mut sent = 0u64;
            while sent < total {
                let length = (total - sent).min(CHUNK as u64) as usize;
                stream.write_chunk(data.slice(..length)).await?;
                sent += length as u64;
            }
            stream.finish()?;
            connection.closed().await;
            Ok(())
        })
    });
    sender.join().map_err(|_| "sender panicked")??;
    receiver.join().map_err(|_| "receiver panicked")?
}

/// The transfer through [`Driver`]s; returns the bytes the server read.
fn with_driver(
    server: &ServerConfig,
    client: &ClientConfig,
    total: u64,
    segments: usize,
) -> Result<u64, Error> {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = Arc::new(server.clone());
    let receiver = std::thread::spawn(move || -> Result<u64, Error> {
        runtime()?.block_on(async move {
            let mut driver = Driver::bind(Some(server), segments)?;
            addr_tx.send(driver.socket.local_addr()?)?;
            let mut role = Role::Receiver {
                stream: None,
                received: 0,
            };
            driver.run(&mut role).await?;
            match role {
                Role::Receiver { received, .. } => Ok(received),
                Role::Sender { .. } => Err("the receiver became a sender".into()),
            }
        })
    });
    let addr = addr_rx.recv()?;
    let client = client.clone();
    let sender = std::thread::spawn(move || -> Result<(), Error> {
        runtime()?.block_on(async move {
            let mut driver = Driver::bind(None, segments)?;
            driver.connect(client, addr)?;
            let mut role = Role::Sender {
                stream: None,
                data: chunk(),
                left: total,
            };
            driver.run(&mut role).await
        })
    });
    sender.join().map_err(|_| "sender panicked")??;
    receiver.join().map_err(|_| "receiver panicked")?
}

/// What the application does with the one connection.
enum Role {
    /// Opens a stream and writes `left` more bytes of `data`, then finishes.
    Sender {
        stream: Option<StreamId>,
        data: Bytes,
        left: u64,
    },
    /// Accepts the stream and reads it to its end, then closes.
    Receiver {
        stream: Option<StreamId>,
        received: u64,
    },
}

/// One endpoint and its one connection, driven by one loop.
struct Driver {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    endpoint: Endpoint,
    connection: Option<(ConnectionHandle, Connection)>,
    server: Option<Arc<ServerConfig>>,
    segments: usize,
    /// Received datagrams, `BATCH_SIZE` slots of 64 KiB.
    receive: Vec<u8>,
    /// One `poll_transmit`'s packets.
    transmit: Vec<u8>,
}

impl Driver {
    fn bind(server: Option<Arc<ServerConfig>>, segments: usize) -> Result<Self, Error> {
        let socket = udp_socket()?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // One `sendmsg` carries at most 64 KiB: 44 packets of 1472 bytes.
        let segments = segments
            .min(state.max_gso_segments())
            .min(usize::from(u16::MAX / PACKET))
            .max(1);
        // The most one receive can hold: GRO never coalesces past 64 KiB.
        let slot = 64 * 1024;
        let endpoint = Endpoint::new(
            Arc::new(EndpointConfig::default()),
            server.clone(),
            true,
            None,
        );
        Ok(Self {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            state,
            endpoint,
            connection: None,
            server,
            segments,
            receive: vec![0; slot * BATCH_SIZE],
            transmit: Vec::with_capacity(segments * usize::from(PACKET)),
        })
    }

    fn connect(&mut self, client: ClientConfig, addr: SocketAddr) -> Result<(), Error> {
        let connection = self
            .endpoint
            .connect(Instant::now(), client, addr, "probe")?;
        self.connection = Some(connection);
        Ok(())
    }

    /// Runs until the connection is closed.
    async fn run(&mut self, role: &mut Role) -> Result<(), Error> {
        loop {
            let now = Instant::now();
            self.receive_all(now)?;
            let Some((_, connection)) = self.connection.as_mut() else {
                // A receiver waiting for its connection.
                self.socket.readable().await?;
                continue;
            };
            if connection
                .poll_timeout()
                .is_some_and(|timeout| timeout <= now)
            {
                connection.handle_timeout(now);
            }
            let mut closed = false;
            while let Some(event) = connection.poll() {
                match event {
                    Event::ConnectionLost { .. } => closed = true,
                    Event::Stream(StreamEvent::Finished { .. }) => {
                        // The receiver has everything: close and be done.
                        connection.close(now, VarInt::from_u32(0), Bytes::from_static(b"done"));
                    }
                    _ => {}
                }
            }
            application(connection, role, now)?;
            self.exchange_endpoint_events();
            self.send_all(now).await?;
            let Some((_, connection)) = self.connection.as_mut() else {
                continue;
            };
            if closed || connection.is_drained() {
                return Ok(());
            }
            let timeout = connection.poll_timeout();
            let wait = async {
                match timeout {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Wait for packets or a timer. A sender with data left is
            // blocked here: its stream takes more once ACKs free its window.
            tokio::select! {
                result = self.socket.readable() => result?,
                () = wait => {}
            }
        }
    }

    /// Feeds every datagram waiting on the socket to the endpoint.
    fn receive_all(&mut self, now: Instant) -> Result<(), Error> {
        let slot = self.receive.len() / BATCH_SIZE;
        let mut metas = [RecvMeta::default(); BATCH_SIZE];
        let mut response = Vec::new();
        loop {
            let mut slices: Vec<IoSliceMut<'_>> =
                self.receive.chunks_mut(slot).map(IoSliceMut::new).collect();
            let count = match self.socket.try_io(tokio::io::Interest::READABLE, || {
                self.state
                    .recv(UdpSockRef::from(&self.socket), &mut slices, &mut metas)
            }) {
                Ok(count) => count,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => return Err(error.into()),
            };
            drop(slices);
            for (meta, buffer) in metas.iter().zip(self.receive.chunks(slot)).take(count) {
                let data = &buffer[..meta.len];
                for datagram in data.chunks(meta.stride.max(1)) {
                    let ecn = meta
                        .ecn
                        .and_then(|ecn| quinn_proto::EcnCodepoint::from_bits(ecn as u8));
                    let event = self.endpoint.handle(
                        now,
                        meta.addr,
                        meta.dst_ip,
                        ecn,
                        BytesMut::from(datagram),
                        &mut response,
                    );
                    match event {
                        Some(DatagramEvent::ConnectionEvent(_, event)) => {
                            if let Some((_, connection)) = self.connection.as_mut() {
                                connection.handle_event(event);
                            }
                        }
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            if self.connection.is_none() {
                                let accepted = self.endpoint.accept(
                                    incoming,
                                    now,
                                    &mut response,
                                    self.server.clone(),
                                );
                                if let Ok(connection) = accepted {
                                    self.connection = Some(connection);
                                }
                            } else {
                                self.endpoint.ignore(incoming);
                            }
                        }
                        // A stateless answer (version negotiation, retry,
                        // reset); none is expected here.
                        Some(DatagramEvent::Response(_)) | None => {}
                    }
                }
            }
        }
    }

    /// Hands connection events to the endpoint and back.
    fn exchange_endpoint_events(&mut self) {
        let Some((handle, connection)) = self.connection.as_mut() else {
            return;
        };
        while let Some(event) = connection.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(*handle, event) {
                connection.handle_event(event);
            }
        }
    }

    /// Sends everything the connection has to send, `segments` packets per
    /// `sendmsg` at most.
    async fn send_all(&mut self, now: Instant) -> Result<(), Error> {
        let Some((_, connection)) = self.connection.as_mut() else {
            return Ok(());
        };
        loop {
            self.transmit.clear();
            let Some(transmit) = connection.poll_transmit(now, self.segments, &mut self.transmit)
            else {
                return Ok(());
            };
            let datagram = UdpTransmit {
                destination: transmit.destination,
                ecn: transmit
                    .ecn
                    .and_then(|ecn| quinn::udp::EcnCodepoint::from_bits(ecn as u8)),
                contents: &self.transmit[..transmit.size],
                segment_size: transmit.segment_size,
                src_ip: transmit.src_ip,
            };
            loop {
                let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                    self.state.send(UdpSockRef::from(&self.socket), &datagram)
                });
                match sent {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        self.socket.writable().await?;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
}

/// The application's turn: the sender writes what the stream takes, the
/// receiver reads what arrived.
fn application(connection: &mut Connection, role: &mut Role, now: Instant) -> Result<(), Error> {
    if connection.is_handshaking() {
        return Ok(());
    }
    match role {
        Role::Sender { stream, data, left } => {
            let id = match stream {
                Some(id) => *id,
                None => {
                    let Some(id) = connection.streams().open(Dir::Uni) else {
                        return Ok(());
                    };
                    *stream = Some(id);
                    id
                }
            };
            let mut send = connection.send_stream(id);
            while *left > 0 {
                let length = (*left).min(CHUNK as u64) as usize;
                let mut chunks = [data.slice(..length)];
                match send.write_chunks(&mut chunks) {
                    Ok(written) if written.bytes > 0 => *left -= written.bytes as u64,
                    Ok(_) | Err(quinn_proto::WriteError::Blocked) => break,
                    Err(error) => return Err(error.into()),
                }
            }
            if *left == 0 {
                // Repeated finishes after the first are refused; fine.
                let _ = send.finish();
            }
        }
        Role::Receiver { stream, received } => {
            if stream.is_none() {
                *stream = connection.streams().accept(Dir::Uni);
            }
            let Some(id) = *stream else {
                return Ok(());
            };
            let mut receive = connection.recv_stream(id);
            let Ok(mut chunks) = receive.read(true) else {
                return Ok(());
            };
            let mut finished = false;
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => *received += chunk.bytes.len() as u64,
                    Ok(None) => {
                        finished = true;
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(error) => return Err(error.into()),
                }
            }
            let _ = chunks.finalize();
            if finished {
                connection.close(now, VarInt::from_u32(0), Bytes::from_static(b"done"));
            }
        }
    }
    Ok(())
}
