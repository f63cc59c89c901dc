//! Outside traffic to Services (`--kube-proxy-replacement`), with Velox's own
//! connection tracking and NAT: a connection from outside to a NodePort on this
//! node's address, or to an external or load-balancer IP, gets a backend when it
//! opens; each of its packets is rewritten on the way in, and each reply on the way
//! out, in `VELOX_NAT` (one entry per direction, LRU, expired by state).
//!
//! `from_net` and `from_pod` hand over only the packets that are the NAT's, by tail
//! call (`from_net_nat`, `from_pod_nat`; a new connection goes on to `nat_open`):
//! the translation has its own verifier budget and stack, and plain pod traffic pays
//! one lookup at most (`from_pod` only for what goes to the kernel).
//!
//! `externalTrafficPolicy: Cluster` masquerades the client as this node (a source
//! port from `NAT_PORTS`), so replies come back through this node wherever the
//! backend is; `Local` gives a backend on this node only and keeps the client's
//! address. Clients that are pods of other nodes get `Cluster`, as kube-proxy gives
//! them. ICMP errors about a translated connection are translated with it. Not
//! translated (the kernel gets them): IP fragments, SCTP.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    btf_maps::{Array, LruHashMap, PerCpuArray, ProgramArray},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use velox_common::{
    AffinityKey, IpKey, NatEntry, NatKey, CT_CLOSED, CT_CLOSING, CT_ESTABLISHED, CT_OPENING, CT_OTHER,
    DEFAULT_NAT_ENTRIES, DROP_NAT_PORTS_EXHAUSTED, DROP_NO_BACKEND, DROP_REDIRECT_FAILED, DROP_SPOOFED, FROM_NET_NAT,
    IPPROTO_TCP, IPPROTO_UDP, NAT_OPEN, NAT_ORIGINAL, NAT_PORTS, NAT_PROGRAMS, NAT_REPLY, SERVICE_EXTERNAL_LOCAL,
    SERVICE_FROM_OUTSIDE, UPLINK_SLOT,
};

