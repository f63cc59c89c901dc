//! NetworkPolicy: whether a packet between a sender and a receiver may pass, decided
//! once per connection. A pod no policy isolates costs one array read per side; a
//! connection already allowed costs one hash lookup, whatever the number of
//! policies; only the first packet of a connection (or the first after the loader
//! changed the rules) walks the rules.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        BPF_EXIST, BPF_F_CURRENT_NETNS, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST,
    },
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::{bpf_ktime_get_coarse_ns, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::btf_map,
    programs::TcContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use velox_common::{
    AllowedFlow, FlowEnd, IdentityRuleKey, IpKey, PolicyFlow, PolicyKey, PolicyPorts, PolicyState, CT_CLOSED,
    CT_CLOSING, CT_ESTABLISHED, CT_OPENING, CT_OTHER, DROP_POLICY_EGRESS, DROP_POLICY_FLOWS_FULL, DROP_POLICY_INGRESS,
    EGRESS, INGRESS, IPPROTO_TCP, IPPROTO_UDP, ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_ENDPOINTS, MAX_POLICY_FLOWS,
    MAX_POLICY_IDENTITIES, MAX_POLICY_RULES, MAX_PORT_RULES, OPENED_BY_FIRST, OPENED_BY_SECOND, POLICY_FLOW_POOL_SIZE,
    POLICY_FLOW_POOL_USED, POLICY_FLOW_RESERVED, POLICY_FLOW_SHARES, POLICY_KEY_FIXED_BITS, RULES_VERSION,
};

use crate::{
    forward::{local_endpoint, peer_node},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    timeouts::connection_timeouts,
    verdict::{Outcome, NO_SLOT, PASS},
};

/// By counters slot; as long as the largest `--max-pods`, so a new `--max-pods`
/// never leaves running programs with an old copy.
#[btf_map]
static VELOX_POLICY_STATE: Array<PolicyState, MAX_ENDPOINTS> = Array::new();

/// Rules by peer prefix: `ipBlock`s, and rules for every peer.
#[btf_map]
static VELOX_POLICY_RULES: LpmTrie<PolicyKey, PolicyPorts, MAX_POLICY_RULES> = LpmTrie::new();

/// Rules by peer identity: the pods a selector picks, one entry per label set.
#[btf_map]
static VELOX_POLICY_IDENTITY_RULES: HashMap<
    IdentityRuleKey,
    PolicyPorts,
    MAX_POLICY_RULES,
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Cluster pod address -> identity.
#[btf_map]
static VELOX_POLICY_IDENTITIES: HashMap<IpKey, u64, MAX_POLICY_IDENTITIES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Connections allowed, both directions under one key. Each is charged to a pod's
/// share (`VELOX_POLICY_FLOW_SHARES`), and the shares are sized so the LRU never
/// has to evict: one pod's connections cannot push out another's.
#[btf_map]
static VELOX_POLICY_FLOWS: LruHashMap<PolicyFlow, AllowedFlow, MAX_POLICY_FLOWS> = LruHashMap::new();

/// Entries of `VELOX_POLICY_FLOWS` each slot holds, then the pool's use and limits
/// (`POLICY_FLOW_POOL_*`, `POLICY_FLOW_RESERVED`). Memory-mapped: the loader sets
/// the limits, and its sweep counts the shares again from the live entries.
#[btf_map]
static VELOX_POLICY_FLOW_SHARES: Array<u64, POLICY_FLOW_SHARES, { BPF_F_MMAPABLE as usize }> = Array::new();

#[btf_map]
static VELOX_POLICY_GENERATION: Array<u32, 1> = Array::new();

/// Allowed by policy (or no policy applies): forwarding decides.
pub const ALLOWED: Outcome = PASS;

/// The decision on a packet.
pub struct Verdict {
    /// `ALLOWED`, `DROP_POLICY_EGRESS` or `DROP_POLICY_INGRESS`.
    pub result: Outcome,
    /// A rule walk allowed a packet that opens a connection: worth an event.
    pub new_connection: bool,
    /// A rule walk decided: [`walked_policies`] names the policies.
    pub walked: bool,
    /// The coarse clock as policy read it (0: not read), for the flow records to
    /// reuse: one read per packet.
    pub now: u64,
}

impl Default for Verdict {
    fn default() -> Self {
        Self {
            result: ALLOWED,
            new_connection: false,
            walked: false,
            now: 0,
        }
    }
}

/// The policies whose rules allowed each direction in this CPU's last rule walk.
/// Kept in a map, not in the verdict: the verifier cannot tell the values in a map
/// apart, so the rest of a program is walked once whichever policies allowed.
#[repr(C)]
struct WalkedPolicies {
    egress: u16,
    ingress: u16,
}

#[btf_map]
static VELOX_WALKED_POLICIES: PerCpuArray<WalkedPolicies, 1> = PerCpuArray::new();

/// (egress, ingress): the policies that allowed each direction of the packet whose
/// `verdict` a rule walk decided (0: none was needed, or none allowed).
#[inline(always)]
pub fn walked_policies(verdict: &Verdict) -> (u16, u16) {
    match verdict.walked {
        true => VELOX_WALKED_POLICIES.get(0).map_or((0, 0), |p| (p.egress, p.ingress)),
        false => (0, 0),
    }
}

/// Decides `packet` from the pod in `src_slot` to the pod in `dst_slot` (`NO_SLOT`
/// for an end that is not a pod of this node: its node, if any, polices it).
/// `ingress_elsewhere`: the packet goes to the kernel, and the receiver's ingress is
/// judged where the kernel delivers it (`to_pod`); until then the connection it opens
/// is trusted only for its replies.
#[inline(always)]
pub fn police(
    ctx: &TcContext,
    packet: &Packet,
    src_slot: u32,
    dst_slot: u32,
    ingress_elsewhere: bool,
    verdict: &mut Verdict,
) {
    let (src_flags, dst_flags) = (flags(src_slot), flags(dst_slot));
    // Connections of an isolated pod are followed whichever way they go: the replies
    // of one the pod accepted pass its egress rules, and the reverse.
    if (src_flags | dst_flags) & (ISOLATED_INGRESS | ISOLATED_EGRESS) == 0 {
        return;
    }
    let generation = VELOX_POLICY_GENERATION.get(0).map_or(0, |g| *g);
    let (src, dst) = (&packet.src, &packet.dst);
    // The key and a new entry are built in per-CPU space: `to_pod`'s frame and the
    // global functions' together must stay within 512 bytes.
    let Some(scratch) = VELOX_FLOW_SCRATCH.get_ptr_mut(0) else {
        verdict.result = DROP_POLICY_INGRESS;
        return;
    };
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let scratch = unsafe { &mut *scratch };
    let src_first;
    (scratch.key, src_first) = PolicyFlow::of(src, dst);
    // The coarse clock (a tick's resolution, no clock source read) serves timeouts
    // in seconds.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    verdict.now = now;
    let known = live_flow(&scratch.key, now);
    // An ICMP error opens nothing and proves nothing: it passes only about a
    // connection allowed under the rules in force, and, sent by a pod of this node,
    // only from that connection's peer (a pod is no router on the path). Never a
    // rule walk, never recorded.
    if packet.is_error {
        let current = known.is_some_and(|flow| unsafe { (*flow).generation } == generation);
        let from_peer = src_slot == NO_SLOT || packet.sent_from == src.addr;
        if !(current && from_peer) {
            verdict.result = if src_flags & ISOLATED_EGRESS != 0 {
                DROP_POLICY_EGRESS
            } else {
                DROP_POLICY_INGRESS
            };
        }
        return;
    }
    if let Some(flow) = known {
        // SAFETY: a map value; racing writers write the same values.
        let (current, opened_by_src, pending) = unsafe {
            (
                (*flow).generation == generation,
                ((*flow).opener == OPENED_BY_FIRST) == src_first,
                (*flow).ingress_pending != 0,
            )
        };
        if current && !(pending && opened_by_src) {
            touch(flow, packet, opened_by_src, now);
            return;
        }
    }
    // The entry this packet would make, in per-CPU space rather than on the stack.
    scratch.flow = AllowedFlow {
        generation,
        opener: if src_first { OPENED_BY_FIRST } else { OPENED_BY_SECOND },
        // Traffic the rules allow one way makes its replies allowed, also for a
        // connection that was open before its pod was isolated.
        ingress_pending: u32::from(ingress_elsewhere),
        // The opener's share; a connection from elsewhere, the receiver's.
        charged: if src_slot != NO_SLOT { src_slot } else { dst_slot },
        state: opening_state(packet),
        pad: 0,
        last_seen: now,
    };
    check(src_slot, src_flags, dst_slot, dst_flags, src, dst, verdict, true);
    if verdict.result == ALLOWED {
        record_allowed(known, scratch, src_first, packet, src_flags, verdict);
        return;
    }
    // A reply whose connection the rules have changed under: the direction that
    // opened it decides, as it did then.
    if let Some(flow) = known {
        let opened_by_src = (unsafe { (*flow).opener } == OPENED_BY_FIRST) == src_first;
        if !opened_by_src {
            let mut again = Verdict::default();
            // Not recorded: the packet's drop names the policies of its own walk.
            check(dst_slot, dst_flags, src_slot, src_flags, dst, src, &mut again, false);
            if again.result == ALLOWED {
                rewrite(flow, scratch, false, packet);
                *verdict = Verdict::default();
                return;
            }
        }
    }
    // The host reaches its pods through the kernel, where no program sees the
    // connection open (kubelet's probes): their replies pass.
    if verdict.result == DROP_POLICY_EGRESS && src_slot != NO_SLOT && host_has_connection(ctx, src, dst) {
        *verdict = Verdict::default();
    }
}

/// Records that the rules allowed a packet of a connection (`known`: its entry;
/// `scratch`: its key, and the entry the packet would make).
#[inline(always)]
fn record_allowed(
    known: Option<*mut AllowedFlow>,
    scratch: &mut FlowScratch,
    src_first: bool,
    packet: &Packet,
    src_flags: u32,
    verdict: &mut Verdict,
) {
    match known {
        Some(flow) => {
            let opened_by_src = (unsafe { (*flow).opener } == OPENED_BY_FIRST) == src_first;
            rewrite(flow, scratch, opened_by_src, packet);
        }
        // A packet in the middle of a connection the map does not know (one open
        // before its pod was isolated) does not say who opened it. Sent by a pod
        // isolated for ingress, crediting it would open its ingress to the
        // other end: it passes on its own, and the other end's next packet is
        // judged on its own too.
        None if !packet.opens && src_flags & ISOLATED_INGRESS != 0 => {}
        None => {
            // What cannot be followed is not let through: its replies would be
            // judged as new connections, or worse, pass unjudged later.
            if velox_policy_flow_enter(&scratch.key, &scratch.flow) == 0 {
                verdict.result = DROP_POLICY_FLOWS_FULL;
                return;
            }
            verdict.new_connection = packet.opens;
        }
    }
}

/// Writes the entry of a connection the rules allowed again under the generation now
/// (`scratch`: its key, and the generation, receiver's judgement and time of this
/// packet), by key: never through `flow`, whose entry may have been removed since
/// and its memory given to another connection. The opening direction's receiver has
/// now been judged here, or is to be judged (again, under these rules) where the
/// kernel delivers; a reply leaves that as it was. An entry removed meanwhile stays
/// removed: the next packet is judged anew.
#[inline(always)]
fn rewrite(flow: *mut AllowedFlow, scratch: &mut FlowScratch, opened_by_src: bool, packet: &Packet) {
    // SAFETY: a map value, read once; what it holds is only carried over.
    let held = unsafe { *flow };
    scratch.flow.opener = held.opener;
    scratch.flow.charged = held.charged;
    if !opened_by_src {
        scratch.flow.ingress_pending = held.ingress_pending;
    }
    scratch.flow.state = next_state(held.state, packet, opened_by_src);
    let _ = VELOX_POLICY_FLOWS.insert(&scratch.key, &scratch.flow, u64::from(BPF_EXIST));
}

/// A packet the node's own processes send into the pod behind host veth `ifindex`:
/// host-to-pod is allowed by default, and an egress-isolated pod's replies to it
/// pass as replies, also to an unconnected UDP socket, which `host_has_connection`
/// cannot tell from a server the pod would reach on its own. It only prepares a new
/// entry, which `to_pod` enters (`enter_host_flow`): a call of its own beside the
/// global function's frame would not fit `to_pod`'s stack. True when there is one
/// to enter.
#[inline(always)]
pub fn host_sent(packet: &Packet, ifindex: u32) -> bool {
    let receiver = local_endpoint(&packet.dst.addr);
    if !receiver.exists() || receiver.ifindex != ifindex {
        return false;
    }
    // What the node sends from a pod's address is not the host's own: it stands for
    // no connection of the host.
    let from_a_pod = local_endpoint(&packet.src.addr).exists() || peer_node(&packet.src.addr).is_some();
    if !packet.opens || from_a_pod || flags(receiver.slot) & ISOLATED_EGRESS == 0 {
        return false;
    }
    // The key and entry are built in per-CPU space: this call's frame and `to_pod`'s
    // together must stay within 512 bytes, with datapath logging's on top. `police`
    // uses the space after this call is done.
    let Some(scratch) = VELOX_FLOW_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let scratch = unsafe { &mut *scratch };
    let src_first;
    (scratch.key, src_first) = PolicyFlow::of(&packet.src, &packet.dst);
    let host_opener = if src_first { OPENED_BY_FIRST } else { OPENED_BY_SECOND };
    let generation = VELOX_POLICY_GENERATION.get(0).map_or(0, |g| *g);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match live_flow(&scratch.key, now) {
        // SAFETY: a map value; racing writers write the same values.
        Some(flow) => unsafe {
            // One the pod opened stays the pod's: its rules go on judging it.
            if (*flow).opener == host_opener {
                (*flow).generation = generation;
            }
            touch(flow, packet, (*flow).opener == host_opener, now);
            false
        },
        None => {
            scratch.flow = AllowedFlow {
                generation,
                opener: host_opener,
                ingress_pending: 0,
                charged: receiver.slot,
                state: opening_state(packet),
                pad: 0,
                last_seen: now,
            };
            true
        }
    }
}

/// Enters the connection `host_sent` prepared. Not followed (no share left), the
/// pod's replies meet its egress rules: denied unless they allow them.
#[inline(always)]
pub fn enter_host_flow() {
    if let Some(scratch) = VELOX_FLOW_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, as `host_sent` left it.
        let scratch = unsafe { &*scratch };
        velox_policy_flow_enter(&scratch.key, &scratch.flow);
    }
}

