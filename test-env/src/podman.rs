//! podman 4.3 with its CNI backend, run inside a node's netns with a root, run root and
//! network config dir of its own. The toolbox image is built offline by `cargo xtask
//! setup`.

use anyhow::Context;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{in_netns, Node};

pub const TOOLBOX: &str = "velox.test/toolbox:1";

pub struct Podman {
    pub dir: PathBuf,
    pub network: String,
    /// Velox's log of the CNI calls podman made.
    pub cni_log: PathBuf,
    node: String,
}

impl Podman {
    pub fn new(node: &Node) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!("/run/velox-test/podman-{}", node.name));
        let _ = std::fs::remove_dir_all(&dir);
        let net_dir = dir.join("net.d");
        std::fs::create_dir_all(&net_dir)?;
        let cni_log = dir.join("velox.log");
        let conflist = node.conflist(&cni_log);
        let network = conflist["name"].as_str().context("network name")?.to_string();
        std::fs::write(net_dir.join(format!("{network}.conflist")), conflist.to_string())?;
        let velox_dir = node.bins.velox.parent().context("velox dir")?;
        // runc, cgroupfs and ulimits of 4096: root may lack CAP_SYS_RESOURCE (no
        // raising limits) and cgroups may be hybrid (v1 with a v2 mount beside).
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
                 network_config_dir = \"{}\"\n",
                velox_dir.display(),
                net_dir.display()
            ),
        )?;
        let podman = Self {
            dir,
            network,
            cni_log,
            node: node.name.clone(),
        };
        let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/images/toolbox.tar");
        podman.run(&["load", "-q", "-i", image.to_str().context("path")?])?;
        Ok(podman)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = in_netns(&self.node, "podman", &[]);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args);
        cmd
    }

    /// Runs podman, failing with its stderr.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.command(args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// A container of the toolbox image on the Velox network; returns its IP.
    pub fn start(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        self.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.network,
            "--cap-add",
            "NET_RAW",
            TOOLBOX,
        ])?;
        let ip = self.run(&[
            "inspect",
            name,
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        ])?;
        ip.parse()
            .with_context(|| format!("container {name} has no IPv4 address: {ip:?}"))
    }

    pub fn exec(&self, container: &str, args: &[&str]) -> anyhow::Result<String> {
        self.run(&[&["exec", container][..], args].concat())
    }

    /// Removes every container and image and podman's directory.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        let removed = self
            .run(&["rm", "-a", "-f", "-t", "0"])
            .and_then(|_| self.run(&["rmi", "-a", "-f"]));
        let _ = Command::new("umount").arg("-R").arg(self.dir.join("root")).output();
        let _ = Command::new("umount").arg("-R").arg(self.dir.join("runroot")).output();
        std::fs::remove_dir_all(&self.dir)?;
        removed.map(drop)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if self.dir.exists() {
            if let Err(e) = self.shutdown() {
                eprintln!("shutting down podman: {e:#}");
            }
        }
    }
}
