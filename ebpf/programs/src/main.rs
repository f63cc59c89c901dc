//! Velox's programs, IPv4 and IPv6 alike; this file holds their entry points, each
//! feature lives in its own module.
//! - `from_pod`, on the ingress of every host-side pod veth: a local pod gets the
//!   packet with `bpf_redirect_peer`, a pod on another node with `bpf_redirect_neigh`
//!   out of the uplink; everything else goes to the kernel.
//! - `from_net`, on the ingress of the node's uplink: a local pod gets it with
//!   `bpf_redirect_peer`; everything else goes to the kernel.
//! - `from_tunnel` and `to_tunnel`, on the node's VXLAN device (`tunnel`): what
//!   tunnelled peers send, checked for its sender, then as `from_net` does; and the
//!   tunnel key for what goes to them.
//! - `to_pod`, on the egress of every host-side pod veth: what the kernel delivers
//!   into a pod meets the pod's ingress policy there.
//! - `from_net_nat` and `from_pod_nat`, tail-called by the two above: outside
//!   traffic to Services and its replies (`nat`).
//!
//! Policy sees every path: a pod's egress in `from_pod`, a pod's ingress where Velox
//! delivers (`from_pod`, `from_net`) and where the kernel does (`to_pod`).
//! - the socket load balancer's cgroup hooks (`socket_lb`).
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so `core::sync::atomic`
// has no read-modify-write; a BPF atomic add is all the shares need.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod flow_table;
mod forward;
mod kernel_drops;
mod kernel_flows;
mod nat;
mod parse;
mod policy;
mod sav;
mod services;
mod socket_lb;
mod timeouts;
mod tunnel;
#[cfg(feature = "upgrade-test")]
mod upgrade_test;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use forward::{fits_uplink, local_endpoint, peer_node, receiver, to_local_pod, to_peer_node};
use kernel_flows::{is_kernel_flow, remember};
use parse::{parse, Packet};
use policy::{police, Verdict, ALLOWED};
use velox_common::{
    Endpoint, DROP_NO_TUNNEL_PEER, DROP_SPOOFED, DROP_TUNNEL_SOURCE, DROP_UNKNOWN_RECEIVER, FROM_NET_NAT, FROM_POD_NAT,
    UPLINK_SLOT,
};
use verdict::{
    delivered_count, finish, interface_slot, trace, Outcome, COUNT_NONE, COUNT_RECEIVER, COUNT_SENDER, NO_SLOT, PASS,
};

