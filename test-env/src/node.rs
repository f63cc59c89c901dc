//! A node: a network namespace with its own loader, bpffs root and state dir.

use anyhow::{bail, Context};
use ipnet::IpNet;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use velox_node::endpoint::EndpointStore;
use velox_node::{ErrorList, Family, StateDir};

use crate::cni::{exec_plugin, CniOutcome, Invocation};
use crate::guard::{Guard, TearDown};
use crate::netns::{create_host_netns, create_pod_netns, delete_netns, in_netns, netns_exists, netns_with_prefix};
use crate::{Binaries, Pod};

/// One simulated node. Creating is explicit (`up`), and so is removing (`down`), so
/// `cargo xtask test-env up` can leave a node running; tests wrap it in [`NodeGuard`].
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// Its pod CIDRs, one per family.
    pub subnets: Vec<IpNet>,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    /// The MTU the CNI config gives pods.
    pub pod_mtu: u32,
    pub bins: Binaries,
    /// Set for a node of a cluster: its uplink `eth0` joins the underlay.
    pub underlay: Option<Underlay>,
}

/// A running `velox-loader monitor --json`; it stops when dropped.
pub struct Monitor {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<Value>,
}

impl Monitor {
    /// Calls `provoke` until an event `wanted` accepts comes, for up to `within`.
    pub fn wait_for(
        &self,
        within: Duration,
        mut provoke: impl FnMut(),
        wanted: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            provoke();
            while let Ok(event) = self.events.recv_timeout(Duration::from_millis(200)) {
                if wanted(&event) {
                    return Ok(event);
                }
            }
        }
        bail!("no such event within {within:?}")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a cluster node reaches the others.
#[derive(Clone, Debug)]
pub struct Underlay {
    /// One per family, IPv4 first.
    pub node_ips: Vec<IpAddr>,
    /// The cluster's node list, shared by every node's loader.
    pub peers_file: PathBuf,
    /// The cluster's objects (NetworkPolicies, Pods, Namespaces): a directory of
    /// Kubernetes JSON every node's loader reads, unless a test gives its own.
    pub cluster_state: PathBuf,
}

impl Node {
    /// The dual-stack pod CIDRs of the test environment's first node.
    pub fn default_subnets() -> Vec<IpNet> {
        vec!["200.200.1.0/24".parse().unwrap(), "fd00:200:1::/64".parse().unwrap()]
    }

    pub fn new(name: &str, subnets: Vec<IpNet>, bins: Binaries) -> Self {
        Self {
            name: name.to_string(),
            subnets,
            bpffs_root: PathBuf::from(format!("/sys/fs/bpf/velox-{name}")),
            state_dir: PathBuf::from(format!("/run/velox-test/{name}")),
            pod_mtu: 1500,
            bins,
            underlay: None,
        }
    }

    /// A standalone node: its netns with loopback up, and its loader running.
    pub fn up(&self) -> anyhow::Result<()> {
        self.create_netns()?;
        self.start_loader()
    }

    pub fn create_netns(&self) -> anyhow::Result<()> {
        create_host_netns(&self.name)
    }

    fn loader_pid_file(&self) -> PathBuf {
        self.state_dir.join("loader.pid")
    }

