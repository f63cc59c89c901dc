//! `velox-loader install` / `uninstall`: put `velox` into a CNI bin dir and a conflist
//! into a CNI conf dir, and take away exactly that again. What install wrote is listed,
//! with checksums, in `<stateDir>/install.json`; uninstall removes a file only if it is
//! still what install wrote.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use velox_node::fs::{create_private_dir, try_lock_dir, write_atomic};
use velox_node::layout::PRIVATE_FILE_MODE;
use velox_node::netlink::{Netlink, VELOX_ROUTE_PROTOCOL};
use velox_node::{Bpffs, Family};

use crate::reconcile::masquerade::remove_masquerade;

#[derive(clap::Args)]
pub struct InstallArgs {
    /// This node's pod CIDRs for the built-in IPAM, one per family: repeat the flag
    /// for dual-stack.
    #[arg(long, required = true)]
    pub pod_cidr: Vec<ipnet::IpNet>,
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The network name runtimes see.
    #[arg(long, default_value = DEFAULT_NETWORK)]
    pub network: String,
    #[arg(long, default_value_t = DEFAULT_MTU)]
    pub mtu: u32,
    /// The plugin binary to install; by default the `velox` next to this program.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Where the host's root is mounted, when this runs in a container (the
    /// DaemonSet's `/host`): install.json records the paths the host sees too, so
    /// `velox-loader uninstall` run on the host finds what to remove.
    #[arg(long)]
    pub host_root: Option<PathBuf>,
}

const DEFAULT_NETWORK: &str = "velox";
const DEFAULT_MTU: u32 = 1500;

/// Where `velox-loader run` installs the plugin and conflist, once it knows the pod
/// CIDRs.
#[derive(Clone, Debug)]
pub struct InstallTarget {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub host_root: Option<PathBuf>,
}

impl InstallTarget {
    /// `velox-loader install`'s defaults for these pod CIDRs, with pods' MTU `mtu`.
    pub fn args(self, pod_cidr: Vec<ipnet::IpNet>, mtu: u32) -> InstallArgs {
        InstallArgs {
            pod_cidr,
            cni_bin_dir: self.cni_bin_dir,
            cni_conf_dir: self.cni_conf_dir,
            network: DEFAULT_NETWORK.into(),
            mtu,
            plugin: None,
            host_root: self.host_root,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Installed {
    files: Vec<InstalledFile>,
}

#[derive(Serialize, Deserialize)]
struct InstalledFile {
    path: PathBuf,
    /// The same file as the host sees it, when installed from a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_path: Option<PathBuf>,
    sha256: String,
}

impl InstalledFile {
    /// Where the file is from here: its path, or as the host sees it when this runs
    /// on the host of the container that installed it.
    fn here(&self) -> &Path {
        match &self.host_path {
            Some(host_path) if !self.path.exists() => host_path,
            _ => &self.path,
        }
    }
}

fn manifest(state_dir: &Path) -> PathBuf {
    state_dir.join("install.json")
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    Ok(velox_node::sha256_hex(std::fs::read(path)?))
}

/// Installs `bytes` at `path` atomically, so a runtime never reads half a binary or
/// half a config.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32, host_root: Option<&Path>) -> anyhow::Result<InstalledFile> {
    let dir = path.parent().context("no parent dir")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(path, bytes, mode)?;
    Ok(InstalledFile {
        path: path.to_path_buf(),
        host_path: host_root
            .and_then(|root| path.strip_prefix(root).ok())
            .map(|rest| Path::new("/").join(rest)),
        sha256: sha256(path)?,
    })
}

/// The conflist: named `00-<network>.conflist` so it sorts first, cniVersion 1.0.0
/// (the newest that containerd 1.6 and podman 4.3 speak). `velox` first, then the
/// plugins chained after it in the conflist already there (an operator's
/// additions survive every loader start), and portmap when the bin dir has it.
pub fn conflist(
    args: &InstallArgs,
    bpffs_root: &Path,
    state_dir: &Path,
    existing: Option<&serde_json::Value>,
) -> serde_json::Value {
    let velox = serde_json::json!({
        "type": "velox",
        "subnets": args.pod_cidr,
        "mtu": args.mtu,
        "bpffsRoot": bpffs_root,
        "stateDir": state_dir,
    });
    let mut chained: Vec<serde_json::Value> = existing
        .and_then(|e| e["plugins"].as_array())
        .map(|plugins| plugins.iter().filter(|p| p["type"] != "velox").cloned().collect())
        .unwrap_or_default();
    // kubelet's hostPorts go through the `portMappings` capability: portmap joins
    // the chain whenever the bin dir has it, a conflist of an earlier release too.
    if args.cni_bin_dir.join("portmap").exists() && !chained.iter().any(|p| p["type"] == "portmap") {
        chained.push(serde_json::json!({
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "snat": true,
        }));
    }
    let mut plugins = vec![velox];
    plugins.extend(chained);
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": args.network,
        "plugins": plugins,
    })
}

