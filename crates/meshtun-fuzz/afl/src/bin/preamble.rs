//! AFL++ entry point of the `preamble` target (see meshtun-fuzz).
fn main() {
    afl::fuzz!(|data: &[u8]| meshtun_fuzz::preamble(data));
}
