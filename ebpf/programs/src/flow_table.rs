//! The flow table: each direction of each pod connection this node forwards, with
//! its packets and bytes, so the flow records can tell a flow that shows no start
//! (UDP) once, and a long one's progress every so often, at the cost of one map
//! lookup per packet. Kept only while the loader keeps flow records (its
//! `VELOX_FLOW_REPORT_NS`; the verifier drops the code otherwise).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use velox_common::{FlowCounts, FlowKey, IpKey, EVENT_FLOW, FLOWS, FLOW_ACTIVE, FLOW_STARTED};

use crate::{
    parse::Packet,
    verdict::{listening_at, within_budget},
};

#[btf_map]
static VELOX_FLOWS: LruHashMap<FlowKey, FlowCounts, FLOWS> = LruHashMap::new();

/// How often a flow still going gets a record; 0: no flow table. The loader sets it
/// at load (`--flow-report-interval`, or 0 without flow records).
#[no_mangle]
static VELOX_FLOW_REPORT_NS: u64 = 0;

/// The table's interval, 0 when it is off.
#[inline(always)]
pub fn report_interval() -> u64 {
    // SAFETY: a global the loader sets before the programs load (read-only after).
    unsafe { core::ptr::read_volatile(&VELOX_FLOW_REPORT_NS) }
}

/// What the table says of a packet's flow: `FLOW_STARTED` for the first packet of
/// a connection's first direction, `FLOW_ACTIVE` once an interval after its last
/// record, else 0; and the flow's packets and bytes with this one.
#[derive(Clone, Copy, Default)]
pub struct Progress {
    pub news: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// Counts a packet of `len` bytes at `now` in its flow's entry, entering a new flow.
/// A new flow and a progress record come out of the budget of `local`, the end
/// that is this node's pod: over it, a new flow is not followed (counted as
/// limited) and a progress record waits for the next interval.
#[inline(always)]
pub fn count(packet: &Packet, len: u64, now: u64, interval: u64, local: &IpKey, progress: &mut Progress) {
    let key = FlowKey {
        src: packet.src,
        dst: packet.dst,
    };
    match VELOX_FLOWS.get_ptr_mut(&key) {
        Some(flow) => {
            // SAFETY: a map value; the counts are added atomically, the time a racing
            // CPU writes too at worst makes two records of one interval.
            let flow = unsafe { &mut *flow };
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut flow.packets, 1);
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut flow.bytes, len);
            }
            // Saturating: another CPU may have just written a time later than this
            // packet's, which is no interval at all. Progress no one hears waits.
            if now.saturating_sub(flow.reported) >= interval && listening_at(now) {
                flow.reported = now;
                if within_budget(local, EVENT_FLOW, now) {
                    progress.news = FLOW_ACTIVE;
                }
            }
            progress.packets = flow.packets;
            progress.bytes = flow.bytes;
        }
        None => {
            // A flow starts being followed while someone listens (the loader
            // renews the deadline each second): one that starts while no one does
            // (the loader down, starting, stalled) gets its start on a packet after.
            if !listening_at(now) {
                return;
            }
            // A reply's start is its connection's, which the other direction's
            // record stands for: one record per connection, not two, and out of no
            // budget (its first direction paid).
            let reply = FlowKey {
                src: packet.dst,
                dst: packet.src,
            };
            let is_reply = VELOX_FLOWS.get_ptr(&reply).is_some();
            if !is_reply && !within_budget(local, EVENT_FLOW, now) {
                return;
            }
            let fresh = FlowCounts {
                packets: 1,
                bytes: len,
                reported: now,
            };
            // A full table evicts its least recent flow: never a failure here.
            let _ = VELOX_FLOWS.insert(&key, &fresh, 0);
            if !is_reply {
                progress.news = FLOW_STARTED;
            }
            progress.packets = 1;
            progress.bytes = len;
        }
    }
}
