//! `cargo xtask bench`: Velox next to the reference plugins and the physical limits,
//! all measured in one run, configurations interleaved round-robin so machine noise
//! hits every one alike.

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use velox_common::{FROM_NET_PROGRAM, FROM_POD_PROGRAM, FROM_TUNNEL_PROGRAM, TO_POD_PROGRAM, TO_TUNNEL_PROGRAM};
use velox_test_env::reference::ReferenceNode;
use velox_test_env::{
    direct_veth_pair, remove_direct_veth_pair, run, run_in_netns, Binaries, Cluster, Family, Node, Pod, Server,
};

use crate::anchor_shapes::{self, ShapeSample};
use crate::report;
use crate::service_bench;
use crate::{node_port_bench, policy_bench, program_ab};

#[derive(Args)]
pub struct BenchArgs {
    /// Rounds per configuration (medians and min..max over them, and how many fell
    /// below 0.8x of the median).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds per iperf3 and sockperf test.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Which data-plane configurations to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "velox-same,velox-cross,velox-same6,velox-cross6,velox-vxlan,ptp,bridge,direct,node-to-node,direct6,node-to-node6,kernel-vxlan,flannel-vxlan"
    )]
    pub configs: Vec<Config>,
    /// Also measure with this many non-matching rules in each host's FORWARD chain (0: skip).
    #[arg(long, default_value_t = 10_000)]
    pub netfilter_load: u32,
    /// Service counts for the Service section (connection rate through a ClusterIP,
    /// socket LB vs kube-proxy); `--services` with no value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,1000,10000")]
    pub services: Vec<usize>,
    /// Policy counts for the NetworkPolicy section (established flows and new
    /// connections, Velox's eBPF vs iptables FORWARD rules); `--policies` with no
    /// value skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0,100,1000")]
    pub policies: Vec<usize>,
    /// Pods per control-plane configuration.
    #[arg(long, default_value_t = 100)]
    pub pods: usize,
    /// Where the table, JSON and chart go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Measure nothing: render the table and chart again from `<out>/results.json`.
    #[arg(long)]
    pub report_only: bool,
    /// Measure only the programs' ns per run, this build's object next to this one
    /// (the previous build's, say), interleaved, in one run.
    #[arg(long)]
    pub ebpf_object: Option<PathBuf>,
    /// The loader to run `--ebpf-object` with when its map layout is not this
    /// build's (a loader built with that object); this build's loader otherwise.
    #[arg(long, requires = "ebpf_object")]
    pub other_loader: Option<PathBuf>,
    /// With `--ebpf-object`: only the kernel's test runs of one packet per path
    /// (seconds, not minutes), no traffic.
    #[arg(long, requires = "ebpf_object")]
    pub test_runs_only: bool,
    /// Measure only traffic from outside through a NodePort: Velox's NAT
    /// (`--kube-proxy-replacement`) next to kube-proxy's iptables rules.
    #[arg(long, conflicts_with = "ebpf_object")]
    pub node_port: bool,
    /// Measure only what the flow records cost: on and off, interleaved, on the
    /// connections of an isolated pod (each one recorded).
    #[arg(long, conflicts_with_all = ["ebpf_object", "node_port"])]
    pub flow_records: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    /// Velox, two pods on one node.
    VeloxSame,
    /// Velox, pods on two nodes.
    VeloxCross,
    /// Velox over IPv6, two pods on one node.
    #[value(name = "velox-same6")]
    VeloxSame6,
    /// Velox over IPv6, pods on two nodes.
    #[value(name = "velox-cross6")]
    VeloxCross6,
    /// Reference ptp plugin with host-local, two pods on one node.
    Ptp,
    /// Reference bridge plugin with host-local, two pods on one node.
    Bridge,
    /// A bare veth pair between two namespaces: the same-node limit.
    Direct,
    /// Node to node over the underlay: the cross-node limit.
    NodeToNode,
    /// The bare veth pair over IPv6.
    #[value(name = "direct6")]
    Direct6,
    /// Node to node over IPv6.
    #[value(name = "node-to-node6")]
    NodeToNode6,
    /// Velox, pods on two nodes, every peer through its VXLAN tunnel (`--tunnel
    /// always`, pods' MTU 1450), on the same underlay as `velox-cross`.
    VeloxVxlan,
    /// Node to node through a plain kernel VXLAN device with static forwarding
    /// entries and kernel routes (flannel's way), on the same underlay.
    KernelVxlan,
    /// Pods over that kernel VXLAN device as flannel lays them out: a veth per pod,
    /// the node forwarding by kernel routes into and out of the device (no bridge:
    /// ptp's veth, so only the encapsulation differs from Velox's VXLAN).
    FlannelVxlan,
}

