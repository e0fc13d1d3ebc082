//! Builds `tests/c/tipc_capi_test.c` against the crate's static library with the `cc` crate's
//! idea of the C compiler, runs it, and requires it to pass; and checks that the static library
//! exports libtrusty's symbols under their C names.
//!
//! The static library is the one cargo built for this test run: `libtrusty_capi-<hash>.a` next
//! to this test binary in `target/<profile>/deps` (the package's `crate-type` includes
//! `staticlib`, so building the library for the integration tests builds it too).

use std::path::{Path, PathBuf};
use std::process::Command;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Every symbol the header declares.
const EXPORTED: &[&str] =
    &["tipc_connect", "tipc_send", "tipc_close", "tipc_recv", "tipc_write", "tipc_poll", "tipc_init", "tipc_shutdown"];

/// The static library cargo built for this run: the newest `libtrusty_capi*.a` in this test
/// binary's directory (`deps/`) or its parent (where `cargo build` copies it).
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for dir in [Some(deps), deps.parent()].into_iter().flatten() {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("libtrusty_capi") && name.ends_with(".a") {
                let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                found.push((modified, entry.path()));
            }
        }
    }
    found.sort();
    match found.pop() {
        Some((_, path)) => path,
        None => panic!("no libtrusty_capi*.a next to {}: is `staticlib` still in crate-type?", exe.display()),
    }
}

/// A fresh directory for this test's outputs.
fn out_dir(name: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join("libtrusty-capi").join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create output directory");
    dir
}

/// The target triple this test was built for (the C program must match it).
fn target_triple() -> String {
    let arch = std::env::consts::ARCH;
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        format!("{arch}-unknown-linux-gnu")
    } else if cfg!(all(target_os = "linux", target_env = "musl")) {
        format!("{arch}-unknown-linux-musl")
    } else if cfg!(target_os = "android") {
        format!("{arch}-linux-android")
    } else {
        panic!("the C test program is only built on Linux and Android hosts")
    }
}

/// What a C program linking a Rust static library needs besides it
/// (`rustc --print native-static-libs` for a staticlib on Linux with glibc).
fn native_libs() -> &'static [&'static str] {
    if cfg!(target_os = "android") {
        &["-ldl", "-llog", "-lc", "-lm"]
    } else {
        &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]
    }
}

fn compile_c_program(lib: &Path, dir: &Path) -> PathBuf {
    let target = target_triple();
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .target(&target)
        .host(&target)
        .opt_level(0)
        .debug(false)
        .out_dir(dir)
        .try_get_compiler()
        .expect("a C compiler (cc) for the host");
    let exe = dir.join("tipc_capi_test");
    let root = Path::new(MANIFEST_DIR);
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c99", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/tipc_capi_test.c"))
        .arg(lib)
        .args(native_libs())
        .arg("-o")
        .arg(&exe);
    let out = cmd.output().unwrap_or_else(|e| panic!("running the C compiler {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "compiling the C test program failed: {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

#[test]
fn c_program_passes() {
    let lib = staticlib();
    let dir = out_dir("c-program");
    let exe = compile_c_program(&lib, &dir);
    let out = Command::new(&exe).output().expect("run the C test program");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "C test program failed ({}):\n{stdout}{stderr}", out.status);
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" passed, 0 failed"), "unexpected summary: {summary}");
    let passed: u32 = summary.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(passed >= 70, "too few checks ran: {summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn staticlib_exports_libtrusty_symbols() {
    let lib = staticlib();
    let out = Command::new("nm")
        .args(["-g", "--defined-only"])
        .arg(&lib)
        .output()
        .unwrap_or_else(|e| panic!("running nm on {}: {e}", lib.display()));
    assert!(out.status.success(), "nm failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let defined: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some(_addr), Some("T"), Some(name)) => Some(name),
                _ => None,
            }
        })
        .collect();
    for sym in EXPORTED {
        assert!(defined.contains(sym), "{} does not export `{sym}` as a C function", lib.display());
    }
}

#[test]
fn header_declares_every_export() {
    let root = Path::new(MANIFEST_DIR).join("include/trusty");
    let tipc = std::fs::read_to_string(root.join("tipc.h")).expect("tipc.h");
    for decl in [
        "int tipc_connect(const char* dev_name, const char* srv_name);",
        "ssize_t tipc_send(int fd, const struct iovec* iov, int iovcnt, struct trusty_shm* shm, int shmcnt);",
        "int tipc_close(int fd);",
        "ssize_t tipc_recv(int fd, void* buf, size_t len, int timeout_ms);",
        "ssize_t tipc_write(int fd, const void* buf, size_t len);",
        "int tipc_poll(int fd, int timeout_ms);",
        "int tipc_init(const char* platform);",
        "void tipc_shutdown(void);",
    ] {
        assert!(tipc.contains(decl), "tipc.h lacks `{decl}`");
    }
    let ipc = std::fs::read_to_string(root.join("ipc.h")).expect("ipc.h");
    for item in ["TRUSTY_SHARE = 0", "TRUSTY_LEND = 1", "TRUSTY_SEND_SECURE = 2", "struct trusty_shm {"] {
        assert!(ipc.contains(item), "ipc.h lacks `{item}`");
    }
}