/// The entry of the connection `key`, unless it has lived out its timeout: then the
/// connection is new again, and its entry is replaced when it is entered anew (or
/// swept by the loader).
#[inline(always)]
fn live_flow(key: &PolicyFlow, now: u64) -> Option<*mut AllowedFlow> {
    let flow = VELOX_POLICY_FLOWS.get_ptr_mut(key)?;
    let timeouts = connection_timeouts()?;
    // SAFETY: a map value.
    unsafe { !(*flow).expired(now, timeouts) }.then_some(flow)
}

/// The state a packet (`from_opener`: sent by the end that opened the connection)
/// moves a connection in `state` to.
#[inline(always)]
fn next_state(state: u32, packet: &Packet, from_opener: bool) -> u32 {
    let flags = packet.tcp_flags;
    match state {
        _ if packet.src.proto != IPPROTO_TCP => CT_OTHER,
        _ if flags & TCP_RST != 0 => CT_CLOSED,
        _ if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => CT_OPENING,
        _ if flags & TCP_FIN != 0 => CT_CLOSING,
        CT_OPENING if !from_opener => CT_ESTABLISHED,
        CT_CLOSED => CT_ESTABLISHED,
        state => state,
    }
}

/// The state a connection's first allowed packet puts it in.
#[inline(always)]
fn opening_state(packet: &Packet) -> u32 {
    match packet.src.proto {
        IPPROTO_TCP if packet.opens => CT_OPENING,
        // A connection open before its pod was isolated, met mid-way.
        IPPROTO_TCP => CT_ESTABLISHED,
        _ => CT_OTHER,
    }
}

