//! Link arguments for the `regcache` binary on Linux.
//!
//! - Not position-independent (`-no-pie`). A PIE's loader writes the
//!   address of every vtable and static table into `.data.rel.ro` at each
//!   start (from a relocation table of its own), so every process kept a
//!   private copy of those 330 KiB; at a fixed address the linker writes
//!   them, and they stay page-cache pages that the supervisor and every
//!   worker share (embedded default CONFIG, 10 processes: idle PSS 18.7 ->
//!   15.6 MiB). The binary's own code and data then sit at the same address
//!   in every run; libraries, heap and stacks stay randomised. Debian builds
//!   `docker-registry`, `containerd` and `skopeo` the same way (Go's default).
//! - In release builds, `link/hot-text.ld`: the functions that run go first,
//!   together (see ARCHITECTURE.md, "Binary layout").
fn main() {
    println!("cargo:rerun-if-changed=link/hot-text.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-no-pie");
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link/hot-text.ld");
    }
}
