//! Velox's TC programs. `from_pod` runs on the ingress of every host-side pod veth.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT},
    btf_maps::{HashMap, PerCpuHashMap},
    helpers::bpf_redirect_peer,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use velox_common::{Endpoint, EndpointCounters, EndpointKey, MAX_ENDPOINTS};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<EndpointKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_COUNTERS: PerCpuHashMap<u32, EndpointCounters, MAX_ENDPOINTS> = PerCpuHashMap::new();

enum Verdict {
    Redirected,
    Passed,
    Dropped,
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (verdict, action) = match forward(&ctx) {
        Some(action) if action == TC_ACT_REDIRECT as i64 => (Verdict::Redirected, TC_ACT_REDIRECT),
        Some(_) => (Verdict::Dropped, aya_ebpf::bindings::TC_ACT_SHOT),
        None => (Verdict::Passed, TC_ACT_OK),
    };
    count(&ctx, verdict);
    action
}

/// Redirects IPv4 traffic for a local pod; `None` leaves the packet to the kernel.
#[inline(always)]
fn forward(ctx: &TcContext) -> Option<i64> {
    let eth = header_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `header_at` checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    let key = EndpointKey {
        ipv4: unsafe { (*ip).dst_addr },
    };
    let endpoint = unsafe { VELOX_ENDPOINTS.get(&key) }?;
    // The frame was addressed to our veth; re-address it so the pod sees a frame for
    // itself from its gateway, as if the host had routed it.
    unsafe {
        (*eth).dst_addr = endpoint.pod_mac;
        (*eth).src_addr = endpoint.host_mac;
    }
    Some(unsafe { bpf_redirect_peer(endpoint.ifindex, 0) })
}

#[inline(always)]
fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
fn count(ctx: &TcContext, verdict: Verdict) {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let counters = match VELOX_COUNTERS.get_ptr_mut(ifindex) {
        Some(counters) => counters,
        None => {
            let _ = VELOX_COUNTERS.insert(ifindex, EndpointCounters::default(), BPF_NOEXIST as u64);
            match VELOX_COUNTERS.get_ptr_mut(ifindex) {
                Some(counters) => counters,
                None => return,
            }
        }
    };
    let bytes = ctx.len() as u64;
    // SAFETY: per-CPU value, only this CPU writes it while we run.
    let counters = unsafe { &mut *counters };
    match verdict {
        Verdict::Redirected => {
            counters.redirected_packets += 1;
            counters.redirected_bytes += bytes;
        }
        Verdict::Passed => {
            counters.passed_packets += 1;
            counters.passed_bytes += bytes;
        }
        Verdict::Dropped => counters.dropped_packets += 1,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
