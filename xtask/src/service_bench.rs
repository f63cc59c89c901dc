//! The bench's Service section: the connection rate and first-byte latency through a
//! ClusterIP with 1 to 10,000 Services, Velox's socket load balancer next to
//! kube-proxy's iptables rules (interleaved per round), and throughput through a
//! Service next to pod to pod.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;
use velox_test_env::cluster_state::{self, ServicePort, ServiceSpec};
use velox_test_env::kube_proxy::{self, Protocol};
use velox_test_env::{in_netns, in_netns_and_cgroup, run_in_netns, wait_for, Cluster, Family, Node, Pod};

use crate::bench::pod;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// kube-proxy's iptables rules, the datapath passing Service traffic to the kernel.
    KubeProxy,
    /// Velox's socket load balancer, no kube-proxy rules.
    VeloxSocketLb,
}

impl Balancer {
    pub fn name(self) -> &'static str {
        match self {
            Self::KubeProxy => "kube-proxy iptables",
            Self::VeloxSocketLb => "velox socket LB",
        }
    }
}

/// One connection-rate run through a ClusterIP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceSample {
    pub balancer: Balancer,
    pub services: usize,
    pub round: u32,
    pub connections_per_s: f64,
    pub first_byte_p50_us: f64,
    pub first_byte_p99_us: f64,
}

/// One iperf3 run through a Service and one straight to the pod behind it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceThroughput {
    pub round: u32,
    pub via_service_gbps: f64,
    pub pod_to_pod_gbps: f64,
}

/// A process killed when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The measured Services' ClusterIPs: 10.128.0.0/16, one per Service.
pub fn cluster_ip(i: usize) -> IpAddr {
    let host = i + 1;
    IpAddr::from([10, 128, (host >> 8) as u8, host as u8])
}

const CRR_PORT: ServicePort = ServicePort {
    name: "crr",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
    node_port: None,
};
const IPERF_PORT: ServicePort = ServicePort {
    name: "iperf",
    protocol: Protocol::Tcp,
    port: 5201,
    target_port: 5201,
    node_port: None,
};
/// The Service in front of the iperf3 server, beside the measured ones.
const IPERF_SERVICE_IP: [u8; 4] = [10, 127, 0, 1];

fn restart_loader(node: &Node, flags: &[&str]) -> anyhow::Result<()> {
    node.stop_loader(nix::sys::signal::Signal::SIGTERM)?;
    node.start_loader_with(flags)
}

