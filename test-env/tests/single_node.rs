//! Velox on one node, end to end, on real network namespaces with the real binaries.
//! Needs root (CAP_NET_ADMIN, CAP_BPF) and `cargo xtask build` first; `cargo xtask
//! test` does both.

use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;
use velox_test_env::netns::datagram_sources;
use velox_test_env::{in_netns, netns_path, run, wait_for, Family, NodeGuard, Pod};

/// A fresh node with pods `a` and `b`.
fn node_with_two_pods(tag: &str) -> (NodeGuard, Pod, Pod) {
    let node = NodeGuard::up(tag).unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    (node, a, b)
}

fn redirected(node: &NodeGuard, ip: IpAddr) -> u64 {
    node.endpoint(ip).unwrap()["redirected_packets"].as_u64().unwrap()
}

/// The programs find a pod in the endpoint cache (an array read) before the
/// endpoint map (a hash lookup): what the cache holds must never outlive the map.
/// An address the endpoint map no longer holds is neither accepted from its pod's
/// veth, which still lives, nor delivered to; a cache entry the map does not back
/// (as a writer killed between its steps would leave) is emptied at the loader's
/// next pass; the loader's repair brings the pod's own entries back.
#[test]
fn the_endpoint_cache_never_says_more_than_the_endpoint_map() {
    let (node, a, b) = node_with_two_pods("cache");
    // One way at a time: the other end's answers would be dropped either way.
    let seen_from = |src: IpAddr, from: &Pod, to: &Pod| {
        let receiver = SocketAddr::new(to.ip(Family::of(&src)), 7777);
        datagram_sources(&from.name, vec![src], &to.name, receiver).unwrap()
    };
    let seen = |from: &Pod, to: &Pod, family| seen_from(from.ip(family), from, to);
    let bpffs = velox_node::layout::Bpffs::new(&node.bpffs_root);
    let mut maps = velox_node::maps::EndpointMaps::open(&bpffs).unwrap();
    let a_endpoint = maps.get(a.ip(Family::V4)).unwrap().unwrap();
    for family in Family::ALL {
        assert_eq!(seen(&a, &b, family), [a.ip(family)], "{family:?}");
        assert_eq!(seen(&b, &a, family), [b.ip(family)], "{family:?}");
        // The programs found both pods in the cache.
        assert_eq!(
            maps.cached_endpoint(a.ip(family)).unwrap(),
            Some(a_endpoint),
            "{family:?}"
        );
    }
    // No repair while we look.
    node.stop_loader(Signal::SIGTERM).unwrap();
    let none = Vec::<IpAddr>::new();
    for family in Family::ALL {
        maps.remove(a.ip(family)).unwrap();
        assert_eq!(
            seen(&a, &b, family),
            none,
            "{family:?}: sent from an address the map lost"
        );
        assert_eq!(
            seen(&b, &a, family),
            none,
            "{family:?}: delivered to an address the map lost"
        );
    }
    // A cache entry the map does not back, for an address a holds but was not given:
    // the programs trust it (the cache is what they read first) until the loader
    // empties it.
    let unbacked: IpAddr = "200.200.1.200".parse().unwrap();
    run("ip", &["-n", &a.name, "addr", "add", "200.200.1.200/32", "dev", "eth0"]).unwrap();
    maps.cache(unbacked, a_endpoint).unwrap();
    assert_eq!(
        seen_from(unbacked, &a, &b),
        [unbacked],
        "the programs do not read the cache"
    );
    node.start_loader().unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || maps
            .cached_endpoint(unbacked)
            .unwrap()
            .is_none()),
        "the loader left an unbacked cache entry"
    );
    assert_eq!(seen_from(unbacked, &a, &b), none, "sent from an address nobody gave a");
    run("ip", &["-n", &a.name, "addr", "del", "200.200.1.200/32", "dev", "eth0"]).unwrap();
    for family in Family::ALL {
        assert!(
            wait_for(Duration::from_secs(20), || seen(&a, &b, family) == [a.ip(family)]
                && seen(&b, &a, family) == [b.ip(family)]),
            "{family:?}: the loader did not repair a's entry"
        );
    }
    node.finish().unwrap();
}

#[test]
fn pods_on_one_node_talk_icmp_and_tcp() {
    let (node, a, b) = node_with_two_pods("talk");
    assert_eq!(a.ips.len(), 2, "dual-stack pods: {:?}", a.ips);
    let shell = |pod: &Pod, args: &[&str]| String::from_utf8(pod.exec("ip", args).unwrap().stdout).unwrap();
    for (family, host_prefix, gateway) in [(Family::V4, 32, "169.254.1.1"), (Family::V6, 128, "fe80::1")] {
        assert_ne!(a.ip(family), b.ip(family));
        assert!(a.ping(b.ip(family), 3), "{family:?} a -> b ping");
        assert!(b.ping(a.ip(family), 3), "{family:?} b -> a ping");
        let gbps = a.iperf3_to(&b, family, 1).unwrap();
        assert!(gbps > 0.0, "{family:?} TCP moved no data");
        // The pod side: /32 and /128, link-local gateways, static neighbours.
        let flag = format!("-{}", family.number());
        let addr = shell(&a, &[&flag, "-o", "addr", "show", "eth0", "scope", "global"]);
        assert!(addr.contains(&format!("{}/{host_prefix}", a.ip(family))), "{addr}");
        let route = shell(&a, &[&flag, "route", "show", "default"]);
        assert!(
            route.contains(&format!("via {gateway} dev eth0")) && route.contains("onlink"),
            "{route}"
        );
        let neigh = shell(&a, &["neigh", "show", gateway]);
        assert!(neigh.contains("PERMANENT"), "{neigh}");
    }
    // Nothing of Velox's is readable by anyone but root.
    use std::os::unix::fs::PermissionsExt;
    let state = node.state_dir.join("endpoints");
    let ipam = node.state_dir.join("ipam");
    let socket = node.state_dir.join("loader.sock");
    for dir in [
        &node.bpffs_root,
        &node.bpffs_root.join("maps"),
        &node.bpffs_root.join("links"),
        &node.bpffs_root.join("links/tc-ingress"),
        &state,
        &ipam,
    ] {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    }
    assert_eq!(std::fs::metadata(socket).unwrap().permissions().mode() & 0o777, 0o600);
    node.finish().unwrap();
}

