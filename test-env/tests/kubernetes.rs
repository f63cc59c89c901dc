//! The loader with the Kubernetes API server as its cluster source (`--kubeconfig`),
//! on the two-node cluster. The API server is test-env's stand-in (none can be
//! installed here): list and watch with resource versions, bookmarks, 410 Gone, 403
//! Forbidden, and a switch that makes it unreachable.
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use velox_test_env::apiserver::{ApiServer, ENDPOINT_SLICES, NETWORK_POLICIES, NODES, SERVICES};
use velox_test_env::backend::Backend;
use velox_test_env::cluster::node_object;
use velox_test_env::cluster_state::{ServicePort, ServiceSpec};
use velox_test_env::kube_proxy::Protocol;
use velox_test_env::{run, wait_for, ClusterGuard, Family, Node, Pod};

const HTTP: ServicePort = ServicePort {
    name: "http",
    protocol: Protocol::Tcp,
    port: 80,
    target_port: 8080,
    node_port: None,
};

/// Where every loader serves its metrics, in its node's netns.
const METRICS: &str = "127.0.0.1:9962";

/// A sample of `node`'s metrics, 0 when absent.
fn metric(node: &Node, sample: &str) -> f64 {
    let metrics = node.metrics(METRICS).unwrap();
    metrics.iter().find(|(name, _)| name == sample).map_or(0.0, |(_, v)| *v)
}

/// A stand-in API server on the cluster's underlay holding its Nodes, and a
/// kubeconfig for it.
fn api_server_for(cluster: &ClusterGuard) -> (ApiServer, PathBuf) {
    let api = ApiServer::start(&cluster.router, "10.0.0.1".parse().unwrap()).unwrap();
    for node in &cluster.nodes {
        api.apply(node_object(node)).unwrap();
    }
    let kubeconfig = cluster.peers_file.with_file_name("kubeconfig.json");
    api.write_kubeconfig(&kubeconfig).unwrap();
    (api, kubeconfig)
}

/// Restarts `node`'s loader the way the DaemonSet runs it: it learns the other
/// nodes, its uplink and pod CIDRs from the API server, balances Services, and
/// installs the plugin and conflist (into `<state dir>/cni`).
fn run_on_the_api_server(node: &Node, kubeconfig: &Path) {
    node.stop_loader(Signal::SIGTERM).unwrap();
    let cgroup = node.cgroup().unwrap();
    let cni = node.state_dir.join("cni");
    let (bin_dir, conf_dir) = (cni.join("bin"), cni.join("net.d"));
    let flags = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        &node.name,
        "--socket-lb",
        "--socket-lb-cgroup",
        cgroup.to_str().unwrap(),
        "--cni-bin-dir",
        bin_dir.to_str().unwrap(),
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
        "--metrics-address",
        METRICS,
    ];
    node.start_loader_with(&flags).unwrap();
}

/// The cluster with every loader on a stand-in API server, synced.
fn cluster_on_the_api_server(tag: &str) -> (ClusterGuard, ApiServer) {
    let cluster = ClusterGuard::up(tag).unwrap();
    let (api, kubeconfig) = api_server_for(&cluster);
    for node in &cluster.nodes {
        run_on_the_api_server(node, &kubeconfig);
    }
    for node in &cluster.nodes {
        assert!(
            wait_for(Duration::from_secs(10), || synced(node)),
            "{}: {:?}",
            node.name,
            node.health()
        );
    }
    (cluster, api)
}

fn synced(node: &Node) -> bool {
    node.health().is_ok_and(|h| h["cluster"]["synced"] == true)
}

/// Whether `node` routes `cidr` via another node: a kernel route and a peer entry,
/// both or neither (`None` while the loader is between the two).
fn routes(node: &Node, cidr: &str) -> Option<bool> {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    let kernel = run("ip", &[family, "-n", &node.name, "route", "show", cidr])
        .unwrap()
        .contains("via");
    let peer = node.dump("peers").unwrap().iter().any(|p| p["pod_cidr"] == cidr);
    (kernel == peer).then_some(kernel)
}

/// Whether `from` routes every pod CIDR of `to` (`true`) or none (`false`).
fn routes_all(from: &Node, to: &Node, wanted: bool) -> bool {
    to.subnets
        .iter()
        .all(|cidr| routes(from, &cidr.to_string()) == Some(wanted))
}

