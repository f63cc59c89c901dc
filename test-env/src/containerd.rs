//! containerd 1.6 with its CRI plugin, run inside a node's netns with a root, state,
//! socket and CNI dirs of its own, driven through the CRI API (`cri/cri.py`, on PyPI's
//! generated CRI v1 stubs). The sandbox image is built offline by `cargo xtask setup`.

use anyhow::{bail, Context};
use serde_json::Value;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{in_netns, run, Node, Pod};

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools")
}

/// A pod sandbox as the runtime reports it.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub ip: IpAddr,
    pub netns: PathBuf,
}

impl Sandbox {
    /// The sandbox's netns as a pod of the test environment (for ping, iperf3).
    pub fn pod(&self) -> Pod {
        Pod {
            name: self.netns.file_name().unwrap().to_string_lossy().into_owned(),
            ips: vec![self.ip],
        }
    }
}

/// containerd's CRI plugin as the tests run it: the offline pause image, runc, and
/// no OOM score changes (root may lack CAP_SYS_RESOURCE on a VM or container of the
/// CI's kind).
pub const CRI_PLUGIN: &str = r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "velox.test/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#;

pub struct Containerd {
    pub dir: PathBuf,
    /// Velox's log: one `took_ms` line per CNI call containerd made.
    pub cni_log: PathBuf,
    daemon: Child,
}

impl Containerd {
    /// Starts containerd for `node`, its CNI config the node's Velox network.
    pub fn start(node: &Node) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!("/run/velox-test/containerd-{}", node.name));
        let _ = std::fs::remove_dir_all(&dir);
        let (bin_dir, conf_dir) = (dir.join("cni-bin"), dir.join("cni-conf"));
        std::fs::create_dir_all(&bin_dir)?;
        std::fs::create_dir_all(&conf_dir)?;
        // containerd 1.6 takes one CNI bin dir: Velox plus the reference plugins (loopback).
        for entry in std::fs::read_dir("/usr/lib/cni")? {
            let entry = entry?;
            std::os::unix::fs::symlink(entry.path(), bin_dir.join(entry.file_name()))?;
        }
        std::os::unix::fs::symlink(&node.bins.velox, bin_dir.join("velox"))?;
        let cni_log = dir.join("velox.log");
        let conflist = node.conflist(&cni_log);
        std::fs::write(conf_dir.join("00-velox.conflist"), conflist.to_string())?;
        let d = dir.display().to_string();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
{CRI_PLUGIN}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"#
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let daemon = in_netns(&node.name, "containerd", &["--config", &format!("{d}/config.toml")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting containerd")?;
        let containerd = Self { dir, cni_log, daemon };
        let deadline = Instant::now() + Duration::from_secs(20);
        while containerd.ctr(&["version"]).is_err() {
            if Instant::now() > deadline {
                bail!("containerd did not start; see {d}/containerd.log");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let image = tools().join("images/pause.tar");
        containerd.ctr(&["-n", "k8s.io", "images", "import", image.to_str().context("path")?])?;
        Ok(containerd)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        run(
            "ctr",
            &[&["--address", self.socket().to_str().unwrap()][..], args].concat(),
        )
    }

    fn cri(&self, args: &[&str]) -> anyhow::Result<String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cri/cri.py");
        let output = Command::new("python3")
            .env("PYTHONPATH", tools().join("python"))
            .arg(script)
            .arg(self.socket())
            .args(args)
            .output()?;
        if !output.status.success() {
            bail!(
                "CRI {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// RunPodSandbox; returns once the sandbox is ready, with its IP.
    pub fn run_pod(&self, name: &str) -> anyhow::Result<Sandbox> {
        let answer: Value = serde_json::from_str(&self.cri(&["run", name])?)?;
        Ok(Sandbox {
            id: answer["id"].as_str().context("no id")?.to_string(),
            ip: answer["ip"].as_str().context("no ip")?.parse().context("sandbox IP")?,
            netns: answer["netns"].as_str().context("no netns")?.into(),
        })
    }

    pub fn stop_pod(&self, id: &str) -> anyhow::Result<()> {
        self.cri(&["stop", id]).map(drop)
    }

    pub fn remove_pod(&self, id: &str) -> anyhow::Result<()> {
        self.cri(&["rm", id]).map(drop)
    }

    /// CNI calls Velox logged, as (command, container id, milliseconds).
    pub fn cni_calls(&self) -> anyhow::Result<Vec<(String, String, f64)>> {
        let log = std::fs::read_to_string(&self.cni_log).unwrap_or_default();
        Ok(log
            .lines()
            .filter_map(|line| {
                let rest = &line[line.find("] ")? + 2..];
                let mut words = rest.split_whitespace();
                let command = words.next()?.to_string();
                let container = words.next()?.strip_prefix("container=")?.to_string();
                let ms = words.find_map(|w| w.strip_prefix("took_ms="))?.parse().ok()?;
                Some((command, container, ms))
            })
            .collect())
    }

    /// Removes every sandbox through the CRI, stops containerd and its shims, and
    /// removes its directory.
    pub fn shutdown(&mut self) -> anyhow::Result<()> {
        let mut errors = velox_node::ErrorList::default();
        if let Ok(ids) = self.cri(&["list"]) {
            for id in ids.lines() {
                errors.keep(self.stop_pod(id).and_then(|()| self.remove_pod(id)));
            }
        }
        errors.keep(self.wipe());
        Ok(errors.into_result()?)
    }

    /// Loses all runtime state at once, as a node reboot would: containerd and its
    /// shims killed, root and state removed, no CNI DEL called.
    pub fn wipe(&mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").arg(self.daemon.id().to_string()).status();
        let _ = self.daemon.wait();
        // Shims outlive containerd; they are ours if they name our socket.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.dir.display().to_string()])
            .status();
        unmount_under(&self.dir)?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)?;
        }
        Ok(())
    }
}

/// Unmounts every mount below `dir` (snapshots, sandbox shm), deepest first.
fn unmount_under(dir: &Path) -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount| Path::new(mount).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        run("umount", &["-l", mount])?;
    }
    Ok(())
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("shutting down containerd: {e:#}");
        }
    }
}
