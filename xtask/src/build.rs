//! Two toolchains in one workspace: the eBPF object with Debian's cargo and rustc
//! (the only ones here with a prebuilt `core` for `bpfel-unknown-none`), called by
//! full path with `RUSTC` set (else `/usr/bin/cargo` takes rustup's rustc from PATH);
//! userspace with the default toolchain. `-Cdebuginfo=2 -Clink-arg=--btf` give the
//! object the `.BTF` section BTF maps need to load.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The cargo that runs xtask, for the userspace side.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"))
        .join("bin")
}

/// Builds the eBPF object with Debian's cargo and rustc into `target_dir`.
fn build_ebpf(target_dir: &str, features: &[&str]) -> anyhow::Result<()> {
    let path = format!(
        "{}:{}",
        cargo_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(workspace_root())
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        // Unstable features for aya-ebpf and for the programs (atomic adds: the BPF
        // target has no compare-and-swap, so `core::sync::atomic` offers none).
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,velox_ebpf")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .args(["build", "--quiet", "-p", "velox-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "--target-dir", target_dir]);
    for feature in features {
        cmd.args(["--features", feature]);
    }
    run_checked(&mut cmd)
}

pub fn build() -> anyhow::Result<()> {
    println!("xtask: building the eBPF object");
    build_ebpf("target/ebpf", &[])?;
    println!("xtask: building velox, velox-loader and velox-probe");
    let packages = ["-p", "velox-cni", "-p", "velox-loader", "-p", "velox-test-env"];
    let bins = ["--bin", "velox", "--bin", "velox-loader", "--bin", "velox-probe"];
    run_checked(
        Command::new(cargo())
            .current_dir(workspace_root())
            .args(["build", "--quiet", "--release"])
            .args(packages)
            .args(bins),
    )
}

/// The upgrade test's second datapath; only the tests need it.
pub fn build_upgrade_test_object() -> anyhow::Result<()> {
    println!("xtask: building the upgrade test's eBPF object");
    build_ebpf("target/ebpf-upgrade-test", &["upgrade-test"])
}