/// How long until `done`, at most `limit`.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    assert!(wait_for(limit, &mut done), "not within {limit:?}");
    started.elapsed()
}

fn cluster_ip(last: u8) -> IpAddr {
    IpAddr::from([10, 96, 0, last])
}

/// One HTTP-ish request through `to` from `pod` on `node`: the backend's name.
fn ask(node: &Node, pod: &Pod, to: SocketAddr) -> Option<String> {
    let answer = node.probe(&pod.name, "tcp", to).ok()?;
    answer["answer"].as_str().map(str::to_string)
}

#[test]
fn nodes_come_and_go_through_the_api_server_within_a_second() {
    let (cluster, api) = cluster_on_the_api_server("kn");
    let (worker1, worker2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    assert!(routes_all(worker1, worker2, true));
    for family in Family::ALL {
        assert!(pod1.ping(pod2.ip(family), 2), "{family:?}");
    }
    // Uplink and pod CIDRs came from each node's Node: the routes above, the
    // masquerade rules, and the conflist the loader wrote.
    for node in &cluster.nodes {
        let conflist = node.state_dir.join("cni/net.d/00-velox.conflist");
        assert!(wait_for(Duration::from_secs(2), || conflist.exists()));
        let conflist: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
        let subnets: Vec<String> = node.subnets.iter().map(ToString::to_string).collect();
        assert_eq!(conflist["plugins"][0]["subnets"], serde_json::json!(subnets));
        assert!(node.state_dir.join("cni/bin/velox").exists());
        let masquerade = run(
            "ip",
            &[
                "netns",
                "exec",
                &node.name,
                "iptables",
                "-t",
                "nat",
                "-S",
                "POSTROUTING",
            ],
        )
        .unwrap();
        assert!(masquerade.contains(&format!("-s {}", node.subnets[0])), "{masquerade}");
    }
    // Each loader told the cluster its network is up.
    for node in &cluster.nodes {
        let conditions = api.get(NODES, "", &node.name).unwrap()["status"]["conditions"].clone();
        let condition = conditions
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "NetworkUnavailable")
            .cloned()
            .unwrap_or_else(|| panic!("{}: {conditions}", node.name));
        assert_eq!(condition["status"], "False", "{condition}");
    }

    // worker-2's Node goes: worker-1 forgets its pod CIDRs within a second.
    api.delete(NODES, "", &worker2.name);
    let gone = time_until(Duration::from_secs(1), || routes_all(worker1, worker2, false));
    assert!(!pod1.ping(pod2.ip(Family::V4), 1));
    // And comes back.
    api.apply(node_object(worker2)).unwrap();
    let back = time_until(Duration::from_secs(1), || routes_all(worker1, worker2, true));
    assert!(pod1.ping(pod2.ip(Family::V4), 2));
    eprintln!("node removed after {gone:?}, added after {back:?}");

    // An expired watch (410 Gone) lists again, and goes on watching from there.
    let lists_before = api.count("list", "nodes");
    api.compact();
    assert!(
        wait_for(Duration::from_secs(5), || api.count("list", "nodes")
            >= lists_before + 2),
        "both loaders list again after 410: {lists_before} lists before, {} after",
        api.count("list", "nodes")
    );
    api.delete(NODES, "", &worker2.name);
    time_until(Duration::from_secs(1), || routes_all(worker1, worker2, false));
    api.apply(node_object(worker2)).unwrap();
    time_until(Duration::from_secs(1), || routes_all(worker1, worker2, true));
    drop(api);
    cluster.finish().unwrap();
}

