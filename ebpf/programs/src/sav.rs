//! Source address validation: a pod sends only from its own addresses.

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use velox_common::{IpKey, VethSender, VETH_SENDERS};

use crate::{forward::local_endpoint, parse::Packet, verdict::NO_SLOT};

#[btf_map]
static VELOX_VETH_SENDERS: Array<VethSender, { VETH_SENDERS as usize }> = Array::new();

/// The counters slot of the sending pod, when the packet's source address is one of
/// the pod behind `ifindex`; `NO_SLOT` otherwise. The veth's own entry answers
/// with an array read; what it does not list, the endpoint map's hash lookup does.
#[inline(always)]
pub fn sender_slot(packet: &Packet, ifindex: u32) -> u32 {
    if let Some(veth) = VELOX_VETH_SENDERS.get(ifindex & (VETH_SENDERS - 1)) {
        if veth.ifindex == ifindex && veth.lists(&packet.sent_from) {
            return veth.slot;
        }
    }
    local_endpoint(&packet.sent_from)
        .filter(|sender| sender.ifindex == ifindex)
        .map_or(NO_SLOT, |sender| sender.slot)
}

/// Link-local and unspecified sources (neighbour discovery, MLD, DAD) stay on the
/// link: the kernel never forwards them, and neither does the fast path, so a pod
/// may send from them (to the host only as its egress rules allow).
#[inline(always)]
pub fn stays_on_link(addr: &IpKey) -> bool {
    (addr.addr[0] == 0xfe && addr.addr[1] & 0xc0 == 0x80) || addr.addr == [0; 16]
}

/// IPv6 multicast (ff00::/8).
#[inline(always)]
pub fn is_multicast(addr: &IpKey) -> bool {
    addr.addr[0] == 0xff
}
