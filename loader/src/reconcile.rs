//! Makes the maps and links match the endpoint records and the live interfaces.

use nix::net::if_::if_nametoindex;
use std::collections::{HashMap, HashSet};
use velox_common::{FROM_POD_PROGRAM, UPLINK_SLOT};
use velox_node::endpoint::{EndpointRecord, EndpointStore};
use velox_node::fs::{list_dir, remove_if_exists};
use velox_node::ipam::Allocator;
use velox_node::layout::Hook;
use velox_node::link::attach_tc_ingress;
use velox_node::maps::EndpointMaps;
use velox_node::{Bpffs, StateDir};

/// One pass, under the endpoint lock so no ADD or DEL is half-seen. The uplink has
/// its interface entry with the pods', on the uplink's counters slot.
pub fn reconcile(
    bpffs: &Bpffs,
    state_dir: &StateDir,
    store: &EndpointStore,
    maps: &mut EndpointMaps,
    uplink: Option<&str>,
) -> anyhow::Result<()> {
    let _lock = store.lock()?;
    let mut live_ips = HashSet::new();
    let mut opted_out = HashSet::new();
    // Interface -> counters slot, as the records and the uplink say.
    let mut slots: HashMap<u32, u32> = uplink
        .and_then(|name| if_nametoindex(name).ok())
        .map(|ifindex| (ifindex, UPLINK_SLOT))
        .into_iter()
        .collect();
    let mut owners = HashSet::new();
    for mut record in store.list()? {
        owners.insert(record.host_ifname.clone());
        let alive = if_nametoindex(record.host_ifname.as_str()).is_ok_and(|index| index == record.host_ifindex);
        if !alive {
            // The pod is gone: its veth went with its netns.
            for ip in &record.ips {
                if maps.remove_owned(*ip, record.host_ifindex)? {
                    log::info!("dropped {ip}: {} is gone", record.host_ifname);
                }
            }
            if !record.netns.exists() {
                reap(state_dir, store, &record)?;
            }
            continue;
        }
        if record.slot == 0 {
            // A record of a release before counters slots.
            record.slot = store.claim_slot(&record.host_ifname, maps.max_pods())?;
            store.write(&record)?;
            maps.reset_slot(record.slot)?;
        }
        opted_out.extend(record.socket_lb_opt_out);
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
        slots.insert(record.host_ifindex, record.slot);
    }
    // A record nobody can read is dropped once its interface is gone. While the
    // interface lives the pod keeps its map entries, and DEL finds the file.
    let mut unreadable_live = HashSet::new();
    for (path, host_ifname) in store.unreadable()? {
        match if_nametoindex(host_ifname.as_str()) {
            Ok(ifindex) => {
                unreadable_live.insert(ifindex);
                owners.insert(host_ifname);
            }
            Err(_) => {
                log::warn!("removing the unreadable record {} of a vanished pod", path.display());
                remove_if_exists(&path)?;
            }
        }
    }
    for (ip, endpoint) in maps.entries()? {
        if !live_ips.contains(&ip) && !unreadable_live.contains(&endpoint.ifindex) {
            log::info!("dropping stale map entry {ip}");
            maps.remove(ip)?;
        }
    }
    // The opt-outs: the records' and nothing else, written only where they differ.
    let present: HashSet<u64> = maps.lb_opt_outs()?.into_iter().collect();
    for &cookie in present.symmetric_difference(&opted_out) {
        maps.set_lb_opt_out(cookie, opted_out.contains(&cookie))?;
    }
    let present: HashMap<u32, u32> = maps.interfaces()?.into_iter().collect();
    for ifindex in present.keys() {
        if !slots.contains_key(ifindex) && !unreadable_live.contains(ifindex) {
            maps.remove_interface(*ifindex)?;
        }
    }
    for (&ifindex, &slot) in &slots {
        if present.get(&ifindex) != Some(&slot) {
            maps.set_interface(ifindex, slot)?;
        }
    }
    // The claim of an ADD killed before its record: its interface is gone too.
    for (slot, owner) in store.slots()? {
        if !owners.contains(&owner) && if_nametoindex(owner.as_str()).is_err() {
            store.release_slot(&owner, Some(slot))?;
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

/// Frees a pod whose DEL never came (a runtime that sends no GC, a node that lost
/// power): the netns and the veth are gone, so its addresses and record go too.
fn reap(state_dir: &StateDir, store: &EndpointStore, record: &EndpointRecord) -> anyhow::Result<()> {
    let attachment = record.attachment();
    // Only the built-in allocator's reservations can be freed here; a delegated
    // IPAM plugin's wait for the runtime's GC.
    if state_dir.ipam_dir(&record.network).exists() {
        Allocator::new(state_dir, &record.network, Vec::new()).release(&attachment)?;
    }
    store.remove(&attachment, Some(record.slot))?;
    log::info!(
        "reaped {} {} ({:?}): its netns {} is gone and no DEL came",
        record.container_id,
        record.ifname,
        record.ips,
        record.netns.display()
    );
    Ok(())
}
