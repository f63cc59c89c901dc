//! containerd 1.6's CRI drives Velox: pod sandboxes created and removed through the
//! CRI API, as a kubelet would. Needs root, `cargo xtask setup` (containerd, runc, the
//! pause image, the CRI client) and `cargo xtask build`.

use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use velox_test_env::containerd::{Containerd, Sandbox};
use velox_test_env::{run, NodeGuard};

fn ipam_reservations(node: &NodeGuard) -> usize {
    let dir = node.state_dir.join("ipam").join(format!("velox-{}", node.name));
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<IpAddr>().is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// Everything pods leave behind on the node, and any of `sandboxes`' netns, named.
fn leaks(node: &NodeGuard, sandboxes: &[Sandbox]) -> Vec<String> {
    let mut leaks = Vec::new();
    if ipam_reservations(node) > 0 {
        leaks.push(format!("{} addresses still reserved", ipam_reservations(node)));
    }
    let veths = run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"]).unwrap();
    leaks.extend(veths.lines().map(|l| format!("veth {l}")));
    leaks.extend(
        node.pods()
            .unwrap()
            .into_iter()
            .map(|p| format!("record of {}", p.name)),
    );
    leaks.extend(
        node.endpoints()
            .unwrap()
            .into_iter()
            .map(|e| format!("map entry {}", e["ip"])),
    );
    let links = std::fs::read_dir(node.bpffs_root.join("links/tc-ingress")).unwrap();
    leaks.extend(links.flatten().map(|l| format!("link pin {:?}", l.file_name())));
    leaks.extend(
        sandboxes
            .iter()
            .filter(|s| s.netns.exists())
            .map(|s| format!("netns {}", s.netns.display())),
    );
    leaks
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn cri_pods_talk_and_containerd_may_del_twice() {
    let node = NodeGuard::up("ctd").unwrap();
    let containerd = Containerd::start(&node).unwrap();
    let a = containerd.run_pod("a").unwrap();
    let b = containerd.run_pod("b").unwrap();
    assert_ne!(a.ip, b.ip);
    assert!(node.endpoint(a.ip).is_ok() && node.endpoint(b.ip).is_ok());
    assert!(a.pod().ping(b.ip, 3), "CRI pods cannot ping each other");
    assert!(
        a.pod()
            .iperf3_to(&b.pod(), velox_test_env::Family::of(&b.ip), 1)
            .unwrap()
            > 0.0,
        "no TCP between CRI pods"
    );
    for sandbox in [&a, &b] {
        containerd.stop_pod(&sandbox.id).unwrap();
        containerd.remove_pod(&sandbox.id).unwrap();
    }
    let calls = containerd.cni_calls().unwrap();
    for sandbox in [&a, &b] {
        let dels = calls
            .iter()
            .filter(|(cmd, id, _)| cmd == "Del" && *id == sandbox.id)
            .count();
        assert_eq!(dels, 2, "containerd calls DEL on stop and on remove: {calls:?}");
    }
    let log = std::fs::read_to_string(&containerd.cni_log).unwrap();
    assert!(!log.contains("ok=false"), "a CNI call failed:\n{log}");
    assert_eq!(leaks(&node, &[a, b]), Vec::<String>::new());
    drop(containerd);
    node.finish().unwrap();
}

#[test]
fn churn_of_200_sandboxes_with_a_loader_restart_leaks_nothing() {
    const PODS: usize = 200;
    let node = NodeGuard::up("churn").unwrap();
    let containerd = Containerd::start(&node).unwrap();
    // IP -> (sandbox, stopping): a second live holder of an address is a violation;
    // reuse is fine once the holder is being stopped (its DEL may have freed it).
    let live: Mutex<HashMap<IpAddr, (String, bool)>> = Mutex::default();
    let all = Mutex::new(Vec::new());
    let violations = Mutex::new(Vec::new());
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= PODS {
                    return;
                }
                let sandbox = containerd.run_pod(&format!("churn-{i}")).unwrap();
                all.lock().unwrap().push(sandbox.clone());
                if let Some((other, false)) = live.lock().unwrap().insert(sandbox.ip, (sandbox.id.clone(), false)) {
                    violations
                        .lock()
                        .unwrap()
                        .push(format!("{} given to {} while {other} is live", sandbox.ip, sandbox.id));
                }
                live.lock().unwrap().get_mut(&sandbox.ip).unwrap().1 = true;
                containerd.stop_pod(&sandbox.id).unwrap();
                containerd.remove_pod(&sandbox.id).unwrap();
                let mut live = live.lock().unwrap();
                if live.get(&sandbox.ip).is_some_and(|(id, _)| *id == sandbox.id) {
                    live.remove(&sandbox.ip);
                }
                drop(live);
                if done.fetch_add(1, Ordering::SeqCst) + 1 == PODS / 2 {
                    node.stop_loader(Signal::SIGKILL).unwrap();
                    node.start_loader().unwrap();
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(
        *violations.lock().unwrap(),
        Vec::<String>::new(),
        "two live pods shared an address"
    );

    let calls = containerd.cni_calls().unwrap();
    let mut adds: Vec<f64> = calls
        .iter()
        .filter(|(cmd, ..)| cmd == "Add")
        .map(|(.., ms)| *ms)
        .collect();
    adds.sort_by(f64::total_cmp);
    assert_eq!(adds.len(), PODS);
    assert_eq!(calls.iter().filter(|(cmd, ..)| cmd == "Del").count(), 2 * PODS);
    let log = std::fs::read_to_string(&containerd.cni_log).unwrap();
    assert!(!log.contains("ok=false"), "a CNI call failed");
    println!(
        "churn: {PODS} sandboxes, 8 at a time, loader restarted once, in {wall:.1} s; \
         CNI ADD in velox median {:.1} ms, p99 {:.1} ms",
        percentile(&adds, 50.0),
        percentile(&adds, 99.0)
    );
    let leaks = leaks(&node, &all.lock().unwrap());
    println!("leaks: {}", leaks.len());
    assert_eq!(leaks, Vec::<String>::new());
    drop(containerd);
    node.finish().unwrap();
}

#[test]
fn gc_after_the_runtime_lost_its_state_frees_the_rest() {
    let node = NodeGuard::up("ctdgc").unwrap();
    let mut containerd = Containerd::start(&node).unwrap();
    let sandboxes: Vec<_> = (0..3)
        .map(|i| containerd.run_pod(&format!("gc-{i}")).unwrap())
        .collect();
    containerd.wipe().unwrap();
    // The runtime comes back knowing only the first pod, and garbage-collects the rest.
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = serde_json::json!([{"containerID": sandboxes[0].id, "ifname": "eth0"}]);
    let outcome = node.cni("GC", "", None, "", &conf).unwrap();
    assert!(outcome.success, "GC: {}", outcome.stdout);
    assert!(node.endpoint(sandboxes[0].ip).is_ok(), "GC removed a valid attachment");
    for lost in &sandboxes[1..] {
        assert!(node.endpoint(lost.ip).is_err(), "{} still in the endpoint map", lost.ip);
    }
    let records: Vec<_> = node.pods().unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(records, [sandboxes[0].id.clone()]);
    assert_eq!(ipam_reservations(&node), 2, "the valid pod's IPv4 and IPv6 addresses");
    let veths = run("ip", &["-n", &node.name, "-o", "link", "show", "type", "veth"]).unwrap();
    assert_eq!(veths.lines().count(), 1, "{veths}");
    // What is left is the valid pod's: DEL it, then drop the orphaned netns.
    let netns = &sandboxes[0].netns;
    assert!(
        node.cni("DEL", &sandboxes[0].id, Some(netns), "eth0", &node.conf("1.1.0"))
            .unwrap()
            .success
    );
    for sandbox in &sandboxes {
        let _ = run("ip", &["netns", "del", &sandbox.pod().name]);
    }
    assert_eq!(leaks(&node, &sandboxes), Vec::<String>::new());
    drop(containerd);
    node.finish().unwrap();
}
