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
        &[deny_out.clone()],
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
