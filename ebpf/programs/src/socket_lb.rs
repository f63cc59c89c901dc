//! The socket load balancer: cgroup sock_addr hooks that turn a Service frontend
//! into one of its backends where a socket is connected or a datagram sent, before
//! any packet exists, so no packet of the connection needs NAT. `recvmsg` and
//! `getpeername` show the frontend again, as a client of the Service expects (a
//! resolver drops a reply that comes from another address than it asked).

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC},
    btf_maps::{HashMap, SkStorage},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_seq_write,
        bpf_set_retval, generated::bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
    EbpfContext,
};
use velox_common::{
    AffinityKey, FlowEnd, IpKey, SocketFrontend, SocketFrontends, IPPROTO_TCP, IPPROTO_UDP, MAX_ENDPOINTS,
    SERVICE_INTERNAL_LOCAL, SOCKET_FRONTEND_SLOTS,
};

use crate::services::{pick_backend, service_at};
use crate::verdict::{report_translation, TranslatedFor};

/// Each socket's own record of the frontend it asked for: it goes with the socket,
/// so no socket can push out another's (a map shared by all was, issue 21). A
/// connected socket's one backend here (small: most sockets are connected) ...
#[btf_map]
static VELOX_CONNECTED_FRONTEND: SkStorage<SocketFrontend> = SkStorage::new();

/// ... and the last backends of an unconnected UDP socket's datagrams here.
#[btf_map]
static VELOX_DATAGRAM_FRONTENDS: SkStorage<SocketFrontends> = SkStorage::new();

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

/// Which call names the destination: `connect` (the socket's one peer from now on)
/// or a datagram's `sendmsg`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    SendTo,
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V6, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4, Call::SendTo)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V6, Call::SendTo)
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
        Family::V6 => IpKey::from_words(core::array::from_fn(|i| context_word(&sa.user_ip6[i]))),
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
        Family::V6 => {
            for (field, word) in sa.user_ip6.iter_mut().zip(words) {
                // SAFETY: a context field, written a word at a time (volatile: LLVM
                // would make a copy of the four a `memmove` of bytes, and the
                // verifier takes only whole-word stores into the context).
                unsafe { core::ptr::write_volatile(field, word) };
            }
        }
    }
    sa.user_port = u32::from(end.port);
}

/// A context word, read as a whole word (see `write_user_end`).
#[inline(always)]
fn context_word(field: &u32) -> u32 {
    // SAFETY: a context field.
    unsafe { core::ptr::read_volatile(field) }
}

/// connect and sendmsg: a Service frontend becomes a backend picked at random (or
/// the one this network namespace stuck to), and the socket remembers which frontend
/// it asked for. A Service without backends refuses (ECONNREFUSED) instead of
/// letting the client wait for a timeout.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext, family: Family, call: Call) -> i32 {
    // SAFETY: the context the kernel passed; the verifier checks every access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut frontend = FlowEnd::default();
    if !read_user_end(sa, family, &mut frontend) {
        return ALLOW;
    }
    // SAFETY: the context the kernel passed.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let service = match opted_out(netns) {
        true => None,
        false => service_at(&frontend, netns),
    };
    let Some(service) = service else {
        if call == Call::Connect {
            // Connected elsewhere now: what an earlier connect kept is no longer
            // this socket's peer.
            // SAFETY: the storage of this call's own socket, or null.
            if let Some(kept) = unsafe { VELOX_CONNECTED_FRONTEND.get_ptr_mut(ctx).as_mut() } {
                *kept = SocketFrontend::default();
            }
        }
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
    let asked = SocketFrontend {
        backend: *backend,
        frontend,
    };
    let new_backend = match call {
        Call::Connect => {
            // SAFETY: the storage of this call's own socket, created if it has none.
            if let Some(kept) = unsafe { VELOX_CONNECTED_FRONTEND.get_or_insert_ptr_mut(ctx, None).as_mut() } {
                *kept = asked;
            }
            true
        }
        Call::SendTo => remember_datagram_frontend(ctx, &asked),
    };
    // Once per connect, and per backend a datagram socket newly sends to: not per
    // datagram.
    if new_backend {
        let client = FlowEnd {
            proto: frontend.proto,
            ..FlowEnd::default()
        };
        let from = TranslatedFor {
            netns,
            // SAFETY: a helper without arguments.
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            ifindex: 0,
        };
        report_translation(&client, &asked.frontend, &asked.backend, from);
    }
    // Without memory for the storage the socket works, but its replies show the
    // backend's address.
    ALLOW
}

