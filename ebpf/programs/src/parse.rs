//! Reading a packet's two connection ends, once per packet, for every later step.

use aya_ebpf::{bindings::BPF_ANY, btf_maps::LruHashMap, macros::btf_map, programs::TcContext};
use core::mem::MaybeUninit;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use velox_common::{FlowEnd, IpKey, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
pub use velox_common::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 echo request and reply: their identifier stands for a port.
const ICMP_ECHO: [u8; 4] = [8, 0, 128, 129];
const ICMP_ECHO_REQUEST: [u8; 2] = [8, 128];
/// Router solicitation .. redirect: neighbour discovery is the kernel's business.
const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=137;
/// ICMP errors, each about the connection whose packet it quotes: destination
/// unreachable, source quench, time exceeded, parameter problem; and ICMPv6's
/// destination unreachable, packet too big, time exceeded, parameter problem.
const ICMP_ERRORS: [u8; 4] = [3, 4, 11, 12];
const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
/// An ICMP error's own header before the packet it quotes.
pub const ICMP_ERROR_HEADER: usize = 8;
/// The IPv6 fragment header.
const IPV6_FRAGMENT: u8 = 44;
/// IPv4 "more fragments" in the flags and offset field, and the offset's bits.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;

/// A datagram's fragments: the first carries the ports, the later ones none.
#[repr(C)]
struct FragmentKey {
    src: IpKey,
    dst: IpKey,
    id: u32,
    proto: u8,
    pad: [u8; 3],
}

/// The ports of datagrams whose first fragment passed here, so their later fragments
/// are judged as the connection they belong to. A later fragment whose first was not
/// seen (out of order, or evicted) names no connection: its ports read as 0, which
/// only a rule for every port allows. Private to one load of the programs: fragment
/// trains in flight while the loader replaces the programs start again.
#[btf_map]
static VELOX_FRAGMENTS: LruHashMap<FragmentKey, [u16; 2], 8192> = LruHashMap::new();

/// What the programs read of an IP packet, parsed once.
#[repr(C, align(8))]
pub struct Packet {
    /// The packet's ends; for an ICMP error, those of the connection it is about, as
    /// a packet of it from the error's sender to its receiver would carry them: policy
    /// and connection tracking judge the error as that connection's.
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// The source address in the packet's IP header, what source validation checks:
    /// for an ICMP error the error's sender (the connection's peer, or a router on
    /// its path), not the connection's end in `src`.
    pub sent_from: IpKey,
    /// Whether the packet may open a connection: a TCP SYN, an ICMP echo request,
    /// any UDP or SCTP datagram (which cannot tell). A later fragment or an ICMP error
    /// belongs to a connection, it opens none.
    pub opens: bool,
    /// An ICMP error whose ends are those of the connection it quotes: it passes
    /// only where that connection was allowed (see `police`).
    pub is_error: bool,
    /// A TCP segment's flags (`TCP_*`), 0 for other protocols.
    pub tcp_flags: u8,
    /// A fixed C layout, 4-byte multiple: with Rust's own layout LLVM's BPF backend
    /// crashed (post-RA pseudo expansion) once a field was added here.
    pad: u8,
    /// A TCP segment's IP and TCP header bytes, which each of its GSO segments
    /// repeats (0 for other packets): with `gso_size` the size of those segments.
    pub tcp_headers: u16,
    pad2: u16,
}

// The programs zero it a word at a time (`zeroed_in`).
const _: () = assert!(core::mem::size_of::<Packet>() % 8 == 0);

impl Packet {
    /// The packet, zeroed in `slot` (see [`zeroed_in`]).
    #[inline(always)]
    pub fn zeroed_in(slot: &mut MaybeUninit<Self>) -> &mut Self {
        // SAFETY: all zero is a valid packet: integers and bools; align 8, a
        // multiple of 8 long.
        unsafe { zeroed_in::<Self, u64>(slot) }
    }
}

/// Zeroes `slot` in place, a `W` word at a time, and gives the value in it: LLVM
/// turns a zeroed struct, or a copy of one, into a call of a byte-at-a-time `memset`
/// loop, which the BPF backend does not inline (it cost `from_pod` a third of its
/// run). Volatile, so LLVM cannot merge the stores back into one.
///
/// # Safety
/// All zero is a valid `T`, and `T` is a whole number of `W`s long and aligned as `W`.
#[inline(always)]
pub unsafe fn zeroed_in<T, W: Default>(slot: &mut MaybeUninit<T>) -> &mut T {
    let words = slot.as_mut_ptr().cast::<W>();
    for i in 0..core::mem::size_of::<T>() / core::mem::size_of::<W>() {
        words.add(i).write_volatile(W::default());
    }
    slot.assume_init_mut()
}

/// `*to = *from` (`to` may be uninitialised), a word at a time: LLVM turns a plain
/// copy between two places it cannot tell apart into a call of a byte-at-a-time
/// `memmove` loop, which the BPF backend does not inline. Volatile reads, so LLVM
/// cannot turn the words back into that call.
#[inline(always)]
pub fn copy_end(to: *mut FlowEnd, from: &FlowEnd) {
    let (to, from) = (to.cast::<u32>(), (from as *const FlowEnd).cast::<u32>());
    for i in 0..core::mem::size_of::<FlowEnd>() / 4 {
        // SAFETY: inside both ends, whose alignment is 4; every bit pattern is an
        // end's.
        unsafe { to.add(i).write(from.add(i).read_volatile()) };
    }
}

/// Where a packet's transport header lies and what its fragment is.
struct Layer4 {
    offset: usize,
    proto: u8,
    fragment: Fragment,
}

enum Fragment {
    Whole,
    First(u32),
    Later(u32),
}

/// Reads both ends of an IPv4 or IPv6 packet into `packet` (zeroed by the caller),
/// field by field: a key built from tuples or options would carry padding bytes,
/// which LLVM fills from whatever register and the verifier refuses.
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
    let layer4 = if ether_type == EtherType::Ipv4 as u16 {
        ipv4(ctx, packet)
    } else if ether_type == EtherType::Ipv6 as u16 {
        ipv6(ctx, packet)
    } else {
        None
    };
    let Some(Layer4 {
        offset,
        proto,
        fragment,
    }) = layer4
    else {
        return false;
    };
    packet.src.proto = proto;
    packet.dst.proto = proto;
    match fragment {
        Fragment::Later(id) => {
            later_fragment(packet, id);
            true
        }
        Fragment::First(id) => {
            let is_ip = transport(ctx, offset, packet);
            first_fragment(packet, id);
            is_ip
        }
        Fragment::Whole => transport(ctx, offset, packet),
    }
}