#[test]
fn ebpf_carries_pod_traffic_without_host_forwarding() {
    let (node, a, b) = node_with_two_pods("ebpf");
    // Take the kernel path away: no forwarding, and the host routes to both pods
    // blackholed, in both families.
    node.disable_ip_forwarding().unwrap();
    for ip in a.ips.iter().chain(&b.ips) {
        run(
            "ip",
            &["-n", &node.name, "route", "replace", "blackhole", &ip.to_string()],
        )
        .unwrap();
    }
    for family in Family::ALL {
        let before = redirected(&node, a.ip(family));
        assert!(
            a.ping(b.ip(family), 5),
            "{family:?} pod-to-pod must not need the host stack"
        );
        assert!(a.iperf3_to(&b, family, 1).unwrap() > 0.0);
        let after = redirected(&node, a.ip(family));
        assert!(
            after >= before + 5,
            "{family:?}: redirect counter of a went {before} -> {after}"
        );
        // And the host really is cut off: host-to-pod uses the (blackholed) kernel route.
        let host_ping = node
            .exec("ping", &["-c", "1", "-W", "1", &b.ip(family).to_string()])
            .unwrap();
        assert!(
            !host_ping.status.success(),
            "{family:?}: host reached a pod despite the blackhole route"
        );
    }
    node.finish().unwrap();
}

#[test]
fn check_passes_then_fails_when_the_ip_is_removed() {
    let node = NodeGuard::up("check").unwrap();
    let pod_name = node.pod_name("a");
    let pod = node.add_pod("a").unwrap();
    let netns = pod.netns_path();
    let prev_result = |version: &str, ips: &[IpAddr]| {
        let ips: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"address": ipnet::IpNet::from(*ip)}))
            .collect();
        json!({"cniVersion": version, "ips": ips})
    };
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = node.conf(version);
        conf["prevResult"] = prev_result(version, &pod.ips);
        let outcome = node.cni("CHECK", &pod_name, Some(&netns), "eth0", &conf).unwrap();
        assert!(outcome.success, "CHECK {version}: {}", outcome.stdout);
    }
    // A prevResult that lacks the IPv6 address does not match what ADD did.
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = prev_result("1.1.0", &[pod.ip(Family::V4)]);
    let outcome = node.cni("CHECK", &pod_name, Some(&netns), "eth0", &conf).unwrap();
    assert!(!outcome.success, "CHECK without the IPv6 address passed");
    // Losing the IPv6 address in the pod is noticed.
    let v6 = ipnet::IpNet::from(pod.ip(Family::V6)).to_string();
    run("ip", &["-n", &pod_name, "addr", "del", &v6, "dev", "eth0"]).unwrap();
    conf["prevResult"] = prev_result("1.1.0", &pod.ips);
    let outcome = node.cni("CHECK", &pod_name, Some(&netns), "eth0", &conf).unwrap();
    assert!(!outcome.success);
    assert!(
        outcome.stdout["msg"]
            .as_str()
            .unwrap()
            .contains(&format!("lost its address {v6}")),
        "{}",
        outcome.stdout
    );
    // CHECK does not exist before 0.4.0.
    let outcome = node
        .cni("CHECK", &pod_name, Some(&netns), "eth0", &node.conf("0.3.1"))
        .unwrap();
    assert_eq!(outcome.code(), Some(1));
    node.finish().unwrap();
}

#[test]
fn del_is_idempotent_and_works_without_the_netns() {
    let node = NodeGuard::up("del").unwrap();
    let a_name = node.pod_name("a");
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let conf = node.conf("1.1.0");
    for _ in 0..2 {
        let outcome = node.cni("DEL", &a_name, Some(&a.netns_path()), "eth0", &conf).unwrap();
        assert!(outcome.success, "DEL: {}", outcome.stdout);
    }
    for ip in &a.ips {
        assert!(node.endpoints().unwrap().iter().all(|e| e["ip"] != ip.to_string()));
    }
    // The runtime lost the netns before calling DEL: the address must still be freed.
    let b_name = node.pod_name("b");
    run("ip", &["netns", "del", &b_name]).unwrap();
    let outcome = node.cni("DEL", &b_name, None, "eth0", &conf).unwrap();
    assert!(outcome.success, "DEL without netns: {}", outcome.stdout);
    assert_eq!(node.reserved_addresses(), 0, "addresses still reserved");
    assert!(node.pods().unwrap().is_empty(), "records left");
    assert!(node.endpoints().unwrap().is_empty(), "map entries left");
    assert!(
        std::fs::read_dir(node.bpffs_root.join("links/tc-ingress"))
            .unwrap()
            .next()
            .is_none(),
        "link pins left"
    );
    let _ = b;
    node.finish().unwrap();
}

/// After a failed ADD: no address, veth, route, neighbour, link pin, record or map
/// entry, in either family, and no `ifname` in the pod.
fn assert_nothing_of(node: &NodeGuard, pod_name: &str, ifname: &str) {
    assert_eq!(node.reserved_addresses(), 0, "address still reserved");
    let links = run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"]).unwrap();
    assert!(links.trim().is_empty(), "veth left: {links}");
    for (family, pod_prefix) in [("-4", "200.200.1."), ("-6", "fd00:200:1:")] {
        for what in ["route", "neigh"] {
            let left = run("ip", &[family, "-n", &node.name, what, "show"]).unwrap();
            assert!(!left.contains(pod_prefix), "{what} left: {left}");
        }
    }
    assert!(
        std::fs::read_dir(node.bpffs_root.join("links/tc-ingress"))
            .unwrap()
            .next()
            .is_none(),
        "link pin left"
    );
    assert!(node.pods().unwrap().is_empty(), "record left");
    assert!(node.endpoints().unwrap().is_empty(), "map entry left");
    assert_eq!(node.counted_pods().unwrap(), (0, 0), "counters slot left");
    let pod_links = run("ip", &["-n", pod_name, "-o", "link", "show"]).unwrap();
    let left = pod_links.lines().any(|line| {
        line.split(": ")
            .nth(1)
            .is_some_and(|name| name.split('@').next() == Some(ifname))
    });
    assert!(!left, "pod side {ifname:?} left: {pod_links}");
}

