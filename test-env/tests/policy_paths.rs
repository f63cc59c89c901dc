//! Paths into a pod that must not skip its NetworkPolicy, on the two-node cluster, in
//! both families:
//! - a UDP server that answered its node's host once must stay as isolated as it was
//!   (the kernel-flow shortcut must not open its port to every pod, for ingress nor
//!   for egress);
//! - what the kernel itself delivers into an isolated pod (a kube-proxy NodePort with
//!   `externalTrafficPolicy: Local`, a portmap hostPort, a ClusterIP used by a pod
//!   without the socket load balancer) is judged by the pod's ingress rules, while
//!   the node's own host (kubelet probes) keeps reaching its pods.
//!
//! Every denial is checked against an answer the same server gave in the same test,
//! so a refused probe means the policy, not a dead server.
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use velox_test_env::backend::Backend;
use velox_test_env::cluster::external_ip;
use velox_test_env::cluster_state::write_objects;
use velox_test_env::kube_proxy::{Protocol, ServiceRule};
use velox_test_env::netns::spawn_in;
use velox_test_env::netpol::{namespace_object, pod_object, policy};
use velox_test_env::{Cluster, ClusterGuard, Family, Node, Pod};

/// How long a probe waits for its answer, as the policy grid's do: a denied one
/// waits it out.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long the loaders may take to apply a change (they look four times a second;
/// the rest is slack for a busy machine).
const CONVERGE: Duration = Duration::from_secs(20);

/// One request from a network namespace to a server, named for the messages.
#[derive(Clone, Debug)]
struct Probe {
    /// Who asks, e.g. "pod-4 (same node)".
    from: String,
    netns: String,
    protocol: Protocol,
    to: SocketAddr,
    /// The way in, e.g. "direct", "NodePort 30080 (eTP Local)".
    path: String,
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} {:?} via {}", self.from, self.to, self.protocol, self.path)
    }
}

fn probe(from: &str, netns: &str, protocol: Protocol, to: SocketAddr, path: &str) -> Probe {
    Probe {
        from: from.to_string(),
        netns: netns.to_string(),
        protocol,
        to,
        path: path.to_string(),
    }
}

/// Every probe at once, each on a thread in its netns: the answer, or why none came.
/// TCP: connect and read what the server writes; UDP: a connected socket (which only
/// takes a reply from `to`), one datagram, one answer.
fn run(probes: &[Probe]) -> Vec<Result<String, String>> {
    let running: Vec<_> = probes
        .iter()
        .map(|p| {
            let (protocol, to) = (p.protocol, p.to);
            spawn_in(&p.netns, move || {
                let mut answer = String::new();
                match protocol {
                    Protocol::Tcp => {
                        let mut stream = TcpStream::connect_timeout(&to, PROBE_TIMEOUT)?;
                        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
                        stream.read_to_string(&mut answer)?;
                    }
                    Protocol::Udp => {
                        let any: SocketAddr = match to.ip() {
                            IpAddr::V4(_) => "0.0.0.0:0".parse()?,
                            IpAddr::V6(_) => "[::]:0".parse()?,
                        };
                        let socket = UdpSocket::bind(any)?;
                        socket.connect(to)?;
                        socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
                        socket.send(b"probe")?;
                        let mut buf = [0u8; 64];
                        let len = socket.recv(&mut buf)?;
                        answer = String::from_utf8_lossy(&buf[..len]).into_owned();
                    }
                }
                Ok(answer)
            })
        })
        .collect();
    running
        .into_iter()
        .map(|thread| match thread.join() {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the probe thread panicked".into()),
        })
        .collect()
}