#[test]
fn services_and_their_endpoints_reach_the_load_balancer_from_the_api_server() {
    let (cluster, api) = cluster_on_the_api_server("ks");
    let (pod1, pod2, pod4) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-4"));
    let _backends: Vec<Backend> = [&pod2, &pod4]
        .iter()
        .map(|pod| {
            let addr = SocketAddr::new(pod.ip(Family::V4), HTTP.target_port);
            Backend::start(&pod.name, addr, HTTP.protocol, &pod.name).unwrap()
        })
        .collect();
    let web = |backends: &[&Pod]| ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip(30)],
        ports: vec![HTTP],
        backends: backends.iter().map(|p| p.ip(Family::V4)).collect(),
    };
    for object in web(&[&pod2]).objects() {
        api.apply(object).unwrap();
    }
    let frontend = SocketAddr::new(cluster_ip(30), HTTP.port);
    let worker1 = &cluster.nodes[0];
    // Asked before it is there, a ClusterIP leads nowhere until the probe times out.
    let serves = |pod: &Pod| {
        let backend = serde_json::json!([format!("{}:{}", pod.ip(Family::V4), HTTP.target_port)]);
        let rows = worker1.dump("services").unwrap_or_default();
        rows.iter()
            .any(|row| row["frontend"] == frontend.to_string() && row["backends"] == backend)
    };
    assert!(wait_for(Duration::from_secs(2), || serves(&pod2)));
    assert_eq!(ask(worker1, &pod1, frontend).as_deref(), Some(pod2.name.as_str()));
    // The endpoints move to pod-4: new connections follow.
    for object in web(&[&pod4]).objects() {
        api.apply(object).unwrap();
    }
    assert!(wait_for(Duration::from_secs(2), || serves(&pod4)));
    assert_eq!(ask(worker1, &pod1, frontend).as_deref(), Some(pod4.name.as_str()));
    // The Service goes: its address is nobody's.
    api.delete(SERVICES, "default", "web");
    assert!(wait_for(Duration::from_secs(2), || worker1
        .dump("services")
        .is_ok_and(|rows| rows.is_empty())));
    drop(api);
    cluster.finish().unwrap();
}

/// Kubernetes before 1.21 serves EndpointSlices as `discovery.k8s.io/v1beta1` only:
/// the loader finds that version and the Services work as on a newer cluster.
#[test]
fn endpoint_slices_of_a_kubernetes_1_20_api_server_reach_the_load_balancer() {
    let cluster = ClusterGuard::up("kb").unwrap();
    let (api, kubeconfig) = api_server_for(&cluster);
    api.serve_as(ENDPOINT_SLICES, Some("discovery.k8s.io/v1beta1"));
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let _backend = Backend::start(
        &pod2.name,
        SocketAddr::new(pod2.ip(Family::V4), HTTP.target_port),
        HTTP.protocol,
        &pod2.name,
    )
    .unwrap();
    let web = ServiceSpec {
        name: "web".into(),
        cluster_ips: vec![cluster_ip(31)],
        ports: vec![HTTP],
        backends: vec![pod2.ip(Family::V4)],
    };
    for object in web.objects() {
        api.apply(object).unwrap();
    }
    let worker1 = &cluster.nodes[0];
    run_on_the_api_server(worker1, &kubeconfig);
    // Ready once the Services are in the maps.
    assert!(
        wait_for(Duration::from_secs(10), || worker1.health_probe(&[])),
        "{:?}",
        worker1.health()
    );
    let health = worker1.health().unwrap();
    assert_eq!(health["services"]["frontends"], 1, "{health}");
    let frontend = SocketAddr::new(cluster_ip(31), HTTP.port);
    assert_eq!(ask(worker1, &pod1, frontend).as_deref(), Some(pod2.name.as_str()));
    drop(api);
    cluster.finish().unwrap();
}