#[test]
fn a_bad_prev_result_fails_before_anything_is_created() {
    let node = NodeGuard::up("prevbad").unwrap();
    let pod = node.pod_name("a");
    run("ip", &["netns", "add", &pod]).unwrap();
    let mut conf = node.conf("1.1.0");
    conf["prevResult"] = json!({"ips": [{"address": "192.0.2.5"}]});
    let outcome = node.cni("ADD", &pod, Some(&netns_path(&pod)), "eth0", &conf).unwrap();
    let (code, msg) = error_of(&outcome);
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("prevResult"), "{msg}");
    assert_nothing_of(&node, &pod, "eth0");
    node.finish().unwrap();
}

#[test]
fn gc_without_the_valid_attachments_list_removes_nothing() {
    let node = NodeGuard::up("gcnolist").unwrap();
    let pod = node.add_pod("a").unwrap();
    let (code, msg) = error_of(&node.cni("GC", "", None, "", &node.conf("1.1.0")).unwrap());
    assert_eq!(code, 7, "{msg}");
    assert_eq!(node.pods().unwrap().len(), 1);
    assert_eq!(node.reserved_addresses(), 2);
    for family in Family::ALL {
        assert!(node.endpoint(pod.ip(family)).is_ok(), "{family:?}");
    }
    node.finish().unwrap();
}

/// Config changes a runtime or a user could make, good and bad, for the property test.
fn config_change() -> impl Strategy<Value = (&'static str, Value)> {
    prop::sample::select(vec![
        ("mtu", json!(1400)),
        ("mtu", json!(9000)),
        ("mtu", json!(20)),
        ("mtu", json!("big")),
        ("name", json!("-bad")),
        ("name", json!("")),
        (
            "dns",
            json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}),
        ),
        ("dns", json!({"nameservers": "10.96.0.10"})),
        (
            "prevResult",
            json!({"cniVersion": "1.1.0", "ips": [{"address": "192.0.2.5/24"}]}),
        ),
        ("prevResult", json!({"ips": [{"address": "not-an-ip"}]})),
        ("args", json!({"K8S_POD_NAME": "x"})),
        ("args", json!(7)),
        ("runtimeConfig", json!({"portMappings": []})),
        ("runtimeConfig", json!("x")),
        ("stateDir", json!("relative/state")),
        ("bpffsRoot", json!("/sys/fs/bpf/../x")),
        ("logFile", json!("log")),
        ("logLevel", json!("shouting")),
        ("subnets", json!(["10.99.0.0/31"])),
        ("subnets", json!("banana")),
        ("cniVersion", json!("0.2.0")),
        ("cniVersion", json!("0.4.0")),
        ("ipam", json!({"type": "../../bin/sh"})),
    ])
}

