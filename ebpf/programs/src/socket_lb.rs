//! The socket load balancer: cgroup sock_addr hooks that turn a Service frontend
//! into one of its backends where a socket is connected or a datagram sent, before
//! any packet exists, so no packet of the connection needs NAT. `recvmsg` and
//! `getpeername` show the frontend again, as a client of the Service expects (a
//! resolver drops a reply that comes from another address than it asked).

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC},
    btf_maps::{HashMap, LruHashMap},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
    EbpfContext,
};
use velox_common::{
    AffinityKey, FlowEnd, IpKey, SocketPeer, IPPROTO_TCP, IPPROTO_UDP, MAX_ENDPOINTS, MAX_SOCKET_PEERS,
    SERVICE_INTERNAL_LOCAL,
};

use crate::services::{pick_backend, service_at};

#[btf_map]
static VELOX_SOCKET_PEERS: LruHashMap<SocketPeer, FlowEnd, MAX_SOCKET_PEERS> = LruHashMap::new();

/// Pods that opted out: their network namespace's cookie.
#[btf_map]
static VELOX_LB_OPT_OUT: HashMap<u64, u8, MAX_ENDPOINTS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// What a sock_addr hook returns to let the call go on; 0 fails it.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V6)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx, Family::V6)
}

/// Whether the socket belongs to a pod that opted out of the load balancer.
#[inline(always)]
fn opted_out(netns: u64) -> bool {
    unsafe { VELOX_LB_OPT_OUT.get(&netns) }.is_some()
}

/// The address and port the call names (destination of connect and sendmsg, source
/// of a received datagram, the peer for getpeername), with the socket's protocol.
/// False for sockets that are neither TCP nor UDP.
#[inline(always)]
fn read_user_end(sa: &bpf_sock_addr, family: Family, end: &mut FlowEnd) -> bool {
    end.proto = match sa.type_ {
        SOCK_STREAM => IPPROTO_TCP,
        SOCK_DGRAM => IPPROTO_UDP,
        _ => return false,
    };
    end.addr = match family {
        Family::V4 => IpKey::v4(sa.user_ip4.to_ne_bytes()),
        Family::V6 => IpKey::from_words(sa.user_ip6),
    };
    // The port sits in network byte order in the low 16 bits.
    end.port = sa.user_port as u16;
    true
}

#[inline(always)]
fn write_user_end(sa: &mut bpf_sock_addr, family: Family, end: &FlowEnd) {
    let words = end.addr.words();
    match family {
        Family::V4 => sa.user_ip4 = words[3],
        Family::V6 => sa.user_ip6 = words,
    }
    sa.user_port = u32::from(end.port);
}

/// connect and sendmsg: a Service frontend becomes a backend picked at random (or
/// the one this network namespace stuck to), and the socket remembers which frontend
/// it asked for. A Service without backends refuses (ECONNREFUSED) instead of
/// letting the client wait for a timeout.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the context the kernel passed; the verifier checks every access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut frontend = FlowEnd::default();
    if !read_user_end(sa, family, &mut frontend) {
        return ALLOW;
    }
    // SAFETY: the context the kernel passed.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if opted_out(netns) {
        return ALLOW;
    }
    let Some(service) = service_at(&frontend, netns) else {
        return ALLOW;
    };
    let mut client = AffinityKey {
        service: service.id,
        from_socket: 1,
        ..AffinityKey::default()
    };
    client.client.addr[..8].copy_from_slice(&netns.to_ne_bytes());
    let now = if service.affinity_seconds != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let Some(backend) = pick_backend(service, service.choices(SERVICE_INTERNAL_LOCAL), &client, None, now) else {
        // SAFETY: sets this call's error; the kernel keeps it when we refuse.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    write_user_end(sa, family, backend);
    let peer = SocketPeer {
        // SAFETY: the context is a live socket address of a live socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        peer: *backend,
        pad: 0,
    };
    let _ = VELOX_SOCKET_PEERS.insert(&peer, &frontend, 0);
    ALLOW
}

/// recvmsg and getpeername: a backend this socket was sent to shows as the frontend.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the context the kernel passed; the verifier checks every access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut peer = SocketPeer::default();
    if !read_user_end(sa, family, &mut peer.peer) {
        return ALLOW;
    }
    // SAFETY: as above.
    peer.cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(frontend) = unsafe { VELOX_SOCKET_PEERS.get(&peer) } {
        write_user_end(sa, family, frontend);
    }
    ALLOW
}
