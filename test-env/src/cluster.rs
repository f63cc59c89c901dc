//! The simulated cluster, dual-stack: two nodes on an underlay, a router
//! that knows nothing of pod CIDRs, an external host behind it, and a host-network
//! pod per node. Every node, pod and host has an address of each family.
//!
//! ```text
//!  my-k8s-worker-1                       my-k8s-worker-2
//!  10.0.0.3, fd00:10::3                  10.0.0.4, fd00:10::4
//!  pods 200.200.1.0/24, fd00:200:1::/64  pods 200.200.2.0/24, fd00:200:2::/64
//!        eth0 |                                | eth0
//!             +--- br0 10.0.0.1, fd00:10::1 ---+      velox-router (forwarding,
//!                  ext0 198.41.0.1, 2001:db8:41::1                no pod routes)
//!                         |
//!                  eth0 198.41.0.4, 2001:db8:41::4                velox-external
//! ```
//!
//! The routed variant ([`Topology::Routed`]) puts each node on a subnet of its own
//! behind the router, which routes between the node subnets and still knows no pod
//! CIDR: the peers are off-link, so Velox tunnels to them (VXLAN).
//!
//! ```text
//!  worker-1 eth0 10.0.1.3, fd00:10:1::3 --- n1 10.0.1.1, fd00:10:1::1 --+ router
//!  worker-2 eth0 10.0.2.4, fd00:10:2::4 --- n2 10.0.2.1, fd00:10:2::1 --+
//! ```
//!
//! The mixed variant ([`Topology::Mixed`]) keeps the first two on the bridge and adds
//! `worker-3` (10.0.3.5, fd00:10:3::5; pods 200.200.3.0/24, fd00:200:3::/64) on a
//! subnet of its own: one native peer and one tunnelled peer at once.

use anyhow::Context;
use serde_json::json;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use velox_node::{ErrorList, Family};

use crate::guard::{Guard, TearDown};
use crate::netns::{create_host_netns, delete_netns, in_netns, netns_exists};
use crate::node::Underlay;
use crate::{run, Binaries, Node, Pod};

/// The host outside the cluster, by family.
pub fn external_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => "198.41.0.4".parse().unwrap(),
        Family::V6 => "2001:db8:41::4".parse().unwrap(),
    }
}

/// The router's addresses of both families: on the underlay (the nodes' gateway) and
/// towards the external host; then the external host's own.
const ROUTER_UNDERLAY: [&str; 2] = ["10.0.0.1/24", "fd00:10::1/64"];
const ROUTER_EXTERNAL: [&str; 2] = ["198.41.0.1/24", "2001:db8:41::1/64"];
const EXTERNAL: [&str; 2] = ["198.41.0.4/24", "2001:db8:41::4/64"];

/// The gateway part of one of the router's addresses.
fn gateway(address: &str) -> &str {
    address.split('/').next().unwrap()
}

/// IPv6 addresses skip duplicate address detection: a tentative address answers
/// nothing for a second or two, and this simulated underlay has no duplicates.
fn add_address(ns: &str, dev: &str, address: &str) -> anyhow::Result<()> {
    let nodad = address.contains(':').then_some("nodad");
    let args: Vec<&str> = ["-n", ns, "addr", "add", address, "dev", dev]
        .into_iter()
        .chain(nodad)
        .collect();
    run("ip", &args).map(drop)
}

/// Default routes of both families via the router's `addresses`.
fn add_default_routes(ns: &str, addresses: &[&str; 2]) -> anyhow::Result<()> {
    for (family, address) in ["-4", "-6"].into_iter().zip(addresses) {
        run(
            "ip",
            &[family, "-n", ns, "route", "add", "default", "via", gateway(address)],
        )?;
    }
    Ok(())
}
/// A cluster node's Node object: its pod CIDRs and InternalIPs.
pub fn node_object(node: &Node) -> serde_json::Value {
    let underlay = node.underlay.as_ref().expect("cluster node");
    let addresses: Vec<_> = underlay
        .node_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .chain([json!({"type": "Hostname", "address": node.name})])
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name},
        "spec": {"podCIDR": node.subnets[0], "podCIDRs": node.subnets},
        "status": {"addresses": addresses},
    })
}

