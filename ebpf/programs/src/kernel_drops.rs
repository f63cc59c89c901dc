//! Drops of pod traffic the kernel makes outside Velox's programs, with its own
//! reason: `kernel_drops` on the `kfree_skb` tracepoint reads the dropped packet's
//! IP header through the `sk_buff` layout the loader resolved from the kernel's BTF,
//! and records it like a datapath drop when either end is a pod of the cluster.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use core::ptr::read_volatile;
use velox_common::{
    FlowEnd, FlowEvent, IpKey, SkbLayout, EVENT_KERNEL_DROP, FORWARDED, IPPROTO_TCP, IPPROTO_UDP, KERNEL_DROP,
};

use crate::forward::{local_endpoint, peer_node};
use crate::verdict::{emit, events_wanted_at, within_budget};

/// Set by the loader before the programs load; all zero records nothing.
#[no_mangle]
static VELOX_SKB_LAYOUT: SkbLayout = SkbLayout {
    head: 0,
    network_header: 0,
    protocol: 0,
    dev: 0,
    dev_ifindex: 0,
    dev_net: 0,
    net_inum: 0,
    netns: 0,
    skipped: [0; 2],
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// `kfree_skb(skb, location, reason, rx_sk)`.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kernel_drops(ctx: RawTracePointContext) -> i32 {
    let _ = record(&ctx);
    0
}

/// `*(base + offset)` as a `T`, from kernel memory.
#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: the helper checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

#[inline(always)]
fn record(ctx: &RawTracePointContext) -> Option<()> {
    // Nothing is read while no one wants records: a drop costs a map lookup then.
    // SAFETY: a helper without arguments.
    let now = events_wanted_at(unsafe { bpf_ktime_get_ns() })?;
    // SAFETY: a global the loader sets before the program loads.
    let layout = unsafe { read_volatile(&VELOX_SKB_LAYOUT) };
    let reason: u64 = ctx.arg(2);
    // A value that would spill into the event's flag bits is none the loader names.
    if layout.netns == 0 || reason >= u64::from(FORWARDED) {
        return None;
    }
    let reason = reason as u32;
    if reason == layout.skipped[0] || reason == layout.skipped[1] {
        return None;
    }
    let skb: u64 = ctx.arg(0);
    let dev: u64 = read(skb, layout.dev)?;
    if dev == 0 {
        return None;
    }
    let net: u64 = read(dev, layout.dev_net)?;
    if read::<u32>(net, layout.net_inum)? != layout.netns {
        return None;
    }
    let head: u64 = read(skb, layout.head)?;
    let network: u16 = read(skb, layout.network_header)?;
    let ip = head + u64::from(network);
    let protocol = u16::from_be(read(skb, layout.protocol)?);
    let (src, dst, proto, layer4) = if protocol == ETH_P_IP {
        let header: [u8; 20] = read(ip, 0)?;
        let src = IpKey::v4([header[12], header[13], header[14], header[15]]);
        let dst = IpKey::v4([header[16], header[17], header[18], header[19]]);
        (src, dst, header[9], u32::from(header[0] & 0x0f) * 4)
    } else if protocol == ETH_P_IPV6 {
        let next_header: u8 = read(ip, 6)?;
        (IpKey::v6(read(ip, 8)?), IpKey::v6(read(ip, 24)?), next_header, 40)
    } else {
        return None;
    };
    if !is_pod(&src) && !is_pod(&dst) {
        return None;
    }
    // Network byte order, as the datapath's ends hold ports.
    let ports: [u16; 2] = match proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        true => read(ip, layer4)?,
        false => [0, 0],
    };
    let end = |addr, port| FlowEnd {
        addr,
        port,
        proto,
        pad: 0,
    };
    let (src, dst) = (end(src, ports[0]), end(dst, ports[1]));
    let ifindex = read(dev, layout.dev_ifindex)?;
    if !within_budget(&src.addr, EVENT_KERNEL_DROP, now) {
        return None;
    }
    emit(&FlowEvent {
        src,
        dst,
        ifindex,
        reason: KERNEL_DROP | reason,
        ..FlowEvent::default()
    });
    Some(())
}

/// A pod of this node, or an address in another node's pod CIDRs.
#[inline(always)]
fn is_pod(addr: &IpKey) -> bool {
    local_endpoint(addr).exists() || peer_node(addr).is_some()
}
