//! Embeds the eBPF object built by `cargo xtask build` (Debian's rustc with its BPF std,
//! LLVM 22 and bpf-linker); cargo alone cannot build it. Without the object (a plain
//! `cargo check` or `cargo test` anywhere) an empty stub is embedded, and
//! `velox-loader run` says how to build the real one.
use std::path::PathBuf;

fn main() {
    let object = match std::env::var_os("VELOX_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/velox-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=VELOX_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let embedded = if object.exists() {
        object.canonicalize().expect("canonical object path")
    } else {
        println!(
            "cargo:warning=eBPF object {} is missing: embedding a stub (run `cargo xtask build`)",
            object.display()
        );
        let stub = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("velox-ebpf.stub");
        std::fs::write(&stub, b"").expect("writing the stub");
        stub
    };
    println!("cargo:rustc-env=VELOX_EBPF_OBJECT={}", embedded.display());
}