/// Keeps what a datagram asked for in the slot that already has its backend, or in
/// place of the oldest. True when the backend was not among the kept ones.
#[inline(always)]
fn remember_datagram_frontend(ctx: &SockAddrContext, asked: &SocketFrontend) -> bool {
    // SAFETY: the storage of this call's own socket, created zeroed if it has none.
    let kept = unsafe { VELOX_DATAGRAM_FRONTENDS.get_or_insert_ptr_mut(ctx, None) };
    // SAFETY: a pointer the helper returned is the socket's storage, or null.
    let Some(kept) = (unsafe { kept.as_mut() }) else {
        return true;
    };
    let (slot, new_backend) = match kept.slots.iter().position(|s| s.backend == asked.backend) {
        Some(slot) => (slot, kept.slots[slot].frontend != asked.frontend),
        None => {
            let oldest = kept.next as usize % SOCKET_FRONTEND_SLOTS;
            kept.next = kept.next.wrapping_add(1);
            (oldest, true)
        }
    };
    if let Some(slot) = kept.slots.get_mut(slot) {
        *slot = *asked;
    }
    new_backend
}

/// recvmsg and getpeername: a backend this socket was sent to shows as the frontend.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the context the kernel passed; the verifier checks every access.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut backend = FlowEnd::default();
    if !read_user_end(sa, family, &mut backend) {
        return ALLOW;
    }
    // SAFETY: the storages of this call's own socket, or null where it has none.
    let connected = unsafe { VELOX_CONNECTED_FRONTEND.get_ptr_mut(ctx).as_ref() };
    let frontend = match connected.filter(|kept| kept.backend == backend) {
        Some(kept) => Some(&kept.frontend),
        None => {
            unsafe { VELOX_DATAGRAM_FRONTENDS.get_ptr_mut(ctx).as_ref() }.and_then(|kept| kept.frontend_of(&backend))
        }
    };
    if let Some(frontend) = frontend {
        write_user_end(sa, family, frontend);
    }
    ALLOW
}

/// `struct bpf_iter_meta` (the kernel's, read through BTF): the iterator's output.
#[repr(C)]
pub struct IterMeta {
    seq: *mut aya_ebpf::bindings::seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__udp`, as far as it is read: one UDP socket of the reader's
/// network namespace.
#[repr(C)]
pub struct UdpIterContext {
    meta: *mut IterMeta,
    udp_sk: *mut core::ffi::c_void,
}

/// An iterator over the UDP sockets of the network namespace it is read in (the
/// loader pins its link, and reads it in each pod's namespace): for every socket
/// connected through a Service, its cookie and then its backend and frontend. That
/// is how the loader learns which Service a connected socket came through, since
/// `sock_diag` reports no socket storage of UDP sockets.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn udp_socket_frontends(ctx: *mut UdpIterContext) -> i32 {
    // SAFETY: the context the kernel passed; the verifier types every field by BTF.
    let ctx = unsafe { &*ctx };
    let socket = ctx.udp_sk;
    if socket.is_null() {
        return 0;
    }
    let map = core::ptr::from_ref(&VELOX_CONNECTED_FRONTEND).cast_mut().cast();
    // SAFETY: a socket the kernel handed over; no storage is created (flags 0).
    let kept = unsafe { bpf_sk_storage_get(map, socket, core::ptr::null_mut(), 0) }.cast::<SocketFrontend>();
    // SAFETY: the socket's storage, or null. A cleared one (another connect since)
    // has no protocol.
    if unsafe { kept.as_ref() }.is_none_or(|kept| kept.backend.proto == 0) {
        return 0;
    }
    // SAFETY: as above; the meta pointer is the kernel's.
    unsafe {
        let cookie = bpf_get_socket_cookie(socket);
        let seq = (*ctx.meta).seq;
        bpf_seq_write(seq, core::ptr::from_ref(&cookie).cast(), size_of::<u64>() as u32);
        bpf_seq_write(seq, kept.cast_const().cast(), size_of::<SocketFrontend>() as u32);
    }
    0
}
