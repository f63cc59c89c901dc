//! The node's place among the nodes: `from_net` on the uplink, and a route for every
//! other node's pod CIDRs of both families (no NAT): via the node's address when it
//! is on the uplink's link, through the VXLAN device otherwise (`tunnel`); with the
//! peer map, the node map and the masquerade chains kept in step.

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use velox_common::{Peer, FROM_NET_PROGRAM, PEER_FORCED, PEER_NATIVE, PEER_NOT_ON_LINK, PEER_ON_LINK, PEER_VXLAN};
use velox_node::layout::Hook;
use velox_node::link::attach_tc;
use velox_node::maps::{NodeMap, PeerMap};
use velox_node::netlink::{Link, Netlink, Route, MAIN_TABLE, VELOX_ROUTE_PROTOCOL};
use velox_node::{Bpffs, Family};

use super::masquerade::{masquerade_outside, remove_masquerade};
use super::peers::{node_addresses, trusted_nodes, write_node_map, write_peer_map, NodeAddresses, PeerRoute};
use super::services::ThisNode;
use super::tunnel::{
    ensure_device, outer_address, overhead, remove_device, sync_pod_routes_to_nodes, tunnel_remotes,
    tunnelled_node_ips, TunnelMode,
};

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
    /// Which peers are reached through the VXLAN device.
    pub tunnel: TunnelMode,
    /// The VXLAN device's UDP port.
    pub vxlan_port: u16,
}

