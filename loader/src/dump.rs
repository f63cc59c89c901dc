//! The operator's views of the datapath: `endpoints` (the endpoint map joined with
//! the records), `peers` (the peer map), `stats` (every interface's counters),
//! `kernel-flows` (the connection ends whose packets go to the kernel), `services`
//! and `policy` (each isolated pod's live rules).

use comfy_table::{presets::NOTHING, Cell, Table};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use velox_common::{
    EndpointCounters, AF_INET, CT_CLOSED, CT_CLOSING, CT_ESTABLISHED, CT_OPENING, DROP_REASONS, NAT_REPLY,
    PEER_NOT_ON_LINK, PEER_ON_LINK, PEER_VXLAN, SERVICE_EXTERNAL_LOCAL, SERVICE_FROM_OUTSIDE, SERVICE_INTERNAL_LOCAL,
};
use velox_node::endpoint::{EndpointRecord, EndpointStore};
use velox_node::maps::{EndpointMaps, Frontend, KernelFlows, PeerMap, ServiceMaps};
use velox_node::{Bpffs, StateDir};

use crate::names::{interface_names, pods_by_interface, protocol_name, socket_address, PolicyNames};

#[derive(Serialize)]
struct Row {
    ip: IpAddr,
    /// Host-side veth.
    ifname: String,
    ifindex: u32,
    container_id: String,
    /// `namespace/name` of the Kubernetes pod, where the runtime named it at ADD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    pod_ifname: String,
    pod_mac: String,
    host_mac: String,
    /// All packets the pod sent through from_pod.
    packets: u64,
    bytes: u64,
    #[serde(flatten)]
    counters: EndpointCounters,
    /// "ok", or what is missing: the loader repairs "no map entry", drops "no record".
    state: &'static str,
}

/// A row per address: a dual-stack pod has two, with the same interface and counters.
pub fn endpoints(bpffs: &Bpffs, state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    let maps = EndpointMaps::open(bpffs)?;
    let mut records: BTreeMap<IpAddr, EndpointRecord> = EndpointStore::new(state_dir)
        .list()?
        .into_iter()
        .flat_map(|r| r.ips.clone().into_iter().map(move |ip| (ip, r.clone())))
        .collect();
    let mut rows = Vec::new();
    for (ip, endpoint) in maps.entries()? {
        let record = records.remove(&ip);
        let c = maps.counters(endpoint.slot)?;
        rows.push(Row {
            ip,
            ifname: record.as_ref().map(|r| r.host_ifname.clone()).unwrap_or_default(),
            ifindex: endpoint.ifindex,
            container_id: record.as_ref().map(|r| r.container_id.clone()).unwrap_or_default(),
            pod: record.as_ref().and_then(|r| r.pod.as_ref()).map(ToString::to_string),
            pod_ifname: record.as_ref().map(|r| r.ifname.clone()).unwrap_or_default(),
            pod_mac: record.as_ref().map(|r| r.pod_mac.clone()).unwrap_or_default(),
            host_mac: record.as_ref().map(|r| r.host_mac.clone()).unwrap_or_default(),
            packets: c.redirected_packets + c.passed_packets + c.dropped_packets(),
            bytes: c.redirected_bytes + c.passed_bytes,
            counters: c,
            state: if record.is_some() { "ok" } else { "no record" },
        });
    }
    for (ip, record) in records {
        rows.push(Row {
            ip,
            ifname: record.host_ifname,
            ifindex: record.host_ifindex,
            container_id: record.container_id,
            pod: record.pod.as_ref().map(ToString::to_string),
            pod_ifname: record.ifname,
            pod_mac: record.pod_mac,
            host_mac: record.host_mac,
            packets: 0,
            bytes: 0,
            counters: EndpointCounters::default(),
            state: "no map entry",
        });
    }
    rows.sort_by_key(|r| r.ip);
    let table = rows.iter().map(|r| {
        [
            r.ip.to_string(),
            r.ifname.clone(),
            r.ifindex.to_string(),
            r.container_id.chars().take(12).collect(),
            r.pod.clone().unwrap_or_else(|| "-".into()),
            r.pod_mac.clone(),
            r.counters.redirected_packets.to_string(),
            r.counters.passed_packets.to_string(),
            r.counters.dropped_packets().to_string(),
        ]
        .into_iter()
        .chain(r.counters.dropped.map(|count| count.to_string()))
        .chain([r.bytes.to_string(), r.state.to_string()])
    });
    let header = [
        "IP",
        "HOST IFNAME",
        "IFINDEX",
        "CONTAINER",
        "POD",
        "POD MAC",
        "REDIRECTED",
        "PASSED",
        "DROPPED",
    ]
    .into_iter()
    .map(String::from)
    .chain(drop_reason_columns())
    .chain(["BYTES".into(), "STATE".into()]);
    print(&rows, json, header, table)
}

