//! Embeds the eBPF object built by `cargo xtask build` (Debian's toolchain, see
//! shared/TOOLCHAIN.md); cargo alone cannot build it.
use std::path::PathBuf;

fn main() {
    let object = match std::env::var_os("VELOX_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/velox-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=VELOX_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!("eBPF object {} is missing: run `cargo xtask build`", object.display());
    }
    println!(
        "cargo:rustc-env=VELOX_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
