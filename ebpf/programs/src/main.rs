//! Velox's TC programs, IPv4 and IPv6 alike.
//! - `from_pod`, on the ingress of every host-side pod veth: a local pod gets the
//!   packet with `bpf_redirect_peer`, a pod on another node with `bpf_redirect_neigh`
//!   out of the uplink; everything else goes to the kernel.
//! - `from_net`, on the ingress of the node's uplink: a local pod gets it with
//!   `bpf_redirect_peer`; everything else goes to the kernel.
//!
//! A connection a pod opens to something that is not a pod (a Service, a node IP's
//! hostPort or NodePort, a host, the outside) goes to the kernel, which may NAT it.
//! The pod's end of it is then recorded, and packets to that end, which may be
//! replies the kernel must translate back, go to the kernel too: a redirect would
//! skip the reverse NAT and break the connection. Plain pod-to-pod traffic never
//! goes to the kernel, so it keeps the fast path; so do connections *to* a pod's
//! server port, whatever else that port answers (a kubelet probe, a NodePort).
#![no_std]
#![no_main]

mod socket_lb;

use aya_ebpf::{
    bindings::{
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_redir_neigh, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
    helpers::{bpf_check_mtu, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use velox_common::{
    Endpoint, EndpointCounters, FlowEnd, IpKey, Peer, AF_INET, DEFAULT_KERNEL_FLOWS, IPPROTO_TCP, IPPROTO_UDP,
    MAX_ENDPOINTS, MAX_PEERS,
};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<IpKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 16], Peer, MAX_PEERS> = LpmTrie::new();

/// Allocated as interfaces first send, not preallocated for every possible pod on
/// every CPU.
#[btf_map]
static VELOX_COUNTERS: PerCpuHashMap<u32, EndpointCounters, MAX_ENDPOINTS, { BPF_F_NO_PREALLOC as usize }> =
    PerCpuHashMap::new();

/// Pod connection ends whose traffic went to the kernel -> the ifindex it was seen on.
/// The loader sizes it from `nf_conntrack_max`: conntrack holds no more connections,
/// and lookups keep the ends of live connections from being evicted.
#[btf_map]
static VELOX_KERNEL_FLOWS: LruHashMap<FlowEnd, u32, { DEFAULT_KERNEL_FLOWS as usize }> = LruHashMap::new();

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 echo request and reply: their identifier stands for a port.
const ICMP_ECHO: [u8; 4] = [8, 0, 128, 129];
const ICMP_ECHO_REQUEST: [u8; 2] = [8, 128];
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Router solicitation .. redirect: neighbour discovery is the kernel's business.
const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=137;

// The programs keep to plain values and `Option<&T>`: an `Option` or enum holding a
// value leaves its payload undefined when empty, LLVM then copies whatever a register
// holds, and the verifier refuses to read such a register.

/// Not for the datapath to deliver: the kernel decides.
const PASS: i64 = -1;
/// Dropped: a pod sent it from an address that is not its own.
const SPOOFED: i64 = -2;
/// Dropped: the pod's interface is gone, its map entry not yet.
const NO_INTERFACE: i64 = -4;
/// `bpf_check_mtu` for an ifindex that names no interface.
const ENODEV: i64 = 19;

/// `__sk_buff.pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (mut src, mut dst) = (IpKey::default(), IpKey::default());
    let is_ip = read_addresses(&ctx, &mut src, &mut dst);
    let result = if !is_ip {
        PASS
    } else if !sent_by_this_pod(&ctx, &src) {
        // Link-local and unspecified sources (neighbour discovery, MLD, DAD) stay on
        // the link: the kernel never forwards them, and neither does the fast path.
        if is_link_local(&src) {
            PASS
        } else {
            SPOOFED
        }
    } else if let Some(endpoint) = unsafe { VELOX_ENDPOINTS.get(&dst) } {
        redirect_unless_kernel_flow(&ctx, || to_local_pod(&ctx, endpoint))
    } else if let Some(peer) = VELOX_PEERS.get(&Key::new(128, dst.addr)) {
        // `bpf_redirect_neigh` neither fragments nor reports the path MTU: a packet (or
        // a GSO segment) too big for the uplink goes to the kernel, which does both.
        if fits_uplink(&ctx, peer) {
            redirect_unless_kernel_flow(&ctx, || to_peer_node(peer))
        } else {
            PASS
        }
    } else {
        remember_kernel_flow(&ctx);
        PASS
    };
    #[cfg(feature = "upgrade-test")]
    let result = if is_ip && to_discard_port(&ctx) {
        TEST_DROPPED
    } else {
        result
    };
    let action = finish(&ctx, result);
    trace(&ctx, "from_pod", is_ip.then_some(&dst), action);
    action
}

/// Dropped by the upgrade test's datapath.
#[cfg(feature = "upgrade-test")]
const TEST_DROPPED: i64 = -3;

/// UDP to port 9: what the upgrade test's datapath drops, so a test sees which
/// program a pod's link runs.
#[cfg(feature = "upgrade-test")]
#[inline(always)]
fn to_discard_port(ctx: &TcContext) -> bool {
    let mut dst = FlowEnd::default();
    read_end(ctx, End::Destination, &mut dst).is_some() && dst.proto == IPPROTO_UDP && dst.port == 9u16.to_be()
}

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let (mut src, mut dst) = (IpKey::default(), IpKey::default());
    // Only untagged frames addressed to this node are the fast path's: a VLAN, or a
    // frame an uplink in promiscuous mode saw for another host, is the kernel's.
    // SAFETY: reading the context's own fields.
    let (pkt_type, vlan) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).vlan_present) };
    let is_ip = pkt_type == PACKET_HOST && vlan == 0 && read_addresses(&ctx, &mut src, &mut dst);
    let result = if !is_ip {
        PASS
    } else if let Some(endpoint) = unsafe { VELOX_ENDPOINTS.get(&dst) } {
        redirect_unless_kernel_flow(&ctx, || to_local_pod(&ctx, endpoint))
    } else {
        // A pod on another node reaching this node (a hostPort, a NodePort): the kernel
        // may send its replies back through the fast path of this node.
        let mut client = FlowEnd::default();
        let opens = read_end(&ctx, End::Source, &mut client) == Some(true);
        if opens && VELOX_PEERS.get(&Key::new(128, src.addr)).is_some() {
            remember(&ctx, &client);
        }
        PASS
    };
    let action = finish(&ctx, result);
    trace(&ctx, "from_net", is_ip.then_some(&dst), action);
    action
}

