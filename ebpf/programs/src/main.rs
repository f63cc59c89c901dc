//! Velox's TC programs.
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
    ip::Ipv4Hdr,
};
use velox_common::{Endpoint, EndpointCounters, EndpointKey, Peer, MAX_ENDPOINTS, MAX_PEERS};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<EndpointKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 4], Peer, MAX_PEERS> = LpmTrie::new();

#[btf_map]
static VELOX_COUNTERS: PerCpuHashMap<u32, EndpointCounters, MAX_ENDPOINTS> = PerCpuHashMap::new();

const AF_INET: u32 = 2;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let dst = ipv4(&ctx);
    let action = finish(
        &ctx,
        dst.and_then(|dst| to_local_pod(dst).or_else(|| to_peer_node(dst))),
    );
    trace(&ctx, "from_pod", dst, action);
    action
}

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let dst = ipv4(&ctx);
    let action = finish(&ctx, dst.and_then(to_local_pod));
    trace(&ctx, "from_net", dst, action);
    action
}

/// One debug line per IPv4 packet. The loader sets aya-log's level at load time (off
/// unless `--datapath-log-level` says otherwise); the verifier then removes this
/// code from the hot path altogether.
#[inline(always)]
fn trace(ctx: &TcContext, program: &str, dst: Option<[u8; 4]>, action: i32) {
    if let Some(dst) = dst {
        debug!(
            ctx,
            "{}: to {:i} on ifindex {}: action {}",
            program,
            u32::from_be_bytes(dst),
            unsafe { (*ctx.skb.skb).ifindex },
            action
        );
    }
}

/// The IPv4 destination of an IPv4 packet.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<[u8; 4]> {
    let eth = header_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `header_at` checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    Some(unsafe { (*ip).dst_addr })
}

#[inline(always)]
fn to_local_pod(dst: [u8; 4]) -> Option<i64> {
    let endpoint = unsafe { VELOX_ENDPOINTS.get(&EndpointKey { ipv4: dst }) }?;
    Some(unsafe { bpf_redirect_peer(endpoint.ifindex, 0) })
}

#[inline(always)]
fn to_peer_node(dst: [u8; 4]) -> Option<i64> {
    let peer = VELOX_PEERS.get(&Key::new(32, dst))?;
    // The kernel's neighbour table fills in the Ethernet header for the peer node.
    let mut next_hop = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(peer.node_ip),
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
