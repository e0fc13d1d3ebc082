//! `trusty-ipcd --platform linux` where no Trusty VM is named (this host, a Linux DomU without
//! `trusty-ipc-stack.trusty-vm=` on its command line): the daemon refuses to start, quickly,
//! with an error naming what is missing, a non-zero exit status, and no socket file left.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_real_platform_without_a_trusty_vm_refuses_to_start() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.contains("trusty-ipc-stack.trusty-vm=") {
        eprintln!("skipped: this machine names a Trusty VM on its command line");
        return;
    }
    let sock = std::env::temp_dir().join(format!("trusty-ipcd-linux-{}.sock", std::process::id()));
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_trusty-ipcd"))
        .args(["--platform", "linux", "--foreground", "--vsock-port", "0", "--socket"])
        .arg(&sock)
        .output()
        .expect("run trusty-ipcd");
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // No device tree (an x86 host): says so; a device tree without a Trusty VM: the decision
    // names the missing path.
    assert!(
        err.contains("/proc/device-tree is not there") || err.contains("missing a path to Trusty"),
        "{err}"
    );
    assert!(!sock.exists(), "no stale socket");
}

#[test]
fn linux_only_options_need_the_linux_platform() {
    let out = Command::new(env!("CARGO_BIN_EXE_trusty-ipcd"))
        .args(["--platform", "native-api5", "--foreground", "--vsock-port", "0", "--force-sharing", "phys"])
        .arg("--socket")
        .arg(std::env::temp_dir().join(format!("trusty-ipcd-linux-m-{}.sock", std::process::id())))
        .output()
        .expect("run trusty-ipcd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("go with --platform linux"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_trusty-ipcd"))
        .args(["--platform", "linux", "--force-sharing", "nonsense", "--foreground", "--vsock-port", "0"])
        .arg("--socket")
        .arg(std::env::temp_dir().join(format!("trusty-ipcd-linux-f-{}.sock", std::process::id())))
        .output()
        .expect("run trusty-ipcd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a mechanism"), "{err}");
}
