//! Named network namespaces (`ip netns`), and running things inside them.

use anyhow::Context;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, Pod};

/// Where `ip netns add` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of the named network namespace `name` (what a runtime passes as
/// `CNI_NETNS`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// nsenter's flag that enters the named network namespace `name`.
fn nsenter_net(name: &str) -> String {
    format!("--net={}", netns_path(name).display())
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Network namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// A host of the simulated network (node, router, external host): a new netns with
/// loopback up. Its interfaces skip IPv6 duplicate address detection: a fresh
/// link-local address stays tentative for a second, and until then the kernel sends
/// no neighbour solicitation for forwarded traffic, which a machine that booted a
/// while ago never sees.
pub fn create_host_netns(name: &str) -> anyhow::Result<()> {
    create_pod_netns(name)?;
    let no_dad = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];
    run("ip", &[&["netns", "exec", name, "sysctl", "-qw"][..], &no_dad].concat()).map(drop)
}

/// A pod's netns before ADD (a runtime's sandbox), or the start of a host's: `name`,
/// loopback up.
pub fn create_pod_netns(name: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "add", name])?;
    run("ip", &["-n", name, "link", "set", "lo", "up"]).map(drop)
}

/// Deletes a netns and first kills every process still in it: a process would keep
/// the namespace, and everything in it, alive after `ip netns del`.
pub fn delete_netns(name: &str) -> anyhow::Result<()> {
    if netns_exists(name) {
        for pid in run("ip", &["netns", "pids", name])?.split_whitespace() {
            let _ = run("kill", &["-KILL", pid]);
        }
        run("ip", &["netns", "del", name])?;
    }
    Ok(())
}

/// A command inside the named network namespace `netns`, entered with nsenter (not
/// `ip netns exec`, whose own mount namespace hides the bpffs pins).
pub fn in_netns(netns: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(nsenter_net(netns)).arg(program).args(args);
    cmd
}

/// [`run`] inside the named network namespace `netns`.
pub fn run_in_netns(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    run("nsenter", &[&[nsenter_net(netns).as_str(), program][..], args].concat())
}

/// `in_netns`, with the process first moved into the cgroup (v2) `cgroup`: socket
/// hooks attached there act on it.
pub fn in_netns_and_cgroup(netns: &str, cgroup: &Path, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > \"$0/cgroup.procs\" && exec nsenter {} \"$@\"",
            nsenter_net(netns)
        ))
        .arg(cgroup)
        .arg(program)
        .args(args);
    cmd
}

/// Applies an `iptables-restore` script in `netns` without flushing other tables'
/// rules, waiting for the xtables lock.
pub fn iptables_restore(netns: &str, script: &str) -> anyhow::Result<()> {
    let mut restore = in_netns(netns, "iptables-restore", &["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(restore.stdin.as_mut().expect("piped"), script.as_bytes())?;
    anyhow::ensure!(restore.wait()?.success(), "iptables-restore in {netns} failed");
    Ok(())
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

/// Runs `f` on a new thread inside the netns `name` (sockets made there stay there).
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = netns_path(name);
    std::thread::spawn(move || {
        let netns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
}

/// Sends a UDP datagram from each of `sources` in the netns `from` to `to`; returns
/// the sources the netns `receiver` saw within a second.
pub fn datagram_sources(
    from: &str,
    sources: Vec<std::net::IpAddr>,
    receiver: &str,
    to: std::net::SocketAddr,
) -> anyhow::Result<Vec<std::net::IpAddr>> {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let receiving = spawn_in(receiver, move || {
        let socket = UdpSocket::bind(to)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        ready_tx.send(()).ok();
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            seen.push(from.ip());
        }
        Ok(seen)
    });
    ready
        .recv_timeout(Duration::from_secs(3))
        .context("the receiver did not get ready")?;
    spawn_in(from, move || {
        for src in sources {
            UdpSocket::bind(SocketAddr::new(src, 0))?.send_to(b"who am I", to)?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    receiving.join().map_err(|_| anyhow::anyhow!("the receiver panicked"))?
}

/// Two namespaces `<prefix>-l` and `<prefix>-r` joined by a bare veth pair, with an
/// address of each family: the same-node limit any CNI is measured against.
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
        let ends = [
            (&left, "veth-l", ["10.99.0.1/24", "fd00:99::1/64"]),
            (&right, "veth-r", ["10.99.0.2/24", "fd00:99::2/64"]),
        ];
        for (ns, ifname, addresses) in &ends {
            for address in addresses {
                run("ip", &["-n", ns, "addr", "add", address, "dev", ifname, "nodad"])?;
            }
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(ends.map(|(ns, _, addresses)| Pod {
            name: ns.clone(),
            ips: addresses
                .iter()
                .map(|a| a.parse::<ipnet::IpNet>().unwrap().addr())
                .collect(),
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
