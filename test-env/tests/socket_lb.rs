//! Velox's own Service load balancer (`--socket-lb`) on the two-node cluster, with no
//! kube-proxy rules anywhere: Services and EndpointSlices come from the cluster-state
//! file, and clients are processes in their node's cgroup (pods and hosts).
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use velox_test_env::backend::Backend;
use velox_test_env::cluster_state::{self, ServicePort, ServiceSpec};
use velox_test_env::kube_proxy::Protocol;
use velox_test_env::{in_netns_and_cgroup, netns_path, wait_for, ClusterGuard, Family, Node, Pod};

const HTTP: ServicePort = ServicePort {
    name: "http",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
    node_port: None,
};
const DNS: ServicePort = ServicePort {
    name: "dns",
    protocol: Protocol::Udp,
    port: 53,
    target_port: 5353,
    node_port: None,
};

fn cluster_ip(family: Family, last: u8) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([10, 96, 0, last]),
        Family::V6 => IpAddr::from([0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(last)]),
    }
}

/// The cluster with every loader restarted with the load balancer on, reading
/// Services from one file.
fn cluster_with_socket_lb(tag: &str) -> (ClusterGuard, PathBuf) {
    let cluster = ClusterGuard::up(tag).unwrap();
    let state = cluster.peers_file.with_file_name("services.json");
    cluster_state::write(&state, &[]).unwrap();
    for node in &cluster.nodes {
        node.stop_loader(Signal::SIGTERM).unwrap();
        let cgroup = node.cgroup().unwrap();
        let flags = [
            "--cluster-state",
            state.to_str().unwrap(),
            "--socket-lb",
            "--socket-lb-cgroup",
            cgroup.to_str().unwrap(),
        ];
        node.start_loader_with(&flags).unwrap();
    }
    (cluster, state)
}

/// One request by `velox-probe` from `netns`, as a process of `node`'s cgroup.
fn probe(node: &Node, netns: &str, mode: &str, to: SocketAddr) -> Value {
    node.probe(netns, mode, to).unwrap()
}

/// `velox-probe udp-hold`: one UDP socket connected to `to` from `netns` (a process
/// of `node`'s cgroup), an exchange at start and one more at each `again`.
struct HeldUdp {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl HeldUdp {
    fn start(node: &Node, netns: &str, to: SocketAddr) -> Self {
        let mut child = in_netns_and_cgroup(
            netns,
            &node.cgroup().unwrap(),
            node.bins.probe.to_str().unwrap(),
            &["udp-hold", &to.to_string()],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        Self { child, lines }
    }

    /// The last exchange's outcome (`answer` and `from`, or `error`).
    fn exchanged(&mut self) -> Value {
        serde_json::from_str(&self.lines.next().unwrap().unwrap()).unwrap()
    }

    /// The second exchange, on the same socket; the probe ends after it.
    fn again(mut self) -> Value {
        std::io::Write::write_all(self.child.stdin.as_mut().unwrap(), b"again\n").unwrap();
        let second = self.exchanged();
        self.child.wait().unwrap();
        second
    }
}

/// Waits until every node's load balancer shows `frontends` frontends.
fn wait_for_services(cluster: &ClusterGuard, frontends: usize) {
    let ready = || {
        cluster
            .nodes
            .iter()
            .all(|n| n.dump("services").is_ok_and(|rows| rows.len() == frontends))
    };
    assert!(
        wait_for(Duration::from_secs(5), ready),
        "the loaders did not pick up the Services"
    );
}

#[test]
fn cluster_ips_are_translated_in_the_socket_for_pods_and_hosts_on_both_nodes() {
    let (cluster, state) = cluster_with_socket_lb("slb");
    let (pod1, pod2, pod3, pod4) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-2"),
        cluster.pod("pod-3"),
        cluster.pod("pod-4"),
    );
    // Backends on both nodes: pod-2 on worker-2, pod-4 on worker-1.
    let backend_pods = [&pod2, &pod4];
    let mut backends = Vec::new();
    for pod in backend_pods {
        for family in Family::ALL {
            for port in [HTTP, DNS] {
                let addr = SocketAddr::new(pod.ip(family), port.target_port);
                backends.push(Backend::start(&pod.name, addr, port.protocol, &pod.name).unwrap());
            }
        }
    }
    let names: BTreeSet<String> = backend_pods.iter().map(|p| p.name.clone()).collect();
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: Family::ALL.map(|f| cluster_ip(f, 20)).to_vec(),
        ports: vec![HTTP, DNS],
        backends: backend_pods.iter().flat_map(|p| p.ips.clone()).collect(),
    };
    cluster_state::write(&state, &[web]).unwrap();
    wait_for_services(&cluster, 4);
    let dump = cluster.nodes[0].dump("services").unwrap();
    assert!(
        dump.iter().all(|row| row["backends"].as_array().unwrap().len() == 2),
        "{dump:?}"
    );