impl Config {
    pub fn name(self) -> &'static str {
        match self {
            Config::VeloxSame => "velox same node",
            Config::VeloxCross => "velox across nodes",
            Config::VeloxSame6 => "velox same node IPv6",
            Config::VeloxCross6 => "velox across nodes IPv6",
            Config::Ptp => "ptp + host-local",
            Config::Bridge => "bridge + host-local",
            Config::Direct => "direct veth pair",
            Config::NodeToNode => "node to node",
            Config::Direct6 => "direct veth pair IPv6",
            Config::NodeToNode6 => "node to node IPv6",
            Config::VeloxVxlan => "velox across nodes VXLAN",
            Config::KernelVxlan => "kernel VXLAN node to node",
            Config::FlannelVxlan => "pods over kernel VXLAN",
        }
    }

    /// What this configuration is measured against: the limit of its path and family.
    pub fn limit(self) -> Config {
        match self {
            Config::VeloxCross
            | Config::NodeToNode
            | Config::VeloxVxlan
            | Config::KernelVxlan
            | Config::FlannelVxlan => Config::NodeToNode,
            Config::VeloxCross6 | Config::NodeToNode6 => Config::NodeToNode6,
            Config::VeloxSame6 | Config::Direct6 => Config::Direct6,
            _ => Config::Direct,
        }
    }

    /// Whether Velox carries the traffic (and its programs' cost can be measured).
    pub fn is_velox(self) -> bool {
        matches!(
            self,
            Config::VeloxSame | Config::VeloxCross | Config::VeloxSame6 | Config::VeloxCross6 | Config::VeloxVxlan
        )
    }

    /// The address family the traffic uses.
    pub fn family(self) -> Family {
        match self {
            Config::VeloxSame6 | Config::VeloxCross6 | Config::Direct6 | Config::NodeToNode6 => Family::V6,
            _ => Family::V4,
        }
    }

    /// The same path over IPv4, for an IPv6 configuration.
    pub fn ipv4_twin(self) -> Option<Config> {
        match self {
            Config::VeloxSame6 => Some(Config::VeloxSame),
            Config::VeloxCross6 => Some(Config::VeloxCross),
            Config::Direct6 => Some(Config::Direct),
            Config::NodeToNode6 => Some(Config::NodeToNode),
            _ => None,
        }
    }
}

/// One configuration measured once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub config: Config,
    pub netfilter_rules: u32,
    pub round: u32,
    pub gbps_1: f64,
    pub gbps_4: f64,
    /// Busy-poll request/response; none where sockperf cannot go (Debian's 3.7 has
    /// no IPv6).
    #[serde(default)]
    pub p50_us: Option<f64>,
    #[serde(default)]
    pub p99_us: Option<f64>,
    #[serde(default)]
    pub tps: Option<f64>,
    /// New TCP connections per second, each one request and response
    /// (`velox-probe crr`, netperf's TCP_CRR), one client.
    #[serde(default)]
    pub crr_per_s: Option<f64>,
    /// Machine-wide CPU seconds per GB received, during the 1-stream test.
    pub cpu_s_per_gb: f64,
    /// CPU time the hypervisor took from this machine (steal) during the 4-stream
    /// test, in seconds over all CPUs: what a collapsed round had that others did not.
    #[serde(default)]
    pub steal_4_s: f64,
    /// Velox's programs, ns per run (`kernel.bpf_stats_enabled`), over an extra
    /// 1-stream run of its own: the stats cost time per run, so the measurements
    /// above run without them.
    #[serde(default)]
    pub ns_per_run: BTreeMap<String, f64>,
    /// The anchors' shapes (measured with no FORWARD rules only).
    #[serde(default)]
    pub shapes: Vec<ShapeSample>,
}