use crate::forward::{fits_uplink, local_endpoint, peer_node, to_local_pod, to_network, to_peer_node};
use crate::parse::{copy_end, parse, Packet, ICMP_ERROR_HEADER, IPPROTO_ICMPV6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::policy::{police, Verdict, ALLOWED};
use crate::sav;
use crate::services::{node_address, pick_backend, service_at};
use crate::timeouts::connection_timeouts;
use crate::verdict::{
    delivered_count, finish, interface_slot, report_translation, Outcome, TranslatedFor, COUNT_NONE, COUNT_SENDER,
    NO_SLOT, PASS,
};

#[btf_map]
static VELOX_NAT: LruHashMap<NatKey, NatEntry, { DEFAULT_NAT_ENTRIES as usize }> = LruHashMap::new();

/// This node's address of each family (0 IPv4, 1 IPv6) to masquerade clients as.
#[btf_map]
static VELOX_MASQUERADE: Array<IpKey, 2> = Array::new();

/// Where `open` builds a new connection's entries.
#[repr(C)]
struct NatScratch {
    reply_key: NatKey,
    reply: NatEntry,
    original: NatEntry,
}

#[btf_map]
static VELOX_NAT_SCRATCH: PerCpuArray<NatScratch, 1> = PerCpuArray::new();

#[btf_map]
static VELOX_NAT_PROGRAMS: ProgramArray<{ NAT_PROGRAMS.len() }> = ProgramArray::new();

const IPV4_FRAGMENTED: u16 = 0x3fff;

// A packet's two ends are its NAT key: `Packet` starts with them, in `NatKey`'s layout.
const _: () = assert!(core::mem::offset_of!(Packet, src) == core::mem::offset_of!(NatKey, src));
const _: () = assert!(core::mem::offset_of!(Packet, dst) == core::mem::offset_of!(NatKey, dst));
// Its two ends are the whole key (`connection` writes one end by end).
const _: () = assert!(core::mem::size_of::<NatKey>() == 2 * core::mem::size_of::<velox_common::FlowEnd>());

#[inline(always)]
fn key_of(packet: &Packet) -> &NatKey {
    // SAFETY: both are `repr(C)` and begin with the same two fields (asserted above).
    unsafe { &*(packet as *const Packet).cast::<NatKey>() }
}

/// Whether a packet from the network is the NAT's: one of a translated connection,
/// or one opening a connection to a Service that serves outside traffic.
#[inline(always)]
pub fn is_for_nat_from_net(packet: &Packet) -> bool {
    if unsafe { VELOX_NAT.get(key_of(packet)) }.is_some() {
        return true;
    }
    packet.opens && service_at(&packet.dst, 0).is_some_and(|s| s.flags & SERVICE_FROM_OUTSIDE != 0)
}

/// Whether a packet a pod sends is a reply of a translated connection (or an ICMP
/// error about one).
#[inline(always)]
pub fn is_translated_reply(packet: &Packet) -> bool {
    unsafe { VELOX_NAT.get(key_of(packet)) }.is_some_and(|e| e.direction == NAT_REPLY)
}

/// Tail-calls NAT program `index`; returns only if the call failed (no program there).
#[inline(always)]
pub fn hand_over(ctx: &TcContext, index: u32) {
    // SAFETY: a tail call into a program of this object, of the same type.
    unsafe { VELOX_NAT_PROGRAMS.tail_call(ctx, index) };
}

/// `from_net`'s NAT half, on the uplink: a new connection to a Service from outside,
/// a packet of one towards its backend, or a reply from a backend on another node
/// back to the client.
#[classifier]
pub fn from_net_nat(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    let mut verdict = Verdict::default();
    let outcome = match parse(&ctx, packet) {
        true => translate_from_net(&ctx, packet, &mut verdict),
        false => PASS,
    };
    finish(&ctx, packet, UPLINK_SLOT, outcome, &verdict, delivered_count(outcome))
}

/// A new connection from outside to a Service: `from_net_nat` found no entry. Its
/// own program, for the verifier's budget: it picks the backend, enters both
/// directions and hands the packet back to `from_net_nat`, which translates and
/// delivers it.
#[classifier]
pub fn nat_open(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    // SAFETY: reading the context's own fields.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let outcome = match parse(&ctx, packet) && !packet.is_error && packet.opens {
        true => {
            let now = unsafe { bpf_ktime_get_ns() };
            match open(packet, ifindex, now) {
                Ok(()) => {
                    hand_over(&ctx, FROM_NET_NAT);
                    PASS
                }
                Err(outcome) => outcome,
            }
        }
        false => PASS,
    };
    finish(&ctx, packet, UPLINK_SLOT, outcome, &Verdict::default(), COUNT_NONE)
}

/// `from_pod`'s NAT half: a backend of this node answers a client from outside.
/// `from_pod` validated the source; the reply meets the backend's egress policy
/// here, then leaves translated.
#[classifier]
pub fn from_pod_nat(ctx: TcContext) -> i32 {
    let mut space = core::mem::MaybeUninit::uninit();
    let packet = Packet::zeroed_in(&mut space);
    // SAFETY: reading the context's own fields.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let is_ip = parse(&ctx, packet);
    let sender_slot = if is_ip {
        sav::sender_slot(packet, ifindex)
    } else {
        NO_SLOT
    };
    let mut verdict = Verdict::default();
    let (slot, outcome) = match sender_slot {
        // `from_pod` validated the sender before the tail call: none now is a drop.
        NO_SLOT => (interface_slot(ifindex), if is_ip { DROP_SPOOFED } else { PASS }),
        // An ICMP error a pod sends is about its own connection, or it is forged.
        _ if packet.is_error && packet.sent_from != packet.src.addr => (sender_slot, DROP_SPOOFED),
        _ => {
            police(&ctx, packet, sender_slot, NO_SLOT, false, &mut verdict);
            let outcome = match verdict.result {
                ALLOWED => translate_reply_from_pod(&ctx, packet),
                denied => denied,
            };
            (sender_slot, outcome)
        }
    };
    let count = match sender_slot {
        NO_SLOT => COUNT_NONE,
        _ => COUNT_SENDER,
    };
    finish(&ctx, packet, slot, outcome, &verdict, count)
}

