//! The node's place in the cluster: `from_net` on the uplink, a route and a peer-map
//! entry for every other node's pod CIDRs of both families (direct routing: no
//! tunnel, no NAT), and masquerading of pod traffic that leaves the cluster, with
//! iptables for IPv4 and ip6tables for IPv6.

use anyhow::Context;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use velox_common::{Peer, FROM_NET_PROGRAM};
use velox_node::link::attach_tc_ingress;
use velox_node::maps::PeerMap;
use velox_node::netlink::{Netlink, VELOX_ROUTE_PROTOCOL};
use velox_node::{Bpffs, Family};

use crate::netfilter::{remove_chain, replace_chain};

/// The peers file: a Kubernetes `NodeList` (`kubectl get nodes -o json`), of which
/// Velox reads each node's name, `spec.podCIDRs` and `InternalIP` addresses. The items
/// are read one by one, so one bad node does not hide the others.
#[derive(Deserialize)]
struct NodeList {
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct NodeObject {
    metadata: NodeMetadata,
    #[serde(default)]
    spec: NodeSpec,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Deserialize)]
struct NodeMetadata {
    name: String,
}

#[derive(Default, Deserialize)]
struct NodeSpec {
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Vec<IpNet>,
}

#[derive(Default, Deserialize)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// One node as Velox needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerNode {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    /// Its InternalIPs, at most one per family in a dual-stack cluster.
    pub node_ips: Vec<IpAddr>,
}

impl PeerNode {
    /// The node's address to reach `cidr` through: the one of the same family.
    fn next_hop(&self, cidr: &IpNet) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == Family::of(&cidr.addr()))
    }
}

/// The nodes of a `NodeList`. A node whose entry does not parse (a bad CIDR, a
/// missing name) is skipped with a log line; only a file that is not a list fails.
pub fn parse_nodes(json: &[u8]) -> anyhow::Result<Vec<PeerNode>> {
    let list: NodeList = serde_json::from_slice(json)?;
    let mut nodes: Vec<PeerNode> = list
        .items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| match peer_node(item) {
            Ok(node) => Some(node),
            Err(e) => {
                log::warn!("peers file: skipping node #{i}: {e}");
                None
            }
        })
        .collect();
    nodes.sort();
    Ok(nodes)
}

