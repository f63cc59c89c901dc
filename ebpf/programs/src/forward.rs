//! Where a packet goes: a pod of this node (`bpf_redirect_peer` into its netns), a
//! pod of another node (`bpf_redirect_neigh` out of the uplink, direct routing, or
//! into the VXLAN device for a peer off the link; no NAT either way), or the kernel.

use aya_ebpf::{
    bindings::{bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_redir_neigh, TC_ACT_REDIRECT},
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    helpers::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::btf_map,
    programs::TcContext,
};
use core::ptr::{addr_of, read_volatile};
use network_types::eth::EthHdr;
use velox_common::{
    CachedEndpoint, Endpoint, IpKey, Peer, AF_INET, DROP_REDIRECT_FAILED, ENDPOINT_CACHE_SLOTS, MAX_ENDPOINTS,
    MAX_PEERS, PEER_VXLAN,
};

use crate::{
    parse::Packet,
    verdict::{Outcome, REDIRECT},
};

#[btf_map]
static VELOX_ENDPOINTS: HashMap<IpKey, Endpoint, MAX_ENDPOINTS> = HashMap::new();

/// `VELOX_ENDPOINTS` again, as an array by the address's last bits.
#[btf_map]
static VELOX_ENDPOINT_CACHE: Array<CachedEndpoint, { ENDPOINT_CACHE_SLOTS as usize }> = Array::new();

#[btf_map]
static VELOX_PEERS: LpmTrie<[u8; 16], Peer, MAX_PEERS> = LpmTrie::new();

/// The pod of this node with address `addr` ([`Endpoint::NONE`] for none): from the
/// cache's entry for it (an array read), or else from the endpoint map (a hash
/// lookup). Copied out, so a concurrent rewrite of an entry cannot change it under
/// the caller.
#[inline(always)]
pub fn local_endpoint(addr: &IpKey) -> Endpoint {
    match cached_endpoint(addr) {
        cached if cached.exists() => cached,
        _ => mapped_endpoint(addr),
    }
}

/// Where a pod's packet to `addr` goes: a pod of this node (else
/// [`Endpoint::NONE`]), or a pod of another node. Asked in the order that costs
/// least: the endpoint cache (an array read), then the peers' pod CIDRs, and the
/// endpoint map only for what neither holds; a packet across nodes never looks up
/// the endpoint map it would miss. That order relies on no pod of this node having
/// an address inside another node's pod CIDR: the CNI refuses such an address and
/// the loader such a peer CIDR. Should the two race, an uncached pod's packets go
/// to that node, which finds no such pod, and the pod's own node drops whatever
/// comes back claiming it: lost, never delivered unpoliced.
#[inline(always)]
pub fn receiver(addr: &IpKey) -> (Endpoint, Option<&'static Peer>) {
    let cached = cached_endpoint(addr);
    if cached.exists() {
        return (cached, None);
    }
    match peer_node(addr) {
        Some(peer) => (Endpoint::NONE, Some(peer)),
        None => (mapped_endpoint(addr), None),
    }
}

/// `addr`'s endpoint as the cache holds it, else [`Endpoint::NONE`].
#[inline(always)]
fn cached_endpoint(addr: &IpKey) -> Endpoint {
    if let Some(cached) = VELOX_ENDPOINT_CACHE.get_ptr(addr.cache_index()) {
        // SAFETY: an array value the kernel keeps while the program runs. Volatile
        // reads, in this order: the sequence, the entry, the sequence again (see
        // `CachedEndpoint::seq`).
        unsafe {
            let seq = read_volatile(addr_of!((*cached).seq));
            if seq & 1 == 1 && cached_address_is(cached, addr) {
                let endpoint = read_volatile(addr_of!((*cached).endpoint));
                if read_volatile(addr_of!((*cached).seq)) == seq {
                    return endpoint;
                }
            }
        }
    }
    Endpoint::NONE
}

