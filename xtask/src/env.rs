//! `cargo xtask test-env ...` and `cargo xtask demo`, on test-env's two-node cluster
//! (`velox_test_env::Cluster`).

use anyhow::Context;
use clap::Subcommand;
use velox_test_env::{direct_veth_pair, matrix, remove_direct_veth_pair, Binaries, Cluster, Family, Pod};

#[derive(Subcommand)]
pub enum TestEnvAction {
    /// Create the two-node cluster with pods pod-1..pod-4 and a host-network pod per node.
    Up,
    /// Remove everything `up` created.
    Down,
    /// The pods, like `kubectl get pods -o wide`.
    Status,
    /// Every connection with ICMP and TCP, and the source IP each receiver sees.
    Matrix,
    /// iperf3 pod to pod on one node and across nodes, next to node to node.
    Bench {
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
}

fn cluster() -> anyhow::Result<Cluster> {
    Cluster::new("", Binaries::locate()?)
}

pub fn test_env(action: TestEnvAction) -> anyhow::Result<()> {
    let cluster = cluster()?;
    match action {
        TestEnvAction::Up => up(&cluster),
        TestEnvAction::Down => cluster.down(),
        TestEnvAction::Status => {
            print!("{cluster}");
            Ok(())
        }
        TestEnvAction::Matrix => run_matrix(&cluster),
        TestEnvAction::Bench { rounds, seconds } => bench(&cluster, rounds, seconds),
    }
}

fn up(cluster: &Cluster) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cluster.is_up(),
        "the cluster is already up: run `cargo xtask test-env down` first"
    );
    cluster.up()?;
    if let Err(e) = cluster.add_standard_pods() {
        let _ = cluster.down();
        return Err(e);
    }
    print!("{cluster}");
    Ok(())
}

fn run_matrix(cluster: &Cluster) -> anyhow::Result<()> {
    let rows = matrix::run(&matrix::cases(cluster, &cluster.pods()?)?)?;
    println!("{}", matrix::table(&rows));
    let failed = rows.iter().filter(|r| !r.pass()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} connections failed", rows.len());
    println!("all {} connections passed", rows.len());
    Ok(())
}

/// The node's own netns as an iperf3 endpoint.
fn node_endpoint(cluster: &Cluster, node: usize) -> Pod {
    Pod {
        name: cluster.nodes[node].name.clone(),
        ips: Family::ALL.map(|family| cluster.node_ip(node, family)).to_vec(),
    }
}

fn pod(cluster: &Cluster, name: &str) -> anyhow::Result<Pod> {
    let pods = cluster.pods()?;
    pods.into_iter()
        .map(|(_, p)| p)
        .find(|p| p.name.ends_with(name))
        .with_context(|| format!("no {name}: is the cluster up?"))
}

/// Configurations measured round-robin, so machine noise hits them alike.
fn bench(cluster: &Cluster, rounds: u32, seconds: u32) -> anyhow::Result<()> {
    let (pod1, pod2, pod4) = (pod(cluster, "pod-1")?, pod(cluster, "pod-2")?, pod(cluster, "pod-4")?);
    let (node1, node2) = (node_endpoint(cluster, 0), node_endpoint(cluster, 1));
    let pairs = [
        ("node to node (limit)", &node1, &node2, Family::V4),
        ("pod to pod, same node", &pod1, &pod4, Family::V4),
        ("pod to pod, across nodes", &pod1, &pod2, Family::V4),
        ("IPv6 pod to pod, same node", &pod1, &pod4, Family::V6),
        ("IPv6 pod to pod, across", &pod1, &pod2, Family::V6),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    for round in 0..rounds {
        for i in 0..pairs.len() {
            let i = (i + round as usize) % pairs.len();
            let (label, from, to, family) = pairs[i];
            let gbps = from
                .iperf3_to(to, family, seconds)
                .with_context(|| format!("iperf3 {label}"))?;
            println!("round {} {label:<26} {gbps:6.2} Gbit/s", round + 1);
            results[i].push(gbps);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let limit = median(&results[0]);
    println!("\niperf3 TCP, 1 stream, {seconds} s, median of {rounds} interleaved rounds");
    for ((label, ..), values) in pairs.iter().zip(&results) {
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        println!(
            "{label:<26} {:6.2} Gbit/s  ({lo:.2}..{hi:.2})  {:.2}x node to node",
            median(values),
            median(values) / limit
        );
    }
    Ok(())
}

/// Up, traffic on one node next to a bare veth pair and across nodes, the dump, down.
pub fn demo() -> anyhow::Result<()> {
    let cluster = cluster()?;
    if cluster.is_up() {
        cluster.down()?;
    }
    let result = demo_on(&cluster);
    let down = cluster.down();
    result.and(down)
}

fn demo_on(cluster: &Cluster) -> anyhow::Result<()> {
    up(cluster)?;
    let (pod1, pod4, pod2) = (pod(cluster, "pod-1")?, pod(cluster, "pod-4")?, pod(cluster, "pod-2")?);
    for (to, where_) in [(&pod4, "same node"), (&pod2, "other node")] {
        for family in Family::ALL {
            let ip = to.ip(family);
            anyhow::ensure!(pod1.ping(ip, 3), "ping {} -> {} ({ip}) failed", pod1.name, to.name);
            println!("ping {} -> {} {ip} ({where_}): 3/3 answered", pod1.name, to.name);
        }
    }
    println!("\niperf3, 5 s, one TCP stream, IPv4, measured one after the other:");
    let v4 = Family::V4;
    let same_node = pod1.iperf3_to(&pod4, v4, 5).context("iperf3 pod-1 -> pod-4")?;
    let (left, right) = direct_veth_pair("vdemo")?;
    let direct = left.iperf3_to(&right, v4, 5);
    remove_direct_veth_pair("vdemo")?;
    let direct = direct.context("iperf3 over the direct veth pair")?;
    let across = pod1.iperf3_to(&pod2, v4, 5).context("iperf3 pod-1 -> pod-2")?;
    let node_to_node = node_endpoint(cluster, 0).iperf3_to(&node_endpoint(cluster, 1), v4, 5)?;
    println!(
        "pod-1 -> pod-4, same node   {same_node:6.2} Gbit/s   direct veth pair {direct:6.2} Gbit/s   ratio {:.2}",
        same_node / direct
    );
    println!(
        "pod-1 -> pod-2, across      {across:6.2} Gbit/s   node to node     {node_to_node:6.2} Gbit/s   ratio {:.2}",
        across / node_to_node
    );
    for node in &cluster.nodes {
        println!("\nvelox-loader endpoints on {}:", node.name);
        let status = velox_test_env::in_netns(&node.name, node.bins.loader.to_str().unwrap(), &[])
            .args([
                "--bpffs-root",
                node.bpffs_root.to_str().unwrap(),
                "--state-dir",
                node.state_dir.to_str().unwrap(),
            ])
            .arg("endpoints")
            .status()?;
        anyhow::ensure!(status.success(), "velox-loader endpoints failed");
    }
    println!();
    Ok(())
}
