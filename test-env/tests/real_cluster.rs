//! Velox on a real Kubernetes cluster of two nodes (test-env's `real_cluster`: API
//! server, controller manager, scheduler, a kubelet on containerd per node),
//! installed as the README says: the image imported, the API server's address in a
//! ConfigMap, the manifest applied. Then what users rely on, with objects created by
//! kubectl: pod addresses from each node's podCIDR, pod to pod on a node and across
//! nodes, a Service by ClusterIP and NodePort from pods and nodes, a hostPort, pod
//! names in the counters and metrics, NetworkPolicy, and a loader's pod deleted
//! under traffic.
//! Needs root, `cargo xtask setup` (the Kubernetes binaries) and `cargo xtask image`;
//! `cargo xtask test` does all three.
#![cfg(feature = "privileged")]

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use velox_test_env::real_cluster::{RealCluster, RealNode, CLUSTER_CIDR, ROUTER_IP};
use velox_test_env::wait_for;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

/// An HTTP/1.0 `GET /` through busybox nc to `host port`, as a shell line.
fn http_get(host: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 /bin/busybox nc -w 2 {host} {port}")
}

/// The body's last line, if any.
fn last_line(answer: &str) -> Option<String> {
    answer.lines().last().filter(|l| !l.is_empty()).map(str::to_string)
}

/// What `GET /` on `host port` answers from pod `client`, if anything.
fn get_from_pod(cluster: &RealCluster, client: &str, host: &str, port: u16) -> Option<String> {
    let command = ["exec", client, "--", "/bin/busybox", "sh", "-c", &http_get(host, port)];
    last_line(&exec(cluster, &command)?)
}

