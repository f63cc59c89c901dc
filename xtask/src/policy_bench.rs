//! The bench's NetworkPolicy section: what 0, 100 and 1,000 policies cost an
//! established flow (one iperf3 stream, busy-poll TCP round trips) and new
//! connections (connect, first byte, close), Velox's eBPF policy next to the same
//! policies as iptables rules in FORWARD (an iptables policy engine: conntrack's
//! ESTABLISHED first, then a rule per allowed peer) on the ptp plugin. Engines are
//! interleaved per round; each is compared with itself at 0 policies. And what
//! first-packet isolation costs ADD: a pod a deny policy selects, added with the
//! loader enforcing (ADD waits until the pod's rules are in the maps) and not
//! (`--network-policy=false`), interleaved per round.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use velox_test_env::cluster_state::write_objects;
use velox_test_env::netpol::{namespace_object, pod_object, policy, scheduled_pod_object};
use velox_test_env::reference::ReferenceNode;
use velox_test_env::{in_netns, iptables_restore, run_in_netns, wait_for, Cluster, Family, Pod};

use crate::bench::{pod, program_cost};
use crate::service_bench::{connection_rate, Running};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// Velox's eBPF policy, two pods on one node.
    Velox,
    /// iptables rules in FORWARD, the ptp plugin's two pods.
    Iptables,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Self::Velox => "velox eBPF",
            Self::Iptables => "iptables FORWARD (ptp)",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicySample {
    pub engine: Engine,
    pub policies: usize,
    pub round: u32,
    pub gbps: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub connections_per_s: f64,
    /// Velox only: `from_pod`'s ns per packet (bpf_stats) during 2 s of one iperf3
    /// stream (an established flow), and of connections opened one after another.
    #[serde(default)]
    pub from_pod_ns_established: Option<f64>,
    #[serde(default)]
    pub from_pod_ns_connections: Option<f64>,
}

const CHAIN: &str = "VELOX-BENCH-POLICY";
const CRR_PORT: u16 = 8080;

/// A peer no packet comes from: what every policy but the last admits.
fn other_peer(i: usize) -> String {
    format!("172.31.{}.{}", i / 256, i % 256)
}

