//! The other nodes as peers: what Velox reads of each Node (its name, pod CIDRs and
//! InternalIPs), the peer map the datapath forwards to them with, and the node map
//! that says who may send through the tunnel.

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::IpAddr;
use velox_common::{IpKey, NodeEntry, Peer, AF_INET, AF_INET6, PEER_VXLAN, THIS_NODE};
use velox_node::maps::{NodeMap, PeerMap};
use velox_node::netlink::Link;
use velox_node::{Bpffs, Family};

/// One node as Velox needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeAddresses {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    /// Its InternalIPs, at most one per family in a dual-stack cluster.
    pub node_ips: Vec<IpAddr>,
}

impl NodeAddresses {
    /// What Velox reads of a Node; one without a name or with a pod CIDR that does
    /// not parse is refused.
    fn of(node: &Node) -> anyhow::Result<Self> {
        let name = node.metadata.name.clone().context("a node without a name")?;
        let pod_cidrs = node
            .spec
            .iter()
            .flat_map(|spec| spec.pod_cidrs.iter().flatten())
            .map(|cidr| {
                let net: IpNet = cidr.parse().with_context(|| format!("node {name}: pod CIDR {cidr}"))?;
                Ok(net.trunc())
            })
            .collect::<anyhow::Result<_>>()?;
        let node_ips = node
            .status
            .iter()
            .flat_map(|status| status.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Ok(Self {
            name,
            pod_cidrs,
            node_ips,
        })
    }

    /// The node's address to reach `cidr` through: the one of the same family.
    pub fn next_hop(&self, cidr: &IpNet) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == Family::of(&cidr.addr()))
    }
}

/// The nodes as Velox needs them, sorted. A node that does not read (a bad CIDR, a
/// missing name) is skipped with a log line.
pub fn node_addresses(nodes: &[Node]) -> Vec<NodeAddresses> {
    let mut out: Vec<NodeAddresses> = nodes
        .iter()
        .filter_map(|node| {
            NodeAddresses::of(node)
                .map_err(|e| log::warn!("skipping a node: {e:#}"))
                .ok()
        })
        .collect();
    out.sort();
    out
}

/// The nodes as far as their tunnel ids and InternalIPs can be trusted (a kubelet
/// writes its own Node's addresses): an InternalIP that can be no node's (loopback,
/// link-local, multicast, unspecified) is left out; an id or an
/// address two nodes claim stays with the node that holds it in the node map now
/// (`held`; for an address nobody holds, the first by name): a newcomer never takes
/// over another node's id or address.
pub fn trusted_nodes(mut nodes: Vec<NodeAddresses>, held: &[(IpAddr, NodeEntry)]) -> Vec<NodeAddresses> {
    let holds = |node: &NodeAddresses, ip: &IpAddr| {
        let id = Peer::node_id(&node.name);
        held.iter().any(|(held_ip, entry)| entry.node == id && held_ip == ip)
    };
    let holds_any = |node: &NodeAddresses| node.node_ips.iter().any(|ip| holds(node, ip));
    // Names sharing an id: the one whose addresses the node map has under that id
    // stays, when exactly one does.
    let mut by_id: BTreeMap<u32, Vec<&NodeAddresses>> = BTreeMap::new();
    for node in &nodes {
        by_id.entry(Peer::node_id(&node.name)).or_default().push(node);
    }
    let left_out: Vec<String> = by_id
        .values()
        .filter(|sharing| sharing.len() > 1)
        .flat_map(|sharing| {
            let holders = sharing.iter().filter(|n| holds_any(n)).count();
            sharing
                .iter()
                .filter(move |n| holders != 1 || !holds_any(n))
                .map(|n| n.name.clone())
        })
        .collect();
    nodes.retain(|node| {
        let keep = !left_out.contains(&node.name);
        if !keep {
            log::warn!("node {}: its tunnel id is another node's too: left out", node.name);
        }
        keep
    });
    // Each address's claimants: the one holding it now keeps it, or else the first
    // by name.
    let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    for node in &nodes {
        for ip in &node.node_ips {
            let holder = owner
                .get(ip)
                .filter(|name| nodes.iter().any(|n| &n.name == *name && holds(n, ip)));
            if holder.is_none() && (holds(node, ip) || !owner.contains_key(ip)) {
                owner.insert(*ip, node.name.clone());
            }
        }
    }
    for node in &mut nodes {
        let name = node.name.clone();
        let mut kept = Vec::new();
        for ip in std::mem::take(&mut node.node_ips) {
            let why = if !is_node_address(&ip) {
                Some("it can be no node's")
            } else if owner.get(&ip) != Some(&name) {
                Some("another node claims it")
            } else {
                None
            };
            match why {
                Some(why) => log::warn!("node {name}: InternalIP {ip} left out: {why}"),
                None => kept.push(ip),
            }
        }
        node.node_ips = kept;
    }
    nodes
}

/// Whether `ip` can be a node's address on the underlay.
fn is_node_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_multicast() || v6.is_unspecified()),
    }
}

/// How this node reaches one of a peer's pod CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's node id ([`Peer::node_id`]).
    pub node: u32,
    /// The next hop on the link, or the tunnel's remote.
    pub node_ip: IpAddr,
    /// `PEER_NATIVE` or `PEER_VXLAN`.
    pub route: u32,
    /// Why (`PEER_ON_LINK` ..).
    pub reason: u32,
}

