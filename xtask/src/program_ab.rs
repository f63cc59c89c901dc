//! `cargo xtask bench --ebpf-object <object> [--other-loader <loader>]`: this build's
//! eBPF programs next to another object's (the previous build, say), ns per run of
//! each program, measured in one run. Each round restarts every node's loader with
//! each object in turn (order alternating), which moves every link over as an upgrade
//! does, then runs one iperf3 stream with `kernel.bpf_stats_enabled` on each path (pod
//! to pod, an isolated pod's allowed connection, and through a kube-proxy-style
//! ClusterIP, where the kernel delivers), and the kernel's test runs of one packet
//! per path (`program_runs`), with `bpf_stats` off and on. A loader loads only
//! objects of its own map layout: for an object of another layout, `--other-loader`
//! names a loader built with it.

use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use velox_common::{FROM_NET_PROGRAM, FROM_POD_PROGRAM};
use velox_test_env::kube_proxy::{Protocol, ServiceRule};
use velox_test_env::{Binaries, Cluster, Family, Pod};

use crate::bench::{pod, program_cost, set_bpf_stats, tunnel_everything, BenchArgs};
use crate::policy_bench::apply_velox;
use crate::program_runs::TestPacket;
use crate::report::Stat;

const PREFIX: &str = "vab-";

/// One object on one path in one round.
#[derive(Serialize)]
struct Sample {
    object: &'static str,
    path: &'static str,
    round: u32,
    gbps: f64,
    ns_per_run: BTreeMap<String, f64>,
    /// CNI ADD latencies in ms, one pod after the other (`path` "ADD").
    add_ms: Vec<f64>,
}

/// A datapath to measure: a loader, the object it runs, and the plugin that attaches
/// its programs to pods (`velox` beside `--other-loader`).
struct Datapath {
    name: &'static str,
    loader: PathBuf,
    object: PathBuf,
    plugin: PathBuf,
}

/// ADDs per datapath and round.
const ADDS: usize = 20;

pub fn measure(args: &BenchArgs, other: &Path) -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/velox-ebpf");
    let datapaths = [
        Datapath {
            name: "this build",
            loader: bins.loader.clone(),
            object: built,
            plugin: bins.velox.clone(),
        },
        Datapath {
            name: "other",
            loader: args.other_loader.clone().unwrap_or_else(|| bins.loader.clone()),
            object: other.to_path_buf(),
            plugin: match &args.other_loader {
                Some(loader) => loader.with_file_name("velox"),
                None => bins.velox.clone(),
            },
        },
    ];
    for path in datapaths.iter().flat_map(|d| [&d.loader, &d.object, &d.plugin]) {
        anyhow::ensure!(path.is_file(), "{} is missing", path.display());
    }
    let cluster = Cluster::new(PREFIX, bins.clone())?;
    let tunnelled = Cluster::new(&format!("{PREFIX}t-"), bins)?;
    let teardown = || {
        let _ = cluster.down();
        let _ = tunnelled.down();
    };
    teardown();
    let result = (|| {
        cluster.up()?;
        cluster.add_standard_pods()?;
        tunnel_everything(&tunnelled)?;
        let (tunnel_client, tunnel_server) = (pod(&tunnelled, "pod-1")?, pod(&tunnelled, "pod-2")?);
        let (client, same, across) = (
            pod(&cluster, "pod-1")?,
            pod(&cluster, "pod-4")?,
            pod(&cluster, "pod-2")?,
        );
        // A server a policy isolates, admitting the client.
        let isolated = cluster.nodes[0].add_pod(&cluster.pod_name(0, "pod-5"))?;
        apply_velox(&cluster, &(client.clone(), isolated.clone()), 1)?;
        // kube-proxy's DNAT on the client's node: the kernel delivers to the backend.
        let cluster_ip = SocketAddr::new(IpAddr::from([10, 96, 0, 50]), 5201);
        ServiceRule {
            frontend: cluster_ip,
            protocol: Protocol::Tcp,
            backend: SocketAddr::new(same.ip(Family::V4), 5201),
            snat: false,
        }
        .install(&cluster.nodes[0])?;
        let cgroup = cluster.nodes[0].cgroup()?;
        let paths = [
            ("same node", &client, &same, Family::V4, None),
            ("across nodes", &client, &across, Family::V4, None),
            ("across nodes VXLAN", &tunnel_client, &tunnel_server, Family::V4, None),
            ("same node IPv6", &client, &same, Family::V6, None),
            ("same node, isolated server", &client, &isolated, Family::V4, None),
            (
                "kube-proxy ClusterIP",
                &client,
                &same,
                Family::V4,
                Some((cluster_ip, cgroup.as_path())),
            ),
        ];
        let test_packets = test_packets(&cluster, &client, (&same, &across, &isolated))?;
        measure_rounds(args, [&cluster, &tunnelled], &datapaths, &paths, &test_packets)
    })();
    teardown();
    let samples = result?;
    let table = report(&samples, other);
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("program-ab.md"), &table)?;
    std::fs::write(args.out.join("program-ab.json"), serde_json::to_vec_pretty(&samples)?)?;
    println!(
        "\n{table}\nwritten: {0}/program-ab.md, {0}/program-ab.json",
        args.out.display()
    );
    Ok(())
}

