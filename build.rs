//! Link arguments for the `regcache` binary on Linux.
//!
//! - Packed relative relocations (`DT_RELR`, glibc 2.36+): the table the
//!   loader reads at every start shrinks from ~450 KB to a few KB, and those
//!   pages stayed mapped in every process after.
//! - In release builds, `link/hot-text.ld`: the functions that run go first,
//!   together (see ARCHITECTURE.md, "Binary layout").
fn main() {
    println!("cargo:rerun-if-changed=link/hot-text.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link/hot-text.ld");
    }
}
