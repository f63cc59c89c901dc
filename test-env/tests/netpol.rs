//! NetworkPolicy conformance: the cases of the upstream Kubernetes e2e suite
//! (test/e2e/network/netpol/network_policy.go) that need no API server, on the grid
//! of nine pods over both nodes, every pair probed in both families. Each case is
//! named after its upstream `ginkgo.It`. SCTP cases probe TCP only: this kernel has
//! no SCTP.
#![cfg(feature = "privileged")]

use serde_json::{json, Value};
use velox_test_env::kube_proxy::Protocol;
use velox_test_env::netpol::{policy, Grid, Reachability};
use velox_test_env::{ClusterGuard, Family};

const TCP80: (Protocol, u16) = (Protocol::Tcp, 80);
const TCP81: (Protocol, u16) = (Protocol::Tcp, 81);
const UDP80: (Protocol, u16) = (Protocol::Udp, 80);
const UDP81: (Protocol, u16) = (Protocol::Udp, 81);

const X: [&str; 3] = ["x/a", "x/b", "x/c"];

fn pod_a() -> Value {
    json!({"matchLabels": {"pod": "a"}})
}

fn all(grid: &Grid, allowed: bool) -> Reachability {
    Reachability::all(&grid.ids(), allowed)
}

/// Everyone may reach everyone but `x/a`, which only `from` reach.
fn only_into_a(grid: &Grid, from: &[&str]) -> Reachability {
    let mut r = all(grid, true);
    r.expect_all_ingress("x/a", false);
    for f in from {
        r.expect(f, "x/a", true);
    }
    r
}

/// Writes `policies`, then checks every pair on `ports` against `expected`.
fn case(grid: &Grid, name: &str, policies: &[Value], ports: &[(Protocol, u16)], expected: &Reachability) {
    grid.write_policies(policies).unwrap();
    grid.expect(name, ports, expected).unwrap();
}

