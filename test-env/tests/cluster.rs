//! The two-node cluster: the full connectivity matrix, the cross-node fast path, the
//! peers file, and loader restarts under cross-node traffic. Needs root and
//! `cargo xtask build`; `cargo xtask test` does both.

use nix::sys::signal::Signal;
use std::time::{Duration, Instant};
use velox_test_env::{matrix, run, ClusterGuard};

#[test]
fn connectivity_matrix_passes_with_nat_only_to_the_outside() {
    let cluster = ClusterGuard::up("m").unwrap();
    let rows = matrix::run(&matrix::cases(&cluster, &cluster.pods().unwrap()).unwrap()).unwrap();
    let table = matrix::table(&rows);
    assert_eq!(rows.len(), 16, "{table}");
    assert!(rows.iter().all(|r| r.pass()), "{table}");
    let natted: Vec<_> = rows
        .iter()
        .filter(|r| r.nat() == Some(true))
        .map(|r| r.case.to.label.as_str())
        .collect();
    assert_eq!(natted, ["external", "external"], "{table}");
    cluster.finish().unwrap();
}

#[test]
fn cross_node_traffic_takes_the_ebpf_path_on_both_nodes() {
    let cluster = ClusterGuard::up("x").unwrap();
    let (pod1, pod2, pod4) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    // Without forwarding on either node, only from_pod (redirect_neigh) on the sender
    // and from_net (redirect_peer) on the receiver can carry pod traffic.
    for node in &cluster.nodes {
        node.disable_ip_forwarding().unwrap();
    }
    let redirected = |ip| {
        cluster.nodes[0].endpoint(ip).unwrap()["redirected_packets"]
            .as_u64()
            .unwrap()
    };
    let before = redirected(pod1.ip);
    assert!(pod1.ping(pod4.ip, 5), "same node");
    assert!(pod1.ping(pod2.ip, 5), "across nodes");
    assert!(pod1.iperf3_to(&pod2, 1).unwrap() > 0.0, "TCP across nodes");
    let after = redirected(pod1.ip);
    assert!(
        after >= before + 10,
        "pod-1's redirect counter went {before} -> {after}"
    );
    let replies = cluster.nodes[1].endpoint(pod2.ip).unwrap()["redirected_packets"]
        .as_u64()
        .unwrap();
    assert!(replies >= 5, "pod-2's replies were not redirected back: {replies}");
    // from_net on each uplink delivered the other side's packets straight to the pod.
    for node in &cluster.nodes {
        let stats = node.dump("stats").unwrap();
        let uplink = stats.iter().find(|s| s["ifname"] == "eth0").expect("uplink counters");
        assert!(
            uplink["redirected_packets"].as_u64().unwrap() >= 5,
            "from_net on {}: {uplink}",
            node.name
        );
    }
    // The peer map says where the other node's pods are.
    let peers = cluster.nodes[0].dump("peers").unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["pod_cidr"], "200.200.2.0/24");
    assert_eq!(peers[0]["node_ip"], "10.0.0.4");
    assert_eq!(peers[0]["ifname"], "eth0");
    cluster.finish().unwrap();
}

/// Polls `check` for up to five seconds (the loader re-reads the peers file every second).
fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn peers_file_changes_apply_without_a_restart() {
    let cluster = ClusterGuard::up("p").unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let worker1 = &cluster.nodes[0];
    let route_to_worker2 = || {
        run("ip", &["-n", &worker1.name, "route", "show", "200.200.2.0/24"])
            .unwrap()
            .contains("via 10.0.0.4")
    };
    assert!(route_to_worker2());
    assert!(pod1.ping(pod2.ip, 2));

    // worker-2 leaves the node list: worker-1 forgets its pods (the router knows no pod CIDRs).
    cluster.write_peers(&[worker1]).unwrap();
    eventually("worker-1 drops the route to worker-2's pods", || !route_to_worker2());
    let peers = run(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            worker1.bpffs_root.join("maps/VELOX_PEERS").to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(!peers.contains("200,200,2,0"), "peer map still has worker-2: {peers}");
    assert!(!pod1.ping(pod2.ip, 1), "pod-2 still reachable without a peer entry");

    cluster.write_peers(&cluster.nodes.iter().collect::<Vec<_>>()).unwrap();
    eventually("worker-1 routes to worker-2's pods again", route_to_worker2);
    assert!(pod1.ping(pod2.ip, 2));
    cluster.finish().unwrap();
}

#[test]
fn loader_restart_on_one_node_keeps_cross_node_traffic_flowing() {
    let cluster = ClusterGuard::up("r").unwrap();
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let received = pod1
        .ping_while(pod2.ip, 60, || {
            std::thread::sleep(Duration::from_millis(500));
            cluster.nodes[0].stop_loader(Signal::SIGKILL).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            cluster.nodes[0].start_loader().unwrap();
        })
        .unwrap();
    assert_eq!(received, 60, "pings lost across the restart");
    // The restarted loader took over the same maps and links: the new pod path works too.
    let pod5 = cluster.nodes[0].add_pod(&cluster.pod_name(0, "pod-5")).unwrap();
    assert!(pod5.ping(pod2.ip, 2));
    cluster.finish().unwrap();
}