#[inline(always)]
fn translate_from_net(ctx: &TcContext, packet: &mut Packet, verdict: &mut Verdict) -> Outcome {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((entry, other)) = connection(key_of(packet), now) else {
        if packet.opens {
            // `nat_open` enters the connection and hands the packet back here.
            hand_over(ctx, NAT_OPEN);
        }
        return PASS;
    };
    // A reply arrives at the uplink only from a backend on another node: one that
    // claims to come from a pod of this node, or from no pod, is forged. So is an
    // ICMP error about a reply that a pod of another node did not send.
    if entry.direction == NAT_REPLY && !(is_remote_pod(&packet.src.addr) && is_remote_pod(&packet.sent_from)) {
        return DROP_SPOOFED;
    }
    match translate(ctx, packet, entry, other, now) {
        Some(true) => {}
        Some(false) => return DROP_REDIRECT_FAILED,
        None => return PASS,
    }
    if entry.direction == NAT_REPLY {
        return to_network(entry.uplink);
    }
    let endpoint = local_endpoint(&packet.dst.addr);
    if endpoint.exists() {
        police(ctx, packet, NO_SLOT, endpoint.slot, false, verdict);
        if verdict.result == ALLOWED {
            to_local_pod(endpoint.ifindex)
        } else {
            verdict.result
        }
    } else if let Some(peer) = peer_node(&packet.dst.addr).filter(|peer| fits_uplink(ctx, packet, peer)) {
        to_peer_node(peer)
    } else {
        PASS
    }
}

#[inline(always)]
fn translate_reply_from_pod(ctx: &TcContext, packet: &mut Packet) -> Outcome {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((entry, other)) = connection(key_of(packet), now) else {
        return PASS;
    };
    if entry.direction != NAT_REPLY {
        return PASS;
    }
    match translate(ctx, packet, entry, other, now) {
        Some(true) => to_network(entry.uplink),
        Some(false) => DROP_REDIRECT_FAILED,
        None => PASS,
    }
}

/// One packet of `entry`'s direction, rewritten to the entry's ends (and `packet`
/// with it): a packet of the connection, which keeps it alive, or an ICMP error
/// about it. None for what the NAT leaves alone (see `Layout::of`), false when a
/// rewrite failed.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    packet: &mut Packet,
    entry: &mut NatEntry,
    other: &mut NatEntry,
    now: u64,
) -> Option<bool> {
    let rewritten = if packet.is_error {
        rewrite_error(ctx, packet, entry)?
    } else {
        let layout = Layout::of(ctx, packet)?;
        track(entry, other, &layout, now);
        rewrite(ctx, packet, entry, &layout)
    };
    copy_end(&mut packet.src, &entry.src);
    copy_end(&mut packet.dst, &entry.dst);
    Some(rewritten)
}

/// A pod of another node.
#[inline(always)]
fn is_remote_pod(addr: &IpKey) -> bool {
    !local_endpoint(addr).exists() && peer_node(addr).is_some()
}

/// Both directions' entries of the connection a packet with ends `key` belongs to:
/// none when it has been quiet for longer than its state allows, or when its other
/// half is gone or now another connection's (taken over by a connection whose
/// replies carry the same ends, or evicted). Such an original half is removed: its
/// packets would get the other connection's replies.
#[inline(always)]
fn connection(key: &NatKey, now: u64) -> Option<(&'static mut NatEntry, &'static mut NatEntry)> {
    let this = VELOX_NAT.get_ptr_mut(key)?;
    // SAFETY: map values; concurrent updates of a connection's time and state race
    // harmlessly.
    let this = unsafe { &mut *this };
    if this.expired(now, connection_timeouts()?) {
        return None;
    }
    // The other direction's key, its two ends written in place.
    let mut reverse = core::mem::MaybeUninit::<NatKey>::uninit();
    let key_ptr = reverse.as_mut_ptr();
    // SAFETY: the two ends are the whole key.
    let reverse = unsafe {
        copy_end(core::ptr::addr_of_mut!((*key_ptr).src), &this.dst);
        copy_end(core::ptr::addr_of_mut!((*key_ptr).dst), &this.src);
        reverse.assume_init_ref()
    };
    let other = VELOX_NAT.get_ptr_mut(reverse).map(|other| unsafe { &mut *other });
    match other {
        Some(other) if other.dst == key.src && other.src == key.dst => Some((this, other)),
        _ => {
            // A reply half may be a connection `open` is entering right now (it
            // enters that half first): it is left to expire.
            if this.direction == NAT_ORIGINAL {
                let _ = VELOX_NAT.remove(key);
            }
            None
        }
    }
}