    let (worker1, worker2) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Pods on both nodes, and a process on worker-1's host.
    let clients: [(&Node, &str); 3] = [(worker1, &pod1.name), (worker2, &pod3.name), (worker1, &worker1.name)];
    for family in Family::ALL {
        let http = SocketAddr::new(cluster_ip(family, 20), 80);
        let dns = SocketAddr::new(cluster_ip(family, 20), 53);
        for (node, netns) in clients {
            let mut reached = BTreeSet::new();
            for _ in 0..16 {
                let answer = probe(node, netns, "tcp", http);
                assert_eq!(
                    answer["peer"],
                    http.to_string(),
                    "getpeername shows the Service: {answer}"
                );
                reached.insert(answer["answer"].as_str().unwrap().to_string());
            }
            assert_eq!(
                reached, names,
                "{netns} -> {http}: connections spread over every backend"
            );
            for mode in ["udp", "udp-sendto"] {
                let answer = probe(node, netns, mode, dns);
                assert!(
                    names.contains(answer["answer"].as_str().unwrap_or_default()),
                    "{mode} {netns}: {answer}"
                );
                assert_eq!(
                    answer["peer"],
                    dns.to_string(),
                    "{mode}: the reply comes from the Service"
                );
            }
        }
    }
    drop(backends);
    cluster.finish().unwrap();
}

#[test]
fn no_backend_refuses_at_once_and_a_removed_backend_gets_no_new_connections() {
    let (cluster, state) = cluster_with_socket_lb("slbchg");
    let (pod1, pod2, pod4) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    let worker1 = &cluster.nodes[0];
    let mut backends = Vec::new();
    for pod in [&pod2, &pod4] {
        for family in Family::ALL {
            let addr = SocketAddr::new(pod.ip(family), HTTP.target_port);
            backends.push(Backend::start(&pod.name, addr, Protocol::Tcp, &pod.name).unwrap());
        }
    }
    let web = |backends: &[&Pod]| ServiceSpec {
        name: "web".into(),
        cluster_ips: Family::ALL.map(|f| cluster_ip(f, 30)).to_vec(),
        ports: vec![HTTP],
        backends: backends.iter().flat_map(|p| p.ips.clone()).collect(),
    };
    let empty = ServiceSpec {
        name: "empty".into(),
        cluster_ips: Family::ALL.map(|f| cluster_ip(f, 31)).to_vec(),
        ports: vec![HTTP],
        backends: Vec::new(),
    };
    cluster_state::write(&state, &[web(&[&pod2, &pod4]), empty.clone()]).unwrap();
    wait_for_services(&cluster, 4);

    for family in Family::ALL {
        let started = Instant::now();
        let answer = probe(worker1, &pod1.name, "tcp", SocketAddr::new(cluster_ip(family, 31), 80));
        assert_eq!(answer["error"], "ConnectionRefused", "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once, not after a timeout"
        );
    }
    let rows = worker1.dump("services").unwrap();
    let empty_row = rows
        .iter()
        .find(|r| r["frontend"] == format!("{}:80", cluster_ip(Family::V4, 31)))
        .unwrap();
    assert_eq!(empty_row["state"], "no backends");

    // pod-4 leaves the Service: every new connection goes to pod-2.
    cluster_state::write(&state, &[web(&[&pod2]), empty]).unwrap();
    let only_pod2 = || {
        worker1.dump("services").is_ok_and(|rows| {
            rows.iter()
                .filter(|r| r["state"] == "ok")
                .all(|r| r["backends"].as_array().unwrap().len() == 1)
        })
    };
    assert!(
        wait_for(Duration::from_secs(5), only_pod2),
        "the backend was not removed"
    );
    for family in Family::ALL {
        for _ in 0..12 {
            let answer = probe(worker1, &pod1.name, "tcp", SocketAddr::new(cluster_ip(family, 30), 80));
            assert_eq!(answer["answer"], pod2.name, "{family:?}: {answer}");
        }
    }
    drop(backends);
    cluster.finish().unwrap();
}