#[test]
fn conformance_pod_and_namespace_selectors() {
    let cluster = ClusterGuard::up("np1").unwrap();
    let grid = Grid::up(&cluster).unwrap();

    case(
        &grid,
        "no policy: everyone reaches everyone",
        &[],
        &[TCP80, TCP81, UDP80],
        &all(&grid, true),
    );

    let mut r = all(&grid, true);
    X.iter().for_each(|p| {
        r.expect_all_ingress(p, false);
    });
    let deny = policy(
        "x",
        "deny-ingress",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    case(
        &grid,
        "should support a 'default-deny-ingress' policy",
        &[deny],
        &[TCP80, UDP80],
        &r,
    );

    let mut r = all(&grid, true);
    X.iter().for_each(|p| {
        r.expect_all_ingress(p, false);
        r.expect_all_egress(p, false);
    });
    let deny_all = policy(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    case(
        &grid,
        "should support a 'default-deny-all' policy",
        &[deny_all],
        &[TCP80, UDP80],
        &r,
    );

    let p = policy(
        "x",
        "allow-b",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    case(
        &grid,
        "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["x/b"]),
    );

    let p = policy(
        "x",
        "allow-all-namespaces",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    case(
        &grid,
        "should enforce policy to allow ingress traffic from pods in all namespaces",
        &[p],
        &[TCP80],
        &all(&grid, true),
    );

    let p = policy(
        "x",
        "allow-y",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    );
    case(
        &grid,
        "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    let p = policy(
        "x",
        "expressions",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchExpressions": [
            {"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
    );
    case(
        &grid,
        "should enforce policy based on PodSelector with MatchExpressions",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["x/b"]),
    );

    let p = policy(
        "x",
        "ns-expressions",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "ns", "operator": "In", "values": ["y"]}]}}]}]}),
    );
    case(
        &grid,
        "should enforce policy based on NamespaceSelector with MatchExpressions",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    let p = policy(
        "x",
        "pod-or-namespace",
        json!({"podSelector": pod_a(), "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
            {"podSelector": {"matchLabels": {"pod": "b"}}},
        ]}]}),
    );
    case(
        &grid,
        "should enforce policy based on PodSelector or NamespaceSelector",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["x/b", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"]),
    );

    let p = policy(
        "x",
        "pod-and-namespace",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
            "podSelector": {"matchLabels": {"pod": "b"}},
        }]}]}),
    );
    case(
        &grid,
        "should enforce policy based on PodSelector and NamespaceSelector",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["y/b", "z/b"]),
    );

    let p = policy(
        "x",
        "multiple",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]},
        }]}]}),
    );
    case(
        &grid,
        "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["y/b", "y/c", "z/b", "z/c"]),
    );

    let p = policy(
        "x",
        "default-label",
        json!({"podSelector": pod_a(), "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]}),
    );
    case(
        &grid,
        "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        &[p],
        &[TCP80],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    let mut r = all(&grid, true);
    for to in X {
        r.expect_all_ingress(to, false);
        for from in X {
            r.expect(from, to, true);
        }
    }
    let p = policy(
        "x",
        "same-namespace",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    case(
        &grid,
        "should deny ingress from pods on other namespaces",
        &[p],
        &[TCP80],
        &r,
    );

    let allow_all = policy("x", "allow-all", json!({"podSelector": {}, "ingress": [{}]}));
    case(
        &grid,
        "should support allow-all policy",
        &[allow_all],
        &[TCP80, TCP81],
        &all(&grid, true),
    );

    case(
        &grid,
        "should stop enforcing policies after they are deleted",
        &[],
        &[TCP80],
        &all(&grid, true),
    );
}

#[test]
fn conformance_ports_protocols_and_egress() {
    let cluster = ClusterGuard::up("np2").unwrap();
    let grid = Grid::up(&cluster).unwrap();
    let from_y = || json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]);

    let p81 = policy(
        "x",
        "port-81",
        json!({"podSelector": pod_a(), "ingress": [{"from": from_y(), "ports": [{"port": 81, "protocol": "TCP"}]}]}),
    );
    grid.write_policies(std::slice::from_ref(&p81)).unwrap();
    let ports_case = "should enforce policy based on Ports";
    grid.expect(ports_case, &[TCP80], &only_into_a(&grid, &[])).unwrap();
    grid.expect(ports_case, &[TCP81], &only_into_a(&grid, &["y/a", "y/b", "y/c"]))
        .unwrap();

    let p80 = policy(
        "x",
        "port-80",
        json!({"podSelector": pod_a(), "ingress": [{"from": from_y(), "ports": [{"port": 80, "protocol": "TCP"}]}]}),
    );
    case(
        &grid,
        "should enforce multiple, stacked policies with overlapping podSelectors",
        &[p81.clone(), p80],
        &[TCP80, TCP81],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    let updated = policy(
        "x",
        "port-81",
        json!({"podSelector": pod_a(), "ingress": [{"from": from_y(), "ports": [{"port": 80, "protocol": "TCP"}]}]}),
    );
    grid.write_policies(&[updated]).unwrap();
    let updated_case = "should enforce updated policy";
    grid.expect(updated_case, &[TCP80], &only_into_a(&grid, &["y/a", "y/b", "y/c"]))
        .unwrap();
    grid.expect(updated_case, &[TCP81], &only_into_a(&grid, &[])).unwrap();

    let range = policy(
        "x",
        "range",
        json!({"podSelector": pod_a(), "ingress": [{"from": from_y(), "ports": [{"port": 80, "endPort": 81}]}]}),
    );
    case(
        &grid,
        "should enforce policy based on Ports with endPort",
        &[range],
        &[TCP80, TCP81],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    let named = policy(
        "x",
        "named",
        json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
    );
    grid.write_policies(&[named]).unwrap();
    let named_case = "should allow ingress access on one named port";
    grid.expect(named_case, &[TCP81], &all(&grid, true)).unwrap();
    grid.expect(named_case, &[TCP80], &only_into_a(&grid, &[])).unwrap();

    let named_from_y = policy(
        "x",
        "named-y",
        json!({"podSelector": pod_a(), "ingress": [{"from": from_y(), "ports": [{"port": "serve-80-tcp"}]}]}),
    );
    grid.write_policies(&[named_from_y]).unwrap();
    let case_name = "should allow ingress access from namespace on one named port";
    grid.expect(case_name, &[TCP80], &only_into_a(&grid, &["y/a", "y/b", "y/c"]))
        .unwrap();
    grid.expect(case_name, &[TCP81], &only_into_a(&grid, &[])).unwrap();

    let named_out = policy(
        "x",
        "named-out",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
    );
    grid.write_policies(&[named_out]).unwrap();
    let mut out_81 = all(&grid, true);
    out_81.expect_all_egress("x/a", false);
    let case_name = "should allow egress access on one named port";
    grid.expect(case_name, &[TCP80], &all(&grid, true)).unwrap();
    grid.expect(case_name, &[TCP81], &out_81).unwrap();

    let tcp_only = policy(
        "x",
        "tcp",
        json!({"podSelector": pod_a(), "ingress": [{"ports": [{"protocol": "TCP"}]}]}),
    );
    grid.write_policies(&[tcp_only]).unwrap();
    let case_name = "should enforce ingress policy allowing any port traffic to a server on a specific protocol";
    grid.expect(case_name, &[TCP80, TCP81], &all(&grid, true)).unwrap();
    grid.expect(case_name, &[UDP80, UDP81], &only_into_a(&grid, &[]))
        .unwrap();

    let udp_only = policy(
        "x",
        "udp",
        json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]}),
    );
    grid.write_policies(&[udp_only]).unwrap();
    let case_name = "should not allow access by TCP when a policy specifies only UDP";
    grid.expect(case_name, &[UDP80], &all(&grid, true)).unwrap();
    grid.expect(case_name, &[TCP80], &only_into_a(&grid, &[])).unwrap();

    let sctp = policy(
        "x",
        "sctp",
        json!({"podSelector": pod_a(), "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    );
    case(
        &grid,
        "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        &[sctp],
        &[TCP80, UDP80],
        &only_into_a(&grid, &[]),
    );

    let mut r = all(&grid, true);
    r.expect_all_egress("x/a", false);
    let deny_out = policy(
        "x",
        "deny-out",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": []}),
    );
    case(
        &grid,
        "should deny egress from pods based on PodSelector",
        std::slice::from_ref(&deny_out),
        &[TCP80, UDP80],
        &r,
    );

    let mut r = all(&grid, true);
    X.iter().for_each(|p| {
        r.expect_all_egress(p, false);
    });
    let deny_ns_out = policy(
        "x",
        "deny-ns-out",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    case(
        &grid,
        "should deny egress from all pods in a namespace",
        &[deny_ns_out],
        &[TCP80],
        &r,
    );

    // x/a: in only from x/b, out only to namespace y; replies pass both ways.
    let mut r = all(&grid, true);
    r.expect_all_ingress("x/a", false).expect("x/b", "x/a", true);
    r.expect_all_egress("x/a", false);
    for to in ["y/a", "y/b", "y/c"] {
        r.expect("x/a", to, true);
    }
    let together = policy(
        "x",
        "together",
        json!({"podSelector": pod_a(), "policyTypes": ["Ingress", "Egress"],
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
               "egress": [{"to": from_y()}]}),
    );
    case(
        &grid,
        "should work with Ingress, Egress specified together",
        &[together],
        &[TCP80, UDP80],
        &r,
    );

    let mut r = all(&grid, true);
    r.expect_all_egress("x/a", false);
    let y_b_allows_a = policy(
        "y",
        "allow-x-a",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": pod_a()}]}]}),
    );
    let mut r_b = r.clone();
    r_b.expect_all_ingress("y/b", false).expect("x/a", "y/b", false);
    case(
        &grid,
        "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        &[deny_out.clone(), y_b_allows_a],
        &[TCP80],
        &r_b,
    );

    let mut r = all(&grid, true);
    r.expect_all_egress("x/a", false).expect("x/a", "y/b", true);
    let to_y_b = policy(
        "x",
        "to-y-b",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    case(
        &grid,
        "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        &[to_y_b],
        &[TCP80],
        &r,
    );

    let allow_all_in = policy("x", "allow-all-in", json!({"podSelector": pod_a(), "ingress": [{}]}));
    let only_80_from_b = policy(
        "x",
        "only-b",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}),
    );
    case(
        &grid,
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        &[only_80_from_b, allow_all_in],
        &[TCP80, TCP81],
        &all(&grid, true),
    );

    let allow_all_out = policy(
        "x",
        "allow-all-out",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{}]}),
    );
    case(
        &grid,
        "should enforce multiple egress policies with egress allow-all policy taking precedence",
        &[deny_out, allow_all_out],
        &[TCP80, TCP81],
        &all(&grid, true),
    );
}

