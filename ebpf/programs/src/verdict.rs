//! What a program decided for a packet, and what it tells about it: the TC action,
//! the per-interface counters, the events a listening monitor reads, and the debug
//! trace.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::btf_map,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use velox_common::{
    EndpointCounters, EventBudget, EventSource, FlowEnd, FlowEvent, IpKey, DROP_REASONS, EVENTS_BYTES, EVENTS_LIMITED,
    EVENTS_PER_SOURCE, EVENTS_RING_FULL, EVENT_CONNECTION, EVENT_DROP, EVENT_SOURCES, FORWARDED, IPPROTO_SCTP,
    IPPROTO_UDP, MAX_ENDPOINTS, TRANSLATED, VERDICT_ALLOWED,
};

use crate::{
    flow_table::{self, Progress},
    parse::{Packet, TCP_FIN, TCP_RST},
    policy::{walked_policies, Verdict},
};

/// Indexed by counters slot. The loader sizes it by `--max-pods`: an array is
/// allocated whole, on every CPU.
#[btf_map]
static VELOX_COUNTERS: PerCpuArray<EndpointCounters, MAX_ENDPOINTS> = PerCpuArray::new();

/// Drops and policy verdicts, for the loader's flow records.
#[btf_map]
static VELOX_EVENTS: RingBuf<FlowEvent, EVENTS_BYTES> = RingBuf::new();

/// Events not written (the ring full, a source over its limit), so the records can
/// say what they miss.
#[btf_map]
static VELOX_EVENTS_LOST: PerCpuArray<u64, 2> = PerCpuArray::new();

/// Each source address's events of each kind this second.
#[btf_map]
static VELOX_EVENT_BUDGETS: LruHashMap<EventSource, EventBudget, EVENT_SOURCES> = LruHashMap::new();

/// Until when (`CLOCK_MONOTONIC`) the programs write events.
#[btf_map]
static VELOX_MONITOR: Array<u64, 1> = Array::new();

/// Host veth -> counters slot, for what the source lookup cannot attribute.
#[btf_map]
static VELOX_INTERFACES: HashMap<u32, u32, MAX_ENDPOINTS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// What a program decided for a packet: a drop reason's code (`DROP_*`), or one of
/// the two values past the table. The programs keep to plain values like this one:
/// an `Option` or enum holding a value leaves its payload undefined when empty, LLVM
/// then copies whatever a register holds, and the verifier refuses to read it.
pub type Outcome = u32;
/// Not for the datapath to deliver: the kernel decides.
pub const PASS: Outcome = DROP_REASONS.len() as u32;
/// Delivered by a redirect.
pub const REDIRECT: Outcome = PASS + 1;

/// The counters slot of an interface Velox does not know.
pub const NO_SLOT: u32 = u32::MAX;

/// The counters slot of host veth `ifindex`, for a packet no pod's address claims.
#[inline(always)]
pub fn interface_slot(ifindex: u32) -> u32 {
    unsafe { VELOX_INTERFACES.get(&ifindex) }.map_or(NO_SLOT, |slot| *slot)
}

/// Whose packet the flow table counts: none (another program of this node counts
/// it, or no pod of this node is an end), or this node's pod that sent it or that
/// receives it, whose budget its flow's records come out of.
pub type CountFor = u32;
pub const COUNT_NONE: CountFor = 0;
pub const COUNT_SENDER: CountFor = 1;
pub const COUNT_RECEIVER: CountFor = 2;

/// What the network side delivers itself (a redirect, to a local pod or onwards) is
/// this node's to count, for its receiver; what it passes, the kernel's (and
/// `to_pod`'s).
#[inline(always)]
pub fn delivered_count(outcome: Outcome) -> CountFor {
    match outcome {
        REDIRECT => COUNT_RECEIVER,
        _ => COUNT_NONE,
    }
}

