//! AFL++ entry point of the `config` target (see meshtun-fuzz).
fn main() {
    afl::fuzz!(|data: &[u8]| meshtun_fuzz::config(data));
}