/// Without `--kube-proxy-replacement`, a NodePort on another node's address is that
/// node's business (kube-proxy there, or its Velox NAT): the socket load balancer
/// answers for this node's addresses and loopback.
#[test]
fn node_ports_answer_on_this_nodes_addresses_and_on_loopback() {
    let (cluster, state) = cluster_with_socket_lb("slbnp");
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let worker1 = &cluster.nodes[0];
    let backends: Vec<Backend> = Family::ALL
        .iter()
        .map(|f| {
            Backend::start(
                &pod2.name,
                SocketAddr::new(pod2.ip(*f), 8080),
                Protocol::Tcp,
                &pod2.name,
            )
            .unwrap()
        })
        .collect();
    let node_port = ServiceSpec {
        name: "np".into(),
        cluster_ips: Family::ALL.map(|f| cluster_ip(f, 40)).to_vec(),
        ports: vec![ServicePort {
            node_port: Some(30080),
            ..HTTP
        }],
        backends: pod2.ips.clone(),
    };
    cluster_state::write(&state, &[node_port]).unwrap();
    // Two ClusterIPs, one NodePort per family.
    wait_for_services(&cluster, 4);
    for family in Family::ALL {
        let frontend = SocketAddr::new(cluster.node_ip(0, family), 30080);
        let answer = probe(worker1, &pod1.name, "tcp", frontend);
        assert_eq!(answer["answer"], pod2.name, "pod-1 -> {frontend}: {answer}");
        assert_eq!(answer["peer"], frontend.to_string());
    }
    for loopback in ["127.0.0.1:30080", "[::1]:30080"] {
        let answer = probe(worker1, &worker1.name, "tcp", loopback.parse().unwrap());
        assert_eq!(answer["answer"], pod2.name, "host -> {loopback}: {answer}");
    }
    drop(backends);
    cluster.finish().unwrap();
}

#[test]
fn a_pod_that_opted_out_keeps_its_sockets_untranslated() {
    let (cluster, state) = cluster_with_socket_lb("slbopt");
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let worker1 = &cluster.nodes[0];
    let _backend = Backend::start(
        &pod2.name,
        SocketAddr::new(pod2.ip(Family::V4), 8080),
        Protocol::Tcp,
        &pod2.name,
    )
    .unwrap();
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip(Family::V4, 50)],
        ports: vec![HTTP],
        backends: vec![pod2.ip(Family::V4)],
    };
    cluster_state::write(&state, &[web]).unwrap();
    wait_for_services(&cluster, 1);
    // A pod whose runtime (or Multus) passes `args.cni.socketLB: false`.
    let opted_out = cluster.pod_name(0, "optout");
    velox_test_env::run("ip", &["netns", "add", &opted_out]).unwrap();
    let mut conf = worker1.conf("1.1.0");
    conf["args"] = serde_json::json!({"cni": {"socketLB": false}});
    let netns = netns_path(&opted_out);
    let added = worker1.cni("ADD", &opted_out, Some(&netns), "eth0", &conf).unwrap();
    assert!(added.success, "{}", added.stdout);
    let opt_outs = || {
        let map = velox_node::Bpffs::new(&worker1.bpffs_root).map(velox_common::LB_OPT_OUT_MAP);
        let dump = velox_test_env::run("bpftool", &["-j", "map", "dump", "pinned", map.to_str().unwrap()]).unwrap();
        serde_json::from_str::<Value>(&dump).unwrap().as_array().unwrap().len()
    };
    assert_eq!(opt_outs(), 1);

    let frontend = SocketAddr::new(cluster_ip(Family::V4, 50), 80);
    let translated = probe(worker1, &pod1.name, "tcp", frontend);
    assert_eq!(translated["answer"], pod2.name, "{translated}");
    // Nothing answers a ClusterIP without kube-proxy: the untranslated connection fails.
    let untouched = probe(worker1, &opted_out, "tcp", frontend);
    assert!(
        untouched.get("error").is_some(),
        "the opted-out pod was translated: {untouched}"
    );

    let deleted = worker1.cni("DEL", &opted_out, Some(&netns), "eth0", &conf).unwrap();
    assert!(deleted.success, "{}", deleted.stdout);
    assert_eq!(opt_outs(), 0, "DEL removes the opt-out");
    cluster.finish().unwrap();
}

