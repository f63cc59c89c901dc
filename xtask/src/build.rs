//! The two-toolchain build of shared/TOOLCHAIN.md: eBPF with Debian's cargo and rustc
//! (which ship the bpfel core), userspace with the default toolchain.

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

pub fn build() -> anyhow::Result<()> {
    let root = workspace_root();
    let path = format!(
        "{}:{}",
        cargo_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    println!("xtask: building the eBPF object");
    run_checked(
        Command::new("/usr/bin/cargo")
            .current_dir(&root)
            .env("PATH", path)
            .env("RUSTC", "/usr/bin/rustc")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTFLAGS")
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            )
            .args(["build", "--quiet", "-p", "velox-ebpf", "--bins", "--release"])
            .args(["--target", "bpfel-unknown-none", "--target-dir", "target/ebpf"]),
    )?;
    println!("xtask: building velox and velox-loader");
    run_checked(Command::new(cargo()).current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "velox-cni",
        "-p",
        "velox-loader",
    ]))
}