/// Random configs and environments against the real binary on a real node: every
/// rejection is one CNI error JSON and leaves nothing; every accepted ADD is undone
/// completely by DEL.
#[test]
fn any_add_is_refused_cleanly_or_fully_undone_by_del() {
    let node = NodeGuard::up("fuzz").unwrap();
    let pod = node.pod_name("fz");
    run("ip", &["netns", "add", &pod]).unwrap();
    let netns = netns_path(&pod);
    let inputs = (
        prop::collection::vec(config_change(), 0..3),
        prop_oneof![Just("fuzz-1".to_string()), "[ -~]{0,12}"],
        prop_oneof![Just("eth0".to_string()), "[ -~]{0,17}"],
    );
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let outcome = TestRunner::new(config).run(&inputs, |(changes, container_id, ifname)| {
        let mut conf = node.conf("1.1.0");
        for (key, value) in changes {
            conf[key] = value;
        }
        let added = node.cni("ADD", &container_id, Some(&netns), &ifname, &conf).unwrap();
        if added.success {
            let deleted = node.cni("DEL", &container_id, Some(&netns), &ifname, &conf).unwrap();
            prop_assert!(deleted.success, "DEL after ADD: {}", deleted.stdout);
            accepted.set(accepted.get() + 1);
        } else {
            refused.set(refused.get() + 1);
            let code = added.stdout["code"].as_u64();
            let msg = added.stdout["msg"].as_str().unwrap_or_default();
            prop_assert!(code.is_some() && !msg.is_empty(), "not a CNI error: {}", added.stdout);
        }
        assert_nothing_of(&node, &pod, &ifname);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted > 0 && refused > 0,
        "the cases must cover both: {accepted} accepted, {refused} refused"
    );
    node.finish().unwrap();
}

#[test]
fn add_failing_halfway_leaves_nothing() {
    let node = NodeGuard::up("fail").unwrap();
    let conf = node.conf("1.1.0");

    // Fails in the pod: a default route is already there (after IPAM, veth, address).
    let early = node.pod_name("early");
    run("ip", &["netns", "add", &early]).unwrap();
    run(
        "ip",
        &[
            "-n", &early, "link", "add", "side0", "type", "veth", "peer", "name", "side1",
        ],
    )
    .unwrap();
    run("ip", &["-n", &early, "link", "set", "side0", "up"]).unwrap();
    run("ip", &["-n", &early, "route", "add", "default", "dev", "side0"]).unwrap();
    let outcome = node
        .cni("ADD", &early, Some(&netns_path(&early)), "eth0", &conf)
        .unwrap();
    assert!(!outcome.success, "ADD should fail: {}", outcome.stdout);
    assert!(
        outcome.stdout["msg"].as_str().unwrap().contains("default route"),
        "{}",
        outcome.stdout
    );
    assert_nothing_of(&node, &early, "eth0");

    // Fails at the very end: the record cannot be written (after routes and the TC link).
    let late = node.pod_name("late");
    run("ip", &["netns", "add", &late]).unwrap();
    let host_ifname = velox_node::endpoint::host_ifname(&velox_node::endpoint::Attachment {
        container_id: late.clone(),
        ifname: "eth0".into(),
    });
    let blocker = node.state_dir.join("endpoints").join(format!("{host_ifname}.json"));
    std::fs::create_dir_all(blocker.join("occupied")).unwrap();
    let outcome = node.cni("ADD", &late, Some(&netns_path(&late)), "eth0", &conf).unwrap();
    assert!(!outcome.success, "ADD should fail: {}", outcome.stdout);
    std::fs::remove_dir_all(&blocker).unwrap();
    assert_nothing_of(&node, &late, "eth0");

    // And the node still works afterwards.
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    for family in Family::ALL {
        assert!(a.ping(b.ip(family), 2), "{family:?}");
    }
    node.finish().unwrap();
}

#[test]
fn loader_sigkill_and_restart_do_not_interrupt_traffic() {
    let (node, a, b) = node_with_two_pods("restart");
    node.disable_ip_forwarding().unwrap();
    // 60 pings over 3 s while the loader is killed, absent, and started again.
    let received = a
        .ping_while(b.ip(Family::V4), 60, || {
            std::thread::sleep(Duration::from_millis(500));
            node.stop_loader(Signal::SIGKILL).unwrap();
            std::thread::sleep(Duration::from_millis(800));
            assert!(!node.status().success, "STATUS must report the dead loader");
            assert_eq!(node.status().code(), Some(50));
            node.start_loader().unwrap();
        })
        .unwrap();
    assert_eq!(received, 60, "pings were lost");

    // A map entry deleted by hand comes back after a restart.
    node.stop_loader(Signal::SIGKILL).unwrap();
    let bpffs = velox_node::Bpffs::new(&node.bpffs_root);
    let mut maps = velox_node::maps::EndpointMaps::open(&bpffs).unwrap();
    let b6 = b.ip(Family::V6);
    let ifindex = node.endpoint(b6).unwrap()["ifindex"].as_u64().unwrap() as u32;
    maps.remove(b6).unwrap();
    assert!(node.endpoint(b6).is_err());
    let row = node
        .endpoints()
        .unwrap()
        .into_iter()
        .find(|e| e["ip"] == b6.to_string())
        .unwrap();
    assert_eq!(
        row["state"], "no map entry",
        "the dump shows what the loader will repair"
    );
    node.start_loader().unwrap();
    assert_eq!(node.endpoint(b6).unwrap()["ifindex"], ifindex);
    assert!(a.ping(b6, 3));
    node.finish().unwrap();
}

#[test]
fn every_cni_version_gets_its_result_format() {
    let node = NodeGuard::up("versions").unwrap();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let pod = node.pod_name(&format!("v{i}"));
        run("ip", &["netns", "add", &pod]).unwrap();
        let netns = netns_path(&pod);
        let outcome = node
            .cni("ADD", &pod, Some(&netns), "eth0", &node.conf(version))
            .unwrap();
        assert!(outcome.success, "ADD {version}: {}", outcome.stdout);
        let result = &outcome.stdout;
        assert_eq!(result["cniVersion"], *version);
        // Both families in every version, each with its gateway and default route.
        for (i, (family, gateway, default)) in [("4", "169.254.1.1", "0.0.0.0/0"), ("6", "fe80::1", "::/0")]
            .into_iter()
            .enumerate()
        {
            let ip = &result["ips"][i];
            assert_eq!(ip["gateway"], gateway, "{result}");
            assert_eq!(ip["interface"], 1);
            assert_eq!(result["routes"][i]["dst"], default, "{result}");
            let address: ipnet::IpNet = ip["address"].as_str().unwrap().parse().unwrap();
            assert_eq!(address.prefix_len(), if family == "4" { 32 } else { 128 });
            match *version {
                "1.0.0" | "1.1.0" => assert!(ip.get("version").is_none(), "{result}"),
                _ => assert_eq!(ip["version"], family, "{result}"),
            }
        }
        assert_eq!(result["interfaces"][1]["name"], "eth0");
        assert_eq!(result["interfaces"][1]["sandbox"], netns.to_str().unwrap());
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            *version == "1.1.0",
            "{result}"
        );
        let del = node
            .cni("DEL", &pod, Some(&netns), "eth0", &node.conf(version))
            .unwrap();
        assert!(del.success, "DEL {version}: {}", del.stdout);
        assert_nothing_of(&node, &pod, "eth0");
    }
    node.finish().unwrap();
}