impl PeerRoute {
    pub fn new(node: &NodeAddresses, node_ip: IpAddr, route: u32, reason: u32) -> Self {
        Self {
            node: Peer::node_id(&node.name),
            node_ip,
            route,
            reason,
        }
    }
}

/// Makes the peer map hold exactly `next_hops` (pod CIDR -> node), each reached
/// through `uplink`, or `tunnel` for a tunnelled one.
pub fn write_peer_map(
    bpffs: &Bpffs,
    next_hops: &BTreeMap<IpNet, PeerRoute>,
    uplink: &Link,
    tunnel: Option<&Link>,
) -> anyhow::Result<()> {
    let mut map = PeerMap::open(bpffs)?;
    // Entries of departed nodes go; the puts below overwrite the rest.
    for (cidr, _) in map.entries()? {
        if !next_hops.contains_key(&cidr) {
            map.remove(cidr)?;
        }
    }
    for (cidr, hop) in next_hops {
        let peer = match (hop.route, tunnel) {
            (PEER_VXLAN, Some(tunnel)) => Peer::tunnelled(hop.node_ip, hop.node, tunnel.index, tunnel.mtu, hop.reason),
            (PEER_VXLAN, None) => anyhow::bail!("{cidr}: tunnelled, but there is no VXLAN device"),
            _ => Peer::native(hop.node_ip, hop.node, uplink.index, uplink.mtu, hop.reason),
        };
        map.put(*cidr, peer)?;
    }
    Ok(())
}

/// Makes the node map hold every other node's InternalIPs (not this node's, whose
/// addresses are `own_ips`) with its id, and its tunnel remote (`remotes`, by node
/// id) if it is tunnelled; and this node's own addresses as [`THIS_NODE`].
pub fn write_node_map(
    bpffs: &Bpffs,
    nodes: &[NodeAddresses],
    own_ips: &[IpAddr],
    remotes: &BTreeMap<u32, IpAddr>,
) -> anyhow::Result<()> {
    let wanted: BTreeMap<IpAddr, NodeEntry> = nodes
        .iter()
        .filter(|node| !node.node_ips.iter().any(|ip| own_ips.contains(ip)))
        .flat_map(|node| {
            let id = Peer::node_id(&node.name);
            let entry = NodeEntry {
                remote: remotes.get(&id).map_or(IpKey::v6([0; 16]), |ip| (*ip).into()),
                family: match remotes.get(&id) {
                    Some(IpAddr::V4(_)) => AF_INET,
                    Some(IpAddr::V6(_)) => AF_INET6,
                    None => 0,
                },
                node: id,
            };
            node.node_ips.iter().map(move |ip| (*ip, entry))
        })
        .chain(own_ips.iter().map(|ip| {
            let entry = NodeEntry {
                remote: IpKey::v6([0; 16]),
                family: 0,
                node: THIS_NODE,
            };
            (*ip, entry)
        }))
        .collect();
    Ok(NodeMap::open(bpffs)?.sync(&wanted)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::parse_node_list;

    fn parse_nodes(json: &[u8]) -> anyhow::Result<Vec<NodeAddresses>> {
        Ok(node_addresses(&parse_node_list(json)?))
    }

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
    fn addresses_no_node_can_have_or_another_node_holds_are_left_out() {
        let node = |name: &str, cidr: &str, ips: &[&str]| NodeAddresses {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            node_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        };
        let held_by = |name: &str, ip: &str| {
            let entry = NodeEntry {
                remote: IpKey::v6([0; 16]),
                family: 0,
                node: Peer::node_id(name),
            };
            (ip.parse().unwrap(), entry)
        };
        let nodes = vec![
            node("old", "200.200.2.0/24", &["10.0.0.4", "fd00:10::4"]),
            // Claims the old node's address, loopback and link-local.
            node(
                "new",
                "200.200.3.0/24",
                &["10.0.0.4", "127.0.0.1", "fe80::1", "10.0.0.5"],
            ),
        ];
        let trusted = trusted_nodes(nodes, &[held_by("old", "10.0.0.4")]);
        let ips = |i: usize| trusted[i].node_ips.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(ips(0), ["10.0.0.4", "fd00:10::4"]);
        assert_eq!(ips(1), ["10.0.0.5"]);
    }

    #[test]
    fn of_two_names_with_one_id_only_the_holder_stays() {
        let (holder, newcomer) = ("node-522789", "node-739192");
        assert_eq!(Peer::node_id(holder), Peer::node_id(newcomer));
        let node = |name: &str, ip: &str| NodeAddresses {
            name: name.into(),
            pod_cidrs: Vec::new(),
            node_ips: vec![ip.parse().unwrap()],
        };
        let nodes = || vec![node(holder, "10.0.0.4"), node(newcomer, "10.0.0.5")];
        let entry = NodeEntry {
            remote: IpKey::v6([0; 16]),
            family: 0,
            node: Peer::node_id(holder),
        };
        let kept = trusted_nodes(nodes(), &[("10.0.0.4".parse().unwrap(), entry)]);
        assert_eq!(kept.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), [holder]);
        // Neither held: neither stays.
        assert!(trusted_nodes(nodes(), &[]).is_empty());
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
}