/// One Node object (from a file or the API server) as Velox needs it.
pub fn peer_node(object: serde_json::Value) -> anyhow::Result<PeerNode> {
    let node: NodeObject = serde_json::from_value(object)?;
    Ok(PeerNode {
        name: node.metadata.name,
        pod_cidrs: node.spec.pod_cidrs.iter().map(IpNet::trunc).collect(),
        node_ips: node
            .status
            .addresses
            .iter()
            .filter(|a| a.kind == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect(),
    })
}

/// A route someone other than Velox made, as far as peer CIDRs must respect it.
#[derive(Clone, Debug, PartialEq)]
struct ForeignRoute {
    dst: IpNet,
    via_gateway: bool,
}

/// Why a peer's pod CIDR must not be routed, if it must not: a default route, this
/// node's own pod CIDR, another peer's CIDR, or a route of the host (a connected
/// subnet, a bridge, a pod's /32). A broader route via a gateway (a summary route)
/// is what a more specific pod CIDR is allowed to override.
fn conflict(cidr: &IpNet, own: &[IpNet], accepted: &[IpNet], host_routes: &[ForeignRoute]) -> Option<String> {
    let overlaps = |other: &IpNet| other.contains(&cidr.network()) || cidr.contains(&other.network());
    if cidr.prefix_len() == 0 {
        return Some("it is a default route".into());
    }
    if let Some(own) = own.iter().find(|o| overlaps(o)) {
        return Some(format!("it overlaps this node's pod CIDR {own}"));
    }
    if let Some(other) = accepted.iter().find(|o| overlaps(o)) {
        return Some(format!("it overlaps {other} of another node"));
    }
    host_routes
        .iter()
        .filter(|r| r.dst.prefix_len() > 0 && overlaps(&r.dst))
        .find(|r| !(r.via_gateway && r.dst.prefix_len() < cidr.prefix_len()))
        .map(|r| format!("it overlaps the host's route to {}", r.dst))
}

pub struct ClusterConfig {
    /// The interface towards the other nodes; when not given, the one holding an
    /// InternalIP of this node's Node.
    pub uplink: Option<String>,
    /// This node's pod CIDRs, one per family: the sources to masquerade. When not
    /// given, its Node's `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    pub ip_masq: bool,
    /// This node's Node in the cluster source.
    pub node_name: Option<String>,
}

pub struct Cluster {
    config: ClusterConfig,
    bpffs: Bpffs,
    /// What the last successful pass set up, to notice a changed peers file.
    applied: Option<Vec<PeerNode>>,
    /// The uplink's addresses as the last pass found them.
    own_ips: Vec<IpAddr>,
}

/// The nat chain holding the masquerade rule and its exceptions, in both families.
pub const MASQ_CHAIN: &str = "VELOX-MASQ";
/// The built-in chain that jumps to it.
pub const MASQ_HOOK: &str = "POSTROUTING";

/// Removes the masquerade chains and their jumps in both families.
pub fn remove_masquerade() -> anyhow::Result<()> {
    for family in Family::ALL {
        remove_chain(family, "nat", MASQ_CHAIN, MASQ_HOOK)?;
    }
    Ok(())
}

/// Turns on forwarding of a family; a kernel without IPv6 has nothing to turn on.
fn enable_forwarding(family: Family) -> anyhow::Result<()> {
    let path = match family {
        Family::V4 => "/proc/sys/net/ipv4/ip_forward",
        Family::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
    };
    match std::fs::write(path, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && family == Family::V6 => Ok(()),
        other => other.with_context(|| format!("enabling forwarding ({path})")),
    }
}

impl Cluster {
    pub fn new(config: ClusterConfig, bpffs: Bpffs) -> anyhow::Result<Self> {
        // The kernel path (pods to outside, to other nodes' hosts) is routing.
        for family in Family::ALL {
            enable_forwarding(family)?;
        }
        if !config.ip_masq {
            // What an earlier run with masquerading set up goes.
            remove_masquerade()?;
        }
        Ok(Self {
            config,
            bpffs,
            applied: None,
            own_ips: Vec::new(),
        })
    }

    /// The uplink, once known.
    pub fn uplink(&self) -> Option<&str> {
        self.config.uplink.as_deref()
    }

    /// This node's pod CIDRs, once known.
    pub fn pod_cidrs(&self) -> &[IpNet] {
        &self.config.pod_cidrs
    }

    /// Fills in what the flags left to this node's Node: the uplink (the interface
    /// holding one of its InternalIPs) and the pod CIDRs. False while either is
    /// still unknown.
    async fn learn_from_own_node(&mut self, netlink: &Netlink, nodes: &[PeerNode]) -> anyhow::Result<bool> {
        let own = self
            .config
            .node_name
            .as_ref()
            .and_then(|name| nodes.iter().find(|n| &n.name == name));
        if self.config.uplink.is_none() {
            for ip in own.iter().flat_map(|n| n.node_ips.iter()) {
                if let Some(link) = netlink.link_with_address(*ip).await? {
                    log::info!("uplink {}: it holds this node's InternalIP {ip}", link.name);
                    self.config.uplink = Some(link.name);
                    break;
                }
            }
        }
        if self.config.pod_cidrs.is_empty() {
            if let Some(own) = own.filter(|n| !n.pod_cidrs.is_empty()) {
                log::info!("pod CIDRs {:?}: from node {}", own.pod_cidrs, own.name);
                self.config.pod_cidrs = own.pod_cidrs.clone();
            }
        }
        // Pod CIDRs are awaited only from a Node to learn them from.
        Ok(self.config.uplink.is_some() && (own.is_none() || !self.config.pod_cidrs.is_empty()))
    }

    /// Every node's address as last seen: this node's uplink addresses (link-local
    /// ones aside) and every node's InternalIPs, each once.
    pub fn node_ips(&self) -> Vec<IpAddr> {
        let own = self
            .own_ips
            .iter()
            .copied()
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()));
        let all: BTreeSet<IpAddr> = own
            .chain(
                self.applied
                    .iter()
                    .flatten()
                    .flat_map(|node| node.node_ips.iter().copied()),
            )
            .collect();
        all.into_iter().collect()
    }

    /// One full pass over `nodes`, the cluster's nodes as the source has them; cheap
    /// when nothing changed. When the source cannot say (`None`), the last applied
    /// nodes stay, or at start-up the routes and peer entries already in the kernel.
    pub async fn reconcile(&mut self, netlink: &Netlink, nodes: Option<Vec<PeerNode>>) -> anyhow::Result<()> {
        let nodes = match (nodes, &self.applied) {
            (Some(nodes), _) => nodes,
            (None, Some(applied)) => applied.clone(),
            // Just started: the routes and peer entries of the last run stay.
            (None, None) => return Ok(()),
        };
        if !self.learn_from_own_node(netlink, &nodes).await? {
            log::warn!(
                "waiting for node {:?} in the cluster source: it names this node's uplink and pod CIDRs",
                self.config.node_name.as_deref().unwrap_or("(no --node-name)")
            );
            return Ok(());
        }
        let uplink_name = self.config.uplink.clone().unwrap_or_default();
        let uplink = netlink
            .link(&uplink_name)
            .await?
            .with_context(|| format!("uplink {uplink_name} not found"))?;
        if !self.bpffs.tc_ingress_link(&uplink.name).exists() {
            log::info!("attaching from_net to {}", uplink.name);
            attach_tc_ingress(&self.bpffs, FROM_NET_PROGRAM, &uplink.name)?;
        }
        let own_ips: Vec<IpAddr> = netlink.addresses(uplink.index).await?.iter().map(IpNet::addr).collect();
        self.own_ips = own_ips.clone();
        let mut routes = Vec::new();
        for family in Family::ALL {
            routes.extend(netlink.routes(family).await?);
        }
        let host_routes: Vec<ForeignRoute> = routes
            .iter()
            .filter(|r| r.protocol != VELOX_ROUTE_PROTOCOL)
            .map(|r| ForeignRoute {
                dst: r.dst,
                via_gateway: r.gateway.is_some(),
            })
            .collect();
        // Where two nodes claim overlapping CIDRs, the one routed already keeps its
        // route: a newcomer (a misconfigured or hostile Node) never takes it over.
        let established: BTreeSet<(IpNet, IpAddr)> = routes
            .iter()
            .filter(|r| r.protocol == VELOX_ROUTE_PROTOCOL)
            .filter_map(|r| Some((r.dst, r.gateway?)))
            .collect();
        let mut candidates = Vec::new();
        for node in nodes
            .iter()
            .filter(|n| !n.node_ips.iter().any(|ip| own_ips.contains(ip)))
        {
            for cidr in &node.pod_cidrs {
                match node.next_hop(cidr) {
                    Some(next_hop) => candidates.push((node, *cidr, next_hop)),
                    None => log::warn!(
                        "node {} has no InternalIP of the family of {cidr}: not routed",
                        node.name
                    ),
                }
            }
        }
        candidates
            .sort_by_key(|(node, cidr, next_hop)| (!established.contains(&(*cidr, *next_hop)), node.name.clone()));
        let mut peers: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        for (node, cidr, next_hop) in candidates {
            let accepted: Vec<IpNet> = peers.keys().copied().collect();
            match conflict(&cidr, &self.config.pod_cidrs, &accepted, &host_routes) {
                Some(why) => log::warn!("node {}: not routing {cidr}: {why}", node.name),
                None => {
                    peers.insert(cidr, next_hop);
                }
            }
        }

        for family in Family::ALL {
            let mut routed = BTreeSet::new();
            for route in routes.iter().filter(|r| Family::of(&r.dst.addr()) == family) {
                let wanted = peers.get(&route.dst) == route.gateway.as_ref() && route.oif == Some(uplink.index);
                match (route.protocol == VELOX_ROUTE_PROTOCOL, wanted) {
                    (true, true) => {
                        routed.insert(route.dst);
                    }
                    (true, false) => {
                        log::info!("removing route {} via {:?}", route.dst, route.gateway);
                        netlink.delete_route(route).await?;
                    }
                    (false, _) => {}
                }
            }
            let missing = peers
                .iter()
                .filter(|(cidr, _)| Family::of(&cidr.addr()) == family && !routed.contains(*cidr));
            for (cidr, node_ip) in missing {
                netlink.add_route_via(*cidr, *node_ip, uplink.index).await?;
            }
        }

        let mut map = PeerMap::open(&self.bpffs)?;
        // Entries of departed nodes go; the puts below overwrite the rest.
        for (cidr, _) in map.entries()? {
            if !peers.contains_key(&cidr) {
                map.remove(cidr)?;
            }
        }
        for (cidr, node_ip) in &peers {
            map.put(*cidr, Peer::new(*node_ip, uplink.index, uplink.mtu))?;
        }

        if self.config.ip_masq {
            // Everything inside the cluster keeps its source address.
            let mut inside: BTreeSet<IpNet> = peers.keys().copied().collect();
            inside.extend(self.config.pod_cidrs.iter().map(IpNet::trunc));
            inside.extend(nodes.iter().flat_map(|n| n.node_ips.iter().copied().map(IpNet::from)));
            inside.extend(own_ips.iter().copied().map(IpNet::from));
            for family in Family::ALL {
                let of_family = |net: &&IpNet| Family::of(&net.addr()) == family;
                let sources: Vec<IpNet> = self.config.pod_cidrs.iter().filter(of_family).copied().collect();
                if !sources.is_empty() {
                    let exempt: Vec<IpNet> = inside.iter().filter(of_family).copied().collect();
                    masquerade(family, &sources, &exempt)?;
                }
            }
        }
        if self.applied.as_ref() != Some(&nodes) {
            log::info!("cluster: {} peer pod CIDR(s): {:?}", peers.len(), peers);
        }
        self.applied = Some(nodes);
        Ok(())
    }
}

