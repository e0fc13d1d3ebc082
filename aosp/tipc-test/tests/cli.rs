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

#[test]
fn every_platform_with_a_path_prints_its_sharing_line_and_passes_all() {
    let profiles = [
        ("native-api4", "sharing: phys-attr ("),
        ("native-api5", "sharing: ffa-handle ("),
        ("xen-dom0", "sharing: phys-attr ("),
        ("xen-domu-direct-mapped", "sharing: phys-attr ("),
        ("xen-domu-ffa-mediator", "sharing: ffa-handle ("),
        ("xen-domu-trusty-mediator", "sharing: mediated-ipa ("),
        ("xen-domu-trusty-vm", "sharing: xen-grant to domain 1 ("),
    ];
    let runs: Vec<_> = profiles
        .iter()
        .map(|&(p, line)| std::thread::spawn(move || (p, line, tipc_test(&["--platform", p, "-t", "all", "-s"]))))
        .collect();
    for r in runs {
        let (p, line, (code, out, err)) = r.join().unwrap();
        assert_eq!(code, 0, "{p}: {out}\n{err}");
        assert!(out.lines().next().is_some_and(|l| l.starts_with(line)), "{p}: {out}");
        assert_eq!(out.lines().last(), Some("13 passed, 0 failed"), "{p}: {out}");
    }
}

#[test]
fn no_path_exits_nonzero_naming_what_is_missing() {
    let (code, out, err) = tipc_test(&["--platform", "xen-domu-no-path", "-t", "all"]);
    assert_ne!(code, 0);
    assert!(err.contains("missing a path to Trusty"), "{err}");
    assert!(!out.contains("PASS") && !out.contains("FAIL"), "no test may run: {out}");
}

#[test]
fn forced_wrong_sharing_reports_the_fault() {
    for (platform, mech, fault) in [
        ("xen-domu-ffa-mediator", "phys", "not the normal world's RAM"),
        ("xen-domu-trusty-vm", "phys", "not a grant reference"),
    ] {
        let (code, out, err) = tipc_test(&["--platform", platform, "--force-sharing", mech, "-t", "all"]);
        assert_ne!(code, 0);
        assert!(out.starts_with(&format!("sharing: {mech} (forced")), "{out}");
        assert!(err.contains("secure-side fault") && err.contains(fault), "{err}");
    }
}

#[test]
fn a_written_dtb_reproduces_its_profile() {
    let dir = std::env::temp_dir().join(format!("tipc-test-dtb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dtb = dir.join("ffa.dtb");
    let (code, _, err) = tipc_test(&["--platform", "xen-domu-ffa-mediator", "--write-dtb", dtb.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = tipc_test(&["--platform", dtb.to_str().unwrap(), "-t", "echo", "-s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("sharing: ffa-handle ("), "{out}");
    let _ = std::fs::remove_dir_all(dir);
    let (code, _, err) = tipc_test(&["--platform", "nope", "-t", "echo"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown platform 'nope'"), "{err}");
}