/// The conflist at `path` as JSON, when there is one that parses.
fn read_conflist(path: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes)
        .map_err(|e| log::warn!("{} does not parse ({e}): writing it anew", path.display()))
        .ok()
}

pub fn install(args: &InstallArgs, bpffs_root: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let plugin = match &args.plugin {
        Some(plugin) => plugin.clone(),
        None => std::env::current_exe()?.with_file_name("velox"),
    };
    let binary = std::fs::read(&plugin).with_context(|| format!("reading the plugin {}", plugin.display()))?;
    let conf_path = args.cni_conf_dir.join(format!("00-{}.conflist", args.network));
    let conf = conflist(args, bpffs_root, state_dir, read_conflist(&conf_path).as_ref());
    let chained: Vec<&str> = conf["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(1)
        .filter_map(|p| p["type"].as_str())
        .collect();
    if chained.is_empty() {
        log::warn!(
            "no portmap in {}: pods' hostPorts are not opened",
            args.cni_bin_dir.display()
        );
    } else {
        log::info!("chained after velox: {}", chained.join(", "));
    }
    let host_root = args.host_root.as_deref();
    let files = vec![
        write_atomically(&args.cni_bin_dir.join("velox"), &binary, 0o755, host_root)?,
        write_atomically(&conf_path, &serde_json::to_vec_pretty(&conf)?, 0o644, host_root)?,
    ];
    for file in &files {
        println!("installed {}", file.path.display());
    }
    create_private_dir(state_dir)?;
    write_atomic(
        &manifest(state_dir),
        &serde_json::to_vec_pretty(&Installed { files })?,
        PRIVATE_FILE_MODE,
    )?;
    Ok(())
}

pub fn uninstall(state_dir: &Path) -> anyhow::Result<()> {
    let path = manifest(state_dir);
    let installed: Installed = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("nothing installed (no {})", path.display());
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    for file in &installed.files {
        let path = file.here();
        match sha256(path) {
            Ok(sum) if sum == file.sha256 => {
                std::fs::remove_file(path)?;
                println!("removed {}", path.display());
            }
            Ok(_) => println!("kept {}: changed since install", path.display()),
            Err(_) => println!("already gone: {}", path.display()),
        }
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

/// Takes the node's datapath away: unpinning the links detaches `from_pod` and
/// `from_net`, then the programs and maps go with their pins; then Velox's routes to
/// other nodes, its VXLAN device and rules, and its masquerade chains. The state dir stays: the runtime's DELs of
/// pods still running read it.
pub async fn purge(bpffs: &Bpffs) -> anyhow::Result<()> {
    if bpffs.root.exists() {
        let Some(_owned) = try_lock_dir(&bpffs.root)? else {
            anyhow::bail!("velox-loader is running on {}: stop it first", bpffs.root.display());
        };
        std::fs::remove_dir_all(&bpffs.root).with_context(|| format!("removing {}", bpffs.root.display()))?;
        println!("removed the datapath under {}", bpffs.root.display());
    }
    let netlink = Netlink::connect()?;
    for family in Family::ALL {
        for route in netlink.routes(family).await? {
            if route.protocol == VELOX_ROUTE_PROTOCOL {
                netlink.delete_route(&route).await?;
                println!("removed the route to {}", route.dst);
            }
        }
    }
    crate::reconcile::tunnel::remove_all(&netlink, bpffs).await?;
    println!(
        "removed the VXLAN device {} and the pods' rules",
        crate::reconcile::tunnel::VXLAN_DEVICE
    );
    remove_masquerade()?;
    println!("removed the masquerade chains");
    Ok(())
}
