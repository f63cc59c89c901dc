//! NetworkPolicy: whether a packet between a sender and a receiver may pass, decided
//! once per connection. A pod no policy isolates costs one array read per side; a
//! connection already allowed costs one hash lookup, whatever the number of
//! policies; only the first packet of a connection (or the first after the loader
//! changed the rules) walks the rules.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_F_NO_PREALLOC,
    },
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::btf_map,
    programs::TcContext,
};
use velox_common::{
    AllowedFlow, FlowEnd, IdentityRuleKey, IpKey, PolicyFlow, PolicyKey, PolicyPorts, PolicyState, DROP_POLICY_EGRESS,
    DROP_POLICY_INGRESS, EGRESS, INGRESS, IPPROTO_TCP, IPPROTO_UDP, ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_ENDPOINTS,
    MAX_POLICY_FLOWS, MAX_POLICY_IDENTITIES, MAX_POLICY_RULES, MAX_PORT_RULES, OPENED_BY_FIRST, OPENED_BY_SECOND,
    POLICY_KEY_FIXED_BITS, RULES_VERSION,
};

use crate::{
    forward::{local_endpoint, peer_node},
    parse::Packet,
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

/// Connections allowed, both directions under one key.
#[btf_map]
static VELOX_POLICY_FLOWS: LruHashMap<PolicyFlow, AllowedFlow, MAX_POLICY_FLOWS> = LruHashMap::new();

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
}