/// Follows a packet of an allowed connection (`from_opener`: sent by the end that
/// opened it): its TCP state and its last packet, written only when they change
/// (the time, once a second), so a busy connection does not keep a cache line
/// bouncing between CPUs. A FIN or RST only shortens the connection's life; a
/// forged one cannot end a connection that goes on talking.
/// Only the time and state are written here, through the pointer: should the entry
/// have been removed and its memory given to another allowed connection meanwhile,
/// that one lives a little longer.
#[inline(always)]
fn touch(flow: *mut AllowedFlow, packet: &Packet, from_opener: bool, now: u64) {
    // SAFETY: a map value; racing writers write values as good.
    let flow = unsafe { &mut *flow };
    let state = next_state(flow.state, packet, from_opener);
    if state != flow.state {
        flow.state = state;
    }
    if now.saturating_sub(flow.last_seen) >= 1_000_000_000 || state == CT_CLOSED {
        flow.last_seen = now;
    }
}

/// Enters an allowed connection, charged to its pod's share: its reserved share
/// first, then the pool. An expired entry of the same ends gives its share back and
/// makes way. 1 when entered (or another CPU entered it first), 0 when the shares
/// are spent. A global function: verified once, not at every caller.
#[no_mangle]
#[inline(never)]
pub extern "C" fn velox_policy_flow_enter(key: *const PolicyFlow, flow: *const AllowedFlow) -> u32 {
    if key.is_null() || flow.is_null() {
        return 0;
    }
    // SAFETY: checked for null; the verifier checks their size.
    let (key, flow) = unsafe { (&*key, &*flow) };
    if !charge(flow.charged) {
        return 0;
    }
    if VELOX_POLICY_FLOWS.insert(key, flow, u64::from(BPF_NOEXIST)).is_ok() {
        return 1;
    }
    let (Some(held), Some(timeouts)) = (VELOX_POLICY_FLOWS.get_ptr(key), connection_timeouts()) else {
        uncharge(flow.charged);
        return 0;
    };
    // SAFETY: a map value.
    let (expired, charged) = unsafe { ((*held).expired(flow.last_seen, timeouts), (*held).charged) };
    // Entered by another CPU meanwhile: followed all the same.
    if !expired {
        uncharge(flow.charged);
        return 1;
    }
    // Whoever removes the expired entry gives its share back.
    if VELOX_POLICY_FLOWS.remove(key).is_ok() {
        uncharge(charged);
    }
    if VELOX_POLICY_FLOWS.insert(key, flow, u64::from(BPF_NOEXIST)).is_ok() {
        return 1;
    }
    uncharge(flow.charged);
    u32::from(VELOX_POLICY_FLOWS.get_ptr(key).is_some())
}

