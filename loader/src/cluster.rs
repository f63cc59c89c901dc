//! The node's place in the cluster: `from_net` on the uplink, a route and a peer-map
//! entry for every other node's pod CIDR (direct routing: no tunnel, no NAT), and
//! masquerading of pod traffic that leaves the cluster.

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use velox_cni::datapath::{self, Bpffs, PeerMap};
use velox_cni::netlink::{Netlink, VELOX_ROUTE_PROTOCOL};
use velox_common::{Peer, FROM_NET_PROGRAM};

/// One node of the peers file, as a Kubernetes Node object would describe it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerNode {
    pub name: String,
    #[serde(rename = "nodeIP")]
    pub node_ip: Ipv4Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

#[derive(Deserialize)]
struct PeersFile {
    nodes: Vec<PeerNode>,
}

pub struct ClusterConfig {
    pub uplink: String,
    pub peers_file: Option<PathBuf>,
    pub pod_cidr: Option<Ipv4Net>,
    pub ip_masq: bool,
}

pub struct Cluster {
    config: ClusterConfig,
    bpffs: Bpffs,
    /// What the last successful pass set up, to notice a changed peers file.
    applied: Option<Vec<PeerNode>>,
}

/// The nat chain holding the masquerade rule and its exceptions.
const MASQ_CHAIN: &str = "VELOX-MASQ";

impl Cluster {
    pub fn new(config: ClusterConfig, bpffs: Bpffs) -> anyhow::Result<Self> {
        // The kernel path (pods to outside, to other nodes' hosts) is routing.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        Ok(Self {
            config,
            bpffs,
            applied: None,
        })
    }

    pub fn uplink(&self) -> &str {
        &self.config.uplink
    }

    fn read_peers(&self) -> anyhow::Result<Vec<PeerNode>> {
        let Some(path) = &self.config.peers_file else {
            return Ok(Vec::new());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut nodes = serde_json::from_str::<PeersFile>(&text)
            .with_context(|| format!("parsing {}", path.display()))?
            .nodes;
        nodes.sort();
        Ok(nodes)
    }

    /// True when the peers file says something other than what is applied.
    pub fn peers_changed(&self) -> bool {
        self.read_peers().ok() != self.applied
    }

    /// One full pass; cheap when nothing changed.
    pub async fn reconcile(&mut self, netlink: &Netlink) -> anyhow::Result<()> {
        let uplink = netlink
            .link(&self.config.uplink)
            .await?
            .with_context(|| format!("uplink {} not found", self.config.uplink))?;
        if !self.bpffs.link(&uplink.name).exists() {
            log::info!("attaching from_net to {}", uplink.name);
            datapath::attach(&self.bpffs, FROM_NET_PROGRAM, &uplink.name)?;
        }
        let own_ips = netlink.addresses(uplink.index).await?;
        let nodes = self.read_peers()?;
        let peers: BTreeMap<Ipv4Net, Ipv4Addr> = nodes
            .iter()
            .filter(|n| !own_ips.iter().any(|own| own.addr() == n.node_ip))
            .map(|n| (n.pod_cidr.trunc(), n.node_ip))
            .collect();

        let mut routed = BTreeSet::new();
        for route in netlink.routes().await? {
            let wanted = peers.get(&route.dst) == route.gateway.as_ref() && route.oif == Some(uplink.index);
            match (route.protocol == VELOX_ROUTE_PROTOCOL, wanted) {
                (true, true) => {
                    routed.insert(route.dst);
                }
                (true, false) => {
                    log::info!("removing route {} via {:?}", route.dst, route.gateway);
                    netlink.delete_route(&route).await?;
                }
                (false, _) => {}
            }
        }
        for (cidr, node_ip) in peers.iter().filter(|(cidr, _)| !routed.contains(*cidr)) {
            netlink.replace_route_via(*cidr, *node_ip, uplink.index).await?;
        }

        let mut map = PeerMap::open(&self.bpffs)?;
        // Entries of departed nodes go; the puts below overwrite the rest.
        for (cidr, _) in map.entries()? {
            if !peers.contains_key(&cidr) {
                map.remove(cidr)?;
            }
        }
        for (cidr, node_ip) in &peers {
            map.put(
                *cidr,
                Peer {
                    node_ip: node_ip.octets(),
                    ifindex: uplink.index,
                },
            )?;
        }

        if let (true, Some(pod_cidr)) = (self.config.ip_masq, self.config.pod_cidr) {
            // Everything inside the cluster keeps its source address.
            let mut inside: BTreeSet<Ipv4Net> = peers.keys().copied().collect();
            inside.insert(pod_cidr.trunc());
            inside.extend(nodes.iter().map(|n| Ipv4Net::from(n.node_ip)));
            inside.extend(own_ips.iter().map(|ip| Ipv4Net::from(ip.addr())));
            masquerade(pod_cidr, &inside)?;
        }
        if self.applied.as_ref() != Some(&nodes) {
            log::info!("cluster: {} peer node(s): {:?}", peers.len(), peers);
        }
        self.applied = Some(nodes);
        Ok(())
    }
}

/// Pod traffic to anywhere outside `inside` leaves with the node's address. The chain
/// is replaced in one iptables-restore transaction, so no packet sees half a rule set.
fn masquerade(pod_cidr: Ipv4Net, inside: &BTreeSet<Ipv4Net>) -> anyhow::Result<()> {
    let mut rules = format!("*nat\n:{MASQ_CHAIN} - [0:0]\n");
    for net in inside {
        rules.push_str(&format!("-A {MASQ_CHAIN} -d {net} -j RETURN\n"));
    }
    rules.push_str(&format!("-A {MASQ_CHAIN} -j MASQUERADE\nCOMMIT\n"));
    let mut restore = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    std::io::Write::write_all(restore.stdin.as_mut().expect("piped"), rules.as_bytes())?;
    anyhow::ensure!(
        restore.wait()?.success(),
        "iptables-restore refused the {MASQ_CHAIN} chain"
    );
    let jump = ["POSTROUTING", "-s", &pod_cidr.to_string(), "-j", MASQ_CHAIN];
    let present = Command::new("iptables")
        .args(["-t", "nat", "-C"])
        .args(jump)
        .stderr(Stdio::null())
        .status()?;
    if !present.success() {
        let added = Command::new("iptables").args(["-t", "nat", "-A"]).args(jump).status()?;
        anyhow::ensure!(added.success(), "iptables could not add the masquerade jump");
    }
    Ok(())
}