/// A resource the API server does not serve (404) or RBAC refuses (403): the
/// watches back off (0.5 s doubling to 8 s) instead of asking twice a second
/// forever, health names both, and the node is not ready while the Services it
/// balances have never come; once they do, it is.
#[test]
fn watches_the_api_server_refuses_back_off_and_keep_the_loader_unready() {
    let cluster = ClusterGuard::up("kr").unwrap();
    let (api, kubeconfig) = api_server_for(&cluster);
    api.serve_as(ENDPOINT_SLICES, None);
    api.forbid(SERVICES);
    let worker1 = &cluster.nodes[0];
    run_on_the_api_server(worker1, &kubeconfig);
    let started = Instant::now();
    let (slices_before, services_before) = (api.count("list", "endpointslices"), api.count("list", "services"));
    std::thread::sleep(Duration::from_secs(16));
    let (slices, services) = (
        api.count("list", "endpointslices") - slices_before,
        api.count("list", "services") - services_before,
    );
    let elapsed = started.elapsed();
    // Rounds at about 0, 0.5, 1.5, 3.5, 7.5 and 15.5 s: six, each asking for both
    // EndpointSlice versions; a retry every 0.5 s would be over 30.
    assert!(services <= 7, "{services} lists of services in {elapsed:?}");
    assert!(slices <= 14, "{slices} lists of endpointslices in {elapsed:?}");
    let health = worker1.health().unwrap();
    let errors = health["cluster"]["errors"].to_string();
    assert!(
        errors.contains("endpointslices: ") && errors.contains("404"),
        "{health}"
    );
    assert!(errors.contains("services: forbidden by the API server"), "{health}");
    assert_eq!(health["services"]["synced_once"], false, "{health}");
    assert!(
        !worker1.health_probe(&[]),
        "ready without ever having the Services: {health}"
    );
    assert!(worker1.health_probe(&["--live"]), "alive all the same");
    assert!(metric(worker1, "velox_api_errors_total{resource=\"services\"}") >= 3.0);
    // A 1.20 API server: v1beta1 is found; with RBAC fixed, the Services come.
    api.serve_as(ENDPOINT_SLICES, Some("discovery.k8s.io/v1beta1"));
    api.allow(SERVICES);
    assert!(
        wait_for(Duration::from_secs(20), || worker1.health_probe(&[])),
        "{:?}",
        worker1.health()
    );
    drop(api);
    cluster.finish().unwrap();
}

#[test]
fn thirty_seconds_without_the_api_server_and_a_loader_restart_lose_no_traffic_then_it_resyncs() {
    let (cluster, api) = cluster_on_the_api_server("kd");
    let (pod1, pod2) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
    let (worker1, worker2) = (&cluster.nodes[0], &cluster.nodes[1]);
    const THIRD_POD_CIDR: &str = "200.200.3.0/24";
    let third_node = || {
        serde_json::json!({"kind": "Node", "metadata": {"name": "worker-3"},
            "spec": {"podCIDRs": [THIRD_POD_CIDR]},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}})
    };
    let transfer = std::thread::scope(|s| {
        let iperf = s.spawn(|| pod1.iperf3(&pod2, Family::V4, 40, 2));
        std::thread::sleep(Duration::from_secs(3));
        api.set_reachable(false);
        // The loaders notice, say so, and keep forwarding with what they knew.
        for node in &cluster.nodes {
            assert!(wait_for(Duration::from_secs(10), || !synced(node)), "{}", node.name);
        }
        let health = worker1.health().unwrap();
        assert_eq!(health["ready"], true, "{health}");
        assert!(!health["cluster"]["errors"].as_array().unwrap().is_empty(), "{health}");
        // Meanwhile a third node joins; nobody hears of it yet.
        api.apply(third_node()).unwrap();
        // A loader restarts without the API server: from its pins and state.
        std::thread::sleep(Duration::from_secs(5));
        run_on_the_api_server(worker1, &cluster.peers_file.with_file_name("kubeconfig.json"));
        std::thread::sleep(Duration::from_secs(20));
        assert!(routes_all(worker1, worker2, true), "the last known state stays");
        let health = worker1.health().unwrap();
        assert!(
            health["links_held"].is_string(),
            "without the policy the links stay: {health}"
        );
        assert_eq!(routes(worker1, THIRD_POD_CIDR), Some(false));
        api.set_reachable(true);
        // Back: the loaders list again and catch up, while the traffic goes on.
        for node in &cluster.nodes {
            assert!(wait_for(Duration::from_secs(10), || synced(node)), "{}", node.name);
        }
        assert!(wait_for(Duration::from_secs(2), || routes(worker1, THIRD_POD_CIDR) == Some(true)));
        let moved = || worker1.health().is_ok_and(|h| h["links_held"].is_null());
        assert!(
            wait_for(Duration::from_secs(5), moved),
            "the links move once the policy is known"
        );
        iperf.join().unwrap()
    })
    .unwrap();
    assert!(
        transfer.slowest_second_gbps > 0.0,
        "a second without traffic: {transfer:?}"
    );
    assert!(routes_all(worker1, worker2, true));
    // The outage is counted, and so are the events since.
    assert!(metric(worker1, "velox_api_errors_total{resource=\"nodes\"}") >= 1.0);
    assert!(metric(worker1, "velox_watch_events_total{resource=\"nodes\"}") >= 1.0);
    drop(api);
    cluster.finish().unwrap();
}