/// `__sk_buff.pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    let is_ip = parse(&ctx, packet);
    // SAFETY: reading the context's own fields. The kernel took a VLAN tag off the
    // frame before this hook and would put it back on the way out.
    let (ifindex, vlan) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present) };
    let owner_slot = if is_ip {
        sav::sender_slot(packet, ifindex)
    } else {
        NO_SLOT
    };
    let validated = owner_slot != NO_SLOT;
    // The pod that sent it: the owner of its source address, or for a source that
    // stays on the link (link-local, unspecified) the pod behind this veth.
    let sender_slot = match validated {
        true => owner_slot,
        false => interface_slot(ifindex),
    };
    // A link-local source is never forwarded, but it reaches the node's own
    // sockets: the pod's egress rules judge it as any packet to the host. Multicast
    // from it (MLD) is the link's own business.
    let on_link = !validated && sav::stays_on_link(&packet.sent_from);
    let mut verdict = Verdict::default();
    // A pod's network is untagged: a tagged frame would leave the uplink still
    // tagged, into another VLAN of a trunk.
    let outcome = if vlan != 0 {
        DROP_SPOOFED
    } else if !is_ip {
        PASS
    } else if validated || (on_link && !sav::is_multicast(&packet.dst.addr)) {
        from_pod_to(&ctx, packet, sender_slot, ifindex, on_link, &mut verdict)
    } else if on_link {
        PASS
    } else {
        DROP_SPOOFED
    };
    let slot = sender_slot;
    let count = match validated {
        true => COUNT_SENDER,
        false => COUNT_NONE,
    };
    let action = finish(&ctx, packet, slot, outcome, &verdict, count);
    trace(&ctx, "from_pod", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// Where a validated packet from the pod in `sender_slot` goes, once policy allows it:
/// a local pod, a pod on a peer node, or the kernel. A packet of a connection the
/// kernel handles (a reply it may translate back), and one `on_link` (a link-local
/// source, which only the node itself may receive: the kernel never forwards it),
/// go to the kernel. The sender's
/// egress judges a packet here; the receiver's ingress here when Velox delivers it to
/// a local pod, on its node when it goes to another, and where the kernel delivers it
/// (`to_pod`) otherwise.
#[inline(always)]
fn from_pod_to(
    ctx: &TcContext,
    packet: &Packet,
    sender_slot: u32,
    ifindex: u32,
    on_link: bool,
    verdict: &mut Verdict,
) -> Outcome {
    let (receiver, receiving_peer) = match on_link {
        true => (Endpoint::NONE, None),
        false => receiver(&packet.dst.addr),
    };
    // The local receiver as plain values (ifindex 0: none), which the verifier
    // merges where it could not merge a pointer and its absence.
    let (local_ifindex, local_slot) = match receiver.exists() {
        true => (receiver.ifindex, receiver.slot),
        false => (0, NO_SLOT),
    };
    // Recorded ends are pods' ends: a local pod's slot says whether it has any, the
    // uplink's slot says it for the pods of other nodes.
    let ends_slot = match local_ifindex {
        0 => UPLINK_SLOT,
        _ => local_slot,
    };
    let kernel_flow = on_link || is_kernel_flow(&packet.dst, ends_slot);
    let is_local = local_ifindex != 0 && !kernel_flow;
    let peer = match kernel_flow {
        true => None,
        false => receiving_peer,
    };
    let dst_slot = match is_local {
        true => local_slot,
        false => NO_SLOT,
    };
    let to_kernel = !is_local && peer.is_none();
    // A backend's reply to a client from outside (never to a pod: the NAT
    // masquerades those clients): the NAT half judges it by policy and translates it
    // back. Only when the tail call fails does it go on here. Before `police`, where
    // the verifier has the fewest paths to walk.
    if to_kernel && !kernel_flow && nat::is_translated_reply(packet) {
        nat::hand_over(ctx, FROM_POD_NAT);
    }
    police(ctx, packet, sender_slot, dst_slot, to_kernel, verdict);
    if verdict.result != ALLOWED {
        verdict.result
    } else if kernel_flow {
        PASS
    } else if is_local {
        to_local_pod(local_ifindex)
    } else if let Some(peer) = peer {
        if fits_uplink(ctx, packet, peer) {
            to_peer_node(peer)
        } else {
            PASS
        }
    } else {
        if packet.opens {
            remember(ifindex, &packet.src, sender_slot);
        }
        PASS
    }
}

#[classifier]
pub fn from_net(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
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
    let is_ip = pkt_type == PACKET_HOST && vlan == 0 && parse(&ctx, packet);
    let mut verdict = Verdict::default();
    // No packet from the network may claim one of this node's pods: the kernel
    // would forward it on, to other nodes' pods, as that pod's.
    let outcome = if !is_ip || tunnel::is_underlay_packet(packet) {
        PASS
    } else if local_endpoint(&packet.sent_from).exists() {
        DROP_SPOOFED
    } else {
        from_network(&ctx, packet, ifindex, &mut verdict)
    };
    let action = finish(&ctx, packet, UPLINK_SLOT, outcome, &verdict, delivered_count(outcome));
    trace(&ctx, "from_net", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// Where a packet from another node or from outside goes, arrived on `ifindex` (the
/// uplink, or out of the tunnel): a local pod gets it once policy allows, the NAT
/// takes what is its, the kernel the rest.
#[inline(always)]
fn from_network(ctx: &TcContext, packet: &Packet, ifindex: u32, verdict: &mut Verdict) -> Outcome {
    let endpoint = local_endpoint(&packet.dst.addr);
    if endpoint.exists() {
        if is_kernel_flow(&packet.dst, endpoint.slot) {
            // The kernel delivers it, and `to_pod` judges it there.
            PASS
        } else {
            police(ctx, packet, NO_SLOT, endpoint.slot, false, verdict);
            if verdict.result == ALLOWED {
                to_local_pod(endpoint.ifindex)
            } else {
                verdict.result
            }
        }
    } else if nat::is_for_nat_from_net(packet) {
        nat::hand_over(ctx, FROM_NET_NAT);
        PASS
    } else {
        // A pod on another node reaching this node (a hostPort, a NodePort): the kernel
        // may send its replies back through the fast path of this node.
        if packet.opens && peer_node(&packet.src.addr).is_some() {
            remember(ifindex, &packet.src, UPLINK_SLOT);
        }
        PASS
    }
}

/// On the ingress of the VXLAN device: what a tunnelled peer sent. Only another node
/// of the cluster may send (its underlay address is the outer source), and only from
/// its own pods and addresses; then it goes on as from the uplink. Counted in the
/// uplink's slot: both are the network side of the node.
#[classifier]
pub fn from_tunnel(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    // The sender first: parsing notes fragments, which no stranger may touch.
    let sender = tunnel::sending_node(&ctx);
    // SAFETY: reading the context's own fields.
    let (ifindex, vlan) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present) };
    let is_ip = sender != tunnel::NO_NODE && vlan == 0 && parse(&ctx, packet);
    let mut verdict = Verdict::default();
    let outcome = if is_ip && tunnel::sent_by(&packet.sent_from, sender) {
        tunnel::accept_as_addressed_here(&ctx);
        from_network(&ctx, packet, ifindex, &mut verdict)
    } else {
        DROP_TUNNEL_SOURCE
    };
    let action = finish(&ctx, packet, UPLINK_SLOT, outcome, &verdict, delivered_count(outcome));
    trace(&ctx, "from_tunnel", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// On the egress of the VXLAN device: every packet into the tunnel gets the key of the
/// peer whose pod CIDR holds its destination, once its source is one this node may
/// send from. Only a drop is counted: the packet was counted where it came from.
#[classifier]
pub fn to_tunnel(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    let is_ip = parse(&ctx, packet);
    let (outcome, slot) = if is_ip && !tunnel::sent_from_here(&ctx, &packet.sent_from) {
        (DROP_SPOOFED, UPLINK_SLOT)
    } else if is_ip && tunnel::encapsulate(&ctx, &packet.dst.addr) {
        (PASS, NO_SLOT)
    } else {
        (DROP_NO_TUNNEL_PEER, UPLINK_SLOT)
    };
    let action = finish(&ctx, packet, slot, outcome, &Verdict::default(), COUNT_NONE);
    trace(&ctx, "to_tunnel", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// What the kernel delivers into a pod: kube-proxy's NodePorts and ClusterIPs, hostPorts,
/// connections Velox handed to the kernel. Velox's own deliveries
/// (`bpf_redirect_peer`) never pass here. The node's own processes reach its pods
/// (kubelet's probes): a packet the host sent, not one it forwarded, passes, and
/// the pod's replies to it pass its egress rules. A
/// forwarded packet for an address this pod does not hold in the maps (its ADD
/// unfinished, its DEL under way) is dropped.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    // SAFETY: reading the context's own fields. A packet the host sent arrived on no
    // interface.
    let (ifindex, from_host) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex == 0) };
    let is_ip = parse(&ctx, packet);
    let mut verdict = Verdict::default();
    let mut slot = NO_SLOT;
    if is_ip && from_host && policy::host_sent(packet, ifindex) {
        policy::enter_host_flow();
    }
    if is_ip && !from_host {
        let receiver = local_endpoint(&packet.dst.addr);
        if receiver.exists() && receiver.ifindex == ifindex {
            police(&ctx, packet, NO_SLOT, receiver.slot, false, &mut verdict);
            slot = receiver.slot;
        } else {
            verdict.result = DROP_UNKNOWN_RECEIVER;
            slot = interface_slot(ifindex);
        }
    }
    // A pod's counters count what it sent; here only a drop is counted.
    if verdict.result == ALLOWED {
        slot = NO_SLOT;
    }
    // A local pod's packet the kernel delivers was counted where it left that pod.
    let count = match is_ip && (from_host || !counted_by_sender(packet)) {
        true => COUNT_RECEIVER,
        false => COUNT_NONE,
    };
    let action = finish(&ctx, packet, slot, verdict.result, &verdict, count);
    trace(&ctx, "to_pod", is_ip.then_some(&packet.dst.addr), action);
    action
}

/// Whether a packet `to_pod` sees was sent by a pod of this node (whose `from_pod`
/// counted it). Looked up only while the flow table is kept.
#[inline(always)]
fn counted_by_sender(packet: &Packet) -> bool {
    flow_table::report_interval() != 0 && local_endpoint(&packet.src.addr).exists()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
