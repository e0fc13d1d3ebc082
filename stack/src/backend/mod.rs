//! One module per environment the stack runs in. Each supplies the same things to
//! [`crate::bring_up_platform`] through a [`crate::PlatformAccess`]: the call conduit, the
//! clock, the page allocator, the device tree and Xen's feature bits (the facts), and the way to
//! a Trusty VM (event channels, the grant sharer).

pub mod bare;
pub mod grant_table;
pub mod host;
#[cfg(feature = "linux")]
pub mod linux;
