//! A real Kubernetes cluster on this machine: etcd, kube-apiserver (real
//! certificates, RBAC), kube-controller-manager (node IPAM, the EndpointSlice
//! controller, service account tokens) and kube-scheduler in a router netns, and two
//! nodes: each runs containerd and a kubelet in a netns, a cgroup2 subtree and a
//! mount namespace of its own, in which the node's host paths (`/etc/cni/net.d`,
//! `/opt/cni/bin`, `/var/lib/kubelet`, `/run/velox`, `/run/netns`, containerd's
//! dirs, a bpffs of its own at `/sys/fs/bpf`) are the node's, so nothing of the
//! machine's is touched. Velox goes
//! on it as a user installs it: the image imported into containerd, the manifest
//! applied with kubectl.
//!
//! Kubernetes v1.20.2, built from Debian's source package by `cargo xtask setup`
//! (the newest that builds here). The kubelets share the machine's cgroup v1
//! hierarchies, each under a cgroup root of its own; its cgroup2 subtree is the
//! cgroup2 root its node sees, so a node's socket load balancer acts on that node's
//! processes alone.
//!
//! ```text
//!   router netns <tag>r: 10.0.0.1 (br0)        node netns <tag>n1: 10.0.0.3 (eth0)
//!   etcd (127.0.0.1:2379)              +-----  containerd, kubelet (node1), Velox
//!   kube-apiserver :6443  --- br0 ----+        node netns <tag>n2: 10.0.0.4 (eth0)
//!   controller-manager, scheduler      +-----  containerd, kubelet (node2), Velox
//! ```

use anyhow::{bail, Context};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::{create_host_netns, delete_netns, netns_path};
use crate::{run, wait_for};

pub const KUBERNETES_VERSION: &str = "v1.20.2";

/// Where `cargo xtask setup` keeps the Kubernetes binaries, across clones of the
/// project on this machine: their build takes about ten minutes on two cores.
pub fn kubernetes_bin_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(format!(".cache/velox/kubernetes-{KUBERNETES_VERSION}/bin"))
}

pub const ROUTER_IP: &str = "10.0.0.1";
/// The nodes: name and address.
pub const NODES: [(&str, &str); 2] = [("node1", "10.0.0.3"), ("node2", "10.0.0.4")];
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The sysctls kubelet sets on the machine (they are not per netns): put back after.
const KUBELET_SYSCTLS: [&str; 3] = ["vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops"];

pub struct RealCluster {
    pub dir: PathBuf,
    pub router: String,
    pub nodes: Vec<RealNode>,
    /// The control plane's processes.
    daemons: Vec<(String, Child)>,
    sysctls: Vec<(String, String)>,
}

/// A node of the real cluster: a machine of its own as far as Kubernetes can tell.
pub struct RealNode {
    pub name: String,
    pub ip: String,
    pub netns: String,
    dir: PathBuf,
    /// The node's stand-in for a machine: a process holding its mount namespace.
    host: Option<Child>,
    /// The node's cgroup2 subtree, the cgroup2 root in its mount namespace: every
    /// process of the node runs in it.
    cgroup: PathBuf,
    /// The kubelet's cgroup root in the v1 hierarchies.
    cgroup_root: String,
    /// The kubelet's command line.
    kubelet: Vec<String>,
    daemons: Vec<(String, Child)>,
}

