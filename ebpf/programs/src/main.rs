//! Velox's TC programs, IPv4 and IPv6 alike.
//! - `from_pod`, on the ingress of every host-side pod veth: a local pod gets the
//!   packet with `bpf_redirect_peer`, a pod on another node with `bpf_redirect_neigh`
//!   out of the uplink; everything else goes to the kernel.
//! - `from_net`, on the ingress of the node's uplink: a local pod gets it with
//!   `bpf_redirect_peer`; everything else goes to the kernel.
//! - `nat_track`, on the egress of the same interfaces: for a packet netfilter marked
//!   as part of a DNATed connection (a Service, a hostPort, a NodePort), records the
//!   reply's flow, so that `from_pod` and `from_net` hand the replies to the kernel,
//!   which translates them back. A redirect would skip that and break the connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_redir_neigh, BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
    helpers::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use velox_common::{
    Endpoint, EndpointCounters, FlowKey, IpKey, Peer, AF_INET, DEFAULT_NAT_FLOWS, MAX_ENDPOINTS, MAX_PEERS, NAT_MARK,
};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<IpKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 16], Peer, MAX_PEERS> = LpmTrie::new();

#[btf_map]
static VELOX_COUNTERS: PerCpuHashMap<u32, EndpointCounters, MAX_ENDPOINTS> = PerCpuHashMap::new();

/// Reply flow -> the ifindex its connection's packets left by. The loader sizes it
/// from `nf_conntrack_max` at load time: conntrack cannot hold more NATed connections.
#[btf_map]
static VELOX_NAT_FLOWS: LruHashMap<FlowKey, u32, { DEFAULT_NAT_FLOWS as usize }> = LruHashMap::new();

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;
/// Router solicitation .. redirect: neighbour discovery is the kernel's business.
const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=137;

// The programs keep to plain values and `Option<&T>`: an `Option` or enum holding a
// value leaves its payload undefined when empty, LLVM then copies whatever a register
// holds, and the verifier refuses to read such a register.

/// Not for the datapath to deliver: the kernel decides.
const PASS: i64 = -1;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let mut dst = IpKey::default();
    let is_ip = read_destination(&ctx, &mut dst);
    let result = if !is_ip {
        PASS
    } else if let Some(endpoint) = unsafe { VELOX_ENDPOINTS.get(&dst) } {
        redirect_unless_nat_reply(&ctx, || unsafe { bpf_redirect_peer(endpoint.ifindex, 0) })
    } else if let Some(peer) = VELOX_PEERS.get(&Key::new(128, dst.addr)) {
        redirect_unless_nat_reply(&ctx, || to_peer_node(peer))
    } else {
        PASS
    };
    let action = finish(&ctx, result);
    trace(&ctx, "from_pod", is_ip.then_some(&dst), action);
    action
}

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let mut dst = IpKey::default();
    let is_ip = read_destination(&ctx, &mut dst);
    let result = match is_ip.then(|| unsafe { VELOX_ENDPOINTS.get(&dst) }).flatten() {
        Some(endpoint) => redirect_unless_nat_reply(&ctx, || unsafe { bpf_redirect_peer(endpoint.ifindex, 0) }),
        None => PASS,
    };
    let action = finish(&ctx, result);
    trace(&ctx, "from_net", is_ip.then_some(&dst), action);
    action
}

/// Replies of connections the kernel NATed go to the kernel, which translates them
/// back; everything else takes `redirect`.
#[inline(always)]
fn redirect_unless_nat_reply(ctx: &TcContext, redirect: impl FnOnce() -> i64) -> i64 {
    if nat_reply(ctx) {
        PASS
    } else {
        redirect()
    }
}

/// Never changes the packet's fate: only remembers the replies of marked packets.
#[classifier]
pub fn nat_track(ctx: TcContext) -> i32 {
    // SAFETY: reading the context's own fields.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    let mut flow = FlowKey::default();
    if mark & NAT_MARK != 0 && read_flow(&ctx, &mut flow).is_some() {
        let _ = VELOX_NAT_FLOWS.insert(&flow.reversed(), &ifindex, 0);
    }
    TC_ACT_OK
}

/// Whether the packet answers a connection the kernel NATed: it must go to the kernel.
#[inline(always)]
fn nat_reply(ctx: &TcContext) -> bool {
    let mut flow = FlowKey::default();
    read_flow(ctx, &mut flow).is_some() && unsafe { VELOX_NAT_FLOWS.get(&flow) }.is_some()
}