#[test]
fn a_connected_udp_socket_whose_backend_left_is_closed() {
    let (cluster, state) = cluster_with_socket_lb("slbudp");
    let (pod1, pod2, pod4) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    let worker1 = &cluster.nodes[0];
    let _backends: Vec<Backend> = [&pod2, &pod4]
        .iter()
        .map(|p| Backend::start(&p.name, SocketAddr::new(p.ip(Family::V4), 5353), Protocol::Udp, &p.name).unwrap())
        .collect();
    let dns = |backend: &Pod| ServiceSpec {
        name: "dns".into(),
        cluster_ips: vec![cluster_ip(Family::V4, 60)],
        ports: vec![DNS],
        backends: vec![backend.ip(Family::V4)],
    };
    cluster_state::write(&state, &[dns(&pod2)]).unwrap();
    wait_for_services(&cluster, 1);
    let frontend = SocketAddr::new(cluster_ip(Family::V4, 60), 53);
    // A socket connected once, used again later: a resolver's through the Service,
    // and one connected to pod-2 itself (issue 21: it was closed too).
    let mut resolver = HeldUdp::start(worker1, &pod1.name, frontend);
    let mut direct = HeldUdp::start(worker1, &pod1.name, SocketAddr::new(pod2.ip(Family::V4), 5353));
    let first = resolver.exchanged();
    assert_eq!(first["answer"], pod2.name, "{first}");
    let first = direct.exchanged();
    assert_eq!(first["answer"], pod2.name, "{first}");

    // pod-2 leaves the Service, pod-4 takes its place.
    cluster_state::write(&state, &[dns(&pod4)]).unwrap();
    let moved = || {
        worker1.dump("services").is_ok_and(|rows| {
            rows.iter()
                .any(|r| r["backends"][0] == format!("{}:5353", pod4.ip(Family::V4)))
        })
    };
    assert!(wait_for(Duration::from_secs(5), moved));
    std::thread::sleep(Duration::from_millis(200));
    let second = resolver.again();
    // Closed and disconnected: a send finds no destination (a receive would report
    // ECONNABORTED).
    let closed = second["error"] == "ConnectionAborted"
        || second["message"]
            .as_str()
            .is_some_and(|m| m.contains("Destination address required"));
    assert!(closed, "the socket to the old backend was not closed: {second}");
    let second = direct.again();
    assert_eq!(
        second["answer"], pod2.name,
        "a socket connected to pod-2 itself stays: {second}"
    );
    // The resolver's next socket reaches the backend that is there.
    let again = probe(worker1, &pod1.name, "udp", frontend);
    assert_eq!(again["answer"], pod4.name, "{again}");
    cluster.finish().unwrap();
}

