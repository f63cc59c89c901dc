//! Velox's test environment: a node is a network namespace with its own loader,
//! bpffs root and state dir; a pod is a network namespace wired up by running the
//! real `velox` binary inside the node's namespace, exactly as a runtime does
//! (CNI_* environment, config on stdin).
//!
//! `nsenter --net` is used rather than `ip netns exec`, which remounts /sys and
//! would hide the bpffs pins.

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use velox_cni::endpoint::EndpointStore;

/// The release binaries under test: `$VELOX_BIN_DIR`, else the workspace's target/release.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub velox: PathBuf,
    pub loader: PathBuf,
}

impl Binaries {
    pub fn locate() -> anyhow::Result<Self> {
        let dir = std::env::var_os("VELOX_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
        let bins = Self {
            velox: dir.join("velox"),
            loader: dir.join("velox-loader"),
        };
        for bin in [&bins.velox, &bins.loader] {
            if !bin.is_file() {
                bail!("{} is missing: run `cargo xtask build`", bin.display());
            }
        }
        Ok(bins)
    }
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

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Network namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

fn delete_netns(name: &str) -> anyhow::Result<()> {
    if netns_exists(name) {
        run("ip", &["netns", "del", name])?;
    }
    Ok(())
}

/// A command inside the network namespace `netns` (a name under /run/netns).
pub fn in_netns(netns: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}")).arg(program).args(args);
    cmd
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    if Command::new("mountpoint")
        .args(["-q", "/sys/fs/bpf"])
        .status()?
        .success()
    {
        return Ok(());
    }
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).map(drop)
}

/// Two namespaces `<prefix>-l` and `<prefix>-r` joined by a bare veth pair: the
/// same-node limit any CNI is measured against.
pub fn direct_veth_pair(prefix: &str) -> anyhow::Result<(Pod, Pod)> {
    let (left, right) = (format!("{prefix}-l"), format!("{prefix}-r"));
    let result = (|| {
        run("ip", &["netns", "add", &left])?;
        run("ip", &["netns", "add", &right])?;
        run(
            "ip",
            &[
                "-n", &left, "link", "add", "veth-l", "type", "veth", "peer", "name", "veth-r", "netns", &right,
            ],
        )?;
        let ends = [(&left, "veth-l", "10.99.0.1"), (&right, "veth-r", "10.99.0.2")];
        for (ns, ifname, ip) in ends {
            run("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(ends.map(|(ns, _, ip)| Pod {
            name: ns.clone(),
            ip: ip.parse().unwrap(),
        }))
    })();
    if result.is_err() {
        let _ = remove_direct_veth_pair(prefix);
    }
    result.map(|[l, r]| (l, r))
}

pub fn remove_direct_veth_pair(prefix: &str) -> anyhow::Result<()> {
    for ns in [format!("{prefix}-l"), format!("{prefix}-r")] {
        delete_netns(&ns)?;
    }
    Ok(())
}

/// What one CNI invocation returned.
#[derive(Debug)]
pub struct CniOutcome {
    pub success: bool,
    pub stdout: Value,
    pub elapsed: Duration,
}

impl CniOutcome {
    /// The error code, for a failed call.
    pub fn code(&self) -> Option<u64> {
        (!self.success).then(|| self.stdout["code"].as_u64()).flatten()
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(in_netns(&self.name, program, args).output()?)
    }

    /// `count` pings to `ip`; true when every one was answered.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        self.exec(
            "ping",
            &["-c", &count.to_string(), "-i", "0.1", "-W", "1", "-q", &ip.to_string()],
        )
        .is_ok_and(|o| o.status.success())
    }

    /// iperf3 TCP from this pod to `server` for `seconds`; Gbit/s received.
    pub fn iperf3_to(&self, server: &Pod, seconds: u32) -> anyhow::Result<f64> {
        let mut listener = in_netns(&server.name, "iperf3", &["-s", "-1", "-B", &server.ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        // iperf3 3.12 exits 0 even when it cannot connect: the report says.
        let report = loop {
            let output = self.exec(
                "iperf3",
                &["-c", &server.ip.to_string(), "-t", &seconds.to_string(), "-J"],
            )?;
            let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 report")?;
            if report.get("error").is_none() || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(100)); // the server is still starting
        };
        let _ = listener.kill();
        let _ = listener.wait();
        match report["end"]["sum_received"]["bits_per_second"].as_f64() {
            Some(bps) => Ok(bps / 1e9),
            None => bail!("iperf3 to {} failed: {}", server.ip, report["error"]),
        }
    }
}

/// One simulated node. Creating is explicit (`up`), and so is removing (`down`), so
/// `cargo xtask test-env up` can leave a node running; tests wrap it in [`NodeGuard`].
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub subnet: Ipv4Net,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub bins: Binaries,
}

impl Node {
    pub fn new(name: &str, subnet: Ipv4Net, bins: Binaries) -> Self {
        Self {
            name: name.to_string(),
            subnet,
            bpffs_root: PathBuf::from(format!("/sys/fs/bpf/velox-{name}")),
            state_dir: PathBuf::from(format!("/run/velox-test/{name}")),
            bins,
        }
    }

