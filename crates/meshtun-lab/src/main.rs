//! `meshtun-lab`: the lab for humans.
//!
//! ```text
//! meshtun-lab up [HOST..]        hosts (default node-a node-b node-c) with PKI and configs
//! meshtun-lab exec HOST CMD..    run a command inside a host
//! meshtun-lab down               remove the lab, its namespaces and processes
//! ```
//! `up` writes a config per host (every host peers with every other,
//! exposes `echo` -> 127.0.0.1:7000 to all, and forwards 127.0.0.1:71NN to
//! each peer's `echo`), but starts nothing: run the daemons with
//! `meshtun-lab exec node-a meshtun run -c <dir>/node-a.toml`.

use std::net::SocketAddr;
use std::process::ExitCode;

use meshtun_lab::{remove_lab, Lab, NAMESPACE_PREFIX};

/// The namespace prefix of the human lab (no process id: the sweep keeps it).
fn lab_id() -> String {
    format!("{NAMESPACE_PREFIX}up")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => up(&args[1..]),
        Some("down") => {
            let removed = remove_lab(&lab_id());
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(lab_id()));
            println!("removed {removed} namespace(s)");
            ExitCode::SUCCESS
        }
        Some("exec") if args.len() >= 3 => exec(&args[1], &args[2..]),
        _ => {
            eprintln!(
                "usage: meshtun-lab up [HOST..] | exec HOST CMD.. | down\n\
                 (the side-by-side benchmark is `meshtun-bench`)"
            );
            ExitCode::from(64)
        }
    }
}

fn up(names: &[String]) -> ExitCode {
    let defaults = ["node-a", "node-b", "node-c"].map(String::from);
    let names = if names.is_empty() {
        &defaults[..]
    } else {
        names
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if !meshtun_lab::lab_namespaces()
        .iter()
        .all(|ns| !ns.starts_with(&lab_id()))
    {
        eprintln!("a lab is already up; run `meshtun-lab down` first");
        return ExitCode::from(1);
    }
    let lab = match Lab::with_id(lab_id(), &names) {
        Ok(lab) => lab,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(1);
        }
    };
    let echo: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7000));
    for (index, host) in lab.hosts().iter().enumerate() {
        let mut config = lab.config(index).expose("echo", echo, &["*"]);
        for (other_index, other) in lab.hosts().iter().enumerate() {
            if other_index != index {
                let port = 7100 + u16::try_from(other_index).unwrap_or(0);
                config = config.peer(other).forward(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    &other.name,
                    "echo",
                );
            }
        }
        let path = lab.dir.join(format!("{}.toml", host.name));
        if let Err(error) = std::fs::write(&path, config.to_toml()) {
            eprintln!("error: writing {}: {error}", path.display());
            return ExitCode::from(1);
        }
        println!(
            "{}  {}  namespace {}  config {}",
            host.name,
            host.addr,
            host.namespace,
            path.display()
        );
    }
    let hosts: String = lab
        .hosts()
        .iter()
        .map(|host| format!("{} {}\n", host.name, host.namespace))
        .collect();
    if let Err(error) = std::fs::write(lab.dir.join("hosts"), hosts) {
        eprintln!("error: writing the host list: {error}");
        return ExitCode::from(1);
    }
    println!("meshtun binary: {}", lab.binary().display());
    lab.persist();
    ExitCode::SUCCESS
}

fn exec(host: &str, command: &[String]) -> ExitCode {
    let hosts_file = std::env::temp_dir().join(lab_id()).join("hosts");
    let listing = std::fs::read_to_string(&hosts_file).unwrap_or_default();
    let namespace = listing.lines().find_map(|line| {
        let (name, namespace) = line.split_once(' ')?;
        (name == host).then(|| namespace.to_owned())
    });
    let Some(namespace) = namespace else {
        eprintln!(
            "no host {host:?} in the lab (is it up? see {})",
            hosts_file.display()
        );
        return ExitCode::from(64);
    };
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &namespace])
        .args(command)
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}
