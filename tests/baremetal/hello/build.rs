//! Links each image with the runtime's linker script for its kind (AArch64 builds only; on the
//! host the binaries are stubs and link normally).

fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
        // A Xen DomU / NS-EL1 payload at 0x4000_0000, arm64 Image header first.
        println!("cargo:rustc-link-arg-bin=hello-el1=-Tbaremetal-domu.ld");
        // An EL3 monitor: secure flash at 0 (-bios), secure RAM at 0x0e00_0000.
        println!("cargo:rustc-link-arg-bin=hello-el3=-Tbaremetal-el3.ld");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
