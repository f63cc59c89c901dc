//! Handles on the loader's pinned maps. Nothing here creates a map: the loader owns
//! them, and an absent pin means the loader is not ready.

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf};
use ipnet::IpNet;
use std::net::IpAddr;
use velox_common::{
    Affinity, AffinityKey, AllowedFlow, BackendSlot, CachedEndpoint, ConnectionTimeouts, Endpoint, EndpointCounters,
    EventBudget, EventSource, FlowCounts, FlowEnd, FlowEvent, FlowKey, IdentityRuleKey, IpKey, MaglevTable, NatEntry,
    NatKey, NodeAddress, NodeEntry, NodePortKey, Peer, PolicyFlow, PolicyKey, PolicyPorts, PolicyState, Service,
    SocketFrontend, SocketFrontends, AFFINITY_MAP, BACKENDS_MAP, CONNECTED_FRONTEND_MAP, COUNTERS_MAP, CT_TIMEOUTS_MAP,
    DATAGRAM_FRONTENDS_MAP, ENDPOINTS_MAP, ENDPOINT_CACHE_MAP, ENDPOINT_CACHE_SLOTS, EVENTS_LOST_MAP, EVENTS_MAP,
    EVENT_BUDGETS_MAP, FLOWS_MAP, INTERFACES_MAP, IPV4_MAPPED_PREFIX, ISOLATED_EGRESS, ISOLATED_INGRESS,
    KERNEL_FLOWS_MAP, KERNEL_FLOW_SLOTS_MAP, LB_OPT_OUT_MAP, MAGLEV_MAP, MASQUERADE_MAP, MONITOR_MAP, NAT_MAP,
    NODES_MAP, NODE_ADDRESSES_MAP, NODE_PORTS_MAP, NO_KERNEL_FLOWS, PEERS_MAP, POLICY_FLOWS_MAP, POLICY_FLOW_POOL_SIZE,
    POLICY_FLOW_POOL_USED, POLICY_FLOW_RESERVED, POLICY_FLOW_SHARES, POLICY_FLOW_SHARES_MAP, POLICY_GENERATION_MAP,
    POLICY_IDENTITIES_MAP, POLICY_IDENTITY_RULES_MAP, POLICY_KEY_FIXED_BITS, POLICY_RULES_MAP, POLICY_STATE_MAP,
    RULES_VERSION, SERVICES_MAP, SERVICE_EXTERNAL_LOCAL, SERVICE_MAGLEV, UDP_SOCKET_FRONTENDS_ITER,
};

use crate::error::{Error, Result};
use crate::layout::Bpffs;

/// `bpf_map_update_elem`: create the entry, fail if it exists.
const BPF_NOEXIST: u64 = 1;

/// The pinned map `name`, as the typed handle `T`.
fn open_map<T: TryFrom<Map, Error = MapError>>(bpffs: &Bpffs, name: &str) -> Result<T> {
    open_pin(&bpffs.map(name), name)
}

/// The map pinned at `path`, as the typed handle `T`.
fn open_pin<T: TryFrom<Map, Error = MapError>>(path: &std::path::Path, name: &str) -> Result<T> {
    let data = MapData::from_pin(path).map_err(Error::not_ready(format!("cannot open {}", path.display())))?;
    let map = Map::from_map_data(data).map_err(Error::map(format!("opening {}", path.display())))?;
    map.try_into()
        .map_err(Error::map(format!("{name} has an unexpected layout")))
}

/// A lookup's value, `None` for a key the map does not hold.
fn found<V>(result: std::result::Result<V, MapError>, what: &str) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(Error::map(what)(e)),
    }
}

/// How this build's datapath lays out one of its maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Raise when a map's meaning changes while its sizes stay the same.
const LAYOUT_REVISION: u32 = 1;

/// Every pinned map as this build's eBPF object declares it.
pub fn layouts() -> [MapLayout; 32] {
    use std::mem::size_of;
    let layout = |name, map_type, key_size: usize, value_size: usize, flags| MapLayout {
        name,
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        flags,
    };
    [
        layout(
            ENDPOINTS_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<IpKey>(),
            size_of::<Endpoint>(),
            0,
        ),
        // An LPM key is its prefix length (u32) and the address.
        layout(
            PEERS_MAP,
            BPF_MAP_TYPE_LPM_TRIE,
            size_of::<u32>() + size_of::<IpKey>(),
            size_of::<Peer>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            NODES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<IpKey>(),
            size_of::<NodeEntry>(),
            0,
        ),
        // Sized by the loader's `--max-pods`: an array is allocated whole, on every CPU.
        layout(
            COUNTERS_MAP,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<EndpointCounters>(),
            0,
        ),
        layout(
            ENDPOINT_CACHE_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<CachedEndpoint>(),
            0,
        ),
        layout(
            INTERFACES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<u32>(),
            size_of::<u32>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            KERNEL_FLOWS_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<FlowEnd>(),
            size_of::<u32>(),
            0,
        ),
        // As long as the largest `--max-pods`, whatever the flag says: a map
        // recreated for a new size would leave the programs still attached with the
        // old one, whose marks no longer say anything about the slots' new pods.
        layout(
            KERNEL_FLOW_SLOTS_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<u32>(),
            0,
        ),
        layout(
            SERVICES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<FlowEnd>(),
            size_of::<Service>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            BACKENDS_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<BackendSlot>(),
            size_of::<FlowEnd>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            NODE_PORTS_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<NodePortKey>(),
            size_of::<Service>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            NODE_ADDRESSES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<IpKey>(),
            size_of::<NodeAddress>(),
            BPF_F_NO_PREALLOC,
        ),
        // Sized by the loader's `--nat-entries`.
        layout(
            NAT_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<NatKey>(),
            size_of::<NatEntry>(),
            0,
        ),
        layout(
            AFFINITY_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
            0,
        ),
        layout(
            MAGLEV_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<u32>(),
            size_of::<MaglevTable>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            MASQUERADE_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<IpKey>(),
            0,
        ),
        layout(
            CONNECTED_FRONTEND_MAP,
            BPF_MAP_TYPE_SK_STORAGE,
            size_of::<i32>(),
            size_of::<SocketFrontend>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            DATAGRAM_FRONTENDS_MAP,
            BPF_MAP_TYPE_SK_STORAGE,
            size_of::<i32>(),
            size_of::<SocketFrontends>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            LB_OPT_OUT_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<u64>(),
            size_of::<u8>(),
            BPF_F_NO_PREALLOC,
        ),
        // A ring buffer has neither keys nor values: its size is its layout.
        layout(EVENTS_MAP, BPF_MAP_TYPE_RINGBUF, 0, 0, 0),
        layout(MONITOR_MAP, BPF_MAP_TYPE_ARRAY, size_of::<u32>(), size_of::<u64>(), 0),
        layout(
            EVENTS_LOST_MAP,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<u64>(),
            0,
        ),
        layout(
            FLOWS_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<FlowKey>(),
            size_of::<FlowCounts>(),
            0,
        ),
        layout(
            EVENT_BUDGETS_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<EventSource>(),
            size_of::<EventBudget>(),
            0,
        ),
        // As long as the largest `--max-pods`, like the kernel-flow marks.
        layout(
            POLICY_STATE_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<PolicyState>(),
            0,
        ),
        layout(
            POLICY_RULES_MAP,
            BPF_MAP_TYPE_LPM_TRIE,
            size_of::<u32>() + size_of::<PolicyKey>(),
            size_of::<PolicyPorts>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            POLICY_IDENTITIES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<IpKey>(),
            size_of::<u64>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            POLICY_IDENTITY_RULES_MAP,
            BPF_MAP_TYPE_HASH,
            size_of::<IdentityRuleKey>(),
            size_of::<PolicyPorts>(),
            BPF_F_NO_PREALLOC,
        ),
        layout(
            POLICY_FLOWS_MAP,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<PolicyFlow>(),
            size_of::<AllowedFlow>(),
            0,
        ),
        layout(
            POLICY_FLOW_SHARES_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<u64>(),
            BPF_F_MMAPABLE,
        ),
        layout(
            CT_TIMEOUTS_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<ConnectionTimeouts>(),
            0,
        ),
        layout(
            POLICY_GENERATION_MAP,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<u32>(),
            0,
        ),
    ]
}