    pub fn loader_pid(&self) -> Option<Pid> {
        let pid: i32 = std::fs::read_to_string(self.loader_pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let pid = Pid::from_raw(pid);
        kill(pid, None).is_ok().then_some(pid)
    }

    /// Starts `velox-loader run` in the node's netns, in its own process group so it
    /// outlives the caller, and waits until it answers on its health socket.
    pub fn start_loader(&self) -> anyhow::Result<()> {
        self.start_loader_with(&[])
    }

    /// Stops the loader (SIGTERM) and starts it again with `run_flags`.
    pub fn restart_loader_with(&self, run_flags: &[&str]) -> anyhow::Result<()> {
        self.stop_loader(Signal::SIGTERM)?;
        self.start_loader_with(run_flags)
    }

    /// `start_loader` with more `velox-loader run` flags.
    pub fn start_loader_with(&self, run_flags: &[&str]) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.state_dir.join("loader.log"))?;
        let mut child = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap()])
            .args(["--state-dir", self.state_dir.to_str().unwrap()])
            .arg("run")
            // Tests see the periodic pass within a second, unless they ask otherwise.
            .args(unless_given(run_flags, "--reconcile-interval", "1"))
            .args(run_flags)
            // A loader pointed at the (stand-in) API server learns the other nodes,
            // its uplink and its pod CIDRs there, as in a real cluster.
            .args(
                self.underlay
                    .iter()
                    .filter(|_| !run_flags.contains(&"--kubeconfig"))
                    .flat_map(|u| {
                        let pod_cidrs = self
                            .subnets
                            .iter()
                            .flat_map(|s| ["--pod-cidr".to_string(), s.to_string()]);
                        let cluster_state =
                            unless_given(run_flags, "--cluster-state", &u.cluster_state.display().to_string());
                        ["--uplink", "eth0", "--peers-file", u.peers_file.to_str().unwrap()]
                            .map(String::from)
                            .into_iter()
                            .chain(pod_cidrs)
                            .chain(cluster_state)
                    }),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting velox-loader")?;
        std::fs::write(self.loader_pid_file(), child.id().to_string())?;
        // Loading verifies the programs: from_pod alone takes ~1.6 s of one idle
        // core, and many times that when CI runs other loaders and containerd beside.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.status().success {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(self.state_dir.join("loader.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "velox-loader on {} exited ({status}); the end of {}/loader.log:\n{}",
                    self.name,
                    self.state_dir.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "velox-loader on {} did not become ready; see {}/loader.log",
            self.name,
            self.state_dir.display()
        )
    }

    /// Stops the loader with `signal` and waits until it is gone.
    pub fn stop_loader(&self, signal: Signal) -> anyhow::Result<()> {
        let Some(pid) = self.loader_pid() else {
            return Ok(());
        };
        kill(pid, signal)?;
        // Reap it if it is our child; otherwise wait for it to disappear.
        let _ = nix::sys::wait::waitpid(pid, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while kill(pid, None).is_ok() {
            if Instant::now() > deadline {
                bail!("velox-loader {pid} did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.loader_pid_file());
        Ok(())
    }

    /// The network config a runtime would pass for this node.
    pub fn conf(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "name": format!("velox-{}", self.name),
            "type": "velox",
            "subnets": self.subnets,
            "mtu": self.pod_mtu,
            "bpffsRoot": self.bpffs_root,
            "stateDir": self.state_dir,
            "logFile": self.state_dir.join("cni.log"),
            "logLevel": "info",
        })
    }

    /// The node's network as a runtime's conflist (cniVersion 1.0.0, the newest that
    /// containerd 1.6 and podman 4.3 speak), logging Velox's calls to `log_file`.
    pub fn conflist(&self, log_file: &Path) -> Value {
        let mut plugin = self.conf("1.0.0");
        let plugin_keys = plugin.as_object_mut().expect("an object");
        let name = plugin_keys.remove("name");
        plugin_keys.remove("cniVersion");
        plugin["logFile"] = json!(log_file);
        json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]})
    }

    /// Runs `velox` inside the node's netns with the CNI_* variables and `conf` on stdin.
    pub fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
    ) -> anyhow::Result<CniOutcome> {
        let call = Invocation::new(command, container_id, netns, ifname);
        exec_plugin(&self.name, &self.bins.velox, &call, conf)
    }

    /// STATUS with the latest version.
    pub fn status(&self) -> CniOutcome {
        self.cni("STATUS", "", None, "", &self.conf("1.1.0"))
            .unwrap_or(CniOutcome {
                success: false,
                stdout: Value::Null,
                elapsed: Duration::ZERO,
            })
    }

    /// A pod: a new netns named `pod` and an ADD for container ID `pod`, ifname eth0.
    pub fn add_pod(&self, pod: &str) -> anyhow::Result<Pod> {
        create_pod_netns(pod)?;
        self.add_to_netns(pod, "").map(|(pod, _)| pod)
    }

    /// ADD of `pod` (whose netns `create_pod_netns` made) as kubelet adds the
    /// Kubernetes pod `namespace/name`: its name in CNI_ARGS. Returns the pod and how
    /// long ADD took.
    pub fn add_kubernetes_pod(&self, pod: &str, namespace: &str, name: &str) -> anyhow::Result<(Pod, Duration)> {
        self.add_to_netns(pod, &crate::cni::kubernetes_args(namespace, name, pod))
    }

    /// ADD for container ID `pod`, ifname eth0, in the netns `pod`, with CNI_ARGS
    /// `args`; the netns goes when ADD fails.
    fn add_to_netns(&self, pod: &str, args: &str) -> anyhow::Result<(Pod, Duration)> {
        let netns = crate::netns_path(pod);
        let call = Invocation {
            args,
            ..Invocation::new("ADD", pod, Some(&netns), "eth0")
        };
        let outcome = exec_plugin(&self.name, &self.bins.velox, &call, &self.conf("1.1.0"))?;
        if !outcome.success {
            let _ = delete_netns(pod);
            bail!("ADD of {pod} failed: {}", outcome.stdout);
        }
        Ok((Pod::from_result(pod, &outcome.stdout)?, outcome.elapsed))
    }

    /// DEL as a runtime does when a pod goes, then the pod's netns goes.
    pub fn delete_pod(&self, pod: &str) -> anyhow::Result<()> {
        let netns = crate::netns_path(pod);
        let outcome = self.cni(
            "DEL",
            pod,
            netns.exists().then_some(netns.as_path()),
            "eth0",
            &self.conf("1.1.0"),
        )?;
        if !outcome.success {
            bail!("DEL of {pod} failed: {}", outcome.stdout);
        }
        delete_netns(pod)
    }

    /// The node's own cgroup (v2): processes of its pods and host that the socket load
    /// balancer acts on. Created on first use, removed by `down`.
    pub fn cgroup(&self) -> anyhow::Result<PathBuf> {
        let cgroup = velox_node::layout::cgroup2_root()?.join(format!("velox-test-{}", self.name));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        Ok(cgroup)
    }

    fn cgroup_if_made(&self) -> Option<PathBuf> {
        let cgroup = velox_node::layout::cgroup2_root()
            .ok()?
            .join(format!("velox-test-{}", self.name));
        cgroup.exists().then_some(cgroup)
    }

    /// Addresses of either family the node's built-in IPAM holds.
    pub fn reserved_addresses(&self) -> usize {
        let ipam_dir = self.state_dir.join("ipam").join(format!("velox-{}", self.name));
        std::fs::read_dir(&ipam_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<IpAddr>().is_ok())
                    .count()
            })
            .unwrap_or(0)
    }

    /// Counters slots claimed by pods, and the interfaces the datapath counts for
    /// pods (the interface map's entries other than the uplink's slot 0).
    pub fn counted_pods(&self) -> anyhow::Result<(usize, usize)> {
        let store = velox_node::endpoint::EndpointStore::new(&velox_node::StateDir::new(&self.state_dir));
        let claims = store.slots()?.len();
        let interfaces = self.dump("stats")?.iter().filter(|row| row["slot"] != 0).count();
        Ok((claims, interfaces))
    }

    /// The pods this node's records know.
    pub fn pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(EndpointStore::new(&StateDir::new(&self.state_dir))
            .list()?
            .into_iter()
            .map(|r| Pod {
                name: r.container_id,
                ips: r.ips,
            })
            .collect())
    }

    /// The loader's Prometheus metrics, from `--metrics-address` `address` in the
    /// node's netns: each sample's name with labels, and its value.
    pub fn metrics(&self, address: &str) -> anyhow::Result<Vec<(String, f64)>> {
        let url = format!("http://{address}/metrics");
        let output = in_netns(&self.name, "busybox", &["wget", "-q", "-O", "-", &url]).output()?;
        if !output.status.success() {
            bail!("fetching {url}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (sample, value) = line.rsplit_once(' ')?;
                Some((sample.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// `velox-loader health`: the loader's answer, ready or not.
    pub fn health(&self) -> anyhow::Result<Value> {
        let output = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--state-dir", self.state_dir.to_str().unwrap(), "health"])
            .output()?;
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("velox-loader health: {}", String::from_utf8_lossy(&output.stderr)))
    }

    /// Whether `velox-loader health` with `flags` (`--live`) succeeds, as a probe
    /// of the DaemonSet asks it.
    pub fn health_probe(&self, flags: &[&str]) -> bool {
        in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--state-dir", self.state_dir.to_str().unwrap(), "health"])
            .args(flags)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// `velox-loader <view> --json` (endpoints, peers, stats) run in the node.
    pub fn dump(&self, view: &str) -> anyhow::Result<Vec<Value>> {
        let output = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap()])
            .args(["--state-dir", self.state_dir.to_str().unwrap(), view, "--json"])
            .output()?;
        if !output.status.success() {
            bail!("velox-loader {view}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// `velox-loader <args>` on the node, for its bpffs root and state dir: what it
    /// printed (stdout, stderr); an error when it fails.
    pub fn loader_cli(&self, args: &[&str]) -> anyhow::Result<(String, String)> {
        let output = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap()])
            .args(["--state-dir", self.state_dir.to_str().unwrap()])
            .args(args)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            bail!("velox-loader {args:?}: {stderr}");
        }
        Ok((String::from_utf8_lossy(&output.stdout).into_owned(), stderr))
    }

    /// `velox-loader flows --json <args>`: the records the loader kept, one object
    /// each, and what it said of those it could not keep (stderr).
    pub fn flows(&self, args: &[&str]) -> anyhow::Result<(Vec<Value>, String)> {
        let (stdout, stderr) = self.loader_cli(&[&["flows", "--json"], args].concat())?;
        let records = stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        Ok((records, stderr))
    }

    /// One request by `velox-probe <mode> <to>` from `netns`, as a process of the
    /// node's cgroup (where the socket load balancer acts): its JSON line.
    pub fn probe(&self, netns: &str, mode: &str, to: std::net::SocketAddr) -> anyhow::Result<Value> {
        let cgroup = self.cgroup()?;
        let to = to.to_string();
        let probe = self.bins.probe.to_str().context("probe path")?;
        let output = crate::netns::in_netns_and_cgroup(netns, &cgroup, probe, &[mode, &to]).output()?;
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("velox-probe {mode} {to}: {}", String::from_utf8_lossy(&output.stderr)))
    }

    /// `velox-loader monitor --json` on the node, its events read as they come.
    pub fn monitor(&self) -> anyhow::Result<Monitor> {
        use std::io::BufRead;
        let mut child = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap()])
            .args(["--state-dir", self.state_dir.to_str().unwrap(), "monitor", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting velox-loader monitor")?;
        let (lines, events) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("the monitor's stdout")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str(&line) {
                    let _ = lines.send(event);
                }
            }
        });
        Ok(Monitor { child, events })
    }

    pub fn endpoints(&self) -> anyhow::Result<Vec<Value>> {
        self.dump("endpoints")
    }

    /// The endpoint dump row of `ip`, if the endpoint map has it.
    pub fn endpoint(&self, ip: IpAddr) -> anyhow::Result<Value> {
        self.endpoints()?
            .into_iter()
            .find(|e| e["ip"] == ip.to_string() && e["state"] != "no map entry")
            .with_context(|| format!("{ip} is not in the endpoint map"))
    }

    /// Turns off the node's forwarding of both families, leaving pod-to-pod traffic
    /// to eBPF alone.
    pub fn disable_ip_forwarding(&self) -> anyhow::Result<()> {
        let output = self.exec(
            "sysctl",
            &["-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"],
        )?;
        anyhow::ensure!(
            output.status.success(),
            "sysctl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// The node's address of `family` on the underlay (cluster nodes only).
    pub fn node_ip(&self, family: Family) -> IpAddr {
        let underlay = self.underlay.as_ref().expect("cluster nodes have an underlay");
        underlay
            .node_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
            .expect("cluster nodes are dual-stack")
    }

    /// A command in the node's netns (a host process of that node).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(in_netns(&self.name, program, args).output()?)
    }

    /// Removes everything: pods (by DEL, as a runtime would), the loader, the netns,
    /// the pins and the state. Keeps going past failures and reports them all.
    pub fn down(&self) -> anyhow::Result<()> {
        let mut errors = ErrorList::default();
        if netns_exists(&self.name) {
            for pod in self.pods().unwrap_or_default() {
                errors.keep(self.delete_pod(&pod.name));
            }
        }
        errors.keep(self.stop_loader(Signal::SIGTERM));
        // Pods a test made by hand are named after their node.
        for netns in netns_with_prefix(&format!("{}-", self.name)) {
            errors.keep(delete_netns(&netns));
        }
        errors.keep(delete_netns(&self.name));
        if let Some(cgroup) = self.cgroup_if_made() {
            // Empty once its processes are gone.
            errors.keep(std::fs::remove_dir(&cgroup).with_context(|| format!("removing {}", cgroup.display())));
        }
        for dir in [&self.bpffs_root, &self.state_dir] {
            if dir.exists() {
                errors.keep(std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display())));
            }
        }
        Ok(errors.into_result()?)
    }

    /// What `down` should have removed but is still there.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = netns_with_prefix(&self.name)
            .into_iter()
            .map(|n| format!("netns {n}"))
            .collect();
        for dir in [&self.bpffs_root, &self.state_dir] {
            if dir.exists() {
                left.push(dir.display().to_string());
            }
        }
        if let Some(cgroup) = self.cgroup_if_made() {
            left.push(cgroup.display().to_string());
        }
        let root = self.bpffs_root.to_str().unwrap_or_default();
        if Command::new("pgrep")
            .args(["-f", root])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            left.push("velox-loader process".into());
        }
        left
    }
}

