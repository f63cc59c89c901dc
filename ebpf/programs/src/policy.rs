//! NetworkPolicy: whether a packet between a sender and a receiver may pass, decided
//! once per connection. A pod no policy isolates costs one array read per side; a
//! connection already allowed costs one or two hash lookups, whatever the number of
//! policies; only the first packet of a connection (or the first after the loader
//! changed the rules) walks the rules.

use aya_ebpf::{
    bindings::BPF_ANY,
    btf_maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap},
    macros::btf_map,
};
use velox_common::{
    FlowEnd, PolicyFlow, PolicyKey, PolicyPorts, PolicyState, EGRESS, INGRESS, ISOLATED_EGRESS, ISOLATED_INGRESS,
    MAX_ENDPOINTS, MAX_POLICY_FLOWS, MAX_POLICY_RULES, MAX_PORT_RULES, POLICY_KEY_FIXED_BITS, RULES_VERSION,
};

use crate::{Packet, NO_SLOT};

/// By counters slot; the loader sizes it like the counters.
#[btf_map]
static VELOX_POLICY_STATE: Array<PolicyState, MAX_ENDPOINTS> = Array::new();

#[btf_map]
static VELOX_POLICY_RULES: LpmTrie<PolicyKey, PolicyPorts, MAX_POLICY_RULES> = LpmTrie::new();

/// Connections allowed, by the direction that opened them -> the rules generation
/// that allowed them.
#[btf_map]
static VELOX_POLICY_FLOWS: LruHashMap<PolicyFlow, u32, MAX_POLICY_FLOWS> = LruHashMap::new();

#[btf_map]
static VELOX_POLICY_GENERATION: Array<u32, 1> = Array::new();

/// Allowed by policy (or no policy applies).
pub const ALLOWED: i64 = 0;
/// Dropped: the sender's egress policies allow nothing of the kind.
pub const DENIED_EGRESS: i64 = -5;
/// Dropped: the receiver's ingress policies allow nothing of the kind.
pub const DENIED_INGRESS: i64 = -6;

/// The decision on a packet and the policies whose rules allowed it.
#[derive(Default)]
pub struct Verdict {
    pub result: i64,
    pub egress_policy: u16,
    pub ingress_policy: u16,
    /// A rule walk allowed a packet that opens a connection: worth an event.
    pub new_connection: bool,
}

/// Decides `packet` from the pod in `src_slot` to the pod in `dst_slot` (`NO_SLOT`
/// for an end that is not a pod of this node: its node, if any, polices it).
#[inline(always)]
pub fn police(packet: &Packet, src_slot: u32, dst_slot: u32, verdict: &mut Verdict) {
    let (src_flags, dst_flags) = (flags(src_slot), flags(dst_slot));
    if src_flags & ISOLATED_EGRESS == 0 && dst_flags & ISOLATED_INGRESS == 0 {
        return;
    }
    let generation = VELOX_POLICY_GENERATION.get(0).map_or(0, |g| *g);
    let forward = PolicyFlow {
        src: packet.src,
        dst: packet.dst,
    };
    let opened = VELOX_POLICY_FLOWS.get_ptr_mut(&forward);
    if let Some(seen) = opened {
        // SAFETY: a map value; a racing writer writes the same generation.
        if unsafe { *seen } == generation {
            return;
        }
    }
    let reverse = PolicyFlow {
        src: packet.dst,
        dst: packet.src,
    };
    let replied = VELOX_POLICY_FLOWS.get_ptr_mut(&reverse);
    if let Some(seen) = replied {
        if unsafe { *seen } == generation {
            return;
        }
    }
    check(
        src_slot,
        src_flags,
        dst_slot,
        dst_flags,
        &packet.src,
        &packet.dst,
        verdict,
    );
    if verdict.result == ALLOWED {
        if let Some(seen) = opened {
            unsafe { *seen = generation };
        } else if packet.opens {
            let _ = VELOX_POLICY_FLOWS.insert(&forward, generation, BPF_ANY as u64);
            verdict.new_connection = true;
        }
        return;
    }
    // A reply whose connection the rules have changed under: its opening direction
    // decides, as it did when the connection opened.
    if let Some(seen) = replied {
        let mut again = Verdict::default();
        check(
            dst_slot,
            dst_flags,
            src_slot,
            src_flags,
            &packet.dst,
            &packet.src,
            &mut again,
        );
        if again.result == ALLOWED {
            unsafe { *seen = generation };
            *verdict = Verdict::default();
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

/// Walks the rules of both ends for a packet from `src` to `dst`.
#[inline(always)]
fn check(
    src_slot: u32,
    src_flags: u32,
    dst_slot: u32,
    dst_flags: u32,
    src: &FlowEnd,
    dst: &FlowEnd,
    verdict: &mut Verdict,
) {
    if src_flags & ISOLATED_EGRESS != 0 {
        verdict.egress_policy = allowing_policy(src_slot, EGRESS, src_flags, dst, dst);
        if verdict.egress_policy == 0 {
            verdict.result = DENIED_EGRESS;
            return;
        }
    }
    if dst_flags & ISOLATED_INGRESS != 0 {
        verdict.ingress_policy = allowing_policy(dst_slot, INGRESS, dst_flags, src, dst);
        if verdict.ingress_policy == 0 {
            verdict.result = DENIED_INGRESS;
        }
    }
}

/// The id of a policy of the pod in `slot` that lets it exchange `to`'s protocol and
/// port with `peer` in `direction`; 0 when none does.
#[inline(always)]
fn allowing_policy(slot: u32, direction: u8, flags: u32, peer: &FlowEnd, to: &FlowEnd) -> u16 {
    let key = Key::new(
        POLICY_KEY_FIXED_BITS + 128,
        PolicyKey {
            slot,
            direction,
            version: u8::from(flags & RULES_VERSION != 0),
            pad: [0; 2],
            peer: peer.addr,
        },
    );
    let Some(ports) = VELOX_POLICY_RULES.get(&key) else {
        return 0;
    };
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
