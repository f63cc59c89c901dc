//! The contract between the eBPF datapath and userspace: map names, key and value
//! layouts, and the names under which the loader pins everything.
#![no_std]

/// Pinned under `<bpffsRoot>/maps/`: pod IPv4 address -> where to deliver it.
pub const ENDPOINTS_MAP: &str = "VELOX_ENDPOINTS";
/// Pinned under `<bpffsRoot>/maps/`: host veth ifindex -> per-CPU counters.
pub const COUNTERS_MAP: &str = "VELOX_COUNTERS";
/// Pinned under `<bpffsRoot>/maps/`: other nodes' pod CIDRs -> how to reach that node.
pub const PEERS_MAP: &str = "VELOX_PEERS";
/// Pinned under `<bpffsRoot>/programs/`: TC ingress of every host-side pod veth.
pub const FROM_POD_PROGRAM: &str = "from_pod";
/// Pinned under `<bpffsRoot>/programs/`: TC ingress of the node's uplink.
pub const FROM_NET_PROGRAM: &str = "from_net";

pub const MAX_ENDPOINTS: usize = 16384;
pub const MAX_PEERS: usize = 4096;

/// An IPv4 address in network byte order; a byte array so bpftool prints it readably.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ipv4: [u8; 4],
}

/// A pod reachable on this node. Frames are redirected as they are: rewriting the
/// MACs would make every cloned TCP skb be copied (measured: +25% per packet), and the
/// pod accepts them without it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side veth: `bpf_redirect_peer` to it lands in the pod's netns.
    pub ifindex: u32,
}

/// Another node, as the next hop for its pod CIDR (direct routing, no tunnel).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer node's IP on the underlay, in network byte order.
    pub node_ip: [u8; 4],
    /// The local uplink to send from.
    pub ifindex: u32,
}

/// Traffic seen by a Velox program on one interface: what a pod sent (`from_pod` on
/// its host veth), or what arrived from the network (`from_net` on the uplink).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Delivered straight to a pod, or to another node, by the eBPF datapath.
    pub redirected_packets: u64,
    pub redirected_bytes: u64,
    /// Handed to the kernel stack (host, other nodes, outside).
    pub passed_packets: u64,
    pub passed_bytes: u64,
    /// A redirect the kernel refused.
    pub dropped_packets: u64,
}

impl EndpointCounters {
    pub fn add(&mut self, other: &Self) {
        self.redirected_packets += other.redirected_packets;
        self.redirected_bytes += other.redirected_bytes;
        self.passed_packets += other.passed_packets;
        self.passed_bytes += other.passed_bytes;
        self.dropped_packets += other.dropped_packets;
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::EndpointCounters {}
}
