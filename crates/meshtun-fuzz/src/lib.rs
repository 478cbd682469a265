//! meshtun's fuzz targets, one plain function per target.
//!
//! Each function feeds arbitrary bytes to a real parser of meshtun's and
//! checks properties that must hold for every input (a decoded value
//! re-encodes to the bytes it came from, a short input asks for at least one
//! more byte, a refusal never carries a secret, ...). A violated property
//! panics: that is how a fuzzer sees it as a crash.
//!
//! The functions are called by the AFL binaries in `afl/` (a separate crate,
//! built with `cargo afl` by `.ci/fuzz`) and by `tests/corpus.rs`, which runs
//! every seed in `corpus/<target>/` and every kept crash in
//! `regressions/<target>/` on each test run.
//!
//! | target       | what it reads                                              |
//! |--------------|------------------------------------------------------------|
//! | `preamble`   | the stream preamble an acceptor reads from a peer          |
//! | `status`     | the status an opener reads back                            |
//! | `config`     | a config file's text                                       |
//! | `identity`   | a peer's certificate (DER)                                 |
//! | `enrollment` | an enrollment frame: the server's request path and the     |
//! |              | joining node's response path                               |

mod config;
mod enrollment;
mod identity;
mod proto;

pub use config::config;
pub use enrollment::{enrollment, ENROLL_CLUSTER, ENROLL_NODE, ENROLL_TOKEN};
pub use identity::identity;
pub use proto::{preamble, status};

/// A fuzz target: takes any bytes, panics only when a property is violated.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory, for the corpus test
/// and `.ci/fuzz`.
pub const TARGETS: [(&str, Target); 5] = [
    ("preamble", preamble),
    ("status", status),
    ("config", config),
    ("identity", identity),
    ("enrollment", enrollment),
];

/// Reports a violated property.
// A fuzzer learns of a violated property only through a crash, so this is
// the one place that panics on purpose.
#[allow(clippy::panic)]
#[track_caller]
pub(crate) fn violated(what: std::fmt::Arguments<'_>) -> ! {
    panic!("fuzz property violated: {what}")
}

/// `check!(condition, "format", args..)`: the property `condition` must hold.
macro_rules! check {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            $crate::violated(format_args!($($message)+))
        }
    };
}
pub(crate) use check;