/// `kubectl <command>` for an exec: its output, `None` when the command in the pod
/// failed. `kubectl exec` goes API server -> kubelet -> containerd: a failure of
/// that way there is tried again, a few times.
fn exec(cluster: &RealCluster, command: &[&str]) -> Option<String> {
    for _ in 0..10 {
        match cluster.kubectl(command) {
            Ok(output) => return Some(output),
            Err(e) if e.to_string().contains("command terminated with exit code") => return None,
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    None
}

/// What `GET /` on `host port` answers from a process of `node`.
fn get_from_node(node: &RealNode, host: &str, port: u16) -> Option<String> {
    last_line(&node.run_on_node("sh", &["-c", &http_get(host, port)]).ok()?)
}

/// `kubectl <args> -o json`.
fn get(cluster: &RealCluster, args: &[&str]) -> Value {
    let json = cluster.kubectl(&[args, &["-o", "json"]].concat()).unwrap();
    serde_json::from_str(&json).unwrap()
}

fn condition_true(object: &Value, kind: &str) -> bool {
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

fn ready(cluster: &RealCluster, selector: &str, namespace: &str, count: usize) -> bool {
    let pods = get(cluster, &["get", "pods", "-n", namespace, "-l", selector]);
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    items.len() == count && items.iter().all(|pod| condition_true(pod, "Ready"))
}

/// The loader's pod on each node, by node name.
fn loaders(cluster: &RealCluster) -> BTreeMap<String, String> {
    let pods = get(cluster, &["get", "pods", "-n", "kube-system", "-l", "app=velox"]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| {
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default().to_string();
            (node, pod["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect()
}

/// `velox-loader <args>` in the loader's pod on `node`.
fn loader_cli(cluster: &RealCluster, node: &str, args: &[&str]) -> String {
    let pod = loaders(cluster)[node].clone();
    let command = [
        &["-n", "kube-system", "exec", pod.as_str(), "--", "velox-loader"][..],
        args,
    ]
    .concat();
    exec(cluster, &command).unwrap_or_else(|| panic!("velox-loader {args:?} on {node} failed"))
}

fn table(cluster: &RealCluster) -> String {
    cluster
        .kubectl(&["get", "nodes,pods", "-A", "-o", "wide"])
        .unwrap_or_default()
}

/// The table, kube-system's events and the loaders' last lines: what a failed wait
/// for the loaders needs to be read.
fn loaders_report(cluster: &RealCluster) -> String {
    let events = cluster
        .kubectl(&["-n", "kube-system", "get", "events", "--sort-by=.lastTimestamp"])
        .unwrap_or_default();
    let logs: Vec<String> = loaders(cluster)
        .values()
        .map(|pod| {
            let log = cluster
                .kubectl(&["-n", "kube-system", "logs", pod, "--tail=15"])
                .unwrap_or_else(|e| e.to_string());
            format!("--- {pod}\n{log}")
        })
        .collect();
    format!("{}\n{events}\n{}", table(cluster), logs.join("\n"))
}

#[test]
fn velox_installed_with_kubectl_serves_pods_services_host_ports_and_policy_on_real_kubelets() {
    let mut cluster = RealCluster::up("rk").unwrap();
    // The README's installation, step by step.
    cluster
        .import_image(Path::new(&repo("target/velox-image.tar")))
        .unwrap();
    cluster
        .kubectl(&[
            "-n",
            "kube-system",
            "create",
            "configmap",
            "velox-api-server",
            &format!("--from-literal=host={ROUTER_IP}"),
            "--from-literal=port=6443",
        ])
        .unwrap();
    cluster.kubectl(&["apply", "-f", &repo("deploy/velox.yaml")]).unwrap();
    let nodes_ready = |cluster: &RealCluster| {
        let nodes = get(cluster, &["get", "nodes"]);
        let items = nodes["items"].as_array().cloned().unwrap_or_default();
        items.len() == 2 && items.iter().all(|node| condition_true(node, "Ready"))
    };
    assert!(
        wait_for(Duration::from_secs(90), || nodes_ready(&cluster)
            && ready(&cluster, "app=velox", "kube-system", 2)),
        "{}",
        table(&cluster)
    );
    let mut pod_cidrs = BTreeMap::new();
    for node in &cluster.nodes {
        let object = get(&cluster, &["get", "node", &node.name]);
        let network = object["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "NetworkUnavailable")
            .map(|c| c["status"].clone());
        assert_eq!(network, Some(Value::from("False")), "{object}");
        let cidr: ipnet::IpNet = object["spec"]["podCIDR"].as_str().unwrap().parse().unwrap();
        assert!(CLUSTER_CIDR.parse::<ipnet::IpNet>().unwrap().contains(&cidr));
        pod_cidrs.insert(node.name.clone(), cidr);
    }

    // The workload: a web pod per node behind a NodePort Service, a client on node1,
    // a hostPort pod on node2.
    cluster
        .kubectl(&["apply", "-f", &repo("test-env/kubernetes/web.yaml")])
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || ready(&cluster, "app=web", "default", 2)
            && ready(&cluster, "app in (client, hostport)", "default", 2)),
        "{}",
        table(&cluster)
    );
    println!("{}", table(&cluster));

    // Addresses from their node's podCIDR, the ones its loader's maps hold.
    let pods = get(&cluster, &["get", "pods", "-n", "default"]);
    let mut webs: Vec<(String, String, String)> = Vec::new();
    for pod in pods["items"].as_array().unwrap() {
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
        let node = pod["spec"]["nodeName"].as_str().unwrap().to_string();
        assert!(
            pod_cidrs[&node].contains(&ip.parse::<IpAddr>().unwrap()),
            "{name} {ip} {node}"
        );
        let endpoints: Vec<Value> =
            serde_json::from_str(&loader_cli(&cluster, &node, &["endpoints", "--json"])).unwrap();
        assert!(
            endpoints
                .iter()
                .any(|e| e["ip"] == ip.as_str() && e["pod"] == format!("default/{name}").as_str()),
            "{name} {ip} is not in {node}'s endpoint maps: {endpoints:?}"
        );
        if name.starts_with("web-") {
            webs.push((name, ip, node));
        }
    }
    let web_nodes: Vec<&str> = webs.iter().map(|(_, _, node)| node.as_str()).collect();
    assert!(web_nodes.contains(&"node1") && web_nodes.contains(&"node2"), "{webs:?}");
    let web_names: Vec<&str> = webs.iter().map(|(name, _, _)| name.as_str()).collect();
    let a_web = |answer: Option<String>| answer.is_some_and(|a| web_names.contains(&a.as_str()));

    // Pod names in the counters and the metrics, as kubelet gave them at ADD.
    let stats: Vec<Value> = serde_json::from_str(&loader_cli(&cluster, "node1", &["stats", "--json"])).unwrap();
    assert!(stats.iter().any(|row| row["pod"] == "default/client"), "{stats:?}");
    let metrics = || {
        let get = "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | timeout 5 busybox nc -w 2 127.0.0.1 9962";
        cluster.nodes[0].run_on_node("sh", &["-c", get]).unwrap_or_default()
    };
    let client_counters = "namespace=\"default\",pod=\"client\",verdict=\"passed\"";
    assert!(
        wait_for(Duration::from_secs(10), || metrics().contains(client_counters)),
        "{}",
        metrics()
    );

    // Pod to pod on a node and across, the Service by ClusterIP and NodePort from a
    // pod and from both nodes, the hostPort from a pod and from outside.
    let service = get(&cluster, &["get", "service", "web"]);
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    for (name, ip, _) in &webs {
        assert_eq!(
            get_from_pod(&cluster, "client", ip, 8080).as_deref(),
            Some(name.as_str())
        );
    }
    let (node1_ip, node2_ip) = (cluster.nodes[0].ip.clone(), cluster.nodes[1].ip.clone());
    for (host, port) in [
        (cluster_ip.as_str(), 80),
        (node1_ip.as_str(), 30080),
        (node2_ip.as_str(), 30080),
    ] {
        assert!(
            a_web(get_from_pod(&cluster, "client", host, port)),
            "{host}:{port} from the client"
        );
    }
    for node in &cluster.nodes {
        assert!(
            a_web(get_from_node(node, &cluster_ip, 80)),
            "the ClusterIP from {}",
            node.name
        );
    }
    assert_eq!(
        get_from_pod(&cluster, "client", &node2_ip, 18080).as_deref(),
        Some("hostport")
    );
    let from_outside = |host: &str, port| {
        let answer = velox_test_env::netns::run_in_netns(&cluster.router, "sh", &["-c", &http_get(host, port)]);
        last_line(&answer.unwrap())
    };
    assert_eq!(
        from_outside(&node2_ip, 18080).as_deref(),
        Some("hostport"),
        "the hostPort from outside"
    );
    // No kube-proxy: Velox's NAT at each node's uplink.
    for node_ip in [&node1_ip, &node2_ip] {
        assert!(
            a_web(from_outside(node_ip, 30080)),
            "the NodePort on {node_ip} from outside"
        );
    }

    // NetworkPolicy with kubectl: the web pods admit only the client, on 8080 (HTTP)
    // and 5201 (iperf3).
    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                              "ports": [{"port": 8080}, {"port": 5201}]}]},
    });
    let policy_file = cluster.dir.join("policy.json");
    std::fs::write(&policy_file, policy.to_string()).unwrap();
    cluster
        .kubectl(&["apply", "-f", policy_file.to_str().unwrap()])
        .unwrap();
    for (name, ip, node) in &webs {
        assert!(
            wait_for(Duration::from_secs(10), || get_from_pod(&cluster, "hostport", ip, 8080)
                .is_none()),
            "the policy denies the hostport pod (node2) to {name} on {node}"
        );
        assert_eq!(
            get_from_pod(&cluster, "client", ip, 8080).as_deref(),
            Some(name.as_str())
        );
    }

    // node2's kubelet stopped and started again: its pods run on, unrestarted.
    let web2 = webs.iter().find(|(_, _, node)| node == "node2").unwrap().clone();
    cluster.nodes[1].restart_kubelet().unwrap();
    assert_eq!(
        get_from_pod(&cluster, "client", &web2.1, 8080).as_deref(),
        Some(web2.0.as_str())
    );
    // Back when it serves again (the Node stays Ready through a short stop).
    let serving = || {
        cluster
            .kubectl(&["exec", &web2.0, "--", "/bin/busybox", "true"])
            .is_ok()
    };
    assert!(
        wait_for(Duration::from_secs(60), || serving()
            && nodes_ready(&cluster)
            && ready(&cluster, "app=web", "default", 2)),
        "{}",
        table(&cluster)
    );
    let restarts = get(&cluster, &["get", "pod", &web2.0])["status"]["containerStatuses"][0]["restartCount"].clone();
    assert_eq!(restarts, 0, "{} restarted", web2.0);

    // A rolling update of the DaemonSet to a new image, driven by the kubelets, under
    // a TCP stream from node1's client to node2's web pod: no second without traffic.
    for node in &cluster.nodes {
        node.ctr(&[
            "-n",
            "k8s.io",
            "images",
            "tag",
            velox_test_env::IMAGE,
            "localhost/velox:rollout",
        ])
        .unwrap();
    }
    // kubectl exec through a kubelet that was just restarted can fail once under
    // load; a second daemon started by a retry only fails to bind.
    let mut exec_error = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            let started = cluster.kubectl(&["exec", &web2.0, "--", "/usr/bin/iperf3", "-s", "-D"]);
            exec_error = started.as_ref().err().map(ToString::to_string);
            started.is_ok()
        }),
        "starting iperf3 in {}: {exec_error:?}",
        web2.0
    );
    std::thread::sleep(Duration::from_millis(500));
    let stream = std::thread::scope(|s| {
        let cluster = &cluster;
        let stream = s.spawn(move || {
            cluster.kubectl(&[
                "exec",
                "client",
                "--",
                "/usr/bin/iperf3",
                "-c",
                &web2.1,
                "-t",
                "30",
                "-J",
            ])
        });
        std::thread::sleep(Duration::from_secs(2));
        cluster
            .kubectl(&[
                "-n",
                "kube-system",
                "set",
                "image",
                "ds/velox",
                "loader=localhost/velox:rollout",
            ])
            .unwrap();
        cluster
            .kubectl(&["-n", "kube-system", "rollout", "status", "ds/velox", "--timeout=180s"])
            .unwrap();
        stream.join().unwrap()
    });
    let report: Value = serde_json::from_str(&stream.unwrap()).unwrap();
    let seconds: Vec<f64> = report["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap())
        .collect();
    assert!(
        seconds.len() >= 29 && seconds.iter().all(|bps| *bps > 0.0),
        "{seconds:?} {}",
        report["error"]
    );
    let images: Vec<Value> = get(&cluster, &["get", "pods", "-n", "kube-system", "-l", "app=velox"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| pod["spec"]["containers"][0]["image"].clone())
        .collect();
    assert_eq!(images, ["localhost/velox:rollout", "localhost/velox:rollout"]);

    // The client's node's loader pod deleted: the datapath goes on (policy too), the
    // DaemonSet brings it back.
    let deleted = loaders(&cluster)["node1"].clone();
    cluster
        .kubectl(&["-n", "kube-system", "delete", "pod", &deleted, "--wait=false"])
        .unwrap();
    for (name, ip, _) in &webs {
        assert_eq!(
            get_from_pod(&cluster, "client", ip, 8080).as_deref(),
            Some(name.as_str())
        );
        assert!(get_from_pod(&cluster, "hostport", ip, 8080).is_none(), "still denied");
    }
    // Graceful deletion, a new pod, its programs verified and its first passes: a
    // minute or two on a loaded 2-core machine.
    assert!(
        wait_for(Duration::from_secs(180), || ready(
            &cluster,
            "app=velox",
            "kube-system",
            2
        ) && !loaders(&cluster)
            .values()
            .any(|pod| *pod == deleted)),
        "{}",
        loaders_report(&cluster)
    );
    assert!(a_web(get_from_pod(&cluster, "client", &cluster_ip, 80)));
    println!("{}", table(&cluster));
    cluster.down().unwrap();
}
