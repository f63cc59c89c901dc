//! The connections NetworkPolicy follows (`VELOX_POLICY_FLOWS`): each is charged to
//! one pod's share of the map, and lives only as long as its state's timeout
//! without a packet. The programs replace an expired connection's entry when a
//! packet with its ends comes; the sweep here removes the ones no packet comes for
//! (a UDP exchange that is over, a peer that vanished) and counts every pod's share
//! again from the live entries, so a share comes back however it was taken
//! (expiry, the LRU's eviction, a loader that was down).

use std::time::Duration;
use velox_common::{ConnectionTimeouts, CT_TIMEOUTS};
use velox_node::layout::Bpffs;
use velox_node::maps::{PolicyFlowShares, PolicyMaps};

/// Entries left out of the shares, per CPU: the kernel's LRU keeps free entries in
/// per-CPU caches (128 each, `LOCAL_FREE_TARGET`) and evicts once its global free
/// list is empty, before the map is full. With this slack it never evicts.
const LRU_SLACK_PER_CPU: u64 = 256;

/// Each pod's reserved share and the pool's size for a map of `entries` on a node
/// of `max_pods`: half the usable entries reserved in equal shares, half a pool
/// that any pod takes from once its share is used.
pub fn limits(entries: u32, max_pods: u32, cpus: u64) -> (u64, u64) {
    let entries = u64::from(entries);
    let usable = entries - (LRU_SLACK_PER_CPU * cpus).min(entries / 4);
    let reserved = usable / 2 / u64::from(max_pods.max(1));
    let pool = usable - reserved * u64::from(max_pods.max(1));
    (reserved, pool)
}

/// The timeouts in force for the given seconds; a closed connection keeps 10 s.
pub fn timeouts(tcp_syn: u64, tcp: u64, tcp_fin: u64, any: u64) -> ConnectionTimeouts {
    let mut seconds = CT_TIMEOUTS;
    seconds[velox_common::CT_OPENING as usize] = tcp_syn;
    seconds[velox_common::CT_ESTABLISHED as usize] = tcp;
    seconds[velox_common::CT_CLOSING as usize] = tcp_fin;
    seconds[velox_common::CT_OTHER as usize] = any;
    ConnectionTimeouts { seconds }
}

/// How often to sweep: twice per shortest timeout, at least every second and at
/// most every 30 s.
pub fn sweep_interval(timeouts: &ConnectionTimeouts) -> Duration {
    let shortest = timeouts.seconds.iter().copied().filter(|s| *s > 0).min().unwrap_or(30);
    Duration::from_millis((shortest * 500).clamp(1000, 30_000))
}

/// Forgets every expired connection, and counts each pod's share (and the pool's)
/// again from the live ones. Returns how many it forgot. A program may take up a
/// connection with the same ends between the read and the removal: that connection
/// is forgotten too, and its next packet is judged anew.
fn sweep(maps: &mut PolicyMaps, shares: &PolicyFlowShares, timeouts: &ConnectionTimeouts) -> anyhow::Result<usize> {
    let now = crate::flow_log::monotonic_ns()?;
    let (expired, held) = maps.flow_census(now, timeouts);
    let mut forgotten = 0;
    for key in expired {
        forgotten += usize::from(maps.forget_flow(&key)?);
    }
    shares.recount(&held);
    Ok(forgotten)
}

/// Sweeps on a thread of its own, for as long as the loader runs, the first time at
/// once (the counts under this start's limits): a walk of a full map takes a while,
/// and never holds up a reconcile pass.
pub fn sweep_forever(bpffs: Bpffs, timeouts: ConnectionTimeouts) -> anyhow::Result<()> {
    let interval = sweep_interval(&timeouts);
    // This start's maps, for as long as it runs.
    let mut maps = PolicyMaps::open(&bpffs)?;
    let shares = PolicyFlowShares::open(&bpffs)?;
    std::thread::Builder::new()
        .name("policy-flows".into())
        .spawn(move || loop {
            match sweep(&mut maps, &shares, &timeouts) {
                Ok(0) => {}
                Ok(n) => log::debug!("forgot {n} expired connections of isolated pods"),
                Err(e) => log::warn!("sweeping expired connections: {e:#}"),
            }
            std::thread::sleep(interval);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_pool_leave_the_lru_its_slack() {
        let (reserved, pool) = limits(262_144, 110, 2);
        assert_eq!(reserved, (262_144 - 512) / 2 / 110);
        assert_eq!(reserved * 110 + pool, 262_144 - 512);
        // A tiny map keeps three quarters at least.
        let (reserved, pool) = limits(4096, 16, 64);
        assert_eq!(reserved * 16 + pool, 3072);
    }

    #[test]
    fn sweeps_come_twice_per_shortest_timeout_within_bounds() {
        assert_eq!(sweep_interval(&timeouts(30, 21600, 60, 60)), Duration::from_secs(5));
        assert_eq!(sweep_interval(&timeouts(1, 21600, 60, 1)), Duration::from_secs(1));
        // A closed connection's 10 s is the shortest then.
        assert_eq!(sweep_interval(&timeouts(600, 21600, 600, 600)), Duration::from_secs(5));
    }
}