#[test]
fn conformance_ip_blocks_and_label_updates() {
    let cluster = ClusterGuard::up("np3").unwrap();
    let mut grid = Grid::up(&cluster).unwrap();
    let y_b = grid.pod("y/b").pod.clone();
    let host_blocks = |pod: &velox_test_env::Pod| -> Vec<Value> {
        Family::ALL
            .iter()
            .map(|f| {
                let bits = if *f == Family::V4 { 32 } else { 128 };
                json!({"ipBlock": {"cidr": format!("{}/{bits}", pod.ip(*f))}})
            })
            .collect()
    };

    let mut r = all(&grid, true);
    r.expect_all_egress("x/a", false).expect("x/a", "y/b", true);
    let cidr = policy(
        "x",
        "cidr",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": host_blocks(&y_b)}]}),
    );
    case(
        &grid,
        "should allow egress access to server in CIDR block",
        &[cidr],
        &[TCP80],
        &r,
    );

    // Every pod CIDR of the cluster, but y/b's address.
    let except = |pod: &velox_test_env::Pod| -> Value {
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [
            {"ipBlock": {"cidr": "200.200.0.0/16", "except": [format!("{}/32", pod.ip(Family::V4))]}},
            {"ipBlock": {"cidr": "fd00:200::/32", "except": [format!("{}/128", pod.ip(Family::V6))]}},
        ]}]})
    };
    let mut r = all(&grid, true);
    r.expect("x/a", "y/b", false);
    let except_policy = policy("x", "except", except(&y_b));
    case(
        &grid,
        "should enforce except clause while egress access to server in CIDR block",
        std::slice::from_ref(&except_policy),
        &[TCP80],
        &r,
    );

    let also_y_b = policy(
        "x",
        "also-y-b",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": host_blocks(&y_b)}]}),
    );
    case(
        &grid,
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        &[except_policy, also_y_b],
        &[TCP80],
        &all(&grid, true),
    );

    // Ingress and egress of x/a, each by its own policy.
    let mut r = all(&grid, true);
    r.expect_all_ingress("x/a", false);
    r.expect_all_egress("x/a", false).expect("x/a", "x/b", true);
    let in_none = policy(
        "x",
        "in-none",
        json!({"podSelector": pod_a(), "policyTypes": ["Ingress"]}),
    );
    let out_b = policy(
        "x",
        "out-b",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    case(
        &grid,
        "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        &[in_none, out_b],
        &[TCP80, UDP80],
        &r,
    );

    // Namespace labels change: y gets team=blue, which the policy admits.
    let from_blue = policy(
        "x",
        "from-blue",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    );
    case(
        &grid,
        "should allow ingress access from updated namespace (before)",
        std::slice::from_ref(&from_blue),
        &[TCP80],
        &only_into_a(&grid, &[]),
    );
    grid.namespace_labels
        .get_mut("y")
        .unwrap()
        .insert("team".into(), "blue".into());
    case(
        &grid,
        "should allow ingress access from updated namespace",
        &[from_blue],
        &[TCP80],
        &only_into_a(&grid, &["y/a", "y/b", "y/c"]),
    );

    // Pod labels change: x/b becomes a client, which the policy admits.
    let from_clients = policy(
        "x",
        "from-clients",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}),
    );
    case(
        &grid,
        "should allow ingress access from updated pod (before)",
        std::slice::from_ref(&from_clients),
        &[TCP80],
        &only_into_a(&grid, &[]),
    );
    grid.pod_mut("x/b").labels.insert("role".into(), "client".into());
    case(
        &grid,
        "should allow ingress access from updated pod",
        &[from_clients],
        &[TCP80],
        &only_into_a(&grid, &["x/b"]),
    );

    // Pod labels change: x/c becomes a target, which the policy isolates.
    let targets = policy(
        "x",
        "targets",
        json!({"podSelector": {"matchLabels": {"target": "yes"}}, "policyTypes": ["Ingress"]}),
    );
    case(
        &grid,
        "should deny ingress access to updated pod (before)",
        std::slice::from_ref(&targets),
        &[TCP80],
        &all(&grid, true),
    );
    grid.pod_mut("x/c").labels.insert("target".into(), "yes".into());
    let mut r = all(&grid, true);
    r.expect_all_ingress("x/c", false);
    case(
        &grid,
        "should deny ingress access to updated pod",
        &[targets],
        &[TCP80],
        &r,
    );
}

