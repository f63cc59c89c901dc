//! podman 4.3 with the CNI backend runs containers on a Velox network. Needs root,
//! `cargo xtask setup` (podman, runc, the toolbox image) and `cargo xtask build`.

use velox_test_env::podman::Podman;
use velox_test_env::{run, NodeGuard};

#[test]
fn podman_containers_talk_and_rm_frees_everything() {
    let node = NodeGuard::up("podman").unwrap();
    let podman = Podman::new(&node).unwrap();
    let a = podman.start("a").unwrap();
    let b = podman.start("b").unwrap();
    assert_ne!(a, b);
    assert!(
        node.endpoint(a.into()).is_ok() && node.endpoint(b.into()).is_ok(),
        "containers missing from the endpoint map"
    );

    let ping = podman
        .exec("a", &["/bin/busybox", "ping", "-c", "3", "-W", "1", &b.to_string()])
        .unwrap();
    assert!(ping.contains("3 packets received"), "{ping}");
    podman.run(&["exec", "-d", "b", "/usr/bin/iperf3", "-s", "-1"]).unwrap();
    let report = (0..20)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let out = podman
                .exec("a", &["/usr/bin/iperf3", "-c", &b.to_string(), "-t", "1", "-J"])
                .ok()?;
            let json: serde_json::Value = serde_json::from_str(&out).ok()?;
            json["end"]["sum_received"]["bits_per_second"].as_f64()
        })
        .expect("iperf3 between podman containers");
    assert!(report > 0.0);

    podman.run(&["rm", "-f", "-t", "0", "a", "b"]).unwrap();
    let log = std::fs::read_to_string(&podman.cni_log).unwrap();
    assert!(!log.contains("ok=false"), "a CNI call failed:\n{log}");
    assert!(node.pods().unwrap().is_empty(), "records left");
    assert!(node.endpoints().unwrap().is_empty(), "map entries left");
    let veths = run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"]).unwrap();
    assert!(veths.trim().is_empty(), "veths left: {veths}");
    let ipam = node.state_dir.join("ipam").join(format!("velox-{}", node.name));
    let reserved = std::fs::read_dir(ipam)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<std::net::IpAddr>().is_ok())
        .count();
    assert_eq!(reserved, 0, "addresses of either family still reserved");
    drop(podman);
    node.finish().unwrap();
}