/// How the nodes meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// All on one link, the router's bridge.
    OneLink,
    /// Each on its own subnet, a router between them.
    Routed,
    /// A third node on its own subnet beside the two on one link: each node has an
    /// on-link peer and a tunnelled one, or two tunnelled ones.
    Mixed,
}

impl Topology {
    fn nodes(self) -> usize {
        match self {
            Topology::Mixed => 3,
            _ => 2,
        }
    }

    /// Whether node `i` (0-based) has a subnet of its own.
    fn on_own_subnet(self, i: usize) -> bool {
        match self {
            Topology::OneLink => false,
            Topology::Routed => true,
            Topology::Mixed => i == 2,
        }
    }

    /// Node `i`'s address of each family, with its prefix length, and its gateway's.
    fn node_addresses(self, i: usize) -> ([String; 2], [String; 2]) {
        let host = i + 3;
        if !self.on_own_subnet(i) {
            return (
                [format!("10.0.0.{host}/24"), format!("fd00:10::{host}/64")],
                ROUTER_UNDERLAY.map(String::from),
            );
        }
        let subnet = i + 1;
        (
            [
                format!("10.0.{subnet}.{host}/24"),
                format!("fd00:10:{subnet}::{host}/64"),
            ],
            [format!("10.0.{subnet}.1/24"), format!("fd00:10:{subnet}::1/64")],
        )
    }
}

/// Where each node's host-network pod listens.
pub const HOST_NETWORK_PORT: u16 = 5301;

pub struct Cluster {
    /// Empty for the default cluster; tests set one so clusters can run side by side.
    pub prefix: String,
    pub router: String,
    pub external: String,
    pub nodes: Vec<Node>,
    pub topology: Topology,
    /// Each node's addresses and its gateway's on the router, both families, with
    /// prefix lengths.
    addresses: Vec<([String; 2], [String; 2])>,
    pub peers_file: PathBuf,
    /// The directory of Kubernetes JSON the loaders read policy objects from.
    pub cluster_state: PathBuf,
}

/// A process in a node's own netns: it has the node's IP.
#[derive(Clone, Debug)]
pub struct HostNetworkPod {
    pub name: String,
    pub node: usize,
    pub ips: Vec<IpAddr>,
}

impl Cluster {
    /// The default cluster has the names of the module's diagram; `prefix` makes
    /// every name unique (tests running side by side).
    pub fn new(prefix: &str, bins: Binaries) -> anyhow::Result<Self> {
        Self::with_topology(prefix, bins, Topology::OneLink)
    }

    pub fn with_topology(prefix: &str, bins: Binaries, topology: Topology) -> anyhow::Result<Self> {
        let state = PathBuf::from(format!("/run/velox-test/{prefix}cluster"));
        let peers_file = state.join("peers.json");
        let addresses: Vec<_> = (0..topology.nodes()).map(|i| topology.node_addresses(i)).collect();
        let nodes = [
            ("my-k8s-worker-1", "w1", ["200.200.1.0/24", "fd00:200:1::/64"]),
            ("my-k8s-worker-2", "w2", ["200.200.2.0/24", "fd00:200:2::/64"]),
            ("my-k8s-worker-3", "w3", ["200.200.3.0/24", "fd00:200:3::/64"]),
        ]
        .into_iter()
        .zip(&addresses)
        .map(|((full, short, cidrs), (ips, _))| {
            let name = if prefix.is_empty() {
                full.to_string()
            } else {
                format!("{prefix}{short}")
            };
            let cidrs = cidrs.iter().map(|c| c.parse()).collect::<Result<_, _>>()?;
            let mut node = Node::new(&name, cidrs, bins.clone());
            if (0..topology.nodes()).any(|i| topology.on_own_subnet(i)) {
                // The VXLAN device's MTU: the uplink's 1500 less IPv4's encapsulation.
                node.pod_mtu = 1450;
            }
            node.underlay = Some(Underlay {
                node_ips: ips.iter().map(|ip| gateway(ip).parse()).collect::<Result<_, _>>()?,
                peers_file: peers_file.clone(),
                cluster_state: state.join("objects"),
            });
            Ok(node)
        })
        .collect::<anyhow::Result<_>>()?;
        let name = |role: &str| {
            if prefix.is_empty() {
                format!("velox-{role}")
            } else {
                format!("{prefix}{role}")
            }
        };
        Ok(Self {
            prefix: prefix.to_string(),
            router: name("router"),
            external: name("external"),
            nodes,
            topology,
            addresses,
            peers_file,
            cluster_state: state.join("objects"),
        })
    }

