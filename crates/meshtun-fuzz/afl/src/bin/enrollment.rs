//! AFL++ entry point of the `enrollment` target (see meshtun-fuzz).
fn main() {
    afl::fuzz!(|data: &[u8]| meshtun_fuzz::enrollment(data));
}