#[test]
fn a_resource_rbac_forbids_is_reported_and_the_rest_keeps_working() {
    let cluster = ClusterGuard::up("kf").unwrap();
    let (api, kubeconfig) = api_server_for(&cluster);
    api.forbid(ENDPOINT_SLICES);
    let worker1 = &cluster.nodes[0];
    run_on_the_api_server(worker1, &kubeconfig);
    let forbidden = || {
        worker1.health().is_ok_and(|h| {
            h["cluster"]["errors"].as_array().unwrap().iter().any(|e| {
                e.as_str()
                    .unwrap()
                    .starts_with("endpointslices: forbidden by the API server")
            })
        })
    };
    assert!(wait_for(Duration::from_secs(10), forbidden), "{:?}", worker1.health());
    let log = std::fs::read_to_string(worker1.state_dir.join("loader.log")).unwrap();
    assert!(log.contains("ClusterRole"), "{log}");
    // Nodes are not forbidden: the routes to worker-2 come from the API server.
    assert!(wait_for(Duration::from_secs(5), || routes_all(
        worker1,
        &cluster.nodes[1],
        true
    )));
    drop(api);
    cluster.finish().unwrap();
}

/// A Pods watch that fails (RBAC forbids it here) leaves no new pod open and no
/// health green: a pod kubelet names at ADD denies everything, health says the
/// source is not synced and the policy never was, and the readiness probe fails
/// while the liveness probe does not.
#[test]
fn a_failing_pods_watch_leaves_new_pods_denied_and_the_loader_unready() {
    use velox_test_env::apiserver::PODS;
    use velox_test_env::netpol::{connect, PortServer, PORTS};
    let cluster = ClusterGuard::up("kpods").unwrap();
    let (api, kubeconfig) = api_server_for(&cluster);
    api.forbid(PODS);
    let worker1 = &cluster.nodes[0];
    run_on_the_api_server(worker1, &kubeconfig);
    let peer = cluster.pod("pod-4");
    let server = PortServer::start(&peer, &worker1.bins.probe).unwrap();
    let netns = cluster.pod_name(0, "new");
    velox_test_env::netns::create_pod_netns(&netns).unwrap();
    let (pod, _) = worker1.add_kubernetes_pod(&netns, "default", "new").unwrap();
    for family in Family::ALL {
        let to = SocketAddr::new(peer.ip(family), PORTS[0]);
        for _ in 0..3 {
            assert!(connect(&pod, to).is_err(), "{family:?}: the new pod got out");
        }
    }
    let health = worker1.health().unwrap();
    assert_eq!(health["cluster"]["synced"], false, "{health}");
    assert_eq!(health["policy"]["synced_once"], false, "{health}");
    assert!(!worker1.health_probe(&[]), "ready without ever having the policy");
    assert!(worker1.health_probe(&["--live"]), "alive all the same");
    drop((server, api));
    cluster.finish().unwrap();
}

