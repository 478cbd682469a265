//! The systemd notify protocol (`sd_notify(3)`), spoken directly: one
//! datagram per state change to the socket named by `$NOTIFY_SOCKET`.
//!
//! Outside systemd there is no socket and every call is a no-op, so the
//! daemon runs the same way by hand, in containers and in tests. A failed
//! send is logged and otherwise ignored: systemd's own timeouts are the
//! backstop (a missing READY=1 fails the start, a missing WATCHDOG=1
//! restarts the service).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::warn;

/// Where to send notifications, if systemd asked for them.
#[derive(Debug)]
pub(crate) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring
    /// `$WATCHDOG_PID`, as systemd may set it for another process).
    pub(crate) fn from_env() -> Self {
        let target = match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) => match connect(&path) {
                Ok(target) => Some(target),
                Err(error) => {
                    warn!(socket = ?path, %error, "NOTIFY_SOCKET is set but unusable; systemd will not hear from meshtun");
                    None
                }
            },
            None => None,
        };
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// The watchdog interval systemd expects pings within, if enabled.
    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Every listener accepts: the service is up.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload started (SIGHUP). systemd wants the monotonic time with it
    /// to match the reload to this message.
    pub(crate) fn reloading(&self) {
        let message = match monotonic_usec() {
            Some(usec) => format!("RELOADING=1\nMONOTONIC_USEC={usec}"),
            None => "RELOADING=1".to_owned(),
        };
        self.send(&message);
    }

    /// The daemon is draining and will exit.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining open streams");
    }

    /// The health check passed.
    pub(crate) fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(error) = socket.send_to_addr(message.as_bytes(), addr) {
                warn!(%error, message, "cannot notify systemd");
            }
        }
    }
}

/// Opens an unbound datagram socket aimed at `path`; a leading `@` names
/// an abstract socket, as systemd uses.
fn connect(path: &std::ffi::OsStr) -> io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;

    let bytes = path.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(path)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or an @abstract name",
            ))
        }
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares against.
fn monotonic_usec() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let seconds = u64::try_from(now.tv_sec()).ok()?;
    let micros = u64::try_from(now.tv_nsec()).ok()? / 1000;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_refused() {
        assert!(connect(std::ffi::OsStr::new("relative/socket")).is_err());
        assert!(connect(std::ffi::OsStr::new("")).is_err());
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("meshtun-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            target: Some(connect(path.as_os_str()).unwrap()),
            watchdog: None,
        };
        notifier.ready("up");
        notifier.reloading();
        let mut buffer = [0u8; 256];
        let len = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..len], b"READY=1\nSTATUS=up");
        let len = receiver.recv(&mut buffer).unwrap();
        let text = std::str::from_utf8(&buffer[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