/// Names this build's map layout. Maps are pinned under `maps/<layout id>/`, so a
/// build with another layout never reads them wrongly: it pins fresh maps beside
/// them, and the loader fills those and moves every program over (an upgrade or a
/// downgrade alike).
pub fn layout_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| crate::sha256_hex(format!("{LAYOUT_REVISION}:{:?}", layouts()))[..12].to_string())
}

/// The layout of a pinned map, as the kernel reports it.
pub fn pinned_layout(path: &std::path::Path, name: &'static str) -> Result<MapLayout> {
    let info = MapData::from_pin(path)
        .and_then(|map| map.info())
        .map_err(Error::map(format!("reading {}", path.display())))?;
    let map_type = info
        .map_type()
        .map_err(Error::map(format!("reading {}", path.display())))? as u32;
    Ok(MapLayout {
        name,
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        flags: info.map_flags(),
    })
}

/// Refuses pinned maps in this build's layout directory that do not have this
/// build's layout (a `layouts()` that no longer matches the eBPF object): reusing
/// one would make lookups miss or misread, silently.
pub fn check_pinned_layouts(bpffs: &Bpffs) -> Result<()> {
    for expected in layouts() {
        let path = bpffs.map(expected.name);
        if !path.exists() {
            continue;
        }
        let pinned = pinned_layout(&path, expected.name)?;
        if pinned != expected {
            return Err(Error::Invalid(format!(
                "{} does not have the layout this build expects ({pinned:?} instead of {expected:?})",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses an object whose maps this loader and the plugin would misread: they are
/// built for one map layout, and an object's maps are pinned where they look.
pub fn check_object_layout(object: &[u8]) -> Result<()> {
    let parsed = aya_obj::Object::parse(object).map_err(Error::invalid("parsing the eBPF object"))?;
    for expected in layouts() {
        let map = parsed
            .maps
            .get(expected.name)
            .ok_or_else(|| Error::Invalid(format!("the eBPF object has no map {}", expected.name)))?;
        let declared = (map.map_type(), map.key_size(), map.value_size(), map.map_flags());
        let wanted = (
            expected.map_type,
            expected.key_size,
            expected.value_size,
            expected.flags,
        );
        if declared != wanted {
            return Err(Error::Invalid(format!(
                "the eBPF object's {} (type, key, value, flags) is {declared:?}, this build's layout {wanted:?}: \
                 build the object and the loader from the same source",
                expected.name
            )));
        }
    }
    Ok(())
}

/// A removal of an entry that is already gone succeeds: teardown is idempotent.
fn ignore_missing(result: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// How a new pod starts, until the loader has applied its policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewPodPolicy {
    /// Open both ways: nothing enforces policy, or the loader cannot tell which
    /// Pod object it is (no name).
    NotIsolated,
    /// Isolated in both directions with no rule: nothing in or out.
    DenyAll,
}

/// The endpoint map (pod address -> host veth and counters slot), the counters and
/// policy switches by slot, the interfaces' slots and the socket LB opt-outs.
pub struct EndpointMaps {
    endpoints: HashMap<MapData, IpKey, Endpoint>,
    counters: PerCpuArray<MapData, EndpointCounters>,
    policy_state: Array<MapData, PolicyState>,
    policy_generation: Array<MapData, u32>,
    interfaces: HashMap<MapData, u32, u32>,
    lb_opt_out: HashMap<MapData, u64, u8>,
    kernel_flow_slots: Array<MapData, u32>,
    cache: Array<MapData, CachedEndpoint>,
}

impl EndpointMaps {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            endpoints: open_map(bpffs, ENDPOINTS_MAP)?,
            counters: open_map(bpffs, COUNTERS_MAP)?,
            policy_state: open_map(bpffs, POLICY_STATE_MAP)?,
            policy_generation: open_map(bpffs, POLICY_GENERATION_MAP)?,
            interfaces: open_map(bpffs, INTERFACES_MAP)?,
            lb_opt_out: open_map(bpffs, LB_OPT_OUT_MAP)?,
            kernel_flow_slots: open_map(bpffs, KERNEL_FLOW_SLOTS_MAP)?,
            cache: open_map(bpffs, ENDPOINT_CACHE_MAP)?,
        })
    }

    /// How many pods the counters array has slots for (the loader's `--max-pods`).
    pub fn max_pods(&self) -> u32 {
        self.counters.len().saturating_sub(1)
    }

    /// Puts the pod whose network namespace has `cookie` out of the socket load
    /// balancer's reach, or back in.
    pub fn set_lb_opt_out(&mut self, cookie: u64, opted_out: bool) -> Result<()> {
        match opted_out {
            true => self.lb_opt_out.insert(cookie, 1, 0),
            false => ignore_missing(self.lb_opt_out.remove(&cookie)),
        }
        .map_err(Error::map("updating the socket LB opt-outs"))
    }

    /// Network namespace cookies that opted out.
    pub fn lb_opt_outs(&self) -> Result<Vec<u64>> {
        self.lb_opt_out
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the socket LB opt-outs"))
    }

    /// Sets the entry of `ip`, whatever it was (the loader's repair from records).
    pub fn put(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<()> {
        self.uncache(ip)?;
        self.endpoints
            .insert(IpKey::from(ip), endpoint, 0)
            .map_err(Error::map(format!("adding {ip} to the endpoint map")))?;
        self.cache(ip, endpoint)
    }

    /// Adds `ip` for `endpoint`, atomically refusing it when another endpoint holds it.
    pub fn insert_new(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<()> {
        self.insert_new_entry(ip, endpoint)?;
        self.cache(ip, endpoint)
    }

    fn insert_new_entry(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<()> {
        match self.endpoints.insert(IpKey::from(ip), endpoint, BPF_NOEXIST) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::EEXIST) => {
                match self.get(ip)? {
                    Some(held) if held != endpoint => Err(Error::AddressTaken {
                        ip,
                        holder: held.ifindex,
                    }),
                    _ => Ok(()),
                }
            }
            other => other.map_err(Error::map(format!("adding {ip} to the endpoint map"))),
        }
    }

    /// Removes the entry of `ip` if it is `ifindex`'s, never another endpoint's;
    /// true when it did.
    pub fn remove_owned(&mut self, ip: IpAddr, ifindex: u32) -> Result<bool> {
        // Whatever the map says: the cache must not outlive the pod.
        self.uncache(ip)?;
        match self.get(ip)? {
            Some(held) if held.ifindex == ifindex => self.remove(ip).map(|()| true),
            _ => Ok(false),
        }
    }

    /// Removes every entry that points at `ifindex` (an endpoint whose record is lost).
    pub fn remove_all_owned(&mut self, ifindex: u32) -> Result<()> {
        for (ip, endpoint) in self.entries()? {
            if endpoint.ifindex == ifindex {
                self.remove(ip)?;
            }
        }
        self.sweep_cache(Some(ifindex)).map(drop)
    }

    pub fn get(&self, ip: IpAddr) -> Result<Option<Endpoint>> {
        found(self.endpoints.get(&IpKey::from(ip), 0), "reading the endpoint map")
    }

    /// Removes the entry of `ip`; absent is fine. Its cache entry goes first, so
    /// the datapath never finds `ip` after this.
    pub fn remove(&mut self, ip: IpAddr) -> Result<()> {
        self.uncache(ip)?;
        ignore_missing(self.endpoints.remove(&IpKey::from(ip)))
            .map_err(Error::map(format!("removing {ip} from the endpoint map")))
    }

    /// Copies `ip`'s entry, which the endpoint map now holds as `endpoint`, into the
    /// cache, unless another address holds its cache entry (`ip` is then looked up
    /// in the endpoint map). The entry is emptied (its sequence made even) before its
    /// other fields change, and filled (odd) after, one write each, so no program
    /// takes a half-written entry (see [`CachedEndpoint::seq`]). Nothing is written
    /// when the entry says so already.
    pub fn cache(&mut self, ip: IpAddr, endpoint: Endpoint) -> Result<()> {
        let addr = IpKey::from(ip);
        let index = addr.cache_index();
        let mut entry = self.cached(index)?;
        if entry.is_filled() && (entry.addr != addr || entry.endpoint == endpoint) {
            return Ok(());
        }
        if entry.is_filled() {
            self.empty_cached(index, &mut entry)?;
        }
        entry.addr = addr;
        entry.endpoint = endpoint;
        self.set_cached(index, entry)?;
        entry.seq = entry.seq.wrapping_add(1);
        self.set_cached(index, entry)
    }

    /// Empties `ip`'s cache entry (its sequence only): the datapath looks `ip` up in
    /// the endpoint map until it is cached again.
    fn uncache(&mut self, ip: IpAddr) -> Result<()> {
        let addr = IpKey::from(ip);
        let index = addr.cache_index();
        let mut entry = self.cached(index)?;
        if entry.is_filled() && entry.addr == addr {
            self.empty_cached(index, &mut entry)?;
        }
        Ok(())
    }

    /// Empties every cache entry whose endpoint is not the endpoint map's for its
    /// address, or (`gone`) whose interface is `gone`. The cache never says more
    /// than the map by construction; this undoes whatever broke that (a writer
    /// killed between its steps, a bug) at the loader's next pass. How many it
    /// emptied.
    pub fn sweep_cache(&mut self, gone: Option<u32>) -> Result<usize> {
        let mut emptied = 0;
        for index in 0..ENDPOINT_CACHE_SLOTS {
            let mut entry = self.cached(index)?;
            if !entry.is_filled() {
                continue;
            }
            let held = found(self.endpoints.get(&entry.addr, 0), "reading the endpoint map")?;
            if held != Some(entry.endpoint) || gone == Some(entry.endpoint.ifindex) {
                self.empty_cached(index, &mut entry)?;
                emptied += 1;
            }
        }
        Ok(emptied)
    }

    /// The endpoint the cache holds for `ip`, if it holds one.
    pub fn cached_endpoint(&self, ip: IpAddr) -> Result<Option<Endpoint>> {
        let addr = IpKey::from(ip);
        let entry = self.cached(addr.cache_index())?;
        Ok((entry.is_filled() && entry.addr == addr).then_some(entry.endpoint))
    }

    /// Empties `entry`, the cache's at `index` (its sequence only).
    fn empty_cached(&mut self, index: u32, entry: &mut CachedEndpoint) -> Result<()> {
        entry.seq = entry.seq.wrapping_add(1);
        self.set_cached(index, *entry)
    }

    fn cached(&self, index: u32) -> Result<CachedEndpoint> {
        self.cache
            .get(&index, 0)
            .map_err(Error::map(format!("reading endpoint cache entry {index}")))
    }

    fn set_cached(&mut self, index: u32, entry: CachedEndpoint) -> Result<()> {
        self.cache
            .set(index, entry, 0)
            .map_err(Error::map(format!("writing endpoint cache entry {index}")))
    }

    pub fn entries(&self) -> Result<Vec<(IpAddr, Endpoint)>> {
        self.endpoints
            .iter()
            .map(|entry| entry.map(|(key, endpoint)| (key.ip(), endpoint)))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the endpoint map"))
    }

    /// The counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<EndpointCounters> {
        let mut total = EndpointCounters::default();
        if let Some(per_cpu) = found(self.counters.get(&slot, 0), "reading counters")? {
            per_cpu.iter().for_each(|c| total.add(c));
        }
        Ok(total)
    }

    /// Packets to the pod in `slot` skip the kernel-flows lookup until it opens a
    /// connection through the kernel. Only for a slot whose pod sent nothing yet (a
    /// new pod's, or the uplink's before any program ran): an end recorded before
    /// would be missed, and its replies would skip the kernel's reverse NAT.
    pub fn mark_no_kernel_flows(&mut self, slot: u32) -> Result<()> {
        self.kernel_flow_slots
            .set(slot, NO_KERNEL_FLOWS, 0)
            .map_err(Error::map(format!("marking slot {slot} without kernel flows")))
    }

    /// Zeroes `slot`'s counters on every CPU and sets its policy switches for the pod
    /// that takes it over, before any packet of the pod can be judged.
    pub fn reset_slot(&mut self, slot: u32, policy: NewPodPolicy) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs")(e))?;
        let zeroes = PerCpuValues::try_from(vec![EndpointCounters::default(); cpus])
            .map_err(Error::io("sizing per-CPU counters"))?;
        self.counters
            .set(slot, zeroes, 0)
            .map_err(Error::map(format!("resetting counters slot {slot}")))?;
        let state = match policy {
            NewPodPolicy::NotIsolated => PolicyState::default(),
            NewPodPolicy::DenyAll => {
                // The slot's previous pod may have left rules under its live version
                // (the loader removes them at its next pass): the new pod goes live
                // on the other one, which holds none of them.
                let previous = self
                    .policy_state
                    .get(&slot, 0)
                    .map_err(Error::map(format!("reading the policy of slot {slot}")))?;
                let version = match previous.version() {
                    0 => RULES_VERSION,
                    _ => 0,
                };
                PolicyState {
                    flags: ISOLATED_INGRESS | ISOLATED_EGRESS | version,
                }
            }
        };
        self.policy_state
            .set(slot, state, 0)
            .map_err(Error::map(format!("resetting the policy of slot {slot}")))?;
        if policy == NewPodPolicy::DenyAll {
            // Connections allowed to a pod that held one of these addresses before
            // meet the new pod's (empty) rules at their next packet.
            bump_generation(&mut self.policy_generation)?;
        }
        Ok(())
    }

    /// Every interface with its counters slot.
    pub fn interfaces(&self) -> Result<Vec<(u32, u32)>> {
        self.interfaces
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the interface map"))
    }

    pub fn set_interface(&mut self, ifindex: u32, slot: u32) -> Result<()> {
        self.interfaces
            .insert(ifindex, slot, 0)
            .map_err(Error::map(format!("adding interface {ifindex}")))
    }

    pub fn remove_interface(&mut self, ifindex: u32) -> Result<()> {
        ignore_missing(self.interfaces.remove(&ifindex)).map_err(Error::map(format!("removing interface {ifindex}")))
    }
}

/// The programs' drop and policy verdict events, and the deadline until which they
/// write them.
pub struct FlowEvents {
    events: RingBuf<MapData>,
    until: Array<MapData, u64>,
    lost: PerCpuArray<MapData, u64>,
}

impl FlowEvents {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            events: open_map(bpffs, EVENTS_MAP)?,
            until: open_map(bpffs, MONITOR_MAP)?,
            lost: open_map(bpffs, EVENTS_LOST_MAP)?,
        })
    }

    /// Stops the programs writing events (until someone follows).
    pub fn stop_listening(&mut self) -> Result<()> {
        self.until
            .set(0, 0, 0)
            .map_err(Error::map("setting the events deadline"))
    }

    /// Events the programs did not write since the map was made, by why
    /// (`EVENTS_RING_FULL`, `EVENTS_LIMITED`).
    pub fn lost(&self, why: u32) -> Result<u64> {
        let per_cpu = self.lost.get(&why, 0).map_err(Error::map("reading the lost events"))?;
        Ok(per_cpu.iter().sum())
    }

    /// Keeps the programs writing events until `until_ns` (`bpf_ktime_get_ns`),
    /// never pulling back a later deadline another monitor set.
    pub fn listen_until(&mut self, until_ns: u64) -> Result<()> {
        let what = "setting the monitor deadline";
        if self.until.get(&0, 0).map_err(Error::map(what))? < until_ns {
            self.until.set(0, until_ns, 0).map_err(Error::map(what))?;
        }
        Ok(())
    }

    /// The next event waiting, if any.
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        loop {
            let item = self.events.next()?;
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the programs write whole FlowEvents; read unaligned.
                return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
    }
}