/// A node for one test, taken down when the guard drops.
pub type NodeGuard = Guard<Node>;

impl TearDown for Node {
    fn down(&self) -> anyhow::Result<()> {
        Node::down(self)
    }

    fn leftovers(&self) -> Vec<String> {
        Node::leftovers(self)
    }
}

impl NodeGuard {
    /// A fresh node whose names are unique to this process, so tests run in parallel.
    pub fn up(tag: &str) -> anyhow::Result<Self> {
        Self::up_with_subnets(tag, Node::default_subnets())
    }

    /// `up`, with other pod CIDRs (more pods than a /24 holds).
    pub fn up_with_subnets(tag: &str, subnets: Vec<IpNet>) -> anyhow::Result<Self> {
        let name = format!("vt{}-{tag}", std::process::id());
        let guard = Self(Node::new(&name, subnets, Binaries::locate()?));
        guard.0.up()?;
        Ok(guard)
    }

    /// A pod name unique to this node.
    pub fn pod_name(&self, pod: &str) -> String {
        format!("{}-{pod}", self.0.name)
    }

    pub fn add_pod(&self, pod: &str) -> anyhow::Result<Pod> {
        self.0.add_pod(&self.pod_name(pod))
    }
}

/// `flag value`, unless `run_flags` already give `flag`.
fn unless_given(run_flags: &[&str], flag: &str, value: &str) -> Vec<String> {
    match run_flags.contains(&flag) {
        true => Vec::new(),
        false => vec![flag.to_string(), value.to_string()],
    }
}
