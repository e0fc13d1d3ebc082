use core::fmt;

use crate::mem::MemoryId;
use crate::smc::SmError;

/// Every failure of the platform layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The secure monitor or Trusty answered with an error code (spec §2.3).
    Sm(SmError),
    /// Trusty reported a panic earlier; every later call fails without reaching it (spec §2.5 rule 7).
    TrustyPanicked,
    /// A wait with a stated limit ran out: `what` names the wait.
    Timeout {
        /// The wait that ran out.
        what: &'static str,
    },
    /// Trusty answered SMC_FC_API_VERSION with more than was asked (spec §2.4).
    BadApiVersion {
        /// The version this stack asked for.
        asked: u32,
        /// The version Trusty answered.
        got: u32,
    },
    /// No pages left for a buffer that must be shared with the peer.
    OutOfMemory,
    /// Sharing this buffer would exceed the number of live shares the platform allows.
    ShareBudgetExhausted {
        /// The number of live shares allowed.
        budget: usize,
    },
    /// The peer still holds the memory, so it must stay allocated (leaked), never freed (spec §3.3).
    ReclaimDenied(MemoryId),
    /// An FF-A call failed: the call's name and the FF-A error code.
    Ffa {
        /// The FF-A call that failed.
        call: &'static str,
        /// Its FF-A error code ([`crate::ffa::err`]).
        code: i32,
    },
    /// A caller passed a value the operation cannot take.
    InvalidArgument(&'static str),
    /// The call transport can carry no further call (the reason); sticky, like a panic.
    TransportFailed(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sm(e) => write!(f, "secure side returned {e}"),
            Error::TrustyPanicked => f.write_str("Trusty has panicked; no further calls are made"),
            Error::Timeout { what } => write!(f, "timed out waiting for {what}"),
            Error::BadApiVersion { asked, got } => {
                write!(f, "Trusty selected API version {got}, more than the {asked} asked for")
            }
            Error::OutOfMemory => f.write_str("out of shareable pages"),
            Error::ShareBudgetExhausted { budget } => {
                write!(f, "share budget of {budget} live shares exhausted")
            }
            Error::ReclaimDenied(id) => {
                write!(f, "peer denied reclaim of {id}; the memory is leaked, not freed")
            }
            Error::Ffa { call, code } => write!(f, "FF-A {call} failed with error {code}"),
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::TransportFailed(why) => write!(f, "call transport to Trusty failed: {why}"),
        }
    }
}
