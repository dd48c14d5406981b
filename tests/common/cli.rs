//! Running the `ecq` command line from integration tests (included with `#[path]`).

use std::process::{Command, Output};

const ECQ: &str = env!("CARGO_BIN_EXE_ecq");

/// Runs `ecq` with `args` and waits for it.
pub fn ecq(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(ECQ);
    for a in args {
        c.arg(a);
    }
    c.output().expect("run ecq")
}

/// `b` as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
