//! Connections the kernel handles. A connection a pod opens to something that is not
//! a pod (a Service, a node IP's hostPort or NodePort, a host, the outside) goes to
//! the kernel, which may NAT it. The pod's end of it is then recorded, and packets to
//! that end, which may be replies the kernel must translate back, go to the kernel
//! too: a redirect would skip the reverse NAT and break the connection. Plain
//! pod-to-pod traffic never goes to the kernel, so it keeps the fast path; so do
//! connections *to* a pod's server port, whatever else that port answers (a kubelet
//! probe, a NodePort).

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::LruHashMap, macros::btf_map};
use velox_common::{FlowEnd, DEFAULT_KERNEL_FLOWS};

/// Pod connection ends whose traffic went to the kernel -> the ifindex it was seen on.
/// The loader sizes it from `nf_conntrack_max`: conntrack holds no more connections,
/// and lookups keep the ends of live connections from being evicted.
#[btf_map]
static VELOX_KERNEL_FLOWS: LruHashMap<FlowEnd, u32, { DEFAULT_KERNEL_FLOWS as usize }> = LruHashMap::new();

/// Packets to a connection end whose traffic went to the kernel go to the kernel: they
/// may be replies (or ICMP errors about the connection) it must translate back. The
/// kernel follows those connections, and policy checked them when they opened.
#[inline(always)]
pub fn is_kernel_flow(to: &FlowEnd) -> bool {
    unsafe { VELOX_KERNEL_FLOWS.get(to) }.is_some()
}

/// Adds `end`, first seen on `ifindex`, once; later lookups keep it from eviction
/// while its connection lives.
#[inline(always)]
pub fn remember(ifindex: u32, end: &FlowEnd) {
    if unsafe { VELOX_KERNEL_FLOWS.get(end) }.is_none() {
        let _ = VELOX_KERNEL_FLOWS.insert(end, ifindex, BPF_NOEXIST as u64);
    }
}