/// Counts `outcome` in counters `slot`, reports drops and connections to the flow
/// records while they are wanted, and returns the TC action. A packet delivered
/// and counted `for` a pod is counted in its flow's entry in the flow table too.
#[inline(always)]
pub fn finish(
    ctx: &TcContext,
    packet: &Packet,
    slot: u32,
    outcome: Outcome,
    verdict: &Verdict,
    count: CountFor,
) -> i32 {
    #[cfg(feature = "upgrade-test")]
    let outcome = crate::upgrade_test::outcome(packet, outcome);
    let action = match outcome {
        PASS => TC_ACT_OK,
        REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT,
    };
    let bytes = ctx.len() as u64;
    if let Some(counters) = VELOX_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU value; only this CPU writes it while we run.
        let counters = unsafe { &mut *counters };
        match outcome {
            REDIRECT => {
                counters.redirected_packets += 1;
                counters.redirected_bytes += bytes;
            }
            PASS => {
                counters.passed_packets += 1;
                counters.passed_bytes += bytes;
            }
            reason => {
                if let Some(dropped) = counters.dropped.get_mut(reason as usize) {
                    *dropped += 1;
                }
            }
        }
    }
    // Drops, a policy's new connections, and the packets that open or end the
    // others: per connection, not per packet. A source over its budget writes no
    // more drops or connections this second.
    let reason = if action == TC_ACT_SHOT {
        outcome
    } else if verdict.new_connection {
        VERDICT_ALLOWED
    } else if opens_or_ends(packet) {
        FORWARDED | u32::from(packet.tcp_flags)
    } else {
        NO_EVENT
    };
    let interval = flow_table::report_interval();
    let counted = count != COUNT_NONE && action != TC_ACT_SHOT && interval != 0;
    if reason == NO_EVENT && !counted {
        return action;
    }
    let now = match verdict.now {
        0 => coarse_now(),
        now => now,
    };
    let mut progress = Progress::default();
    if counted {
        let local = match count {
            COUNT_SENDER => &packet.src.addr,
            _ => &packet.dst.addr,
        };
        flow_table::count(packet, bytes, now, interval, local, &mut progress);
    }
    // Whether anyone listens is asked only where there is news: an established
    // flow's packet is counted without asking (the table asks before it starts
    // following a flow or reports its progress).
    if (reason == NO_EVENT && progress.news == 0) || !listening_at(now) {
        return action;
    }
    // Otherwise a flow's first packet, or its progress, is the news: within its
    // pod's budget already.
    let reason = match reason {
        NO_EVENT => FORWARDED | progress.news,
        reason => {
            let kind = if action == TC_ACT_SHOT {
                EVENT_DROP
            } else {
                EVENT_CONNECTION
            };
            if reason != VERDICT_ALLOWED && !within_budget(&packet.src.addr, kind, now) {
                return action;
            }
            reason
        }
    };
    let (egress_policy, ingress_policy) = walked_policies(verdict);
    emit(&FlowEvent {
        src: packet.src,
        dst: packet.dst,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        reason,
        egress_policy,
        ingress_policy,
        packets: progress.packets,
        bytes: progress.bytes,
        ..FlowEvent::default()
    });
    action
}

/// No event for the packet (past every drop reason and flag set a reason holds).
const NO_EVENT: u32 = u32::MAX - 1;

/// Where a translation came from: a socket's (its network namespace, and the
/// cgroup whose budget it spends: a pod cannot make itself more of those as it can
/// network namespaces), or the NAT's (the interface it arrived on; the client's
/// address spends).
#[derive(Clone, Copy)]
pub struct TranslatedFor {
    pub netns: u64,
    pub cgroup: u64,
    pub ifindex: u32,
}