/// The eBPF programs whose cost the bench reports.
pub const PROGRAMS: [&str; 5] = [
    FROM_POD_PROGRAM,
    FROM_NET_PROGRAM,
    TO_POD_PROGRAM,
    FROM_TUNNEL_PROGRAM,
    TO_TUNNEL_PROGRAM,
];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPlane {
    /// CNI ADD and DEL latencies in ms, per configuration, as a runtime sees them.
    pub add_ms: Vec<(String, Vec<f64>)>,
    pub del_ms: Vec<(String, Vec<f64>)>,
    /// Wall time to create `pods` Velox pods, 8 at a time.
    pub parallel_create_s: f64,
    /// ADD latencies in ms with 8 ADDs at a time, per configuration (a busy kubelet).
    #[serde(default)]
    pub concurrent_add_ms: Vec<(String, Vec<f64>)>,
    pub parallel_pods: usize,
    /// velox-loader resident memory with 0 and with 250 endpoints.
    pub loader_rss_kib: Vec<(usize, u64)>,
}

const PREFIX: &str = "vbench-";

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.report_only {
        return report::rerender(&args.out);
    }
    if let Some(other) = &args.ebpf_object {
        return program_ab::measure(&args, other);
    }
    if args.node_port {
        return node_port_bench::measure(&args);
    }
    if args.flow_records {
        return policy_bench::flow_records_cost(&args);
    }
    let bins = Binaries::locate()?;
    let cluster = Cluster::new(PREFIX, bins.clone())?;
    let tunnelled = Cluster::new(&format!("{PREFIX}t-"), bins.clone())?;
    let ptp = ReferenceNode::ptp(&format!("{PREFIX}ptp"), "10.30.0.0/24".parse()?);
    let bridge = ReferenceNode::bridge(&format!("{PREFIX}bridge"), "10.31.0.0/24".parse()?);
    let rss_node = Node::new(
        &format!("{PREFIX}rss"),
        vec!["200.200.3.0/24".parse()?, "fd00:200:3::/64".parse()?],
        bins,
    );
    let teardown = || {
        let _ = cluster.down();
        let _ = tunnelled.down();
        let _ = ptp.down();
        let _ = bridge.down();
        let _ = rss_node.down();
        let _ = remove_direct_veth_pair(&format!("{PREFIX}direct"));
    };
    teardown();
    let started = Instant::now();
    let system_before = report::System::read()?;
    let result = (|| {
        cluster.up()?;
        cluster.add_standard_pods()?;
        ptp.up()?;
        bridge.up()?;
        if args.configs.contains(&Config::VeloxVxlan) {
            tunnel_everything(&tunnelled)?;
        }
        let control_plane = control_plane(&args, &cluster, &ptp, &rss_node)?;
        let samples = data_plane(&args, &cluster, &tunnelled, &ptp, &bridge)?;
        let services = service_bench::measure(&cluster, &args.services, args.rounds, args.seconds)?;
        let policies = policy_bench::measure(&cluster, &ptp, &args.policies, args.rounds, args.seconds)?;
        let policy_add_ms = match args.policies.is_empty() {
            true => Vec::new(),
            false => policy_bench::add_latency(&cluster, args.rounds)?,
        };
        Ok::<_, anyhow::Error>((samples, control_plane, services, policies, policy_add_ms))
    })();
    teardown();
    let (samples, control_plane, (service_samples, service_throughput), policy_samples, policy_add_ms) = result?;
    let run = report::Run {
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        seconds: args.seconds,
        rounds: args.rounds,
        system_before,
        system_after: report::System::read()?,
        wall_time_s: started.elapsed().as_secs_f64(),
        samples,
        control_plane,
        service_samples,
        service_throughput,
        policy_samples,
        policy_add_ms,
    };
    report::write(&run, &args.out)
}