/// Pod traffic from `sources` to anywhere outside `inside` leaves with the node's
/// address.
fn masquerade(family: Family, sources: &[IpNet], inside: &[IpNet]) -> anyhow::Result<()> {
    let mut rules: Vec<String> = inside.iter().map(|net| format!("-d {net} -j RETURN")).collect();
    rules.push("-j MASQUERADE".into());
    let jumps: Vec<Vec<String>> = sources.iter().map(|s| vec!["-s".into(), s.to_string()]).collect();
    replace_chain(family, "nat", MASQ_CHAIN, &rules, MASQ_HOOK, &jumps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_file_is_a_kubernetes_node_list() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"metadata": {"name": "w2"},
             "spec": {"podCIDR": "200.200.2.0/24", "podCIDRs": ["200.200.2.0/24", "fd00:200:2::/64"]},
             "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.4"},
                                      {"type": "InternalIP", "address": "fd00:10::4"},
                                      {"type": "Hostname", "address": "w2"}]}},
            {"metadata": {"name": "w3"}}
        ]}"#;
        let nodes = parse_nodes(text.as_bytes()).unwrap();
        assert_eq!(nodes.len(), 2);
        let w2 = &nodes[0];
        assert_eq!(w2.node_ips.len(), 2, "only InternalIPs: {w2:?}");
        let v6: IpNet = "fd00:200:2::/64".parse().unwrap();
        assert_eq!(w2.next_hop(&v6), Some("fd00:10::4".parse().unwrap()));
        let v4: IpNet = "200.200.2.0/24".parse().unwrap();
        assert_eq!(w2.next_hop(&v4), Some("10.0.0.4".parse().unwrap()));
        assert!(nodes[1].pod_cidrs.is_empty(), "a node without spec yet is no peer");
    }

    #[test]
    fn a_bad_node_is_skipped_and_the_others_kept() {
        let text = r#"{"items": [
            {"metadata": {"name": "bad-cidr"}, "spec": {"podCIDRs": ["200.200.300.0/24"]}},
            {"spec": {"podCIDRs": ["200.200.4.0/24"]}},
            "not a node",
            {"metadata": {"name": "good"}, "spec": {"podCIDRs": ["200.200.5.0/24"]}}
        ]}"#;
        let nodes = parse_nodes(text.as_bytes()).unwrap();
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["good"]);
        assert!(parse_nodes(b"{\"items\": 7}").is_err());
        assert!(parse_nodes(b"[]").is_err());
    }

    #[test]
    fn peer_cidrs_that_would_take_over_other_routes_are_refused() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let own = [net("200.200.1.0/24"), net("fd00:200:1::/64")];
        let host = [
            ForeignRoute {
                dst: net("0.0.0.0/0"),
                via_gateway: true,
            },
            ForeignRoute {
                dst: net("10.0.0.0/24"),
                via_gateway: false,
            },
            ForeignRoute {
                dst: net("172.17.0.0/16"),
                via_gateway: false,
            },
            ForeignRoute {
                dst: net("100.64.0.0/10"),
                via_gateway: true,
            },
            ForeignRoute {
                dst: net("fd00:10::/64"),
                via_gateway: false,
            },
        ];
        let accepted = [net("200.200.2.0/24")];
        let refused = |cidr: &str| conflict(&net(cidr), &own, &accepted, &host);
        for ok in ["200.200.3.0/24", "fd00:200:3::/64", "100.64.5.0/24"] {
            assert_eq!(refused(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0/0", "default"),
            ("::/0", "default"),
            ("200.200.1.128/25", "this node's pod CIDR"),
            ("200.200.0.0/16", "this node's pod CIDR"),
            ("200.200.2.0/25", "another node"),
            ("10.0.0.0/25", "host's route to 10.0.0.0/24"),
            ("172.16.0.0/12", "host's route to 172.17.0.0/16"),
            ("100.0.0.0/8", "host's route to 100.64.0.0/10"),
            ("fd00:10::/64", "host's route"),
        ] {
            let why_refused = refused(bad).unwrap_or_else(|| panic!("{bad} was accepted"));
            assert!(why_refused.contains(why), "{bad}: {why_refused}");
        }
    }
}