#[derive(Serialize)]
struct PeerRow {
    pod_cidr: IpNet,
    /// The next hop on the link, or the tunnel's remote.
    node_ip: IpAddr,
    /// `native` or `vxlan`.
    route: &'static str,
    /// Why the loader chose that route.
    reason: &'static str,
    /// The interface packets for that node leave by: the uplink, or the VXLAN device.
    ifindex: u32,
    ifname: String,
    mtu: u32,
}

pub fn peers(bpffs: &Bpffs, json: bool) -> anyhow::Result<()> {
    let names = interface_names();
    let rows: Vec<PeerRow> = PeerMap::open(bpffs)?
        .entries()?
        .into_iter()
        .map(|(pod_cidr, peer)| PeerRow {
            pod_cidr,
            node_ip: peer.node_ip.ip(),
            route: match peer.route {
                PEER_VXLAN => "vxlan",
                _ => "native",
            },
            reason: match peer.reason {
                PEER_ON_LINK => "on the uplink's subnet",
                PEER_NOT_ON_LINK => "not on the uplink's subnet",
                _ => "--tunnel",
            },
            ifindex: peer.ifindex,
            ifname: names.get(&peer.ifindex).cloned().unwrap_or_default(),
            mtu: peer.mtu,
        })
        .collect();
    let table = rows.iter().map(|r| {
        [
            r.pod_cidr.to_string(),
            r.node_ip.to_string(),
            r.route.to_string(),
            r.reason.to_string(),
            r.ifname.clone(),
            r.ifindex.to_string(),
            r.mtu.to_string(),
        ]
    });
    print(
        &rows,
        json,
        ["POD CIDR", "NODE IP", "ROUTE", "WHY", "INTERFACE", "IFINDEX", "MTU"],
        table,
    )
}

#[derive(Serialize)]
struct StatsRow {
    ifindex: u32,
    /// Empty when the interface is gone (the loader drops its entry soon).
    ifname: String,
    /// Its counters slot: 0 is the uplink's.
    slot: u32,
    /// `namespace/name` of the pod behind the interface, where the runtime named it.
    pod: Option<String>,
    #[serde(flatten)]
    counters: EndpointCounters,
}

pub fn stats(bpffs: &Bpffs, state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    let maps = EndpointMaps::open(bpffs)?;
    let names = interface_names();
    let pods = pods_by_interface(state_dir);
    let mut rows = Vec::new();
    for (ifindex, slot) in maps.interfaces()? {
        let ifname = names.get(&ifindex).cloned().unwrap_or_default();
        rows.push(StatsRow {
            ifindex,
            pod: pods.get(&ifname).map(ToString::to_string),
            ifname,
            slot,
            counters: maps.counters(slot)?,
        });
    }
    rows.sort_by_key(|r| r.ifindex);
    let table = rows.iter().map(|r| {
        let c = &r.counters;
        [
            r.ifname.clone(),
            r.ifindex.to_string(),
            r.slot.to_string(),
            r.pod.clone().unwrap_or_else(|| "-".into()),
            c.redirected_packets.to_string(),
            c.redirected_bytes.to_string(),
            c.passed_packets.to_string(),
            c.passed_bytes.to_string(),
            c.dropped_packets().to_string(),
        ]
        .into_iter()
        .chain(c.dropped.map(|count| count.to_string()))
    });
    let header = [
        "IFNAME",
        "IFINDEX",
        "SLOT",
        "POD",
        "REDIRECTED",
        "REDIRECTED BYTES",
        "PASSED",
        "PASSED BYTES",
        "DROPPED",
    ]
    .into_iter()
    .map(String::from)
    .chain(drop_reason_columns());
    print(&rows, json, header, table)
}