/// `addr`'s endpoint as the endpoint map holds it, else [`Endpoint::NONE`].
#[inline(always)]
fn mapped_endpoint(addr: &IpKey) -> Endpoint {
    // SAFETY: a map value, copied out at once.
    unsafe { VELOX_ENDPOINTS.get(addr) }.map_or(Endpoint::NONE, |endpoint| *endpoint)
}

/// Whether the cache entry at `cached` is `addr`'s, read a word at a time.
///
/// # Safety
/// `cached` points at a live array value.
#[inline(always)]
unsafe fn cached_address_is(cached: *const CachedEndpoint, addr: &IpKey) -> bool {
    let held = addr_of!((*cached).addr).cast::<u32>();
    let wanted = addr.words();
    let word = |i: usize| read_volatile(held.add(i)) ^ wanted[i];
    (word(0) | word(1) | word(2) | word(3)) == 0
}

/// The node whose pod CIDRs hold `addr`.
#[inline(always)]
pub fn peer_node(addr: &IpKey) -> Option<&'static Peer> {
    VELOX_PEERS.get(&Key::new(128, addr.addr))
}

/// Into the pod behind host veth `ifindex`, an endpoint's. The map is trusted to name a live
/// interface: DEL removes a pod's entries before its veth, the loader removes them
/// as the kernel announces a veth deleted without a DEL (or at its next pass), and
/// the kernel hands out ifindexes in turn, so a stale entry names no new pod's veth
/// (a redirect to a vanished one is dropped by the kernel). Asking the kernel per packet
/// (`bpf_check_mtu`) cost ~50 ns of a ~370 ns run.
#[inline(always)]
pub fn to_local_pod(ifindex: u32) -> Outcome {
    // SAFETY: a plain helper call; flags 0.
    redirected(unsafe { bpf_redirect_peer(ifindex, 0) })
}

/// Towards `peer`: into the VXLAN device, whose egress (`to_tunnel`) sets the
/// tunnel key, or out of the uplink, the kernel's neighbour table filling in the
/// Ethernet header.
#[inline(always)]
pub fn to_peer_node(peer: &Peer) -> Outcome {
    if peer.route == PEER_VXLAN {
        // SAFETY: a plain helper call; flags 0: the device's egress.
        return redirected(unsafe { bpf_redirect(peer.ifindex, 0) });
    }
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
    redirected(unsafe { bpf_redirect_neigh(peer.ifindex, &mut next_hop, size, 0) })
}

/// Out of `uplink` towards the packet's destination, the next hop from the kernel's
/// routes and neighbours.
#[inline(always)]
pub fn to_network(uplink: u32) -> Outcome {
    // SAFETY: no next hop given: the helper looks the route up.
    redirected(unsafe { bpf_redirect_neigh(uplink, core::ptr::null_mut(), 0, 0) })
}

/// Whether the packet, or each of its GSO segments, fits the MTU of the interface
/// towards `peer` (the uplink, or the VXLAN device: the uplink's less the
/// encapsulation). A plain packet within the MTU the loader recorded fits without
/// asking the kernel, and so does a TCP segment whose GSO segments do (its headers
/// and `gso_size`, as the kernel reckons them); anything else is the kernel's to say.
/// `bpf_redirect_neigh` neither fragments nor reports the path MTU: a packet that does
/// not fit goes to the kernel, which does both.
#[inline(always)]
pub fn fits_uplink(ctx: &TcContext, packet: &Packet, peer: &Peer) -> bool {
    // SAFETY: reading the context's own fields.
    let (len, gso_size) = unsafe { ((*ctx.skb.skb).len, (*ctx.skb.skb).gso_size) };
    let fits = match gso_size {
        0 => len <= peer.mtu + EthHdr::LEN as u32,
        _ => packet.tcp_headers != 0 && gso_size + u32::from(packet.tcp_headers) <= peer.mtu,
    };
    if fits {
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

/// A redirect helper's result as an outcome: the kernel refuses a redirect with
/// `TC_ACT_SHOT`.
#[inline(always)]
fn redirected(action: i64) -> Outcome {
    if action == TC_ACT_REDIRECT as i64 {
        REDIRECT
    } else {
        DROP_REDIRECT_FAILED
    }
}