/// The counter at `index` of `VELOX_POLICY_FLOW_SHARES`.
#[inline(always)]
fn share(index: u32) -> Option<*mut u64> {
    VELOX_POLICY_FLOW_SHARES.get_ptr_mut(index)
}

/// Adds `delta` (wrapping: `u64::MAX` takes one away) with one BPF atomic add.
#[inline(always)]
fn add(counter: *mut u64, delta: u64) {
    // SAFETY: a map value, 8-byte aligned; every writer adds atomically.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

#[inline(always)]
fn read(counter: *mut u64) -> u64 {
    // SAFETY: a map value, 8-byte aligned: an aligned load is atomic.
    unsafe { core::ptr::read_volatile(counter) }
}

/// Takes one entry for `slot`: from its reserved share, or else from the pool.
/// Read, then added to: CPUs racing at the limit may each take one more, which the
/// map's slack (the loader sizes the shares below its capacity) absorbs.
#[inline(always)]
fn charge(slot: u32) -> bool {
    let (Some(held), Some(pool), Some(pool_size), Some(reserved)) = (
        share(slot),
        share(POLICY_FLOW_POOL_USED),
        share(POLICY_FLOW_POOL_SIZE),
        share(POLICY_FLOW_RESERVED),
    ) else {
        return false;
    };
    if read(held) >= read(reserved) {
        if read(pool) >= read(pool_size) {
            return false;
        }
        add(pool, 1);
    }
    add(held, 1);
    true
}

/// Gives one entry of `slot` back: to the pool if it held more than its reserve.
#[inline(always)]
fn uncharge(slot: u32) {
    let (Some(held), Some(pool), Some(reserved)) =
        (share(slot), share(POLICY_FLOW_POOL_USED), share(POLICY_FLOW_RESERVED))
    else {
        return;
    };
    // Never below zero: a count the loader's recount just lowered stays at zero
    // until its next recount.
    let before = read(held);
    if before == 0 {
        return;
    }
    if before > read(reserved) && read(pool) > 0 {
        add(pool, u64::MAX);
    }
    add(held, u64::MAX);
}

/// Where `police` and `host_sent` build a connection's key and a new entry.
#[repr(C)]
struct FlowScratch {
    key: PolicyFlow,
    flow: AllowedFlow,
}

#[btf_map]
static VELOX_FLOW_SCRATCH: PerCpuArray<FlowScratch, 1> = PerCpuArray::new();

/// `TCP_LISTEN` in `bpf_sock.state`.
const TCP_LISTEN: u32 = 10;

/// Whether a socket of the node's own netns (its end `host`) is connected to exactly
/// the `pod` end: a TCP connection past listening, or a connected UDP socket.
#[inline(always)]
fn host_has_connection(ctx: &TcContext, pod: &FlowEnd, host: &FlowEnd) -> bool {
    // SAFETY: all-zero is a valid tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (src, dst) = (pod.addr.words(), host.addr.words());
    let size = if pod.addr.is_v4_mapped() {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: src[3],
            daddr: dst[3],
            sport: pod.port,
            dport: host.port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: src,
            daddr: dst,
            sport: pod.port,
            dport: host.port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } as u32;
    let skb = ctx.skb.skb as *mut _;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: the helpers read `tuple`; a socket they return is released. Each
    // protocol keeps its own lookup and read: the verifier refuses one instruction
    // that reads a `sock_common` on one path and a full socket on another.
    unsafe {
        match pod.proto {
            IPPROTO_TCP => {
                let socket = bpf_skc_lookup_tcp(skb, &mut tuple, size, netns, 0);
                if socket.is_null() {
                    return false;
                }
                let state = core::ptr::read_volatile(&(*socket).state);
                bpf_sk_release(socket as *mut _);
                state != TCP_LISTEN
            }
            IPPROTO_UDP => {
                let socket = bpf_sk_lookup_udp(skb, &mut tuple, size, netns, 0);
                if socket.is_null() {
                    return false;
                }
                let peer_port = core::ptr::read_volatile(&(*socket).dst_port);
                bpf_sk_release(socket as *mut _);
                peer_port != 0
            }
            _ => false,
        }
    }
}

#[inline(always)]
fn flags(slot: u32) -> u32 {
    if slot == NO_SLOT {
        return 0;
    }
    VELOX_POLICY_STATE.get(slot).map_or(0, |state| state.flags)
}

/// Walks the rules of both ends for a packet from `src` to `dst`, and (`record`)
/// keeps the policies that allowed each direction for [`walked_policies`].
#[inline(always)]
fn check(
    src_slot: u32,
    src_flags: u32,
    dst_slot: u32,
    dst_flags: u32,
    src: &FlowEnd,
    dst: &FlowEnd,
    verdict: &mut Verdict,
    record: bool,
) {
    let (mut egress, mut ingress) = (0, 0);
    if src_flags & ISOLATED_EGRESS != 0 {
        egress = allowing_policy(src_slot, EGRESS, src_flags, dst, dst);
        if egress == 0 {
            verdict.result = DROP_POLICY_EGRESS;
        }
    }
    if verdict.result == ALLOWED && dst_flags & ISOLATED_INGRESS != 0 {
        ingress = allowing_policy(dst_slot, INGRESS, dst_flags, src, dst);
        if ingress == 0 {
            verdict.result = DROP_POLICY_INGRESS;
        }
    }
    if !record {
        return;
    }
    if let Some(walked) = VELOX_WALKED_POLICIES.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on it while we do.
        unsafe { *walked = WalkedPolicies { egress, ingress } };
        verdict.walked = true;
    }
}

