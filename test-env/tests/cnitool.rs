//! Velox driven by cnitool (libcni 1.1.2, built from Debian's source package), alone
//! and chained with the reference portmap, bandwidth and tuning plugins.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use velox_test_env::netns::spawn_in;
use velox_test_env::{cnitool, in_netns, netns_path, run, ClusterGuard, Family, Node, NodeGuard};

/// `cnitool <command> <network> <netns>` inside the node, with `conflist` as the only
/// network config and Velox plus the reference plugins on CNI_PATH.
fn cnitool_run(node: &Node, conf_dir: &Path, command: &str, network: &str, netns: &str, cap_args: &Value) -> Output {
    let velox_dir = node.bins.velox.parent().unwrap().to_str().unwrap().to_string();
    in_netns(
        &node.name,
        cnitool().unwrap().to_str().unwrap(),
        &[command, network, netns_path(netns).to_str().unwrap()],
    )
    .env("NETCONFPATH", conf_dir)
    .env("CNI_PATH", format!("{velox_dir}:/usr/lib/cni"))
    .env("CAP_ARGS", cap_args.to_string())
    .output()
    .unwrap()
}

/// Velox on `node`'s datapath; a network of its own needs a subnet of its own.
fn velox_plugin(node: &Node, subnet: &str) -> Value {
    json!({"type": "velox", "subnet": subnet, "bpffsRoot": node.bpffs_root, "stateDir": node.state_dir})
}

fn write_conflist(dir: &Path, conflist: &Value) {
    std::fs::write(
        dir.join(format!("{}.conflist", conflist["name"].as_str().unwrap())),
        conflist.to_string(),
    )
    .unwrap();
}

fn ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cnitool_add_check_del_with_0_4_0_and_1_0_0() {
    let node = NodeGuard::up("cnitool").unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    for version in ["0.4.0", "1.0.0"] {
        let network = format!("velox-{}", version.replace('.', ""));
        write_conflist(
            conf_dir.path(),
            &json!({"cniVersion": version, "name": network, "plugins": [velox_plugin(&node, "200.200.1.0/24")]}),
        );
        let pod = node.pod_name(&network);
        run("ip", &["netns", "add", &pod]).unwrap();
        let result: Value = serde_json::from_str(&ok(
            &cnitool_run(&node, conf_dir.path(), "add", &network, &pod, &json!({})),
            "add",
        ))
        .unwrap();
        assert_eq!(result["cniVersion"], version);
        let ip: ipnet::IpNet = result["ips"][0]["address"].as_str().unwrap().parse().unwrap();
        assert!(node.endpoint(ip.addr()).is_ok(), "{ip} not in the endpoint map");
        ok(
            &cnitool_run(&node, conf_dir.path(), "check", &network, &pod, &json!({})),
            "check",
        );
        ok(
            &cnitool_run(&node, conf_dir.path(), "del", &network, &pod, &json!({})),
            "del",
        );
        assert!(
            node.endpoint(ip.addr()).is_err(),
            "{ip} still in the endpoint map after del"
        );
        assert!(node.pods().unwrap().is_empty());
    }
    node.finish().unwrap();
}

#[test]
fn chained_with_portmap_bandwidth_and_tuning() {
    let cluster = ClusterGuard::up("chain").unwrap();
    let node = &cluster.nodes[0];
    let conf_dir = tempfile::tempdir().unwrap();
    write_conflist(
        conf_dir.path(),
        &json!({
            "cniVersion": "1.0.0",
            "name": "velox-chain",
            "plugins": [
                velox_plugin(node, "200.200.5.0/24"),
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "bandwidth", "ingressRate": 1_000_000_000u64, "ingressBurst": 100_000_000u64,
                 "egressRate": 1_000_000_000u64, "egressBurst": 100_000_000u64},
                {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_ignore": "1"}},
            ]
        }),
    );
    let pod = cluster.pod_name(0, "chained");
    run("ip", &["netns", "add", &pod]).unwrap();
    let ports = json!({"portMappings": [{"hostPort": 8080, "containerPort": 5201, "protocol": "tcp"}]});
    let result: Value = serde_json::from_str(&ok(
        &cnitool_run(node, conf_dir.path(), "add", "velox-chain", &pod, &ports),
        "add",
    ))
    .unwrap();

    // Velox's result flowed through the chain to the end.
    let ip: ipnet::IpNet = result["ips"][0]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(ip.prefix_len(), 32);
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names.contains(&"eth0") && names.iter().any(|n| n.starts_with("vlx")),
        "{result}"
    );
    // tuning ran in the pod; bandwidth shaped the host veth.
    let arp_ignore = run(
        "ip",
        &["netns", "exec", &pod, "sysctl", "-n", "net.ipv4.conf.eth0.arp_ignore"],
    )
    .unwrap();
    assert_eq!(arp_ignore.trim(), "1");
    let host_veth = names.iter().find(|n| n.starts_with("vlx")).unwrap().to_string();
    let qdisc = run(
        "ip",
        &["netns", "exec", &node.name, "tc", "qdisc", "show", "dev", &host_veth],
    )
    .unwrap();
    assert!(qdisc.contains("tbf"), "no bandwidth limit on {host_veth}: {qdisc}");
    // No CHECK of this chain: Debian's portmap (plugins 1.1.1) fails CHECK on IPv4-only
    // results (containernetworking/plugins#819); Velox's CHECK is tested above.

    // hostPort: node IP:8080 reaches the pod's :5201 from outside the node (the router),
    // from a pod on the other node and from a pod on this one (hairpin). The replies
    // of the pods' connections must go back through the kernel's reverse NAT.
    let server_ip = ip.addr();
    let clients = [
        cluster.router.clone(),
        cluster.pod("pod-2").name,
        cluster.pod("pod-1").name,
    ];
    let server = spawn_in(&pod, move || {
        let listener = TcpListener::bind(SocketAddr::new(server_ip, 5201))?;
        for _ in 0..3 {
            let (mut stream, _) = listener.accept()?;
            stream.write_all(b"hello from the pod")?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let node_ip = cluster.node_ip(0, Family::V4);
    for client in clients {
        let reply = spawn_in(&client, move || {
            let mut stream = TcpStream::connect_timeout(&SocketAddr::new(node_ip, 8080), Duration::from_secs(3))?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .join()
        .unwrap();
        assert_eq!(
            reply.as_deref().ok(),
            Some("hello from the pod"),
            "hostPort from {client}: {reply:?}"
        );
    }
    server.join().unwrap().unwrap();

    // DEL runs the chain in reverse, cleanly, and takes everything with it.
    ok(
        &cnitool_run(node, conf_dir.path(), "del", "velox-chain", &pod, &ports),
        "del",
    );
    assert!(node.endpoint(server_ip).is_err());
    let links = run("ip", &["-n", &node.name, "-o", "link", "show"]).unwrap();
    assert!(!links.contains(&host_veth), "host veth left: {links}");
    assert!(!links.contains("bwp"), "bandwidth's ifb left: {links}");
    let nat = run("ip", &["netns", "exec", &node.name, "iptables", "-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("8080"), "hostPort rule left: {nat}");
    ok(
        &cnitool_run(node, conf_dir.path(), "del", "velox-chain", &pod, &ports),
        "second del",
    );
    cluster.finish().unwrap();
}
