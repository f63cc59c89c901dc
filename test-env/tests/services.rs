//! Kubernetes Services through kube-proxy's iptables rules on the two-node cluster:
//! the fast path must hand every packet of a connection netfilter NATed to the kernel
//! (so the reply is translated back) and keep redirecting plain pod-to-pod traffic.
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use velox_test_env::backend::{request, Backend};
use velox_test_env::kube_proxy::{Protocol, ServiceRule};
use velox_test_env::{ClusterGuard, Family, Pod};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Serves from `backend` behind `rule`'s frontend and asserts every client reaches it
/// through the frontend.
fn assert_reached_through(rule: &ServiceRule, backend: &Pod, clients: &[&Pod]) {
    let _backend = Backend::start(&backend.name, rule.backend, rule.protocol, &backend.name).unwrap();
    for client in clients {
        let answer = request(&client.name, rule.frontend, rule.protocol, TIMEOUT);
        assert_eq!(
            answer.as_ref().ok(),
            Some(&backend.name),
            "{:?} {} -> {} (backend {}, snat {}): {answer:?}",
            rule.protocol,
            client.name,
            rule.frontend,
            backend.name,
            rule.snat
        );
    }
}

fn cluster_ip(family: Family, last: u8) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([10, 96, 0, last]),
        Family::V6 => IpAddr::from([0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(last)]),
    }
}

/// Clients in pods on both nodes and a host process reach ClusterIPs whose backends are
/// on the same node and on the other, over TCP and connected UDP, in both families.
#[test]
fn cluster_ips_work_beside_kube_proxy_rules_in_both_families() {
    let cluster = ClusterGuard::up("svc").unwrap();
    let (pod1, pod2, pod3, pod4) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-2"),
        cluster.pod("pod-3"),
        cluster.pod("pod-4"),
    );
    let host1 = Pod {
        name: cluster.nodes[0].name.clone(),
        ips: Vec::new(),
    };
    for family in Family::ALL {
        // (frontend, protocol, backend pod): one backend on each node.
        let services = [
            (SocketAddr::new(cluster_ip(family, 10), 80), Protocol::Tcp, &pod2),
            (SocketAddr::new(cluster_ip(family, 10), 53), Protocol::Udp, &pod2),
            (SocketAddr::new(cluster_ip(family, 11), 80), Protocol::Tcp, &pod4),
            (SocketAddr::new(cluster_ip(family, 11), 53), Protocol::Udp, &pod4),
        ];
        let clients = [&pod1, &pod3, &host1];
        for (frontend, protocol, backend) in services {
            let backend_addr = SocketAddr::new(backend.ip(family), 8053);
            let rule = ServiceRule {
                frontend,
                protocol,
                backend: backend_addr,
                snat: false,
            };
            for node in &cluster.nodes {
                rule.install(node).unwrap();
            }
            assert_reached_through(&rule, backend, &clients);
        }
    }
    // The clients' ends were recorded where their traffic went to the kernel; the
    // backends' TCP server ports were not, though they answered the host through it
    // (a UDP server's port is: a datagram cannot tell a reply from a new flow).
    let ends: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.dump("kernel-flows").unwrap())
        .map(|row| format!("{} {}", row["protocol"].as_str().unwrap(), row["end"].as_str().unwrap()))
        .collect();
    assert!(
        ends.len() >= 8,
        "only {} connection ends recorded: {ends:?}",
        ends.len()
    );
    for family in Family::ALL {
        for backend in [&pod2, &pod4] {
            let server = format!("tcp {}", SocketAddr::new(backend.ip(family), 8053));
            assert!(
                !ends.contains(&server),
                "a TCP server port left the fast path: {ends:?}"
            );
        }
    }
    // ...and plain pod-to-pod traffic still takes the fast path beside the rules.
    for family in Family::ALL {
        let redirected = || {
            cluster.nodes[0].endpoint(pod1.ip(family)).unwrap()["redirected_packets"]
                .as_u64()
                .unwrap()
        };
        let before = redirected();
        assert!(
            pod1.ping(pod2.ip(family), 3) && pod1.ping(pod4.ip(family), 3),
            "{family:?}"
        );
        assert!(redirected() >= before + 6, "{family:?}: pod-to-pod left the fast path");
    }
    cluster.finish().unwrap();
}

/// A NodePort on worker-1 from pods on both nodes: with `externalTrafficPolicy: Local`
/// (backend on worker-1, no SNAT, the client's address kept) and with the default
/// policy (backend on worker-2, masqueraded to worker-1's address).
#[test]
fn node_ports_work_from_pods_on_both_nodes() {
    let cluster = ClusterGuard::up("np").unwrap();
    let (pod1, pod2, pod3, pod4) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-2"),
        cluster.pod("pod-3"),
        cluster.pod("pod-4"),
    );
    for family in Family::ALL {
        let node_ip = cluster.nodes[0].node_ip(family);
        for (port, backend, snat) in [(30080, &pod1, false), (30081, &pod3, true)] {
            let backend_addr = SocketAddr::new(backend.ip(family), 8080);
            let frontend = SocketAddr::new(node_ip, port);
            let rule = ServiceRule {
                frontend,
                protocol: Protocol::Tcp,
                backend: backend_addr,
                snat,
            };
            rule.install(&cluster.nodes[0]).unwrap();
            assert_reached_through(&rule, backend, &[&pod2, &pod4]);
        }
    }
    cluster.finish().unwrap();
}
