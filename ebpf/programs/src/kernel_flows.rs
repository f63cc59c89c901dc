//! Connections the kernel handles. A connection a pod opens to something that is not
//! a pod (a Service, a node IP's hostPort or NodePort, a host, the outside) goes to
//! the kernel, which may NAT it. The pod's end of it is then recorded, and packets to
//! that end, which may be replies the kernel must translate back, go to the kernel
//! too: a redirect would skip the reverse NAT and break the connection. Plain
//! pod-to-pod traffic never goes to the kernel, so it keeps the fast path; so do
//! connections *to* a pod's server port, whatever else that port answers (a kubelet
//! probe, a NodePort).
//!
//! A pod that never opened such a connection has nothing recorded: its slot says so,
//! and packets to it skip the lookup (one hash lookup, ~25 ns of a stream's packet).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, LruHashMap},
    macros::btf_map,
};
use velox_common::{FlowEnd, DEFAULT_KERNEL_FLOWS, MAX_ENDPOINTS, NO_KERNEL_FLOWS};

/// Pod connection ends whose traffic went to the kernel -> the ifindex it was seen on.
/// The loader sizes it from `nf_conntrack_max`: conntrack holds no more connections,
/// and lookups keep the ends of live connections from being evicted.
#[btf_map]
static VELOX_KERNEL_FLOWS: LruHashMap<FlowEnd, u32, { DEFAULT_KERNEL_FLOWS as usize }> = LruHashMap::new();

/// By counters slot: `NO_KERNEL_FLOWS` while no end of the slot's pod is recorded
/// (the uplink's slot stands for the pods of other nodes). Marked by the CNI for a
/// new pod's slot (by the loader for the uplink's, on a node where nothing ran
/// before) and cleared here before an end is recorded. Always `MAX_ENDPOINTS` long,
/// whatever `--max-pods` says, so it is never recreated under running programs.
#[btf_map]
static VELOX_KERNEL_FLOW_SLOTS: Array<u32, MAX_ENDPOINTS> = Array::new();

/// Packets to a connection end whose traffic went to the kernel go to the kernel: they
/// may be replies (or ICMP errors about the connection) it must translate back. The
/// kernel follows those connections, and policy checked them when they opened. `slot`
/// is the end's pod's counters slot (the uplink's for a pod of another node).
#[inline(always)]
pub fn is_kernel_flow(to: &FlowEnd, slot: u32) -> bool {
    let none_recorded = VELOX_KERNEL_FLOW_SLOTS
        .get(slot)
        .is_some_and(|recorded| *recorded == NO_KERNEL_FLOWS);
    !none_recorded && unsafe { VELOX_KERNEL_FLOWS.get(to) }.is_some()
}

/// Adds `end` of the pod in `slot`, first seen on `ifindex`, once; later lookups keep
/// it from eviction while its connection lives. The slot learns it first, so a
/// packet that finds the end finds the slot saying so.
#[inline(always)]
pub fn remember(ifindex: u32, end: &FlowEnd, slot: u32) {
    if let Some(recorded) = VELOX_KERNEL_FLOW_SLOTS.get_ptr_mut(slot) {
        // SAFETY: an array value; every writer here writes the same 0.
        unsafe {
            if *recorded != 0 {
                *recorded = 0;
            }
        }
    }
    if unsafe { VELOX_KERNEL_FLOWS.get(end) }.is_none() {
        let _ = VELOX_KERNEL_FLOWS.insert(end, ifindex, BPF_NOEXIST as u64);
    }
}