/// The uplink, the routes to the other nodes' pods, the peer map and masquerading,
/// kept in line with the cluster's nodes.
pub struct NodeNetwork {
    config: NodeNetworkConfig,
    bpffs: Bpffs,
    /// The uplink's MTU as the last pass found it.
    uplink_mtu: Option<u32>,
    /// What the last successful pass set up, to notice a changed peers file.
    applied: Option<Vec<NodeAddresses>>,
    /// The uplink's addresses (with their prefixes) as the last pass found them.
    own_nets: Vec<IpNet>,
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
            own_nets: Vec::new(),
            uplink_mtu: None,
        })
    }

    /// The uplink, once known.
    pub fn uplink(&self) -> Option<&str> {
        self.config.uplink.as_deref()
    }

    /// The MTU pods get, once the uplink is known: the uplink's, less VXLAN's
    /// encapsulation unless `--tunnel never` (in `auto` any peer may come to be
    /// tunnelled; a pod's MTU is set once, at ADD). IPv4's where the node has an
    /// IPv4 address on the uplink, as the tunnel then uses it.
    pub fn pod_mtu(&self) -> Option<u32> {
        self.uplink_mtu.map(|mtu| match self.config.tunnel {
            TunnelMode::Never => mtu,
            _ => mtu.saturating_sub(overhead(self.underlay_family())),
        })
    }

    /// The family the tunnel's outer header takes from this node: IPv4 where the
    /// uplink has an IPv4 address.
    fn underlay_family(&self) -> Family {
        match self.underlay_ips().iter().any(IpAddr::is_ipv4) {
            true => Family::V4,
            false => Family::V6,
        }
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
        ThisNode {
            addresses: self
                .underlay_ips()
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            pod_cidrs: self.config.pod_cidrs.clone(),
        }
    }

    /// The uplink's addresses, link-local ones aside: this node's on the underlay.
    fn underlay_ips(&self) -> Vec<IpAddr> {
        self.own_nets
            .iter()
            .map(IpNet::addr)
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect()
    }

    /// One full pass over `nodes`, the cluster's nodes as the source has them; cheap
    /// when nothing changed. When the source cannot say (`None`), the last applied
    /// nodes stay, or at start-up the routes and peer entries already in the kernel.
    pub async fn apply_nodes(&mut self, netlink: &Netlink, nodes: Option<Vec<Node>>) -> anyhow::Result<()> {
        let nodes = match (nodes, &self.applied) {
            (Some(nodes), _) => {
                let held = NodeMap::open(&self.bpffs)?.entries()?;
                trusted_nodes(node_addresses(&nodes), &held)
            }
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
        self.own_nets = netlink.addresses(uplink.index).await?;
        self.uplink_mtu = Some(uplink.mtu);
        let mut routes = Vec::new();
        for family in Family::ALL {
            routes.extend(netlink.routes(family).await?);
        }
        let next_hops = self.next_hops(&nodes, &routes)?;
        // Senders are known before routes lead anyone to send.
        let remotes = tunnel_remotes(&next_hops);
        write_node_map(&self.bpffs, &nodes, &self.underlay_ips(), &remotes)?;
        let tunnel = self.sync_tunnel(netlink, &next_hops, &uplink).await?;
        let through = Through {
            uplink: uplink.index,
            tunnel: tunnel.as_ref().map(|t| t.index),
            sources: self.underlay_ips(),
        };
        // The datapath knows a peer before routes lead the kernel's packets to it.
        write_peer_map(&self.bpffs, &next_hops, &uplink, tunnel.as_ref())?;
        sync_routes(netlink, &routes, &next_hops, &through).await?;
        let pod_cidrs: Vec<IpNet> = next_hops.keys().chain(&self.config.pod_cidrs).copied().collect();
        sync_pod_routes_to_nodes(
            netlink,
            &routes,
            through.tunnel,
            &self.config.pod_cidrs,
            &tunnelled_node_ips(&nodes, &remotes, &pod_cidrs),
            &through.sources,
        )
        .await?;
        if tunnel.is_none() {
            // Last, with `--tunnel never`: nothing leads into it any more.
            remove_device(netlink, &self.bpffs).await?;
        }
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

    /// The VXLAN device, unless `--tunnel never`: also where no peer is tunnelled,
    /// so this node receives from a peer that tunnels to it (a rolling change of
    /// `--tunnel`, a peer that sees this one off its link). Its MTU is the uplink's
    /// less the largest encapsulation in use (made if need be).
    async fn sync_tunnel(
        &self,
        netlink: &Netlink,
        next_hops: &BTreeMap<IpNet, PeerRoute>,
        uplink: &Link,
    ) -> anyhow::Result<Option<Link>> {
        if self.config.tunnel == TunnelMode::Never {
            return Ok(None);
        }
        let largest = next_hops
            .values()
            .filter(|hop| hop.route == PEER_VXLAN)
            .map(|hop| overhead(Family::of(&hop.node_ip)))
            .chain([overhead(self.underlay_family())])
            .max()
            .unwrap_or_default();
        let mtu = uplink.mtu.saturating_sub(largest);
        Ok(Some(
            ensure_device(netlink, &self.bpffs, self.config.vxlan_port, mtu).await?,
        ))
    }

    /// How to reach `node`'s `cidr`: natively via its address of the CIDR's family
    /// when that is on a subnet of the uplink (or `--tunnel never`), else through the
    /// tunnel to its underlay address. `None` when neither can be.
    fn route_to(&self, node: &NodeAddresses, cidr: &IpNet) -> Option<PeerRoute> {
        let native = node.next_hop(cidr);
        let on_link = native.filter(|ip| self.own_nets.iter().any(|net| net.contains(ip)));
        let tunnelled = |reason| {
            outer_address(&self.underlay_ips(), &node.node_ips).map(|ip| PeerRoute::new(node, ip, PEER_VXLAN, reason))
        };
        match (self.config.tunnel, on_link) {
            (TunnelMode::Never, _) => native.map(|ip| PeerRoute::new(node, ip, PEER_NATIVE, PEER_FORCED)),
            (TunnelMode::Always, _) => tunnelled(PEER_FORCED),
            (TunnelMode::Auto, Some(ip)) => Some(PeerRoute::new(node, ip, PEER_NATIVE, PEER_ON_LINK)),
            (TunnelMode::Auto, None) => tunnelled(PEER_NOT_ON_LINK),
        }
    }

    /// The other nodes' pod CIDRs to route, each natively or through the tunnel
    /// (`route_to`); a CIDR that would take over another route is left out, with a
    /// log line. An unreadable peer map fails the pass before anything is written:
    /// without it a tunnelled peer's CIDR (no route of its own) looks unheld.
    fn next_hops(&self, nodes: &[NodeAddresses], routes: &[Route]) -> anyhow::Result<BTreeMap<IpNet, PeerRoute>> {
        let host_routes: Vec<ForeignRoute> = routes
            .iter()
            .filter(|r| r.protocol != VELOX_ROUTE_PROTOCOL)
            .map(|r| ForeignRoute {
                dst: r.dst,
                via_gateway: r.gateway.is_some(),
            })
            .collect();
        let own_ips = self.underlay_ips();
        let mut candidates = Vec::new();
        for node in nodes
            .iter()
            .filter(|n| !n.node_ips.iter().any(|ip| own_ips.contains(ip)))
        {
            for cidr in &node.pod_cidrs {
                match self.route_to(node, cidr) {
                    Some(next_hop) => candidates.push((node, *cidr, next_hop)),
                    None => log::warn!(
                        "node {} has no InternalIP this node can reach {cidr} by (--tunnel {:?}): not routed",
                        node.name,
                        self.config.tunnel
                    ),
                }
            }
        }
        // Where two nodes claim overlapping CIDRs, the one that holds it already (its
        // route via the node, or its peer entry) keeps it: a newcomer (a misconfigured
        // or hostile Node) never takes it over.
        let holders = PeerMap::open(&self.bpffs)
            .and_then(|map| map.entries())
            .context("reading the peer map, which says who holds each pod CIDR")?;
        let established_by = |node: &NodeAddresses, cidr: &IpNet| {
            routes.iter().any(|r| {
                r.protocol == VELOX_ROUTE_PROTOCOL
                    && r.dst == *cidr
                    && r.gateway.is_some_and(|gw| node.node_ips.contains(&gw))
            }) || holders
                .iter()
                .any(|(held, peer)| held == cidr && peer.node == Peer::node_id(&node.name))
        };
        candidates.sort_by_key(|(node, cidr, _)| (!established_by(node, cidr), node.name.clone()));
        let mut next_hops: BTreeMap<IpNet, PeerRoute> = BTreeMap::new();
        for (node, cidr, next_hop) in candidates {
            let accepted: Vec<IpNet> = next_hops.keys().copied().collect();
            match conflict(&cidr, &self.config.pod_cidrs, &accepted, &host_routes) {
                Some(why) => log::warn!("node {}: not routing {cidr}: {why}", node.name),
                None => {
                    next_hops.insert(cidr, next_hop);
                }
            }
        }
        Ok(next_hops)
    }

    /// Everything inside the cluster, which keeps its source address: the routed pod
    /// CIDRs, this node's, and every node's addresses.
    fn inside(&self, nodes: &[NodeAddresses], next_hops: &BTreeMap<IpNet, PeerRoute>) -> BTreeSet<IpNet> {
        let mut inside: BTreeSet<IpNet> = next_hops.keys().copied().collect();
        inside.extend(self.config.pod_cidrs.iter().map(IpNet::trunc));
        inside.extend(nodes.iter().flat_map(|n| n.node_ips.iter().copied().map(IpNet::from)));
        inside.extend(self.own_nets.iter().map(IpNet::addr).map(IpNet::from));
        inside
    }
}

/// The interfaces Velox's routes leave by, and the sources they give the host's own
/// packets into the tunnel (its underlay addresses: the peer knows them as this node's).
struct Through {
    uplink: u32,
    tunnel: Option<u32>,
    sources: Vec<IpAddr>,
}

impl Through {
    /// Whether `route` is the one `next_hop` calls for.
    fn is(&self, route: &Route, next_hop: &PeerRoute) -> bool {
        match next_hop.route {
            PEER_VXLAN => route.gateway.is_none() && route.oif.is_some() && route.oif == self.tunnel,
            _ => route.gateway == Some(next_hop.node_ip) && route.oif == Some(self.uplink),
        }
    }

    async fn add(&self, netlink: &Netlink, cidr: IpNet, next_hop: &PeerRoute) -> anyhow::Result<()> {
        match (next_hop.route, self.tunnel) {
            (PEER_VXLAN, Some(tunnel)) => {
                let family = Family::of(&cidr.addr());
                let source = self.sources.iter().copied().find(|ip| Family::of(ip) == family);
                netlink.add_route_through(cidr, tunnel, source, MAIN_TABLE).await?
            }
            (PEER_VXLAN, None) => anyhow::bail!("{cidr}: tunnelled, but there is no VXLAN device"),
            _ => netlink.add_route_via(cidr, next_hop.node_ip, self.uplink).await?,
        }
        Ok(())
    }
}

/// Makes Velox's routes (its route protocol) be exactly `next_hops`; `routes` are
/// the kernel's routes of both families. A route that changes (a peer moving into
/// or out of the tunnel) is replaced: removed, then added.
async fn sync_routes(
    netlink: &Netlink,
    routes: &[Route],
    next_hops: &BTreeMap<IpNet, PeerRoute>,
    through: &Through,
) -> anyhow::Result<()> {
    let mut routed = BTreeSet::new();
    let velox_routes = routes
        .iter()
        .filter(|r| r.protocol == VELOX_ROUTE_PROTOCOL && r.table == MAIN_TABLE);
    for route in velox_routes {
        match next_hops.get(&route.dst) {
            Some(next_hop) if through.is(route, next_hop) => {
                routed.insert(route.dst);
            }
            _ => {
                log::info!(
                    "removing route {} via {:?} (link {:?})",
                    route.dst,
                    route.gateway,
                    route.oif
                );
                netlink.delete_route(route).await?;
            }
        }
    }
    for (cidr, next_hop) in next_hops.iter().filter(|(cidr, _)| !routed.contains(*cidr)) {
        through.add(netlink, *cidr, next_hop).await?;
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
