//! Makes the maps and links match the endpoint records and the live interfaces.

use nix::net::if_::if_nametoindex;
use std::collections::HashSet;
use velox_common::FROM_POD_PROGRAM;
use velox_node::endpoint::EndpointStore;
use velox_node::fs::{list_dir, remove_if_exists};
use velox_node::layout::Hook;
use velox_node::link::attach_tc_ingress;
use velox_node::maps::EndpointMaps;
use velox_node::Bpffs;

/// One pass, under the endpoint lock so no ADD or DEL is half-seen. The uplink's
/// counters (from `from_net`) are kept with the endpoints'.
pub fn reconcile(
    bpffs: &Bpffs,
    store: &EndpointStore,
    maps: &mut EndpointMaps,
    uplink: Option<&str>,
) -> anyhow::Result<()> {
    let _lock = store.lock()?;
    let mut live_ips = HashSet::new();
    let mut live_ifindexes: HashSet<u32> = uplink.and_then(|name| if_nametoindex(name).ok()).into_iter().collect();
    for record in store.list()? {
        let alive = if_nametoindex(record.host_ifname.as_str()).is_ok_and(|index| index == record.host_ifindex);
        if !alive {
            // The pod is gone (its netns went away); DEL or GC will free the rest.
            for ip in &record.ips {
                if maps.remove_owned(*ip, record.host_ifindex)? {
                    log::info!("dropped {ip}: {} is gone", record.host_ifname);
                }
            }
            continue;
        }
        let endpoint = record.endpoint();
        for ip in &record.ips {
            if maps.get(*ip)? != Some(endpoint) {
                log::warn!("repairing the map entry of {ip} ({})", record.host_ifname);
                maps.put(*ip, endpoint)?;
            }
            live_ips.insert(*ip);
        }
        if !bpffs.tc_ingress_link(&record.host_ifname).exists() {
            log::warn!("re-attaching from_pod to {}", record.host_ifname);
            attach_tc_ingress(bpffs, FROM_POD_PROGRAM, &record.host_ifname)?;
        }
        live_ifindexes.insert(record.host_ifindex);
    }
    for (ip, _) in maps.entries()? {
        if !live_ips.contains(&ip) {
            log::info!("dropping stale map entry {ip}");
            maps.remove(ip)?;
        }
    }
    for ifindex in maps.counter_ifindexes()? {
        if !live_ifindexes.contains(&ifindex) {
            maps.remove_counters(ifindex)?;
        }
    }
    // Links of interfaces that no longer exist hold nothing; an ADD in progress
    // always has its interface before its link.
    for link in list_dir(&bpffs.links_dir(Hook::TcIngress))? {
        let gone = link.file_name().is_some_and(|name| if_nametoindex(name).is_err());
        if gone {
            remove_if_exists(&link)?;
        }
    }
    Ok(())
}