    pub fn node_ip(&self, node: usize, family: Family) -> IpAddr {
        self.nodes[node].node_ip(family)
    }

    pub fn is_up(&self) -> bool {
        netns_exists(&self.router) || self.nodes.iter().any(|n| !n.leftovers().is_empty())
    }

    pub fn up(&self) -> anyhow::Result<()> {
        let result = self.build();
        if result.is_err() {
            let _ = self.down();
        }
        result
    }

    fn build(&self) -> anyhow::Result<()> {
        let (router, external) = (self.router.as_str(), self.external.as_str());
        for ns in [router, external] {
            create_host_netns(ns)?;
        }
        run(
            "ip",
            &[
                "netns",
                "exec",
                router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        run("ip", &["-n", router, "link", "add", "br0", "type", "bridge"])?;
        for address in ROUTER_UNDERLAY {
            add_address(router, "br0", address)?;
        }
        run("ip", &["-n", router, "link", "set", "br0", "up"])?;
        // The external host: reachable from the router only.
        run(
            "ip",
            &[
                "-n", router, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", external,
            ],
        )?;
        for address in ROUTER_EXTERNAL {
            add_address(router, "ext0", address)?;
        }
        for address in EXTERNAL {
            add_address(external, "eth0", address)?;
        }
        run("ip", &["-n", router, "link", "set", "ext0", "up"])?;
        run("ip", &["-n", external, "link", "set", "eth0", "up"])?;
        add_default_routes(external, &ROUTER_EXTERNAL)?;

        self.write_peers(&self.nodes.iter().collect::<Vec<_>>())?;
        for (i, node) in self.nodes.iter().enumerate() {
            node.create_netns()?;
            let port = format!("n{}", i + 1);
            run(
                "ip",
                &[
                    "-n", router, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node.name,
                ],
            )?;
            let (own, gateways) = &self.addresses[i];
            if self.topology.on_own_subnet(i) {
                for address in gateways {
                    add_address(router, &port, address)?;
                }
                run("ip", &["-n", router, "link", "set", &port, "up"])?;
            } else {
                run("ip", &["-n", router, "link", "set", &port, "master", "br0", "up"])?;
            }
            for address in own {
                add_address(&node.name, "eth0", address)?;
            }
            run("ip", &["-n", &node.name, "link", "set", "eth0", "up"])?;
            add_default_routes(&node.name, &[gateways[0].as_str(), gateways[1].as_str()])?;
            node.start_loader()?;
            self.start_host_network_pod(i)?;
        }
        Ok(())
    }

    /// Waits until every node's loader has the other nodes' pod CIDRs in its peer
    /// map (its first pass over the peers file, the VXLAN device made if it takes one).
    pub fn wait_for_peers(&self) -> anyhow::Result<()> {
        self.wait_for_peer_routes(None)
    }

    /// [`Self::wait_for_peers`], and until every peer entry's route (`native`,
    /// `vxlan`) is `route`, when given.
    pub fn wait_for_peer_routes(&self, route: Option<&str>) -> anyhow::Result<()> {
        let wanted: usize = self.nodes.iter().map(|n| n.subnets.len()).sum();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for node in &self.nodes {
            let applied = || {
                node.dump("peers").is_ok_and(|peers| {
                    peers.len() >= wanted - node.subnets.len()
                        && route.is_none_or(|route| peers.iter().all(|peer| peer["route"] == route))
                })
            };
            while !applied() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "{}: the peers were not applied (route {route:?}) within 10 s",
                    node.name
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Writes the node list every loader reads, as `kubectl get nodes -o json` would
    /// print it; `nodes` may leave some out.
    pub fn write_peers(&self, nodes: &[&Node]) -> anyhow::Result<()> {
        let items: Vec<_> = nodes.iter().map(|n| node_object(n)).collect();
        std::fs::create_dir_all(self.peers_file.parent().unwrap())?;
        let tmp = self.peers_file.with_extension("tmp");
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
        std::fs::rename(&tmp, &self.peers_file).context("writing the peers file")
    }

    pub fn host_network_pod(&self, node: usize) -> HostNetworkPod {
        HostNetworkPod {
            name: format!("hostnet-{}", node + 1),
            node,
            ips: self.nodes[node]
                .underlay
                .as_ref()
                .expect("cluster node")
                .node_ips
                .clone(),
        }
    }

    /// A TCP server in the node's own netns (a hostNetwork pod); it dies with the netns.
    fn start_host_network_pod(&self, node: usize) -> anyhow::Result<()> {
        in_netns(
            &self.nodes[node].name,
            "iperf3",
            &["-s", "-D", "-p", &HOST_NETWORK_PORT.to_string()],
        )
        .stdout(Stdio::null())
        .status()?
        .success()
        .then_some(())
        .context("starting the host-network pod")
    }

    /// Pods `pod-1`, `pod-4` on the first node and `pod-2`, `pod-3` on the second
    /// (prefixed with the node name in tests).
    pub fn add_standard_pods(&self) -> anyhow::Result<Vec<(usize, Pod)>> {
        let mut pods = Vec::new();
        for (node, pod) in [(0, "pod-1"), (1, "pod-2"), (1, "pod-3"), (0, "pod-4")] {
            pods.push((node, self.nodes[node].add_pod(&self.pod_name(node, pod))?));
        }
        Ok(pods)
    }

    /// Test clusters name pods after their node so `down` finds every one.
    pub fn pod_name(&self, node: usize, pod: &str) -> String {
        if self.prefix.is_empty() {
            pod.to_string()
        } else {
            format!("{}-{pod}", self.nodes[node].name)
        }
    }

    /// The pods of every node, with the index of their node.
    pub fn pods(&self) -> anyhow::Result<Vec<(usize, Pod)>> {
        let mut pods = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            pods.extend(node.pods()?.into_iter().map(|p| (i, p)));
        }
        pods.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(pods)
    }

    /// Writes the standard pods' Pod objects (`default/pod-1` ..) into the cluster
    /// state and waits until every node's flow records can name them.
    pub fn name_the_standard_pods(&self) -> anyhow::Result<Vec<(usize, Pod)>> {
        use crate::cluster_state::write_objects;
        use crate::netpol::pod_object;
        let pods = self.pods()?;
        let no_labels = Default::default();
        let objects = pods
            .iter()
            .map(|(node, pod)| {
                let name = &pod.name[pod.name.rfind("pod-").unwrap_or(0)..];
                pod_object("default", name, &no_labels, &self.nodes[*node].name, pod)
            })
            .collect();
        write_objects(&self.cluster_state.join("pods.json"), objects)?;
        let last = pods.last().context("no pods")?.1.ip(Family::V6).to_string();
        for node in &self.nodes {
            let names = node.state_dir.join("policy-names.json");
            let named = || std::fs::read_to_string(&names).is_ok_and(|names| names.contains(&last));
            anyhow::ensure!(
                crate::wait_for(std::time::Duration::from_secs(5), named),
                "{} did not learn the pods' names",
                node.name
            );
        }
        Ok(pods)
    }

    /// Removes nodes, router, external host and the peers file; keeps going past failures.
    pub fn down(&self) -> anyhow::Result<()> {
        let mut errors = ErrorList::default();
        for node in &self.nodes {
            errors.keep(node.down());
        }
        for ns in [&self.router, &self.external] {
            errors.keep(delete_netns(ns));
        }
        if let Some(dir) = self.peers_file.parent().filter(|d| d.exists()) {
            errors.keep(std::fs::remove_dir_all(dir));
        }
        // Shared by every node and cluster; only the last one out removes it.
        let _ = std::fs::remove_dir("/run/velox-test");
        Ok(errors.into_result()?)
    }

    /// What `down` should have removed but is still there.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.nodes.iter().flat_map(|n| n.leftovers()).collect();
        left.extend(
            [&self.router, &self.external]
                .into_iter()
                .filter(|n| netns_exists(n))
                .map(|n| format!("netns {n}")),
        );
        left
    }
}

impl std::fmt::Display for Cluster {
    /// The pod table, like `kubectl get pods -o wide`, one address per family.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<24} {:<15} {:<20} {:<20} NODE_IPS", "NAME", "IP", "IPV6", "NODE")?;
        let pods = self.pods().map_err(|_| std::fmt::Error)?;
        let hostnet = (0..self.nodes.len())
            .map(|i| self.host_network_pod(i))
            .map(|h| (h.node, h.name, h.ips));
        for (node, name, ips) in pods.into_iter().map(|(n, p)| (n, p.name, p.ips)).chain(hostnet) {
            let [v4, v6] = Family::ALL.map(|family| {
                ips.iter()
                    .find(|ip| Family::of(ip) == family)
                    .map_or("-".to_string(), |ip| ip.to_string())
            });
            let node_ips = Family::ALL.map(|family| self.node_ip(node, family).to_string());
            writeln!(
                f,
                "{:<24} {:<15} {:<20} {:<20} {}",
                name,
                v4,
                v6,
                self.nodes[node].name,
                node_ips.join(",")
            )?;
        }
        Ok(())
    }
}

/// A cluster for one test, taken down when the guard drops.
pub type ClusterGuard = Guard<Cluster>;

impl TearDown for Cluster {
    fn down(&self) -> anyhow::Result<()> {
        Cluster::down(self)
    }

