//! ipcd-bench as a command: its output piped into a reader that goes away.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// `ipcd-bench | head -1`: the bench ends quietly with status 141 (as a C program killed by
/// SIGPIPE), without a panic, and leaves no working directory behind.
#[test]
fn a_reader_that_goes_away_ends_the_bench_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipcd-bench"))
        .args(["-n", "200", "-s", "16"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ipcd-bench");
    let pid = child.id();
    let mut first = String::new();
    {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
        reader.read_line(&mut first).expect("a first line");
    } // the reader goes away here
    let out = child.wait_with_output().expect("wait for ipcd-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("echo round trip, 16 bytes"), "{first}");
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let dir = std::env::temp_dir().join(format!("ipcd-bench-{pid}"));
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
