//! AFL++ entry point of the `identity` target (see meshtun-fuzz).
fn main() {
    afl::fuzz!(|data: &[u8]| meshtun_fuzz::identity(data));
}