impl RealCluster {
    /// The control plane and the nodes, registered (NotReady: no network plugin
    /// yet), the test images in their containerd.
    pub fn up(tag: &str) -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!("/run/velox-test/{tag}-kubernetes"));
        let cgroup2 = velox_node::layout::cgroup2_root()?;
        let nodes = NODES
            .iter()
            .enumerate()
            .map(|(i, (name, ip))| RealNode {
                name: name.to_string(),
                ip: ip.to_string(),
                netns: format!("{tag}n{}", i + 1),
                dir: dir.join(name),
                host: None,
                cgroup: cgroup2.join(format!("velox-test-{tag}-{name}")),
                cgroup_root: format!("/velox-test-{tag}-{name}"),
                kubelet: Vec::new(),
                daemons: Vec::new(),
            })
            .collect();
        let mut cluster = Self {
            router: format!("{tag}r"),
            nodes,
            dir,
            daemons: Vec::new(),
            sysctls: KUBELET_SYSCTLS
                .iter()
                .map(|name| Ok((name.to_string(), run("sysctl", &["-n", name])?.trim().to_string())))
                .collect::<anyhow::Result<_>>()?,
        };
        match cluster.build() {
            Ok(()) => Ok(cluster),
            Err(e) => {
                let logs = cluster.dir.display().to_string();
                let _ = cluster.down();
                Err(e.context(format!("starting the real cluster (logs were in {logs})")))
            }
        }
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let bin = kubernetes_bin_dir();
        anyhow::ensure!(
            bin.join("kubelet").exists(),
            "no Kubernetes binaries in {}: run `cargo xtask setup`",
            bin.display()
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)?;
        let pki = self.dir.join("pki");
        write_pki(&pki)?;
        let router = self.router.as_str();
        create_host_netns(router)?;
        run("ip", &["-n", router, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &["-n", router, "addr", "add", &format!("{ROUTER_IP}/24"), "dev", "br0"],
        )?;
        run("ip", &["-n", router, "link", "set", "br0", "up"])?;
        for (i, node) in self.nodes.iter().enumerate() {
            let port = format!("n{}", i + 1);
            create_host_netns(&node.netns)?;
            run(
                "ip",
                &[
                    "-n",
                    router,
                    "link",
                    "add",
                    &port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &node.netns,
                ],
            )?;
            run("ip", &["-n", router, "link", "set", &port, "master", "br0", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &node.netns,
                    "addr",
                    "add",
                    &format!("{}/24", node.ip),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &node.netns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &node.netns, "route", "add", "default", "via", ROUTER_IP])?;
        }

        let p = |file: &str| pki.join(file).display().to_string();
        let etcd_dir = self.dir.join("etcd").display().to_string();
        self.daemon(
            "etcd",
            self.in_router("etcd"),
            &[
                "--data-dir",
                &etcd_dir,
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
            ],
        )?;
        let apiserver = bin.join("kube-apiserver");
        self.daemon(
            "kube-apiserver",
            self.in_router(apiserver.to_str().context("path")?),
            &[
                "--etcd-servers=http://127.0.0.1:2379",
                &format!("--bind-address={ROUTER_IP}"),
                &format!("--advertise-address={ROUTER_IP}"),
                "--secure-port=6443",
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                &format!("--client-ca-file={}", p("ca.crt")),
                &format!("--tls-cert-file={}", p("apiserver.crt")),
                &format!("--tls-private-key-file={}", p("apiserver.key")),
                &format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
                &format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                &format!("--kubelet-certificate-authority={}", p("ca.crt")),
                &format!("--service-account-key-file={}", p("sa.pub")),
                &format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-admission-plugins=NodeRestriction",
            ],
        )?;
        if !wait_for(Duration::from_secs(60), || {
            self.kubectl(&["get", "--raw", "/readyz"]).is_ok()
        }) {
            bail!("the API server did not become ready");
        }
        for (name, extra) in [
            (
                "kube-controller-manager",
                vec![
                    "--allocate-node-cidrs".to_string(),
                    format!("--cluster-cidr={CLUSTER_CIDR}"),
                    "--node-cidr-mask-size=24".into(),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    format!("--service-account-private-key-file={}", p("sa.key")),
                    format!("--root-ca-file={}", p("ca.crt")),
                    "--use-service-account-credentials".into(),
                ],
            ),
            ("kube-scheduler", vec![]),
        ] {
            let kubeconfig = pki.join(format!("{name}.kubeconfig")).display().to_string();
            let mut args = vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                "--leader-elect=false".into(),
            ];
            args.extend(extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let binary = bin.join(name);
            self.daemon(name, self.in_router(binary.to_str().context("path")?), &args)?;
        }
        for node in &mut self.nodes {
            node.start(&bin, &pki)?;
        }
        for node in &self.nodes {
            if !wait_for(Duration::from_secs(60), || {
                self.kubectl(&["get", "node", &node.name]).is_ok()
            }) {
                bail!("the kubelet of {} did not register its node", node.name);
            }
        }
        Ok(())
    }

    fn in_router(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns_path(&self.router).display()))
            .arg(program);
        command
    }

    fn daemon(&mut self, name: &str, command: Command, args: &[&str]) -> anyhow::Result<()> {
        let child = spawn_daemon(&self.dir, name, command, args)?;
        self.daemons.push((name.to_string(), child));
        Ok(())
    }

    /// kubectl as the cluster's admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let kubeconfig = self.dir.join("pki/admin.kubeconfig");
        let mut command = self.in_router(kubernetes_bin_dir().join("kubectl").to_str().context("path")?);
        command.arg(format!("--kubeconfig={}", kubeconfig.display())).args(args);
        output_of(&mut command)
    }

    /// Imports an image archive into every node's containerd, for kubelet.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        self.nodes.iter().try_for_each(|node| node.import_image(archive))
    }

    /// Stops the nodes (every process in their cgroups) and the control plane,
    /// removes the namespaces, the cgroups and the directory, and puts back what
    /// kubelet changed on the machine.
    pub fn down(&mut self) -> anyhow::Result<()> {
        let mut errors = velox_node::ErrorList::default();
        for node in &mut self.nodes {
            errors.keep(node.down());
        }
        for (_, mut daemon) in self.daemons.drain(..).rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if crate::netns::netns_exists(&self.router) {
            errors.keep(delete_netns(&self.router));
        }
        for (name, value) in &self.sysctls {
            errors.keep(run("sysctl", &["-qw", &format!("{name}={value}")]).map(drop));
        }
        if self.dir.exists() {
            errors.keep(std::fs::remove_dir_all(&self.dir).map_err(anyhow::Error::from));
        }
        Ok(errors.into_result()?)
    }
}

