//! Velox's TC programs, IPv4 and IPv6 alike.
//! - `from_pod`, on the ingress of every host-side pod veth: a local pod gets the
//!   packet with `bpf_redirect_peer`, a pod on another node with `bpf_redirect_neigh`
//!   out of the uplink; everything else goes to the kernel.
//! - `from_net`, on the ingress of the node's uplink: a local pod gets it with
//!   `bpf_redirect_peer`; everything else goes to the kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuHashMap},
    helpers::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use velox_common::{Endpoint, EndpointCounters, IpKey, Peer, AF_INET, MAX_ENDPOINTS, MAX_PEERS};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<IpKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 16], Peer, MAX_PEERS> = LpmTrie::new();

#[btf_map]
static VELOX_COUNTERS: PerCpuHashMap<u32, EndpointCounters, MAX_ENDPOINTS> = PerCpuHashMap::new();

const IPPROTO_ICMPV6: u8 = 58;
/// Router solicitation .. redirect: neighbour discovery is the kernel's business.
const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=137;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let dst = destination(&ctx);
    let action = finish(
        &ctx,
        dst.and_then(|dst| to_local_pod(&dst).or_else(|| to_peer_node(&dst))),
    );
    trace(&ctx, "from_pod", dst, action);
    action
}

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let dst = destination(&ctx);
    let action = finish(&ctx, dst.and_then(|dst| to_local_pod(&dst)));
    trace(&ctx, "from_net", dst, action);
    action
}

/// One debug line per IP packet. The loader sets aya-log's level at load time (off
/// unless `--datapath-log-level` says otherwise); the verifier then removes this
/// code from the hot path altogether.
#[inline(always)]
fn trace(ctx: &TcContext, program: &str, dst: Option<IpKey>, action: i32) {
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

/// The destination of an IPv4 or IPv6 packet as a map key. `None` for what only the
/// kernel handles: ARP, IPv6 neighbour discovery, anything not IP.
#[inline(always)]
fn destination(ctx: &TcContext) -> Option<IpKey> {
    let eth = header_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        let ip = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        return Some(IpKey::v4(unsafe { (*ip).dst_addr }));
    }
    if ether_type != EtherType::Ipv6 as u16 {
        return None;
    }
    let ip = header_at::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
    if unsafe { (*ip).next_hdr } == IPPROTO_ICMPV6 {
        let icmp_type = header_at::<u8>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
        if NDP_TYPES.contains(unsafe { &*icmp_type }) {
            return None;
        }
    }
    Some(IpKey::v6(unsafe { (*ip).dst_addr }))
}

#[inline(always)]
fn to_local_pod(dst: &IpKey) -> Option<i64> {
    let endpoint = unsafe { VELOX_ENDPOINTS.get(dst) }?;
    Some(unsafe { bpf_redirect_peer(endpoint.ifindex, 0) })
}

#[inline(always)]
fn to_peer_node(dst: &IpKey) -> Option<i64> {
    let peer = VELOX_PEERS.get(&Key::new(128, dst.addr))?;
    // The kernel's neighbour table fills in the Ethernet header for the peer node.
    let addr = peer.node_ip.addr;
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let mut next_hop = bpf_redir_neigh {
        nh_family: peer.family,
        __bindgen_anon_1: if peer.family == AF_INET {
            bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: word(12) }
        } else {
            bpf_redir_neigh__bindgen_ty_1 {
                ipv6_nh: [word(0), word(4), word(8), word(12)],
            }
        },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    Some(unsafe { bpf_redirect_neigh(peer.ifindex, &mut next_hop, size, 0) })
}

#[inline(always)]
fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *const T)
}

/// Counts the verdict and returns the TC action. `None`: not ours, the kernel decides.
#[inline(always)]
fn finish(ctx: &TcContext, redirect: Option<i64>) -> i32 {
    let action = match redirect {
        Some(result) if result == TC_ACT_REDIRECT as i64 => TC_ACT_REDIRECT,
        Some(_) => TC_ACT_SHOT, // the kernel refused the redirect
        None => TC_ACT_OK,
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
