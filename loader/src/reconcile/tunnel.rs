//! The VXLAN underlay for peers that are not on this node's link: when to use it,
//! and the one collect-metadata device it takes, with `from_tunnel` and `to_tunnel`
//! attached.

use anyhow::Context;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use velox_common::{Peer, FROM_TUNNEL_PROGRAM, PEER_VXLAN, TO_TUNNEL_PROGRAM};
use velox_node::layout::Hook;
use velox_node::link::{attach_tc, detach_tc};
use velox_node::netlink::{Link, Netlink, Route, VELOX_ROUTE_PROTOCOL, VELOX_ROUTE_TABLE};
use velox_node::{Bpffs, Family};

use super::peers::{NodeAddresses, PeerRoute};

/// The node's VXLAN device.
pub const VXLAN_DEVICE: &str = "velox-vxlan";
pub use velox_common::DEFAULT_VXLAN_PORT;

/// Which peers are reached through the tunnel.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelMode {
    /// A peer on a subnet of the uplink natively, any other through VXLAN.
    #[default]
    Auto,
    /// Every peer through VXLAN.
    Always,
    /// No tunnel: every peer must be on the link, or the network must route pod
    /// CIDRs (the VXLAN device is removed).
    Never,
}

/// Bytes VXLAN adds to a frame: the outer IP header, UDP (8), VXLAN (8) and the
/// inner Ethernet header (14).
pub fn overhead(outer: Family) -> u32 {
    let ip = match outer {
        Family::V4 => 20,
        Family::V6 => 40,
    };
    ip + 8 + 8 + 14
}

/// The underlay address to tunnel to `peer_ips` (a peer's InternalIPs) from a node
/// with underlay addresses `own_ips`: IPv4 where both have it, else IPv6. An IPv4
/// underlay carries IPv6 pods too.
pub fn outer_address(own_ips: &[IpAddr], peer_ips: &[IpAddr]) -> Option<IpAddr> {
    [Family::V4, Family::V6].into_iter().find_map(|family| {
        let own = own_ips.iter().any(|ip| Family::of(ip) == family);
        peer_ips.iter().copied().find(|ip| own && Family::of(ip) == family)
    })
}

/// Makes the VXLAN device exist on `port` with `mtu`, up, with its programs
/// attached. A device on another port (a changed `--vxlan-port`) is made anew.
pub async fn ensure_device(netlink: &Netlink, bpffs: &Bpffs, port: u16, mtu: u32) -> anyhow::Result<Link> {
    let existing = netlink.link(VXLAN_DEVICE).await?;
    if existing.is_some() && netlink.vxlan_port(VXLAN_DEVICE).await? != Some(port) {
        log::info!("{VXLAN_DEVICE} is not a VXLAN device on port {port}: making it anew");
        remove_device(netlink, bpffs).await?;
    }
    let link = match netlink.link(VXLAN_DEVICE).await? {
        Some(link) => link,
        None => {
            log::info!("creating {VXLAN_DEVICE} (VXLAN, UDP port {port}, MTU {mtu})");
            // Links pinned for an earlier device of the name went with it.
            detach_tc(bpffs, VXLAN_DEVICE)?;
            netlink.create_vxlan(VXLAN_DEVICE, port, mtu).await?;
            netlink
                .link(VXLAN_DEVICE)
                .await?
                .context("the VXLAN device vanished as it was made")?
        }
    };
    // All of it before the device goes up: up, it decapsulates whatever comes, and
    // only `from_tunnel` checks who sent it. A device that cannot have its programs
    // goes again.
    let checked = async {
        configure_device()?;
        if link.mtu != mtu {
            log::info!("{VXLAN_DEVICE}: MTU {} -> {mtu}", link.mtu);
            netlink.set_mtu(link.index, mtu).await?;
        }
        for (hook, program) in [
            (Hook::TcIngress, FROM_TUNNEL_PROGRAM),
            (Hook::TcEgress, TO_TUNNEL_PROGRAM),
        ] {
            if !bpffs.tc_link(hook, VXLAN_DEVICE).exists() {
                attach_tc(bpffs, hook, program, VXLAN_DEVICE)?;
            }
        }
        anyhow::Ok(())
    };
    if let Err(e) = checked.await {
        remove_device(netlink, bpffs).await?;
        return Err(e.context(format!("setting up {VXLAN_DEVICE}")));
    }
    netlink.set_up(link.index).await?;
    Ok(Link { mtu, ..link })
}

/// The device's settings the link message cannot carry, at every pass: no IPv6
/// address of its own (no link-local address, no router solicitations into the
/// tunnel), and loose reverse-path filtering: a peer's host traffic comes out of the
/// tunnel with the peer's node address, which the routes reach by the uplink.
fn configure_device() -> anyhow::Result<()> {
    for (path, value) in [
        (format!("/proc/sys/net/ipv6/conf/{VXLAN_DEVICE}/addr_gen_mode"), "1"),
        (format!("/proc/sys/net/ipv4/conf/{VXLAN_DEVICE}/rp_filter"), "2"),
    ] {
        match std::fs::write(&path, value) {
            // A kernel without IPv6 has nothing to configure.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.contains("ipv6") => {}
            other => other.with_context(|| format!("writing {path}"))?,
        }
    }
    Ok(())
}