impl Default for Verdict {
    fn default() -> Self {
        Self {
            result: ALLOWED,
            new_connection: false,
            walked: false,
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
    let (key, src_first) = PolicyFlow::of(src, dst);
    let known = VELOX_POLICY_FLOWS.get_ptr_mut(&key);
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
            return;
        }
    }
    check(src_slot, src_flags, dst_slot, dst_flags, src, dst, verdict, true);
    if verdict.result == ALLOWED {
        let connection = Connection {
            key: &key,
            src_first,
            generation,
        };
        record_allowed(known, &connection, ingress_elsewhere, packet, src_flags, verdict);
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
                unsafe { (*flow).generation = generation };
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

/// A connection as `police` looks it up: its key, whether the packet's source is its
/// first end, the rules generation now.
struct Connection<'a> {
    key: &'a PolicyFlow,
    src_first: bool,
    generation: u32,
}

/// Records that the rules allowed a packet of `connection` (`known`: its entry).
#[inline(always)]
fn record_allowed(
    known: Option<*mut AllowedFlow>,
    connection: &Connection,
    ingress_elsewhere: bool,
    packet: &Packet,
    src_flags: u32,
    verdict: &mut Verdict,
) {
    let (key, src_first, generation) = (connection.key, connection.src_first, connection.generation);
    // Traffic the rules allow one way makes its replies allowed, also for a
    // connection that was open before its pod was isolated.
    let ingress_pending = u32::from(ingress_elsewhere);
    match known {
        Some(flow) => unsafe {
            (*flow).generation = generation;
            // The opening direction's receiver has now been judged here, or is
            // to be judged (again, under these rules) where the kernel delivers.
            if ((*flow).opener == OPENED_BY_FIRST) == src_first {
                (*flow).ingress_pending = ingress_pending;
            }
        },
        // A packet in the middle of a connection the map does not know (one open
        // before its pod was isolated) does not say who opened it. Sent by a pod
        // isolated for ingress, crediting it would open its ingress to the
        // other end: it passes on its own, and the other end's next packet is
        // judged on its own too.
        None if !packet.opens && src_flags & ISOLATED_INGRESS != 0 => {}
        None => {
            let opener = if src_first { OPENED_BY_FIRST } else { OPENED_BY_SECOND };
            let flow = AllowedFlow {
                generation,
                opener,
                ingress_pending,
            };
            let _ = VELOX_POLICY_FLOWS.insert(key, flow, BPF_ANY as u64);
            verdict.new_connection = packet.opens;
        }
    }
}

/// A packet the node's own processes send into the pod behind host veth `ifindex`:
/// host-to-pod is allowed by default, and an egress-isolated pod's replies to it
/// pass as replies, also to an unconnected UDP socket, which `host_has_connection`
/// cannot tell from a server the pod would reach on its own. A call of its own:
/// `to_pod`'s stack, with datapath logging on, has little room left.
#[inline(never)]
pub fn host_sent(packet: &Packet, ifindex: u32) {
    let Some(receiver) = local_endpoint(&packet.dst.addr).filter(|receiver| receiver.ifindex == ifindex) else {
        return;
    };
    // What the node sends from a pod's address is not the host's own: it stands for
    // no connection of the host.
    let from_a_pod = local_endpoint(&packet.src.addr).is_some() || peer_node(&packet.src.addr).is_some();
    if !packet.opens || from_a_pod || flags(receiver.slot) & ISOLATED_EGRESS == 0 {
        return;
    }
    // The key and entry are built in per-CPU space: this call's frame and `to_pod`'s
    // together must stay within 512 bytes, with datapath logging's on top.
    let Some(scratch) = VELOX_HOST_FLOW_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let scratch = unsafe { &mut *scratch };
    let src_first;
    (scratch.key, src_first) = PolicyFlow::of(&packet.src, &packet.dst);
    let host_opener = if src_first { OPENED_BY_FIRST } else { OPENED_BY_SECOND };
    let generation = VELOX_POLICY_GENERATION.get(0).map_or(0, |g| *g);
    match VELOX_POLICY_FLOWS.get_ptr_mut(&scratch.key) {
        // SAFETY: a map value; racing writers write the same values.
        Some(flow) => unsafe {
            // One the pod opened stays the pod's: its rules go on judging it.
            if (*flow).opener == host_opener {
                (*flow).generation = generation;
            }
        },
        None => {
            scratch.flow = AllowedFlow {
                generation,
                opener: host_opener,
                ingress_pending: 0,
            };
            let _ = VELOX_POLICY_FLOWS.insert(&scratch.key, &scratch.flow, BPF_ANY as u64);
        }
    }
}

/// Where `host_sent` builds its key and entry.
#[repr(C)]
struct HostFlowScratch {
    key: PolicyFlow,
    flow: AllowedFlow,
}

#[btf_map]
static VELOX_HOST_FLOW_SCRATCH: PerCpuArray<HostFlowScratch, 1> = PerCpuArray::new();

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
/// port with `peer` in `direction`; 0 when none does. A peer pod's identity is asked
/// first, then the peer's address: policies add up, so either may allow.
#[inline(always)]
fn allowing_policy(slot: u32, direction: u8, flags: u32, peer: &FlowEnd, to: &FlowEnd) -> u16 {
    let version = u8::from(flags & RULES_VERSION != 0);
    let rule = (u64::from(slot) << 16) | (u64::from(direction) << 8) | u64::from(version);
    let by_identity = velox_identity_allows(rule, peer, to);
    if by_identity != 0 {
        return by_identity as u16;
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
        Some(ports) => first_allowing(ports, to),
        None => 0,
    }
}

/// The policy that lets the pod of `rule` (slot << 16 | direction << 8 | version)
/// exchange `to`'s protocol and port with the pods of `peer`'s identity; 0 when none
/// does. A global function: the verifier checks it once, on its own, instead of
/// once for every way a program reaches it.
#[no_mangle]
#[inline(never)]
pub extern "C" fn velox_identity_allows(rule: u64, peer: *const FlowEnd, to: *const FlowEnd) -> u32 {
    if peer.is_null() || to.is_null() {
        return 0;
    }
    // SAFETY: checked for null; the verifier checks their size.
    let (peer, to) = unsafe { (&*peer, &*to) };
    let Some(keys) = VELOX_IDENTITY_KEY_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a map value, read once.
    let Some(identity) = (unsafe { VELOX_POLICY_IDENTITIES.get(&peer.addr) }) else {
        return 0;
    };
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let key = unsafe { &mut *keys };
    *key = IdentityRuleKey {
        slot: (rule >> 16) as u32,
        direction: (rule >> 8) as u8,
        version: rule as u8,
        pad: [0; 2],
        identity: *identity,
    };
    // SAFETY: as above.
    match unsafe { VELOX_POLICY_IDENTITY_RULES.get(key) } {
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
