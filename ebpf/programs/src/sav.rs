//! Source address validation: a pod sends only from its own addresses.

use velox_common::IpKey;

use crate::{forward::local_endpoint, parse::Packet, verdict::NO_SLOT};

/// The counters slot of the sending pod, when the packet's source address is one of
/// the pod behind `ifindex`; `NO_SLOT` otherwise. One lookup proves the source and
/// gives the slot.
#[inline(always)]
pub fn sender_slot(packet: &Packet, ifindex: u32) -> u32 {
    let owner = local_endpoint(&packet.sent_from);
    match owner.exists() && owner.ifindex == ifindex {
        true => owner.slot,
        false => NO_SLOT,
    }
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