/// A new connection from outside to a Service: picks its backend, masquerades the
/// client unless the Service keeps it, and enters both directions.
#[inline(always)]
fn open(packet: &Packet, ifindex: u32, now: u64) -> Result<(), Outcome> {
    let Some(service) = service_at(&packet.dst, 0).filter(|s| s.flags & SERVICE_FROM_OUTSIDE != 0) else {
        return Err(PASS);
    };
    // From the network, a source that is this node (its pods, its addresses) is forged.
    let src = &packet.src.addr;
    if local_endpoint(src).exists() || node_address(src).is_some() || is_unroutable(src) {
        return Err(DROP_SPOOFED);
    }
    let from_cluster = peer_node(&packet.src.addr).is_some();
    let keep_client = service.flags & SERVICE_EXTERNAL_LOCAL != 0 && !from_cluster;
    let choices = if keep_client {
        service.local_backends
    } else {
        service.backends
    };
    let client = AffinityKey {
        service: service.id,
        from_socket: 0,
        client: packet.src.addr,
    };
    let Some(backend) = pick_backend(service, choices, &client, Some(connection_hash(packet)), now) else {
        // Nothing listens on a node address: the kernel refuses the connection.
        let refuse = !keep_client && node_address(&packet.dst.addr).is_some();
        return Err(if refuse { PASS } else { DROP_NO_BACKEND });
    };
    let state = if packet.src.proto == IPPROTO_TCP {
        CT_OPENING
    } else {
        CT_OTHER
    };
    // The entries are built in per-CPU scratch space, not on the stack, which the
    // packet's parse and the verdict's report fill already.
    let scratch = VELOX_NAT_SCRATCH.get_ptr_mut(0).ok_or(DROP_NAT_PORTS_EXHAUSTED)?;
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let scratch = unsafe { &mut *scratch };
    scratch.reply = NatEntry {
        src: packet.dst,
        dst: packet.src,
        last_seen: now,
        state,
        direction: NAT_REPLY,
        uplink: ifindex,
        fin: 0,
    };
    // The key the backend's replies will carry: to the client, or to this node.
    scratch.reply_key = NatKey {
        src: *backend,
        dst: packet.src,
    };
    let entered = if keep_client {
        enter_reply(&scratch.reply_key, &scratch.reply, now)
    } else {
        let family = usize::from(!packet.src.addr.is_v4_mapped()) as u32;
        let masquerade = VELOX_MASQUERADE
            .get(family)
            .filter(|a| **a != IpKey::default())
            .ok_or(DROP_NO_BACKEND)?;
        scratch.reply_key.dst.addr = *masquerade;
        masquerade_port(&mut scratch.reply_key, &scratch.reply, now)
    };
    if !entered {
        return Err(DROP_NAT_PORTS_EXHAUSTED);
    }
    scratch.original = NatEntry {
        src: scratch.reply_key.dst,
        dst: scratch.reply_key.src,
        direction: NAT_ORIGINAL,
        ..scratch.reply
    };
    VELOX_NAT
        .insert(key_of(packet), &scratch.original, 0)
        .map_err(|_| DROP_NAT_PORTS_EXHAUSTED)?;
    let from = TranslatedFor {
        netns: 0,
        cgroup: 0,
        ifindex,
    };
    report_translation(&packet.src, &packet.dst, backend, from);
    Ok(())
}

