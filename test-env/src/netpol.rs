//! The NetworkPolicy conformance grid, modelled on the upstream Kubernetes e2e suite
//! (test/e2e/network/netpol): pods `a`, `b`, `c` in namespaces `x`, `y`, `z`, spread
//! over both nodes, each serving TCP and UDP on ports 80 and 81 in both families. A
//! case writes its policies (and labels) where the loaders read them, then probes
//! every pair on the ports it names, in both families, and compares with its truth
//! table, as upstream's `Reachability` does.

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use velox_node::Family;

use crate::cluster::Cluster;
use crate::cluster_state::write_objects;
use crate::kube_proxy::Protocol;
use crate::netns::{in_netns, spawn_in};
use crate::Pod;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// Every pod serves these, TCP and UDP, under the names `serve-<port>-<tcp|udp>`.
pub const PORTS: [u16; 2] = [80, 81];

/// How long a probe waits for its answer: a denied one waits it out.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long a case may take to be seen as written: the loaders apply a change
/// within a tick (250 ms), the rest is slack for a busy machine.
const CONVERGE: Duration = Duration::from_secs(20);

/// One pod of the grid: `x/a` and so on.
pub struct GridPod {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub pod: Pod,
    pub labels: BTreeMap<String, String>,
}

impl GridPod {
    fn object(&self, node_name: &str) -> Value {
        pod_object(&self.namespace, &self.name, &self.labels, node_name, &self.pod)
    }
}

/// `pod` as the API server shows it: running on `node_name` with its addresses,
/// serving the grid's named ports.
pub fn pod_object(namespace: &str, name: &str, labels: &BTreeMap<String, String>, node_name: &str, pod: &Pod) -> Value {
    let mut object = scheduled_pod_object(namespace, name, labels, node_name);
    let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
    object["status"] = json!({"phase": "Running", "podIP": pod.ips[0], "podIPs": ips});
    object
}

/// A pod as the API server shows it when kubelet runs its ADD: scheduled to
/// `node_name`, serving the grid's named ports, without addresses yet.
pub fn scheduled_pod_object(namespace: &str, name: &str, labels: &BTreeMap<String, String>, node_name: &str) -> Value {
    let ports: Vec<Value> = PORTS
        .iter()
        .flat_map(|port| {
            [("tcp", "TCP"), ("udp", "UDP")].map(|(suffix, protocol)| {
                json!({"name": format!("serve-{port}-{suffix}"), "containerPort": port, "protocol": protocol})
            })
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"nodeName": node_name, "containers": [{"name": "server", "ports": ports}]},
        "status": {"phase": "Pending"},
    })
}

/// What a pod of the grid serves (`velox-probe serve-ports` on [`PORTS`]), until
/// dropped.
pub struct PortServer(Child);

impl PortServer {
    pub fn start(pod: &Pod, probe: &std::path::Path) -> anyhow::Result<Self> {
        let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
        let child = in_netns(&pod.name, probe.to_str().context("probe path")?, &[])
            .arg("serve-ports")
            .args(&ports)
            .stdout(Stdio::null())
            .spawn()
            .context("starting a grid server")?;
        Ok(Self(child))
    }
}

impl Drop for PortServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The grid on a cluster; its servers stop when it drops (the cluster's teardown
/// removes the pods).
pub struct Grid<'a> {
    cluster: &'a Cluster,
    pub pods: Vec<GridPod>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    _servers: Vec<PortServer>,
}

