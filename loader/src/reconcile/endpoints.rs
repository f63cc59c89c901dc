//! The endpoints reconciler: makes the endpoint maps and the pods' links match the
//! endpoint records and the live interfaces, and frees pods whose DEL never came.

use nix::net::if_::if_nametoindex;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use velox_common::UPLINK_SLOT;
use velox_node::endpoint::{EndpointRecord, EndpointStore};
use velox_node::fs::{list_dir, remove_if_exists};
use velox_node::ipam::Allocator;
use velox_node::layout::Hook;
use velox_node::link::attach_pod_veth_programs;
use velox_node::maps::{EndpointMaps, NewPodPolicy};
use velox_node::{Bpffs, StateDir};

/// What the records say the maps must hold.
#[derive(Default)]
struct Wanted {
    /// The addresses of live pods.
    ips: HashSet<IpAddr>,
    /// The network namespace cookies of pods that opted out of the socket load balancer.
    opted_out: HashSet<u64>,
    /// Interface -> counters slot, as the records and the uplink say.
    slots: HashMap<u32, u32>,
    /// The host ifnames that have a record, readable or not.
    owners: HashSet<String>,
    /// Interfaces of records nobody can read: their entries stay while they live.
    unreadable_live: HashSet<u32>,
}

/// One pass, under the endpoint lock so no ADD or DEL is half-seen. The uplink has
/// its interface entry with the pods', on the uplink's counters slot.
pub fn sync_endpoints(
    bpffs: &Bpffs,
    state_dir: &StateDir,
    store: &EndpointStore,
    maps: &mut EndpointMaps,
    uplink: Option<&str>,
) -> anyhow::Result<()> {
    let _lock = store.lock()?;
    let mut wanted = Wanted {
        slots: uplink
            .and_then(|name| if_nametoindex(name).ok())
            .map(|ifindex| (ifindex, UPLINK_SLOT))
            .into_iter()
            .collect(),
        ..Wanted::default()
    };
    for record in store.list()? {
        sync_record(bpffs, state_dir, store, maps, record, &mut wanted)?;
    }
    keep_unreadable_records(store, &mut wanted)?;
    for (ip, endpoint) in maps.entries()? {
        if !wanted.ips.contains(&ip) && !wanted.unreadable_live.contains(&endpoint.ifindex) {
            log::info!("dropping stale map entry {ip}");
            maps.remove(ip)?;
        }
    }
    let emptied = maps.sweep_cache(None)?;
    if emptied > 0 {
        log::warn!("emptied {emptied} endpoint cache entries that did not match the endpoint map");
    }
    sync_opt_outs_and_interfaces(maps, &wanted)?;
    // The claim of an ADD killed before its record: its interface is gone too.
    for (slot, owner) in store.slots()? {
        if !wanted.owners.contains(&owner) && if_nametoindex(owner.as_str()).is_err() {
            store.release_slot(&owner, Some(slot))?;
        }
    }
    // Links of interfaces that no longer exist hold nothing; an ADD in progress
    // always has its interface before its link.
    for hook in Hook::TC {
        for link in list_dir(&bpffs.links_dir(hook))? {
            let gone = link.file_name().is_some_and(|name| if_nametoindex(name).is_err());
            if gone {
                remove_if_exists(&link)?;
            }
        }
    }
    Ok(())
}

/// Repairs one record's map entries and link, or frees what a vanished pod left;
/// notes what it wants kept.
fn sync_record(
    bpffs: &Bpffs,
    state_dir: &StateDir,
    store: &EndpointStore,
    maps: &mut EndpointMaps,
    mut record: EndpointRecord,
    wanted: &mut Wanted,
) -> anyhow::Result<()> {
    wanted.owners.insert(record.host_ifname.clone());
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
        return Ok(());
    }
    if record.slot == 0 {
        // A record of a release before counters slots (and pod names).
        record.slot = store.claim_slot(&record.host_ifname, maps.max_pods())?;
        store.write(&record)?;
        maps.reset_slot(record.slot, NewPodPolicy::NotIsolated)?;
    }
    wanted.opted_out.extend(record.socket_lb_opt_out);
    let endpoint = record.endpoint();
    for ip in &record.ips {
        if maps.get(*ip)? != Some(endpoint) {
            log::warn!("repairing the map entry of {ip} ({})", record.host_ifname);
            maps.put(*ip, endpoint)?;
        } else {
            // Pods of a build before the cache (or whose entry another address
            // held until it left) get theirs here.
            maps.cache(*ip, endpoint)?;
        }
        wanted.ips.insert(*ip);
    }
    // A pod of a release before `to_pod` gets it here, at the first pass of an upgrade.
    for program in attach_pod_veth_programs(bpffs, &record.host_ifname)? {
        log::warn!("attached {program} to {}, which lacked it", record.host_ifname);
    }
    wanted.slots.insert(record.host_ifindex, record.slot);
    Ok(())
}

/// A record nobody can read is dropped once its interface is gone. While the
/// interface lives the pod keeps its map entries, and DEL finds the file.
fn keep_unreadable_records(store: &EndpointStore, wanted: &mut Wanted) -> anyhow::Result<()> {
    for (path, host_ifname) in store.unreadable()? {
        match if_nametoindex(host_ifname.as_str()) {
            Ok(ifindex) => {
                wanted.unreadable_live.insert(ifindex);
                wanted.owners.insert(host_ifname);
            }
            Err(_) => {
                log::warn!("removing the unreadable record {} of a vanished pod", path.display());
                remove_if_exists(&path)?;
            }
        }
    }
    Ok(())
}

/// The opt-outs and the interface entries: the records' and nothing else, written
/// only where they differ.
fn sync_opt_outs_and_interfaces(maps: &mut EndpointMaps, wanted: &Wanted) -> anyhow::Result<()> {
    let present: HashSet<u64> = maps.lb_opt_outs()?.into_iter().collect();
    for &cookie in present.symmetric_difference(&wanted.opted_out) {
        maps.set_lb_opt_out(cookie, wanted.opted_out.contains(&cookie))?;
    }
    let present: HashMap<u32, u32> = maps.interfaces()?.into_iter().collect();
    for ifindex in present.keys() {
        if !wanted.slots.contains_key(ifindex) && !wanted.unreadable_live.contains(ifindex) {
            maps.remove_interface(*ifindex)?;
        }
    }
    for (&ifindex, &slot) in &wanted.slots {
        if present.get(&ifindex) != Some(&slot) {
            maps.set_interface(ifindex, slot)?;
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