#[test]
fn prev_result_is_chained() {
    let node = NodeGuard::up("chain").unwrap();
    let pod = node.pod_name("a");
    run("ip", &["netns", "add", &pod]).unwrap();
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "sidecar0"}],
        "ips": [{"address": "192.0.2.5/24", "interface": 0}],
    });
    let outcome = node.cni("ADD", &pod, Some(&netns_path(&pod)), "eth0", &conf).unwrap();
    assert!(outcome.success, "{}", outcome.stdout);
    let result = &outcome.stdout;
    assert_eq!(result["interfaces"][0]["name"], "sidecar0");
    assert_eq!(result["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(result["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(
        result["ips"][1]["interface"], 2,
        "our IP points at our eth0 after the earlier interface"
    );
    node.finish().unwrap();
}

fn error_of(outcome: &velox_test_env::CniOutcome) -> (u64, String) {
    assert!(!outcome.success, "expected an error, got {}", outcome.stdout);
    (
        outcome.stdout["code"].as_u64().unwrap(),
        outcome.stdout["msg"].as_str().unwrap().to_string(),
    )
}

#[test]
fn errors_are_cni_json_with_the_spec_codes() {
    let node = NodeGuard::up("errors").unwrap();
    let pod = node.pod_name("a");
    run("ip", &["netns", "add", &pod]).unwrap();
    let netns = netns_path(&pod);
    let add = |conf: &Value| node.cni("ADD", &pod, Some(&netns), "eth0", conf).unwrap();

    let (code, _) = error_of(&add(&json!("not an object")));
    assert_eq!(code, 7);
    let mut conf = node.conf("0.2.0");
    assert_eq!(error_of(&add(&conf)).0, 1);
    conf = node.conf("1.1.0");
    conf["mtu"] = json!(10);
    assert_eq!(error_of(&add(&conf)).0, 7);
    // Missing environment.
    let outcome = node.cni("ADD", &pod, None, "eth0", &node.conf("1.1.0")).unwrap();
    assert_eq!(error_of(&outcome).0, 4);
    // GC and STATUS need 1.1.0.
    assert_eq!(
        error_of(&node.cni("GC", "", None, "", &node.conf("1.0.0")).unwrap()).0,
        1
    );

    // Loader not ready: ADD says "try again later", STATUS "not available", and nothing is left.
    node.stop_loader(Signal::SIGKILL).unwrap();
    std::fs::remove_dir_all(&node.bpffs_root).unwrap();
    let (code, msg) = error_of(&add(&node.conf("1.1.0")));
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("velox-loader"), "{msg}");
    assert_eq!(node.status().code(), Some(50));
    assert!(node.pods().unwrap().is_empty());
    node.finish().unwrap();
}

#[test]
fn bad_json_is_code_6_from_the_binary() {
    let bins = velox_test_env::Binaries::locate().unwrap();
    let mut child = std::process::Command::new(&bins.velox)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"{\"cniVersion\": ").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["code"], 4, "env is checked first: {error}");

    let output = std::process::Command::new(&bins.velox)
        .env_clear()
        .env("CNI_COMMAND", "GC")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"{\"cniVersion\": ")?;
            child.wait_with_output()
        })
        .unwrap();
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["code"], 6, "{error}");

    let output = std::process::Command::new(&bins.velox)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success());
    let version: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        version["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn delegated_ipam_host_local() {
    let node = NodeGuard::up("hostlocal").unwrap();
    let data_dir = node.state_dir.join("host-local");
    let mut conf = node.conf("1.0.0");
    conf.as_object_mut().unwrap().remove("subnets");
    let ranges = json!([[{"subnet": "200.200.7.0/24"}], [{"subnet": "fd00:200:7::/64"}]]);
    conf["ipam"] = json!({"type": "host-local", "dataDir": data_dir, "ranges": ranges});
    let mut pods = Vec::new();
    for name in ["a", "b"] {
        let pod = node.pod_name(name);
        run("ip", &["netns", "add", &pod]).unwrap();
        let outcome = node.cni("ADD", &pod, Some(&netns_path(&pod)), "eth0", &conf).unwrap();
        assert!(outcome.success, "{}", outcome.stdout);
        // host-local answers with its ranges' prefixes; Velox configures /32 and /128.
        let pod = Pod::from_result(&pod, &outcome.stdout).unwrap();
        assert!("200.200.7.0/24"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&pod.ip(Family::V4)));
        assert!("fd00:200:7::/64"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&pod.ip(Family::V6)));
        let prefixes: Vec<&str> = outcome.stdout["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip["address"].as_str().unwrap().rsplit('/').next().unwrap())
            .collect();
        assert_eq!(prefixes, ["32", "128"], "{}", outcome.stdout);
        pods.push(pod);
    }
    for family in Family::ALL {
        assert!(pods[0].ping(pods[1].ip(family), 2), "{family:?}");
    }
    for pod in &pods {
        let outcome = node
            .cni("DEL", &pod.name, Some(&pod.netns_path()), "eth0", &conf)
            .unwrap();
        assert!(outcome.success, "{}", outcome.stdout);
    }
    let network_dir = data_dir.join(conf["name"].as_str().unwrap());
    let held: Vec<_> = std::fs::read_dir(&network_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<IpAddr>().is_ok())
        .collect();
    assert!(held.is_empty(), "host-local still holds {held:?}");
    node.finish().unwrap();
}