/// A hash of a connection's ends, the same on every node (the key of a Maglev pick).
#[inline(always)]
fn connection_hash(packet: &Packet) -> u32 {
    let (src, dst) = (packet.src.addr.words(), packet.dst.addr.words());
    let ports = (u32::from(packet.src.port) << 16) | u32::from(packet.dst.port);
    // FNV-1a over 32-bit words, then murmur3's finaliser to spread the bits.
    let mut hash: u32 = 0x811c_9dc5;
    for word in [
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        ports,
        u32::from(packet.src.proto),
    ] {
        hash = (hash ^ word).wrapping_mul(0x0100_0193);
    }
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// Gives the masqueraded client end of `reply_key` a source port no live connection
/// to its backend uses, entering `reply` under it: from a random port on, the next
/// ones in turn (a few tries, so a pool that is mostly in use still gives one).
#[inline(always)]
fn masquerade_port(reply_key: &mut NatKey, reply: &NatEntry, now: u64) -> bool {
    let ports = u32::from(*NAT_PORTS.end() - *NAT_PORTS.start()) + 1;
    let first = unsafe { bpf_get_prandom_u32() } % ports;
    for offset in 0..MASQUERADE_TRIES {
        let port = *NAT_PORTS.start() + ((first + offset) % ports) as u16;
        reply_key.dst.port = port.to_be();
        if enter_reply(reply_key, reply, now) {
            return true;
        }
    }
    false
}

/// Ports `masquerade_port` tries for one connection.
const MASQUERADE_TRIES: u32 = 16;

/// Enters `reply` under `key`, unless a live connection holds that key: another
/// connection's replies are never taken over. An expired one's entry (LRU maps keep
/// them until full) is replaced, and so is a closed TCP connection's (FINs both ways
/// and the last ACK through, or a RST) once it has been quiet for a moment: the
/// masquerading ports turn over as fast as connections do, as conntrack lets a SYN
/// take a tuple in TIME_WAIT.
#[inline(always)]
fn enter_reply(key: &NatKey, reply: &NatEntry, now: u64) -> bool {
    if VELOX_NAT.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    let Some(held) = (unsafe { VELOX_NAT.get(key) }) else {
        return false;
    };
    let quiet = now.saturating_sub(held.last_seen);
    let expired = connection_timeouts().is_none_or(|timeouts| held.expired(now, timeouts));
    let over = expired || (held.state == CT_CLOSED && quiet > CLOSED_QUIET_NS);
    over && VELOX_NAT.insert(key, reply, u64::from(BPF_EXIST)).is_ok()
}

/// How long a closed TCP connection keeps its ends after its last packet: time for a
/// forged RST's challenge ACK to open it again, and for a last ACK to get through.
const CLOSED_QUIET_NS: u64 = 100_000_000;

/// Loopback, unspecified and link-local sources: never a client from the network.
#[inline(always)]
fn is_unroutable(addr: &IpKey) -> bool {
    let a = &addr.addr;
    if addr.is_v4_mapped() {
        a[12] == 127 || a[12] == 0 || (a[12] == 169 && a[13] == 254)
    } else {
        *a == [0; 16]
            || *a == IpKey::v6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).addr
            || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
    }
}

/// Keeps both directions of the connection alive, and follows TCP's state: the first
/// reply establishes it, a FIN half-closes it, a packet after FINs both ways (the
/// last ACK) or a RST closes it, a new SYN opens it again. Nothing here checks
/// sequence numbers, so a forged FIN or RST must not end a live connection: a
/// connection closed by a RST that goes on (the receiver's challenge ACK, RFC 5961)
/// is open again, and so is one whose side sends data after its FIN.
#[inline(always)]
fn track(entry: &mut NatEntry, other: &mut NatEntry, layout: &Layout, now: u64) {
    let mut state = entry.state;
    if layout.proto == IPPROTO_TCP {
        let flags = layout.tcp_flags;
        if layout.payload && flags & TCP_FIN == 0 {
            entry.fin = 0;
        }
        let both_fins = entry.fin != 0 && other.fin != 0;
        if flags & TCP_RST != 0 {
            state = CT_CLOSED;
        } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && entry.direction == NAT_ORIGINAL {
            state = CT_OPENING;
            entry.fin = 0;
            other.fin = 0;
        } else if flags & TCP_FIN != 0 {
            entry.fin = 1;
            if state != CT_CLOSED {
                state = CT_CLOSING;
            }
        } else if both_fins {
            state = CT_CLOSED;
        } else if state == CT_CLOSED || state == CT_CLOSING {
            // Still talking: a RST or FIN that closed it was not the connection's.
            state = if entry.fin | other.fin != 0 {
                CT_CLOSING
            } else {
                CT_ESTABLISHED
            };
        } else if entry.direction == NAT_REPLY && state == CT_OPENING {
            state = CT_ESTABLISHED;
        }
    }
    entry.last_seen = now;
    entry.state = state;
    other.last_seen = now;
    other.state = state;
}

