//! The command itself: exit status, the closing line, the benchmark JSON.

use std::process::Command;

fn tipc_test(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tipc-test")).args(args).output().expect("run tipc-test");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn all_tests_pass_and_end_with_the_summary_line() {
    for dev in ["sim", "sim-threaded", "sim-cores"] {
        let (code, out, err) = tipc_test(&["-D", dev, "-t", "all", "-s"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(out.lines().last(), Some("15 passed, 0 failed"), "{out}");
    }
}

/// The two cases the model gained: send-fd against the memref receiver (a memfd, shared by the
/// platform's mechanism) and ta2ta-ipc against the TA-side unittest runner.
#[test]
fn send_fd_and_ta2ta_run_on_the_model() {
    for test in ["send-fd", "ta2ta-ipc"] {
        for dev in ["sim", "sim-threaded", "sim-cores"] {
            let (code, out, err) = tipc_test(&["-D", dev, "-t", test]);
            assert_eq!(code, 0, "{test} on {dev}: {out}\n{err}");
            assert!(out.contains(&format!("PASS {test}")), "{out}");
            assert_eq!(out.lines().last(), Some("1 passed, 0 failed"), "{out}");
        }
    }
}

/// Trusty's closer1 closes every second channel at once, so a repeated closer1 meets a
/// connect that ends ENOTCONN; AOSP's closer1_test() goes on, and so must the port (one model
/// serves all the repeats, and in a guest one Trusty serves every client).
#[test]
fn closer1_repeated_goes_on_past_a_channel_closed_at_once() {
    for dev in ["sim", "sim-threaded"] {
        let (code, out, err) = tipc_test(&["-D", dev, "-t", "closer1", "-r", "4"]);
        assert_eq!(code, 0, "closer1 on {dev}: {out}\n{err}");
        assert_eq!(out.lines().last(), Some("1 passed, 0 failed"), "{out}");
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
    // Against the upstream model (the default) and NXP's variant.
    let runs: Vec<_> = ["upstream", "nxp"]
        .iter()
        .flat_map(|&m| profiles.iter().map(move |&(p, line)| (m, p, line)))
        .map(|(m, p, line)| std::thread::spawn(move || (p, line, tipc_test(&["--model", m, "--platform", p, "-t", "all", "-s"]))))
        .collect();
    for r in runs {
        let (p, line, (code, out, err)) = r.join().unwrap();
        assert_eq!(code, 0, "{p}: {out}\n{err}");
        assert!(out.lines().next().is_some_and(|l| l.starts_with(line)), "{p}: {out}");
        assert_eq!(out.lines().last(), Some("15 passed, 0 failed"), "{p}: {out}");
    }
}

#[test]
fn model_variant_is_chosen_by_name_and_shown() {
    let (code, out, err) = tipc_test(&["-t", "echo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(upstream variant)"), "upstream is the default: {out}");
    let (code, out, err) = tipc_test(&["--model", "nxp", "-t", "echo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(nxp variant)"), "{out}");
    let (code, _, err) = tipc_test(&["--model", "intel", "-t", "echo"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown model 'intel': upstream or nxp"), "{err}");
}

#[test]
fn no_path_exits_nonzero_naming_what_is_missing() {
    let (code, out, err) = tipc_test(&["--platform", "xen-domu-no-path", "-t", "all"]);
    assert_ne!(code, 0);
    assert!(err.contains("missing a path to Trusty"), "{err}");
    assert!(!out.contains("PASS") && !out.contains("FAIL"), "no test may run: {out}");
}

/// Xen 4.20 / 4.21's FF-A mediator forwards no FFA_RUN: tipc-test stops at once, printing the
/// sharing line it could not use and an error naming FFA_RUN and the Xen versions with it.
#[test]
fn mediator_4_20_exits_nonzero_naming_ffa_run() {
    let (code, out, err) = tipc_test(&["--platform", "xen-domu-ffa-mediator-4.20", "-t", "all"]);
    assert_ne!(code, 0);
    assert!(out.starts_with("sharing: ffa-handle ("), "{out}");
    assert!(err.contains("missing FFA_RUN") && err.contains("Xen 4.20 and 4.21"), "{err}");
    assert!(err.contains("transport: FF-A direct requests"), "{err}");
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

#[test]
fn a_missing_device_fails_before_any_test() {
    let dev0 = "/dev/trusty-ipc-dev0";
    let mut runs = vec![(["-D", "/nonexistent/x", "-t", "all"], "/nonexistent/x")];
    // AOSP's default device: missing on a development machine, but not on a Trusty device.
    if !std::path::Path::new(dev0).exists() {
        runs.push((["-D", dev0, "-t", "echo"], dev0));
    }
    for (args, path) in runs {
        let (code, out, err) = tipc_test(&args);
        assert_ne!(code, 0, "{args:?}: {out}\n{err}");
        assert!(err.contains(&format!("{path}: device not found")), "{args:?}: {err}");
        assert!(!out.contains("PASS") && !out.contains("FAIL"), "no test may run: {out}");
        assert!(!out.contains("sharing:"), "the sharing line is the model's: {out}");
    }
}

#[test]
fn model_options_are_rejected_for_a_device() {
    for (opt, value) in [("--platform", "native-api4"), ("--force-sharing", "phys"), ("--model", "nxp")] {
        let (code, out, err) = tipc_test(&["-D", "/dev/null", opt, value, "-t", "echo"]);
        assert_ne!(code, 0);
        assert!(err.contains(opt) && err.contains("only to the embedded model"), "{err}");
        assert!(!out.contains("PASS") && !out.contains("FAIL"), "no test may run: {out}");
    }
}

#[test]
fn a_device_that_is_not_trusty_ipc_fails_clearly() {
    // A character device without the trusty-ipc driver: CONNECT reaches the kernel and comes
    // back ENOTTY, reported per test; no sharing line (that is the model's).
    let (code, out, err) = tipc_test(&["-D", "/dev/null", "-t", "echo"]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(out.starts_with("kernel: /dev/null"), "{out}");
    assert!(out.contains("FAIL echo") && out.contains("ENOTTY"), "{out}");
    assert!(!out.contains("sharing:"), "{out}");
    assert_eq!(out.lines().last(), Some("0 passed, 1 failed"), "{out}");
    // Not a device at all.
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let (code, out, err) = tipc_test(&["-D", file, "-t", "echo"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a character device"), "{err}");
    assert!(!out.contains("PASS") && !out.contains("FAIL"), "no test may run: {out}");
}

#[test]
fn the_default_device_is_the_model_where_no_trusty_ipc_device_exists() {
    if std::path::Path::new("/dev/trusty-ipc-dev0").exists() {
        return; // AOSP's default applies there, and is a real device
    }
    let (code, out, err) = tipc_test(&["-t", "echo"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.starts_with("sharing:"), "the model's sharing line comes first: {out}");
}

#[test]
fn all_tests_pass_on_libtrusty_fds_in_process_and_on_a_profile_name() {
    for dev in ["lib:sim", "lib:sim-threaded", "xen-domu-ffa-mediator"] {
        let (code, out, err) = tipc_test(&["-D", dev, "-t", "all"]);
        assert_eq!(code, 0, "{dev}: {out}\n{err}");
        assert_eq!(out.lines().last(), Some("15 passed, 0 failed"), "{dev}: {out}");
    }
}

#[test]
fn all_tests_pass_through_trusty_ipcd_s_socket() {
    use trusty_ipcd::{sim, sys, Limits, Server};
    let dir = std::env::temp_dir().join(format!("tipc-test-ipcd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("ipcd.sock");
    let (stack, _) = sim::bring_up(sim::DEFAULT_PLATFORM, false).expect("bring-up");
    let mut server = Server::new(stack, Limits::default()).expect("server");
    server.add_listener(sys::listen_unix(&socket, 16).expect("listen"), "unix");
    let (handle, join) = server.spawn().expect("spawn");
    let dev = socket.to_str().expect("UTF-8");
    let (code, out, err) = tipc_test(&["-D", dev, "-t", "all"]);
    handle.stop();
    join.join().expect("serving loop");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.starts_with(&format!("libtrusty: {dev}")), "{out}");
    assert_eq!(out.lines().last(), Some("15 passed, 0 failed"), "{out}");
}

/// A reader that goes away (`tipc-test ... | head -1`) ends the run at once and quietly, as
/// AOSP's C tipc-test dies of SIGPIPE: status 141, no panic on stderr. The run lasts seconds
/// and prints all along, so its next line comes after the reader is gone.
#[test]
fn a_reader_that_goes_away_ends_the_run_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tipc-test"))
        .args(["-D", "sim", "-t", "all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tipc-test");
    let mut first = String::new();
    {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
        reader.read_line(&mut first).expect("a first line");
    } // the reader goes away here
    let out = child.wait_with_output().expect("wait for tipc-test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("sharing: "), "{first}");
    assert_eq!(out.status.code(), Some(tipc_test::env::EXIT_READER_GONE), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
