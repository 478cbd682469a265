//! AFL++ entry point of the `status` target (see meshtun-fuzz).
fn main() {
    afl::fuzz!(|data: &[u8]| meshtun_fuzz::status(data));
}