/// Gives a later fragment its datagram's ports.
#[inline(always)]
fn later_fragment(packet: &mut Packet, id: u32) {
    if let Some(ports) = unsafe { VELOX_FRAGMENTS.get(&fragment_key(packet, id)) } {
        packet.src.port = ports[0];
        packet.dst.port = ports[1];
    }
}

#[inline(always)]
fn first_fragment(packet: &Packet, id: u32) {
    let ports = [packet.src.port, packet.dst.port];
    let _ = VELOX_FRAGMENTS.insert(&fragment_key(packet, id), &ports, BPF_ANY as u64);
}

#[inline(always)]
fn ipv4(ctx: &TcContext, packet: &mut Packet) -> Option<Layer4> {
    let ip = unsafe { &*header_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? };
    packet.src.addr = IpKey::v4(ip.src_addr);
    packet.dst.addr = IpKey::v4(ip.dst_addr);
    packet.sent_from = packet.src.addr;
    let frags = u16::from_be_bytes(ip.frags);
    let id = u32::from(u16::from_be_bytes(ip.id));
    let fragment = if frags & IPV4_OFFSET != 0 {
        Fragment::Later(id)
    } else if frags & IPV4_MORE_FRAGMENTS != 0 {
        Fragment::First(id)
    } else {
        Fragment::Whole
    };
    Some(Layer4 {
        offset: EthHdr::LEN + usize::from(ip.ihl()), // ihl() is in bytes
        proto: ip.proto,
        fragment,
    })
}

/// An IPv6 packet's transport header: after the fixed header, or after a fragment
/// header right behind it. Other extension headers are not walked (the verifier's
/// budget): such a packet reads as that header's protocol, which no rule allows.
#[inline(always)]
fn ipv6(ctx: &TcContext, packet: &mut Packet) -> Option<Layer4> {
    let ip = unsafe { &*header_at::<Ipv6Hdr>(ctx, EthHdr::LEN)? };
    packet.src.addr = address_at(&ip.src_addr);
    packet.dst.addr = address_at(&ip.dst_addr);
    packet.sent_from = packet.src.addr;
    let offset = EthHdr::LEN + Ipv6Hdr::LEN;
    if ip.next_hdr != IPV6_FRAGMENT {
        return Some(Layer4 {
            offset,
            proto: ip.next_hdr,
            fragment: Fragment::Whole,
        });
    }
    // next header, reserved, offset (13 bits) and flags (M last), id
    let header = unsafe { &*header_at::<[u8; 8]>(ctx, offset)? };
    let offset_and_more = u16::from_be_bytes([header[2], header[3]]);
    let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    Some(Layer4 {
        offset: offset + 8,
        proto: header[0],
        fragment: match offset_and_more >> 3 {
            0 => Fragment::First(id),
            _ => Fragment::Later(id),
        },
    })
}

/// The IPv6 address at `at` in the packet, read a word at a time: a plain copy of
/// sixteen bytes becomes a call of a byte-at-a-time `memmove` loop.
#[inline(always)]
fn address_at(at: &[u8; 16]) -> IpKey {
    let words = (at as *const [u8; 16]).cast::<u32>();
    // SAFETY: inside the packet (`header_at` checked its header).
    IpKey::from_words([0, 1, 2, 3].map(|i| unsafe { words.add(i).read_unaligned() }))
}

#[inline(always)]
fn fragment_key(packet: &Packet, id: u32) -> FragmentKey {
    FragmentKey {
        src: packet.src.addr,
        dst: packet.dst.addr,
        id,
        proto: packet.src.proto,
        pad: [0; 3],
    }
}

