//! Velox on a real Kubernetes cluster (test-env's `real_cluster`: API server,
//! controller manager, scheduler, a kubelet on containerd), installed as the README
//! says: the image imported, the API server's address in a ConfigMap, the manifest
//! applied. Then what users rely on, with objects created by kubectl: pod addresses
//! from the node's podCIDR, pod to pod, a Service by ClusterIP and NodePort, a
//! hostPort, NetworkPolicy, and the loader's pod deleted under traffic.
//! Needs root, `cargo xtask setup` (the Kubernetes binaries) and `cargo xtask image`;
//! `cargo xtask test` does all three.
#![cfg(feature = "privileged")]

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use velox_test_env::real_cluster::{RealCluster, CLUSTER_CIDR, NODE_IP, ROUTER_IP};
use velox_test_env::wait_for;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

/// What `GET /` on `host port` answers from pod `client` (busybox nc), if anything.
fn get_from_pod(cluster: &RealCluster, client: &str, host: &str, port: u16) -> Option<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 2 {host} {port}");
    let answer = cluster
        .kubectl(&["exec", client, "--", "/bin/busybox", "sh", "-c", &script])
        .ok()?;
    answer.lines().last().map(str::to_string).filter(|l| !l.is_empty())
}

/// `kubectl get <what> -o json`.
fn get(cluster: &RealCluster, args: &[&str]) -> Value {
    let json = cluster.kubectl(&[args, &["-o", "json"]].concat()).unwrap();
    serde_json::from_str(&json).unwrap()
}

fn ready(cluster: &RealCluster, selector: &str, namespace: &str, count: usize) -> bool {
    let pods = get(cluster, &["get", "pods", "-n", namespace, "-l", selector]);
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    items.len() == count
        && items.iter().all(|pod| {
            pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

#[test]
fn velox_installed_with_kubectl_serves_pods_services_host_ports_and_policy_on_a_real_kubelet() {
    let mut cluster = RealCluster::up("rk").unwrap();
    // The README's installation, step by step.
    cluster.import_image(Path::new(&repo("target/velox-image.tar"))).unwrap();
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
    let node_ready = |cluster: &RealCluster| {
        let node = get(cluster, &["get", "node", "node1"]);
        node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    assert!(
        wait_for(Duration::from_secs(90), || node_ready(&cluster) && ready(&cluster, "app=velox", "kube-system", 1)),
        "{}",
        cluster.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"]).unwrap_or_default()
    );
    let node = get(&cluster, &["get", "node", "node1"]);
    let network = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned();
    assert_eq!(network.as_ref().map(|c| &c["status"]), Some(&Value::from("False")), "{node}");
    let pod_cidr: ipnet::IpNet = node["spec"]["podCIDR"].as_str().unwrap().parse().unwrap();
    assert!(CLUSTER_CIDR.parse::<ipnet::IpNet>().unwrap().contains(&pod_cidr));

    // The workload: two web pods behind a NodePort Service, a hostPort pod, a client.
    cluster.kubectl(&["apply", "-f", &repo("test-env/kubernetes/web.yaml")]).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || ready(&cluster, "app=web", "default", 2)
            && ready(&cluster, "app in (client, hostport)", "default", 2)),
        "{}",
        cluster.kubectl(&["get", "pods", "-A", "-o", "wide"]).unwrap_or_default()
    );
    println!("{}", cluster.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"]).unwrap());

    // Addresses from the node's podCIDR, the ones the loader's maps hold.
    let pods = get(&cluster, &["get", "pods", "-n", "default"]);
    let endpoints = cluster
        .kubectl(&["-n", "kube-system", "exec", "ds/velox", "--", "velox-loader", "endpoints", "--json"])
        .unwrap();
    let endpoints: Vec<Value> = serde_json::from_str(&endpoints).unwrap();
    let webs: Vec<(String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| {
            let name = pod["metadata"]["name"].as_str().unwrap().to_string();
            let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
            assert!(pod_cidr.contains(&ip.parse::<std::net::IpAddr>().unwrap()), "{name} {ip}");
            assert!(
                endpoints
                    .iter()
                    .any(|e| e["ip"] == ip.as_str() && e["pod"] == format!("default/{name}").as_str()),
                "{name} {ip} is not in the endpoint maps: {endpoints:?}"
            );
            (name, ip)
        })
        .filter(|(name, _)| name.starts_with("web-"))
        .collect();
    let web_names: Vec<&str> = webs.iter().map(|(name, _)| name.as_str()).collect();

    // Pod to pod, the Service by ClusterIP and by NodePort, the hostPort.
    let service = get(&cluster, &["get", "service", "web"]);
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    for (name, ip) in &webs {
        assert_eq!(get_from_pod(&cluster, "client", ip, 8080).as_deref(), Some(name.as_str()));
    }
    for (host, port) in [(cluster_ip.as_str(), 80), (NODE_IP, 30080)] {
        let answer = get_from_pod(&cluster, "client", host, port);
        assert!(
            answer.as_deref().is_some_and(|a| web_names.contains(&a)),
            "{host}:{port} answered {answer:?}"
        );
    }
    assert_eq!(get_from_pod(&cluster, "client", NODE_IP, 18080).as_deref(), Some("hostport"));
    let from_outside = velox_test_env::netns::run_in_netns(
        &cluster.router,
        "bash",
        &["-c", &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 busybox nc -w 2 {NODE_IP} 18080")],
    )
    .unwrap();
    assert_eq!(from_outside.lines().last(), Some("hostport"), "the hostPort from outside the node");

    // NetworkPolicy with kubectl: the web pods admit only the client, on 8080.
    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                              "ports": [{"port": 8080}]}]},
    });
    let policy_file = cluster.dir.join("policy.json");
    std::fs::write(&policy_file, policy.to_string()).unwrap();
    cluster.kubectl(&["apply", "-f", policy_file.to_str().unwrap()]).unwrap();
    let (web, web_ip) = &webs[0];
    assert!(
        wait_for(Duration::from_secs(10), || get_from_pod(&cluster, "hostport", web_ip, 8080).is_none()),
        "the policy denies the hostport pod"
    );
    assert_eq!(get_from_pod(&cluster, "client", web_ip, 8080).as_deref(), Some(web.as_str()));

    // The loader's pod deleted: the datapath goes on, the DaemonSet brings it back.
    cluster
        .kubectl(&["-n", "kube-system", "delete", "pod", "-l", "app=velox", "--wait=false"])
        .unwrap();
    assert_eq!(get_from_pod(&cluster, "client", web_ip, 8080).as_deref(), Some(web.as_str()));
    assert!(get_from_pod(&cluster, "hostport", web_ip, 8080).is_none(), "still denied");
    assert!(wait_for(Duration::from_secs(60), || ready(
        &cluster,
        "app=velox",
        "kube-system",
        1
    )));
    assert_eq!(get_from_pod(&cluster, "client", &cluster_ip, 80).map(|a| web_names.contains(&a.as_str())), Some(true));
    println!("{}", cluster.kubectl(&["get", "nodes,pods", "-A", "-o", "wide"]).unwrap());
    cluster.down().unwrap();
}