/// NetworkPolicy as the datapath reads it: each slot's switches, the rules of both
/// versions (by peer prefix and by peer identity), the cluster pods' identities, the
/// rules generation, and the connections allowed.
pub struct PolicyMaps {
    state: Array<MapData, PolicyState>,
    rules: LpmTrie<MapData, PolicyKey, PolicyPorts>,
    identity_rules: HashMap<MapData, IdentityRuleKey, PolicyPorts>,
    identities: HashMap<MapData, IpKey, u64>,
    generation: Array<MapData, u32>,
    flows: HashMap<MapData, PolicyFlow, AllowedFlow>,
}

impl PolicyMaps {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            state: open_map(bpffs, POLICY_STATE_MAP)?,
            rules: open_map(bpffs, POLICY_RULES_MAP)?,
            identity_rules: open_map(bpffs, POLICY_IDENTITY_RULES_MAP)?,
            identities: open_map(bpffs, POLICY_IDENTITIES_MAP)?,
            generation: open_map(bpffs, POLICY_GENERATION_MAP)?,
            flows: open_map(bpffs, POLICY_FLOWS_MAP)?,
        })
    }

    pub fn state(&self, slot: u32) -> Result<PolicyState> {
        self.state
            .get(&slot, 0)
            .map_err(Error::map(format!("reading the policy of slot {slot}")))
    }

    /// Every slot whose pod a policy isolates or whose rules version is not 0.
    pub fn states(&self) -> Result<Vec<(u32, PolicyState)>> {
        let states = self
            .state
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::map("reading the policy states"))?;
        Ok((0..)
            .zip(states)
            .filter(|(_, state)| *state != PolicyState::default())
            .collect())
    }

    pub fn set_state(&mut self, slot: u32, state: PolicyState) -> Result<()> {
        self.state
            .set(slot, state, 0)
            .map_err(Error::map(format!("setting the policy of slot {slot}")))
    }

    /// Every rule entry: its key and the peer prefix's length.
    pub fn rules(&self) -> Result<Vec<(PolicyKey, u32, PolicyPorts)>> {
        self.rules
            .iter()
            .map(|entry| {
                let (key, ports) = entry?;
                let prefix = key.prefix_len() - POLICY_KEY_FIXED_BITS;
                Ok((key.data(), prefix, ports))
            })
            .collect::<std::result::Result<_, MapError>>()
            .map_err(Error::map("reading the policy rules"))
    }

    pub fn put_rule(&mut self, key: PolicyKey, prefix: u32, ports: &PolicyPorts) -> Result<()> {
        let key = Key::new(POLICY_KEY_FIXED_BITS + prefix, key);
        self.rules
            .insert(&key, ports, 0)
            .map_err(Error::map("adding a policy rule"))
    }

    pub fn remove_rule(&mut self, key: PolicyKey, prefix: u32) -> Result<()> {
        let key = Key::new(POLICY_KEY_FIXED_BITS + prefix, key);
        ignore_missing(self.rules.remove(&key)).map_err(Error::map("removing a policy rule"))
    }

    /// Every rule entry by peer identity.
    pub fn identity_rules(&self) -> Result<Vec<(IdentityRuleKey, PolicyPorts)>> {
        self.identity_rules
            .iter()
            .collect::<std::result::Result<_, MapError>>()
            .map_err(Error::map("reading the policy rules by identity"))
    }

    pub fn put_identity_rule(&mut self, key: IdentityRuleKey, ports: &PolicyPorts) -> Result<()> {
        self.identity_rules
            .insert(key, ports, 0)
            .map_err(Error::map("adding a policy rule by identity"))
    }

    pub fn remove_identity_rule(&mut self, key: IdentityRuleKey) -> Result<()> {
        ignore_missing(self.identity_rules.remove(&key)).map_err(Error::map("removing a policy rule by identity"))
    }

    /// Every cluster pod address with an identity.
    pub fn identities(&self) -> Result<Vec<(IpAddr, u64)>> {
        self.identities
            .iter()
            .map(|entry| entry.map(|(addr, identity)| (addr.ip(), identity)))
            .collect::<std::result::Result<_, MapError>>()
            .map_err(Error::map("reading the pod identities"))
    }

    pub fn set_identity(&mut self, addr: IpAddr, identity: u64) -> Result<()> {
        self.identities
            .insert(IpKey::from(addr), identity, 0)
            .map_err(Error::map(format!("setting the identity of {addr}")))
    }

    pub fn remove_identity(&mut self, addr: IpAddr) -> Result<()> {
        ignore_missing(self.identities.remove(&IpKey::from(addr)))
            .map_err(Error::map(format!("removing the identity of {addr}")))
    }

    pub fn generation(&self) -> Result<u32> {
        self.generation
            .get(&0, 0)
            .map_err(Error::map("reading the policy generation"))
    }

    /// Makes every allowed connection meet the rules again, once, at its next packet.
    pub fn bump_generation(&mut self) -> Result<()> {
        bump_generation(&mut self.generation)
    }

    /// How many connections policy follows now.
    pub fn flows(&self) -> usize {
        self.flows.keys().filter(|key| key.is_ok()).count()
    }

    /// The connections that have lived out their timeouts at `now`, and how many
    /// live ones each slot is charged with.
    pub fn flow_census(
        &self,
        now: u64,
        timeouts: &ConnectionTimeouts,
    ) -> (Vec<PolicyFlow>, std::collections::HashMap<u32, u64>) {
        let mut expired = Vec::new();
        let mut held = std::collections::HashMap::new();
        for (key, flow) in self.flows.iter().filter_map(|entry| entry.ok()) {
            match flow.expired(now, timeouts) {
                true => expired.push(key),
                false => *held.entry(flow.charged).or_default() += 1,
            }
        }
        (expired, held)
    }

    /// Removes a connection's entry; false if a program removed it first.
    pub fn forget_flow(&mut self, key: &PolicyFlow) -> Result<bool> {
        match self.flows.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(false),
            Err(e) => Err(Error::map("removing an expired connection")(e)),
        }
    }

    /// How many rule entries by identity there are (keys only: no values read).
    pub fn identity_rule_count(&self) -> usize {
        self.identity_rules.keys().filter(|key| key.is_ok()).count()
    }

    /// How many cluster pod addresses have an identity (keys only).
    pub fn identity_count(&self) -> usize {
        self.identities.keys().filter(|key| key.is_ok()).count()
    }
}