/// A path to measure: its name, the server pod, the family, and the Service frontend
/// (with the client's cgroup) it goes through, if any.
/// A path measured under iperf3: its name, client, server, family, and the
/// ClusterIP and cgroup when the client connects through a Service.
type MeasuredPath<'a> = (&'static str, &'a Pod, &'a Pod, Family, Option<(SocketAddr, &'a Path)>);

/// The packets of the kernel's test runs: from the client's veth to a pod of its
/// node (both families, and the isolated server) and to a pod of the other node, and
/// that packet again as it arrives on the other node's uplink.
fn test_packets(
    cluster: &Cluster,
    client: &Pod,
    (same, across, isolated): (&Pod, &Pod, &Pod),
) -> anyhow::Result<Vec<TestPacket>> {
    let (node, peer) = (&cluster.nodes[0], &cluster.nodes[1]);
    let veth = node.endpoint(client.ip(Family::V4))?["ifname"]
        .as_str()
        .context("the client's host veth")?
        .to_string();
    Ok(vec![
        TestPacket::new(
            "test run: same node",
            FROM_POD_PROGRAM,
            node,
            &veth,
            (client, same, Family::V4),
        )?,
        TestPacket::new(
            "test run: same node IPv6",
            FROM_POD_PROGRAM,
            node,
            &veth,
            (client, same, Family::V6),
        )?,
        TestPacket::new(
            "test run: same node, isolated server",
            FROM_POD_PROGRAM,
            node,
            &veth,
            (client, isolated, Family::V4),
        )?,
        TestPacket::new(
            "test run: across nodes",
            FROM_POD_PROGRAM,
            node,
            &veth,
            (client, across, Family::V4),
        )?,
        TestPacket::new(
            "test run: across nodes",
            FROM_NET_PROGRAM,
            peer,
            "eth0",
            (client, across, Family::V4),
        )?,
    ])
}

/// Every round: each datapath in turn (order alternating), the test runs, each path,
/// then the ADDs.
fn measure_rounds(
    args: &BenchArgs,
    [cluster, tunnelled]: [&Cluster; 2],
    datapaths: &[Datapath],
    paths: &[MeasuredPath<'_>],
    test_packets: &[TestPacket],
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for i in 0..datapaths.len() {
            let datapath = &datapaths[(i + round as usize) % datapaths.len()];
            let object = datapath.name;
            restart_loaders(cluster, datapath, &[], None)
                .and_then(|()| restart_loaders(tunnelled, datapath, &["--tunnel", "always"], Some("vxlan")))
                .with_context(|| format!("loading {}", datapath.object.display()))?;
            for packet in test_packets {
                packet.open()?;
                let off = packet.ns_per_run()?;
                set_bpf_stats(true)?;
                let on = packet.ns_per_run();
                set_bpf_stats(false)?;
                let on = on?;
                println!(
                    "round {} {object:<10} {:<36} {} {off:.0} ns, with bpf_stats {on:.0} ns",
                    round + 1,
                    packet.path,
                    packet.program
                );
                samples.push(Sample {
                    object,
                    path: packet.path,
                    round: round + 1,
                    gbps: 0.0,
                    ns_per_run: BTreeMap::from([
                        (packet.program.to_string(), off),
                        (format!("{} with bpf_stats", packet.program), on),
                    ]),
                    add_ms: Vec::new(),
                });
            }
            if args.test_runs_only {
                continue;
            }
            for (name, client, server, family, via) in paths {
                let mut gbps = 0.0;
                let ns_per_run = program_cost(|| {
                    gbps = client.iperf3_via(server, *family, *via, args.seconds, 1)?.gbps;
                    Ok(())
                })?;
                println!(
                    "round {} {object:<10} {name:<15} {gbps:6.2} Gb/s  {ns_per_run:?}",
                    round + 1
                );
                samples.push(Sample {
                    object,
                    path: name,
                    round: round + 1,
                    gbps,
                    ns_per_run,
                    add_ms: Vec::new(),
                });
            }
            let add_ms = add_latencies(cluster, datapath, round)?;
            samples.push(Sample {
                object,
                path: "ADD",
                round: round + 1,
                gbps: 0.0,
                ns_per_run: BTreeMap::new(),
                add_ms,
            });
        }
    }
    Ok(samples)
}

/// ADD latencies of `ADDS` pods on node 0 through `datapath`'s plugin, one after
/// the other; each pod is deleted again.
fn add_latencies(cluster: &Cluster, datapath: &Datapath, round: u32) -> anyhow::Result<Vec<f64>> {
    let mut node = cluster.nodes[0].clone();
    node.bins.velox = datapath.plugin.clone();
    let conf = node.conf("1.1.0");
    let mut latencies = Vec::new();
    for i in 0..ADDS {
        let pod = format!("{}-ab{round}-{i}", node.name);
        velox_test_env::run("ip", &["netns", "add", &pod])?;
        let netns = velox_test_env::netns_path(&pod);
        let added = node.cni("ADD", &pod, Some(&netns), "eth0", &conf)?;
        let deleted = node.cni("DEL", &pod, Some(&netns), "eth0", &conf);
        velox_test_env::run("ip", &["netns", "del", &pod])?;
        anyhow::ensure!(added.success, "ADD failed: {}", added.stdout);
        anyhow::ensure!(deleted?.success, "DEL failed");
        latencies.push(added.elapsed.as_secs_f64() * 1000.0);
    }
    Ok(latencies)
}

/// Every node's loader restarted as `datapath`, ready when this returns.
fn restart_loaders(cluster: &Cluster, datapath: &Datapath, flags: &[&str], route: Option<&str>) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        let mut node = node.clone();
        node.bins.loader = datapath.loader.clone();
        node.stop_loader(nix::sys::signal::Signal::SIGTERM)?;
        let object = datapath.object.to_str().context("object path")?;
        node.start_loader_with(&[&["--ebpf-object", object], flags].concat())?;
        // Asked of the datapath's own loader: another build reads another layout's maps.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Some(route) = route {
            let peers = node.dump("peers").unwrap_or_default();
            if !peers.is_empty() && peers.iter().all(|peer| peer["route"] == route) {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{}: the peers did not take the {route} route within 10 s: {peers:?}",
                node.name
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Per path and program: each object's median (min..max) and the ratio of the medians.
fn report(samples: &[Sample], other: &Path) -> String {
    let mut table = format!(
        "ns per run, this build vs {} (bpf_stats, one iperf3 stream per path and round; \"test run\": the kernel's \
         test runs of one packet, 1,000,000 per round, with bpf_stats off and on; medians (min..max))\n\n\
         | path | program | this build | other | this / other |\n|---|---|---|---|---|\n",
        other.display()
    );
    let mut keys: Vec<(&str, &String)> = samples
        .iter()
        .flat_map(|s| s.ns_per_run.keys().map(move |program| (s.path, program)))
        .collect();
    keys.sort();
    keys.dedup();
    for (path, program) in keys {
        let stat = |object: &str| {
            let values: Vec<f64> = samples
                .iter()
                .filter(|s| s.path == path && s.object == object)
                .filter_map(|s| s.ns_per_run.get(program).copied())
                .collect();
            Stat::of_any(&values)
        };
        let (this, that) = (stat("this build"), stat("other"));
        let show = |s: &Option<Stat>| {
            s.as_ref()
                .map_or("-".into(), |s| format!("{:.0} ({:.0}..{:.0})", s.median, s.min, s.max))
        };
        let ratio = match (&this, &that) {
            (Some(a), Some(b)) => format!("{:.2}", a.median / b.median),
            _ => "-".into(),
        };
        table += &format!("| {path} | {program} | {} | {} | {ratio} |\n", show(&this), show(&that));
    }
    let add = |object: &str| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.object == object)
            .flat_map(|s| s.add_ms.iter().copied())
            .collect();
        Stat::of_any(&values)
    };
    if let (Some(this), Some(that)) = (add("this build"), add("other")) {
        table += &format!(
            "\nCNI ADD, ms, {ADDS} per datapath and round, interleaved: this build {:.1} ({:.1}..{:.1}), other {:.1} ({:.1}..{:.1})\n",
            this.median, this.min, this.max, that.median, that.min, that.max
        );
    }
    table
}
