//! Connected UDP sockets whose backend left a Service: the socket load balancer
//! picked the backend at `connect`, and a connected socket never asks again, so a
//! resolver would go on sending to a backend that is gone. Velox closes them
//! (`SOCK_DESTROY`, as `ss -K` does): the application sees an error and connects
//! anew, to a backend that exists.

use anyhow::Context;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};
use std::collections::HashSet;
use std::net::SocketAddr;

/// `nlmsg_type` of a destroy request (linux/sock_diag.h); the crate knows only the dump.
const SOCK_DESTROY: u16 = 21;

fn request(flags: u16, socket_id: SocketId, family: u8) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The UDP sockets of this network namespace connected to one of `peers`, with the
/// peer and the socket's cookie.
fn connected_to(
    socket: &Socket,
    family: u8,
    peers: &HashSet<SocketAddr>,
) -> anyhow::Result<Vec<(SocketId, SocketAddr, u64)>> {
    let empty = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    socket.send(&request(NLM_F_REQUEST | NLM_F_DUMP, empty, family), 0)?;
    let mut found = Vec::new();
    let mut buf = vec![0; 65536];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .map_err(|e| anyhow::anyhow!("reading a sock_diag answer: {e}"))?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    // A dual-stack socket shows an IPv4 peer mapped into IPv6.
                    let peer = SocketAddr::new(id.destination_address.to_canonical(), id.destination_port);
                    if peers.contains(&peer) {
                        found.push((id.clone(), peer, cookie(id)));
                    }
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => anyhow::bail!("sock_diag dump: {e:?}"),
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
            offset += message.header.length as usize;
        }
    }
}

/// The socket cookie (`bpf_get_socket_cookie`): the kernel gives it as two
/// host-order words, the low one first.
fn cookie(id: &SocketId) -> u64 {
    let word = |i: usize| u64::from(u32::from_ne_bytes(id.cookie[i..i + 4].try_into().expect("4 bytes")));
    word(4) << 32 | word(0)
}

/// Closes the UDP sockets of the current network namespace connected to one of
/// `peers` for which `close(peer, cookie)` holds; returns how many.
pub fn destroy_connected_udp(
    peers: &HashSet<SocketAddr>,
    close: &dyn Fn(SocketAddr, u64) -> bool,
) -> anyhow::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut destroyed = 0;
    for family in [AF_INET, AF_INET6] {
        let doomed = connected_to(&socket, family, peers)?
            .into_iter()
            .filter(|(_, peer, cookie)| close(*peer, *cookie));
        for (id, _, _) in doomed {
            let mut message = request(NLM_F_REQUEST | NLM_F_ACK, id, family);
            message[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
            socket.send(&message, 0)?;
            let mut ack = vec![0; 4096];
            let size = socket.recv(&mut &mut ack[..], 0)?;
            let answer = <NetlinkMessage<SockDiagMessage>>::deserialize(&ack[..size])
                .map_err(|e| anyhow::anyhow!("reading a SOCK_DESTROY answer: {e}"))?;
            match answer.payload {
                // An ACK is an error message with code 0.
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    anyhow::bail!("SOCK_DESTROY refused (is CONFIG_INET_DIAG_DESTROY set?): {e:?}")
                }
                _ => destroyed += 1,
            }
        }
    }
    Ok(destroyed)
}