/// Into the pod behind `endpoint`'s host veth. `bpf_redirect_peer` takes any ifindex
/// and the kernel drops the packet later where nobody counts it, so a pod whose
/// interface vanished (its netns went, the loader has not seen it yet) is a drop here.
#[inline(always)]
fn to_local_pod(ctx: &TcContext, endpoint: &Endpoint) -> i64 {
    let mut mtu = 0u32;
    // SAFETY: the context is a live sk_buff; `mtu` is ours to write. A lookup of the
    // interface by index: no MTU verdict is asked for (flags 0, length 0).
    let exists = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, endpoint.ifindex, &mut mtu, 0, 0) } != -ENODEV;
    if exists {
        unsafe { bpf_redirect_peer(endpoint.ifindex, 0) }
    } else {
        NO_INTERFACE
    }
}

/// Packets to a connection end whose traffic went to the kernel go to the kernel: they
/// may be replies it must translate back. Everything else takes `redirect`.
#[inline(always)]
fn redirect_unless_kernel_flow(ctx: &TcContext, redirect: impl FnOnce() -> i64) -> i64 {
    let mut dst = FlowEnd::default();
    if read_end(ctx, End::Destination, &mut dst).is_some() && unsafe { VELOX_KERNEL_FLOWS.get(&dst) }.is_some() {
        PASS
    } else {
        redirect()
    }
}

/// Records the source end of a connection the packet opens, as the kernel carries it.
#[inline(always)]
fn remember_kernel_flow(ctx: &TcContext) {
    let mut src = FlowEnd::default();
    if read_end(ctx, End::Source, &mut src) == Some(true) {
        remember(ctx, &src);
    }
}

/// Adds `end` once; later lookups keep it from eviction while its connection lives.
#[inline(always)]
fn remember(ctx: &TcContext, end: &FlowEnd) {
    if unsafe { VELOX_KERNEL_FLOWS.get(end) }.is_none() {
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let _ = VELOX_KERNEL_FLOWS.insert(end, ifindex, BPF_NOEXIST as u64);
    }
}