/// Issue 21: what the load balancer remembers of a socket (the frontend it asked
/// for) was in one LRU map for every socket of the node, and never removed when a
/// socket closed. A pod that opened sockets by the hundred thousand pushed out
/// another pod's entry, whose resolver then saw answers from the backend's address
/// and dropped them. It is the socket's own now, and goes with it.
#[test]
fn a_pods_many_sockets_do_not_take_anothers_service_address() {
    let (cluster, state) = cluster_with_socket_lb("slbchurn");
    let (pod1, pod2, pod4) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    let worker1 = &cluster.nodes[0];
    let _backend = Backend::start(
        &pod2.name,
        SocketAddr::new(pod2.ip(Family::V4), 5353),
        Protocol::Udp,
        &pod2.name,
    )
    .unwrap();
    let dns = ServiceSpec {
        name: "dns".into(),
        cluster_ips: vec![cluster_ip(Family::V4, 61)],
        ports: vec![DNS],
        backends: vec![pod2.ip(Family::V4)],
    };
    cluster_state::write(&state, &[dns]).unwrap();
    wait_for_services(&cluster, 1);
    let frontend = SocketAddr::new(cluster_ip(Family::V4, 61), 53);
    let mut resolver = HeldUdp::start(worker1, &pod1.name, frontend);
    let first = resolver.exchanged();
    assert_eq!(first["answer"], pod2.name, "{first}");
    assert_eq!(first["from"], frontend.to_string(), "{first}");

    // Three times as many sockets as the old map held, each asking the Service.
    let churn = in_netns_and_cgroup(
        &pod4.name,
        &worker1.cgroup().unwrap(),
        worker1.bins.probe.to_str().unwrap(),
        &["udp-churn", &frontend.to_string(), "200000"],
    )
    .output()
    .unwrap();
    let churned: Value = serde_json::from_slice(&churn.stdout).unwrap();
    assert_eq!(churned["sockets"], 200000, "{churned}");

    let second = resolver.again();
    assert_eq!(second["answer"], pod2.name, "{second}");
    assert_eq!(
        second["from"],
        frontend.to_string(),
        "the resolver's answer came from the backend's address after another pod's sockets: {second}"
    );
    cluster.finish().unwrap();
}

/// `--socket-lb-cgroup` changed across a restart: the hooks move to the new cgroup
/// (they stayed on the old one, while the log named the new one), and the old
/// cgroup's processes are no longer translated.
#[test]
fn a_new_socket_lb_cgroup_moves_the_hooks_there() {
    let (cluster, state) = cluster_with_socket_lb("slbcg");
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let addr = SocketAddr::new(pod2.ip(Family::V4), HTTP.target_port);
    let _backend = Backend::start(&pod2.name, addr, HTTP.protocol, &pod2.name).unwrap();
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip(Family::V4, 21)],
        ports: vec![HTTP],
        backends: vec![pod2.ip(Family::V4)],
    };
    cluster_state::write(&state, &[web]).unwrap();
    wait_for_services(&cluster, 1);
    let worker1 = &cluster.nodes[0];
    let frontend = SocketAddr::new(cluster_ip(Family::V4, 21), HTTP.port);
    let answer_in = |cgroup: &std::path::Path| -> Option<String> {
        let probe = worker1.bins.probe.to_str().unwrap();
        let output = in_netns_and_cgroup(&pod1.name, cgroup, probe, &["tcp", &frontend.to_string()])
            .output()
            .ok()?;
        let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
        answer["answer"].as_str().map(str::to_string)
    };
    let old = worker1.cgroup().unwrap();
    assert_eq!(answer_in(&old).as_deref(), Some(pod2.name.as_str()));
    let new = old.with_file_name(format!("{}-moved", old.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&new).unwrap();
    worker1.stop_loader(Signal::SIGTERM).unwrap();
    let flags = [
        "--cluster-state",
        state.to_str().unwrap(),
        "--socket-lb",
        "--socket-lb-cgroup",
        new.to_str().unwrap(),
    ];
    worker1.start_loader_with(&flags).unwrap();
    let moved = answer_in(&new);
    let stayed = answer_in(&old);
    // Put the loader back on the node's cgroup before the new one goes.
    worker1.stop_loader(Signal::SIGTERM).unwrap();
    worker1
        .start_loader_with(&[&flags[..4], &[old.to_str().unwrap()]].concat())
        .unwrap();
    std::fs::remove_dir(&new).unwrap();
    assert_eq!(moved.as_deref(), Some(pod2.name.as_str()), "the new cgroup is served");
    assert_eq!(stayed, None, "the old cgroup is not any more");
    cluster.finish().unwrap();
}

