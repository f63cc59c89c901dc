//! `cargo xtask bench --node-port`: traffic from outside the cluster through a
//! NodePort whose backend is on the other node (masqueraded and forwarded), Velox's
//! own NAT (`--kube-proxy-replacement`) next to kube-proxy's iptables rules,
//! in both of its backend choices (random and Maglev), interleaved per round, with
//! 1 to 10,000 Services in the cluster (`--services`): connection rate and
//! first-byte latency from the external host; at the first count also one-stream
//! throughput, to that backend and through another NodePort to a backend on the
//! node itself, next to the external host to the node's own address, and the ns per
//! run of each Velox program on the first stream.

use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use velox_test_env::cluster::external_ip;
use velox_test_env::cluster_state::{self, ServicePort, ServiceSpec};
use velox_test_env::kube_proxy::{self, Protocol, ServiceRule};
use velox_test_env::{in_netns, wait_for, Binaries, Cluster, Family, Pod};

use crate::bench::{pod, program_cost, BenchArgs};
use crate::report::Stat;
use crate::service_bench::{connection_rate, crr_services, Running};

const PREFIX: &str = "vnp-";
const CRR: ServicePort = ServicePort {
    name: "crr",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
    node_port: Some(30080),
};
const IPERF: ServicePort = ServicePort {
    name: "iperf",
    protocol: Protocol::Tcp,
    port: 5201,
    target_port: 5201,
    node_port: Some(30201),
};
/// The same, to a backend on the node the NodePort is reached on.
const IPERF_LOCAL: ServicePort = ServicePort {
    name: "iperf-local",
    node_port: Some(30202),
    ..IPERF
};

/// The balancers, in the order of the even rounds (odd rounds go backwards).
const BALANCERS: [&str; 3] = [KUBE_PROXY, "velox NAT", "velox NAT maglev"];
const KUBE_PROXY: &str = "kube-proxy iptables";

/// One balancer with one number of Services in one round; throughput and program
/// costs only at the first number.
struct Sample {
    balancer: &'static str,
    services: usize,
    connections_per_s: f64,
    first_byte_p50_us: f64,
    gbps: Option<f64>,
    /// The stream to the backend on worker-1.
    gbps_local: Option<f64>,
    ns_per_run: BTreeMap<String, f64>,
}

pub fn measure(args: &BenchArgs) -> anyhow::Result<()> {
    let cluster = Cluster::new(PREFIX, Binaries::locate()?)?;
    let _ = cluster.down();
    let result = (|| {
        cluster.up()?;
        cluster.add_standard_pods()?;
        measure_rounds(args, &cluster)
    })();
    let _ = cluster.down();
    let (samples, node_gbps) = result?;
    let table = report(&samples, &node_gbps, &counts(args));
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("node-port.md"), &table)?;
    println!("\n{table}\nwritten: {}/node-port.md", args.out.display());
    Ok(())
}

/// The Service counts to measure at: the NodePort's own Service is one of them.
fn counts(args: &BenchArgs) -> Vec<usize> {
    match args.services.is_empty() {
        true => vec![1],
        false => args.services.iter().map(|&n| n.max(1)).collect(),
    }
}

