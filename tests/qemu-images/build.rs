fn main() {
    // The runtime's linker scripts, for the AArch64 images only (host builds are stubs).
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
        println!("cargo:rustc-link-arg-bin=stack-domu=-Tbaremetal-domu.ld");
        println!("cargo:rustc-link-arg-bin=trusty-vm=-Tbaremetal-domu.ld");
        println!("cargo:rustc-link-arg-bin=el3-trusty=-Tbaremetal-el3.ld");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
