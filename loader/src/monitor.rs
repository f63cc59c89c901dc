//! `velox-loader monitor`: every packet the datapath drops and every new connection
//! a policy rule allows, as it happens, with its connection ends, their pods, the
//! interface and the policies that decided. The programs write events only while a
//! monitor listens: it pushes a deadline forward every second, and the events stop
//! within seconds after the last monitor is gone.

use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use velox_common::{DropReason, FlowEvent, DROP_POLICY_EGRESS, DROP_POLICY_INGRESS, VERDICT_ALLOWED};
use velox_node::endpoint::EndpointStore;
use velox_node::maps::FlowEvents;
use velox_node::{Bpffs, StateDir};

use crate::names::{protocol_name, socket_address, PolicyNames};

/// How far ahead a monitor sets the deadline, and how often it renews it.
const LISTEN_AHEAD: Duration = Duration::from_secs(3);
const RENEW_EVERY: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Event {
    /// `dropped`, or `allowed` for a new connection a policy rule let through.
    verdict: &'static str,
    reason: &'static str,
    protocol: String,
    src: SocketAddr,
    dst: SocketAddr,
    /// The cluster's names of the ends (`namespace/name`), when they are pods.
    src_pod: Option<String>,
    dst_pod: Option<String>,
    ifname: String,
    /// The container behind the interface, when it is a pod's.
    pod: Option<String>,
    /// What decided: the policies whose rules allowed it, or for a denial the
    /// policies that select the pod and of which no rule allows it.
    policies: Vec<String>,
}

/// A drop's reason as the drop-reason table names it; `policy` for a connection a
/// policy rule allowed.
fn reason(code: u32) -> &'static str {
    match DropReason::of(code) {
        Some(reason) => reason.name,
        None if code == VERDICT_ALLOWED => "policy",
        None => "unknown",
    }
}

impl Event {
    fn new(event: &FlowEvent, names: &PolicyNames, pods: &HashMap<u32, String>) -> Self {
        let ifname = nix::net::if_::if_indextoname(event.ifindex)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| event.ifindex.to_string());
        let (src, dst) = (socket_address(&event.src), socket_address(&event.dst));
        let selecting = |ip: IpAddr| names.selected_by.get(&ip).cloned().unwrap_or_default();
        let policies = match event.reason {
            VERDICT_ALLOWED => [event.egress_policy, event.ingress_policy]
                .into_iter()
                .filter_map(|id| names.policy(id))
                .collect(),
            DROP_POLICY_EGRESS => selecting(src.ip()),
            DROP_POLICY_INGRESS => selecting(dst.ip()),
            _ => Vec::new(),
        };
        Event {
            verdict: if event.reason == VERDICT_ALLOWED {
                "allowed"
            } else {
                "dropped"
            },
            reason: reason(event.reason),
            protocol: protocol_name(event.src.proto).to_uppercase(),
            src,
            dst,
            src_pod: names.pods.get(&src.ip()).cloned(),
            dst_pod: names.pods.get(&dst.ip()).cloned(),
            ifname,
            pod: pods.get(&event.ifindex).cloned(),
            policies,
        }
    }

    fn line(&self) -> String {
        let end = |addr: &SocketAddr, pod: &Option<String>| match pod {
            Some(pod) => format!("{addr} ({pod})"),
            None => addr.to_string(),
        };
        let decided = match (self.verdict, self.policies.is_empty()) {
            (_, true) => String::new(),
            ("allowed", false) => format!(" by {}", self.policies.join(", ")),
            _ => format!(" by {} (no rule allows it)", self.policies.join(", ")),
        };
        format!(
            "{} {:<15} {} {} -> {} on {}{}{decided}",
            if self.verdict == "allowed" { "ALLOW" } else { "DROP " },
            self.reason,
            self.protocol,
            end(&self.src, &self.src_pod),
            end(&self.dst, &self.dst_pod),
            self.ifname,
            self.pod
                .as_ref()
                .map(|p| format!(" (container {p})"))
                .unwrap_or_default()
        )
    }
}

/// The clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

pub fn monitor(bpffs: &Bpffs, state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    let mut events = FlowEvents::open(bpffs)?;
    let store = EndpointStore::new(state_dir);
    let mut pods: HashMap<u32, String> = HashMap::new();
    let mut names = PolicyNames::default();
    let mut names_read = None;
    let mut renewed: Option<Instant> = None;
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "listening for drops and policy verdicts (Ctrl-C stops)")?;
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
        // The loader rewrites the names as policies and pods change: the events of a
        // new policy must name it.
        let names_written = std::fs::metadata(state_dir.policy_names())
            .and_then(|m| m.modified())
            .ok();
        if names_written != names_read {
            names = PolicyNames::read(state_dir);
            names_read = names_written;
        }
        while let Some(event) = events.next_event() {
            let event = Event::new(&event, &names, &pods);
            match json {
                true => writeln!(out, "{}", serde_json::to_string(&event)?)?,
                false => writeln!(out, "{}", event.line())?,
            }
            out.flush()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