/// `VELOX_POLICY_FLOW_SHARES`, memory-mapped: the counts the programs change with
/// BPF atomic adds, changed here with the CPU's.
pub struct PolicyFlowShares {
    counters: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory changed only atomically; it lives as long as
// the value.
unsafe impl Send for PolicyFlowShares {}

impl PolicyFlowShares {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        use std::os::fd::AsFd;
        let path = bpffs.map(POLICY_FLOW_SHARES_MAP);
        let map = MapData::from_pin(&path).map_err(Error::not_ready(format!("cannot open {}", path.display())))?;
        let len = POLICY_FLOW_SHARES * std::mem::size_of::<u64>();
        // SAFETY: a shared mapping of an mmapable array of `POLICY_FLOW_SHARES`
        // u64s; the kernel keeps the map alive while it is mapped.
        let mapped = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).expect("not empty"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| Error::map(format!("mapping {}", path.display()))(MapError::from(std::io::Error::from(e))))?;
        Ok(Self {
            counters: mapped.cast(),
            len,
        })
    }

    fn counter(&self, index: u32) -> &std::sync::atomic::AtomicU64 {
        assert!((index as usize) < POLICY_FLOW_SHARES);
        // SAFETY: within the mapping, 8-byte aligned (page-aligned start).
        unsafe { &*self.counters.as_ptr().add(index as usize) }
    }

    /// Each slot's reserved share, and what the pool holds beyond them. The pool's
    /// use under new limits (another `--max-pods`) is counted again by the next
    /// `recount`.
    pub fn set_limits(&self, reserved: u64, pool: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counter(POLICY_FLOW_RESERVED).store(reserved, Relaxed);
        self.counter(POLICY_FLOW_POOL_SIZE).store(pool, Relaxed);
    }

    /// Sets every slot's count, and the pool's use, to what the map holds (`held`:
    /// live entries by slot). The programs count with a read and an add, which CPUs
    /// racing may leave off by one now and then, and an entry the LRU evicted or a
    /// loader that was down gives nothing back: this puts the counts right. A
    /// program's change between the walk and these stores is lost until the next.
    pub fn recount(&self, held: &std::collections::HashMap<u32, u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        let reserved = self.counter(POLICY_FLOW_RESERVED).load(Relaxed);
        let mut beyond = 0;
        for slot in 0..velox_common::MAX_ENDPOINTS as u32 {
            let count = held.get(&slot).copied().unwrap_or(0);
            beyond += count.saturating_sub(reserved);
            self.counter(slot).store(count, Relaxed);
        }
        self.counter(POLICY_FLOW_POOL_USED).store(beyond, Relaxed);
    }

    /// The reserved share and the pool's size, as `set_limits` left them.
    pub fn limits(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counter(POLICY_FLOW_RESERVED).load(Relaxed),
            self.counter(POLICY_FLOW_POOL_SIZE).load(Relaxed),
        )
    }

    /// Entries held by the pod in `slot`.
    pub fn held(&self, slot: u32) -> u64 {
        self.counter(slot).load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Entries held beyond the slots' reserved shares.
    pub fn pool_used(&self) -> u64 {
        self.counter(POLICY_FLOW_POOL_USED)
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PolicyFlowShares {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, not used after this.
        let _ = unsafe { nix::sys::mman::munmap(self.counters.cast(), self.len) };
    }
}

/// Moves the rules generation on: every allowed connection meets the rules again,
/// once, at its next packet.
fn bump_generation(generation: &mut Array<MapData, u32>) -> Result<()> {
    let now = generation
        .get(&0, 0)
        .map_err(Error::map("reading the policy generation"))?;
    generation
        .set(0, now.wrapping_add(1), 0)
        .map_err(Error::map("bumping the policy generation"))
}

/// The length of `cidr` as a prefix of the datapath's address space, where IPv4 is
/// mapped into IPv6.
pub fn mapped_prefix_len(cidr: &IpNet) -> u32 {
    match cidr {
        IpNet::V4(v4) => IPV4_MAPPED_PREFIX + u32::from(v4.prefix_len()),
        IpNet::V6(v6) => u32::from(v6.prefix_len()),
    }
}

/// The CIDR that an address of the datapath's space and a prefix length of that
/// space stand for: [`mapped_prefix_len`] undone.
pub fn cidr_of_mapped(addr: IpKey, prefix_len: u32) -> Result<IpNet> {
    let ip = addr.ip();
    let invalid = || Error::Invalid(format!("prefix {ip}/{prefix_len} of the mapped address space"));
    let len = match ip {
        IpAddr::V4(_) => prefix_len.checked_sub(IPV4_MAPPED_PREFIX).ok_or_else(invalid)?,
        IpAddr::V6(_) => prefix_len,
    };
    IpNet::new(ip, len.try_into().map_err(|_| invalid())?).map_err(|_| invalid())
}

/// An LPM key for a CIDR of either family (IPv4 mapped into IPv6).
fn lpm_key(cidr: IpNet) -> Key<[u8; 16]> {
    Key::new(mapped_prefix_len(&cidr), IpKey::from(cidr.network()).addr)
}

fn cidr_of(key: &Key<[u8; 16]>) -> Result<IpNet> {
    cidr_of_mapped(IpKey::v6(key.data()), key.prefix_len())
}

/// Other nodes' pod CIDRs of both families and how to reach them.
pub struct PeerMap {
    peers: LpmTrie<MapData, [u8; 16], Peer>,
}

impl PeerMap {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            peers: open_map(bpffs, PEERS_MAP)?,
        })
    }

    pub fn entries(&self) -> Result<Vec<(IpNet, Peer)>> {
        let mut out = Vec::new();
        for entry in self.peers.iter() {
            let (key, peer) = entry.map_err(Error::map("reading the peer map"))?;
            out.push((cidr_of(&key)?, peer));
        }
        Ok(out)
    }

    pub fn put(&mut self, cidr: IpNet, peer: Peer) -> Result<()> {
        self.peers
            .insert(&lpm_key(cidr), peer, 0)
            .map_err(Error::map(format!("adding {cidr} to the peer map")))
    }

    pub fn remove(&mut self, cidr: IpNet) -> Result<()> {
        ignore_missing(self.peers.remove(&lpm_key(cidr)))
            .map_err(Error::map(format!("removing {cidr} from the peer map")))
    }

    /// The peer whose pod CIDR holds `ip`, if any.
    pub fn route(&self, ip: IpAddr) -> Result<Option<Peer>> {
        found(
            self.peers.get(&Key::new(128, IpKey::from(ip).addr), 0),
            "reading the peer map",
        )
    }
}