/// Where the checksums and the TCP flags of a packet the NAT rewrites lie.
struct Layout {
    v4: bool,
    proto: u8,
    tcp_flags: u8,
    /// Whether the segment carries data.
    payload: bool,
    /// The transport header.
    l4: usize,
    /// The transport checksum.
    checksum: usize,
}

impl Layout {
    /// None for what the NAT leaves alone: fragments, IPv6 extension headers,
    /// protocols other than TCP and UDP.
    #[inline(always)]
    fn of(ctx: &TcContext, packet: &Packet) -> Option<Self> {
        let v4 = packet.dst.addr.is_v4_mapped();
        let proto = packet.dst.proto;
        // Where the transport header starts, and how long it is with its payload
        // (from the IP header: a short frame may carry Ethernet padding).
        let (l4, l4_len) = if v4 {
            let ip = ctx.load::<Ipv4Hdr>(EthHdr::LEN).ok()?;
            if u16::from_be_bytes(ip.frags) & IPV4_FRAGMENTED != 0 || ip.proto != proto {
                return None;
            }
            let header = usize::from(ip.ihl());
            (
                EthHdr::LEN + header,
                usize::from(u16::from_be_bytes(ip.tot_len)).saturating_sub(header),
            )
        } else {
            // payload length at bytes 4-5, next header at byte 6 of the fixed header
            let fixed = ctx.load::<[u8; 7]>(EthHdr::LEN).ok()?;
            if fixed[6] != proto {
                return None;
            }
            (EthHdr::LEN + 40, usize::from(u16::from_be_bytes([fixed[4], fixed[5]])))
        };
        let (checksum, tcp_flags, payload) = match proto {
            IPPROTO_TCP => {
                // data offset (in 32-bit words), flags
                let [offset, flags] = ctx.load::<[u8; 2]>(l4 + 12).ok()?;
                (l4 + 16, flags, l4_len > usize::from(offset >> 4) * 4)
            }
            IPPROTO_UDP => (l4 + 6, 0, true),
            _ => return None,
        };
        Some(Self {
            v4,
            proto,
            tcp_flags,
            payload,
            l4,
            checksum,
        })
    }

    /// `bpf_l4_csum_replace`'s flags: a UDP checksum of 0 (none, IPv4) stays 0.
    #[inline(always)]
    fn l4_flags(&self) -> u64 {
        match self.proto {
            IPPROTO_UDP => u64::from(BPF_F_MARK_MANGLED_0),
            _ => 0,
        }
    }
}

/// Rewrites the packet's ends to `to`'s, with the checksums.
#[inline(always)]
fn rewrite(ctx: &TcContext, packet: &Packet, to: &NatEntry, layout: &Layout) -> bool {
    let addresses = if layout.v4 {
        rewrite_v4_address(ctx, layout, 12, &packet.src.addr, &to.src.addr)
            && rewrite_v4_address(ctx, layout, 16, &packet.dst.addr, &to.dst.addr)
    } else {
        rewrite_v6_address(ctx, layout, 8, &packet.src.addr, &to.src.addr)
            && rewrite_v6_address(ctx, layout, 24, &packet.dst.addr, &to.dst.addr)
    };
    addresses
        && rewrite_port(ctx, layout, 0, packet.src.port, to.src.port)
        && rewrite_port(ctx, layout, 2, packet.dst.port, to.dst.port)
}

