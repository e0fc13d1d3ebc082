//! Xen primitives for a DomU on ARM64: the hypercall ABI and its argument structs
//! ([`hypercall`]), grant table v1 with the "xen-grant" sharing mechanism ([`grant`]), and the
//! rendezvous page a guest without xenstore meets a Trusty VM through ([`rendezvous`]).
//!
//! Encoders, decoders and the grant-table logic run on the host against fakes; only the `hvc`
//! instruction (`hypercall::HvcHypercall`) is compiled for AArch64 alone. Numbers and layouts
//! follow Xen's public headers (`xen/include/public/`), cited where they are defined.

pub mod grant;
pub mod hypercall;
pub mod rendezvous;
