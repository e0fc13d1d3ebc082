//! trusty-ipcd: one process owns the Trusty IPC stack and serves client processes.

fn main() -> std::process::ExitCode {
    trusty_ipcd::cli::main_with(std::env::args())
}
