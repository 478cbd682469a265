//! `meshtun-lab`: the lab for humans. Not built yet beyond this stub.
fn main() {
    eprintln!("meshtun-lab: the human CLI (up/down/exec) is not built yet; the lab is used from `cargo test`");
    std::process::exit(64);
}
