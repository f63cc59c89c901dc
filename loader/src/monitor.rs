//! `velox-loader monitor`: every packet the datapath drops, as it happens, with its
//! connection ends, the interface and the pod behind it. The programs write drop
//! events only while a monitor listens: it pushes a deadline forward every second,
//! and the events stop within seconds after the last monitor is gone.

use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use velox_common::{FlowEnd, DROP_NO_INTERFACE, DROP_SPOOFED, IPPROTO_TCP, IPPROTO_UDP};
use velox_node::endpoint::EndpointStore;
use velox_node::maps::DropEvents;
use velox_node::{Bpffs, StateDir};

/// How far ahead a monitor sets the deadline, and how often it renews it.
const LISTEN_AHEAD: Duration = Duration::from_secs(3);
const RENEW_EVERY: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Drop {
    reason: &'static str,
    protocol: String,
    src: SocketAddr,
    dst: SocketAddr,
    ifname: String,
    /// The container behind the interface, when it is a pod's.
    pod: Option<String>,
}

fn reason(code: u32) -> &'static str {
    match code {
        DROP_SPOOFED => "spoofed",
        DROP_NO_INTERFACE => "no-interface",
        _ => "redirect-failed",
    }
}

fn protocol(end: &FlowEnd) -> String {
    match end.proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        1 | 58 => "ICMP".into(),
        other => other.to_string(),
    }
}

fn socket(end: &FlowEnd) -> SocketAddr {
    SocketAddr::new(end.addr.ip(), u16::from_be(end.port))
}

/// The clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> anyhow::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

pub fn monitor(bpffs: &Bpffs, state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    let mut events = DropEvents::open(bpffs)?;
    let store = EndpointStore::new(state_dir);
    let mut pods: HashMap<u32, String> = HashMap::new();
    let mut renewed: Option<Instant> = None;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "listening for drops (Ctrl-C stops)")?;
    }
    loop {
        if renewed.is_none_or(|at| at.elapsed() >= RENEW_EVERY) {
            events.listen_until(monotonic_ns()? + LISTEN_AHEAD.as_nanos() as u64)?;
            renewed = Some(Instant::now());
            pods = store
                .list()?
                .into_iter()
                .map(|r| (r.host_ifindex, format!("{} {}", r.container_id, r.ifname)))
                .collect();
        }
        while let Some(event) = events.next_event() {
            let ifname = nix::net::if_::if_indextoname(event.ifindex)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|_| event.ifindex.to_string());
            let drop = Drop {
                reason: reason(event.reason),
                protocol: protocol(&event.src),
                src: socket(&event.src),
                dst: socket(&event.dst),
                ifname,
                pod: pods.get(&event.ifindex).cloned(),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&drop)?)?;
            } else {
                writeln!(
                    out,
                    "DROP {:<15} {} {} -> {} on {}{}",
                    drop.reason,
                    drop.protocol,
                    drop.src,
                    drop.dst,
                    drop.ifname,
                    drop.pod.as_ref().map(|p| format!(" (pod {p})")).unwrap_or_default()
                )?;
            }
            out.flush()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