/// Every other node's InternalIPs, with its id and tunnel remote: who may send into
/// the tunnel.
pub struct NodeMap {
    nodes: HashMap<MapData, IpKey, NodeEntry>,
}

impl NodeMap {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            nodes: open_map(bpffs, NODES_MAP)?,
        })
    }

    pub fn entries(&self) -> Result<Vec<(IpAddr, NodeEntry)>> {
        self.nodes
            .iter()
            .map(|entry| {
                entry
                    .map(|(ip, node)| (ip.ip(), node))
                    .map_err(Error::map("reading the node map"))
            })
            .collect()
    }

    /// Makes the map hold exactly `wanted`: the departed go first (they may send no
    /// more, and they make room), then new and changed entries.
    pub fn sync(&mut self, wanted: &std::collections::BTreeMap<IpAddr, NodeEntry>) -> Result<()> {
        let held = self.entries()?;
        for (ip, _) in held.iter().filter(|(ip, _)| !wanted.contains_key(ip)) {
            ignore_missing(self.nodes.remove(&IpKey::from(*ip)))
                .map_err(Error::map(format!("removing node address {ip}")))?;
        }
        for (ip, node) in wanted {
            if !held.contains(&(*ip, *node)) {
                self.nodes
                    .insert(IpKey::from(*ip), node, 0)
                    .map_err(Error::map(format!("adding node address {ip}")))?;
            }
        }
        Ok(())
    }
}

