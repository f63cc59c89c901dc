//! ICMP errors crafted by the tests, as a router or a peer would send them.

use crate::netns::spawn_in;
use socket2::{Domain, Protocol as RawProtocol, SockAddr, Socket, Type};
use std::net::{IpAddr, SocketAddr};

/// What a router with a smaller next hop sends back about a datagram from `from` to
/// `to` (the datagram's IP and UDP headers quoted): ICMP fragmentation needed, or
/// ICMPv6 packet too big, announcing `mtu`. The checksum of ICMPv6 is the kernel's.
pub fn too_big(from: SocketAddr, to: SocketAddr, mtu: u16) -> Vec<u8> {
    let udp_len = 8 + 64u16;
    let mut udp = Vec::new();
    udp.extend(from.port().to_be_bytes());
    udp.extend(to.port().to_be_bytes());
    udp.extend(udp_len.to_be_bytes());
    udp.extend([0, 0]);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut quoted = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
            quoted[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            quoted.extend(src.octets());
            quoted.extend(dst.octets());
            let sum = checksum(&quoted);
            quoted[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut icmp = vec![3, 4, 0, 0, 0, 0];
            icmp.extend(mtu.to_be_bytes());
            icmp.extend(quoted);
            icmp.extend(udp);
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            icmp
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut icmp = vec![2, 0, 0, 0];
            icmp.extend(u32::from(mtu).to_be_bytes());
            icmp.extend([0x60, 0, 0, 0]);
            icmp.extend(udp_len.to_be_bytes());
            icmp.extend([17, 64]);
            icmp.extend(src.octets());
            icmp.extend(dst.octets());
            icmp.extend(udp);
            icmp
        }
        _ => unreachable!("one family"),
    }
}

/// The Internet checksum.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `message` from `netns` (from `from`) to `to` over a raw ICMP socket.
pub fn send_icmp(netns: &str, from: IpAddr, to: IpAddr, message: Vec<u8>) {
    spawn_in(netns, move || {
        let (domain, protocol) = match to {
            IpAddr::V4(_) => (Domain::IPV4, RawProtocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, RawProtocol::ICMPV6),
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
        socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
        socket.send_to(&message, &SockAddr::from(SocketAddr::new(to, 0)))?;
        Ok(())
    })
    .join()
    .unwrap()
    .unwrap();
}
