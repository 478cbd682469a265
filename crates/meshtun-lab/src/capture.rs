//! Packet captures on a host's wire interface (tcpdump).
//!
//! A [`Capture`] runs `tcpdump` inside one host, writing every frame of the
//! host's wire interface, whole (`-s 0`), to a pcap file. [`Capture::start`]
//! returns only once tcpdump says it is listening, so nothing sent after it
//! returns is missed; [`Capture::stop`] lets tcpdump write what it already
//! holds, stops it and parses the file with [`crate::pcap`]. Dropping a
//! capture that was not stopped kills tcpdump.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::{pcap, Host, LabError};

/// How long tcpdump may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long tcpdump may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Before stopping, the file must stop growing for this long ...
const SETTLE_QUIET: Duration = Duration::from_millis(250);
/// ... but the wait for that ends after this long (QUIC keep-alives may
/// never let a busy interface go quiet).
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// Kernel buffer for tcpdump, in KiB (`-B`): a 64 MiB transfer on a shared
/// machine must not overrun it while tcpdump waits for a core.
const BUFFER_KIB: &str = "65536";
const POLL: Duration = Duration::from_millis(20);

/// What tcpdump's stderr reader tells the capture.
#[derive(Debug)]
enum Event {
    Listening,
    Closed,
}

/// A running tcpdump on one host's wire interface.
#[derive(Debug)]
pub struct Capture {
    host: String,
    path: PathBuf,
    child: Option<Child>,
    /// Everything tcpdump printed on stderr so far.
    stderr: Arc<Mutex<String>>,
    events: mpsc::Receiver<Event>,
}

/// tcpdump's own account of a finished capture (its exit summary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// "N packets captured": frames written to the file.
    pub captured: Option<u64>,
    /// "N packets received by filter".
    pub received: Option<u64>,
    /// "N packets dropped by kernel": frames the capture missed because
    /// tcpdump fell behind. Non-zero means the file is not the whole wire.
    pub dropped_by_kernel: Option<u64>,
    /// Size of the pcap file in bytes.
    pub file_bytes: u64,
}

impl Capture {
    /// Starts capturing `host`'s wire interface into `dir/<name>.pcap`, and
    /// returns once tcpdump is listening (at most 5 s).
    pub fn start(host: &Host, dir: &Path, name: &str) -> Result<Capture, LabError> {
        let path = dir.join(format!("{name}.pcap"));
        let mut command = host.command("tcpdump");
        command
            .args([
                "-i",
                host.interface,
                "-n",
                "-s",
                "0",
                "-U",
                "--immediate-mode",
            ])
            .args(["-B", BUFFER_KIB])
            // Keep root: the file stays writable and removable by the lab.
            .args(["-Z", "root", "-w"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let line = format!("{command:?}");
        let mut child = command
            .spawn()
            .map_err(|error| LabError::Io(format!("starting {line}"), error))?;
        let stderr_pipe = child.stderr.take();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (events_tx, events) = mpsc::channel();
        let mut capture = Capture {
            host: host.name.clone(),
            path,
            child: Some(child),
            stderr: stderr.clone(),
            events,
        };
        let Some(pipe) = stderr_pipe else {
            return Err(capture.failure(&line, "its stderr was not piped"));
        };
        std::thread::Builder::new()
            .name(format!("tcpdump-{}", host.name))
            .spawn(move || read_stderr(pipe, &stderr, &events_tx))
            .map_err(|error| LabError::Io("starting the tcpdump reader".into(), error))?;
        match capture.events.recv_timeout(START_TIMEOUT) {
            Ok(Event::Listening) => Ok(capture),
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(capture.failure(&line, "it exited before listening"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(capture.failure(
                &line,
                &format!("it did not say \"listening on\" within {START_TIMEOUT:?}"),
            )),
        }
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the capture and parses what it recorded.
    pub fn stop(self) -> Result<pcap::Capture, LabError> {
        self.stop_with_stats().map(|(capture, _)| capture)
    }

    /// Stops the capture: waits (at most 3 s) for the file to stop growing
    /// so frames tcpdump already holds reach it, sends SIGTERM, waits (at
    /// most 5 s) for tcpdump to exit, and parses the file. Also returns
    /// tcpdump's own summary, which says whether the kernel dropped frames.
    pub fn stop_with_stats(mut self) -> Result<(pcap::Capture, Stats), LabError> {
        self.settle();
        let line = format!("tcpdump on {}", self.host);
        let Some(mut child) = self.child.take() else {
            return Err(self.failure(&line, "it was already stopped"));
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.failure(
                        &line,
                        &format!("it did not exit within {STOP_TIMEOUT:?} of SIGTERM"),
                    ));
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(LabError::Io(format!("waiting for {line}"), error));
                }
            }
        };
        // The summary is printed just before exit; wait for the pipe to close.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if matches!(event, Event::Closed) {
                break;
            }
        }
        let stderr = self.stderr_text();
        // tcpdump exits 0 on SIGTERM; a signal death or error code is a
        // failed capture.
        if !status.success() {
            return Err(LabError::Command {
                command: line,
                status: status.to_string(),
                stderr,
            });
        }
        let capture = pcap::read(&self.path).map_err(|error| {
            LabError::Io(format!("reading capture {}", self.path.display()), error)
        })?;
        let stats = Stats {
            captured: summary_count(&stderr, "packets captured"),
            received: summary_count(&stderr, "packets received by filter"),
            dropped_by_kernel: summary_count(&stderr, "packets dropped by kernel"),
            file_bytes: file_len(&self.path),
        };
        Ok((capture, stats))
    }