#[test]
fn open_connections_meet_policy_changes_replies_pass_and_every_verdict_is_visible() {
    use velox_test_env::netpol::{connect, exchange};
    let cluster = ClusterGuard::up("np4").unwrap();
    let grid = Grid::up(&cluster).unwrap();
    let node0 = &cluster.nodes[0];
    let (a, b, c) = (grid.pod("x/a"), grid.pod("x/b"), grid.pod("x/c"));
    assert_eq!((a.node, b.node, c.node), (0, 1, 0), "x/b across nodes, x/c beside x/a");
    let to_a = |family| std::net::SocketAddr::new(a.pod.ip(family), 80);
    let mut from_b = connect(&b.pod, to_a(Family::V4)).unwrap();
    let mut from_c = connect(&c.pod, to_a(Family::V6)).unwrap();
    assert!(exchange(&mut from_b) && exchange(&mut from_c));
    let monitor = node0.monitor().unwrap();
    let until = |what: &str, mut done: Box<dyn FnMut() -> bool + '_>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };

    // x/a admits x/b only: x/c's open connection stops, x/b's goes on.
    let allow_b = policy(
        "x",
        "allow-b",
        json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    grid.write_policies(std::slice::from_ref(&allow_b)).unwrap();
    until(
        "x/c's open connection to x/a is cut",
        Box::new(|| !exchange(&mut from_c)),
    );
    for _ in 0..5 {
        assert!(exchange(&mut from_b), "x/b's open connection goes on");
    }
    let denied = monitor
        .wait_for(
            std::time::Duration::from_secs(10),
            || {
                let _ = connect(&c.pod, to_a(Family::V4));
            },
            |e| e["reason"] == "policy_ingress",
        )
        .unwrap();
    assert_eq!(denied["verdict"], "dropped", "{denied}");
    assert_eq!(denied["src_pod"], "x/c", "{denied}");
    assert_eq!(denied["dst_pod"], "x/a", "{denied}");
    assert_eq!(denied["policies"], json!(["x/allow-b"]), "{denied}");
    let counted = node0.endpoint(c.pod.ip(Family::V4)).unwrap();
    assert!(counted["dropped"]["policy_ingress"].as_u64().unwrap() > 0, "{counted}");
    let allowed = monitor
        .wait_for(
            std::time::Duration::from_secs(10),
            || {
                let _ = connect(&b.pod, to_a(Family::V6));
            },
            |e| e["verdict"] == "allowed",
        )
        .unwrap();
    assert_eq!(allowed["reason"], "policy", "{allowed}");
    assert_eq!(allowed["src_pod"], "x/b", "{allowed}");
    assert_eq!(allowed["policies"], json!(["x/allow-b"]), "{allowed}");

    // x/a may send nothing of its own now: replies to what it admits still pass,
    // and so do the replies to its node's own connections (kubelet's probes).
    let no_egress = policy(
        "x",
        "no-egress",
        json!({"podSelector": pod_a(), "policyTypes": ["Egress"]}),
    );
    grid.write_policies(&[allow_b.clone(), no_egress]).unwrap();
    let mut r = only_into_a(&grid, &["x/b"]);
    r.expect_all_egress("x/a", false);
    grid.expect("egress isolated too", &[TCP80], &r).unwrap();
    for _ in 0..5 {
        assert!(exchange(&mut from_b), "replies of x/b's connection pass x/a's egress");
    }
    for family in Family::ALL {
        let to = to_a(family);
        let probe = velox_test_env::netns::spawn_in(&node0.name, move || {
            let mut stream = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(&mut stream, &mut byte)?;
            Ok(byte)
        });
        assert!(probe.join().unwrap().is_ok(), "the node reaches x/a over {family:?}");
    }

    // Everything deleted: x/c connects again.
    grid.write_policies(&[]).unwrap();
    until(
        "x/c connects once the policies are gone",
        Box::new(|| connect(&c.pod, to_a(Family::V6)).is_ok()),
    );
    assert!(exchange(&mut from_b));
}

/// A pod whose labels move it from one policy to another is never denied on the
/// way, and a pod neither admits is never let in: each pod's rules change at once.
#[test]
fn a_label_change_opens_no_window_either_way() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let cluster = ClusterGuard::up("np5").unwrap();
    let mut grid = Grid::up(&cluster).unwrap();
    let from = |role| json!({"podSelector": pod_a(), "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": role}}}]}]});
    let policies = [policy("x", "blue", from("blue")), policy("x", "green", from("green"))];
    grid.pod_mut("x/b").labels.insert("role".into(), "blue".into());
    case(
        &grid,
        "x/b admitted as blue",
        &policies,
        &[TCP80],
        &only_into_a(&grid, &["x/b"]),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (refused, admitted, tries) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let to = std::net::SocketAddr::new(grid.pod("x/a").pod.ip(Family::V4), 80);
    let prober = |pod: &velox_test_env::Pod, wrong: Arc<AtomicUsize>, should_answer: bool| {
        let (stop, tries, name) = (stop.clone(), tries.clone(), pod.name.clone());
        velox_test_env::netns::spawn_in(&name, move || {
            while !stop.load(Ordering::Relaxed) {
                let answered = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(300))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(std::time::Duration::from_millis(300)))?;
                        std::io::Read::read_exact(&mut s, &mut [0u8; 1])
                    })
                    .is_ok();
                tries.fetch_add(1, Ordering::Relaxed);
                if answered != should_answer {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    let b_prober = prober(&grid.pod("x/b").pod, refused.clone(), true);
    let c_prober = prober(&grid.pod("x/c").pod, admitted.clone(), false);
    for round in 0..10 {
        let role = if round % 2 == 0 { "green" } else { "blue" };
        grid.pod_mut("x/b").labels.insert("role".into(), role.into());
        grid.write_policies(&policies).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(600));
    }
    stop.store(true, Ordering::Relaxed);
    b_prober.join().unwrap().unwrap();
    c_prober.join().unwrap().unwrap();
    let tries = tries.load(Ordering::Relaxed);
    assert!(tries > 20, "{tries} connections tried");
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "x/b refused during a relabel ({tries} tries)"
    );
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        0,
        "x/c let in during a relabel ({tries} tries)"
    );
}

