//! Bringing the stack up on a simulated platform (the embedded Trusty model and a platform
//! profile): test code, built only with the `sim` feature.

use std::sync::Arc;

use tipc::stack::{bring_up_platform, BringUpError, StackConfig};
use trusty_model::host::ModelMode;

use crate::server::Stack;

/// The profile used when none is named: no hypervisor, Trusty API 5 with FF-A.
pub const DEFAULT_PLATFORM: &str = "native-api5";

/// Boots the machine of profile `platform` (model threads per `mode`) and brings the stack up
/// on it. The status words add the model's open TIPC endpoints and live shares. Errors: the
/// message and an errno (ENOENT unknown profile, ENODEV no safe path, or the failed step's).
pub fn bring_up(platform: &str, threaded: bool) -> Result<(Stack, String), (String, i32)> {
    let mode = if threaded { ModelMode::Threaded } else { ModelMode::Sync };
    bring_up_with(platform, mode, StackConfig::default())
}

/// [`bring_up`] with a model mode and a stack configuration of the caller's.
pub fn bring_up_with(platform: &str, mode: ModelMode, cfg: StackConfig) -> Result<(Stack, String), (String, i32)> {
    let profile = platforms::by_name(platform).ok_or_else(|| {
        (
            format!(
                "unknown platform '{platform}' (known: {})",
                platforms::names().join(", ")
            ),
            libc::ENOENT,
        )
    })?;
    let sim = Arc::new(profile.boot(mode));
    match bring_up_platform(profile.access(&sim), cfg) {
        Ok((dev, info)) => {
            let sharing = info.plan.to_string();
            let status_sim = sim.clone();
            let status = Box::new(move || {
                let m = status_sim.model();
                format!(
                    "model_endpoints={} live_shares={}",
                    m.open_endpoints(),
                    m.live_shares()
                )
            });
            Ok((
                Stack {
                    dev,
                    status,
                    keep: Box::new(sim),
                },
                sharing,
            ))
        }
        Err(e) => {
            let mut msg = format!("bringing the stack up on platform {platform} failed: {e}");
            for f in sim.model().faults() {
                msg.push_str(&format!("\n  {f}"));
            }
            let errno = match e {
                BringUpError::Stack(e) | BringUpError::AfterPlan { error: e, .. } => e.errno(),
                BringUpError::DeviceTree(_) | BringUpError::NoSafeSharing(_) => libc::ENODEV,
            };
            Err((msg, errno))
        }
    }
}