/// Fills `flow` (zeroed by the caller) from an IPv4 or IPv6 packet. Written field by
/// field into one zeroed key: a key built from tuples or options would carry padding
/// bytes, which LLVM fills with whatever a register holds and the verifier refuses.
/// IPv6 extension headers are not walked: such a packet's ports read as 0 on both
/// directions alike.
#[inline(always)]
fn read_flow(ctx: &TcContext, flow: &mut FlowKey) -> Option<()> {
    let eth = header_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    let l4 = if ether_type == EtherType::Ipv4 as u16 {
        let ip = unsafe { &*header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? };
        flow.src = IpKey::v4(ip.src_addr);
        flow.dst = IpKey::v4(ip.dst_addr);
        flow.proto = ip.proto as u8;
        EthHdr::LEN + usize::from(ip.ihl()) // already in bytes
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip = unsafe { &*header_at::<Ipv6Hdr>(ctx, EthHdr::LEN)? };
        flow.src = IpKey::v6(ip.src_addr);
        flow.dst = IpKey::v6(ip.dst_addr);
        flow.proto = ip.next_hdr;
        EthHdr::LEN + Ipv6Hdr::LEN
    } else {
        return None;
    };
    if matches!(flow.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        let ports = unsafe { &*header_at::<[u16; 2]>(ctx, l4)? };
        flow.sport = ports[0];
        flow.dport = ports[1];
    }
    Some(())
}

/// One debug line per IP packet. The loader sets aya-log's level at load time (off
/// unless `--datapath-log-level` says otherwise); the verifier then removes this
/// code from the hot path altogether.
#[inline(always)]
fn trace(ctx: &TcContext, program: &str, dst: Option<&IpKey>, action: i32) {
    if let Some(dst) = dst {
        debug!(
            ctx,
            "{}: to {:i} on ifindex {}: action {}",
            program,
            dst.addr,
            unsafe { (*ctx.skb.skb).ifindex },
            action
        );
    }
}

/// Writes the destination of an IPv4 or IPv6 packet into `dst`. False for what only
/// the kernel handles: ARP, IPv6 neighbour discovery, anything not IP.
#[inline(always)]
fn read_destination(ctx: &TcContext, dst: &mut IpKey) -> bool {
    let Some(eth) = header_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        *dst = IpKey::v4(unsafe { (*ip).dst_addr });
        return true;
    }
    if ether_type != EtherType::Ipv6 as u16 {
        return false;
    }
    let Some(ip) = header_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    if unsafe { (*ip).next_hdr } == IPPROTO_ICMPV6 {
        let is_ndp =
            header_at::<u8>(ctx, EthHdr::LEN + Ipv6Hdr::LEN).is_some_and(|t| NDP_TYPES.contains(unsafe { &*t }));
        if is_ndp {
            return false;
        }
    }
    *dst = IpKey::v6(unsafe { (*ip).dst_addr });
    true
}

#[inline(always)]
fn to_peer_node(peer: &Peer) -> i64 {
    // The kernel's neighbour table fills in the Ethernet header for the peer node.
    let addr = peer.node_ip.addr;
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // Zeroed first: an IPv4 next hop leaves 12 bytes of the union unwritten, and
    // LLVM would fill them from whatever register, which the verifier refuses.
    // SAFETY: all-zero is a valid bpf_redir_neigh.
    let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    next_hop.nh_family = peer.family;
    if peer.family == AF_INET {
        next_hop.__bindgen_anon_1.ipv4_nh = word(12);
    } else {
        next_hop.__bindgen_anon_1.ipv6_nh = [word(0), word(4), word(8), word(12)];
    }
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    unsafe { bpf_redirect_neigh(peer.ifindex, &mut next_hop, size, 0) }
}

#[inline(always)]
fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *const T)
}

/// Counts the verdict and returns the TC action for a redirect's `result`, or `PASS`.
#[inline(always)]
fn finish(ctx: &TcContext, result: i64) -> i32 {
    let action = match result {
        PASS => TC_ACT_OK,
        result if result == TC_ACT_REDIRECT as i64 => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT, // the kernel refused the redirect
    };
    if let Some(counters) = counters_of(unsafe { (*ctx.skb.skb).ifindex }) {
        // SAFETY: a per-CPU value; only this CPU writes it while we run.
        let counters = unsafe { &mut *counters };
        let bytes = ctx.len() as u64;
        match action {
            TC_ACT_REDIRECT => {
                counters.redirected_packets += 1;
                counters.redirected_bytes += bytes;
            }
            TC_ACT_OK => {
                counters.passed_packets += 1;
                counters.passed_bytes += bytes;
            }
            _ => counters.dropped_packets += 1,
        }
    }
    action
}

#[inline(always)]
fn counters_of(ifindex: u32) -> Option<*mut EndpointCounters> {
    if let Some(counters) = VELOX_COUNTERS.get_ptr_mut(ifindex) {
        return Some(counters);
    }
    let _ = VELOX_COUNTERS.insert(ifindex, EndpointCounters::default(), BPF_NOEXIST as u64);
    VELOX_COUNTERS.get_ptr_mut(ifindex)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
