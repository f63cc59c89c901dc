//! `velox-loader endpoints`: what the datapath knows, joined with what the records say.

use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use velox_cni::datapath::{Bpffs, Maps};
use velox_cni::endpoint::{EndpointRecord, EndpointStore};

#[derive(Serialize)]
struct Row {
    ip: Ipv4Addr,
    /// Host-side veth.
    ifname: String,
    ifindex: u32,
    container_id: String,
    pod_ifname: String,
    pod_mac: String,
    host_mac: String,
    /// All packets the pod sent through from_pod.
    packets: u64,
    bytes: u64,
    redirected_packets: u64,
    redirected_bytes: u64,
    passed_packets: u64,
    passed_bytes: u64,
    dropped_packets: u64,
    /// "ok", or what is missing: the loader repairs "no map entry", drops "no record".
    state: &'static str,
}

pub fn print(bpffs: &Bpffs, state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let maps = Maps::open(bpffs)?;
    let mut records: BTreeMap<Ipv4Addr, EndpointRecord> = EndpointStore::new(state_dir)
        .list()?
        .into_iter()
        .map(|r| (r.ip, r))
        .collect();
    let mut rows = Vec::new();
    for (ip, endpoint) in maps.entries()? {
        let record = records.remove(&ip);
        let c = maps.counters(endpoint.ifindex)?;
        rows.push(Row {
            ip,
            ifname: record.as_ref().map(|r| r.host_ifname.clone()).unwrap_or_default(),
            ifindex: endpoint.ifindex,
            container_id: record.as_ref().map(|r| r.container_id.clone()).unwrap_or_default(),
            pod_ifname: record.as_ref().map(|r| r.ifname.clone()).unwrap_or_default(),
            pod_mac: record.as_ref().map(|r| r.pod_mac.clone()).unwrap_or_default(),
            host_mac: record.as_ref().map(|r| r.host_mac.clone()).unwrap_or_default(),
            packets: c.redirected_packets + c.passed_packets + c.dropped_packets,
            bytes: c.redirected_bytes + c.passed_bytes,
            redirected_packets: c.redirected_packets,
            redirected_bytes: c.redirected_bytes,
            passed_packets: c.passed_packets,
            passed_bytes: c.passed_bytes,
            dropped_packets: c.dropped_packets,
            state: if record.is_some() { "ok" } else { "no record" },
        });
    }
    for (ip, record) in records {
        rows.push(Row {
            ip,
            ifname: record.host_ifname,
            ifindex: record.host_ifindex,
            container_id: record.container_id,
            pod_ifname: record.ifname,
            pod_mac: record.pod_mac,
            host_mac: record.host_mac,
            packets: 0,
            bytes: 0,
            redirected_packets: 0,
            redirected_bytes: 0,
            passed_packets: 0,
            passed_bytes: 0,
            dropped_packets: 0,
            state: "no map entry",
        });
    }
    rows.sort_by_key(|r| r.ip);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "IP",
        "HOST IFNAME",
        "IFINDEX",
        "CONTAINER",
        "POD MAC",
        "REDIRECTED",
        "PASSED",
        "DROPPED",
        "BYTES",
        "STATE",
    ]);
    for r in &rows {
        table.add_row([
            r.ip.to_string(),
            r.ifname.clone(),
            r.ifindex.to_string(),
            r.container_id.chars().take(12).collect(),
            r.pod_mac.clone(),
            r.redirected_packets.to_string(),
            r.passed_packets.to_string(),
            r.dropped_packets.to_string(),
            r.bytes.to_string(),
            r.state.to_string(),
        ]);
    }
    println!("{table}");
    Ok(())
}