#[derive(Serialize)]
struct KernelFlowRow {
    protocol: String,
    /// The pod's end of the connection (for ICMP echo, the port is the identifier).
    end: std::net::SocketAddr,
    /// Where its traffic went to the kernel first.
    ifname: String,
    ifindex: u32,
}

pub fn kernel_flows(bpffs: &Bpffs, json: bool) -> anyhow::Result<()> {
    let names = interface_names();
    let mut rows: Vec<KernelFlowRow> = KernelFlows::open(bpffs)?
        .entries()?
        .into_iter()
        .map(|(end, ifindex)| KernelFlowRow {
            protocol: protocol_name(end.proto),
            end: socket_address(&end),
            ifname: names.get(&ifindex).cloned().unwrap_or_default(),
            ifindex,
        })
        .collect();
    rows.sort_by(|a, b| (a.end, &a.protocol).cmp(&(b.end, &b.protocol)));
    let table = rows.iter().map(|r| {
        [
            r.protocol.clone(),
            r.end.to_string(),
            r.ifname.clone(),
            r.ifindex.to_string(),
        ]
    });
    print(&rows, json, ["PROTO", "POD END", "SEEN ON", "IFINDEX"], table)
}

#[derive(Serialize)]
struct PolicyRow {
    slot: u32,
    /// `namespace/name`, as the cluster reports the pod's address.
    pod: String,
    direction: &'static str,
    /// A peer prefix, the pods of one identity (`pods like <one of them>`), or
    /// `nothing` for a direction isolated without any rule.
    peer: String,
    ports: String,
    policies: Vec<String>,
}