/// 1,000 pods on one node, each isolated by a policy of its own that admits the
/// next pod: every pod's rules reach the maps, the datapath enforces them, and a
/// relabel moves one pod between policies.
#[test]
fn a_thousand_policies_over_a_thousand_pods_on_one_node() {
    use velox_test_env::netpol::{namespace_object, pod_object};
    use velox_test_env::NodeGuard;
    const PODS: usize = 1000;
    let subnets = vec!["200.200.0.0/21".parse().unwrap(), "fd00:200:1::/64".parse().unwrap()];
    let node = NodeGuard::up_with_subnets("np1k", subnets).unwrap();
    let state = node.state_dir.join("objects");
    node.stop_loader(nix::sys::signal::Signal::SIGTERM).unwrap();
    node.start_loader_with(&["--cluster-state", state.to_str().unwrap()])
        .unwrap();
    let started = std::time::Instant::now();
    let pods: Vec<velox_test_env::Pod> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let node = &node;
                scope.spawn(move || {
                    (worker..PODS)
                        .step_by(8)
                        .map(|i| (i, node.add_pod(&format!("p{i}")).unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut pods: Vec<_> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        pods.sort_by_key(|(i, _)| *i);
        pods.into_iter().map(|(_, p)| p).collect()
    });
    eprintln!("{PODS} pods added in {:?}", started.elapsed());
    let app = |i: usize| [("app".to_string(), format!("p{i}"))].into();
    let write_pods = |labels: &dyn Fn(usize) -> std::collections::BTreeMap<String, String>| {
        let objects = (0..PODS)
            .map(|i| pod_object("default", &format!("p{i}"), &labels(i), &node.name, &pods[i]))
            .chain([namespace_object("default", &Default::default())])
            .collect();
        velox_test_env::cluster_state::write_objects(&state.join("pods.json"), objects).unwrap();
    };
    write_pods(&app);
    let policies = (0..PODS)
        .map(|i| {
            policy(
                "default",
                &format!("p{i}"),
                json!({"podSelector": {"matchLabels": {"app": format!("p{i}")}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("p{}", (i + 1) % PODS)}}}]}]}),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    velox_test_env::cluster_state::write_objects(&state.join("policies.json"), policies).unwrap();
    // Each pod: one entry for the label set of the pod it admits, whatever its
    // addresses.
    let rules = || node.dump("policy").map(|rows| rows.len()).unwrap_or(0);
    assert!(
        velox_test_env::wait_for(std::time::Duration::from_secs(60), || rules() == PODS),
        "{} rule rows instead of {}",
        rules(),
        PODS
    );
    eprintln!("{PODS} policies applied in {:?}", started.elapsed());
    let p0 = pods[0].ip(Family::V4);
    assert!(pods[1].ping(p0, 1), "p1 is admitted into p0");
    assert!(!pods[2].ping(p0, 1), "p2 is not");
    assert!(
        pods[PODS - 1].ping(pods[PODS - 2].ip(Family::V6), 1),
        "the last pair, IPv6"
    );

    // p2 takes p1's label: p0 admits it, and p2's own policy no longer selects it.
    let relabeled = |i: usize| if i == 2 { app(1) } else { app(i) };
    let started = std::time::Instant::now();
    write_pods(&relabeled);
    assert!(
        velox_test_env::wait_for(std::time::Duration::from_secs(30), || pods[2].ping(p0, 1)),
        "p2 admitted once relabeled"
    );
    eprintln!("a relabel applied in {:?}", started.elapsed());
    assert!(
        !pods[3].ping(pods[2].ip(Family::V4), 1),
        "p2's old policy, which admitted p3, no longer applies: p1's, which admits no one now, does"
    );
    node.finish().unwrap();
}