pub fn measure(
    cluster: &Cluster,
    counts: &[usize],
    rounds: u32,
    seconds: u32,
) -> anyhow::Result<(Vec<ServiceSample>, Vec<ServiceThroughput>)> {
    if counts.is_empty() {
        return Ok(Default::default());
    }
    // A client on worker-1 per balancer, two backends on worker-2. One client for both
    // would reuse source ports whose kube-proxy connections conntrack still holds in
    // TIME_WAIT: a reply to the new, direct connection would match the old DNAT and be
    // translated.
    let client_of = |balancer: Balancer| match balancer {
        Balancer::KubeProxy => pod(cluster, "pod-1"),
        Balancer::VeloxSocketLb => pod(cluster, "pod-4"),
    };
    let backends = [pod(cluster, "pod-2")?, pod(cluster, "pod-3")?];
    let worker1 = &cluster.nodes[0];
    let cgroup = worker1.cgroup()?;
    let probe = worker1.bins.probe.to_str().context("probe path")?.to_string();
    let backend_addrs: Vec<SocketAddr> = backends
        .iter()
        .map(|b| SocketAddr::new(b.ip(Family::V4), CRR_PORT.target_port))
        .collect();
    let _servers = backend_addrs
        .iter()
        .zip(&backends)
        .map(|(addr, pod)| {
            let child = in_netns(&pod.name, &probe, &["serve", &addr.to_string()])
                .stdout(Stdio::null())
                .spawn()?;
            Ok(Running(child))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let state = cluster.peers_file.with_file_name("services.json");
    let lb_flags = [
        "--cluster-state",
        state.to_str().context("state path")?,
        "--socket-lb",
        "--socket-lb-cgroup",
        cgroup.to_str().context("cgroup path")?,
    ];
    let mut samples = Vec::new();
    let mut throughput = Vec::new();
    for round in 1..=rounds {
        for &count in counts {
            let (_, frontends) = crr_services(count, &backends);
            // The Service in the middle: kube-proxy walks half the list to find it.
            let measured = frontends[count / 2].0;
            let order = match round % 2 {
                1 => [Balancer::KubeProxy, Balancer::VeloxSocketLb],
                _ => [Balancer::VeloxSocketLb, Balancer::KubeProxy],
            };
            for balancer in order {
                match balancer {
                    Balancer::KubeProxy => {
                        restart_loader(worker1, &[])?;
                        kube_proxy::restore_services(worker1, &frontends)?;
                    }
                    Balancer::VeloxSocketLb => {
                        kube_proxy::flush_services(worker1)?;
                        write_services(&state, count, &backends)?;
                        restart_loader(worker1, &lb_flags)?;
                        let loaded = || worker1.dump("services").is_ok_and(|rows| rows.len() == count + 1);
                        anyhow::ensure!(
                            wait_for(Duration::from_secs(60), loaded),
                            "the loader did not load {count} Services"
                        );
                    }
                }
                // Each measurement starts from an empty conntrack table: an entry of the
                // last one (its connections end with a reset, CLOSE for 10 s) holds the
                // reply tuple a new DNAT to the same backend from the same port needs.
                run_in_netns(&worker1.name, "conntrack", &["-F"])?;
                let client = client_of(balancer)?;
                let sample = connection_rate(&client, Some(&cgroup), &probe, measured, seconds)
                    .with_context(|| format!("{} with {count} Services", balancer.name()))?;
                println!(
                    "round {round} {:<20} {count:>6} Services: {:8.0} conn/s  first byte p50 {:6.1} us  p99 {:7.1} us",
                    balancer.name(),
                    sample.0,
                    sample.1,
                    sample.2
                );
                samples.push(ServiceSample {
                    balancer,
                    services: count,
                    round,
                    connections_per_s: sample.0,
                    first_byte_p50_us: sample.1,
                    first_byte_p99_us: sample.2,
                });
                if balancer == Balancer::VeloxSocketLb && count == counts[0] {
                    let via = SocketAddr::new(IpAddr::from(IPERF_SERVICE_IP), IPERF_PORT.port);
                    let through = client.iperf3_via(&backends[0], Family::V4, Some((via, &cgroup)), seconds, 1)?;
                    let direct = client.iperf3(&backends[0], Family::V4, seconds, 1)?;
                    println!(
                        "round {round} through a Service {:6.2} Gb/s, pod to pod {:6.2} Gb/s",
                        through.gbps, direct.gbps
                    );
                    throughput.push(ServiceThroughput {
                        round,
                        via_service_gbps: through.gbps,
                        pod_to_pod_gbps: direct.gbps,
                    });
                }
            }
        }
    }
    kube_proxy::flush_services(worker1)?;
    restart_loader(worker1, &[])?;
    Ok((samples, throughput))
}

/// `count` ClusterIP Services (`cluster_ip(i)`, port 80) with both backends, as the
/// cluster-state file has them and as kube-proxy's rules do.
pub fn crr_services(count: usize, backends: &[Pod; 2]) -> (Vec<ServiceSpec>, Vec<(SocketAddr, Vec<SocketAddr>)>) {
    let specs = (0..count)
        .map(|i| ServiceSpec {
            name: format!("crr-{i}"),
            cluster_ips: vec![cluster_ip(i)],
            ports: vec![CRR_PORT],
            backends: backends.iter().map(|b| b.ip(Family::V4)).collect(),
        })
        .collect();
    let rules = (0..count)
        .map(|i| {
            let backends = backends
                .iter()
                .map(|b| SocketAddr::new(b.ip(Family::V4), CRR_PORT.target_port))
                .collect();
            (SocketAddr::new(cluster_ip(i), CRR_PORT.port), backends)
        })
        .collect();
    (specs, rules)
}

/// `count` Services with both backends, and the iperf3 Service with the first.
fn write_services(path: &Path, count: usize, backends: &[Pod; 2]) -> anyhow::Result<()> {
    let (mut services, _) = crr_services(count, backends);
    services.push(ServiceSpec {
        name: "iperf".into(),
        cluster_ips: vec![IpAddr::from(IPERF_SERVICE_IP)],
        ports: vec![IPERF_PORT],
        backends: vec![backends[0].ip(Family::V4)],
    });
    cluster_state::write(path, &services)
}

/// (connections/s, first-byte p50 us, p99 us) of `velox-probe crr` from `client`,
/// as a process of `cgroup` (where the socket load balancer acts) when given.
pub fn connection_rate(
    client: &Pod,
    cgroup: Option<&Path>,
    probe: &str,
    to: SocketAddr,
    seconds: u32,
) -> anyhow::Result<(f64, f64, f64)> {
    let args = ["crr".to_string(), to.to_string(), seconds.to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = match cgroup {
        Some(cgroup) => in_netns_and_cgroup(&client.name, cgroup, probe, &args),
        None => in_netns(&client.name, probe, &args),
    }
    .output()?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).context("velox-probe crr report")?;
    let field = |name: &str| report[name].as_f64().with_context(|| format!("crr to {to}: {report}"));
    Ok((field("per_second")?, field("p50_us")?, field("p99_us")?))
}