/// Every isolated pod's live rules, by slot and direction.
pub fn policy(bpffs: &Bpffs, state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    use velox_common::{EGRESS, ISOLATED_EGRESS, ISOLATED_INGRESS};
    let maps = velox_node::maps::PolicyMaps::open(bpffs)?;
    let names = PolicyNames::read(state_dir);
    let pods: BTreeMap<u32, String> = EndpointStore::new(state_dir)
        .list()?
        .into_iter()
        .map(|r| {
            let name = r.ips.iter().find_map(|ip| names.pods.get(ip)).cloned();
            (r.slot, name.unwrap_or(r.container_id))
        })
        .collect();
    let states: BTreeMap<u32, velox_common::PolicyState> = maps.states()?.into_iter().collect();
    // An identity is named by its pods: the first by address, and how many there are.
    let mut identities: BTreeMap<u64, (String, usize)> = BTreeMap::new();
    for (addr, identity) in maps.identities()? {
        let name = names.pods.get(&addr).cloned().unwrap_or_else(|| addr.to_string());
        identities.entry(identity).or_insert_with(|| (name, 0)).1 += 1;
    }
    let by_prefix = maps.rules()?.into_iter().map(|(key, prefix, ports)| {
        let peer = match prefix {
            0 => Ok("any".to_string()),
            prefix => velox_node::maps::cidr_of_mapped(key.peer, prefix).map(|cidr| cidr.to_string()),
        };
        (key.slot, key.direction, key.version, peer, ports)
    });
    let by_identity = maps.identity_rules()?.into_iter().map(|(key, ports)| {
        let peer = match identities.get(&key.identity) {
            Some((pod, addresses)) => format!("pods like {pod} ({addresses} addresses)"),
            None => format!("identity {:016x} (no pods now)", key.identity),
        };
        (key.slot, key.direction, key.version, Ok(peer), ports)
    });
    let mut rows = Vec::new();
    let mut ruled = std::collections::BTreeSet::new();
    for (slot, direction, version, peer, ports) in by_prefix.chain(by_identity) {
        if states.get(&slot).map(|s| s.version()) != Some(version) {
            continue; // the other version: being written, or left by an update
        }
        let rules = ports.rules.iter().take_while(|r| r.policy != 0);
        ruled.insert((slot, direction));
        rows.push(PolicyRow {
            slot,
            pod: pods.get(&slot).cloned().unwrap_or_default(),
            direction: if direction == EGRESS { "egress" } else { "ingress" },
            peer: peer?,
            ports: rules
                .clone()
                .map(|r| match r.proto {
                    velox_common::ANY_PROTOCOL => "any".to_string(),
                    proto if r.first == r.last => format!("{} {}", protocol_name(proto), r.first),
                    proto => format!("{} {}-{}", protocol_name(proto), r.first, r.last),
                })
                .collect::<Vec<_>>()
                .join(", "),
            policies: rules.filter_map(|r| names.policy(r.policy)).collect(),
        });
    }
    for (slot, state) in &states {
        for (flag, direction, name) in [(ISOLATED_INGRESS, 0, "ingress"), (ISOLATED_EGRESS, EGRESS, "egress")] {
            if state.flags & flag != 0 && !ruled.contains(&(*slot, direction)) {
                rows.push(PolicyRow {
                    slot: *slot,
                    pod: pods.get(slot).cloned().unwrap_or_default(),
                    direction: name,
                    peer: "nothing".into(),
                    ports: String::new(),
                    policies: Vec::new(),
                });
            }
        }
    }
    rows.sort_by(|a, b| (a.slot, a.direction, &a.peer).cmp(&(b.slot, b.direction, &b.peer)));
    let table = rows.iter().map(|r| {
        [
            r.slot.to_string(),
            r.pod.clone(),
            r.direction.to_string(),
            r.peer.clone(),
            r.ports.clone(),
            r.policies.join(", "),
        ]
    });
    print(
        &rows,
        json,
        ["SLOT", "POD", "DIRECTION", "PEER", "PORTS", "POLICIES"],
        table,
    )
}

#[derive(Serialize)]
struct ServiceRow {
    /// `address:port`, or `nodeport:port` (IPv4) and `[nodeport]:port` (IPv6) for a
    /// NodePort on every address of the node.
    frontend: String,
    protocol: String,
    id: u32,
    /// This node's first.
    backends: Vec<std::net::SocketAddr>,
    local_backends: u32,
    /// Traffic policies and affinity: `external-local`, `internal-local`,
    /// `from-outside`, `affinity=<seconds>s`.
    policy: Vec<String>,
    /// "ok", or "no backends": connections are refused.
    state: &'static str,
}

