//! Two toolchains in one workspace: the eBPF object with Debian's cargo and rustc
//! (the only ones here with a prebuilt `core` for `bpfel-unknown-none`), called by
//! full path with `RUSTC` set (else `/usr/bin/cargo` takes rustup's rustc from PATH);
//! userspace with the default toolchain. `-Cdebuginfo=2 -Clink-arg=--btf` give the
//! object the `.BTF` section BTF maps need to load.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use velox_test_env::{previous_release_dir, PREVIOUS_RELEASE};

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

/// The released build the upgrade tests start from ([`PREVIOUS_RELEASE`]): built from
/// this repository's history in a worktree of its own, once, into a cache outside
/// the workspace (a clean clone finds it there).
pub fn build_previous_release() -> anyhow::Result<()> {
    let cache = previous_release_dir();
    if ["velox", "velox-loader"].iter().all(|b| cache.join(b).is_file()) {
        return Ok(());
    }
    println!("xtask: building the previous release {PREVIOUS_RELEASE} for the upgrade tests (about five minutes)");
    let root = workspace_root();
    let git = |args: &[&str]| run_checked(Command::new("git").current_dir(&root).args(args));
    // A shallow clone lacks the commit; fetch it rather than fail.
    if git(&["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")]).is_err() {
        git(&["fetch", "--quiet", "origin", PREVIOUS_RELEASE])?;
    }
    // Inside this workspace's target directory, no one else's to write into.
    let tree = root.join("target/previous-release-src");
    let _ = git(&["worktree", "remove", "--force", tree.to_str().unwrap()]);
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    // --force: the worktree a killed run left is still registered.
    git(&[
        "worktree",
        "add",
        "--quiet",
        "--force",
        "--detach",
        tree.to_str().unwrap(),
        PREVIOUS_RELEASE,
    ])?;
    let built = run_checked(
        Command::new(cargo())
            .current_dir(&tree)
            .env_remove("CARGO_TARGET_DIR")
            .args(["xtask", "build"]),
    )
    .and_then(|()| {
        // Staged, then renamed: the cache holds both binaries or none.
        let staging = cache.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        for binary in ["velox", "velox-loader"] {
            std::fs::copy(tree.join("target/release").join(binary), staging.join(binary))
                .with_context(|| format!("copying the previous release's {binary}"))?;
        }
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::rename(&staging, &cache)?;
        Ok(())
    });
    git(&["worktree", "remove", "--force", tree.to_str().unwrap()])?;
    built
}