    /// The node's netns with loopback up and its loader running.
    pub fn up(&self) -> anyhow::Result<()> {
        ensure_bpffs()?;
        run("ip", &["netns", "add", &self.name])?;
        run("ip", &["-n", &self.name, "link", "set", "lo", "up"])?;
        self.start_loader()
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
        std::fs::create_dir_all(&self.state_dir)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.state_dir.join("loader.log"))?;
        let child = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap()])
            .args(["--state-dir", self.state_dir.to_str().unwrap()])
            .args(["run", "--reconcile-interval", "1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting velox-loader")?;
        std::fs::write(self.loader_pid_file(), child.id().to_string())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.status().success {
                return Ok(());
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
            "subnet": self.subnet.to_string(),
            "mtu": 1500,
            "bpffsRoot": self.bpffs_root,
            "stateDir": self.state_dir,
            "logFile": self.state_dir.join("cni.log"),
            "logLevel": "info",
        })
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
        let mut cmd = in_netns(&self.name, self.bins.velox.to_str().unwrap(), &[]);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/usr/lib/cni")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        if let Some(netns) = netns {
            cmd.env("CNI_NETNS", netns);
        }
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes())?;
        let output = child.wait_with_output()?;
        let elapsed = start.elapsed();
        let stdout = if output.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!(
                    "velox {command} printed non-JSON: {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            })?
        };
        Ok(CniOutcome {
            success: output.status.success(),
            stdout,
            elapsed,
        })
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
        run("ip", &["netns", "add", pod])?;
        run("ip", &["-n", pod, "link", "set", "lo", "up"])?;
        let netns = Path::new("/run/netns").join(pod);
        let outcome = self.cni("ADD", pod, Some(&netns), "eth0", &self.conf("1.1.0"))?;
        if !outcome.success {
            let _ = delete_netns(pod);
            bail!("ADD of {pod} failed: {}", outcome.stdout);
        }
        let address: Ipv4Net = outcome.stdout["ips"][0]["address"]
            .as_str()
            .context("ADD result has no address")?
            .parse()?;
        Ok(Pod {
            name: pod.to_string(),
            ip: address.addr(),
        })
    }

    /// DEL as a runtime does when a pod goes, then the pod's netns goes.
    pub fn delete_pod(&self, pod: &str) -> anyhow::Result<()> {
        let netns = Path::new("/run/netns").join(pod);
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

    /// The pods this node's records know, as (name, IP).
    pub fn pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(EndpointStore::new(&self.state_dir)
            .list()?
            .into_iter()
            .map(|r| Pod {
                name: r.container_id,
                ip: r.ip,
            })
            .collect())
    }

    /// `velox-loader endpoints --json` run in the node.
    pub fn endpoints(&self) -> anyhow::Result<Vec<Value>> {
        let output = in_netns(&self.name, self.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", self.bpffs_root.to_str().unwrap(), "endpoints", "--json"])
            .output()?;
        if !output.status.success() {
            bail!("velox-loader endpoints: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The endpoint dump row of `ip`.
    pub fn endpoint(&self, ip: Ipv4Addr) -> anyhow::Result<Value> {
        self.endpoints()?
            .into_iter()
            .find(|e| e["ip"] == ip.to_string())
            .with_context(|| format!("{ip} is not in the endpoint map"))
    }

    /// Turns off the node's IP forwarding, leaving pod-to-pod traffic to eBPF alone.
    pub fn disable_ip_forwarding(&self) -> anyhow::Result<()> {
        let output = self.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])?;
        anyhow::ensure!(
            output.status.success(),
            "sysctl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// A command in the node's netns (a host process of that node).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(in_netns(&self.name, program, args).output()?)
    }

    /// Removes everything: pods (by DEL, as a runtime would), the loader, the netns,
    /// the pins and the state. Keeps going past failures and reports them all.
    pub fn down(&self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if netns_exists(&self.name) {
            for pod in self.pods().unwrap_or_default() {
                errors.extend(self.delete_pod(&pod.name).err());
            }
        }
        errors.extend(self.stop_loader(Signal::SIGTERM).err());
        // Pods a test made by hand are named after their node.
        for netns in netns_with_prefix(&format!("{}-", self.name)) {
            errors.extend(delete_netns(&netns).err());
        }
        errors.extend(delete_netns(&self.name).err());
        for dir in [&self.bpffs_root, &self.state_dir] {
            if dir.exists() {
                errors.extend(
                    std::fs::remove_dir_all(dir)
                        .with_context(|| format!("removing {}", dir.display()))
                        .err(),
                );
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => bail!(
                "{}",
                errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>().join("; ")
            ),
        }
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

/// A node that is taken down when the guard drops, also when a test panics.
pub struct NodeGuard(pub Node);

impl NodeGuard {
    /// A fresh node whose names are unique to this process, so tests run in parallel.
    pub fn up(tag: &str) -> anyhow::Result<Self> {
        let name = format!("vt{}-{tag}", std::process::id());
        let node = Node::new(&name, "200.200.1.0/24".parse()?, Binaries::locate()?);
        let guard = Self(node);
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

    /// Takes the node down and fails if anything it made is still there.
    pub fn finish(self) -> anyhow::Result<()> {
        self.0.down()?;
        let left = self.0.leftovers();
        anyhow::ensure!(left.is_empty(), "left over after down: {left:?}");
        Ok(())
    }
}

impl std::ops::Deref for NodeGuard {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.0
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("tearing down {}: {e:#}", self.0.name);
        }
    }
}
