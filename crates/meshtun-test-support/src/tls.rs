//! TLS handshakes in memory, for tests of rustls configurations: no
//! network, and no clock but rustls's.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Which end failed the handshake, and how.
#[derive(Debug)]
pub enum Failure {
    /// The client refused (the server's certificate, say).
    Client(rustls::Error),
    /// The server refused.
    Server(rustls::Error),
}

impl Failure {
    /// The error, whichever end raised it.
    pub fn error(self) -> rustls::Error {
        match self {
            Failure::Client(error) | Failure::Server(error) => error,
        }
    }
}

/// Moves every pending TLS byte from `from` to `to` and lets `to` process it.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).expect("write TLS to memory");
    }
    let mut input = &bytes[..];
    while !input.is_empty() {
        to.read_tls(&mut input).expect("read TLS from memory");
        to.process_new_packets()?;
    }
    Ok(())
}

/// Runs a handshake in memory between `client` (sending `server_name`)
/// and `server`.
pub fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), Failure> {
    let name = ServerName::try_from(server_name.to_string()).expect("a server name");
    let mut client = Connection::Client(
        ClientConnection::new(Arc::new(client), name).expect("a client connection"),
    );
    let mut server =
        Connection::Server(ServerConnection::new(Arc::new(server)).expect("a server connection"));
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        transfer(&mut client, &mut server).map_err(Failure::Server)?;
        transfer(&mut server, &mut client).map_err(Failure::Client)?;
    }
    assert!(
        !client.is_handshaking() && !server.is_handshaking(),
        "handshake stalled"
    );
    match (client, server) {
        (Connection::Client(client), Connection::Server(server)) => Ok((client, server)),
        _ => unreachable!("the sides were built above"),
    }
}