pub fn services(bpffs: &Bpffs, json: bool) -> anyhow::Result<()> {
    let maps = ServiceMaps::open(bpffs)?;
    let mut rows = Vec::new();
    for (frontend, service) in maps.frontends()? {
        let backends: Vec<_> = maps.backends(&service)?.iter().map(socket_address).collect();
        let (frontend, proto) = match frontend {
            Frontend::Address(end) => (socket_address(&end).to_string(), end.proto),
            Frontend::NodePort(key) if u32::from(key.family) == AF_INET => {
                (format!("nodeport:{}", u16::from_be(key.port)), key.proto)
            }
            Frontend::NodePort(key) => (format!("[nodeport]:{}", u16::from_be(key.port)), key.proto),
        };
        let flags = [
            (SERVICE_FROM_OUTSIDE, "from-outside"),
            (SERVICE_EXTERNAL_LOCAL, "external-local"),
            (SERVICE_INTERNAL_LOCAL, "internal-local"),
        ];
        let mut policy: Vec<String> = flags
            .iter()
            .filter(|(flag, _)| service.flags & flag != 0)
            .map(|(_, name)| name.to_string())
            .collect();
        if service.affinity_seconds != 0 {
            policy.push(format!("affinity={}s", service.affinity_seconds));
        }
        rows.push(ServiceRow {
            frontend,
            protocol: protocol_name(proto),
            id: service.id,
            state: if backends.is_empty() { "no backends" } else { "ok" },
            backends,
            local_backends: service.local_backends,
            policy,
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.protocol).cmp(&(&b.frontend, &b.protocol)));
    let table = rows.iter().map(|r| {
        let backends: Vec<String> = r.backends.iter().map(ToString::to_string).collect();
        [
            r.frontend.clone(),
            r.protocol.clone(),
            r.id.to_string(),
            backends.join(" "),
            r.local_backends.to_string(),
            r.policy.join(","),
            r.state.to_string(),
        ]
    });
    let header = ["FRONTEND", "PROTO", "ID", "BACKENDS", "LOCAL", "POLICY", "STATE"];
    print(&rows, json, header, table)
}

#[derive(Serialize)]
struct NatRow {
    /// The packet as it arrives, and as it leaves.
    from: String,
    to: String,
    protocol: String,
    direction: &'static str,
    state: &'static str,
    /// Seconds since the connection's last packet.
    idle_seconds: u64,
}

/// The NAT's connections (`--kube-proxy-replacement`), one row per direction.
pub fn nat(bpffs: &Bpffs, json: bool) -> anyhow::Result<()> {
    let now = crate::flow_log::monotonic_ns()?;
    let timeouts = velox_node::maps::connection_timeouts(bpffs)?;
    let mut rows: Vec<NatRow> = velox_node::maps::nat_entries(bpffs)?
        .into_iter()
        .filter(|(_, entry)| !entry.expired(now, &timeouts))
        .map(|(key, entry)| NatRow {
            from: format!("{} -> {}", socket_address(&key.src), socket_address(&key.dst)),
            to: format!("{} -> {}", socket_address(&entry.src), socket_address(&entry.dst)),
            protocol: protocol_name(key.src.proto),
            direction: if entry.direction == NAT_REPLY {
                "reply"
            } else {
                "original"
            },
            state: match entry.state {
                CT_OPENING => "opening",
                CT_ESTABLISHED => "established",
                CT_CLOSING => "half-closed",
                CT_CLOSED => "closed",
                _ => "-",
            },
            idle_seconds: now.saturating_sub(entry.last_seen) / 1_000_000_000,
        })
        .collect();
    rows.sort_by(|a, b| (&a.from, a.direction).cmp(&(&b.from, b.direction)));
    let table = rows.iter().map(|r| {
        [
            r.from.clone(),
            r.to.clone(),
            r.protocol.clone(),
            r.direction.to_string(),
            r.state.to_string(),
            r.idle_seconds.to_string(),
        ]
    });
    print(
        &rows,
        json,
        ["PACKET", "TRANSLATED", "PROTO", "DIRECTION", "STATE", "IDLE"],
        table,
    )
}

/// One JSON array, or a plain table for people.
/// A column per drop reason, headed by its name.
fn drop_reason_columns() -> impl Iterator<Item = String> {
    DROP_REASONS.iter().map(|reason| reason.name.to_uppercase())
}

fn print<R: Serialize, C: Into<Cell>>(
    rows: &[R],
    json: bool,
    header: impl IntoIterator<Item = C>,
    table_rows: impl Iterator<Item = impl IntoIterator<Item = String>>,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header);
    for row in table_rows {
        table.add_row(row);
    }
    println!("{table}");
    Ok(())
}