/// Probes until each of `probes` has had `answer` (a change takes the loaders a
/// moment), asking again only those that did not; fails naming the ones that never
/// got it.
fn expect_answered(probes: &[Probe], answer: &str, what: &str) {
    let deadline = Instant::now() + CONVERGE;
    let mut left = probes.to_vec();
    loop {
        let results = run(&left);
        let failed: Vec<(Probe, Result<String, String>)> = left
            .into_iter()
            .zip(results)
            .filter(|(_, got)| got.as_deref() != Ok(answer))
            .collect();
        if failed.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let lines: Vec<String> = failed.iter().map(|(p, got)| format!("  {p}: {got:?}")).collect();
            panic!(
                "{what}: {} of {} probes never got {answer:?} within {CONVERGE:?}:\n{}",
                failed.len(),
                probes.len(),
                lines.join("\n")
            );
        }
        left = failed.into_iter().map(|(p, _)| p).collect();
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Probes until none of `probes` is answered any more (the loaders applying a
/// policy); fails naming those still answered.
fn eventually_refused(probes: &[Probe], what: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let answered: Vec<String> = probes
            .iter()
            .zip(run(probes))
            .filter_map(|(p, got)| got.ok().map(|answer| format!("  {p}: answered {answer:?}")))
            .collect();
        if answered.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: still answered after {CONVERGE:?}, the policy never applied:\n{}",
                answered.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Asks every one of `probes` `rounds` times over (a round takes a probe timeout):
/// none may get any answer. A connection that opens at all counts: it got past the
/// policy.
fn expect_refused(probes: &[Probe], rounds: usize, what: &str) {
    let mut leaks = Vec::new();
    for round in 1..=rounds {
        for (p, got) in probes.iter().zip(run(probes)) {
            if let Ok(answer) = got {
                leaks.push(format!("  {p}: answered {answer:?} (round {round} of {rounds})"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{what}: {} of {} probes got through a policy that denies them:\n{}",
        leaks.len(),
        probes.len() * rounds,
        leaks.join("\n")
    );
}

/// Where a pod sits in the cluster's objects: node, namespace, `app` label.
struct Placement<'a> {
    pod: &'a Pod,
    node: usize,
    namespace: &'static str,
    app: &'static str,
}

/// `pod` on node `node`, in `namespace`, labelled `app=<app>`.
fn at<'a>(pod: &'a Pod, node: usize, namespace: &'static str, app: &'static str) -> Placement<'a> {
    Placement {
        pod,
        node,
        namespace,
        app,
    }
}

/// Writes the pods (and their namespaces) where every loader reads them.
fn write_pods(cluster: &Cluster, placements: &[Placement]) {
    let mut namespaces: Vec<&str> = placements.iter().map(|p| p.namespace).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let objects = placements
        .iter()
        .map(|p| {
            let labels = [("app".to_string(), p.app.to_string())].into();
            pod_object(p.namespace, &p.pod.name, &labels, &cluster.nodes[p.node].name, p.pod)
        })
        .chain(namespaces.into_iter().map(|name| {
            let labels: BTreeMap<String, String> =
                [("kubernetes.io/metadata.name".to_string(), name.to_string())].into();
            namespace_object(name, &labels)
        }))
        .collect();
    write_objects(&cluster.cluster_state.join("pods.json"), objects).unwrap();
}

/// Replaces every NetworkPolicy with `policies`.
fn write_policies(cluster: &Cluster, policies: Vec<Value>) {
    write_objects(&cluster.cluster_state.join("policies.json"), policies).unwrap();
}

/// UDP servers of the kernel-flow tests: the port the node's host talks to, and a
/// control port nobody but pods ever uses. Before any policy the pods check the path
/// on the control port only, so no 5-tuple a pod was allowed before the policy can
/// be what answers on the served port later.
const SERVED: u16 = 9000;
const CONTROL: u16 = 9001;

/// UDP servers on `SERVED` and `CONTROL`, both families, answering with `name`.
fn udp_servers(pod: &Pod, name: &str) -> Vec<Backend> {
    Family::ALL
        .into_iter()
        .flat_map(|family| [SERVED, CONTROL].map(|port| (family, port)))
        .map(|(family, port)| {
            Backend::start(&pod.name, SocketAddr::new(pod.ip(family), port), Protocol::Udp, name).unwrap()
        })
        .collect()
}

/// Node 0's host (a connected UDP socket) to `server`'s UDP `port`, both families.
fn from_node_0s_host(cluster: &Cluster, server: &Pod, port: u16) -> Vec<Probe> {
    Family::ALL
        .into_iter()
        .map(|family| {
            let to = SocketAddr::new(server.ip(family), port);
            probe("node 0's host", &cluster.nodes[0].name, Protocol::Udp, to, "direct")
        })
        .collect()
}

/// `clients` to `server`'s UDP `port`, both families.
fn udp_probes(clients: &[(&Pod, &str)], server: &Pod, port: u16) -> Vec<Probe> {
    Family::ALL
        .into_iter()
        .flat_map(|family| {
            clients.iter().map(move |(pod, who)| {
                let to = SocketAddr::new(server.ip(family), port);
                probe(who, &pod.name, Protocol::Udp, to, "direct")
            })
        })
        .collect()
}

/// A namespace's deny-all ingress: pod-1, its only pod, isolated. pod-1's UDP server
/// answers one datagram from node 0's host (a host process may reach its own pods by
/// default, and that answer goes to the kernel); from then on pods on either node must
/// still get nothing from that port. Today the answer records pod-1's `ip:port/udp`
/// in the kernel-flow map and every later packet to it, from any pod on any node,
/// skips policy.
#[test]
fn a_udp_server_that_answered_its_host_stays_unreachable_from_other_pods() {
    let cluster = ClusterGuard::up("pp1").unwrap();
    let (server, same_node, other_node, other_node_too) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-4"),
        cluster.pod("pod-2"),
        cluster.pod("pod-3"),
    );
    write_pods(
        &cluster,
        &[
            at(&server, 0, "isolated", "server"),
            at(&same_node, 0, "clients", "client"),
            at(&other_node, 1, "clients", "client"),
            at(&other_node_too, 1, "default", "client"),
        ],
    );
    write_policies(&cluster, vec![]);
    let servers = udp_servers(&server, "pod-1");
    let clients = [
        (&same_node, "pod-4 (node 0, same node)"),
        (&other_node, "pod-2 (node 1)"),
    ];
    let from_host = |port: u16| from_node_0s_host(&cluster, &server, port);

    expect_answered(
        &udp_probes(&clients, &server, CONTROL),
        "pod-1",
        "without policy, pods on both nodes reach pod-1's UDP server",
    );
    // The clients are isolated too (their own ingress): a connection an isolated
    // client opens must not stand in for the server's ingress rules.
    write_policies(
        &cluster,
        ["isolated", "clients"]
            .map(|namespace| {
                policy(
                    namespace,
                    "deny-ingress",
                    json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                )
            })
            .to_vec(),
    );
    eventually_refused(
        &udp_probes(&clients, &server, CONTROL),
        "a deny-all ingress policy in its namespace isolates pod-1",
    );
    expect_refused(
        &udp_probes(&clients, &server, SERVED),
        1,
        "before its host talked to it, pod-1's UDP port is isolated",
    );

    expect_answered(
        &from_host(SERVED),
        "pod-1",
        "node 0's host reaches its own isolated pod (host-to-pod is allowed by default)",
    );
    expect_refused(
        &udp_probes(&clients, &server, SERVED),
        3,
        "after pod-1's UDP server answered its node's host, pods of another namespace on both nodes reached it",
    );
    expect_refused(
        &udp_probes(&clients, &server, CONTROL),
        1,
        "pod-1's other UDP port stays isolated too",
    );
    expect_answered(
        &from_host(SERVED),
        "pod-1",
        "the server was up all along: node 0's host still gets its answers",
    );
    drop(servers);
    cluster.finish().unwrap();
}

/// The same shortcut for egress: pod-1 and pod-3 (one on each node) are in a namespace
/// whose deny-all egress policy isolates them; pod-4's UDP server, on node 0 and not
/// isolated, answers node 0's host once. pod-1, on the same node, must still not reach
/// that port (today its packets to the recorded end skip pod-1's egress rules), and
/// neither must pod-3.
#[test]
fn an_egress_isolated_pod_stays_isolated_from_a_udp_server_that_answered_its_host() {
    let cluster = ClusterGuard::up("pp2").unwrap();
    let (isolated, isolated_there, server, bystander) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-3"),
        cluster.pod("pod-4"),
        cluster.pod("pod-2"),
    );
    write_pods(
        &cluster,
        &[
            at(&isolated, 0, "isolated", "client"),
            at(&isolated_there, 1, "isolated", "client"),
            at(&server, 0, "default", "server"),
            at(&bystander, 1, "default", "client"),
        ],
    );
    write_policies(&cluster, vec![]);
    let servers = udp_servers(&server, "pod-4");
    let clients = [
        (&isolated, "pod-1 (egress-isolated, node 0, same node)"),
        (&isolated_there, "pod-3 (egress-isolated, node 1)"),
    ];
    let from_host = from_node_0s_host(&cluster, &server, SERVED);

    expect_answered(
        &udp_probes(&clients, &server, CONTROL),
        "pod-4",
        "without policy, pods on both nodes reach pod-4's UDP server",
    );
    write_policies(
        &cluster,
        vec![policy(
            "isolated",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        )],
    );
    eventually_refused(
        &udp_probes(&clients, &server, CONTROL),
        "a deny-all egress policy in their namespace isolates pod-1 and pod-3",
    );
    expect_refused(
        &udp_probes(&clients, &server, SERVED),
        1,
        "before node 0's host talked to pod-4, the egress-isolated pods cannot reach its UDP port",
    );

    expect_answered(&from_host, "pod-4", "node 0's host reaches pod-4's UDP server");
    expect_refused(
        &udp_probes(&clients, &server, SERVED),
        3,
        "after pod-4's UDP server answered its node's host, egress-isolated pods reached it",
    );
    expect_answered(
        &udp_probes(&[(&bystander, "pod-2 (not isolated, node 1)")], &server, SERVED),
        "pod-4",
        "the server was up all along: a pod without egress rules reaches it",
    );
    drop(servers);
    cluster.finish().unwrap();
}

/// A host's unconnected UDP socket asks `to` once: the answer, from whatever
/// source it came, or why none came.
fn unconnected_udp(netns: &str, to: SocketAddr) -> Result<String, String> {
    spawn_in(netns, move || {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let socket = UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(PROBE_TIMEOUT))?;
        socket.send_to(b"probe", to)?;
        let mut buf = [0u8; 64];
        let (len, _) = socket.recv_from(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    })
    .join()
    .expect("client thread")
    .map_err(|e| format!("{e:#}"))
}

/// The link-local address of `pod`'s host veth on `node`.
fn host_veth_link_local(node: &Node, pod: &Pod) -> std::net::Ipv6Addr {
    let endpoint = node.endpoint(pod.ip(Family::V4)).unwrap();
    let veth = endpoint["ifname"].as_str().unwrap();
    let shown = velox_test_env::run(
        "ip",
        &[
            "-n", &node.name, "-6", "-j", "addr", "show", "dev", veth, "scope", "link",
        ],
    )
    .unwrap();
    let shown: Value = serde_json::from_str(&shown).unwrap();
    let infos = shown[0]["addr_info"].as_array().cloned().unwrap_or_default();
    let address = infos.iter().find_map(|info| info["local"].as_str());
    address
        .unwrap_or_else(|| panic!("{veth}: no link-local address: {shown}"))
        .parse()
        .unwrap()
}

/// `pod` connects over TCP to `port` of the link-local address of its host veth on
/// `node` and reads the answer.
fn to_host_over_link_local(node: &Node, pod: &Pod, port: u16) -> Result<String, String> {
    let host = host_veth_link_local(node, pod);
    spawn_in(&pod.name, move || {
        let scope = nix::net::if_::if_nametoindex("eth0")?;
        let to = SocketAddr::V6(std::net::SocketAddrV6::new(host, port, 0, scope));
        let mut stream = TcpStream::connect_timeout(&to, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .join()
    .expect("client thread")
    .map_err(|e| format!("{e:#}"))
}

/// `pod`'s own link-local address (its eth0's).
fn pod_link_local(pod: &Pod) -> std::net::Ipv6Addr {
    let shown = velox_test_env::run(
        "ip",
        &[
            "-n", &pod.name, "-6", "-j", "addr", "show", "dev", "eth0", "scope", "link",
        ],
    )
    .unwrap();
    let shown: Value = serde_json::from_str(&shown).unwrap();
    let infos = shown[0]["addr_info"].as_array().cloned().unwrap_or_default();
    let address = infos.iter().find_map(|info| info["local"].as_str());
    address
        .unwrap_or_else(|| panic!("{}: no link-local address: {shown}", pod.name))
        .parse()
        .unwrap()
}

/// Whether a datagram `from` (bound in `sender`'s netns) reaches `to` in
/// `receiver`'s netns within a probe timeout.
fn datagram_arrives(sender: &Pod, from: SocketAddr, receiver: &Pod, to: SocketAddr) -> bool {
    let listening = spawn_in(&receiver.name, move || Ok(UdpSocket::bind(to)?))
        .join()
        .unwrap()
        .unwrap();
    listening.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    spawn_in(&sender.name, move || {
        let socket = UdpSocket::bind(from)?;
        socket.send_to(b"probe", to)?;
        Ok(())
    })
    .join()
    .unwrap()
    .unwrap();
    let mut buf = [0u8; 16];
    listening.recv_from(&mut buf).is_ok()
}

/// Item 3: an egress-isolated pod answers its node's host, which reaches its pods by
/// default: an unconnected UDP socket of the host too, as a connected one (those
/// answers were dropped). And its link-local address is no way around its egress
/// rules to the host (sources link-local passed before policy).
#[test]
fn an_egress_isolated_pod_answers_its_host_and_reaches_it_by_no_other_way() {
    let cluster = ClusterGuard::up("pp6").unwrap();
    let (isolated, free) = (cluster.pod("pod-1"), cluster.pod("pod-4"));
    write_pods(
        &cluster,
        &[
            at(&isolated, 0, "isolated", "server"),
            at(&free, 0, "default", "client"),
        ],
    );
    write_policies(&cluster, vec![]);
    let servers = [udp_servers(&isolated, "pod-1"), udp_servers(&free, "pod-4")];
    let host = cluster.nodes[0].name.clone();
    const HOST_PORT: u16 = 9100;
    let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HOST_PORT));
    let host_server = Backend::start(&host, any, Protocol::Tcp, "host").unwrap();
    let isolated_to_free = udp_probes(&[(&isolated, "pod-1 (egress-isolated)")], &free, CONTROL);
    let host_to_isolated = from_node_0s_host(&cluster, &isolated, SERVED);

    expect_answered(&isolated_to_free, "pod-4", "without policy, pod-1 reaches pod-4");
    for pod in [&isolated, &free] {
        let answer = to_host_over_link_local(&cluster.nodes[0], pod, HOST_PORT);
        assert_eq!(
            answer.as_deref(),
            Ok("host"),
            "{} -> its host veth's link-local address",
            pod.name
        );
    }
    write_policies(
        &cluster,
        vec![policy(
            "isolated",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        )],
    );
    eventually_refused(&isolated_to_free, "a deny-all egress policy isolates pod-1");

    for attempt in 1..=3 {
        let answer = to_host_over_link_local(&cluster.nodes[0], &isolated, HOST_PORT);
        assert!(
            answer.is_err(),
            "pod-1 (egress-isolated) -> its host over link-local, attempt {attempt}: {answer:?}"
        );
    }
    let answer = to_host_over_link_local(&cluster.nodes[0], &free, HOST_PORT);
    assert_eq!(
        answer.as_deref(),
        Ok("host"),
        "pod-4 (not isolated) -> its host over link-local"
    );
    // A link-local source is for the host alone: the fast path delivered it to
    // other pods (a forged router advertisement from fe80::1 among them).
    let link_local = pod_link_local(&free);
    let index = spawn_in(&free.name, || Ok(nix::net::if_::if_nametoindex("eth0")?))
        .join()
        .unwrap()
        .unwrap();
    for (receiver, port) in [(&isolated, 9201), (&cluster.pod("pod-2"), 9202)] {
        let to = SocketAddr::new(receiver.ip(Family::V6), port);
        let global = SocketAddr::new(free.ip(Family::V6), 0);
        assert!(
            datagram_arrives(&free, global, receiver, to),
            "pod-4 -> {to} from its own address"
        );
        let from = SocketAddr::V6(std::net::SocketAddrV6::new(link_local, 0, 0, index));
        assert!(
            !datagram_arrives(&free, from, receiver, to),
            "pod-4 -> {to} from its link-local address {link_local}: delivered"
        );
    }
    expect_answered(
        &host_to_isolated,
        "pod-1",
        "pod-1 answers its host's connected UDP socket",
    );
    for family in Family::ALL {
        let to = SocketAddr::new(isolated.ip(family), SERVED);
        let answer = unconnected_udp(&host, to);
        assert_eq!(
            answer.as_deref(),
            Ok("pod-1"),
            "node 0's host (unconnected UDP) -> {to}: the egress-isolated pod's answer"
        );
    }
    drop((servers, host_server));
    cluster.finish().unwrap();
}

/// Item 1's last case: what the shortcut recorded for a pod outlives it. pod-5's UDP
/// server (not isolated) answers node 0's host, pod-5 goes, and the next pod is given
/// its addresses (the allocator's round-robin is moved back one, as a full cycle
/// through the subnet would bring it) in a namespace whose deny-all ingress policy
/// isolates it. Pods on both nodes must get nothing from the new pod's server on the
/// port the old one had answered from; today the old pod's `ip:port/udp` entries
/// still send every packet to that port around the policy.
#[test]
fn a_pod_given_a_used_address_inherits_no_open_port() {
    let cluster = ClusterGuard::up("pp4").unwrap();
    let node = &cluster.nodes[0];
    let (same_node, other_node) = (cluster.pod("pod-4"), cluster.pod("pod-2"));
    let old = node.add_pod(&cluster.pod_name(0, "pod-5")).unwrap();
    write_pods(
        &cluster,
        &[
            at(&old, 0, "default", "old"),
            at(&same_node, 0, "default", "client"),
            at(&other_node, 1, "default", "client"),
        ],
    );
    write_policies(&cluster, vec![]);
    let host = node.name.clone();
    let from_host = |pod: &Pod, name: &str| -> Vec<Probe> {
        Family::ALL
            .into_iter()
            .map(|family| {
                let to = SocketAddr::new(pod.ip(family), SERVED);
                probe(&format!("node 0's host to {name}"), &host, Protocol::Udp, to, "direct")
            })
            .collect()
    };
    let servers = udp_servers(&old, "pod-5");
    expect_answered(
        &from_host(&old, "pod-5"),
        "pod-5",
        "node 0's host reaches pod-5's UDP server",
    );
    drop(servers);
    node.delete_pod(&old.name).unwrap();

    // The allocator goes on after the last address it handed out: one before pod-5's.
    let ipam = node.state_dir.join("ipam").join(format!("velox-{}", node.name));
    for family in Family::ALL {
        let before = match old.ip(family) {
            IpAddr::V4(ip) => std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string(),
            IpAddr::V6(ip) => std::net::Ipv6Addr::from(u128::from(ip) - 1).to_string(),
        };
        let file = ipam.join(format!("last_reserved_ip.{}", family.number()));
        std::fs::write(&file, before).unwrap();
    }
    let new = node.add_pod(&cluster.pod_name(0, "pod-6")).unwrap();
    assert_eq!(
        new.ips, old.ips,
        "setting up: pod-6 should have been given pod-5's addresses"
    );
    write_pods(
        &cluster,
        &[
            at(&new, 0, "isolated", "new"),
            at(&same_node, 0, "default", "client"),
            at(&other_node, 1, "default", "client"),
        ],
    );
    let servers = udp_servers(&new, "pod-6");
    let clients = [
        (&same_node, "pod-4 (node 0, same node)"),
        (&other_node, "pod-2 (node 1)"),
    ];
    expect_answered(
        &udp_probes(&clients, &new, CONTROL),
        "pod-6",
        "without policy, pods on both nodes reach pod-6's UDP server",
    );
    write_policies(
        &cluster,
        vec![policy(
            "isolated",
            "deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )],
    );
    eventually_refused(
        &udp_probes(&clients, &new, CONTROL),
        "a deny-all ingress policy in its namespace isolates pod-6",
    );
    expect_refused(
        &udp_probes(&clients, &new, SERVED),
        3,
        "pod-6, isolated, inherited the open UDP port its address had when pod-5 had it",
    );
    expect_answered(
        &from_host(&new, "pod-6"),
        "pod-6",
        "the server was up all along: node 0's host gets pod-6's answers",
    );
    drop(servers);
    cluster.finish().unwrap();
}

fn cluster_ip(family: Family) -> IpAddr {
    match family {
        Family::V4 => "10.96.0.40".parse().unwrap(),
        Family::V6 => "fd00:96::40".parse().unwrap(),
    }
}

/// The TCP port pod-1's server listens on behind every frontend.
const TARGET_PORT: u16 = 8080;

/// The ways in that kube-proxy and portmap give the kernel, to pod-1's port 8080.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frontend {
    /// node 0's address:30080, `externalTrafficPolicy: Local`: no SNAT, the client's
    /// address reaches the pod.
    NodePort,
    /// node 0's address:8081, a portmap hostPort: a DNAT, no SNAT.
    HostPort,
    /// 10.96.0.40:80 / [fd00:96::40]:80, DNATed on the client's own node (the default
    /// loader of the test environment runs without `--socket-lb`: every pod is an
    /// opted-out pod).
    ClusterIp,
}

impl Frontend {
    fn addr(self, cluster: &Cluster, family: Family) -> SocketAddr {
        match self {
            Self::NodePort => SocketAddr::new(cluster.node_ip(0, family), 30080),
            Self::HostPort => SocketAddr::new(cluster.node_ip(0, family), 8081),
            Self::ClusterIp => SocketAddr::new(cluster_ip(family), 80),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::NodePort => "kube-proxy NodePort 30080 on node 0 (eTP Local)",
            Self::HostPort => "portmap hostPort 8081 on node 0",
            Self::ClusterIp => "kube-proxy ClusterIP :80 (DNAT on the client's node)",
        }
    }

    /// kube-proxy's (or portmap's) rules for it: a NodePort or hostPort of node 0's
    /// address on node 0; a ClusterIP on every node.
    fn install(self, cluster: &Cluster, backend: &Pod) {
        for family in Family::ALL {
            let rule = ServiceRule {
                frontend: self.addr(cluster, family),
                protocol: Protocol::Tcp,
                backend: SocketAddr::new(backend.ip(family), TARGET_PORT),
                snat: false,
            };
            let nodes = match self {
                Self::NodePort | Self::HostPort => &cluster.nodes[..1],
                Self::ClusterIp => &cluster.nodes[..],
            };
            for node in nodes {
                rule.install(node).unwrap();
            }
        }
    }
}

/// An ingress-isolated pod-1 (app=web, admitting app=client only) serving TCP 8080 in
/// both families behind kube-proxy-style iptables DNAT, which the kernel, not a Velox
/// redirect, delivers into its veth. Clients: pod-4 (app=client, node 0), pod-5
/// (app=other, node 0, added here), pod-2 and pod-3 (app=other, node 1), the external
/// host behind the router, node 0's own host. The policy must decide on every path:
/// today the NodePort, the hostPort and a same-node ClusterIP reach pod-1 whatever it
/// admits. A second policy admits the external host by ipBlock: it then gets through
/// the NodePort, and nobody else does.
#[test]
fn the_kernels_deliveries_into_an_isolated_pod_are_policed() {
    const FRONTENDS: [Frontend; 3] = [Frontend::NodePort, Frontend::HostPort, Frontend::ClusterIp];
    let cluster = ClusterGuard::up("pp3").unwrap();
    let server = cluster.pod("pod-1");
    let client = cluster.pod("pod-4");
    let stranger_here = cluster.nodes[0].add_pod(&cluster.pod_name(0, "pod-5")).unwrap();
    let (stranger, stranger_too) = (cluster.pod("pod-2"), cluster.pod("pod-3"));
    write_pods(
        &cluster,
        &[
            at(&server, 0, "default", "web"),
            at(&client, 0, "default", "client"),
            at(&stranger_here, 0, "default", "other"),
            at(&stranger, 1, "default", "other"),
            at(&stranger_too, 1, "default", "other"),
        ],
    );
    write_policies(&cluster, vec![]);
    let servers: Vec<Backend> = Family::ALL
        .into_iter()
        .map(|family| {
            let on = SocketAddr::new(server.ip(family), TARGET_PORT);
            Backend::start(&server.name, on, Protocol::Tcp, "pod-1").unwrap()
        })
        .collect();
    for frontend in FRONTENDS {
        frontend.install(&cluster, &server);
    }

    let admitted = (client.name.as_str(), "pod-4 (app=client, node 0)");
    let strangers_here = [(stranger_here.name.as_str(), "pod-5 (app=other, node 0)")];
    let strangers_there = [
        (stranger.name.as_str(), "pod-2 (app=other, node 1)"),
        (stranger_too.name.as_str(), "pod-3 (app=other, node 1)"),
    ];
    let strangers: Vec<(&str, &str)> = strangers_here.iter().chain(&strangers_there).copied().collect();
    let outside = (
        cluster.external.as_str(),
        "the external host (198.41.0.4, 2001:db8:41::4)",
    );
    let host = (cluster.nodes[0].name.as_str(), "node 0's host (a kubelet probe)");
    // `clients` through `frontends`, both families.
    let through = |clients: &[(&str, &str)], frontends: &[Frontend]| -> Vec<Probe> {
        let mut probes = Vec::new();
        for family in Family::ALL {
            for &frontend in frontends {
                for (netns, who) in clients {
                    let to = frontend.addr(&cluster, family);
                    probes.push(probe(who, netns, Protocol::Tcp, to, frontend.name()));
                }
            }
        }
        probes
    };
    // `clients` straight to pod-1's address, both families.
    let direct = |clients: &[(&str, &str)]| -> Vec<Probe> {
        let mut probes = Vec::new();
        for family in Family::ALL {
            for (netns, who) in clients {
                let to = SocketAddr::new(server.ip(family), TARGET_PORT);
                probes.push(probe(who, netns, Protocol::Tcp, to, "direct"));
            }
        }
        probes
    };
    let pods: Vec<(&str, &str)> = [admitted].iter().chain(&strangers).copied().collect();
    let node_frontends = [Frontend::NodePort, Frontend::HostPort];

    // No policy: every path works, so a refusal later is the policy's.
    let everyone: Vec<Probe> = [
        through(&pods, &FRONTENDS),
        through(&[outside], &node_frontends),
        direct(&pods),
        direct(&[host]),
    ]
    .concat();
    expect_answered(
        &everyone,
        "pod-1",
        "without policy, every client reaches pod-1 on every path",
    );

    write_policies(
        &cluster,
        vec![policy(
            "default",
            "web-from-clients",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}),
        )],
    );
    // The paths Velox redirects itself say when the rules are in the maps.
    eventually_refused(
        &direct(&strangers),
        "the policy isolates pod-1 from pods it does not admit on the direct path",
    );
    expect_answered(
        &[through(&[admitted], &FRONTENDS), direct(&[admitted])].concat(),
        "pod-1",
        "pod-4, admitted, reaches the isolated pod-1 directly and through every frontend",
    );
    expect_answered(
        &direct(&[host]),
        "pod-1",
        "node 0's host (kubelet probes) reaches its isolated pod-1: host-to-pod is allowed by default",
    );
    expect_refused(
        &[through(&strangers, &FRONTENDS), through(&[outside], &node_frontends)].concat(),
        2,
        "what kube-proxy or portmap hand to the kernel reaches the isolated pod-1 without its ingress rules",
    );

    // The external host admitted by address: the NodePort and the hostPort let it in,
    // and still nobody else.
    write_policies(
        &cluster,
        vec![
            policy(
                "default",
                "web-from-clients",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}),
            ),
            policy(
                "default",
                "web-from-outside",
                json!({"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"ipBlock": {"cidr": format!("{}/32", external_ip(Family::V4))}},
                                             {"ipBlock": {"cidr": format!("{}/128", external_ip(Family::V6))}}]}]}),
            ),
        ],
    );
    expect_answered(
        &through(&[outside], &node_frontends),
        "pod-1",
        "the external host, admitted by an ipBlock, reaches pod-1 through the NodePort and the hostPort",
    );
    expect_answered(
        &[through(&[admitted], &FRONTENDS), direct(&[host])].concat(),
        "pod-1",
        "pod-4 and node 0's host still reach pod-1",
    );
    expect_refused(
        &[through(&strangers, &FRONTENDS), direct(&strangers)].concat(),
        1,
        "the ipBlock admits the external host, not pods the policies do not admit",
    );
    drop(servers);
    cluster.finish().unwrap();
}