impl RealNode {
    /// The node's host (a mount namespace with its own host paths), containerd with
    /// the test images, the kubelet.
    fn start(&mut self, bin: &Path, pki: &Path) -> anyhow::Result<()> {
        let node = self.dir.clone();
        let ready = node.join("host.ready");
        std::fs::create_dir_all(&node)?;
        std::fs::create_dir_all(&self.cgroup)?;
        // The kubelet's cgroup root must exist in every v1 hierarchy.
        for hierarchy in v1_hierarchies()? {
            std::fs::create_dir_all(hierarchy.join(self.cgroup_root.trim_start_matches('/')))?;
        }
        let script = format!(
            r#"set -e
echo $$ > {cgroup}/cgroup.procs
mount --make-rprivate /
mount --bind {cgroup} {cgroup_root}
for d in etc/cni/net.d opt/cni/bin var/lib/kubelet run/velox run/containerd run/netns var/lib/containerd var/log/pods var/log/containers; do
  mkdir -p "{n}/$d" "/$d"
  mount --bind "{n}/$d" "/$d"
done
cp /usr/lib/cni/* /opt/cni/bin/
mount -t bpf bpf /sys/fs/bpf
mount --make-rshared /
touch {ready}
exec sleep 2147483647"#,
            n = node.display(),
            ready = ready.display(),
            cgroup = self.cgroup.display(),
            cgroup_root = velox_node::layout::cgroup2_root()?.display(),
        );
        let log = std::fs::File::create(node.join("host.log"))?;
        self.host = Some(
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "bash", "-c", &script])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("starting the node's host")?,
        );
        if !wait_for(Duration::from_secs(10), || ready.exists()) {
            bail!("the node's host did not come up; see {}/host.log", node.display());
        }
        let containerd_config = node.join("containerd.toml");
        std::fs::write(
            &containerd_config,
            format!("version = 2\n{}", crate::containerd::CRI_PLUGIN),
        )?;
        self.daemon("containerd", &["--config", containerd_config.to_str().context("path")?])?;
        if !wait_for(Duration::from_secs(20), || self.ctr(&["version"]).is_ok()) {
            bail!("containerd did not start");
        }
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/images");
        for image in ["pause", "toolbox"] {
            self.import_image(&images.join(format!("{image}.tar")))?;
        }
        let p = |file: &str| pki.join(file).display().to_string();
        let kubelet_config = node.join("kubelet.yaml");
        std::fs::write(
            &kubelet_config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
cgroupRoot: {cgroup_root}
tlsCertFile: {crt}
tlsPrivateKeyFile: {key}
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}}
"#,
                ca = p("ca.crt"),
                crt = p(&format!("kubelet-{}.crt", self.name)),
                key = p(&format!("kubelet-{}.key", self.name)),
                cgroup_root = self.cgroup_root,
            ),
        )?;
        self.kubelet = vec![
            bin.join("kubelet").to_str().context("path")?.to_string(),
            format!("--kubeconfig={}", p(&format!("kubelet-{}.kubeconfig", self.name))),
            format!("--config={}", kubelet_config.display()),
            "--container-runtime=remote".into(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            format!("--node-ip={}", self.ip),
            format!("--hostname-override={}", self.name),
            "--pod-infra-container-image=velox.test/pause:1".into(),
        ];
        self.start_kubelet()
    }

    fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let command = self.kubelet.clone();
        let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        self.daemon(&command[0], &args)
    }

    /// Stops the kubelet (SIGTERM, as a service manager does) and starts it again:
    /// the pods run on meanwhile.
    pub fn restart_kubelet(&mut self) -> anyhow::Result<()> {
        let at = self
            .daemons
            .iter()
            .position(|(name, _)| name == "kubelet")
            .context("no kubelet")?;
        let (_, mut kubelet) = self.daemons.remove(at);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(kubelet.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        kubelet.wait()?;
        self.start_kubelet()
    }

    /// `program` on the node: its cgroup, mount namespace and netns.
    pub fn on_node(&self, program: &str) -> Command {
        let host = self.host.as_ref().map_or(0, Child::id);
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "echo $$ > \"$0/cgroup.procs\" && exec nsenter --mount=/proc/{host}/ns/mnt --net={} \"$@\"",
                netns_path(&self.netns).display()
            ))
            .arg(&self.cgroup)
            .arg(program);
        command
    }

    /// Runs `program` on the node; its stdout, or its stderr as the error.
    pub fn run_on_node(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        output_of(self.on_node(program).args(args))
    }

    fn daemon(&mut self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let name = Path::new(program)
            .file_name()
            .context("a program")?
            .to_string_lossy()
            .into_owned();
        let child = spawn_daemon(&self.dir, &name, self.on_node(program), args)?;
        self.daemons.push((name, child));
        Ok(())
    }

    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_on_node("ctr", args)
    }

    /// Imports an image archive into the node's containerd, for kubelet.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let archive = archive.to_str().context("path")?;
        self.ctr(&["-n", "k8s.io", "images", "import", archive]).map(drop)
    }

    /// Every process of the node (kubelet, containerd, shims, containers, the node's
    /// host) is in its cgroup: killed at once; then its cgroups and netns go.
    fn down(&mut self) -> anyhow::Result<()> {
        let mut errors = velox_node::ErrorList::default();
        if self.cgroup.exists() {
            errors.keep(kill_cgroup(&self.cgroup));
        }
        for (_, mut daemon) in self.daemons.drain(..) {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some(mut host) = self.host.take() {
            let _ = host.kill();
            let _ = host.wait();
        }
        if self.cgroup.exists() {
            errors.keep(remove_cgroup_tree(&self.cgroup));
        }
        for hierarchy in v1_hierarchies().unwrap_or_default() {
            let root = hierarchy.join(self.cgroup_root.trim_start_matches('/'));
            if root.is_dir() {
                errors.keep(remove_cgroup_tree(&root));
            }
        }
        if crate::netns::netns_exists(&self.netns) {
            errors.keep(delete_netns(&self.netns));
        }
        Ok(errors.into_result()?)
    }
}

/// Starts `command` with `args` as a daemon in a process group of its own, logging
/// to `<dir>/<name>.log`.
fn spawn_daemon(dir: &Path, name: &str, mut command: Command, args: &[&str]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("taking the real cluster down: {e:#}");
        }
    }
}

fn output_of(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output().context("running a command")?;
    if !output.status.success() {
        bail!(
            "{:?}: {}",
            command.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Kills every process in `cgroup` and below (`cgroup.kill`), and waits until
/// none is left.
fn kill_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    std::fs::write(cgroup.join("cgroup.kill"), "1").with_context(|| format!("killing {}", cgroup.display()))?;
    let empty =
        || std::fs::read_to_string(cgroup.join("cgroup.events")).is_ok_and(|events| events.contains("populated 0"));
    anyhow::ensure!(
        wait_for(Duration::from_secs(10), empty),
        "{} keeps processes",
        cgroup.display()
    );
    Ok(())
}

/// The cgroup v1 hierarchies (one per controller, and systemd's named one): the
/// directories of `/sys/fs/cgroup` that are not the cgroup2 mount.
fn v1_hierarchies() -> anyhow::Result<Vec<PathBuf>> {
    let cgroup2 = velox_node::layout::cgroup2_root()?;
    Ok(std::fs::read_dir("/sys/fs/cgroup")?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir() && !path.is_symlink() && *path != cgroup2)
        .collect())
}

fn remove_cgroup_tree(dir: &Path) -> anyhow::Result<()> {
    for child in std::fs::read_dir(dir)?.flatten() {
        if child.file_type()?.is_dir() {
            remove_cgroup_tree(&child.path())?;
        }
    }
    // A cgroup whose last process is just gone may take a moment to be removable.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("removing {}", dir.display()))),
        }
    }
    bail!("{} stays busy", dir.display())
}

/// A CA and what every component presents, signed by it, with openssl; and a
/// kubeconfig per client.
fn write_pki(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display().to_string();
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new("openssl").current_dir(dir).args(args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=velox-test-ca",
    ])?;
    let service_ip = "10.96.0.1";
    let apiserver_names =
        format!("IP:{ROUTER_IP},IP:{service_ip},DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc");
    // name, subject, SANs (a server's; none: a client's)
    let mut certs = vec![
        (
            "apiserver",
            "/CN=kube-apiserver".to_string(),
            Some(apiserver_names.as_str()),
        ),
        ("admin", "/O=system:masters/CN=admin".into(), None),
        (
            "kube-controller-manager",
            "/CN=system:kube-controller-manager".into(),
            None,
        ),
        ("kube-scheduler", "/CN=system:kube-scheduler".into(), None),
        (
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client".into(),
            None,
        ),
    ];
    let kubelet_names: Vec<(String, String)> = NODES
        .iter()
        .map(|(node, ip)| (node.to_string(), format!("IP:{ip},DNS:{node}")))
        .collect();
    let kubelet_certs: Vec<(String, String)> = kubelet_names
        .iter()
        .map(|(node, _)| {
            (
                format!("kubelet-{node}"),
                format!("/O=system:nodes/CN=system:node:{node}"),
            )
        })
        .collect();
    for ((name, subject), (_, names)) in kubelet_certs.iter().zip(&kubelet_names) {
        certs.push((name.as_str(), subject.clone(), Some(names.as_str())));
    }
    for (name, subject, names) in certs {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject,
        ])?;
        let extensions = match names {
            Some(names) => format!("subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".into(),
        };
        std::fs::write(dir.join(&ext), extensions)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: velox, cluster: {{server: \"https://{ROUTER_IP}:6443\", \
             certificate-authority: {d}/ca.crt}}}}]\nusers: [{{name: {name}, user: {{client-certificate: {d}/{crt}, \
             client-key: {d}/{key}}}}}]\ncontexts: [{{name: velox, context: {{cluster: velox, user: {name}}}}}]\n\
             current-context: velox\n"
        );
        std::fs::write(dir.join(format!("{name}.kubeconfig")), kubeconfig)?;
    }
    openssl(&["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}
