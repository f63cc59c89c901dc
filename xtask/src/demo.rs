//! `cargo xtask test-env ...` and `cargo xtask demo`.

use anyhow::Context;
use clap::Subcommand;
use velox_test_env::{direct_veth_pair, Binaries, Node};

#[derive(Subcommand)]
pub enum TestEnvAction {
    /// Create node my-k8s-worker-1 with pods pod-1 and pod-4.
    Up,
    /// Remove everything `up` created.
    Down,
    /// The pods, like `kubectl get pods -o wide`.
    Status,
}

const NODE: &str = "my-k8s-worker-1";
const PODS: [&str; 2] = ["pod-1", "pod-4"];

fn node() -> anyhow::Result<Node> {
    Ok(Node::new(NODE, "200.200.1.0/24".parse()?, Binaries::locate()?))
}

pub fn test_env(action: TestEnvAction) -> anyhow::Result<()> {
    let node = node()?;
    match action {
        TestEnvAction::Up => up(&node),
        TestEnvAction::Down => node.down(),
        TestEnvAction::Status => status(&node),
    }
}

fn up(node: &Node) -> anyhow::Result<()> {
    anyhow::ensure!(
        node.leftovers().is_empty(),
        "{NODE} is already up: run `cargo xtask test-env down` first"
    );
    let result = node
        .up()
        .and_then(|()| PODS.iter().try_for_each(|pod| node.add_pod(pod).map(drop)));
    if let Err(e) = result {
        let _ = node.down();
        return Err(e);
    }
    status(node)
}

fn status(node: &Node) -> anyhow::Result<()> {
    println!("{:<10} {:<15} {}", "NAME", "IP", "NODE");
    for pod in node.pods()? {
        println!("{:<10} {:<15} {}", pod.name, pod.ip, NODE);
    }
    Ok(())
}

/// Up, traffic between the two pods next to a direct veth pair, the endpoint dump, down.
pub fn demo() -> anyhow::Result<()> {
    let node = node()?;
    if !node.leftovers().is_empty() {
        node.down()?;
    }
    let result = demo_on(&node);
    let down = node.down();
    result.and(down)
}

fn demo_on(node: &Node) -> anyhow::Result<()> {
    up(node)?;
    let pods = node.pods()?;
    let (a, b) = (&pods[0], &pods[1]);
    println!("\n== {} -> {}: ping", a.name, b.name);
    anyhow::ensure!(a.ping(b.ip, 3), "ping {} -> {} failed", a.name, b.name);
    println!("3/3 answered");
    println!("\n== iperf3, 5 s, one TCP stream");
    let velox = a.iperf3_to(b, 5).context("iperf3 between the pods")?;
    let (left, right) = direct_veth_pair("vdemo")?;
    let direct = left.iperf3_to(&right, 5);
    velox_test_env::remove_direct_veth_pair("vdemo")?;
    let direct = direct.context("iperf3 over the direct veth pair")?;
    println!("velox pod-to-pod     {velox:6.2} Gbit/s");
    println!("direct veth pair     {direct:6.2} Gbit/s  (same-node limit, same run)");
    println!("ratio                {:6.2}", velox / direct);
    println!("\n== velox-loader endpoints");
    let status = velox_test_env::in_netns(&node.name, node.bins.loader.to_str().unwrap(), &[])
        .args([
            "--bpffs-root",
            node.bpffs_root.to_str().unwrap(),
            "--state-dir",
            node.state_dir.to_str().unwrap(),
            "endpoints",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "velox-loader endpoints failed");
    println!();
    Ok(())
}