/// A connection the socket load balancer or the outside traffic's NAT sent from
/// `client` to `backend` for `frontend`: the record that names the Service.
#[inline(always)]
pub fn report_translation(client: &FlowEnd, frontend: &FlowEnd, backend: &FlowEnd, from: TranslatedFor) {
    let Some(now) = events_wanted() else {
        return;
    };
    // A socket's client has no address yet: its cgroup is its budget's.
    let mut source = client.addr;
    if from.netns != 0 {
        source.addr[..8].copy_from_slice(&from.cgroup.to_ne_bytes());
    }
    if !within_budget(&source, EVENT_CONNECTION, now) {
        return;
    }
    emit(&FlowEvent {
        src: *client,
        dst: *backend,
        frontend: *frontend,
        ifindex: from.ifindex,
        reason: TRANSLATED,
        netns: from.netns,
        ..FlowEvent::default()
    });
}

/// A TCP SYN, FIN or RST, or an ICMP echo request: what opens or ends a
/// connection that has a start (UDP has none the packet shows).
#[inline(always)]
fn opens_or_ends(packet: &Packet) -> bool {
    let proto = packet.src.proto;
    (packet.opens && proto != IPPROTO_UDP && proto != IPPROTO_SCTP) || packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Writes `event` for the loader; a full buffer loses the event (counted), never
/// the packet's time.
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    if VELOX_EVENTS.output(event, 0).is_err() {
        count_lost(EVENTS_RING_FULL);
    }
}

#[inline(always)]
fn count_lost(why: u32) {
    if let Some(lost) = VELOX_EVENTS_LOST.get_ptr_mut(why) {
        // SAFETY: a per-CPU value; only this CPU writes it while we run.
        unsafe { *lost += 1 };
    }
}

/// The coarse clock: the monotonic one as of the last tick, a few ms behind, read
/// without the TSC, for the flow table, which asks on every packet: the deadline
/// is seconds away, a budget a second long, a flow's report interval seconds.
#[inline(always)]
fn coarse_now() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The time if events are wanted: they cost nothing when not.
#[inline(always)]
pub fn events_wanted() -> Option<u64> {
    events_wanted_at(coarse_now())
}

/// `now` (`CLOCK_MONOTONIC`, or its coarse reading) if events are wanted then. For
/// the tracepoint, where the kernel offers no coarse clock (not NMI-safe).
#[inline(always)]
pub fn events_wanted_at(now: u64) -> Option<u64> {
    listening_at(now).then_some(now)
}

/// Whether someone listens for events at `now`: the deadline a monitor or the
/// flow records keep ahead.
#[inline(always)]
pub fn listening_at(now: u64) -> bool {
    VELOX_MONITOR.get(0).is_some_and(|until| now < *until)
}

/// Whether `source` may write one more event of `kind` this second; one over its
/// limit is counted instead. A source the map cannot take is let through: the
/// ring's own bound still holds.
#[inline(always)]
pub fn within_budget(source: &IpKey, kind: u32, now: u64) -> bool {
    let second = now / 1_000_000_000;
    let key = EventSource { addr: *source, kind };
    if let Some(budget) = VELOX_EVENT_BUDGETS.get_ptr_mut(&key) {
        // SAFETY: a map value; a racing CPU at worst lets one event more through.
        let budget = unsafe { &mut *budget };
        if budget.second != second {
            budget.second = second;
            budget.used = 0;
        }
        if budget.used >= EVENTS_PER_SOURCE {
            count_lost(EVENTS_LIMITED);
            return false;
        }
        budget.used += 1;
        return true;
    }
    let fresh = EventBudget {
        second,
        used: 1,
        pad: 0,
    };
    let _ = VELOX_EVENT_BUDGETS.insert(&key, &fresh, 0);
    true
}

/// One debug line per IP packet. The loader sets aya-log's level at load time (off
/// unless `--datapath-log-level` says otherwise); the verifier then removes this
/// code from the hot path altogether.
#[inline(always)]
pub fn trace(ctx: &TcContext, program: &str, dst: Option<&IpKey>, action: i32) {
    if let Some(dst) = dst {
        debug!(
            ctx,
            "{}: to {:i} on ifindex {}: action {}",
            program,
            dst.addr,
            unsafe { (*ctx.skb.skb).ifindex },
            action
        );
    }
}
