//! Velox's test environment: a node is a network namespace with its own loader,
//! bpffs root and state dir; a pod is a network namespace wired up by running the
//! real `velox` binary inside the node's namespace, exactly as a runtime does
//! (CNI_* environment, config on stdin).
//!
//! `nsenter --net` is used rather than `ip netns exec`, which remounts /sys and
//! would hide the bpffs pins.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod apiserver;
pub mod backend;
pub mod cluster;
pub mod cluster_state;
pub mod cni;
pub mod containerd;
pub mod guard;
pub mod icmp;
pub mod kube_proxy;
pub mod matrix;
pub mod netns;
pub mod netpol;
pub mod node;
pub mod pod;
pub mod podman;
pub mod real_cluster;
pub mod reference;

pub use cluster::{Cluster, ClusterGuard, Topology};

/// The image `cargo xtask image` builds and deploy/velox.yaml runs.
pub const IMAGE: &str = concat!("localhost/velox:", env!("CARGO_PKG_VERSION"));
pub use cni::CniOutcome;
pub use netns::{
    direct_veth_pair, ensure_bpffs, in_netns, in_netns_and_cgroup, iptables_restore, netns_path, netns_with_prefix,
    remove_direct_veth_pair, run_in_netns,
};
pub use node::{Node, NodeGuard};
pub use pod::{Pod, Server};
pub use velox_node::Family;

/// The release binaries under test: `$VELOX_BIN_DIR`, else the workspace's target/release.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub velox: PathBuf,
    pub loader: PathBuf,
    /// A Service client and connection-rate tester (`src/bin/velox-probe.rs`).
    pub probe: PathBuf,
}

impl Binaries {
    pub fn locate() -> anyhow::Result<Self> {
        let dir = std::env::var_os("VELOX_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
        let bins = Self {
            velox: dir.join("velox"),
            loader: dir.join("velox-loader"),
            probe: dir.join("velox-probe"),
        };
        for bin in [&bins.velox, &bins.loader, &bins.probe] {
            if !bin.is_file() {
                bail!("{} is missing: run `cargo xtask build`", bin.display());
            }
        }
        Ok(bins)
    }

    /// [`PREVIOUS_RELEASE`]'s CNI plugin and loader, with this build's probe.
    pub fn previous_release() -> anyhow::Result<Self> {
        let dir = previous_release_dir();
        let bins = Self {
            velox: dir.join("velox"),
            loader: dir.join("velox-loader"),
            ..Self::locate()?
        };
        for bin in [&bins.velox, &bins.loader] {
            if !bin.is_file() {
                bail!("{} is missing: run `cargo xtask test`", bin.display());
            }
        }
        Ok(bins)
    }
}

/// `cnitool`, built by `cargo xtask setup` from Debian's source package.
pub fn cnitool() -> anyhow::Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/cnitool");
    anyhow::ensure!(path.is_file(), "{} is missing: run `cargo xtask setup`", path.display());
    Ok(path)
}

/// The build the upgrade tests start from: the last before the VXLAN underlay
/// (native routing only, the peer map's older value). `cargo xtask test` builds it
/// from the repository's history into [`previous_release_dir`].
pub const PREVIOUS_RELEASE: &str = "a9ec1b8c61e7d02be47bf7b52067f3684d0181c6";

/// Where the previous release's `velox` and `velox-loader` are cached.
pub fn previous_release_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(format!(".cache/velox/previous-release-{}", &PREVIOUS_RELEASE[..12]))
}

/// The upgrade test's changed datapath, which `cargo xtask test` builds.
pub fn upgrade_test_object() -> anyhow::Result<PathBuf> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf-upgrade-test/bpfel-unknown-none/release/velox-ebpf");
    anyhow::ensure!(path.is_file(), "{} is missing: run `cargo xtask test`", path.display());
    Ok(path)
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; true when it held.
pub fn wait_for(timeout: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
