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

mod policy;
mod socket_lb;

use aya_ebpf::{
    bindings::{
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_redir_neigh, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use policy::{police, Verdict, ALLOWED, DENIED_EGRESS, DENIED_INGRESS};
use velox_common::{
    Endpoint, EndpointCounters, FlowEnd, FlowEvent, IpKey, Peer, AF_INET, DEFAULT_KERNEL_FLOWS, DROP_NO_INTERFACE,
    DROP_POLICY_EGRESS, DROP_POLICY_INGRESS, DROP_REDIRECT_FAILED, DROP_SPOOFED, EVENTS_BYTES, IPPROTO_SCTP,
    IPPROTO_TCP, IPPROTO_UDP, MAX_ENDPOINTS, MAX_PEERS, UPLINK_SLOT, VERDICT_ALLOWED,
};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<IpKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 16], Peer, MAX_PEERS> = LpmTrie::new();

/// Indexed by counters slot. The loader sizes it by `--max-pods`: an array is
/// allocated whole, on every CPU.
#[btf_map]
static VELOX_COUNTERS: PerCpuArray<EndpointCounters, MAX_ENDPOINTS> = PerCpuArray::new();

/// Drops and policy verdicts, for `velox-loader monitor`; written only while one listens.
#[btf_map]
static VELOX_EVENTS: RingBuf<FlowEvent, EVENTS_BYTES> = RingBuf::new();

/// Until when (`bpf_ktime_get_ns`) a monitor listens.
#[btf_map]
static VELOX_MONITOR: Array<u64, 1> = Array::new();

/// Host veth -> counters slot, for what the source lookup cannot attribute.
#[btf_map]
static VELOX_INTERFACES: HashMap<u32, u32, MAX_ENDPOINTS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Pod connection ends whose traffic went to the kernel -> the ifindex it was seen on.
/// The loader sizes it from `nf_conntrack_max`: conntrack holds no more connections,
/// and lookups keep the ends of live connections from being evicted.
#[btf_map]
static VELOX_KERNEL_FLOWS: LruHashMap<FlowEnd, u32, { DEFAULT_KERNEL_FLOWS as usize }> = LruHashMap::new();

const IPPROTO_ICMP: u8 = 1;
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

/// What the programs read of an IP packet, parsed once.
#[derive(Default)]
pub struct Packet {
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// Whether the packet may open a connection: a TCP SYN, an ICMP echo request,
    /// any UDP or SCTP datagram (which cannot tell). Other protocols (IPv6 extension
    /// headers among them) open none that Velox can follow.
    pub opens: bool,
}

/// The counters slot of an interface Velox does not know.
pub const NO_SLOT: u32 = u32::MAX;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let mut packet = Packet::default();
    let is_ip = parse(&ctx, &mut packet);
    // SAFETY: reading the context's own fields.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The sender's own entry: one lookup proves its source address and gives its
    // counters slot.
    let sender = match is_ip {
        true => unsafe { VELOX_ENDPOINTS.get(&packet.src.addr) }.filter(|sender| sender.ifindex == ifindex),
        false => None,
    };
    let mut verdict = Verdict::default();
    let result = if !is_ip {
        PASS
    } else if sender.is_none() {
        // Link-local and unspecified sources (neighbour discovery, MLD, DAD) stay on
        // the link: the kernel never forwards them, and neither does the fast path.
        if is_link_local(&packet.src.addr) {
            PASS
        } else {
            SPOOFED
        }
    } else if is_kernel_flow(&packet) {
        PASS
    } else {
        let local = unsafe { VELOX_ENDPOINTS.get(&packet.dst.addr) };
        let sender_slot = sender.map_or(NO_SLOT, |sender| sender.slot);
        police(
            &ctx,
            &packet,
            sender_slot,
            local.map_or(NO_SLOT, |e| e.slot),
            &mut verdict,
        );
        if verdict.result != ALLOWED {
            verdict.result
        } else if let Some(endpoint) = local {
            to_local_pod(&ctx, endpoint)
        } else if let Some(peer) = VELOX_PEERS.get(&Key::new(128, packet.dst.addr.addr)) {
            // `bpf_redirect_neigh` neither fragments nor reports the path MTU: a packet
            // (or a GSO segment) too big for the uplink goes to the kernel, which does both.
            if fits_uplink(&ctx, peer) {
                to_peer_node(peer)
            } else {
                PASS
            }
        } else {
            if packet.opens {
                remember(ifindex, &packet.src);
            }
            PASS
        }
    };
    #[cfg(feature = "upgrade-test")]
    let result = if is_ip && packet.dst.proto == IPPROTO_UDP && packet.dst.port == DISCARD_PORT.to_be() {
        TEST_DROPPED
    } else {
        result
    };
    let slot = match sender {
        Some(sender) => sender.slot,
        None => unsafe { VELOX_INTERFACES.get(&ifindex) }.map_or(NO_SLOT, |slot| *slot),
    };
    let action = finish(&ctx, &packet, slot, result, &verdict);
    trace(&ctx, "from_pod", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// Dropped by the upgrade test's datapath.
#[cfg(feature = "upgrade-test")]
const TEST_DROPPED: i64 = -3;

/// UDP to this port is what the upgrade test's datapath drops, so a test sees which
/// program a pod's link runs.
#[cfg(feature = "upgrade-test")]
const DISCARD_PORT: u16 = 9;

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let mut packet = Packet::default();
    // Only untagged frames addressed to this node are the fast path's: a VLAN, or a
    // frame an uplink in promiscuous mode saw for another host, is the kernel's.
    // SAFETY: reading the context's own fields.
    let (pkt_type, vlan, ifindex) = unsafe {
        (
            (*ctx.skb.skb).pkt_type,
            (*ctx.skb.skb).vlan_present,
            (*ctx.skb.skb).ifindex,
        )
    };
    let is_ip = pkt_type == PACKET_HOST && vlan == 0 && parse(&ctx, &mut packet);
    let mut verdict = Verdict::default();
    let result = if !is_ip {
        PASS
    } else if let Some(endpoint) = unsafe { VELOX_ENDPOINTS.get(&packet.dst.addr) } {
        if is_kernel_flow(&packet) {
            PASS
        } else {
            police(&ctx, &packet, NO_SLOT, endpoint.slot, &mut verdict);
            if verdict.result == ALLOWED {
                to_local_pod(&ctx, endpoint)
            } else {
                verdict.result
            }
        }
    } else {
        // A pod on another node reaching this node (a hostPort, a NodePort): the kernel
        // may send its replies back through the fast path of this node.
        if packet.opens && VELOX_PEERS.get(&Key::new(128, packet.src.addr.addr)).is_some() {
            remember(ifindex, &packet.src);
        }
        PASS
    };
    let action = finish(&ctx, &packet, UPLINK_SLOT, result, &verdict);
    trace(&ctx, "from_net", is_ip.then_some(&packet.dst.addr), action);
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
/// may be replies it must translate back. The kernel follows those connections, and
/// policy checked them when they opened.
#[inline(always)]
fn is_kernel_flow(packet: &Packet) -> bool {
    unsafe { VELOX_KERNEL_FLOWS.get(&packet.dst) }.is_some()
}

/// Adds `end`, first seen on `ifindex`, once; later lookups keep it from eviction
/// while its connection lives.
#[inline(always)]
fn remember(ifindex: u32, end: &FlowEnd) {
    if unsafe { VELOX_KERNEL_FLOWS.get(end) }.is_none() {
        let _ = VELOX_KERNEL_FLOWS.insert(end, ifindex, BPF_NOEXIST as u64);
    }
}

/// Reads both ends of an IPv4 or IPv6 packet into `packet` (zeroed by the caller),
/// field by field: a key built from tuples or options would carry padding bytes,
/// which LLVM fills from whatever register and the verifier refuses. IPv6 extension
/// headers are not walked: such a packet's ports read as 0, in both directions alike.
///
/// False for what only the kernel handles: ARP, IPv6 neighbour discovery, anything
/// not IP.
#[inline(always)]
fn parse(ctx: &TcContext, packet: &mut Packet) -> bool {
    let Some(eth) = header_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: `header_at` checked that each header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    let (l4, proto) = if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = header_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        let ip = unsafe { &*ip };
        packet.src.addr = IpKey::v4(ip.src_addr);
        packet.dst.addr = IpKey::v4(ip.dst_addr);
        (EthHdr::LEN + usize::from(ip.ihl()), ip.proto as u8) // ihl() is in bytes
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = header_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        let ip = unsafe { &*ip };
        packet.src.addr = IpKey::v6(ip.src_addr);
        packet.dst.addr = IpKey::v6(ip.dst_addr);
        (EthHdr::LEN + Ipv6Hdr::LEN, ip.next_hdr)
    } else {
        return false;
    };
    packet.src.proto = proto;
    packet.dst.proto = proto;
    match proto {
        IPPROTO_TCP => {
            // source port, destination port, sequence, acknowledgement, offset, flags
            if let Some(tcp) = header_at::<[u8; 14]>(ctx, l4) {
                let tcp = unsafe { &*tcp };
                packet.src.port = u16::from_ne_bytes([tcp[0], tcp[1]]);
                packet.dst.port = u16::from_ne_bytes([tcp[2], tcp[3]]);
                packet.opens = tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            if let Some(ports) = header_at::<[u16; 2]>(ctx, l4) {
                let ports = unsafe { &*ports };
                packet.src.port = ports[0];
                packet.dst.port = ports[1];
                packet.opens = true;
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, identifier: an echo and its reply share the identifier.
            if let Some(icmp) = header_at::<[u8; 6]>(ctx, l4) {
                let icmp = unsafe { &*icmp };
                if proto == IPPROTO_ICMPV6 && NDP_TYPES.contains(&icmp[0]) {
                    return false;
                }
                if ICMP_ECHO.contains(&icmp[0]) {
                    let identifier = u16::from_ne_bytes([icmp[4], icmp[5]]);
                    packet.src.port = identifier;
                    packet.dst.port = identifier;
                }
                packet.opens = ICMP_ECHO_REQUEST.contains(&icmp[0]);
            }
        }
        _ => {}
    }
    true
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

/// An IPv6 link-local (fe80::/10) or unspecified (::) address.
#[inline(always)]
fn is_link_local(addr: &IpKey) -> bool {
    (addr.addr[0] == 0xfe && addr.addr[1] & 0xc0 == 0x80) || addr.addr == [0; 16]
}

#[inline(always)]
fn to_peer_node(peer: &Peer) -> i64 {
    // The kernel's neighbour table fills in the Ethernet header for the peer node.
    let words = peer.node_ip.words();
    // Zeroed first: an IPv4 next hop leaves 12 bytes of the union unwritten, and
    // LLVM would fill them from whatever register, which the verifier refuses.
    // SAFETY: all-zero is a valid bpf_redir_neigh.
    let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    next_hop.nh_family = peer.family;
    if peer.family == AF_INET {
        next_hop.__bindgen_anon_1.ipv4_nh = words[3];
    } else {
        next_hop.__bindgen_anon_1.ipv6_nh = words;
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

/// Counts the verdict in counters `slot`, reports drops and the connections a policy
/// allowed to a listening monitor, and returns the TC action for a redirect's
/// `result`, `PASS` or a drop (`SPOOFED`, `NO_INTERFACE`, a policy's denial).
#[inline(always)]
fn finish(ctx: &TcContext, packet: &Packet, slot: u32, result: i64, verdict: &Verdict) -> i32 {
    let action = match result {
        PASS => TC_ACT_OK,
        result if result == TC_ACT_REDIRECT as i64 => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT, // spoofed, denied, or the kernel refused the redirect
    };
    if let Some(counters) = VELOX_COUNTERS.get_ptr_mut(slot) {
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
                    DENIED_EGRESS | DENIED_INGRESS => counters.dropped_policy += 1,
                    _ => {}
                }
            }
        }
    }
    let reason = match result {
        _ if action != TC_ACT_SHOT => VERDICT_ALLOWED,
        SPOOFED => DROP_SPOOFED,
        NO_INTERFACE => DROP_NO_INTERFACE,
        DENIED_EGRESS => DROP_POLICY_EGRESS,
        DENIED_INGRESS => DROP_POLICY_INGRESS,
        _ => DROP_REDIRECT_FAILED,
    };
    if (action == TC_ACT_SHOT || verdict.new_connection) && monitor_listens() {
        let event = FlowEvent {
            src: packet.src,
            dst: packet.dst,
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
            reason,
            egress_policy: verdict.egress_policy,
            ingress_policy: verdict.ingress_policy,
        };
        // A full buffer loses the event, never the packet's time.
        let _ = VELOX_EVENTS.output(&event, 0);
    }
    action
}

/// Whether a monitor listens: events cost nothing when none does.
#[inline(always)]
fn monitor_listens() -> bool {
    VELOX_MONITOR
        .get(0)
        .is_some_and(|until| unsafe { bpf_ktime_get_ns() } < *until)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
