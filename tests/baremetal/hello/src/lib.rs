//! What the two smoke-test images agree on, and the boot-argument parser of `hello-el1`
//! (plain code, tested on the host).
#![no_std]

/// A SiP-service SMC64 fast call that `hello-el3`'s monitor answers with x0 = 0,
/// x1 = [`NS_EXIT_CODE`], x2 = a1 + a2, x3 = [`EL3_MAGIC`].
pub const HELLO_SMC_FID: u32 = 0xC200_0042;
/// A SiP call for which the monitor deliberately clobbers v16 before returning x0 = 0, so the
/// caller can check that its FP/SIMD registers survive an SMC.
pub const CLOBBER_SIMD_SMC_FID: u32 = 0xC200_0043;
/// The exit status the monitor tells the NS payload to use.
pub const NS_EXIT_CODE: u64 = 9;
/// "EL3" in x3.
pub const EL3_MAGIC: u64 = 0x45_4c33;

/// Which console `hello-el1` writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleKind {
    /// Xen's `console_io` hypercall.
    Xen,
    /// QEMU virt's PL011.
    Pl011,
}

/// A deliberate failure, to check the runtime's exception and panic reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// `udf #0`: an undefined instruction (the runtime exits with 101).
    Undef,
    /// `panic!` (the runtime exits with 100).
    Panic,
}

/// `hello-el1`'s boot arguments (`/chosen/bootargs`): `console=xen|pl011`, `exit=N` (the QEMU
/// exit status) or `exit=smc` (ask `hello-el3`'s monitor, with SMCs, for the status), and
/// `crash=udf|panic`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub console: ConsoleKind,
    /// `None`: `exit=smc`.
    pub exit: Option<u32>,
    pub crash: Option<Crash>,
}

impl Config {
    /// Parses `bootargs`; unknown words are ignored. Defaults: Xen console, exit 0.
    pub fn parse(bootargs: &str) -> Config {
        let mut config = Config { console: ConsoleKind::Xen, exit: Some(0), crash: None };
        for word in bootargs.split_whitespace() {
            match word.split_once('=') {
                Some(("console", "xen")) => config.console = ConsoleKind::Xen,
                Some(("console", "pl011")) => config.console = ConsoleKind::Pl011,
                Some(("exit", "smc")) => config.exit = None,
                Some(("crash", "udf")) => config.crash = Some(Crash::Undef),
                Some(("crash", "panic")) => config.crash = Some(Crash::Panic),
                Some(("exit", n)) => {
                    if let Ok(n) = n.parse() {
                        config.exit = Some(n);
                    }
                }
                _ => {}
            }
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bootargs() {
        let default = Config { console: ConsoleKind::Xen, exit: Some(0), crash: None };
        assert_eq!(Config::parse(""), default);
        assert_eq!(
            Config::parse("console=pl011 exit=smc foo"),
            Config { console: ConsoleKind::Pl011, exit: None, ..default }
        );
        assert_eq!(Config::parse("exit=7 console=xen"), Config { exit: Some(7), ..default });
        assert_eq!(Config::parse("exit=x"), default);
        assert_eq!(Config::parse("crash=udf").crash, Some(Crash::Undef));
        assert_eq!(Config::parse("crash=panic").crash, Some(Crash::Panic));
    }
}
