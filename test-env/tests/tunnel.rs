//! The VXLAN underlay: two nodes on subnets of their own behind a router that knows
//! no pod CIDR, so each is the other's tunnelled peer. Needs root and
//! `cargo xtask build`; `cargo xtask test` does both.

use std::net::IpAddr;
use std::time::Duration;
use velox_common::{DROP_REASONS, DROP_TUNNEL_SOURCE};
use velox_test_env::{matrix, run, Binaries, ClusterGuard, Family, Topology};

/// A counter of the uplink's slot on `node` (what `from_net` and `from_tunnel` count).
fn uplink_counter(cluster: &ClusterGuard, node: usize, counter: impl Fn(&serde_json::Value) -> u64) -> u64 {
    let stats = cluster.nodes[node].dump("stats").unwrap();
    counter(stats.iter().find(|s| s["ifname"] == "eth0").expect("uplink counters"))
}

fn tunnel_source_drops(cluster: &ClusterGuard, node: usize) -> u64 {
    let reason = DROP_REASONS[DROP_TUNNEL_SOURCE as usize].name;
    uplink_counter(cluster, node, |row| row["dropped"][reason].as_u64().unwrap())
}

#[test]
fn the_matrix_passes_through_the_tunnel_with_nat_only_to_the_outside() {
    let cluster = ClusterGuard::up_routed("t").unwrap();
    for node in &cluster.nodes {
        let peers = node.dump("peers").unwrap();
        assert_eq!(peers.len(), 2, "{peers:?}");
        for peer in &peers {
            assert_eq!(peer["route"], "vxlan", "{peer}");
            assert_eq!(peer["reason"], "not on the uplink's subnet", "{peer}");
            assert_eq!(peer["ifname"], "velox-vxlan", "{peer}");
            // An IPv4 underlay carries both families, 50 bytes less than the uplink.
            assert!(peer["node_ip"].as_str().unwrap().starts_with("10.0."), "{peer}");
            assert_eq!(peer["mtu"], 1450, "{peer}");
        }
    }
    matrix::assert_all_pass_with_nat_only_to_the_outside(&cluster).unwrap();
    cluster.finish().unwrap();
}

#[test]
fn pods_reach_each_other_through_the_tunnel_on_the_ebpf_path_alone() {
    let cluster = ClusterGuard::up_routed("f").unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    // Without forwarding on either node only from_pod (into the VXLAN device) and
    // from_tunnel (straight into the pod) carry pod traffic.
    for node in &cluster.nodes {
        node.disable_ip_forwarding().unwrap();
    }
    let redirected = |node| uplink_counter(&cluster, node, |row| row["redirected_packets"].as_u64().unwrap());
    for family in Family::ALL {
        let before = [redirected(0), redirected(1)];
        assert!(pod1.ping(pod2.ip(family), 5), "{family:?}");
        let throughput = pod1.iperf3(&pod2, family, 1, 1).unwrap();
        assert!(throughput.gbps > 0.1, "{family:?}: {} Gb/s", throughput.gbps);
        for (node, before) in before.into_iter().enumerate() {
            let after = redirected(node);
            assert!(
                after >= before + 5,
                "{family:?}: from_tunnel on node {node}: {before} -> {after}"
            );
        }
    }
    for node in 0..2 {
        assert_eq!(
            tunnel_source_drops(&cluster, node),
            0,
            "node {node} refused a peer's packet"
        );
    }
    cluster.finish().unwrap();
}

#[test]
fn a_vxlan_packet_from_outside_the_cluster_is_dropped_and_counted() {
    let cluster = ClusterGuard::up_routed("i").unwrap();
    assert_injected_vxlan_is_dropped(&cluster, Family::V4);
    cluster.finish().unwrap();
}

