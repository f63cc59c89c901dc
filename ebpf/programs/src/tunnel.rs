//! The VXLAN underlay, for peers that are not on this node's link: one
//! collect-metadata VXLAN device per node, no device per peer.
//! - Out: `from_pod` (and the NAT) redirect to the device; `to_tunnel`, on its egress,
//!   sets the tunnel key (the peer's underlay address) for everything that goes in,
//!   Velox's redirects and the kernel's routes alike, so there is one place that does.
//! - In: `from_tunnel`, on its ingress, admits only what another node of the cluster
//!   sent (the outer source) from its own pods or addresses (the inner source).

use aya_ebpf::{
    bindings::{bpf_tunnel_key, BPF_F_TUNINFO_IPV6},
    btf_maps::HashMap,
    helpers::{bpf_skb_change_type, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::btf_map,
    programs::TcContext,
};
use core::mem::{size_of, MaybeUninit};
use velox_common::{
    IpKey, NodeEntry, AF_INET, DEFAULT_VXLAN_PORT, IPPROTO_UDP, MAX_NODE_IPS, PEER_VXLAN, THIS_NODE, TUNNEL_VNI,
};

use crate::{
    forward::{local_endpoint, peer_node},
    parse::{zeroed_in, Packet},
};

/// Every other node's InternalIPs -> its id, and its tunnel remote if it is tunnelled.
#[btf_map]
static VELOX_NODES: HashMap<IpKey, NodeEntry, MAX_NODE_IPS> = HashMap::new();

/// The tunnel's UDP port: the loader sets it at load (`--vxlan-port`).
#[no_mangle]
static VELOX_VXLAN_PORT: u16 = DEFAULT_VXLAN_PORT;

/// `__sk_buff.pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;
const KEY_SIZE: u32 = size_of::<bpf_tunnel_key>() as u32;

/// No node: the value of [`sending_node`] for a sender that is not one.
pub const NO_NODE: u32 = 0;

/// Whether a packet from the network is the tunnel's own: UDP to its port on one of
/// this node's addresses. The kernel's VXLAN socket decapsulates it, and
/// `from_tunnel` judges what is inside; `from_net` has nothing to look up for it.
/// (UDP to that port of a pod is no such packet: it gets every check.)
#[inline(always)]
pub fn is_underlay_packet(packet: &Packet) -> bool {
    // SAFETY: a global the loader sets before the program loads; read as memory,
    // not folded into the code.
    let port = unsafe { core::ptr::read_volatile(&VELOX_VXLAN_PORT) };
    packet.dst.proto == IPPROTO_UDP && packet.dst.port == port.to_be() && node_of(&packet.dst.addr) == THIS_NODE
}

/// Sets the tunnel key for a packet to `dst`: a pod of a tunnelled peer, or a
/// tunnelled node's own address (what this node's pods send it: the kernel routes
/// those into the tunnel by their source). False when `dst` is neither.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, dst: &IpKey) -> bool {
    let (remote, family) = match peer_node(dst) {
        Some(peer) if peer.route == PEER_VXLAN => (peer.node_ip, peer.family),
        Some(_) => return false,
        // SAFETY: a map value, copied out at once.
        None => match unsafe { VELOX_NODES.get(dst) } {
            Some(node) if node.family != 0 => (node.remote, node.family),
            _ => return false,
        },
    };
    let mut space = MaybeUninit::uninit();
    // SAFETY: all zero is a valid key; 44 bytes, word-aligned.
    let key = unsafe { zeroed_in::<bpf_tunnel_key, u32>(&mut space) };
    key.tunnel_id = TUNNEL_VNI;
    let words = remote.words();
    let flags = if family == AF_INET {
        // The helper takes an IPv4 remote in host order, an IPv6 one as bytes.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be(words[3]);
        0
    } else {
        key.__bindgen_anon_1.remote_ipv6 = words;
        u64::from(BPF_F_TUNINFO_IPV6)
    };
    // SAFETY: the context is a live sk_buff; the key is ours.
    unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb as *mut _, key, KEY_SIZE, flags) == 0 }
}

/// Whether this node may put a packet from `source` into the tunnel: one it sends
/// itself (no ingress interface), or forwards from one of its pods through that
/// pod's own veth, or from one of its own addresses (a masqueraded NodePort
/// connection). Anything else was relayed from elsewhere (a host on the uplink's
/// link claiming a pod's address): the peer would take it for this node's pod.
#[inline(always)]
pub fn sent_from_here(ctx: &TcContext, source: &IpKey) -> bool {
    // SAFETY: reading the context's own field.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if ingress == 0 {
        return true;
    }
    let endpoint = local_endpoint(source);
    match endpoint.exists() {
        true => endpoint.ifindex == ingress,
        false => node_of(source) == THIS_NODE,
    }
}

/// The node that sent a packet out of the tunnel, by its outer source address
/// ([`NO_NODE`] for an address that is no other node's, or another VXLAN network).
#[inline(always)]
pub fn sending_node(ctx: &TcContext) -> u32 {
    let mut space = MaybeUninit::uninit();
    // SAFETY: as in `encapsulate`.
    let key = unsafe { zeroed_in::<bpf_tunnel_key, u32>(&mut space) };
    let skb = ctx.skb.skb as *mut _;
    // The helper fails for a key of the other family: IPv4 first, the common case.
    // SAFETY: the context is a live sk_buff; the key is ours.
    let outer = if unsafe { bpf_skb_get_tunnel_key(skb, key, KEY_SIZE, 0) } == 0 {
        let host_order = unsafe { key.__bindgen_anon_1.remote_ipv4 };
        IpKey::v4(host_order.to_be_bytes())
    } else if unsafe { bpf_skb_get_tunnel_key(skb, key, KEY_SIZE, u64::from(BPF_F_TUNINFO_IPV6)) } == 0 {
        IpKey::from_words(unsafe { key.__bindgen_anon_1.remote_ipv6 })
    } else {
        return NO_NODE;
    };
    match node_of(&outer) {
        _ if key.tunnel_id != TUNNEL_VNI => NO_NODE,
        THIS_NODE => NO_NODE,
        node => node,
    }
}

/// Whether `node` owns `source`: one of its pods' addresses, or one of its own.
#[inline(always)]
pub fn sent_by(source: &IpKey, node: u32) -> bool {
    match peer_node(source) {
        Some(peer) => peer.node == node,
        None => node_of(source) == node,
    }
}

/// The node holding InternalIP `addr` ([`NO_NODE`] for none).
#[inline(always)]
fn node_of(addr: &IpKey) -> u32 {
    // SAFETY: a map value, read at once.
    unsafe { VELOX_NODES.get(addr) }.map_or(NO_NODE, |entry| entry.node)
}

/// Makes a decapsulated frame one addressed to this host. Its inner destination MAC
/// is the sending node's idea (a pod's host veth, or its own VXLAN device), never
/// this device's, so the kernel would take it for another host's and drop it.
#[inline(always)]
pub fn accept_as_addressed_here(ctx: &TcContext) {
    // SAFETY: a plain helper call on the live sk_buff.
    unsafe { bpf_skb_change_type(ctx.skb.skb as *mut _, PACKET_HOST) };
}
