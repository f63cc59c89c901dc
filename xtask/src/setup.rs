//! Installs the toolchain of shared/TOOLCHAIN.md when it is missing; quick otherwise.

use anyhow::Context;
use std::process::Command;

use crate::build::{cargo, cargo_bin_dir, run_checked};

/// Build toolchain, datapath inspection, and what the tests and demo run.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "sockperf",
    "fonts-dejavu-core",
    "iptables",
    "procps",
    "util-linux",
    "containernetworking-plugins",
];

const BPF_LINKER: &str = "bpf-linker@0.13.0";

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        println!("xtask: installing {}", missing.join(" "));
        run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
        run_checked(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )?;
    }
    let linker = cargo_bin_dir().join("bpf-linker");
    let linker_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        println!("xtask: installing {BPF_LINKER} (about a minute)");
        run_checked(Command::new(cargo()).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            BPF_LINKER,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
        .context("installing bpf-linker")?;
    }
    velox_test_env::ensure_bpffs()
}
