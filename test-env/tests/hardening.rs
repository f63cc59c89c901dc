//! What must hold when things go wrong on a node: broken state files, pods whose DEL
//! never comes, a second loader, plugins killed halfway, ADDs that race each other.
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use nix::sys::signal::Signal;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use velox_test_env::cni::{spawn_plugin, Invocation};
use velox_test_env::{netns_path, run, wait_for, Family, NodeGuard, Pod};

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
    node.start_loader()
        .expect("the loader starts despite unreadable records");
    assert!(
        wait_for(Duration::from_secs(5), || !orphan.exists()),
        "the orphan's unreadable record is removed"
    );
    assert!(record.exists(), "the record of a live pod stays for its DEL");
    for family in Family::ALL {
        assert!(
            fine.ping(broken.ip(family), 1),
            "{family:?}: the broken pod still gets traffic"
        );
    }

    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = serde_json::json!([
        {"containerID": broken.name, "ifname": "eth0"},
        {"containerID": fine.name, "ifname": "eth0"},
    ]);
    let outcome = node.cni("GC", "", None, "", &gc).unwrap();
    assert!(outcome.success, "GC: {}", outcome.stdout);

    node.delete_pod(&broken.name)
        .expect("DEL of the pod with the corrupt record");
    assert!(!record.exists(), "DEL removes the corrupt record");
    for family in Family::ALL {
        assert!(node.endpoint(broken.ip(family)).is_err(), "{family:?}: map entry left");
        assert!(
            node.endpoint(fine.ip(family)).is_ok(),
            "{family:?}: the other pod lost its entry"
        );
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
    assert_eq!(
        node.reserved_addresses(),
        2,
        "the vanished pod's addresses are free again"
    );
    for family in Family::ALL {
        assert!(node.endpoint(gone.ip(family)).is_err(), "{family:?}: map entry left");
    }
    // The pass that reaps the record still counts its interface as owned: the pin
    // goes at the next one.
    let link_pins = || {
        std::fs::read_dir(node.bpffs_root.join("links/tc-ingress"))
            .unwrap()
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(5), || link_pins() == 1),
        "the vanished pod's link pin is removed: {} pins",
        link_pins()
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

fn link_pins(node: &NodeGuard) -> usize {
    std::fs::read_dir(node.bpffs_root.join("links/tc-ingress")).map_or(0, |d| d.count())
}

/// The runtime's view after each case: exactly the pods it kept, nothing of the
/// pods whose plugins were killed.
fn assert_only(node: &NodeGuard, kept: &[Pod]) -> Result<(), TestCaseError> {
    prop_assert_eq!(node.pods().unwrap().len(), kept.len(), "records");
    prop_assert_eq!(node.reserved_addresses(), 2 * kept.len(), "reserved addresses");
    prop_assert_eq!(node.endpoints().unwrap().len(), 2 * kept.len(), "endpoint map entries");
    prop_assert_eq!(veth_count(node), kept.len(), "veths");
    prop_assert_eq!(link_pins(node), kept.len(), "link pins");
    prop_assert_eq!(node.counted_pods().unwrap(), (kept.len(), kept.len()), "counters slots");
    Ok(())
}

#[test]
fn plugins_killed_at_random_points_of_add_and_del_leave_nothing_after_del() {
    let node = NodeGuard::up("sigkill").unwrap();
    let conf = node.conf("1.1.0");
    let kept = std::sync::Mutex::new(Vec::<Pod>::new());
    let round = std::cell::Cell::new(0);
    // When the ADD is killed (it takes about 20 ms), and whether and when the DEL
    // that follows is killed too before the runtime's retry.
    let kill_points = (0u64..40_000, prop::option::of(0u64..15_000));
    let config = ProptestConfig {
        cases: 40,
        failure_persistence: None,
        max_shrink_iters: 0,
        ..ProptestConfig::default()
    };
    let outcome = TestRunner::new(config).run(&kill_points, |(add_kill_us, del_kill_us)| {
        round.set(round.get() + 1);
        let n = round.get();
        let victim = node.pod_name(&format!("v{n}"));
        run("ip", &["netns", "add", &victim]).unwrap();
        let netns = netns_path(&victim);
        let keeper = std::thread::scope(|s| {
            // Another pod comes up while the victim's plugin dies.
            let keeper = s.spawn(|| node.add_pod(&format!("k{n}")));
            let kill_after = |command: &str, micros: u64| {
                let velox = &node.bins.velox;
                let call = Invocation::new(command, &victim, Some(&netns), "eth0");
                let mut child = spawn_plugin(&node.name, velox, &call, &conf).unwrap();
                std::thread::sleep(Duration::from_micros(micros));
                let _ = child.kill();
                let _ = child.wait();
            };
            kill_after("ADD", add_kill_us);
            if let Some(micros) = del_kill_us {
                kill_after("DEL", micros);
            }
            keeper.join().unwrap()
        });
        let del = node.cni("DEL", &victim, Some(&netns), "eth0", &conf).unwrap();
        prop_assert!(del.success, "DEL after the kill: {}", del.stdout);
        run("ip", &["netns", "del", &victim]).unwrap();
        let mut kept = kept.lock().unwrap();
        kept.push(keeper.unwrap());
        assert_only(&node, &kept)
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let kept = kept.into_inner().unwrap();
    let addresses: HashSet<_> = kept.iter().flat_map(|p| p.ips.clone()).collect();
    assert_eq!(
        addresses.len(),
        2 * kept.len(),
        "an address was handed to two live pods"
    );
    for family in Family::ALL {
        assert!(kept[0].ping(kept[kept.len() - 1].ip(family), 1), "{family:?}");
    }
    node.finish().unwrap();
}

#[test]
fn duplicate_concurrent_adds_do_not_tear_each_other_down() {
    let node = NodeGuard::up("dupadd").unwrap();
    let other = node.add_pod("other").unwrap();
    let pod = node.pod_name("twice");
    run("ip", &["netns", "add", &pod]).unwrap();
    let netns = netns_path(&pod);
    let conf = node.conf("1.1.0");
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let adds: Vec<_> = (0..4)
            .map(|_| s.spawn(|| node.cni("ADD", &pod, Some(&netns), "eth0", &conf).unwrap()))
            .collect();
        adds.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let succeeded: Vec<_> = outcomes.iter().filter(|o| o.success).collect();
    assert_eq!(succeeded.len(), 1, "{outcomes:?}");
    for refused in outcomes.iter().filter(|o| !o.success) {
        assert_eq!(refused.code(), Some(101), "{}", refused.stdout);
    }
    let winner = Pod::from_result(&pod, &succeeded[0].stdout).unwrap();
    for family in Family::ALL {
        assert!(
            other.ping(winner.ip(family), 1),
            "{family:?}: the first ADD's pod was torn down"
        );
    }
    assert_eq!(node.reserved_addresses(), 4);
    node.finish().unwrap();
}

#[test]
fn a_second_loader_on_the_same_bpffs_root_or_state_dir_refuses_to_start() {
    let node = NodeGuard::up("twoloaders").unwrap();
    // bpffs refuses names with a dot.
    let elsewhere = |dir: &Path| PathBuf::from(format!("{}-other", dir.display()));
    let second = |bpffs_root: &Path, state_dir: &Path| {
        let output = velox_test_env::in_netns(&node.name, node.bins.loader.to_str().unwrap(), &[])
            .args(["--bpffs-root", bpffs_root.to_str().unwrap()])
            .args(["--state-dir", state_dir.to_str().unwrap()])
            .arg("run")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (bpffs_root, state_dir) in [
        (node.bpffs_root.clone(), node.state_dir.clone()),
        (node.bpffs_root.clone(), elsewhere(&node.state_dir)),
        (elsewhere(&node.bpffs_root), node.state_dir.clone()),
    ] {
        let (ok, stderr) = second(&bpffs_root, &state_dir);
        assert!(!ok, "a second loader ran on {bpffs_root:?} {state_dir:?}");
        assert!(stderr.contains("another velox-loader"), "{stderr}");
        for dir in [bpffs_root, state_dir] {
            if dir != node.bpffs_root && dir != node.state_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    assert!(node.status().success, "the first loader still answers");
    node.finish().unwrap();
}

/// The id of the program pinned at `pin` or run by the link pinned at `pin`.
fn pinned_id(kind: &str, pin: &Path, field: &str) -> u64 {
    let shown = run("bpftool", &["-j", kind, "show", "pinned", pin.to_str().unwrap()]).unwrap();
    serde_json::from_str::<serde_json::Value>(&shown).unwrap()[field]
        .as_u64()
        .unwrap()
}

/// True when every pod's link runs the pinned `from_pod`.
fn every_pod_runs_the_pinned_program(node: &NodeGuard) -> bool {
    let bpffs = velox_node::Bpffs::new(&node.bpffs_root);
    let program = pinned_id("prog", &bpffs.program("from_pod"), "id");
    std::fs::read_dir(bpffs.links_dir(velox_node::layout::Hook::TcIngress))
        .unwrap()
        .all(|pin| pinned_id("link", &pin.unwrap().path(), "prog_id") == program)
}

fn dropped(node: &NodeGuard, pod: &Pod) -> u64 {
    node.endpoint(pod.ip(Family::V4)).unwrap()["dropped_packets"]
        .as_u64()
        .unwrap()
}

/// One datagram to the discard port of `to`; true when `from`'s datapath dropped it.
fn discard_is_dropped(node: &NodeGuard, from: &Pod, to: &Pod, family: Family) -> bool {
    let before = dropped(node, from);
    let target = format!("echo x > /dev/udp/{}/9", to.ip(family));
    from.exec("bash", &["-c", &target]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    dropped(node, from) > before
}

#[test]
fn an_upgrade_and_a_downgrade_under_iperf3_move_every_pod_without_a_reset() {
    let node = NodeGuard::up("upgrade").unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    let changed = velox_test_env::upgrade_test_object().unwrap();
    let changed = changed.to_str().unwrap();
    for family in Family::ALL {
        assert!(
            !discard_is_dropped(&node, &a, &b, family),
            "{family:?}: the build under test lets it through"
        );
    }
    // A restart with `flags` while a TCP stream runs between the pods.
    let restart_under_traffic = |flags: &[&str]| {
        std::thread::scope(|s| {
            let stream = s.spawn(|| a.iperf3(&b, Family::V4, 5, 2));
            std::thread::sleep(Duration::from_millis(1500));
            node.restart_loader_with(flags).unwrap();
            stream.join().unwrap()
        })
    };

    let upgraded = restart_under_traffic(&["--ebpf-object", changed]);
    assert!(upgraded.is_ok(), "the stream broke during the upgrade: {upgraded:?}");
    assert!(every_pod_runs_the_pinned_program(&node), "a pod kept the old program");
    for family in Family::ALL {
        assert!(
            discard_is_dropped(&node, &a, &b, family),
            "{family:?}: an old pod missed the new datapath"
        );
    }
    let c = node.add_pod("c").unwrap();
    assert!(
        discard_is_dropped(&node, &c, &a, Family::V4),
        "a new pod gets the new datapath"
    );

    let downgraded = restart_under_traffic(&[]);
    assert!(
        downgraded.is_ok(),
        "the stream broke during the downgrade: {downgraded:?}"
    );
    assert!(every_pod_runs_the_pinned_program(&node));
    for pod in [&a, &c] {
        assert!(
            !discard_is_dropped(&node, pod, &b, Family::V4),
            "{} kept the changed datapath",
            pod.name
        );
    }
    // The log tells a changed build from the same one loaded again.
    node.restart_loader_with(&[]).unwrap();
    let log = std::fs::read_to_string(node.state_dir.join("loader.log")).unwrap();
    let said = |what: &str| log.lines().filter(|line| line.contains(what)).count();
    assert_eq!(said("link(s) to this build's changed programs"), 2, "{log}");
    assert!(said("re-attached ") >= 1, "{log}");
    node.finish().unwrap();
}

#[test]
fn maps_of_another_layout_are_replaced_and_every_pod_moves_over() {
    let node = NodeGuard::up("migrate").unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    // Without forwarding only the eBPF fast path carries pod-to-pod traffic.
    node.disable_ip_forwarding().unwrap();
    node.stop_loader(Signal::SIGTERM).unwrap();
    let bpffs = velox_node::Bpffs::new(&node.bpffs_root);
    // The running programs' maps become another layout's, emptied...
    let mut maps = velox_node::maps::EndpointMaps::open(&bpffs).unwrap();
    for (ip, _) in maps.entries().unwrap() {
        maps.remove(ip).unwrap();
    }
    drop(maps);
    std::fs::rename(bpffs.maps_dir(), bpffs.all_maps_dir().join("0ther1ay0ut0")).unwrap();
    // ...and the IPv4-only release's flat pin (4-byte keys) lies beside them.
    let flat = bpffs.all_maps_dir().join("VELOX_ENDPOINTS");
    let flat_pin = flat.to_str().unwrap();
    run(
        "bpftool",
        &[
            "map",
            "create",
            flat_pin,
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "16",
            "name",
            "VELOX_ENDPOINTS",
        ],
    )
    .unwrap();
    assert!(
        !a.ping(b.ip(Family::V4), 1),
        "the emptied maps must break the fast path"
    );

    node.start_loader().unwrap();
    for family in Family::ALL {
        assert!(
            a.ping(b.ip(family), 2),
            "{family:?}: pods did not move to the refilled maps"
        );
    }
    assert!(every_pod_runs_the_pinned_program(&node));
    let layouts: Vec<_> = std::fs::read_dir(bpffs.all_maps_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(layouts, [bpffs.maps_dir()], "other layouts are removed");
    node.finish().unwrap();
}

#[test]
fn a_pod_whose_interface_vanished_leaves_the_endpoint_map_at_once() {
    let node = NodeGuard::up("vanished").unwrap();
    // The periodic pass would find the vanished pod only an hour from now: what
    // removes its entries is the kernel's announcement of the deleted veth.
    node.restart_loader_with(&["--reconcile-interval", "3600"]).unwrap();
    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    let host_veth = record_host_ifname(&b);
    run("ip", &["netns", "del", &b.name]).unwrap();
    // The kernel takes the netns, and the veth pair with it, down a moment later.
    let veth_gone = || run("ip", &["-n", &node.name, "link", "show", &host_veth]).is_err();
    assert!(
        wait_for(Duration::from_secs(5), veth_gone),
        "b's veth outlived its netns"
    );
    for family in Family::ALL {
        assert!(
            wait_for(Duration::from_secs(2), || node.endpoint(b.ip(family)).is_err()),
            "b's {family:?} address still names its vanished veth: {:?}",
            node.endpoints()
        );
    }
    // Nothing is redirected towards the vanished interface any more.
    let counters = || node.endpoint(a.ip(Family::V4)).unwrap();
    let before = counters();
    for family in Family::ALL {
        assert!(!a.ping(b.ip(family), 2), "{family:?}");
    }
    let after = counters();
    let redirected = |c: &serde_json::Value| c["redirected_packets"].as_u64().unwrap();
    assert_eq!(redirected(&after), redirected(&before), "{after}");
    assert_eq!(node.pods().unwrap().len(), 2, "the record waits for the periodic pass");
    node.finish().unwrap();
}

#[test]
fn only_an_object_with_this_builds_map_layout_is_loaded() {
    let built =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf/bpfel-unknown-none/release/velox-ebpf");
    for object in [built, velox_test_env::upgrade_test_object().unwrap()] {
        let bytes = std::fs::read(&object).unwrap();
        velox_node::maps::check_object_layout(&bytes).unwrap_or_else(|e| panic!("{}: {e}", object.display()));
    }
    // Anything else is refused before a map is pinned or a link moves.
    let node = NodeGuard::up("badobject").unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    node.stop_loader(Signal::SIGTERM).unwrap();
    let err = node.start_loader_with(&["--ebpf-object", "/bin/true"]).unwrap_err();
    let log = std::fs::read_to_string(node.state_dir.join("loader.log")).unwrap();
    assert!(log.contains("parsing the eBPF object"), "{err:#}\n{log}");
    assert!(every_pod_runs_the_pinned_program(&node));
    assert!(a.ping(b.ip(Family::V4), 1));
    node.start_loader().unwrap();
    node.finish().unwrap();
}

#[test]
fn counters_have_a_slot_per_pod_up_to_max_pods_and_a_full_node_refuses_cleanly() {
    let node = NodeGuard::up("maxpods").unwrap();
    node.restart_loader_with(&["--max-pods", "2"]).unwrap();
    let counters = velox_node::Bpffs::new(&node.bpffs_root).map(velox_common::COUNTERS_MAP);
    let shown = run("bpftool", &["-j", "map", "show", "pinned", counters.to_str().unwrap()]).unwrap();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["max_entries"], 3, "the uplink's slot and one per pod: {shown}");

    let (a, b) = (node.add_pod("a").unwrap(), node.add_pod("b").unwrap());
    assert!(a.ping(b.ip(Family::V4), 3));
    let sent = |pod: &Pod| {
        node.endpoint(pod.ip(Family::V4)).unwrap()["redirected_packets"]
            .as_u64()
            .unwrap()
    };
    assert!(sent(&a) >= 3, "a's echo requests are a's: {}", sent(&a));

    // A third pod is refused with its own code, and leaves nothing behind.
    let c = node.pod_name("c");
    run("ip", &["netns", "add", &c]).unwrap();
    let netns = netns_path(&c);
    let outcome = node.cni("ADD", &c, Some(&netns), "eth0", &node.conf("1.1.0")).unwrap();
    assert!(!outcome.success);
    assert_eq!(outcome.stdout["code"], 104, "{}", outcome.stdout);
    assert!(
        outcome.stdout["msg"].as_str().unwrap().contains("--max-pods"),
        "{}",
        outcome.stdout
    );
    assert_eq!(node.pods().unwrap().len(), 2);
    assert_eq!(node.reserved_addresses(), 4);
    assert_eq!(veth_count(&node), 2);
    assert_eq!(node.counted_pods().unwrap(), (2, 2));

    // The slot a departed pod frees is the next pod's, counting from zero.
    node.delete_pod(&a.name).unwrap();
    let outcome = node.cni("ADD", &c, Some(&netns), "eth0", &node.conf("1.1.0")).unwrap();
    assert!(outcome.success, "{}", outcome.stdout);
    let c = Pod::from_result(&c, &outcome.stdout).unwrap();
    assert_eq!(sent(&c), 0, "counters of the slot's last pod were reset");
    assert!(c.ping(b.ip(Family::V4), 2));
    assert!(sent(&c) >= 2);
    node.finish().unwrap();
}

/// A loader in a pod (in-cluster API config) whose bpffs does not propagate to the
/// host (a private mount, as a DaemonSet without Bidirectional propagation gets)
/// refuses to start and says why: its pins would die with the container.
#[test]
fn a_loader_in_a_pod_refuses_a_bpffs_whose_pins_would_die_with_it() {
    let bins = velox_test_env::Binaries::locate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mount = tempfile::tempdir().unwrap();
    run("mount", &["-t", "bpf", "bpf", mount.path().to_str().unwrap()]).unwrap();
    run("mount", &["--make-private", mount.path().to_str().unwrap()]).unwrap();
    let root = mount.path().join("velox");
    let out = std::process::Command::new(&bins.loader)
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .arg("--bpffs-root")
        .arg(&root)
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "--kubernetes", "--node-name", "n1"])
        .output()
        .unwrap();
    run("umount", &[mount.path().to_str().unwrap()]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not on a shared mount: pins would not outlive this container"),
        "{stderr}"
    );
}