/// Removes the VXLAN device and its links, if there are any.
pub async fn remove_device(netlink: &Netlink, bpffs: &Bpffs) -> anyhow::Result<()> {
    if netlink.link(VXLAN_DEVICE).await?.is_some() {
        log::info!("removing {VXLAN_DEVICE}");
    }
    detach_tc(bpffs, VXLAN_DEVICE)?;
    netlink.delete_link(VXLAN_DEVICE).await?;
    Ok(())
}

/// The tunnel's remote of every node with a tunnelled pod CIDR, by node id.
pub fn tunnel_remotes(next_hops: &BTreeMap<IpNet, PeerRoute>) -> BTreeMap<u32, IpAddr> {
    next_hops
        .values()
        .filter(|hop| hop.route == PEER_VXLAN)
        .map(|hop| (hop.node, hop.node_ip))
        .collect()
}

/// Every InternalIP of the nodes in `remotes`: the addresses this node's pods reach
/// through the tunnel. One inside a pod CIDR (`pod_cidrs`: this node's and the
/// routed peers') is left out: a Node cannot draw pods' traffic to a pod that way.
pub fn tunnelled_node_ips(
    nodes: &[NodeAddresses],
    remotes: &BTreeMap<u32, IpAddr>,
    pod_cidrs: &[IpNet],
) -> BTreeSet<IpAddr> {
    nodes
        .iter()
        .filter(|node| remotes.contains_key(&Peer::node_id(&node.name)))
        .flat_map(|node| node.node_ips.iter().copied())
        .filter(|ip| !pod_cidrs.iter().any(|cidr| cidr.contains(ip)))
        .collect()
}

/// Where the rule sending pods' packets to Velox's table sits: before the main
/// table's (32766).
const POD_RULE_PRIORITY: u32 = 0x5645;

/// Makes pods' packets to `node_ips` (tunnelled nodes' own addresses) go through the
/// tunnel, by a rule on their source (this node's `pod_cidrs`) that looks up
/// Velox's table, whose routes lead into the VXLAN device `tunnel`. The host's own
/// packets to those nodes, the tunnel's outer packets among them, keep the uplink.
/// Without a tunnel, rules and routes go.
pub async fn sync_pod_routes_to_nodes(
    netlink: &Netlink,
    routes: &[Route],
    tunnel: Option<u32>,
    pod_cidrs: &[IpNet],
    node_ips: &BTreeSet<IpAddr>,
    sources: &[IpAddr],
) -> anyhow::Result<()> {
    let (wanted_sources, wanted_routes): (BTreeSet<IpNet>, BTreeSet<IpAddr>) = match tunnel {
        Some(_) if !node_ips.is_empty() => (pod_cidrs.iter().map(IpNet::trunc).collect(), node_ips.clone()),
        _ => Default::default(),
    };
    for family in Family::ALL {
        let mut ruled = BTreeSet::new();
        for rule in netlink.rules(family, VELOX_ROUTE_TABLE).await? {
            match rule.source.filter(|source| wanted_sources.contains(source)) {
                Some(source) if ruled.insert(source) => {}
                _ => netlink.delete_rule(&rule).await?,
            }
        }
        for source in wanted_sources
            .iter()
            .filter(|s| Family::of(&s.addr()) == family && !ruled.contains(s))
        {
            netlink
                .add_rule_from(*source, VELOX_ROUTE_TABLE, POD_RULE_PRIORITY)
                .await?;
        }
    }
    let mut routed = BTreeSet::new();
    for route in routes.iter().filter(|r| r.table == VELOX_ROUTE_TABLE) {
        let wanted = route.protocol == VELOX_ROUTE_PROTOCOL
            && route.dst.prefix_len() == route.dst.max_prefix_len()
            && wanted_routes.contains(&route.dst.addr())
            && route.oif.is_some()
            && route.oif == tunnel;
        if wanted {
            routed.insert(route.dst.addr());
        } else {
            netlink.delete_route(route).await?;
        }
    }
    if let Some(tunnel) = tunnel {
        for ip in wanted_routes.iter().filter(|ip| !routed.contains(ip)) {
            let source = sources.iter().copied().find(|s| Family::of(s) == Family::of(ip));
            netlink
                .add_route_through(IpNet::from(*ip), tunnel, source, VELOX_ROUTE_TABLE)
                .await?;
        }
    }
    Ok(())
}

/// Everything of the tunnel: the device with its links, and the pods' rules (their
/// table's routes go with the device).
pub async fn remove_all(netlink: &Netlink, bpffs: &Bpffs) -> anyhow::Result<()> {
    for family in Family::ALL {
        for rule in netlink.rules(family, VELOX_ROUTE_TABLE).await? {
            netlink.delete_rule(&rule).await?;
        }
    }
    remove_device(netlink, bpffs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn the_outer_family_is_ipv4_where_both_ends_have_it() {
        let dual = ips(&["10.0.1.3", "fd00:10:1::3"]);
        assert_eq!(
            outer_address(&dual, &ips(&["fd00:10:2::4", "10.0.2.4"])),
            Some(ips(&["10.0.2.4"])[0])
        );
        assert_eq!(
            outer_address(&dual, &ips(&["fd00:10:2::4"])),
            Some(ips(&["fd00:10:2::4"])[0])
        );
        assert_eq!(outer_address(&ips(&["fd00:10:1::3"]), &ips(&["10.0.2.4"])), None);
        assert_eq!(overhead(Family::V4), 50);
        assert_eq!(overhead(Family::V6), 70);
    }
}