/// The id of a policy of the pod in `slot` that lets it exchange `to`'s protocol and
/// port with `peer` in `direction`; 0 when none does.
#[inline(always)]
fn allowing_policy(slot: u32, direction: u8, flags: u32, peer: &FlowEnd, to: &FlowEnd) -> u16 {
    let version = u8::from(flags & RULES_VERSION != 0);
    let rule = (u64::from(slot) << 16) | (u64::from(direction) << 8) | u64::from(version);
    velox_policy_allows(rule, peer, to) as u16
}

/// The policy that lets the pod of `rule` (slot << 16 | direction << 8 | version)
/// exchange `to`'s protocol and port with `peer`; 0 when none does. The peer pod's
/// identity is asked first, then the peer's address: policies add up, so either
/// may allow. A global function: the verifier checks it once, on its own, instead
/// of once for every way a program reaches it.
#[no_mangle]
#[inline(never)]
pub extern "C" fn velox_policy_allows(rule: u64, peer: *const FlowEnd, to: *const FlowEnd) -> u32 {
    if peer.is_null() || to.is_null() {
        return 0;
    }
    // SAFETY: checked for null; the verifier checks their size.
    let (peer, to) = unsafe { (&*peer, &*to) };
    let (slot, direction, version) = ((rule >> 16) as u32, (rule >> 8) as u8, rule as u8);
    let Some(keys) = VELOX_IDENTITY_KEY_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a map value, read once.
    if let Some(identity) = unsafe { VELOX_POLICY_IDENTITIES.get(&peer.addr) } {
        // SAFETY: this CPU's slot; nothing else runs on it while we do.
        let key = unsafe { &mut *keys };
        *key = IdentityRuleKey {
            slot,
            direction,
            version,
            pad: [0; 2],
            identity: *identity,
        };
        // SAFETY: as above.
        if let Some(ports) = unsafe { VELOX_POLICY_IDENTITY_RULES.get(key) } {
            let policy = first_allowing(ports, to);
            if policy != 0 {
                return u32::from(policy);
            }
        }
    }
    let key = Key::new(
        POLICY_KEY_FIXED_BITS + 128,
        PolicyKey {
            slot,
            direction,
            version,
            pad: [0; 2],
            peer: peer.addr,
        },
    );
    match VELOX_POLICY_RULES.get(&key) {
        Some(ports) => u32::from(first_allowing(ports, to)),
        None => 0,
    }
}

#[btf_map]
static VELOX_IDENTITY_KEY_SCRATCH: PerCpuArray<IdentityRuleKey, 1> = PerCpuArray::new();

/// The policy of the first of `ports`' rules that allows `to`'s protocol and port; 0
/// when none does.
#[inline(always)]
fn first_allowing(ports: &PolicyPorts, to: &FlowEnd) -> u16 {
    let port = u16::from_be(to.port);
    for rule in ports.rules.iter().take(MAX_PORT_RULES) {
        if rule.policy == 0 {
            break; // the rules in use come first
        }
        if rule.allows(to.proto, port) {
            return rule.policy;
        }
    }
    0
}
