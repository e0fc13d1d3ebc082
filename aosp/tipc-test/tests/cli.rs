//! The command itself: exit status, the closing line, the benchmark JSON.

use std::process::Command;

fn tipc_test(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tipc-test")).args(args).output().expect("run tipc-test");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn all_tests_pass_and_end_with_the_summary_line() {
    for dev in ["sim", "sim-threaded"] {
        let (code, out, err) = tipc_test(&["-D", dev, "-t", "all", "-s"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(out.lines().last(), Some("13 passed, 0 failed"), "{out}");
    }
}

#[test]
fn benchmark_prints_json() {
    let (code, out, err) = tipc_test(&["-B", "10", "-t", "echo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_start().starts_with('{'), "{out}");
    for key in ["\"min\"", "\"max\"", "\"avg\"", "\"cold\""] {
        assert!(out.contains(key), "{out}");
    }
}

#[test]
fn bad_arguments_fail_clearly() {
    let (code, _, err) = tipc_test(&["-t", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("unrecognized test name 'nope'"), "{err}");
    let (code, _, err) = tipc_test(&["-t", "send-fd"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot run here"), "{err}");
    let (code, _, err) = tipc_test(&[]);
    assert_ne!(code, 0);
    assert!(err.contains("need a test"), "{err}");
    let (code, _, err) = tipc_test(&["-D", "bogus", "-t", "echo"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown device"), "{err}");
}