/// The external host speaks VXLAN to node 1 over `underlay` with the cluster's port
/// and VNI, and claims an address of node 2's pod CIDR: its pings to pod-1 in both
/// families must not arrive, and node 1 counts them as `tunnel_source` drops.
fn assert_injected_vxlan_is_dropped(cluster: &ClusterGuard, underlay: Family) {
    let pod1 = cluster.pod("pod-1");
    let external = cluster.external.as_str();
    let ip = |args: &[&str]| run("ip", &[&["-n", external], args].concat()).unwrap();
    let (node1, local) = (
        cluster.node_ip(0, underlay).to_string(),
        velox_test_env::cluster::external_ip(underlay).to_string(),
    );
    ip(&[
        "link", "add", "vx0", "type", "vxlan", "id", "1", "remote", &node1, "dstport", "8472", "local", &local,
    ]);
    ip(&["link", "set", "vx0", "arp", "off", "up"]);
    for (claimed, pods) in [
        ("200.200.2.99/32", "200.200.1.0/24"),
        ("fd00:200:2::99/128", "fd00:200:1::/64"),
    ] {
        ip(&["addr", "add", claimed, "dev", "vx0", "nodad"]);
        let source = claimed.split('/').next().unwrap();
        ip(&["route", "add", pods, "dev", "vx0", "src", source]);
    }
    for family in Family::ALL {
        let before = tunnel_source_drops(cluster, 0);
        let to = pod1.ip(family).to_string();
        let pinged = run("ip", &["netns", "exec", external, "ping", "-c", "3", "-W", "1", &to]);
        assert!(
            pinged.is_err(),
            "{family:?} over a {underlay:?} underlay: a host outside the cluster reached a pod through the tunnel: {pinged:?}"
        );
        let dropped = tunnel_source_drops(cluster, 0) - before;
        assert!(
            dropped >= 3,
            "{family:?} over a {underlay:?} underlay: from_tunnel counted {dropped} drops of the injected packets"
        );
    }
    ip(&["link", "del", "vx0"]);
}

