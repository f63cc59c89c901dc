//! Services as the socket load balancer and the outside path (`nat`) both see them:
//! frontends, NodePorts, backends, and the pick of one backend.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, LruHashMap},
    helpers::bpf_get_prandom_u32,
    macros::btf_map,
};
use velox_common::{
    Affinity, AffinityKey, BackendSlot, FlowEnd, IpKey, MaglevTable, NodeAddress, NodePortKey, Service,
    MAGLEV_TABLE_SIZE, MAX_AFFINITIES, MAX_BACKENDS, MAX_NODE_ADDRESSES, MAX_NODE_PORTS, MAX_SERVICES, SERVICE_MAGLEV,
};

#[btf_map]
static VELOX_SERVICES: HashMap<FlowEnd, Service, MAX_SERVICES, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

#[btf_map]
static VELOX_NODE_PORTS: HashMap<NodePortKey, Service, MAX_NODE_PORTS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

#[btf_map]
static VELOX_NODE_ADDRESSES: HashMap<IpKey, NodeAddress, MAX_NODE_ADDRESSES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
static VELOX_BACKENDS: HashMap<BackendSlot, FlowEnd, MAX_BACKENDS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

#[btf_map]
static VELOX_AFFINITY: LruHashMap<AffinityKey, Affinity, MAX_AFFINITIES> = LruHashMap::new();

#[btf_map]
static VELOX_MAGLEV: HashMap<u32, MaglevTable, MAX_SERVICES, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// The Service a connection to `frontend` asks for: a ClusterIP, external or
/// load-balancer IP, or a NodePort on one of this node's addresses. `netns` is the
/// asking socket's network namespace cookie (0 from the network), to which a
/// loopback NodePort is limited.
#[inline(always)]
pub fn service_at(frontend: &FlowEnd, netns: u64) -> Option<&'static Service> {
    if let Some(service) = unsafe { VELOX_SERVICES.get(frontend) } {
        return Some(service);
    }
    let address = unsafe { VELOX_NODE_ADDRESSES.get(&frontend.addr) }?;
    if address.netns_cookie != 0 && address.netns_cookie != netns {
        return None;
    }
    unsafe { VELOX_NODE_PORTS.get(&NodePortKey::of(frontend)) }
}

/// This node's address `addr`, as a NodePort answers on it.
#[inline(always)]
pub fn node_address(addr: &IpKey) -> Option<&'static NodeAddress> {
    unsafe { VELOX_NODE_ADDRESSES.get(addr) }
}

/// One of the first `choices` backends of `service`. A client with
/// `sessionAffinity: ClientIP` gets the backend it had while the timeout lasts and
/// that backend still holds its slot. Otherwise a connection hashed to `hash` gets
/// the one the Maglev table says, where the frontend has one for `choices`, and a
/// random one where not. None when there is no choice.
#[inline(always)]
pub fn pick_backend(
    service: &Service,
    choices: u32,
    client: &AffinityKey,
    hash: Option<u32>,
    now: u64,
) -> Option<&'static FlowEnd> {
    if choices == 0 {
        return None;
    }
    let sticky = service.affinity_seconds != 0;
    if sticky {
        if let Some(kept) = VELOX_AFFINITY.get_ptr_mut(client) {
            // SAFETY: a map value; a racing writer at worst picks anew.
            let kept = unsafe { &mut *kept };
            // Another CPU may have stamped a later time than `now`.
            let fresh = now.saturating_sub(kept.last_seen) <= u64::from(service.affinity_seconds) * 1_000_000_000;
            if fresh && kept.slot < choices {
                let slot = BackendSlot {
                    service: service.id,
                    slot: kept.slot,
                };
                if let Some(backend) = unsafe { VELOX_BACKENDS.get(&slot) } {
                    if *backend == kept.backend {
                        kept.last_seen = now;
                        return Some(backend);
                    }
                }
            }
        }
    }
    let slot = match hash.and_then(|hash| maglev_slot(service, choices, hash)) {
        Some(slot) => slot,
        None => (unsafe { bpf_get_prandom_u32() }) % choices,
    };
    let picked = BackendSlot {
        service: service.id,
        slot,
    };
    // A slot can be missing for a moment while the loader shrinks the Service; slot 0
    // goes last.
    let first = BackendSlot {
        service: service.id,
        slot: 0,
    };
    let (backend, slot) = match unsafe { VELOX_BACKENDS.get(&picked) } {
        Some(backend) => (backend, slot),
        None => (unsafe { VELOX_BACKENDS.get(&first) }?, 0),
    };
    if sticky {
        let kept = Affinity {
            backend: *backend,
            slot,
            last_seen: now,
        };
        let _ = VELOX_AFFINITY.insert(client, &kept, 0);
    }
    Some(backend)
}

/// The slot `service`'s Maglev table gives a connection hashed to `hash`, if the
/// frontend has a table for `choices` slots.
#[inline(always)]
fn maglev_slot(service: &Service, choices: u32, hash: u32) -> Option<u32> {
    if service.flags & SERVICE_MAGLEV == 0 {
        return None;
    }
    let table = unsafe { VELOX_MAGLEV.get(&service.id) }?;
    if table.backends != choices {
        return None;
    }
    // The hash scaled onto the table (Lemire's reduction): a multiply and a shift
    // the verifier can bound, where LLVM turns a modulo into arithmetic it cannot.
    let index = (u64::from(hash) * MAGLEV_TABLE_SIZE as u64) >> 32;
    let slot = u32::from(*table.slots.get(index as usize)?);
    (slot < choices).then_some(slot)
}