/// Reads the ports (or the ICMP echo identifier) at `offset`. False for IPv6
/// neighbour discovery on the link.
#[inline(always)]
fn transport(ctx: &TcContext, offset: usize, packet: &mut Packet) -> bool {
    match packet.src.proto {
        IPPROTO_TCP => {
            // source port, destination port, sequence, acknowledgement, offset, flags
            if let Some(tcp) = header_at::<[u8; 14]>(ctx, offset) {
                let tcp = unsafe { &*tcp };
                packet.src.port = u16::from_ne_bytes([tcp[0], tcp[1]]);
                packet.dst.port = u16::from_ne_bytes([tcp[2], tcp[3]]);
                packet.tcp_flags = tcp[13];
                packet.opens = tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
                // The data offset, in 4-byte words, in the high nibble; below the
                // bare header's 5 it says nothing (and the kernel is asked).
                let words = usize::from(tcp[12] >> 4);
                if words >= 5 {
                    packet.tcp_headers = (offset - EthHdr::LEN + words * 4) as u16;
                }
            }
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            if let Some(ports) = header_at::<[u16; 2]>(ctx, offset) {
                let ports = unsafe { &*ports };
                packet.src.port = ports[0];
                packet.dst.port = ports[1];
                packet.opens = true;
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, identifier: an echo and its reply share the identifier.
            if let Some(icmp) = header_at::<[u8; 6]>(ctx, offset) {
                let icmp = unsafe { &*icmp };
                let proto = packet.src.proto;
                // Neighbour discovery stays on the link; an ND type to any other
                // address is judged like any packet.
                if proto == IPPROTO_ICMPV6 && NDP_TYPES.contains(&icmp[0]) && is_link_scoped(&packet.dst.addr) {
                    return false;
                }
                let error = match proto {
                    IPPROTO_ICMP => ICMP_ERRORS.contains(&icmp[0]),
                    _ => ICMPV6_ERRORS.contains(&icmp[0]),
                };
                if error {
                    quoted_connection(ctx, offset + ICMP_ERROR_HEADER, packet);
                } else if ICMP_ECHO.contains(&icmp[0]) {
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

/// Turns an ICMP error's ends into those of the connection whose packet it quotes at
/// `offset`, reversed: the error travels back to the quoted packet's sender. The
/// error stays as it is when the quote is cut short, or was not sent by the error's
/// receiver (then it is about no connection of its receiver). It reads copies
/// (`bpf_skb_load_bytes`), not through packet pointers: an error's quote lies at an
/// offset the verifier would have to follow through every later step.
#[inline(always)]
fn quoted_connection(ctx: &TcContext, offset: usize, packet: &mut Packet) {
    // Read as words, not bytes: LLVM's BPF backend spills a byte array it takes
    // apart a byte per 8-byte slot.
    let (src, dst, proto, transport) = if packet.src.proto == IPPROTO_ICMP {
        // Version and header length, ..., protocol (byte 9), checksum, then both
        // addresses.
        let Ok(ip) = ctx.load::<[u32; 5]>(offset) else {
            return;
        };
        let header_len = (ip[0].to_ne_bytes()[0] & 0x0f) as usize * 4;
        let mapped = |word: u32| IpKey::v4(word.to_ne_bytes());
        (
            mapped(ip[3]),
            mapped(ip[4]),
            ip[2].to_ne_bytes()[1],
            offset + header_len,
        )
    } else {
        // Version, traffic class, flow label, payload length, next header (byte 6),
        // hop limit, then both addresses.
        let Ok(ip) = ctx.load::<[u32; 10]>(offset) else {
            return;
        };
        let src = IpKey::from_words([ip[2], ip[3], ip[4], ip[5]]);
        let dst = IpKey::from_words([ip[6], ip[7], ip[8], ip[9]]);
        (src, dst, ip[1].to_ne_bytes()[2], offset + Ipv6Hdr::LEN)
    };
    // ICMP belongs to IPv4 and ICMPv6 to IPv6 (an IPv6 quote of IPv4-mapped
    // addresses in an IPv4 packet is no error of its receiver's), and the quoted
    // packet must be the error's receiver's.
    // (`src` is the receiver's address, so of the packet's own family.)
    let icmp_of_its_family = (packet.src.proto == IPPROTO_ICMP) == src.is_v4_mapped();
    if src != packet.dst.addr || !icmp_of_its_family {
        return;
    }
    // The ports, or an echo's type, code, checksum and identifier.
    let Ok(head) = ctx.load::<[u8; 8]>(transport) else {
        return;
    };
    let (src_port, dst_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (
            u16::from_ne_bytes([head[0], head[1]]),
            u16::from_ne_bytes([head[2], head[3]]),
        ),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let identifier = u16::from_ne_bytes([head[4], head[5]]);
            (identifier, identifier)
        }
        _ => (0, 0),
    };
    packet.is_error = true;
    packet.src = FlowEnd {
        addr: dst,
        port: dst_port,
        proto,
        pad: 0,
    };
    packet.dst.port = src_port;
    packet.dst.proto = proto;
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