/// Nodes that report only their IPv6 InternalIPs: the tunnel's outer header is
/// IPv6 (70 bytes less MTU), it carries pods of both families with their real
/// sources, and VXLAN over IPv6 from outside the cluster is dropped and counted.
#[test]
fn an_ipv6_underlay_carries_both_families_and_refuses_outsiders() {
    let cluster = ClusterGuard::up_routed("6").unwrap();
    let v6_only: Vec<velox_test_env::Node> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut node = node.clone();
            node.underlay.as_mut().unwrap().node_ips.retain(IpAddr::is_ipv6);
            node
        })
        .collect();
    cluster.write_peers(&v6_only.iter().collect::<Vec<_>>()).unwrap();
    let outer_v6 = |node: usize| {
        let peers = cluster.nodes[node].dump("peers").unwrap();
        peers.len() == 2
            && peers.iter().all(|p| {
                p["route"] == "vxlan" && p["mtu"] == 1430 && p["node_ip"].as_str().is_some_and(|ip| ip.contains(':'))
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(outer_v6(0) && outer_v6(1)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the peers did not move to an IPv6 outer header: {:?}",
            cluster.nodes[0].dump("peers")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    // Proof that the tunnel's packets leave node 1 over IPv6, and none over IPv4.
    let capture = |filter: &str| {
        velox_test_env::in_netns(
            &cluster.nodes[0].name,
            "timeout",
            &["3", "tcpdump", "-i", "eth0", "-c", "1", "-n"],
        )
        .args(filter.split(' '))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
    };
    let (over_v6, over_v4) = (
        capture("ip6 and udp dst port 8472"),
        capture("ip and udp dst port 8472"),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(pod1.ping(pod2.ip(Family::V4), 3), "IPv4 pods over an IPv6 underlay");
    assert!(
        over_v6.wait_with_output().unwrap().status.success(),
        "no VXLAN over IPv6 left node 1"
    );
    assert!(
        !over_v4.wait_with_output().unwrap().status.success(),
        "VXLAN over IPv4 left node 1"
    );
    for family in Family::ALL {
        assert!(pod1.ping(pod2.ip(family), 3), "{family:?} over an IPv6 underlay");
        let throughput = pod1.iperf3(&pod2, family, 1, 1).unwrap();
        assert!(throughput.gbps > 0.1, "{family:?}: {} Gb/s", throughput.gbps);
    }
    for node in 0..2 {
        assert_eq!(
            tunnel_source_drops(&cluster, node),
            0,
            "node {node} refused a peer's packet"
        );
    }
    assert_injected_vxlan_is_dropped(&cluster, Family::V6);
    cluster.finish().unwrap();
}

/// The route of each pod CIDR in `node`'s peer map.
fn routes(cluster: &ClusterGuard, node: usize) -> Vec<(String, String)> {
    let peers = cluster.nodes[node].dump("peers").unwrap();
    peers
        .iter()
        .map(|p| {
            (
                p["pod_cidr"].as_str().unwrap().to_string(),
                p["route"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_mixed_cluster_reaches_its_on_link_peer_natively_and_the_other_through_the_tunnel() {
    let cluster = ClusterGuard::up_as("x", Topology::Mixed).unwrap();
    let pod5 = cluster.nodes[2].add_pod(&cluster.pod_name(2, "pod-5")).unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let expected = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(cidr, route)| (cidr.to_string(), route.to_string()))
            .collect()
    };
    assert_eq!(
        routes(&cluster, 0),
        expected(&[
            ("200.200.2.0/24", "native"),
            ("200.200.3.0/24", "vxlan"),
            ("fd00:200:2::/64", "native"),
            ("fd00:200:3::/64", "vxlan"),
        ])
    );
    assert_eq!(
        routes(&cluster, 2),
        expected(&[
            ("200.200.1.0/24", "vxlan"),
            ("200.200.2.0/24", "vxlan"),
            ("fd00:200:1::/64", "vxlan"),
            ("fd00:200:2::/64", "vxlan"),
        ])
    );
    for family in Family::ALL {
        for (from, to) in [(&pod1, &pod2), (&pod1, &pod5), (&pod2, &pod5), (&pod5, &pod1)] {
            assert!(from.ping(to.ip(family), 2), "{family:?}: {} -> {}", from.name, to.name);
        }
        let throughput = pod1.iperf3(&pod5, family, 1, 1).unwrap();
        assert!(throughput.gbps > 0.1, "{family:?}: {} Gb/s", throughput.gbps);
    }
    cluster.finish().unwrap();
}

#[test]
fn peers_moving_into_the_tunnel_and_back_keep_a_connection_under_traffic() {
    let cluster = ClusterGuard::up("s").unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    assert!(routes(&cluster, 0).iter().all(|(_, route)| route == "native"));
    let switch_all = |flags: &[&str], route: &str| {
        for node in &cluster.nodes {
            node.restart_loader_with(flags).unwrap();
        }
        cluster.wait_for_peer_routes(Some(route)).unwrap();
    };
    std::thread::scope(|scope| {
        let transfer = scope.spawn(|| pod1.iperf3(&pod2, Family::V4, 8, 1));
        std::thread::sleep(Duration::from_secs(2));
        switch_all(&["--tunnel", "always"], "vxlan");
        std::thread::sleep(Duration::from_secs(2));
        switch_all(&[], "native");
        let transfer = transfer.join().unwrap().unwrap();
        assert!(
            transfer.slowest_second_gbps > 0.0,
            "the connection stalled for a second: {} Gb/s overall",
            transfer.gbps
        );
    });
    cluster.finish().unwrap();
}

/// An upgrade from the last native-only release under traffic: both nodes move to
/// this build (their peers stay native: they share a link), then into the tunnel,
/// and the stream never stops for a second. A pod the new build adds reaches one
/// the old build added, in both families.
#[test]
fn an_upgrade_from_the_native_only_release_then_into_the_tunnel_keeps_a_stream() {
    let mut cluster = ClusterGuard::up_with("u", Topology::OneLink, Binaries::previous_release().unwrap()).unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let peers = cluster.nodes[0].dump("peers").unwrap();
    assert!(
        peers.iter().all(|p| p.get("route").is_none()),
        "not a native-only build: {peers:?}"
    );
    let current = Binaries::locate().unwrap();
    // Four restarts of 2.5 to 3 s each here (the verifier walks the flow table's
    // paths in every program), more on a busy machine: the stream outlasts them.
    const SECONDS: u64 = 30;
    std::thread::scope(|scope| {
        let started = std::time::Instant::now();
        let transfer = scope.spawn(|| pod1.iperf3(&pod2, Family::V4, SECONDS as u32, 1));
        std::thread::sleep(Duration::from_secs(2));
        cluster.use_binaries(&current);
        for node in &cluster.nodes {
            node.restart_loader_with(&[]).unwrap();
        }
        cluster.wait_for_peer_routes(Some("native")).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        for node in &cluster.nodes {
            node.restart_loader_with(&["--tunnel", "always"]).unwrap();
        }
        cluster.wait_for_peer_routes(Some("vxlan")).unwrap();
        let switched = started.elapsed();
        let transfer = transfer.join().unwrap().unwrap();
        assert!(
            switched < Duration::from_secs(SECONDS - 1),
            "the restarts took {switched:?}, longer than the stream"
        );
        assert!(
            transfer.slowest_second_gbps > 0.0,
            "the connection stalled for a second: {} Gb/s overall",
            transfer.gbps
        );
    });
    let added = cluster.nodes[1].add_pod(&cluster.pod_name(1, "after-upgrade")).unwrap();
    for family in Family::ALL {
        assert!(
            added.ping(pod1.ip(family), 3),
            "{family:?}: new pod to the old build's pod"
        );
    }
    cluster.finish().unwrap();
}

#[test]
fn a_host_on_the_link_cannot_relay_a_pods_address_into_the_tunnel() {
    let cluster = ClusterGuard::up_routed("r").unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    // The router, on worker-1's link, claims pod-1's address and sends to pod-2 by
    // way of worker-1: forwarded into the tunnel, worker-2 would take it for pod-1's.
    let router = cluster.router.as_str();
    let spoofed = pod1.ip(Family::V4).to_string();
    let node1 = cluster.node_ip(0, Family::V4).to_string();
    run(
        "ip",
        &["-n", router, "addr", "add", &format!("{spoofed}/32"), "dev", "lo"],
    )
    .unwrap();
    run("ip", &["-n", router, "route", "add", "200.200.2.0/24", "via", &node1]).unwrap();
    let spoofed_drops = || uplink_counter(&cluster, 0, |row| row["dropped"]["spoofed"].as_u64().unwrap());
    let before = spoofed_drops();
    let target = pod2.ip(Family::V4).to_string();
    let _ = run(
        "ip",
        &[
            "netns", "exec", router, "ping", "-c", "3", "-W", "1", "-I", &spoofed, &target,
        ],
    );
    let dropped = spoofed_drops() - before;
    assert!(
        dropped >= 3,
        "worker-1 let {} of 3 packets claiming its pod in from the link",
        3 - dropped.min(3)
    );
    // Nor to a pod of worker-1 itself on the tunnel's UDP port, which from_net
    // leaves to the kernel's VXLAN socket only when it is addressed to the node.
    let before = spoofed_drops();
    let pod4 = cluster.pod("pod-4").ip(Family::V4).to_string();
    run("ip", &["-n", router, "route", "add", &pod4, "via", &node1]).unwrap();
    let send = format!(
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{spoofed}', 0)); \
         [s.sendto(b'x', ('{pod4}', 8472)) for _ in range(3)]"
    );
    run("ip", &["netns", "exec", router, "python3", "-c", &send]).unwrap();
    let dropped = spoofed_drops() - before;
    assert!(
        dropped >= 3,
        "worker-1 let UDP to its pod's port 8472 claiming its pod in: {dropped} dropped"
    );
    cluster.finish().unwrap();
}

/// NetworkPolicy judges tunnelled packets by the real pod source: the grid's pods
/// alternate between the two routed nodes, so every cross-node probe crosses the
/// tunnel, and an ipBlock of one remote pod's addresses admits that pod alone.
#[test]
fn network_policy_holds_across_the_tunnel_by_the_real_pod_source() {
    use serde_json::json;
    use velox_test_env::kube_proxy::Protocol;
    use velox_test_env::netpol::{policy, Grid, Reachability};
    const PORTS: &[(Protocol, u16)] = &[(Protocol::Tcp, 80), (Protocol::Udp, 80)];

    let cluster = ClusterGuard::up_routed("p").unwrap();
    let grid = Grid::up(&cluster).unwrap();
    let (x_a, y_a) = (grid.pod("x/a"), grid.pod("y/a"));
    assert_ne!(
        x_a.node, y_a.node,
        "the ipBlock case needs its two pods on different nodes"
    );
    let all = |allowed| Reachability::all(&grid.ids(), allowed);
    let expect = |case: &str, policies: &[serde_json::Value], expected: &Reachability| {
        grid.write_policies(policies).unwrap();
        grid.expect(case, PORTS, expected).unwrap();
    };

    expect("no policy", &[], &all(true));

    let mut r = all(true);
    for to in ["x/a", "x/b", "x/c"] {
        r.expect_all_ingress(to, false);
    }
    expect(
        "default deny ingress in x",
        &[policy(
            "x",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        )],
        &r,
    );

    // y/a's own addresses, as ipBlocks: the receiving node must see y/a's address,
    // not its node's or the tunnel's.
    let blocks: Vec<_> = Family::ALL
        .iter()
        .map(|f| {
            let bits = if *f == Family::V4 { 32 } else { 128 };
            json!({"ipBlock": {"cidr": format!("{}/{bits}", y_a.pod.ip(*f))}})
        })
        .collect();
    let mut r = all(true);
    r.expect_all_ingress("x/a", false).expect("y/a", "x/a", true);
    expect(
        "ingress into x/a only from y/a's addresses",
        &[policy(
            "x",
            "from-y-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": blocks}]}),
        )],
        &r,
    );

    let mut r = all(true);
    r.expect_all_egress("x/a", false);
    for to in ["y/a", "y/b", "y/c"] {
        r.expect("x/a", to, true);
    }
    expect(
        "egress of x/a only to namespace y",
        &[policy(
            "x",
            "to-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        &r,
    );
    drop(grid);
    cluster.finish().unwrap();
}