/// The IPv4 address at `offset` in the IP header, from `old` to `new`.
#[inline(always)]
fn rewrite_v4_address(ctx: &TcContext, layout: &Layout, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    let (old, new) = (old.words()[3], new.words()[3]);
    if old == new {
        return true;
    }
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | 4 | layout.l4_flags();
    ctx.l4_csum_replace(layout.checksum, u64::from(old), u64::from(new), pseudo)
        .is_ok()
        && ctx
            .l3_csum_replace(EthHdr::LEN + 10, u64::from(old), u64::from(new), 4)
            .is_ok()
        && ctx.store(EthHdr::LEN + offset, &new, 0).is_ok()
}

/// The IPv6 address at `offset` in the IP header, from `old` to `new`.
#[inline(always)]
fn rewrite_v6_address(ctx: &TcContext, layout: &Layout, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    if old == new {
        return true;
    }
    // SAFETY: both are 16 readable bytes.
    let diff = unsafe { bpf_csum_diff(old.addr.as_ptr() as *mut u32, 16, new.addr.as_ptr() as *mut u32, 16, 0) };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | layout.l4_flags();
    ctx.l4_csum_replace(layout.checksum, 0, diff as u64, pseudo).is_ok()
        && ctx.store(EthHdr::LEN + offset, &new.addr, 0).is_ok()
}

/// The port at `offset` in the transport header (network byte order), from `old` to `new`.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, layout: &Layout, offset: usize, old: u16, new: u16) -> bool {
    if old == new {
        return true;
    }
    ctx.l4_csum_replace(layout.checksum, u64::from(old), u64::from(new), 2 | layout.l4_flags())
        .is_ok()
        && ctx.store(layout.l4 + offset, &new, 0).is_ok()
}

/// Where the parts of an ICMP error a translation rewrites lie.
struct ErrorLayout {
    v4: bool,
    /// The ICMP header (its checksum 2 bytes in).
    icmp: usize,
    /// The quoted packet's IP header and its transport header.
    quoted: usize,
    quoted_l4: usize,
}

impl ErrorLayout {
    /// None for a fragment or an IPv6 error behind extension headers.
    #[inline(always)]
    fn of(ctx: &TcContext, v4: bool) -> Option<Self> {
        let icmp = if v4 {
            let ip = ctx.load::<Ipv4Hdr>(EthHdr::LEN).ok()?;
            if u16::from_be_bytes(ip.frags) & IPV4_FRAGMENTED != 0 {
                return None;
            }
            EthHdr::LEN + usize::from(ip.ihl())
        } else {
            if ctx.load::<u8>(EthHdr::LEN + 6).ok()? != IPPROTO_ICMPV6 {
                return None;
            }
            EthHdr::LEN + 40
        };
        let quoted = icmp + ICMP_ERROR_HEADER;
        let quoted_l4 = if v4 {
            quoted + usize::from(ctx.load::<Ipv4Hdr>(quoted).ok()?.ihl())
        } else {
            quoted + 40
        };
        Some(Self {
            v4,
            icmp,
            quoted,
            quoted_l4,
        })
    }
}

