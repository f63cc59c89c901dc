//! The node's place among the nodes: `from_net` on the uplink, and a route for every
//! other node's pod CIDRs of both families (direct routing: no tunnel, no NAT), with
//! the peer map and the masquerade chains kept in step.

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use velox_common::FROM_NET_PROGRAM;
use velox_node::layout::Hook;
use velox_node::link::attach_tc;
use velox_node::netlink::{Link, Netlink, Route, VELOX_ROUTE_PROTOCOL};
use velox_node::{Bpffs, Family};

use super::masquerade::{masquerade_outside, remove_masquerade};
use super::peers::{node_addresses, write_peer_map, NodeAddresses};
use super::services::ThisNode;

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

pub struct NodeNetworkConfig {
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

/// The uplink, the routes to the other nodes' pods, the peer map and masquerading,
/// kept in line with the cluster's nodes.
pub struct NodeNetwork {
    config: NodeNetworkConfig,
    bpffs: Bpffs,
    /// What the last successful pass set up, to notice a changed peers file.
    applied: Option<Vec<NodeAddresses>>,
    /// The uplink's addresses as the last pass found them.
    own_ips: Vec<IpAddr>,
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

impl NodeNetwork {
    pub fn new(config: NodeNetworkConfig, bpffs: Bpffs) -> anyhow::Result<Self> {
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
    async fn learn_from_own_node(&mut self, netlink: &Netlink, nodes: &[NodeAddresses]) -> anyhow::Result<bool> {
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

    /// This node as the Services see it: its uplink addresses (link-local ones
    /// aside) and its pod CIDRs.
    pub fn this_node(&self) -> ThisNode {
        let addresses = self
            .own_ips
            .iter()
            .copied()
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        ThisNode {
            addresses,
            pod_cidrs: self.config.pod_cidrs.clone(),
        }
    }

    /// One full pass over `nodes`, the cluster's nodes as the source has them; cheap
    /// when nothing changed. When the source cannot say (`None`), the last applied
    /// nodes stay, or at start-up the routes and peer entries already in the kernel.
    pub async fn apply_nodes(&mut self, netlink: &Netlink, nodes: Option<Vec<Node>>) -> anyhow::Result<()> {
        let nodes = match (nodes, &self.applied) {
            (Some(nodes), _) => node_addresses(&nodes),
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
        let uplink = self.attach_uplink(netlink).await?;
        self.own_ips = netlink.addresses(uplink.index).await?.iter().map(IpNet::addr).collect();
        let mut routes = Vec::new();
        for family in Family::ALL {
            routes.extend(netlink.routes(family).await?);
        }
        let next_hops = self.next_hops(&nodes, &routes);
        sync_routes(netlink, &routes, &next_hops, uplink.index).await?;
        write_peer_map(&self.bpffs, &next_hops, &uplink)?;
        if self.config.ip_masq {
            masquerade_outside(&self.config.pod_cidrs, &self.inside(&nodes, &next_hops))?;
        }
        if self.applied.as_ref() != Some(&nodes) {
            log::info!("cluster: {} peer pod CIDR(s): {:?}", next_hops.len(), next_hops);
        }
        self.applied = Some(nodes);
        Ok(())
    }

    /// The uplink, with `from_net` attached.
    async fn attach_uplink(&self, netlink: &Netlink) -> anyhow::Result<Link> {
        let name = self.config.uplink.clone().unwrap_or_default();
        let uplink = netlink
            .link(&name)
            .await?
            .with_context(|| format!("uplink {name} not found"))?;
        if !self.bpffs.tc_link(Hook::TcIngress, &uplink.name).exists() {
            log::info!("attaching from_net to {}", uplink.name);
            attach_tc(&self.bpffs, Hook::TcIngress, FROM_NET_PROGRAM, &uplink.name)?;
        }
        Ok(uplink)
    }

    /// The other nodes' pod CIDRs to route, each to the node's address of its
    /// family; a CIDR that would take over another route is left out, with a log line.
    fn next_hops(&self, nodes: &[NodeAddresses], routes: &[Route]) -> BTreeMap<IpNet, IpAddr> {
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
            .filter(|n| !n.node_ips.iter().any(|ip| self.own_ips.contains(ip)))
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
        let mut next_hops: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        for (node, cidr, next_hop) in candidates {
            let accepted: Vec<IpNet> = next_hops.keys().copied().collect();
            match conflict(&cidr, &self.config.pod_cidrs, &accepted, &host_routes) {
                Some(why) => log::warn!("node {}: not routing {cidr}: {why}", node.name),
                None => {
                    next_hops.insert(cidr, next_hop);
                }
            }
        }
        next_hops
    }

    /// Everything inside the cluster, which keeps its source address: the routed pod
    /// CIDRs, this node's, and every node's addresses.
    fn inside(&self, nodes: &[NodeAddresses], next_hops: &BTreeMap<IpNet, IpAddr>) -> BTreeSet<IpNet> {
        let mut inside: BTreeSet<IpNet> = next_hops.keys().copied().collect();
        inside.extend(self.config.pod_cidrs.iter().map(IpNet::trunc));
        inside.extend(nodes.iter().flat_map(|n| n.node_ips.iter().copied().map(IpNet::from)));
        inside.extend(self.own_ips.iter().copied().map(IpNet::from));
        inside
    }
}

/// Makes Velox's routes (its route protocol) be exactly `next_hops` through the
/// uplink `uplink_index`; `routes` are the kernel's routes of both families.
async fn sync_routes(
    netlink: &Netlink,
    routes: &[Route],
    next_hops: &BTreeMap<IpNet, IpAddr>,
    uplink_index: u32,
) -> anyhow::Result<()> {
    for family in Family::ALL {
        let mut routed = BTreeSet::new();
        for route in routes.iter().filter(|r| Family::of(&r.dst.addr()) == family) {
            let wanted = next_hops.get(&route.dst) == route.gateway.as_ref() && route.oif == Some(uplink_index);
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
        let missing = next_hops
            .iter()
            .filter(|(cidr, _)| Family::of(&cidr.addr()) == family && !routed.contains(*cidr));
        for (cidr, node_ip) in missing {
            netlink.add_route_via(*cidr, *node_ip, uplink_index).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
