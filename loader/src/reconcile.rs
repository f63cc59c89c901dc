//! Makes the maps and links match the endpoint records and the live interfaces.

use anyhow::Context;
use nix::net::if_::if_nametoindex;
use std::collections::HashSet;
use velox_cni::datapath::{self, Bpffs, Maps};
use velox_cni::endpoint::EndpointStore;
use velox_common::FROM_POD_PROGRAM;

/// One pass, under the endpoint lock so no ADD or DEL is half-seen. The uplink's
/// counters (from `from_net`) are kept with the endpoints'.
pub fn reconcile(bpffs: &Bpffs, store: &EndpointStore, maps: &mut Maps, uplink: Option<&str>) -> anyhow::Result<()> {
    let _lock = store.lock()?;
    let mut live_ips = HashSet::new();
    let mut live_ifindexes: HashSet<u32> = uplink.and_then(|name| if_nametoindex(name).ok()).into_iter().collect();
    for record in store.list()? {
        let alive = if_nametoindex(record.host_ifname.as_str()).is_ok_and(|index| index == record.host_ifindex);
        if !alive {
            // The pod is gone (its netns went away); DEL or GC will free the rest.
            if maps.get(record.ip)?.is_some() {
                log::info!("dropping {}: {} is gone", record.ip, record.host_ifname);
                maps.remove(record.ip, record.host_ifindex)?;
            }
            continue;
        }
        let endpoint = record.endpoint();
        if maps.get(record.ip)? != Some(endpoint) {
            log::warn!("repairing the map entry of {} ({})", record.ip, record.host_ifname);
            maps.put(record.ip, endpoint)?;
        }
        if !bpffs.link(&record.host_ifname).exists() {
            log::warn!("re-attaching from_pod to {}", record.host_ifname);
            datapath::attach(bpffs, FROM_POD_PROGRAM, &record.host_ifname)?;
        }
        live_ips.insert(record.ip);
        live_ifindexes.insert(record.host_ifindex);
    }
    for (ip, endpoint) in maps.entries()? {
        if !live_ips.contains(&ip) {
            log::info!("dropping stale map entry {ip}");
            maps.remove(ip, endpoint.ifindex)?;
        }
    }
    for ifindex in maps.counter_ifindexes()? {
        if !live_ifindexes.contains(&ifindex) {
            maps.remove_counters(ifindex)?;
        }
    }
    // Links of interfaces that no longer exist hold nothing; an ADD in progress
    // always has its interface before its link.
    if let Ok(links) = std::fs::read_dir(bpffs.links_dir()) {
        for link in links.flatten() {
            let name = link.file_name();
            if if_nametoindex(name.as_os_str()).is_err() {
                std::fs::remove_file(link.path()).with_context(|| format!("unpinning {:?}", name))?;
            }
        }
    }
    Ok(())
}