pub fn pod(cluster: &Cluster, name: &str) -> anyhow::Result<Pod> {
    let pods = cluster.pods()?;
    pods.into_iter()
        .map(|(_, p)| p)
        .find(|p| p.name.ends_with(name))
        .with_context(|| format!("no {name}"))
}

/// Brings `cluster` up with every peer through Velox's VXLAN tunnel, pods' MTU the
/// tunnel's, and the standard pods.
pub fn tunnel_everything(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.up()?;
    for node in &cluster.nodes {
        node.restart_loader_with(&["--tunnel", "always"])?;
    }
    cluster.wait_for_peer_routes(Some("vxlan"))?;
    for (index, name) in [(0, "pod-1"), (1, "pod-2")] {
        let mut node = cluster.nodes[index].clone();
        node.pod_mtu = 1450;
        node.add_pod(&cluster.pod_name(index, name))?;
    }
    Ok(())
}

/// A pod on each node of `cluster` behind the kernel VXLAN device of
/// [`kernel_vxlan`], as flannel routes them: pod `i` is 10.98.i.2/24 on a veth to its
/// node, and each node routes the other's pod subnet via the other's device address.
fn flannel_vxlan(cluster: &Cluster, devices: &(Pod, Pod)) -> anyhow::Result<(Pod, Pod)> {
    let device_ip = |pod: &Pod| pod.ips[0].to_string();
    let remote_device = [device_ip(&devices.1), device_ip(&devices.0)];
    let ends: Vec<Pod> = (0..2)
        .map(|i| -> anyhow::Result<Pod> {
            let node = &cluster.nodes[i].name;
            // Named after its node, so the node's teardown removes it.
            let pod = format!("{node}-flannel");
            let _ = run("ip", &["netns", "del", &pod]);
            run("ip", &["netns", "add", &pod])?;
            let ip = |ns: &str, args: &[&str]| run("ip", &[&["-n", ns], args].concat()).map(drop);
            ip(
                node,
                &[
                    "link", "add", "flannel0", "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns", &pod,
                ],
            )?;
            ip(node, &["addr", "add", &format!("10.98.{i}.1/24"), "dev", "flannel0"])?;
            ip(node, &["link", "set", "flannel0", "up"])?;
            ip(&pod, &["link", "set", "lo", "up"])?;
            ip(&pod, &["link", "set", "eth0", "mtu", "1450", "up"])?;
            ip(&pod, &["addr", "add", &format!("10.98.{i}.2/24"), "dev", "eth0"])?;
            ip(&pod, &["route", "add", "default", "via", &format!("10.98.{i}.1")])?;
            let other = format!("10.98.{}.0/24", 1 - i);
            ip(
                node,
                &["route", "replace", &other, "via", &remote_device[i], "dev", "vxk"],
            )?;
            Ok(Pod {
                name: pod,
                ips: vec![format!("10.98.{i}.2").parse()?],
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((ends[0].clone(), ends[1].clone()))
}

/// The kernel VXLAN device between the two nodes of `cluster`, as flannel sets one
/// up (a VNI and port of its own, static forwarding entries, the inner subnet
/// 10.99.0.0/24 routed through it), and the two nodes as its endpoints.
fn kernel_vxlan(cluster: &Cluster) -> anyhow::Result<(Pod, Pod)> {
    let ends: Vec<Pod> = (0..2)
        .map(|i| -> anyhow::Result<Pod> {
            let node = &cluster.nodes[i].name;
            let (local, remote) = (cluster.node_ip(i, Family::V4), cluster.node_ip(1 - i, Family::V4));
            let inner = format!("10.99.0.{}", i + 1);
            let ip = |args: &[&str]| run("ip", &[&["-n", node.as_str()], args].concat()).map(drop);
            let _ = ip(&["link", "del", "vxk"]);
            let local = local.to_string();
            ip(&[
                "link",
                "add",
                "vxk",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "local",
                &local,
                "nolearning",
            ])?;
            ip(&["link", "set", "vxk", "mtu", "1450", "up"])?;
            ip(&["addr", "add", &format!("{inner}/24"), "dev", "vxk"])?;
            run(
                "bridge",
                &[
                    "-n",
                    node,
                    "fdb",
                    "append",
                    "00:00:00:00:00:00",
                    "dev",
                    "vxk",
                    "dst",
                    &remote.to_string(),
                ],
            )?;
            Ok(Pod {
                name: node.clone(),
                ips: vec![inner.parse()?],
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((ends[0].clone(), ends[1].clone()))
}

fn data_plane(
    args: &BenchArgs,
    cluster: &Cluster,
    tunnelled: &Cluster,
    ptp: &ReferenceNode,
    bridge: &ReferenceNode,
) -> anyhow::Result<Vec<Sample>> {
    let mut pairs = Vec::new();
    let mut direct = None;
    let mut kernel_vxlan_ends = None;
    for config in &args.configs {
        let pair = match config {
            Config::VeloxSame | Config::VeloxSame6 => (pod(cluster, "pod-1")?, pod(cluster, "pod-4")?),
            Config::VeloxCross | Config::VeloxCross6 => (pod(cluster, "pod-1")?, pod(cluster, "pod-2")?),
            Config::VeloxVxlan => (pod(tunnelled, "pod-1")?, pod(tunnelled, "pod-2")?),
            Config::KernelVxlan | Config::FlannelVxlan => {
                let devices = match &kernel_vxlan_ends {
                    Some(ends) => Clone::clone(ends),
                    None => kernel_vxlan_ends.insert(kernel_vxlan(cluster)?).clone(),
                };
                match config {
                    Config::FlannelVxlan => flannel_vxlan(cluster, &devices)?,
                    _ => devices,
                }
            }
            Config::Ptp => (ptp.add_pod("a")?.0, ptp.add_pod("b")?.0),
            Config::Bridge => (bridge.add_pod("a")?.0, bridge.add_pod("b")?.0),
            Config::Direct | Config::Direct6 => match &direct {
                Some(pair) => Clone::clone(pair),
                None => direct.insert(direct_veth_pair(&format!("{PREFIX}direct"))?).clone(),
            },
            Config::NodeToNode | Config::NodeToNode6 => {
                let node = |i: usize| Pod {
                    name: cluster.nodes[i].name.clone(),
                    ips: Family::ALL.map(|family| cluster.node_ip(i, family)).to_vec(),
                };
                (node(0), node(1))
            }
        };
        pairs.push((*config, pair));
    }
    // The hosts whose FORWARD chain pod traffic would cross on the kernel path.
    let hosts: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .chain([ptp.name.clone(), bridge.name.clone()])
        .collect();
    let loads = if args.netfilter_load > 0 {
        vec![0, args.netfilter_load]
    } else {
        vec![0]
    };
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for &rules in &loads {
            if rules > 0 {
                hosts.iter().try_for_each(|h| add_forward_rules(h, rules))?;
            }
            for i in 0..pairs.len() {
                let (config, (client, server)) = &pairs[(i + round as usize) % pairs.len()];
                let sample = measure(*config, rules, round + 1, client, server, args.seconds)
                    .with_context(|| format!("measuring {}", config.name()))?;
                let or_dash = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
                println!(
                    "round {} {:<24} rules {:>5}: {:6.2} Gb/s  {:6.2} Gb/s x4 (steal {:.2} s)  p50 {:>6} us  p99 {:>6} us  {:>8} tps",
                    round + 1,
                    config.name(),
                    rules,
                    sample.gbps_1,
                    sample.gbps_4,
                    sample.steal_4_s,
                    or_dash(sample.p50_us, 1),
                    or_dash(sample.p99_us, 1),
                    or_dash(sample.tps, 0)
                );
                for shape in &sample.shapes {
                    println!(
                        "round {} {:<24} {:?} x{}: {:.2} ({:.3} CPU s per unit)",
                        round + 1,
                        config.name(),
                        shape.shape,
                        shape.processes,
                        shape.rate,
                        shape.cpu
                    );
                }
                samples.push(sample);
            }
            if rules > 0 {
                hosts.iter().try_for_each(|h| remove_forward_rules(h))?;
            }
        }
    }
    Ok(samples)
}

fn measure(config: Config, rules: u32, round: u32, client: &Pod, server: &Pod, seconds: u32) -> anyhow::Result<Sample> {
    let family = config.family();
    let before = CpuTimes::read()?;
    let one = client.iperf3(server, family, seconds, 1)?;
    let cpu = CpuTimes::read()?.busy - before.busy;
    let before = CpuTimes::read()?;
    let four = client.iperf3(server, family, seconds, 4)?;
    let steal_4_s = CpuTimes::read()?.steal - before.steal;
    let latency = match family {
        Family::V4 => Some(client.sockperf_to(server, family, seconds)?),
        Family::V6 => None,
    };
    let crr_per_s = connections_per_s(client, server, family, seconds)?;
    Ok(Sample {
        config,
        netfilter_rules: rules,
        round,
        gbps_1: one.gbps,
        gbps_4: four.gbps,
        p50_us: latency.map(|l| l.p50_us),
        p99_us: latency.map(|l| l.p99_us),
        tps: latency.map(|l| l.tps),
        crr_per_s: Some(crr_per_s),
        cpu_s_per_gb: cpu / (one.bytes / 1e9),
        steal_4_s,
        ns_per_run: match config.is_velox() {
            true => program_cost(|| client.iperf3(server, family, 2, 1).map(drop))?,
            false => BTreeMap::new(),
        },
        shapes: match rules {
            0 => anchor_shapes::measure(client, server, family, seconds)?,
            _ => Vec::new(),
        },
    })
}

/// New connections per second from `client` to a `velox-probe serve` in `server`,
/// each one request and response.
fn connections_per_s(client: &Pod, server: &Pod, family: Family, seconds: u32) -> anyhow::Result<f64> {
    let probe = Binaries::locate()?.probe;
    let probe = probe.to_str().context("probe path")?;
    let to = std::net::SocketAddr::new(server.ip(family), CRR_PORT);
    let _server = Server::start(server, probe, &["serve", &to.to_string()])?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (per_second, ..) = crate::service_bench::connection_rate(client, None, probe, to, seconds)?;
    Ok(per_second)
}

/// Where `connections_per_s` serves.
const CRR_PORT: u16 = 7301;

/// Run time and count of every loaded program named in `PROGRAMS`, summed over all
/// instances (each node loads its own).
fn program_stats() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let programs: Vec<serde_json::Value> = serde_json::from_str(&run("bpftool", &["-j", "prog", "show"])?)?;
    let mut stats = BTreeMap::new();
    for program in programs {
        let name = program["name"].as_str().unwrap_or_default();
        if PROGRAMS.contains(&name) {
            let entry: &mut (u64, u64) = stats.entry(name.to_string()).or_default();
            entry.0 += program["run_time_ns"].as_u64().unwrap_or(0);
            entry.1 += program["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(stats)
}

/// ns per run of each program while `traffic` runs with `kernel.bpf_stats_enabled`.
pub fn program_cost(traffic: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<BTreeMap<String, f64>> {
    set_bpf_stats(true)?;
    let before = program_stats();
    let ran = traffic();
    let after = program_stats();
    set_bpf_stats(false)?;
    ran?;
    let (before, after) = (before?, after?);
    Ok(after
        .into_iter()
        .filter_map(|(name, (time, count))| {
            let (time0, count0) = before.get(&name).copied().unwrap_or_default();
            let runs = count.checked_sub(count0).filter(|runs| *runs > 0)?;
            Some((name, (time - time0) as f64 / runs as f64))
        })
        .collect())
}

/// Turns the kernel's per-program run counts and times on or off: they cost two
/// clock reads a run, so they are on only while something is measured.
pub fn set_bpf_stats(on: bool) -> anyhow::Result<()> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", if on { "1" } else { "0" }).context("kernel.bpf_stats_enabled")
}

/// CPU time of the whole machine, from /proc/stat, in seconds.
pub struct CpuTimes {
    /// All but idle, iowait and steal.
    pub busy: f64,
    /// Time the hypervisor ran something else while this machine wanted to run.
    steal: f64,
}

impl CpuTimes {
    pub fn read() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        // user nice system idle iowait irq softirq steal, in USER_HZ (100 on Linux)
        let fields: Vec<f64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect();
        anyhow::ensure!(fields.len() == 8, "unexpected /proc/stat");
        let steal = fields[7];
        let busy = fields.iter().sum::<f64>() - fields[3] - fields[4] - steal;
        Ok(Self {
            busy: busy / 100.0,
            steal: steal / 100.0,
        })
    }
}

const LOAD_CHAIN: &str = "VELOX-BENCH-LOAD";

/// `rules` non-matching rules, kube-proxy-like, hit by every forwarded packet.
fn add_forward_rules(netns: &str, rules: u32) -> anyhow::Result<()> {
    let mut text = format!("*filter\n:{LOAD_CHAIN} - [0:0]\n-I FORWARD 1 -j {LOAD_CHAIN}\n");
    for i in 0..rules {
        text.push_str(&format!(
            "-A {LOAD_CHAIN} -d 172.31.{}.{}/32 -p tcp -m tcp --dport 80 -j DROP\n",
            i / 256,
            i % 256
        ));
    }
    text.push_str("COMMIT\n");
    velox_test_env::iptables_restore(netns, &text)
}

fn remove_forward_rules(netns: &str) -> anyhow::Result<()> {
    let iptables = |args: &[&str]| run_in_netns(netns, "iptables", args);
    iptables(&["-D", "FORWARD", "-j", LOAD_CHAIN])?;
    iptables(&["-F", LOAD_CHAIN])?;
    iptables(&["-X", LOAD_CHAIN]).map(drop)
}

fn ms(outcome: &velox_test_env::CniOutcome) -> anyhow::Result<f64> {
    anyhow::ensure!(outcome.success, "CNI call failed: {}", outcome.stdout);
    Ok(outcome.elapsed.as_secs_f64() * 1000.0)
}

/// ADD and DEL latency per configuration (interleaved pod by pod), parallel creation,
/// and the loader's memory.
fn control_plane(
    args: &BenchArgs,
    cluster: &Cluster,
    ptp: &ReferenceNode,
    rss_node: &Node,
) -> anyhow::Result<ControlPlane> {
    let node = &cluster.nodes[0];
    // Debian's reference plugins (1.1.1) speak up to 1.0.0.
    let builtin = node.conf("1.0.0");
    let mut host_local = builtin.clone();
    host_local.as_object_mut().unwrap().remove("subnets");
    host_local["ipam"] = serde_json::json!({"type": "host-local", "subnet": "200.200.9.0/24", "dataDir": node.state_dir.join("host-local")});
    let labels = ["velox (built-in IPAM)", "velox + host-local", "ptp + host-local"];
    let mut add = vec![Vec::new(); 3];
    let mut del = vec![Vec::new(); 3];
    let velox_pod = |i: usize, kind: &str| format!("{}-cp{kind}{i}", node.name);
    let netns = velox_test_env::netns_path;
    println!("control plane: {} pods per configuration", args.pods);
    for i in 0..args.pods {
        for (kind, conf) in [("b", &builtin), ("h", &host_local)] {
            let pod = velox_pod(i, kind);
            run("ip", &["netns", "add", &pod])?;
            add[usize::from(kind == "h")].push(ms(&node.cni("ADD", &pod, Some(&netns(&pod)), "eth0", conf)?)?);
        }
        let (_, outcome) = ptp.add_pod(&format!("cp{i}"))?;
        add[2].push(ms(&outcome)?);
    }
    for i in 0..args.pods {
        for (kind, conf) in [("b", &builtin), ("h", &host_local)] {
            let pod = velox_pod(i, kind);
            del[usize::from(kind == "h")].push(ms(&node.cni("DEL", &pod, Some(&netns(&pod)), "eth0", conf)?)?);
            run("ip", &["netns", "del", &pod])?;
        }
        let name = format!("{}-cp{i}", ptp.name);
        del[2].push(ms(&ptp.delete_pod(&Pod { name, ips: Vec::new() })?)?);
    }

    // 8 ADDs at a time, as a busy kubelet would: Velox, then ptp.
    let latencies = std::sync::Mutex::new(Vec::new());
    let timed = |outcome: anyhow::Result<velox_test_env::CniOutcome>| -> anyhow::Result<()> {
        latencies.lock().unwrap().push(ms(&outcome?)?);
        Ok(())
    };
    let names: Vec<String> = (0..args.pods).map(|i| velox_pod(i, "p")).collect();
    let started = Instant::now();
    in_parallel(&names, |name| {
        run("ip", &["netns", "add", name])?;
        timed(node.cni("ADD", name, Some(&netns(name)), "eth0", &builtin))
    })?;
    let parallel_create_s = started.elapsed().as_secs_f64();
    in_parallel(&names, |name| node.delete_pod(name))?;
    let mut concurrent_add_ms = vec![(labels[0].to_string(), std::mem::take(&mut *latencies.lock().unwrap()))];
    let names: Vec<String> = (0..args.pods).map(|i| format!("cc{i}")).collect();
    let pods = std::sync::Mutex::new(Vec::new());
    in_parallel(&names, |name| {
        let (pod, outcome) = ptp.add_pod(name)?;
        pods.lock().unwrap().push(pod);
        timed(Ok(outcome))
    })?;
    for pod in pods.into_inner().unwrap() {
        ptp.delete_pod(&pod)?;
    }
    concurrent_add_ms.push((labels[2].to_string(), latencies.into_inner().unwrap()));

    // Loader memory on a node of its own.
    rss_node.up()?;
    std::thread::sleep(Duration::from_secs(2));
    let mut loader_rss_kib = vec![(0, loader_rss(rss_node)?)];
    let names: Vec<String> = (0..250).map(|i| format!("{}-m{i}", rss_node.name)).collect();
    in_parallel(&names, |name| rss_node.add_pod(name).map(drop))?;
    std::thread::sleep(Duration::from_secs(2)); // a reconcile pass over all of them
    loader_rss_kib.push((250, loader_rss(rss_node)?));
    rss_node.down()?;

    let zip = |v: Vec<Vec<f64>>| labels.iter().map(|l| l.to_string()).zip(v).collect();
    Ok(ControlPlane {
        add_ms: zip(add),
        del_ms: zip(del),
        parallel_create_s,
        parallel_pods: args.pods,
        concurrent_add_ms,
        loader_rss_kib,
    })
}

/// Runs `f` over `items` with 8 workers.
fn in_parallel(items: &[String], f: impl Fn(&str) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return Ok(()) };
                    f(item)?;
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("worker panicked"))
    })
}

fn loader_rss(node: &Node) -> anyhow::Result<u64> {
    let pid = node.loader_pid().context("loader not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}