/// The objects of deploy/velox.yaml, by kind.
fn manifest() -> Vec<Value> {
    use serde::Deserialize;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/velox.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> T {
    let object = objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn the_manifest_grants_exactly_what_the_loader_asks_and_runs_only_the_loader() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use std::collections::BTreeSet;

    let objects = manifest();
    let role: ClusterRole = of_kind(&objects, "ClusterRole");
    let granted: BTreeSet<(String, String, String)> = role
        .rules
        .unwrap_or_default()
        .iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let verbs = rule.verbs.clone();
            groups.into_iter().flat_map(move |group| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |resource| {
                    let group = group.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |verb| (group.clone(), resource.clone(), verb))
                })
            })
        })
        .collect();
    // What the loaders of a cluster ask, once they have synced and marked their Nodes.
    let (cluster, api) = cluster_on_the_api_server("km");
    assert!(wait_for(Duration::from_secs(10), || api.count("patch", "nodes/status") >= 2));
    assert_eq!(
        api.requests(),
        granted,
        "the ClusterRole grants exactly what the loader asks"
    );
    drop(api);
    cluster.finish().unwrap();

    // The DaemonSet runs the loader alone, from the image `cargo xtask image` builds,
    // with flags the loader takes, and mounts exactly its volumes.
    let daemon_set: DaemonSet = of_kind(&objects, "DaemonSet");
    let pod = daemon_set.spec.unwrap().template.spec.unwrap();
    assert!(pod.init_containers.is_none());
    let [loader] = &pod.containers[..] else {
        panic!(
            "one container: {:?}",
            pod.containers.iter().map(|c| &c.name).collect::<Vec<_>>()
        );
    };
    assert_eq!(loader.image.as_deref(), Some(velox_test_env::IMAGE));
    let args = loader.args.clone().unwrap_or_default();
    let bins = velox_test_env::Binaries::locate().unwrap();
    let help = std::process::Command::new(&bins.loader)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&help.stderr)
    );
    // The node's name, and the API server's address from the velox-api-server
    // ConfigMap where there is one (no kube-proxy translates the ClusterIP).
    let env: Vec<(String, Option<String>)> = loader
        .env
        .iter()
        .flatten()
        .map(|e| {
            let config_map = e.value_from.as_ref().and_then(|v| v.config_map_key_ref.as_ref());
            (e.name.clone(), config_map.map(|c| format!("{}/{}", c.name, c.key)))
        })
        .collect();
    assert_eq!(
        env,
        [
            ("NODE_NAME".to_string(), None),
            ("KUBERNETES_SERVICE_HOST".into(), Some("velox-api-server/host".into())),
            ("KUBERNETES_SERVICE_PORT".into(), Some("velox-api-server/port".into())),
        ]
    );
    let mounted: BTreeSet<String> = loader.volume_mounts.iter().flatten().map(|m| m.name.clone()).collect();
    let volumes: BTreeSet<String> = pod.volumes.iter().flatten().map(|v| v.name.clone()).collect();
    assert_eq!(mounted, volumes);
    // Readiness waits for the policy; liveness only for an answer (restarting a
    // loader whose API server is away would not bring it back).
    for (probe, command) in [
        (&loader.liveness_probe, &["velox-loader", "health", "--live"][..]),
        (&loader.readiness_probe, &["velox-loader", "health"][..]),
    ] {
        let given = probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .and_then(|e| e.command.clone());
        assert_eq!(given, Some(command.iter().map(|c| c.to_string()).collect()));
        // kubelet stops an exec probe after its timeout (1 s unless set): `health`
        // waits up to 2 s for the loader's answer.
        let timeout = probe.as_ref().and_then(|p| p.timeout_seconds).unwrap_or(1);
        assert!(timeout > 2, "{command:?}: a timeout of {timeout} s");
    }
}

#[test]
fn network_policies_pods_and_namespaces_from_the_api_server_reach_the_datapath() {
    use velox_test_env::netpol::{namespace_object, pod_object, policy};
    let (cluster, api) = cluster_on_the_api_server("kp");
    api.apply(namespace_object(
        "default",
        &[("team".to_string(), "one".to_string())].into(),
    ))
    .unwrap();
    let roles = [("pod-1", "server"), ("pod-2", "client"), ("pod-3", "other")];
    for (node, pod) in cluster.pods().unwrap() {
        let role = roles
            .iter()
            .find(|(name, _)| pod.name.ends_with(name))
            .map_or("none", |(_, r)| r);
        let labels = [("role".to_string(), role.to_string())].into();
        api.apply(pod_object(
            "default",
            &pod.name,
            &labels,
            &cluster.nodes[node].name,
            &pod,
        ))
        .unwrap();
    }
    let (server, client, other) = (cluster.pod("pod-1"), cluster.pod("pod-2"), cluster.pod("pod-3"));
    let server_ip = server.ip(Family::V4);
    api.apply(policy(
        "default",
        "clients-only",
        serde_json::json!({"podSelector": {"matchLabels": {"role": "server"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}),
    ))
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || !other.ping(server_ip, 1)),
        "the policy from the API server isolates pod-1"
    );
    assert!(client.ping(server_ip, 2), "the client it admits gets through");
    api.delete(NETWORK_POLICIES, "default", "clients-only");
    assert!(
        wait_for(Duration::from_secs(10), || other.ping(server_ip, 1)),
        "deleted, the policy stops applying"
    );
    drop(api);
    cluster.finish().unwrap();
}
