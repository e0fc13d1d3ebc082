//! Puts the runtime's linker scripts (`ld/`) on the link search path of every crate that
//! depends on this one, so an image's build script can pass just `-Tbaremetal-domu.ld` or
//! `-Tbaremetal-el3.ld`.

fn main() {
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("ld");
    println!("cargo:rustc-link-search={}", dir.display());
    println!("cargo:rerun-if-changed=ld");
    println!("cargo:rerun-if-changed=build.rs");
}