/// Policy applies to Service traffic after the socket load balancer's translation
/// (the backend's ingress decides), and to pods' traffic to the outside (egress to
/// an `ipBlock`).
#[test]
fn policy_holds_through_services_and_to_the_outside() {
    use nix::sys::signal::Signal;
    use std::net::{IpAddr, SocketAddr};
    use velox_test_env::backend::Backend;
    use velox_test_env::cluster::external_ip;
    use velox_test_env::cluster_state::{self, ServicePort, ServiceSpec};
    use velox_test_env::netpol::pod_object;
    let cluster = ClusterGuard::up("np6").unwrap();
    for node in &cluster.nodes {
        node.stop_loader(Signal::SIGTERM).unwrap();
        let cgroup = node.cgroup().unwrap();
        node.start_loader_with(&["--socket-lb", "--socket-lb-cgroup", cgroup.to_str().unwrap()])
            .unwrap();
    }
    let (client, backend, other) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    let start = |netns: &str, on: SocketAddr| Backend::start(netns, on, Protocol::Tcp, "up").unwrap();
    let servers = [
        start(&backend.name, SocketAddr::new(backend.ip(Family::V4), 8080)),
        start(&cluster.external, SocketAddr::new(external_ip(Family::V4), 8080)),
    ];
    let cluster_ip: IpAddr = "10.96.0.30".parse().unwrap();
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip],
        ports: vec![ServicePort {
            name: "http",
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
            node_port: None,
        }],
        backends: vec![backend.ip(Family::V4)],
    };
    cluster_state::write(&cluster.cluster_state.join("services.json"), &[web]).unwrap();
    let roles = [(&client, 0, "client"), (&backend, 1, "web"), (&other, 0, "other")];
    let pods = roles
        .iter()
        .map(|(pod, node, role)| {
            let labels = [("app".to_string(), role.to_string())].into();
            pod_object("default", &pod.name, &labels, &cluster.nodes[*node].name, pod)
        })
        .chain([velox_test_env::netpol::namespace_object("default", &Default::default())])
        .collect();
    velox_test_env::cluster_state::write_objects(&cluster.cluster_state.join("pods.json"), pods).unwrap();
    let answers = |pod: &velox_test_env::Pod, to: SocketAddr| {
        cluster.nodes[0]
            .probe(&pod.name, "tcp", to)
            .is_ok_and(|answer| answer["answer"] == "up")
    };
    let service = SocketAddr::new(cluster_ip, 80);
    let outside = SocketAddr::new(external_ip(Family::V4), 8080);
    let write = |policies: Vec<Value>| {
        velox_test_env::cluster_state::write_objects(&cluster.cluster_state.join("policies.json"), policies).unwrap();
    };
    let eventually = |what: &str, done: &dyn Fn() -> bool| {
        assert!(
            velox_test_env::wait_for(std::time::Duration::from_secs(15), done),
            "{what}"
        );
    };
    eventually("the Service answers without policy", &|| answers(&other, service));

    write(vec![policy(
        "default",
        "web-from-clients",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}),
    )]);
    eventually("the backend refuses pod-4 through the Service", &|| {
        !answers(&other, service)
    });
    assert!(
        answers(&client, service),
        "the client it admits gets through the Service"
    );

    write(vec![policy(
        "default",
        "client-out",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "198.41.0.0/24", "except": ["198.41.0.4/32"]}}]}]}),
    )]);
    eventually("pod-1 may not reach the external host", &|| !answers(&client, outside));
    assert!(answers(&other, outside), "pod-4, not isolated, reaches it");
    write(vec![policy(
        "default",
        "client-out",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "198.41.0.0/24"}}]}]}),
    )]);
    eventually("pod-1 reaches the external host once admitted", &|| {
        answers(&client, outside)
    });
    assert!(
        !answers(&client, service),
        "but not the Service's backend, a pod it does not admit"
    );
    drop(servers);
    cluster.finish().unwrap();
}