/// An ICMP error about a translated connection, travelling as a packet of `entry`'s
/// direction would (towards the end whose packet it quotes): sent on to that end's
/// translated address, quoting the packet as that end sent it. An error the
/// connection's peer sent itself (a port unreachable) comes from the peer's
/// translated address; one from a router keeps the router's. The quoted transport
/// checksum is left as it is (the kernel does not check it). None for what the NAT
/// leaves alone, false when a rewrite failed.
#[inline(always)]
fn rewrite_error(ctx: &TcContext, packet: &Packet, entry: &NatEntry) -> Option<bool> {
    let layout = ErrorLayout::of(ctx, packet.dst.addr.is_v4_mapped())?;
    let from_peer = packet.sent_from == packet.src.addr;
    // `packet` is the error as a packet of the connection: from the quoted packet's
    // receiver (`src`) to its sender (`dst`, the error's receiver).
    let outer = if layout.v4 {
        (!from_peer || outer_v4(ctx, 12, &packet.src.addr, &entry.src.addr))
            && outer_v4(ctx, 16, &packet.dst.addr, &entry.dst.addr)
    } else {
        (!from_peer || outer_v6(ctx, &layout, 8, &packet.src.addr, &entry.src.addr))
            && outer_v6(ctx, &layout, 24, &packet.dst.addr, &entry.dst.addr)
    };
    let quoted = if layout.v4 {
        quoted_v4(ctx, &layout, 12, &packet.dst.addr, &entry.dst.addr)
            && quoted_v4(ctx, &layout, 16, &packet.src.addr, &entry.src.addr)
    } else {
        quoted_v6(ctx, &layout, 8, &packet.dst.addr, &entry.dst.addr)
            && quoted_v6(ctx, &layout, 24, &packet.src.addr, &entry.src.addr)
    };
    Some(
        outer
            && quoted
            && quoted_port(ctx, &layout, 0, packet.dst.port, entry.dst.port)
            && quoted_port(ctx, &layout, 2, packet.src.port, entry.src.port),
    )
}

/// The error's own IPv4 address at `offset` in its header: the IP checksum follows
/// (ICMP's covers no pseudo-header).
#[inline(always)]
fn outer_v4(ctx: &TcContext, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    let (old, new) = (old.words()[3], new.words()[3]);
    old == new
        || (ctx
            .l3_csum_replace(EthHdr::LEN + 10, u64::from(old), u64::from(new), 4)
            .is_ok()
            && ctx.store(EthHdr::LEN + offset, &new, 0).is_ok())
}

/// The error's own IPv6 address at `offset`: ICMPv6's checksum covers it.
#[inline(always)]
fn outer_v6(ctx: &TcContext, layout: &ErrorLayout, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    old == new
        || (icmp_checksum_diff(ctx, layout, old, new, u64::from(BPF_F_PSEUDO_HDR))
            && ctx.store(EthHdr::LEN + offset, &new.addr, 0).is_ok())
}

/// The quoted IPv4 address at `offset` in the quoted header, with the quoted IP
/// checksum: the two changes cancel out in the ICMP checksum.
#[inline(always)]
fn quoted_v4(ctx: &TcContext, layout: &ErrorLayout, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    let (old, new) = (old.words()[3], new.words()[3]);
    old == new
        || (ctx
            .l3_csum_replace(layout.quoted + 10, u64::from(old), u64::from(new), 4)
            .is_ok()
            && ctx.store(layout.quoted + offset, &new, 0).is_ok())
}

/// The quoted IPv6 address at `offset` in the quoted header: part of ICMPv6's payload.
#[inline(always)]
fn quoted_v6(ctx: &TcContext, layout: &ErrorLayout, offset: usize, old: &IpKey, new: &IpKey) -> bool {
    old == new
        || (icmp_checksum_diff(ctx, layout, old, new, 0) && ctx.store(layout.quoted + offset, &new.addr, 0).is_ok())
}

/// The quoted port at `offset` in the quoted transport header: part of ICMP's payload.
#[inline(always)]
fn quoted_port(ctx: &TcContext, layout: &ErrorLayout, offset: usize, old: u16, new: u16) -> bool {
    old == new
        || (ctx
            .l4_csum_replace(layout.icmp + 2, u64::from(old), u64::from(new), 2)
            .is_ok()
            && ctx.store(layout.quoted_l4 + offset, &new, 0).is_ok())
}

/// ICMP's checksum after 16 bytes of an address went from `old` to `new`.
#[inline(always)]
fn icmp_checksum_diff(ctx: &TcContext, layout: &ErrorLayout, old: &IpKey, new: &IpKey, flags: u64) -> bool {
    // SAFETY: both are 16 readable bytes.
    let diff = unsafe { bpf_csum_diff(old.addr.as_ptr() as *mut u32, 16, new.addr.as_ptr() as *mut u32, 16, 0) };
    ctx.l4_csum_replace(layout.icmp + 2, 0, diff as u64, flags).is_ok()
}