/// Issue 25: a connection to a Service is in the flow records with the Service
/// and the backend: the translation (the client pod, the frontend it asked for,
/// the backend pod, their nodes) and the records of the connection's own packets,
/// TCP and UDP. A connection of the same pod straight to the backend is no
/// Service's.
#[test]
fn the_flow_records_name_the_service_and_backend_of_a_connection() {
    let cluster = ClusterGuard::up("slrec").unwrap();
    for node in &cluster.nodes {
        let cgroup = node.cgroup().unwrap();
        node.restart_loader_with(&["--socket-lb", "--socket-lb-cgroup", cgroup.to_str().unwrap()])
            .unwrap();
    }
    cluster.name_the_standard_pods().unwrap();
    // The client on worker-1, the backend on worker-2.
    let (client, backend) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let _servers = [HTTP, DNS].map(|port| {
        let serves = SocketAddr::new(backend.ip(Family::V4), port.target_port);
        Backend::start(&backend.name, serves, port.protocol, &backend.name).unwrap()
    });
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip(Family::V4, 70)],
        ports: vec![HTTP, DNS],
        backends: vec![backend.ip(Family::V4)],
    };
    cluster_state::write(&cluster.cluster_state.join("services.json"), &[web]).unwrap();
    wait_for_services(&cluster, 2);
    let worker1 = &cluster.nodes[0];
    // The records on worker-1 of connections from `local`'s address to `to`, once
    // they are what `complete` wants.
    let records_of = |local: &str, to: &str, complete: &dyn Fn(&[Value]) -> bool| {
        let mut records = Vec::new();
        let found = wait_for(Duration::from_secs(5), || {
            let all = worker1.flows(&["--since", "5m"]).unwrap().0;
            let client_ip = local.parse::<SocketAddr>().unwrap().ip();
            let from_client = |r: &Value| {
                let src = r["src"].as_str().and_then(|src| src.parse::<SocketAddr>().ok());
                src.is_some_and(|src| src.ip() == client_ip)
            };
            records = all.into_iter().filter(|r| r["dst"] == to && from_client(r)).collect();
            complete(&records)
        });
        assert!(found, "no such record of {local} -> {to}: {records:#?}");
        records
    };
    for (mode, port, first) in [("tcp", HTTP, "SYN"), ("udp", DNS, "started")] {
        let frontend = SocketAddr::new(cluster_ip(Family::V4, 70), port.port);
        let answer = probe(worker1, &client.name, mode, frontend);
        assert_eq!(answer["answer"], backend.name, "{answer}");
        let local = answer["local"].as_str().unwrap();
        let to_backend = SocketAddr::new(backend.ip(Family::V4), port.target_port).to_string();
        let opening = |r: &Value| r["src"] == local && r["reason"] == first;
        let records = records_of(local, &to_backend, &|records| {
            records.iter().any(|r| r["verdict"] == "translated") && records.iter().any(opening)
        });
        let translated = records.iter().find(|r| r["verdict"] == "translated").unwrap();
        assert_eq!(translated["src_pod"], "default/pod-1", "{translated}");
        assert_eq!(translated["dst_pod"], "default/pod-2", "{translated}");
        assert_eq!(translated["src_node"], worker1.name.as_str(), "{translated}");
        assert_eq!(translated["dst_node"], cluster.nodes[1].name.as_str(), "{translated}");
        assert_eq!(translated["service"], "default/web", "{translated}");
        assert_eq!(translated["frontend"], frontend.to_string(), "{translated}");
        let opened = records.iter().find(|r| opening(r)).unwrap();
        assert_eq!(opened["service"], "default/web", "{mode}: {opened}");
        assert_eq!(opened["frontend"], frontend.to_string(), "{mode}: {opened}");
        assert_eq!(opened["dst_pod"], "default/pod-2", "{mode}: {opened}");
    }
    let straight = SocketAddr::new(backend.ip(Family::V4), HTTP.target_port);
    let answer = probe(worker1, &client.name, "tcp", straight);
    let local = answer["local"].as_str().unwrap();
    let opening = |r: &Value| r["src"] == local && r["reason"] == "SYN";
    let records = records_of(local, &straight.to_string(), &|records| records.iter().any(opening));
    let opened = records.iter().find(|r| opening(r)).unwrap();
    assert!(
        opened["service"].is_null(),
        "a connection straight to the backend: {opened}"
    );
    cluster.finish().unwrap();
}