/// Pod connection ends whose traffic the kernel handled: packets to them go to the
/// kernel rather than the fast path, as they may be replies it must translate back.
pub struct KernelFlows {
    ends: HashMap<MapData, FlowEnd, u32>,
}

impl KernelFlows {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            ends: open_map(bpffs, KERNEL_FLOWS_MAP)?,
        })
    }

    /// Every end and the ifindex its traffic was first seen on.
    pub fn entries(&self) -> Result<Vec<(FlowEnd, u32)>> {
        self.ends
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the kernel flows"))
    }
}

/// Adds the entries of the hash map `name` pinned at `pin` (another layout's, of
/// the same shape) to this layout's: those it lacks, and those `newer(ours,
/// theirs)` prefers. Returns how many it wrote. What the map has no room for stays
/// behind.
pub fn copy_entries<K: aya::Pod, V: aya::Pod>(
    bpffs: &Bpffs,
    name: &str,
    pin: &std::path::Path,
    newer: impl Fn(&V, &V) -> bool,
) -> Result<usize> {
    let theirs: HashMap<MapData, K, V> = open_pin(pin, name)?;
    let mut ours: HashMap<MapData, K, V> = open_map(bpffs, name)?;
    let mut copied = 0;
    for entry in theirs.iter() {
        let (key, value) = entry.map_err(Error::map(format!("reading {}", pin.display())))?;
        let keep_ours = found(ours.get(&key, 0), "reading the new map")?.is_some_and(|mine| !newer(&mine, &value));
        if !keep_ours {
            ours.insert(key, value, 0)
                .map_err(Error::map(format!("adding to {name}")))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// Where a Service answers: an address and port (a ClusterIP, an external or
/// load-balancer IP), or a NodePort on every address of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    Address(FlowEnd),
    NodePort(NodePortKey),
}

/// The Services: frontend -> [`Service`] (id, backend counts, traffic policies),
/// (id, slot) -> backend; and this node's addresses NodePorts answer on.
pub struct ServiceMaps {
    services: HashMap<MapData, FlowEnd, Service>,
    node_ports: HashMap<MapData, NodePortKey, Service>,
    backends: HashMap<MapData, BackendSlot, FlowEnd>,
    node_addresses: HashMap<MapData, IpKey, NodeAddress>,
    masquerade: Array<MapData, IpKey>,
    maglev: HashMap<MapData, u32, MaglevTable>,
}

impl ServiceMaps {
    pub fn open(bpffs: &Bpffs) -> Result<Self> {
        Ok(Self {
            services: open_map(bpffs, SERVICES_MAP)?,
            node_ports: open_map(bpffs, NODE_PORTS_MAP)?,
            backends: open_map(bpffs, BACKENDS_MAP)?,
            node_addresses: open_map(bpffs, NODE_ADDRESSES_MAP)?,
            masquerade: open_map(bpffs, MASQUERADE_MAP)?,
            maglev: open_map(bpffs, MAGLEV_MAP)?,
        })
    }

    /// Every frontend in the maps.
    pub fn frontends(&self) -> Result<Vec<(Frontend, Service)>> {
        let by_address = self.services.iter().map(|e| e.map(|(k, v)| (Frontend::Address(k), v)));
        let node_ports = self
            .node_ports
            .iter()
            .map(|e| e.map(|(k, v)| (Frontend::NodePort(k), v)));
        by_address
            .chain(node_ports)
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the service maps"))
    }

    /// The backends of a Service in slot order.
    pub fn backends(&self, service: &Service) -> Result<Vec<FlowEnd>> {
        (0..service.backends)
            .filter_map(|slot| {
                found(
                    self.backends.get(
                        &BackendSlot {
                            service: service.id,
                            slot,
                        },
                        0,
                    ),
                    "reading the backend map",
                )
                .transpose()
            })
            .collect()
    }

    /// Gives `frontend` `service` with `backends`: the slots first, then the entry
    /// that points at them, so a connection never picks a slot that is not filled
    /// (a shrinking Service's extra slots go after, with [`Self::remove_backends`]).
    /// `service.id` must be the frontend's own, or one no entry uses.
    pub fn set(&mut self, frontend: Frontend, service: Service, backends: &[FlowEnd]) -> Result<()> {
        for (slot, backend) in backends.iter().enumerate() {
            let slot = BackendSlot {
                service: service.id,
                slot: slot as u32,
            };
            self.backends
                .insert(slot, *backend, 0)
                .map_err(Error::map("adding a backend"))?;
        }
        if service.flags & SERVICE_MAGLEV != 0 {
            // Over the slots a client from outside may be given.
            let choices = service.choices(SERVICE_EXTERNAL_LOCAL) as usize;
            let table = crate::maglev::table(&backends[..choices.min(backends.len())]).ok_or_else(|| {
                Error::Invalid(format!("{} backends are too many for a Maglev table", backends.len()))
            })?;
            self.maglev
                .insert(service.id, table, 0)
                .map_err(Error::map("adding a Maglev table"))?;
        }
        match frontend {
            Frontend::Address(end) => self.services.insert(end, service, 0),
            Frontend::NodePort(key) => self.node_ports.insert(key, service, 0),
        }
        .map_err(Error::map("adding a service"))
    }

    /// Removes a frontend, then its backends.
    pub fn remove(&mut self, frontend: &Frontend, service: &Service) -> Result<()> {
        match frontend {
            Frontend::Address(end) => ignore_missing(self.services.remove(end)),
            Frontend::NodePort(key) => ignore_missing(self.node_ports.remove(key)),
        }
        .map_err(Error::map("removing a service"))?;
        self.remove_backends(service, 0)
    }

    /// Removes the backend slots of `service`'s id from slot `first` on (from 0: its
    /// Maglev table too).
    pub fn remove_backends(&mut self, service: &Service, first: u32) -> Result<()> {
        if first == 0 {
            ignore_missing(self.maglev.remove(&service.id)).map_err(Error::map("removing a Maglev table"))?;
        }
        for slot in first..service.backends {
            ignore_missing(self.backends.remove(&BackendSlot {
                service: service.id,
                slot,
            }))
            .map_err(Error::map("removing a backend"))?;
        }
        Ok(())
    }

    /// This node's addresses NodePorts answer on, as the map has them.
    pub fn node_addresses(&self) -> Result<Vec<(IpKey, NodeAddress)>> {
        self.node_addresses
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::map("reading the node address map"))
    }

    /// Makes the node address map hold exactly `wanted`.
    pub fn set_node_addresses(&mut self, wanted: &std::collections::BTreeMap<IpKey, NodeAddress>) -> Result<()> {
        for (addr, address) in wanted {
            self.node_addresses
                .insert(*addr, *address, 0)
                .map_err(Error::map("adding a node address"))?;
        }
        for (addr, _) in self.node_addresses()? {
            if !wanted.contains_key(&addr) {
                ignore_missing(self.node_addresses.remove(&addr)).map_err(Error::map("removing a node address"))?;
            }
        }
        Ok(())
    }

    /// The addresses connections from outside are masqueraded as, IPv4 then IPv6
    /// (unspecified: none of that family).
    pub fn set_masquerade(&mut self, addresses: [IpKey; 2]) -> Result<()> {
        for (index, address) in addresses.into_iter().enumerate() {
            self.masquerade
                .set(index as u32, address, 0)
                .map_err(Error::map("setting the masquerade address"))?;
        }
        Ok(())
    }
}

/// The UDP sockets of the calling thread's network namespace connected through a
/// Service, by socket cookie, with the backend and the frontend: read from the
/// pinned iterator over the namespace's UDP sockets, since `sock_diag` reports no
/// socket storage of UDP sockets.
pub fn connected_frontends_here(bpffs: &Bpffs) -> Result<std::collections::HashMap<u64, SocketFrontend>> {
    let path = bpffs.iterator(UDP_SOCKET_FRONTENDS_ITER);
    let records = std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
    const RECORD: usize = size_of::<u64>() + size_of::<SocketFrontend>();
    if records.len() % RECORD != 0 {
        return Err(Error::Invalid(format!(
            "{} gave {} bytes, not whole records of {RECORD}",
            path.display(),
            records.len()
        )));
    }
    Ok(records
        .chunks_exact(RECORD)
        .map(|record| {
            let cookie = u64::from_ne_bytes(record[..8].try_into().expect("8 bytes"));
            // SAFETY: as many bytes as the plain `repr(C)` value, which any bytes make.
            let kept = unsafe { std::ptr::read_unaligned(record[8..].as_ptr().cast::<SocketFrontend>()) };
            (cookie, kept)
        })
        .collect())
}

/// Removes both directions of every NAT connection to one of `backends`; returns
/// how many connections.
pub fn forget_nat_to(bpffs: &Bpffs, backends: &std::collections::HashSet<FlowEnd>) -> Result<usize> {
    let mut map: HashMap<MapData, NatKey, NatEntry> = open_map(bpffs, NAT_MAP)?;
    let doomed: Vec<(NatKey, NatEntry)> = nat_entries(bpffs)?
        .into_iter()
        .filter(|(_, entry)| entry.direction == velox_common::NAT_ORIGINAL && backends.contains(&entry.dst))
        .collect();
    for (key, entry) in &doomed {
        for key in [*key, entry.reverse_key()] {
            ignore_missing(map.remove(&key)).map_err(Error::map("removing a NAT entry"))?;
        }
    }
    Ok(doomed.len())
}

/// Removes every NAT connection.
pub fn clear_nat(bpffs: &Bpffs) -> Result<()> {
    let mut map: HashMap<MapData, NatKey, NatEntry> = open_map(bpffs, NAT_MAP)?;
    for (key, _) in nat_entries(bpffs)? {
        ignore_missing(map.remove(&key)).map_err(Error::map("removing a NAT entry"))?;
    }
    Ok(())
}

/// The NAT's connections, for `velox-loader nat`.
/// The connection timeouts the programs use.
pub fn connection_timeouts(bpffs: &Bpffs) -> Result<ConnectionTimeouts> {
    let map: Array<MapData, ConnectionTimeouts> = open_map(bpffs, CT_TIMEOUTS_MAP)?;
    map.get(&0, 0).map_err(Error::map("reading the connection timeouts"))
}

pub fn set_connection_timeouts(bpffs: &Bpffs, timeouts: &ConnectionTimeouts) -> Result<()> {
    let mut map: Array<MapData, ConnectionTimeouts> = open_map(bpffs, CT_TIMEOUTS_MAP)?;
    map.set(0, timeouts, 0)
        .map_err(Error::map("setting the connection timeouts"))
}

pub fn nat_entries(bpffs: &Bpffs) -> Result<Vec<(NatKey, NatEntry)>> {
    let map: HashMap<MapData, NatKey, NatEntry> = open_map(bpffs, NAT_MAP)?;
    map.iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::map("reading the NAT map"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_keys_of_both_families_round_trip() {
        for cidr in ["200.200.2.0/24", "fd00:200:2::/64", "0.0.0.0/0", "10.0.0.4/32"] {
            let cidr: IpNet = cidr.parse().unwrap();
            assert_eq!(cidr_of(&lpm_key(cidr)).unwrap(), cidr);
        }
        assert_eq!(lpm_key("200.200.2.0/24".parse().unwrap()).prefix_len(), 120);
    }
}