/// A pod's veth that lost its `to_pod` link (its pin removed, which detaches it)
/// fails CHECK and gets the link back from the loader's next pass: without it, what
/// the kernel delivers into the pod would meet no policy.
#[test]
fn a_lost_to_pod_link_fails_check_and_comes_back() {
    let node = velox_test_env::NodeGuard::up("pp5").unwrap();
    let pod_name = node.pod_name("a");
    let pod = node.add_pod("a").unwrap();
    let host_veth = velox_node::endpoint::host_ifname(&velox_node::endpoint::Attachment {
        container_id: pod_name.clone(),
        ifname: "eth0".into(),
    });
    let mut conf = node.conf("1.1.0");
    let ips: Vec<Value> = pod
        .ips
        .iter()
        .map(|ip| json!({"address": ipnet::IpNet::from(*ip)}))
        .collect();
    conf["prevResult"] = json!({"cniVersion": "1.1.0", "ips": ips});
    let check = || {
        node.cni("CHECK", &pod_name, Some(&pod.netns_path()), "eth0", &conf)
            .unwrap()
    };
    let link = velox_node::Bpffs::new(&node.bpffs_root).tc_link(velox_node::layout::Hook::TcEgress, &host_veth);
    assert!(link.exists(), "ADD pinned to_pod's link");
    assert!(check().success, "{}", check().stdout);

    // The loader is stopped so that CHECK sees the loss before the repair does.
    node.stop_loader(nix::sys::signal::Signal::SIGTERM).unwrap();
    std::fs::remove_file(&link).unwrap();
    let outcome = check();
    assert!(!outcome.success, "CHECK passed without to_pod");
    assert!(
        outcome.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("to_pod is not attached"),
        "{}",
        outcome.stdout
    );
    node.start_loader().unwrap();
    assert!(
        velox_test_env::wait_for(Duration::from_secs(5), || link.exists()),
        "the loader put to_pod back"
    );
    assert!(check().success, "{}", check().stdout);
    node.finish().unwrap();
}