pub fn measure(
    cluster: &Cluster,
    ptp: &ReferenceNode,
    counts: &[usize],
    rounds: u32,
    seconds: u32,
) -> anyhow::Result<Vec<PolicySample>> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let node = &cluster.nodes[0];
    let velox = (pod(cluster, "pod-1")?, pod(cluster, "pod-4")?);
    let reference = (ptp.add_pod("policy-client")?.0, ptp.add_pod("policy-server")?.0);
    let probe = node.bins.probe.to_str().context("probe path")?.to_string();
    let _servers = [&velox.1, &reference.1]
        .into_iter()
        .map(|server| {
            let on = SocketAddr::new(server.ip(Family::V4), CRR_PORT).to_string();
            Ok(Running(in_netns(&server.name, &probe, &["serve", &on]).spawn()?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut samples = Vec::new();
    for round in 1..=rounds {
        for &count in counts {
            let order = match round % 2 {
                1 => [Engine::Velox, Engine::Iptables],
                _ => [Engine::Iptables, Engine::Velox],
            };
            for engine in order {
                let (client, server) = match engine {
                    Engine::Velox => {
                        apply_velox(cluster, &velox, count)?;
                        &velox
                    }
                    Engine::Iptables => {
                        apply_iptables(&ptp.name, &reference, count)?;
                        &reference
                    }
                };
                let throughput = client.iperf3(server, Family::V4, seconds, 1)?;
                let rtt = client.sockperf_to(server, Family::V4, seconds)?;
                let to = SocketAddr::new(server.ip(Family::V4), CRR_PORT);
                let (per_s, _, _) = connection_rate(client, None, &probe, to, seconds)?;
                let from_pod = |traffic: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<Option<f64>> {
                    Ok(match engine {
                        Engine::Velox => program_cost(traffic)?.get("from_pod").copied(),
                        Engine::Iptables => None,
                    })
                };
                let established = from_pod(&|| client.iperf3(server, Family::V4, 2, 1).map(drop))?;
                let connections = from_pod(&|| connection_rate(client, None, &probe, to, 2).map(drop))?;
                let ns = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
                println!(
                    "round {round} {:<24} {count:>5} policies: {:6.2} Gb/s  RTT p50 {:6.1} us  p99 {:6.1} us  {per_s:8.0} conn/s  from_pod {} ns flow, {} ns connections",
                    engine.name(),
                    throughput.gbps,
                    rtt.p50_us,
                    rtt.p99_us,
                    ns(established),
                    ns(connections),
                );
                samples.push(PolicySample {
                    engine,
                    policies: count,
                    round,
                    gbps: throughput.gbps,
                    rtt_p50_us: rtt.p50_us,
                    rtt_p99_us: rtt.p99_us,
                    connections_per_s: per_s,
                    from_pod_ns_established: established,
                    from_pod_ns_connections: connections,
                });
            }
        }
    }
    apply_velox(cluster, &velox, 0)?;
    apply_iptables(&ptp.name, &reference, 0)?;
    Ok(samples)
}

/// `cargo xtask bench --flow-records`: what the flow records cost, with records on
/// (the default) and off (`--flow-records 0`), interleaved per round, on two paths
/// of node 0: to pod-4, isolated by 100 policies (every new connection is a
/// policy-allowed one with a record), and to pod-5, which no policy selects (its
/// connections' SYN, FIN and RST are recorded as `forwarded`); with records on the
/// flow table counts every packet of both. One iperf3 stream,
/// busy-poll round trips and the connection rate; written to
/// `<out>/flow-records.md`.
pub fn flow_records_cost(args: &crate::bench::BenchArgs) -> anyhow::Result<()> {
    const POLICIES: usize = 100;
    const MODES: [(&str, &[&str]); 3] = [
        ("records on", &[]),
        ("records off (--flow-records 0)", &["--flow-records", "0"]),
        (
            "records on, no flow table (--flow-report-interval 0)",
            &["--flow-report-interval", "0"],
        ),
    ];
    /// The ratios shown: on against off, and the records without the flow table
    /// against off.
    const RATIOS: [(&str, usize, usize); 2] = [("on / off", 0, 1), ("no table / off", 2, 1)];
    const PATHS: [&str; 2] = ["to an isolated pod", "to a pod no policy selects"];
    /// Path, mode, round, Gb/s, RTT p50 us, connections/s, from_pod ns.
    type Sample<'a> = (&'a str, &'a str, u32, f64, f64, f64, f64);
    let cluster = Cluster::new("vfr-", velox_test_env::Binaries::locate()?)?;
    let _ = cluster.down();
    let measured = (|| -> anyhow::Result<Vec<Sample>> {
        cluster.up()?;
        cluster.add_standard_pods()?;
        let node = &cluster.nodes[0];
        let velox = (pod(&cluster, "pod-1")?, pod(&cluster, "pod-4")?);
        let open = node.add_pod(&cluster.pod_name(0, "pod-5"))?;
        let client = &velox.0;
        let probe = node.bins.probe.to_str().context("probe path")?.to_string();
        let servers = [&velox.1, &open];
        let _servers = servers
            .iter()
            .map(|server| {
                let to = SocketAddr::new(server.ip(Family::V4), CRR_PORT);
                Ok(Running(
                    in_netns(&server.name, &probe, &["serve", &to.to_string()]).spawn()?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut samples = Vec::new();
        for round in 1..=args.rounds {
            let mut order = MODES;
            if round % 2 == 0 {
                order.reverse();
            }
            for (mode, flags) in order {
                node.restart_loader_with(flags)?;
                apply_velox(&cluster, &velox, POLICIES)?;
                for (path, server) in PATHS.into_iter().zip(servers) {
                    let to = SocketAddr::new(server.ip(Family::V4), CRR_PORT);
                    let gbps = client.iperf3(server, Family::V4, args.seconds, 1)?.gbps;
                    let rtt = client.sockperf_to(server, Family::V4, args.seconds)?;
                    let (per_s, _, _) = connection_rate(client, None, &probe, to, args.seconds)?;
                    // The programs' own cost, over a stream of its own: bpf_stats
                    // reads the clock twice a run, which the figures above must not pay.
                    let cost = crate::bench::program_cost(|| client.iperf3(server, Family::V4, 2, 1).map(|_| ()))?;
                    let from_pod = cost.get("from_pod").copied().unwrap_or(f64::NAN);
                    println!(
                        "round {round} {path:<26} {mode:<32} {gbps:6.2} Gb/s  RTT p50 {:6.1} us  {per_s:8.0} conn/s  \
                         from_pod {from_pod:5.0} ns",
                        rtt.p50_us
                    );
                    samples.push((path, mode, round, gbps, rtt.p50_us, per_s, from_pod));
                }
            }
        }
        Ok(samples)
    })();
    let _ = cluster.down();
    let samples = measured?;
    let stat = |path: &str, mode: &str, value: &dyn Fn(&Sample) -> f64| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 == path && s.1 == mode)
            .map(value)
            .collect();
        crate::report::Stat::of_any(&values)
    };
    let mut table = format!(
        "Flow records on and off from pod-1, medians (min..max) over {} rounds, interleaved: to pod-4, isolated \
         by {POLICIES} policies (every new connection is recorded as allowed), and to pod-5, which no policy \
         selects (each connection's SYN, FIN and RST are recorded as forwarded); records on, the flow table \
         counts every packet of both. from_pod: ns per run by bpf_stats (its own clock reads included) over \
         a 2 s stream of its own. A ratio: of the medians; \"paired\": the median (min..max) of each \
         round's own ratio, which the machine's drift between rounds does not move\n\n\
         | path | | 1 stream Gb/s | busy-poll RTT p50 us | connections/s | from_pod ns/run |\n\
         |---|---|---|---|---|---|\n",
        args.rounds
    );
    let show = |s: Option<crate::report::Stat>| {
        s.map_or("-".into(), |s| format!("{:.1} ({:.1}..{:.1})", s.median, s.min, s.max))
    };
    let metrics: [&dyn Fn(&Sample) -> f64; 4] = [&|s| s.3, &|s| s.4, &|s| s.5, &|s| s.6];
    for path in PATHS {
        for (mode, _) in MODES {
            let cells: Vec<String> = metrics.iter().map(|m| show(stat(path, mode, m))).collect();
            table += &format!("| {path} | {mode} | {} |\n", cells.join(" | "));
        }
        for (label, a, b) in RATIOS {
            let (a, b) = (MODES[a].0, MODES[b].0);
            let ratio = |value: &dyn Fn(&Sample) -> f64| match (stat(path, a, value), stat(path, b, value)) {
                (Some(a), Some(b)) if b.median > 0.0 => format!("{:.3}", a.median / b.median),
                _ => "-".into(),
            };
            let ratios: Vec<String> = metrics.iter().map(|m| ratio(*m)).collect();
            table += &format!("| {path} | {label} | {} |\n", ratios.join(" | "));
            let paired = |value: &dyn Fn(&Sample) -> f64| {
                let in_round = |mode: &str, round: u32| {
                    samples
                        .iter()
                        .find(|s| s.0 == path && s.1 == mode && s.2 == round)
                        .map(value)
                };
                let per_round: Vec<f64> = (1..=args.rounds)
                    .filter_map(|round| match (in_round(a, round), in_round(b, round)) {
                        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                        _ => None,
                    })
                    .collect();
                crate::report::Stat::of_any(&per_round)
                    .map_or("-".into(), |s| format!("{:.3} ({:.3}..{:.3})", s.median, s.min, s.max))
            };
            let paired: Vec<String> = metrics.iter().map(|m| paired(*m)).collect();
            table += &format!("| {path} | {label}, paired | {} |\n", paired.join(" | "));
        }
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("flow-records.md"), &table)?;
    println!("\n{table}\nwritten: {}/flow-records.md", args.out.display());
    Ok(())
}

/// ADDs per mode and round.
const ADDS: usize = 10;
const ADD_NAMESPACE: &str = "bench-new";
pub const ENFORCING: &str = "first-packet isolation";
pub const NOT_ENFORCING: &str = "not enforcing (--network-policy=false)";

/// CNI ADD latency in ms of a pod a deny policy selects (its Pod object in place, as
/// kubelet's is), with the loader enforcing NetworkPolicy and not, interleaved.
pub fn add_latency(cluster: &Cluster, rounds: u32) -> anyhow::Result<Vec<(String, Vec<f64>)>> {
    let node = &cluster.nodes[0];
    let labels = [("app".to_string(), "new".to_string())].into();
    let names: Vec<String> = (0..ADDS).map(|i| format!("new-{i}")).collect();
    let mut objects = vec![namespace_object(ADD_NAMESPACE, &Default::default())];
    objects.extend(
        names
            .iter()
            .map(|name| scheduled_pod_object(ADD_NAMESPACE, name, &labels, &node.name)),
    );
    let deny = json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]});
    objects.push(policy(ADD_NAMESPACE, "deny", deny));
    write_objects(&cluster.cluster_state.join("bench-new.json"), objects)?;
    let mut enforcing = Vec::new();
    let mut not_enforcing = Vec::new();
    for round in 1..=rounds {
        let order = match round % 2 {
            1 => [true, false],
            _ => [false, true],
        };
        for enforce in order {
            node.restart_loader_with(if enforce { &[] } else { &["--network-policy=false"] })?;
            for name in &names {
                let netns = cluster.pod_name(0, name);
                velox_test_env::netns::create_pod_netns(&netns)?;
                let (_, took) = node.add_kubernetes_pod(&netns, ADD_NAMESPACE, name)?;
                node.delete_pod(&netns)?;
                let ms = took.as_secs_f64() * 1000.0;
                match enforce {
                    true => enforcing.push(ms),
                    false => not_enforcing.push(ms),
                }
            }
            println!(
                "round {round} ADD {:<40} last {:.1} ms",
                if enforce { ENFORCING } else { NOT_ENFORCING },
                if enforce {
                    enforcing.last()
                } else {
                    not_enforcing.last()
                }
                .copied()
                .unwrap_or(0.0)
            );
        }
    }
    node.restart_loader_with(&[])?;
    std::fs::remove_file(cluster.cluster_state.join("bench-new.json"))?;
    Ok(vec![
        (ENFORCING.to_string(), enforcing),
        (NOT_ENFORCING.to_string(), not_enforcing),
    ])
}

/// `count` policies selecting the server, the last one admitting the client, as the
/// cluster's loaders read them; waits until node 0 has them all.
pub fn apply_velox(cluster: &Cluster, (client, server): &(Pod, Pod), count: usize) -> anyhow::Result<()> {
    let node = &cluster.nodes[0];
    let labels = |app: &str| -> BTreeMap<String, String> { [("app".to_string(), app.to_string())].into() };
    let pods = vec![
        namespace_object("default", &BTreeMap::new()),
        pod_object("default", &client.name, &labels("client"), &node.name, client),
        pod_object("default", &server.name, &labels("server"), &node.name, server),
    ];
    write_objects(&cluster.cluster_state.join("pods.json"), pods)?;
    let policies = (0..count)
        .map(|i| {
            let mut from = vec![json!({"ipBlock": {"cidr": format!("{}/32", other_peer(i))}})];
            if i + 1 == count {
                from.push(json!({"podSelector": {"matchLabels": {"app": "client"}}}));
            }
            policy(
                "default",
                &format!("bench-{i}"),
                json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": from}]}),
            )
        })
        .collect();
    write_objects(&cluster.cluster_state.join("policies.json"), policies)?;
    // One entry per admitted peer: the other peers, and the client's label set.
    let wanted = if count == 0 { 0 } else { count + 1 };
    let applied = || node.dump("policy").is_ok_and(|rows| rows.len() == wanted);
    anyhow::ensure!(
        wait_for(Duration::from_secs(60), applied),
        "the loader did not apply {count} policies"
    );
    Ok(())
}

/// The same policies as an iptables engine writes them into FORWARD of the ptp host.
fn apply_iptables(host: &str, (client, server): &(Pod, Pod), count: usize) -> anyhow::Result<()> {
    let _ = run_in_netns(host, "iptables", &["-D", "FORWARD", "-j", CHAIN]);
    let _ = run_in_netns(host, "iptables", &["-F", CHAIN]);
    let _ = run_in_netns(host, "iptables", &["-X", CHAIN]);
    if count == 0 {
        return Ok(());
    }
    let (client, server) = (client.ip(Family::V4), server.ip(Family::V4));
    let mut text = format!(
        "*filter\n:{CHAIN} - [0:0]\n-I FORWARD 1 -j {CHAIN}\n-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
    );
    for i in 0..count - 1 {
        text.push_str(&format!(
            "-A {CHAIN} -s {}/32 -d {server}/32 -j ACCEPT\n",
            other_peer(i)
        ));
    }
    text.push_str(&format!(
        "-A {CHAIN} -s {}/32 -d {server}/32 -j ACCEPT\n-A {CHAIN} -s {client}/32 -d {server}/32 -j ACCEPT\n-A {CHAIN} -d {server}/32 -j DROP\nCOMMIT\n",
        other_peer(count - 1)
    ));
    iptables_restore(host, &text)
}