/// A TCP server on pod-1:8080 in both families, running while held, and the pods of
/// `roles` (pod, node, `app` label) in namespace `default`, written where the loaders
/// read them.
fn serve_on_pod_1(
    cluster: &ClusterGuard,
    roles: &[(&velox_test_env::Pod, usize, &str)],
) -> Vec<velox_test_env::backend::Backend> {
    use velox_test_env::netpol::{namespace_object, pod_object};
    let server = cluster.pod("pod-1");
    let servers = Family::ALL
        .iter()
        .map(|family| {
            let on = std::net::SocketAddr::new(server.ip(*family), 8080);
            velox_test_env::backend::Backend::start(&server.name, on, Protocol::Tcp, "up").unwrap()
        })
        .collect();
    let pods = roles
        .iter()
        .map(|(pod, node, role)| {
            let labels = [("app".to_string(), role.to_string())].into();
            pod_object("default", &pod.name, &labels, &cluster.nodes[*node].name, pod)
        })
        .chain([namespace_object("default", &Default::default())])
        .collect();
    write_state(cluster, "pods.json", pods);
    servers
}

fn write_state(cluster: &ClusterGuard, file: &str, objects: Vec<Value>) {
    velox_test_env::cluster_state::write_objects(&cluster.cluster_state.join(file), objects).unwrap();
}

/// Whether `client` reaches pod-1's server (a refused probe waits 1 s).
fn reaches_pod_1(cluster: &ClusterGuard, client: &velox_test_env::Pod, family: Family) -> bool {
    let to = std::net::SocketAddr::new(cluster.pod("pod-1").ip(family), 8080);
    velox_test_env::netpol::connect(client, to).is_ok()
}

fn eventually(what: &str, done: &dyn Fn() -> bool) {
    assert!(
        velox_test_env::wait_for(std::time::Duration::from_secs(15), done),
        "{what}"
    );
}

/// pod-1 serving (the servers returned), pod-4 beside it, and a deny-all ingress
/// policy isolating pod-1, in force: pod-4 no longer reaches it.
fn isolate_pod_1_from_pod_4(cluster: &ClusterGuard) -> (velox_test_env::Pod, Vec<velox_test_env::backend::Backend>) {
    let (server, client) = (cluster.pod("pod-1"), cluster.pod("pod-4"));
    let servers = serve_on_pod_1(cluster, &[(&server, 0, "server"), (&client, 0, "client")]);
    write_state(cluster, "policies.json", vec![deny_into_the_server()]);
    for family in Family::ALL {
        eventually("the deny-all policy isolates pod-1", &|| {
            !reaches_pod_1(cluster, &client, family)
        });
    }
    (client, servers)
}

/// The policy that isolates pod-1 (`app=server`) from everyone.
fn deny_into_the_server() -> Value {
    policy(
        "default",
        "deny",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}),
    )
}

/// Rules that do not fit the rules map fail closed: the pod denies what they would
/// allow (also to the pods a policy does not admit), health and the metrics name it,
/// and once they fit (a loader restarted with room) the rules hold.
#[test]
fn rules_that_do_not_fit_deny_and_say_so() {
    use nix::sys::signal::Signal;
    let cluster = ClusterGuard::up("npfull").unwrap();
    let node0 = &cluster.nodes[0];
    let metrics = "127.0.0.1:9971";
    let restart = |policy_rules: &str| {
        node0.stop_loader(Signal::SIGTERM).unwrap();
        node0
            .start_loader_with(&["--policy-rules", policy_rules, "--metrics-address", metrics])
            .unwrap();
    };
    // pod-1's rules: 8 unrelated /32 blocks and pod-4's addresses, 10 entries.
    restart("6");
    let (server, admitted, other) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-2"));
    let servers = serve_on_pod_1(
        &cluster,
        &[(&server, 0, "server"), (&admitted, 0, "client"), (&other, 1, "other")],
    );
    let answers = |from: &velox_test_env::Pod, family: Family| reaches_pod_1(&cluster, from, family);
    for family in Family::ALL {
        eventually("pod-2 reaches pod-1 without policy", &|| answers(&other, family));
    }

    let blocks = (1..=8)
        .map(|i| json!({"ipBlock": {"cidr": format!("192.0.2.{i}/32")}}))
        .chain(
            Family::ALL.map(|family| json!({"ipBlock": {"cidr": ipnet::IpNet::from(admitted.ip(family)).to_string()}})),
        )
        .collect::<Vec<_>>();
    let allow_client = policy(
        "default",
        "server-from-client",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": blocks}]}),
    );
    write_state(&cluster, "policies.json", vec![allow_client]);
    for family in Family::ALL {
        eventually("pod-2, which no rule admits, is denied", &|| !answers(&other, family));
    }
    let failed_closed = || {
        node0.health().unwrap()["policy_failed_closed"]
            .as_array()
            .is_some_and(|pods| pods.len() == 1)
    };
    eventually("health names the pod whose rules do not fit", &failed_closed);
    let gauge = |value: f64| {
        node0
            .metrics(metrics)
            .unwrap()
            .iter()
            .any(|(name, v)| name == "velox_policy_pods_failed_closed" && *v == value)
    };
    assert!(gauge(1.0), "the metric counts it");
    for family in Family::ALL {
        assert!(
            !answers(&other, family),
            "{family:?}: pod-2, which no rule admits, is denied"
        );
        assert!(
            !answers(&admitted, family),
            "{family:?}: pod-4 too: its rule did not fit"
        );
    }

    restart("1024");
    eventually("the rules fit, health is clean", &|| {
        node0.health().unwrap()["policy_failed_closed"].is_null()
    });
    assert!(gauge(0.0));
    for family in Family::ALL {
        eventually("pod-4 is admitted", &|| answers(&admitted, family));
        assert!(!answers(&other, family), "{family:?}: pod-2 is still denied");
    }
    drop(servers);
    cluster.finish().unwrap();
}