    fn leftovers(&self) -> Vec<String> {
        Cluster::leftovers(self)
    }
}

impl ClusterGuard {
    /// A cluster with names unique to this process, with the standard four pods.
    pub fn up(tag: &str) -> anyhow::Result<Self> {
        Self::up_as(tag, Topology::OneLink)
    }

    /// [`Self::up`] with the nodes on subnets of their own (peers tunnelled).
    pub fn up_routed(tag: &str) -> anyhow::Result<Self> {
        Self::up_as(tag, Topology::Routed)
    }

    pub fn up_as(tag: &str, topology: Topology) -> anyhow::Result<Self> {
        Self::up_with(tag, topology, Binaries::locate()?)
    }

    /// [`Self::up_as`] running `bins` (another build's, for the upgrade tests).
    pub fn up_with(tag: &str, topology: Topology, bins: Binaries) -> anyhow::Result<Self> {
        let guard = Self(Cluster::with_topology(
            &format!("vc{}{tag}-", std::process::id()),
            bins,
            topology,
        )?);
        guard.0.up()?;
        guard.0.wait_for_peers()?;
        guard.0.add_standard_pods()?;
        Ok(guard)
    }

    /// Every node runs `bins` from now on: new pods' CNI calls, and each loader
    /// from its next (re)start.
    pub fn use_binaries(&mut self, bins: &Binaries) {
        for node in &mut self.0.nodes {
            node.bins = bins.clone();
        }
    }

    /// A pod of the standard set (`pod-1` .. `pod-4`).
    pub fn pod(&self, name: &str) -> Pod {
        let pods = self.0.pods().expect("reading pods");
        pods.into_iter()
            .map(|(_, p)| p)
            .find(|p| p.name.ends_with(name))
            .expect("standard pod")
    }
}