impl<'a> Grid<'a> {
    /// Nine pods, alternating between the nodes, serving; no policy yet.
    pub fn up(cluster: &'a Cluster) -> anyhow::Result<Self> {
        let mut grid = Self {
            cluster,
            pods: Vec::new(),
            namespace_labels: BTreeMap::new(),
            _servers: Vec::new(),
        };
        for namespace in NAMESPACES {
            grid.namespace_labels.insert(
                namespace.into(),
                [
                    ("ns".to_string(), namespace.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), namespace.to_string()),
                ]
                .into(),
            );
            for name in POD_NAMES {
                let node = grid.pods.len() % cluster.nodes.len();
                let pod = cluster.nodes[node].add_pod(&cluster.pod_name(node, &format!("{namespace}-{name}")))?;
                grid._servers
                    .push(PortServer::start(&pod, &cluster.nodes[node].bins.probe)?);
                grid.pods.push(GridPod {
                    id: format!("{namespace}/{name}"),
                    namespace: namespace.into(),
                    name: name.into(),
                    node,
                    pod,
                    labels: [("pod".to_string(), name.to_string())].into(),
                });
            }
        }
        grid.write_policies(&[])?;
        Ok(grid)
    }

    pub fn pod(&self, id: &str) -> &GridPod {
        self.pods
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    pub fn pod_mut(&mut self, id: &str) -> &mut GridPod {
        self.pods
            .iter_mut()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no pod {id}"))
    }

    pub fn ids(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.id.clone()).collect()
    }

    /// Writes the pods and namespaces as they are now (labels included).
    pub fn write_pods(&self) -> anyhow::Result<()> {
        let dir = &self.cluster.cluster_state;
        let pods = self
            .pods
            .iter()
            .map(|p| p.object(&self.cluster.nodes[p.node].name))
            .collect();
        write_objects(&dir.join("pods.json"), pods)?;
        let namespaces = self
            .namespace_labels
            .iter()
            .map(|(name, labels)| namespace_object(name, labels))
            .collect();
        write_objects(&dir.join("namespaces.json"), namespaces)
    }

    /// Replaces every NetworkPolicy with `policies` (their `spec`s and where they live).
    pub fn write_policies(&self, policies: &[Value]) -> anyhow::Result<()> {
        self.write_pods()?;
        write_objects(&self.cluster.cluster_state.join("policies.json"), policies.to_vec())
    }

    /// Probes every pair on `ports` in both families, all at once.
    pub fn probe(&self, ports: &[(Protocol, u16)]) -> BTreeMap<Probe, bool> {
        let mut running = Vec::new();
        for from in &self.pods {
            for to in &self.pods {
                for &(protocol, port) in ports {
                    for family in Family::ALL {
                        let probe = Probe {
                            from: from.id.clone(),
                            to: to.id.clone(),
                            protocol: name(protocol),
                            port,
                            family,
                        };
                        let target = SocketAddr::new(to.pod.ip(family), port);
                        let thread = spawn_in(&from.pod.name, move || Ok(answers(protocol, target)));
                        running.push((probe, thread));
                    }
                }
            }
        }
        running
            .into_iter()
            .map(|(probe, thread)| {
                let answered = thread.join().ok().and_then(Result::ok).unwrap_or(false);
                (probe, answered)
            })
            .collect()
    }

    /// Probes until what every pair sees on `ports` is `expected` (the loaders take
    /// a moment to apply a change), or fails with the pairs that disagree.
    pub fn expect(&self, case: &str, ports: &[(Protocol, u16)], expected: &Reachability) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let observed = self.probe(ports);
            let wrong: Vec<(&Probe, bool)> = observed
                .iter()
                .filter(|(probe, answered)| expected.allows(&probe.from, &probe.to) != **answered)
                .map(|(probe, answered)| (probe, *answered))
                .collect();
            if wrong.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut table = Table::new();
                table.load_preset(UTF8_FULL_CONDENSED);
                table.set_header(["from", "to", "protocol", "port", "family", "expected", "observed"]);
                for (probe, answered) in &wrong {
                    table.add_row([
                        probe.from.clone(),
                        probe.to.clone(),
                        probe.protocol.to_string(),
                        probe.port.to_string(),
                        format!("{:?}", probe.family),
                        (!answered).to_string(),
                        answered.to_string(),
                    ]);
                }
                bail!(
                    "case {case:?}: {} probes disagree with the truth table:\n{table}",
                    wrong.len()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// Whether the server at `target` answers: a TCP connection that yields its byte,
/// or a UDP datagram echoed.
fn answers(protocol: Protocol, target: SocketAddr) -> bool {
    let mut byte = [0u8; 8];
    match protocol {
        Protocol::Tcp => TcpStream::connect_timeout(&target, PROBE_TIMEOUT)
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
                stream.read(&mut byte)
            })
            .is_ok_and(|read| read == 1),
        Protocol::Udp => {
            let any: SocketAddr = match target.ip() {
                IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                IpAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            UdpSocket::bind(any)
                .and_then(|socket| {
                    socket.connect(target)?;
                    socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
                    socket.send(b"probe")?;
                    socket.recv(&mut byte)
                })
                .is_ok()
        }
    }
}

/// One probe of the grid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub protocol: &'static str,
    pub port: u16,
    pub family: Family,
}

/// The truth table of a case: whether `from` reaches `to`. A pod always reaches
/// itself (its loopback; no policy applies), as upstream's model has it.
#[derive(Clone, Debug)]
pub struct Reachability {
    pods: Vec<String>,
    allowed: BTreeMap<(String, String), bool>,
}

impl Reachability {
    /// Every pair of `pods` `allowed`.
    pub fn all(pods: &[String], allowed: bool) -> Self {
        let mut table = BTreeMap::new();
        for from in pods {
            for to in pods {
                table.insert((from.clone(), to.clone()), allowed);
            }
        }
        Self {
            pods: pods.to_vec(),
            allowed: table,
        }
    }

    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        assert!(self.allowed.contains_key(&(from.into(), to.into())), "{from} -> {to}");
        self.allowed.insert((from.into(), to.into()), allowed);
        self
    }

    /// Every pod to `to`.
    pub fn expect_all_ingress(&mut self, to: &str, allowed: bool) -> &mut Self {
        for from in self.pods.clone() {
            self.expect(&from, to, allowed);
        }
        self
    }

    /// `from` to every pod.
    pub fn expect_all_egress(&mut self, from: &str, allowed: bool) -> &mut Self {
        for to in self.pods.clone() {
            self.expect(from, &to, allowed);
        }
        self
    }

    /// Every pod of namespace `namespace` (`x`) to `to`.
    pub fn expect_namespace_to(&mut self, namespace: &str, to: &str, allowed: bool) -> &mut Self {
        for from in self
            .pods
            .clone()
            .iter()
            .filter(|p| p.starts_with(&format!("{namespace}/")))
        {
            self.expect(from, to, allowed);
        }
        self
    }

    pub fn allows(&self, from: &str, to: &str) -> bool {
        from == to || self.allowed[&(from.to_string(), to.to_string())]
    }
}

/// A NetworkPolicy object in `namespace`.
pub fn policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    })
}

/// A TCP connection from pod `from` to a grid server that stays open: its first
/// byte read.
pub fn connect(from: &Pod, to: SocketAddr) -> anyhow::Result<TcpStream> {
    spawn_in(&from.name, move || {
        let mut stream = TcpStream::connect_timeout(&to, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.read_exact(&mut [0u8; 1])?;
        Ok(stream)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
}

/// Whether an open connection to a grid server still carries data both ways.
pub fn exchange(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok()
        && stream.write_all(b"ping").is_ok()
        && stream.read(&mut [0u8; 8]).is_ok_and(|n| n > 0)
}