/// Which end of a packet's connection to read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Writes one end of an IPv4 or IPv6 packet into `end` (zeroed by the caller), field
/// by field: a key built from tuples or options would carry padding bytes, which LLVM
/// fills from whatever register and the verifier refuses. IPv6 extension headers are
/// not walked: such a packet's port reads as 0, in both directions alike.
///
/// `None` for a packet that is not IP; else whether it may open a connection: a TCP
/// SYN, an ICMP echo request, any UDP or SCTP datagram (which cannot tell). Other
/// protocols (IPv6 extension headers among them) open none that Velox can follow.
#[inline(always)]
fn read_end(ctx: &TcContext, which: End, end: &mut FlowEnd) -> Option<bool> {
    let source = which == End::Source;
    let eth = header_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    let l4 = if ether_type == EtherType::Ipv4 as u16 {
        let ip = unsafe { &*header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? };
        end.addr = IpKey::v4(if source { ip.src_addr } else { ip.dst_addr });
        end.proto = ip.proto as u8;
        EthHdr::LEN + usize::from(ip.ihl()) // ihl() is in bytes
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip = unsafe { &*header_at::<Ipv6Hdr>(ctx, EthHdr::LEN)? };
        end.addr = IpKey::v6(if source { ip.src_addr } else { ip.dst_addr });
        end.proto = ip.next_hdr;
        EthHdr::LEN + Ipv6Hdr::LEN
    } else {
        return None;
    };
    let mut opens = false;
    match end.proto {
        IPPROTO_TCP => {
            // source port, destination port, sequence, acknowledgement, offset, flags
            if let Some(tcp) = header_at::<[u8; 14]>(ctx, l4) {
                let tcp = unsafe { &*tcp };
                let ports = if source { [tcp[0], tcp[1]] } else { [tcp[2], tcp[3]] };
                end.port = u16::from_ne_bytes(ports);
                opens = tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            if let Some(ports) = header_at::<[u16; 2]>(ctx, l4) {
                let ports = unsafe { &*ports };
                end.port = if source { ports[0] } else { ports[1] };
                opens = true;
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, identifier: an echo and its reply share the identifier.
            if let Some(icmp) = header_at::<[u8; 6]>(ctx, l4) {
                let icmp = unsafe { &*icmp };
                if ICMP_ECHO.contains(&icmp[0]) {
                    end.port = u16::from_ne_bytes([icmp[4], icmp[5]]);
                }
                opens = ICMP_ECHO_REQUEST.contains(&icmp[0]);
            }
        }
        _ => {}
    }
    Some(opens)
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

/// Whether the packet, or each of its GSO segments, fits the uplink's MTU. A plain
/// packet within the MTU the loader recorded fits without asking the kernel.
#[inline(always)]
fn fits_uplink(ctx: &TcContext, peer: &Peer) -> bool {
    // SAFETY: reading the context's own fields.
    let (len, gso_size) = unsafe { ((*ctx.skb.skb).len, (*ctx.skb.skb).gso_size) };
    if gso_size == 0 && len <= peer.mtu + EthHdr::LEN as u32 {
        return true;
    }
    let mut mtu = 0u32;
    // SAFETY: the context is a live sk_buff; `mtu` is ours to write.
    unsafe {
        bpf_check_mtu(
            ctx.skb.skb as *mut _,
            peer.ifindex,
            &mut mtu,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        ) == 0
    }
}

/// Whether `src` is one of the addresses of the pod behind this host veth.
#[inline(always)]
fn sent_by_this_pod(ctx: &TcContext, src: &IpKey) -> bool {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { VELOX_ENDPOINTS.get(src) }.is_some_and(|endpoint| endpoint.ifindex == ifindex)
}

/// An IPv6 link-local (fe80::/10) or unspecified (::) address.
#[inline(always)]
fn is_link_local(addr: &IpKey) -> bool {
    (addr.addr[0] == 0xfe && addr.addr[1] & 0xc0 == 0x80) || addr.addr == [0; 16]
}

/// Writes the source and destination of an IPv4 or IPv6 packet. False for what only
/// the kernel handles: ARP, IPv6 neighbour discovery, anything not IP.
#[inline(always)]
fn read_addresses(ctx: &TcContext, src: &mut IpKey, dst: &mut IpKey) -> bool {
    let Some(eth) = header_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        *src = IpKey::v4(unsafe { (*ip).src_addr });
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
    *src = IpKey::v6(unsafe { (*ip).src_addr });
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

/// Counts the verdict and returns the TC action for a redirect's `result`, `PASS`
/// or a drop (`SPOOFED`, `NO_INTERFACE`).
#[inline(always)]
fn finish(ctx: &TcContext, result: i64) -> i32 {
    let action = match result {
        PASS => TC_ACT_OK,
        result if result == TC_ACT_REDIRECT as i64 => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT, // spoofed, or the kernel refused the redirect
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
            _ => {
                counters.dropped_packets += 1;
                match result {
                    SPOOFED => counters.dropped_spoofed += 1,
                    NO_INTERFACE => counters.dropped_no_interface += 1,
                    _ => {}
                }
            }
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