/// `--network-policy=false` turns enforcement off: a pod a deny-all policy isolated
/// is reachable again once the loader restarts with it (the rules an earlier run
/// left in the maps do not stay in force).
#[test]
fn network_policy_off_lifts_the_isolation_an_earlier_run_left() {
    let cluster = ClusterGuard::up("npoff").unwrap();
    let node0 = &cluster.nodes[0];
    let (client, servers) = isolate_pod_1_from_pod_4(&cluster);
    let answers = |family: Family| reaches_pod_1(&cluster, &client, family);
    node0.restart_loader_with(&["--network-policy=false"]).unwrap();
    for family in Family::ALL {
        eventually("with enforcement off, pod-4 reaches pod-1", &|| answers(family));
    }
    drop(servers);
    cluster.finish().unwrap();
}

/// Restarting the loader admits nothing a deny-all policy denies, probed all along
/// in both families: with another `--max-pods` (new counters; the policy switches
/// and rules stay), with another build's programs (an upgrade) and back (a
/// downgrade), and with the maps pinned under another layout (a layout upgrade: all
/// maps start empty). One below a live pod's counters slot is refused, and the
/// datapath that runs keeps its rules.
#[test]
fn restarts_with_another_max_pods_build_or_layout_open_no_window() {
    use nix::sys::signal::Signal;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let cluster = ClusterGuard::up("npslots").unwrap();
    let node0 = &cluster.nodes[0];
    let (client, servers) = isolate_pod_1_from_pod_4(&cluster);
    let answers = |family: Family| reaches_pod_1(&cluster, &client, family);
    let highest_slot = node0
        .dump("stats")
        .unwrap()
        .iter()
        .filter_map(|row| row["slot"].as_u64())
        .max()
        .unwrap();
    let (stop, admitted, probed) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    /// Stops the prober also when an assertion fails, so the scope can end.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for family in Family::ALL {
                    probed.fetch_add(1, Ordering::Relaxed);
                    if answers(family) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        let restart = |max_pods: u64| {
            node0.stop_loader(Signal::SIGTERM).unwrap();
            node0.start_loader_with(&["--max-pods", &max_pods.to_string()])
        };
        restart(2048).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        let refused = restart(highest_slot - 1);
        assert!(refused.is_err(), "--max-pods below a live slot was taken");
        let log = std::fs::read_to_string(node0.state_dir.join("loader.log")).unwrap();
        assert!(log.contains("is below counters slot"), "{log}");
        std::thread::sleep(std::time::Duration::from_secs(3));
        node0.start_loader().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));

        let upgrade = velox_test_env::upgrade_test_object().unwrap();
        node0.stop_loader(Signal::SIGTERM).unwrap();
        node0
            .start_loader_with(&["--ebpf-object", upgrade.to_str().unwrap()])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        node0.stop_loader(Signal::SIGTERM).unwrap();
        node0.start_loader().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));

        // The running programs' maps become another layout's: the loader pins new,
        // empty ones and fills them before it moves the links.
        node0.stop_loader(Signal::SIGTERM).unwrap();
        let bpffs = velox_node::Bpffs::new(&node0.bpffs_root);
        std::fs::rename(bpffs.maps_dir(), bpffs.all_maps_dir().join("0ther1ay0ut0")).unwrap();
        node0.start_loader().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
    });
    let probed = probed.load(Ordering::Relaxed);
    assert!(probed >= 10, "the probes ran: {probed}");
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        0,
        "a probe got through the deny-all policy"
    );
    // The probes could succeed: without the policy they do.
    write_state(&cluster, "policies.json", vec![]);
    for family in Family::ALL {
        eventually("without the policy pod-4 reaches pod-1 again", &|| answers(family));
    }
    drop(servers);
    cluster.finish().unwrap();
}
