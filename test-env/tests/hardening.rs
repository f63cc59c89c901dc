//! What must hold when things go wrong on a node: broken state files, pods whose DEL
//! never comes, a second loader, plugins killed halfway, ADDs that race each other.
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::Duration;
use velox_test_env::{run, wait_for, Family, NodeGuard, Pod};

fn record_path(node: &NodeGuard, pod: &Pod) -> PathBuf {
    let host_ifname = velox_node::endpoint::host_ifname(&velox_node::endpoint::Attachment {
        container_id: pod.name.clone(),
        ifname: "eth0".into(),
    });
    node.state_dir.join("endpoints").join(format!("{host_ifname}.json"))
}

fn veth_count(node: &NodeGuard) -> usize {
    run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"])
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_corrupt_record_stops_neither_the_loader_nor_gc_nor_del() {
    let node = NodeGuard::up("corrupt").unwrap();
    let broken = node.add_pod("broken").unwrap();
    let fine = node.add_pod("fine").unwrap();
    let record = record_path(&node, &broken);
    let full = std::fs::read(&record).unwrap();
    std::fs::write(&record, &full[..full.len() / 2]).unwrap();
    // A record of a pod that vanished long ago, unreadable too.
    let orphan = node.state_dir.join("endpoints/vlx0000000dead.json");
    std::fs::write(&orphan, b"\0\0\0").unwrap();

    node.stop_loader(Signal::SIGTERM).unwrap();
    node.start_loader().expect("the loader starts despite unreadable records");
    assert!(
        wait_for(Duration::from_secs(5), || !orphan.exists()),
        "the orphan's unreadable record is removed"
    );
    assert!(record.exists(), "the record of a live pod stays for its DEL");
    for family in Family::ALL {
        assert!(fine.ping(broken.ip(family), 1), "{family:?}: the broken pod still gets traffic");
    }

    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = serde_json::json!([
        {"containerID": broken.name, "ifname": "eth0"},
        {"containerID": fine.name, "ifname": "eth0"},
    ]);
    let outcome = node.cni("GC", "", None, "", &gc).unwrap();
    assert!(outcome.success, "GC: {}", outcome.stdout);

    node.delete_pod(&broken.name).expect("DEL of the pod with the corrupt record");
    assert!(!record.exists(), "DEL removes the corrupt record");
    for family in Family::ALL {
        assert!(node.endpoint(broken.ip(family)).is_err(), "{family:?}: map entry left");
        assert!(node.endpoint(fine.ip(family)).is_ok(), "{family:?}: the other pod lost its entry");
    }
    assert_eq!(node.reserved_addresses(), 2, "only the fine pod's addresses stay");
    assert_eq!(veth_count(&node), 1);
    node.finish().unwrap();
}

#[test]
fn a_pod_whose_del_never_comes_is_reaped_once_its_netns_is_gone() {
    let node = NodeGuard::up("reap").unwrap();
    let gone = node.add_pod("gone").unwrap();
    let stays = node.add_pod("stays").unwrap();
    // What a runtime that speaks 1.0.0 (no GC) leaves behind when it loses a DEL.
    run("ip", &["netns", "del", &gone.name]).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || node.pods().unwrap().len() == 1),
        "the record of the vanished pod is reaped"
    );
    assert_eq!(node.pods().unwrap()[0].name, stays.name);
    assert_eq!(node.reserved_addresses(), 2, "the vanished pod's addresses are free again");
    for family in Family::ALL {
        assert!(node.endpoint(gone.ip(family)).is_err(), "{family:?}: map entry left");
    }
    assert!(
        std::fs::read_dir(node.bpffs_root.join("links/tc-ingress")).unwrap().count() == 1,
        "the vanished pod's link pin is removed"
    );
    // A pod whose veth is gone but whose netns still exists is not reaped: its DEL
    // or CHECK still has to see it.
    run("ip", &["-n", &node.name, "link", "del", &record_host_ifname(&stays)]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(node.pods().unwrap().len(), 1);
    node.finish().unwrap();
}

fn record_host_ifname(pod: &Pod) -> String {
    velox_node::endpoint::host_ifname(&velox_node::endpoint::Attachment {
        container_id: pod.name.clone(),
        ifname: "eth0".into(),
    })
}