#[test]
fn concurrent_adds_and_dels_are_safe() {
    let node = NodeGuard::up("conc").unwrap();
    let names: Vec<String> = (0..8).map(|i| node.pod_name(&format!("c{i}"))).collect();
    let pods: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = names.iter().map(|n| s.spawn(|| node.0.add_pod(n))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    let ips: std::collections::HashSet<_> = pods.iter().flat_map(|p| p.ips.clone()).collect();
    assert_eq!(ips.len(), 16, "two pods share an address");
    assert_eq!(node.endpoints().unwrap().len(), 16, "a map entry per address");
    for family in Family::ALL {
        assert!(pods[0].ping(pods[7].ip(family), 1), "{family:?}");
    }
    std::thread::scope(|s| {
        for pod in &pods {
            s.spawn(|| node.0.delete_pod(&pod.name).unwrap());
        }
    });
    assert!(node.endpoints().unwrap().is_empty());
    assert!(node.pods().unwrap().is_empty());
    assert_eq!(node.reserved_addresses(), 0);
    node.finish().unwrap();
}

#[test]
fn gc_frees_what_the_runtime_no_longer_knows() {
    let node = NodeGuard::up("gc").unwrap();
    let keep = node.add_pod("keep").unwrap();
    let lost = node.add_pod("lost").unwrap();
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": keep.name, "ifname": "eth0"}]);
    let outcome = node.cni("GC", "", None, "", &conf).unwrap();
    assert!(outcome.success, "{}", outcome.stdout);
    let left: Vec<_> = node.pods().unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(left, vec![keep.name.clone()]);
    for family in Family::ALL {
        assert!(node.endpoint(lost.ip(family)).is_err(), "lost pod still in the map");
        assert!(node.endpoint(keep.ip(family)).is_ok());
    }
    assert_eq!(node.reserved_addresses(), 2, "only keep's two addresses stay reserved");
    let veths = run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"]).unwrap();
    assert_eq!(veths.lines().count(), 1, "{veths}");
    node.finish().unwrap();
}

/// Size of the pinned `from_pod` as the kernel runs it (after the verifier's cuts).
fn from_pod_size(node: &NodeGuard) -> u64 {
    let pin = node.bpffs_root.join("programs/from_pod");
    let info: Value =
        serde_json::from_str(&run("bpftool", &["-j", "prog", "show", "pinned", pin.to_str().unwrap()]).unwrap())
            .unwrap();
    info["bytes_xlated"].as_u64().unwrap()
}

#[test]
fn datapath_logging_is_compiled_out_unless_enabled_at_load() {
    let (node, a, b) = node_with_two_pods("log");
    assert!(a.ping(b.ip(Family::V4), 2));
    let quiet_size = from_pod_size(&node);
    let log_path = node.state_dir.join("loader.log");
    assert!(
        !std::fs::read_to_string(&log_path).unwrap().contains("from_pod:"),
        "logged with logging off"
    );

    // Turned on at load time, new pods get the logging program.
    node.restart_loader_with(&["--datapath-log-level", "debug"]).unwrap();
    assert!(
        from_pod_size(&node) > quiet_size,
        "the log code should only be there when enabled"
    );
    let c = node.add_pod("c").unwrap();
    let d = node.add_pod("d").unwrap();
    // Addresses of both families print through one key type.
    assert!(c.ping(d.ip(Family::V6), 2));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let expected = format!("from_pod: to {} on ifindex", d.ip(Family::V6));
    while !std::fs::read_to_string(&log_path).unwrap().contains(&expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "no datapath log line {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node.finish().unwrap();
}

#[test]
fn metrics_show_each_pods_counters_the_maps_and_the_reconcile_passes() {
    let node = NodeGuard::up("metrics").unwrap();
    let address = "127.0.0.1:9962";
    node.restart_loader_with(&["--metrics-address", address]).unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    assert!(a.ping(b.ip(Family::V4), 3));
    std::thread::sleep(Duration::from_millis(1500)); // a reconcile pass
    let metrics = node.metrics(address).unwrap();
    let value = |sample: &str| {
        metrics
            .iter()
            .find(|(name, _)| name == sample)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {sample} in {metrics:?}"))
    };
    let host_ifname = velox_node::endpoint::host_ifname(&velox_node::endpoint::Attachment {
        container_id: a.name.clone(),
        ifname: "eth0".into(),
    });
    // An unnamed pod (no K8S_POD_NAME at ADD): empty namespace and pod labels.
    let interface = format!("interface=\"{host_ifname}\",namespace=\"\",pod=\"\"");
    let redirected = format!("velox_interface_packets_total{{{interface},verdict=\"redirected\"}}");
    assert!(value(&redirected) >= 3.0, "a's echo requests went straight to b");
    let spoofed = format!("velox_drops_total{{{interface},reason=\"spoofed\"}}");
    assert_eq!(value(&spoofed), 0.0);
    assert_eq!(
        value("velox_map_entries{map=\"endpoints\"}"),
        4.0,
        "two pods, two families"
    );
    assert_eq!(value("velox_map_entries{map=\"interfaces\"}"), 2.0);
    assert_eq!(value("velox_max_pods"), f64::from(velox_common::DEFAULT_MAX_PODS));
    // The shares of the allowed-connections map are set (unset, they admit none).
    assert!(value("velox_policy_flow_pool_size") > 100_000.0);
    assert_eq!(value("velox_policy_flow_pool_entries"), 0.0);
    assert!(value("velox_reconcile_duration_seconds_count") >= 1.0);
    node.finish().unwrap();
}

/// A metrics address another process holds stops neither the start nor the loader:
/// health says why there are no metrics, and they come once the address is free.
#[test]
fn a_metrics_address_in_use_is_an_error_in_health_until_it_frees() {
    let node = NodeGuard::up("metricsbind").unwrap();
    node.stop_loader(Signal::SIGTERM).unwrap();
    let address = "127.0.0.1:9963";
    let mut holder = in_netns(&node.name, "busybox", &["nc", "-l", "-p", "9963"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = node.start_loader_with(&["--metrics-address", address]);
    let health = node.health();
    let _ = holder.kill();
    let _ = holder.wait();
    started.unwrap();
    let health = health.unwrap();
    assert!(
        health["metrics_error"]
            .as_str()
            .is_some_and(|why| why.contains(address)),
        "{health}"
    );
    assert!(node.status().success, "the loader serves pods all the same");
    assert!(
        wait_for(Duration::from_secs(15), || node.metrics(address).is_ok()),
        "metrics once the address is free"
    );
    assert!(node.health().unwrap()["metrics_error"].is_null());
    node.finish().unwrap();
}

/// Connections that never send a request are closed within seconds (beyond a few
/// at once, at once), so clients cannot pile them up against the loader, and
/// scrapes are answered again once they are gone.
#[test]
fn idle_metrics_connections_are_closed_and_scrapes_still_answer() {
    let node = NodeGuard::up("metricsidle").unwrap();
    let address = "127.0.0.1:9964";
    node.restart_loader_with(&["--metrics-address", address]).unwrap();
    let mut idle = silent_clients(&node, "9964", 20);
    let closed = wait_for(Duration::from_secs(15), || {
        idle.iter_mut()
            .all(|nc| nc.try_wait().is_ok_and(|exited| exited.is_some()))
    });
    for mut nc in idle {
        let _ = nc.kill();
        let _ = nc.wait();
    }
    assert!(closed, "the loader keeps idle connections open");
    assert!(node.metrics(address).is_ok());
    node.finish().unwrap();
}

/// `count` clients of the node's localhost `port`, each holding its connection open
/// and silent (stdin stays open).
fn silent_clients(node: &NodeGuard, port: &str, count: usize) -> Vec<std::process::Child> {
    (0..count)
        .map(|_| {
            in_netns(&node.name, "busybox", &["nc", "127.0.0.1", port])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Running out of file descriptors (EMFILE) does not end `/metrics`: with the
/// loader's limit lowered below what it holds open, connections cannot be accepted,
/// the loader says so and goes on, and once it has descriptors again, scrapes
/// answer.
#[test]
fn metrics_answer_again_after_the_loader_ran_out_of_file_descriptors() {
    let node = NodeGuard::up("metricsfd").unwrap();
    let address = "127.0.0.1:9965";
    node.restart_loader_with(&["--metrics-address", address]).unwrap();
    assert!(node.metrics(address).is_ok());
    let pid = node.loader_pid().unwrap().as_raw();
    // Sets the soft limit, returns the limits before.
    let set_limit = |limit: Option<u64>| {
        let mut old = nix::libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain structs; the kernel writes `old` only.
        let read = unsafe { nix::libc::prlimit(pid, nix::libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(read, 0, "prlimit: {}", std::io::Error::last_os_error());
        if let Some(limit) = limit {
            let new = nix::libc::rlimit {
                rlim_cur: limit,
                rlim_max: old.rlim_max,
            };
            // SAFETY: as above; the kernel reads `new` only.
            let set = unsafe { nix::libc::prlimit(pid, nix::libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
            assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
        }
        old.rlim_cur
    };
    let before = set_limit(None);
    // Descriptors are numbered from the lowest free one: a limit of 3 (stdin,
    // stdout, stderr) leaves none, whatever the loader holds above it.
    set_limit(Some(3));
    let clients = silent_clients(&node, "9965", 5);
    let log = node.state_dir.join("loader.log");
    let said = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|log| log.contains("metrics: accepting a connection"))
    });
    for mut client in clients {
        let _ = client.kill();
        let _ = client.wait();
    }
    set_limit(Some(before));
    assert!(said, "the loader did not run out of descriptors, or did not say so");
    assert!(
        wait_for(Duration::from_secs(10), || node.metrics(address).is_ok()),
        "/metrics does not answer once the loader has descriptors again"
    );
    assert!(node.health().is_ok(), "and the loader is alive");
    node.finish().unwrap();
}

/// Issue 25: a drop is there to be asked about afterwards, with no monitor running
/// when it happened (the monitor alone showed drops, and only while it listened).
#[test]
fn a_drop_is_in_the_flow_records_afterwards() {
    let node = NodeGuard::up("flows").unwrap();
    let export = node.state_dir.join("flows.jsonl");
    node.restart_loader_with(&["--flow-records-file", export.to_str().unwrap()])
        .unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    run("ip", &["-n", &a.name, "addr", "add", "198.51.100.8/32", "dev", "eth0"]).unwrap();
    let to = b.ip(Family::V4).to_string();
    let _ = a.exec("ping", &["-c", "3", "-i", "0.2", "-W", "1", "-I", "198.51.100.8", &to]);
    let spoofed = |record: &Value| record["src"].as_str().is_some_and(|s| s.starts_with("198.51.100.8:"));
    let mut found = None;
    let recorded = wait_for(Duration::from_secs(5), || {
        let (records, _) = node.flows(&["--verdict", "dropped", "--since", "5m"]).unwrap();
        found = records.into_iter().find(spoofed);
        found.is_some()
    });
    assert!(recorded, "no record of the spoofed ping");
    let drop = found.unwrap();
    assert_eq!(drop["verdict"], "dropped", "{drop}");
    assert_eq!(drop["reason"], "spoofed", "{drop}");
    assert_eq!(drop["protocol"], "ICMP", "{drop}");
    assert_eq!(
        drop["dst"].as_str().unwrap().split(':').next(),
        Some(to.as_str()),
        "{drop}"
    );
    assert_eq!(drop["pod"], format!("{} eth0", a.name), "{drop}");
    assert!(drop["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{drop}");
    // The same record in the file a log shipper tails.
    let exported: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(exported.contains(&drop), "{drop} is not in {exported:?}");
    // Filters: no allowed record is a drop, and the summary counts the pings.
    let (allowed, _) = node.flows(&["--verdict", "allowed"]).unwrap();
    assert!(!allowed.iter().any(spoofed), "{allowed:?}");
    let (summary, _) = node.loader_cli(&["flows", "--summary"]).unwrap();
    assert!(
        summary
            .lines()
            .any(|l| l.contains("198.51.100.8") && l.contains("dropped spoofed")),
        "{summary}"
    );
    node.finish().unwrap();
}

/// Issue 25: drops the kernel makes outside Velox's programs are in the flow
/// records with the kernel's own reason from `kfree_skb`, and the pod's container:
/// a destination the node has no route to, then a netfilter rule that drops it,
/// then strict reverse-path filtering.
#[test]
fn kernel_drops_are_in_the_flow_records_with_the_kernels_reason() {
    let node = NodeGuard::up("kdrop").unwrap();
    let a = node.add_pod("a").unwrap();
    let in_node = |args: &[&str]| run("ip", &[&["netns", "exec", node.name.as_str()], args].concat()).unwrap();
    in_node(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let unroutable = "192.0.2.1";
    let recorded_drop = |reason: &str| {
        let _ = a.exec("ping", &["-c", "3", "-i", "0.2", "-W", "1", unroutable]);
        let mut found = None;
        wait_for(Duration::from_secs(5), || {
            let (records, _) = node.flows(&["--verdict", "dropped", "--since", "5m"]).unwrap();
            found = records
                .into_iter()
                .find(|r| r["reason"] == reason && r["dst"].as_str().is_some_and(|d| d.starts_with(unroutable)));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no record of the pings the kernel dropped for {reason}"))
    };
    let drop = recorded_drop("kernel:IP_INNOROUTES");
    assert_eq!(drop["protocol"], "ICMP", "{drop}");
    assert!(
        drop["src"].as_str().unwrap().starts_with(&a.ip(Family::V4).to_string()),
        "{drop}"
    );
    assert_eq!(drop["pod"], format!("{} eth0", a.name), "{drop}");
    // A route, and a firewall rule that drops what takes it.
    in_node(&[
        "ip",
        "link",
        "add",
        "blackhole0",
        "type",
        "veth",
        "peer",
        "name",
        "blackhole1",
    ]);
    in_node(&["ip", "link", "set", "blackhole0", "up"]);
    in_node(&["ip", "route", "add", "192.0.2.0/24", "dev", "blackhole0"]);
    in_node(&["iptables", "-w", "-I", "FORWARD", "-d", "192.0.2.0/24", "-j", "DROP"]);
    recorded_drop("kernel:NETFILTER_DROP");
    // Strict reverse-path filtering, and the way back to the pod through another
    // interface: the pod's packets fail the check before any rule sees them.
    in_node(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"]);
    let to_pod = format!("{}/32", a.ip(Family::V4));
    in_node(&["ip", "route", "replace", &to_pod, "dev", "blackhole0"]);
    recorded_drop("kernel:IP_RPFILTER");
    node.finish().unwrap();
}

/// Issue 25: a flood of drops from one address cannot hide another pod's drop: an
/// address writes at most `EVENTS_PER_SOURCE` drop events a second, and the
/// rest are counted and said.
#[test]
fn a_flood_of_drops_from_one_address_hides_no_other_drop() {
    let node = NodeGuard::up("flood").unwrap();
    let (a, b, c) = (
        node.add_pod("a").unwrap(),
        node.add_pod("b").unwrap(),
        node.add_pod("c").unwrap(),
    );
    run("ip", &["-n", &a.name, "addr", "add", "198.51.100.9/32", "dev", "eth0"]).unwrap();
    run("ip", &["-n", &c.name, "addr", "add", "198.51.100.10/32", "dev", "eth0"]).unwrap();
    let to = SocketAddr::new(b.ip(Family::V4), 9);
    const SECONDS: u64 = 3;
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let output = in_netns(
                &a.name,
                node.bins.probe.to_str().unwrap(),
                &["udp-flood", &to.to_string(), "198.51.100.9", &SECONDS.to_string()],
            )
            .output()
            .unwrap();
            serde_json::from_slice::<Value>(&output.stdout).unwrap()
        });
        std::thread::sleep(Duration::from_secs(1));
        let _ = c.exec(
            "ping",
            &[
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "198.51.100.10",
                &to.ip().to_string(),
            ],
        );
        flood.join().unwrap()
    });
    let sent = flood["sent"].as_u64().unwrap_or(0);
    assert!(sent > 10_000, "not a flood: {flood}");
    std::thread::sleep(Duration::from_millis(300));
    let (records, said) = node.flows(&["--verdict", "dropped", "--since", "5m"]).unwrap();
    let from = |source: &str| {
        records
            .iter()
            .filter(|r| r["src"].as_str().is_some_and(|s| s.starts_with(source)))
            .count()
    };
    // At most the limit per second the flood ran in (it may span one more).
    let flooded = from("198.51.100.9:");
    assert!(
        flooded <= 100 * (SECONDS as usize + 1),
        "{flooded} records of {sent} flooded drops"
    );
    assert!(flooded >= 100, "{flooded} records of {sent} flooded drops");
    assert_eq!(from("198.51.100.10:"), 3, "the other pod's drops: {said}");
    assert!(
        !said.contains(" 0 events over their source's limit"),
        "the flood's unrecorded drops are not said: {said}"
    );
    node.finish().unwrap();
}

/// Followers that left a quiet node (no record to write, so no failed write to
/// notice them by) give their place back: the loader serves 16 clients at once.
#[test]
fn followers_that_left_hold_no_place() {
    let node = NodeGuard::up("followers").unwrap();
    let monitors: Vec<_> = (0..20).map(|_| node.monitor().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(monitors);
    let answered = wait_for(Duration::from_secs(5), || node.flows(&[]).is_ok());
    assert!(answered, "velox-loader flows: {:?}", node.flows(&[]).err());
    node.finish().unwrap();
}

#[test]
fn the_monitor_shows_each_drop_with_its_ends_and_pod_while_it_listens() {
    let node = NodeGuard::up("monitor").unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    let monitor = node.monitor().unwrap();
    // a sends from an address that is not its own.
    run("ip", &["-n", &a.name, "addr", "add", "198.51.100.7/32", "dev", "eth0"]).unwrap();
    let to = b.ip(Family::V4).to_string();
    let provoke = || {
        let _ = a.exec("ping", &["-c", "1", "-W", "1", "-I", "198.51.100.7", &to]);
    };
    let drop = monitor
        .wait_for(Duration::from_secs(10), provoke, |r| r["verdict"] == "dropped")
        .unwrap();
    assert_eq!(drop["verdict"], "dropped", "{drop}");
    assert_eq!(drop["reason"], "spoofed", "{drop}");
    assert_eq!(drop["protocol"], "ICMP", "{drop}");
    assert_eq!(
        drop["src"].as_str().unwrap().split(':').next(),
        Some("198.51.100.7"),
        "{drop}"
    );
    assert_eq!(
        drop["dst"].as_str().unwrap().split(':').next(),
        Some(to.as_str()),
        "{drop}"
    );
    assert_eq!(drop["pod"], format!("{} eth0", a.name), "{drop}");
    node.finish().unwrap();
}
