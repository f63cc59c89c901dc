//! Reading a packet's two connection ends, once per packet, for every later step.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use velox_common::{FlowEnd, IpKey, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 echo request and reply: their identifier stands for a port.
const ICMP_ECHO: [u8; 4] = [8, 0, 128, 129];
const ICMP_ECHO_REQUEST: [u8; 2] = [8, 128];
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Router solicitation .. redirect: neighbour discovery is the kernel's business.
const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=137;
/// ICMP errors, each about the connection whose packet it quotes: destination
/// unreachable, source quench, time exceeded, parameter problem; and ICMPv6's
/// destination unreachable, packet too big, time exceeded, parameter problem.
const ICMP_ERRORS: [u8; 4] = [3, 4, 11, 12];
const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
/// The IPv6 fragment header.
const IPPROTO_FRAGMENT: u8 = 44;

/// What the programs read of an IP packet, parsed once.
#[derive(Default)]
pub struct Packet {
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// Whether the packet may open a connection: a TCP SYN, an ICMP echo request,
    /// any UDP or SCTP datagram (which cannot tell). Other protocols (IPv6 extension
    /// headers among them) open none that Velox can follow.
    pub opens: bool,
    /// The packet does not name its connection: a later fragment (no ports) or an
    /// ICMP error (it is about the connection it quotes).
    pub unnamed_connection: bool,
}

/// Reads both ends of an IPv4 or IPv6 packet into `packet` (zeroed by the caller),
/// field by field: a key built from tuples or options would carry padding bytes,
/// which LLVM fills from whatever register and the verifier refuses. IPv6 extension
/// headers are not walked: such a packet's ports read as 0, in both directions alike.
///
/// False for what only the kernel handles: ARP, IPv6 neighbour discovery, anything
/// not IP.
#[inline(always)]
pub fn parse(ctx: &TcContext, packet: &mut Packet) -> bool {
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
        if ip.frag_offset() != 0 {
            packet.unnamed_connection = true;
        }
        (EthHdr::LEN + usize::from(ip.ihl()), ip.proto as u8) // ihl() is in bytes
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = header_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        let ip = unsafe { &*ip };
        packet.src.addr = IpKey::v6(ip.src_addr);
        packet.dst.addr = IpKey::v6(ip.dst_addr);
        if ip.next_hdr == IPPROTO_FRAGMENT {
            packet.unnamed_connection = true;
        }
        (EthHdr::LEN + Ipv6Hdr::LEN, ip.next_hdr)
    } else {
        return false;
    };
    packet.src.proto = proto;
    packet.dst.proto = proto;
    if packet.unnamed_connection {
        return true;
    }
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
                // Neighbour discovery stays on the link; an ND type to any other
                // address is judged like any packet.
                if proto == IPPROTO_ICMPV6 && NDP_TYPES.contains(&icmp[0]) && is_link_scoped(&packet.dst.addr) {
                    return false;
                }
                packet.unnamed_connection = match proto {
                    IPPROTO_ICMP => ICMP_ERRORS.contains(&icmp[0]),
                    _ => ICMPV6_ERRORS.contains(&icmp[0]),
                };
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

/// A link-local (fe80::/10) or multicast (ff00::/8) IPv6 destination.
#[inline(always)]
fn is_link_scoped(addr: &IpKey) -> bool {
    addr.addr[0] == 0xff || (addr.addr[0] == 0xfe && addr.addr[1] & 0xc0 == 0x80)
}

#[inline(always)]
fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *const T)
}