    /// Waits until the file has not grown for [`SETTLE_QUIET`], at most
    /// [`SETTLE_LIMIT`].
    fn settle(&self) {
        let start = Instant::now();
        let mut len = file_len(&self.path);
        let mut quiet_since = Instant::now();
        while start.elapsed() < SETTLE_LIMIT && quiet_since.elapsed() < SETTLE_QUIET {
            std::thread::sleep(POLL);
            let now = file_len(&self.path);
            if now != len {
                len = now;
                quiet_since = Instant::now();
            }
        }
    }

    fn stderr_text(&self) -> String {
        match self.stderr.lock() {
            Ok(text) => text.trim().to_owned(),
            Err(poisoned) => poisoned.into_inner().trim().to_owned(),
        }
    }

    /// Kills tcpdump (if running) and describes why the capture failed.
    fn failure(&mut self, command: &str, reason: &str) -> LabError {
        let status = match self.child.take() {
            Some(mut child) => {
                let _ = child.kill();
                match child.wait() {
                    Ok(status) => format!("{reason}; {status}"),
                    Err(_) => reason.to_owned(),
                }
            }
            None => reason.to_owned(),
        };
        LabError::Command {
            command: command.to_owned(),
            status,
            stderr: self.stderr_text(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Collects tcpdump's stderr, reporting the "listening on" line and the
/// pipe's end.
fn read_stderr(
    pipe: std::process::ChildStderr,
    text: &Mutex<String>,
    events: &mpsc::Sender<Event>,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Ok(mut all) = text.lock() {
                    all.push_str(&line);
                }
                if line.contains("listening on") {
                    let _ = events.send(Event::Listening);
                }
            }
        }
    }
    let _ = events.send(Event::Closed);
}

/// The number in a summary line such as "12 packets captured".
fn summary_count(stderr: &str, suffix: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|line| line.trim().strip_suffix(suffix))
        .and_then(|count| count.trim().parse().ok())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcpdump_summary() {
        let stderr = "tcpdump: listening on eth0, link-type EN10MB (Ethernet), snapshot length 262144 bytes\n\
                      51234 packets captured\n51240 packets received by filter\n6 packets dropped by kernel\n";
        assert_eq!(summary_count(stderr, "packets captured"), Some(51234));
        assert_eq!(
            summary_count(stderr, "packets received by filter"),
            Some(51240)
        );
        assert_eq!(summary_count(stderr, "packets dropped by kernel"), Some(6));
        assert_eq!(summary_count("", "packets captured"), None);
    }
}