fn measure_rounds(args: &BenchArgs, cluster: &Cluster) -> anyhow::Result<(Vec<Sample>, Vec<f64>)> {
    let (worker1, worker2) = (&cluster.nodes[0], &cluster.nodes[1]);
    // The backends: on worker-2, and on worker-1 itself.
    let (backend, local_backend) = (pod(cluster, "pod-2")?, pod(cluster, "pod-4")?);
    // Behind the other Services: two pods they never reach in the measurement.
    let others_backends = [pod(cluster, "pod-2")?, pod(cluster, "pod-3")?];
    let external = Pod {
        name: cluster.external.clone(),
        ips: vec![external_ip(Family::V4)],
    };
    let probe = worker1.bins.probe.to_str().context("probe path")?.to_string();
    let crr_backend = SocketAddr::new(backend.ip(Family::V4), CRR.target_port);
    let _server = Running(
        in_netns(&backend.name, &probe, &["serve", &crr_backend.to_string()])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let node_ip = cluster.node_ip(0, Family::V4);
    let (crr_frontend, iperf_frontend, local_frontend) = (
        SocketAddr::new(node_ip, 30080),
        SocketAddr::new(node_ip, IPERF.node_port.unwrap_or_default()),
        SocketAddr::new(node_ip, IPERF_LOCAL.node_port.unwrap_or_default()),
    );
    let state = cluster.peers_file.with_file_name("services.json");
    let service = ServiceSpec {
        name: "np".into(),
        cluster_ips: vec!["10.96.0.80".parse()?],
        ports: vec![CRR, IPERF],
        backends: vec![backend.ip(Family::V4)],
    };
    let local_service = ServiceSpec {
        name: "np-local".into(),
        cluster_ips: vec!["10.96.0.81".parse()?],
        ports: vec![IPERF_LOCAL],
        backends: vec![local_backend.ip(Family::V4)],
    };
    // kube-proxy masquerades NodePort traffic (externalTrafficPolicy: Cluster) to a
    // local backend too.
    let kube_proxy_rules = [
        (crr_frontend, &backend, CRR.target_port),
        (iperf_frontend, &backend, IPERF.target_port),
        (local_frontend, &local_backend, IPERF_LOCAL.target_port),
    ]
    .map(|(frontend, to, port)| ServiceRule {
        frontend,
        protocol: Protocol::Tcp,
        backend: SocketAddr::new(to.ip(Family::V4), port),
        snat: true,
    });
    // The masquerade rules once (POSTROUTING, kept), the DNATs each time after the
    // other Services' chains: kube-proxy jumps to KUBE-NODEPORTS at the end of
    // KUBE-SERVICES, so a NodePort's first packet walks every ClusterIP's match.
    for rule in &kube_proxy_rules {
        rule.install(worker1)?;
    }
    let kube_proxy_dnats = kube_proxy_rules.map(|rule| ServiceRule { snat: false, ..rule });
    // The external host's client runs in the cgroup2 root: no node's socket hooks.
    let cgroup2 = worker1.cgroup()?.parent().context("cgroup2 root")?.to_path_buf();
    // Tens of thousands of connections a round from one host: its whole port range,
    // and ports in TIME_WAIT taken again.
    for (sysctl, value) in [
        ("net.ipv4.ip_local_port_range", "1024 65535"),
        ("net.ipv4.tcp_tw_reuse", "1"),
    ] {
        velox_test_env::run_in_netns(&external.name, "sysctl", &["-qw", &format!("{sysctl}={value}")])?;
    }
    let mut samples = Vec::new();
    let mut node_gbps = Vec::new();
    let counts = counts(args);
    for round in 0..args.rounds {
        for &count in &counts {
            let (mut specs, others) = crr_services(count - 1, &others_backends);
            specs.extend([service.clone(), local_service.clone()]);
            cluster_state::write(&state, &specs)?;
            let mut order = BALANCERS;
            if round % 2 == 1 {
                order.reverse();
            }
            for balancer in order {
                for node in [worker1, worker2] {
                    node.stop_loader(nix::sys::signal::Signal::SIGTERM)?;
                    if balancer == KUBE_PROXY {
                        node.start_loader_with(&[])?;
                        continue;
                    }
                    kube_proxy::flush_services(node)?;
                    let cgroup = node.cgroup()?;
                    let state = state.to_str().context("state path")?;
                    let cgroup = cgroup.to_str().context("cgroup path")?;
                    let algorithm = if balancer.ends_with("maglev") {
                        "maglev"
                    } else {
                        "random"
                    };
                    node.start_loader_with(&[
                        "--cluster-state",
                        state,
                        "--socket-lb",
                        "--socket-lb-cgroup",
                        cgroup,
                        "--kube-proxy-replacement",
                        "--node-port-algorithm",
                        algorithm,
                    ])?;
                }
                if balancer != KUBE_PROXY {
                    let loaded = || {
                        worker1.dump("services").is_ok_and(|rows| {
                            let others = rows
                                .iter()
                                .filter(|r| r["frontend"].as_str().is_some_and(|f| f.starts_with("10.128.")))
                                .count();
                            let node_port = |port: &str| rows.iter().any(|r| r["frontend"] == port);
                            others == count - 1 && node_port("nodeport:30080") && node_port("nodeport:30202")
                        })
                    };
                    anyhow::ensure!(
                        wait_for(Duration::from_secs(60), loaded),
                        "the loader did not load {count} Services"
                    );
                } else {
                    kube_proxy::restore_services(worker1, &others)?;
                    for rule in &kube_proxy_dnats {
                        rule.install(worker1)?;
                    }
                }
                let (connections_per_s, first_byte_p50_us, _) =
                    connection_rate(&external, None, &probe, crr_frontend, args.seconds)
                        .with_context(|| format!("{balancer} with {count} Services: connection rate"))?;
                let (mut gbps, mut gbps_local, mut ns_per_run) = (None, None, BTreeMap::new());
                if count == counts[0] {
                    ns_per_run = program_cost(|| {
                        let via = Some((iperf_frontend, cgroup2.as_path()));
                        gbps = Some(external.iperf3_via(&backend, Family::V4, via, args.seconds, 1)?.gbps);
                        Ok(())
                    })?;
                    let via = Some((local_frontend, cgroup2.as_path()));
                    gbps_local = Some(
                        external
                            .iperf3_via(&local_backend, Family::V4, via, args.seconds, 1)?
                            .gbps,
                    );
                }
                println!(
                "round {} {balancer:<20} {count:>6} Services {connections_per_s:8.0} conn/s  first byte p50 {first_byte_p50_us:6.1} us  {} {} {ns_per_run:?}",
                round + 1,
                gbps.map(|g| format!("{g:6.2} Gb/s")).unwrap_or_default(),
                gbps_local.map(|g| format!("local backend {g:6.2} Gb/s")).unwrap_or_default()
            );
                samples.push(Sample {
                    balancer,
                    services: count,
                    connections_per_s,
                    first_byte_p50_us,
                    gbps,
                    gbps_local,
                    ns_per_run,
                });
            }
        }
        // The limit: the external host to worker-1's own address, no Service.
        let node = Pod {
            name: worker1.name.clone(),
            ips: vec![node_ip],
        };
        let gbps = external.iperf3(&node, Family::V4, args.seconds, 1)?.gbps;
        println!("round {} external host to the node {gbps:6.2} Gb/s", round + 1);
        node_gbps.push(gbps);
    }
    kube_proxy::flush_services(worker1)?;
    Ok((samples, node_gbps))
}

fn report(samples: &[Sample], node_gbps: &[f64], counts: &[usize]) -> String {
    let stat = |values: Vec<f64>| Stat::of_any(&values);
    let show =
        |values: Vec<f64>| stat(values).map_or("-".into(), |s| format!("{:.1} ({:.1}..{:.1})", s.median, s.min, s.max));
    let values = |balancer: &str, services: Option<usize>, value: &dyn Fn(&Sample) -> Option<f64>| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.balancer == balancer && services.is_none_or(|n| s.services == n))
            .filter_map(value)
            .collect()
    };
    let mut table = String::from(
        "From the external host through worker-1's NodePort to a backend on worker-2 (masqueraded and \
         forwarded), with other ClusterIP Services in the cluster (kube-proxy's first packet walks their \
         matches before KUBE-NODEPORTS), medians (min..max) over the rounds, interleaved\n\n\
         | | Services | connections/s | vs kube-proxy | first byte p50 us |\n|---|---|---|---|---|\n",
    );
    for &count in counts {
        let kube_proxy = stat(values(KUBE_PROXY, Some(count), &|s| Some(s.connections_per_s)));
        for balancer in BALANCERS {
            let rate = values(balancer, Some(count), &|s| Some(s.connections_per_s));
            let ratio = Stat::ratio(stat(rate.clone()), kube_proxy);
            table += &format!(
                "| {balancer} | {count} | {} | {ratio} | {} |\n",
                show(rate),
                show(values(balancer, Some(count), &|s| Some(s.first_byte_p50_us))),
            );
        }
    }
    let node = stat(node_gbps.to_vec());
    let to_node = |values: Vec<f64>| Stat::ratio(stat(values), node);
    table += &format!(
        "\nOne stream with {} Service(s) (and the local backend's), Gb/s, and the ratio of the medians to the \
         external host's stream to the node's own address\n\n| | backend on worker-2 | vs node | backend on \
         worker-1 | vs node |\n|---|---|---|---|---|\n",
        counts[0]
    );
    for balancer in BALANCERS {
        let (remote, local) = (
            values(balancer, None, &|s| s.gbps),
            values(balancer, None, &|s| s.gbps_local),
        );
        table += &format!(
            "| {balancer} | {} | {} | {} | {} |\n",
            show(remote.clone()),
            to_node(remote),
            show(local.clone()),
            to_node(local)
        );
    }
    table += &format!(
        "| external host to the node, no Service | {} | | | |\n",
        show(node_gbps.to_vec())
    );
    let mut programs: Vec<&String> = samples.iter().flat_map(|s| s.ns_per_run.keys()).collect();
    programs.sort();
    programs.dedup();
    table += &format!(
        "\nns per run on the stream (bpf_stats, both nodes' programs together)\n\n| program | {} |\n|---|---|---|---|\n",
        BALANCERS.join(" | ")
    );
    for program in programs {
        let columns: Vec<String> = BALANCERS
            .iter()
            .map(|balancer| show(values(balancer, None, &|s| s.ns_per_run.get(program).copied())))
            .collect();
        table += &format!("| {program} | {} |\n", columns.join(" | "));
    }
    table
}
