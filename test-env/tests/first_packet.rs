//! NetworkPolicy from a pod's first packet: a pod that policies existing before it
//! select is isolated from its very first packet, in both directions, with the
//! loader running, restarting or without its Pod object; an allowed connection works
//! as soon as ADD returns; a node that does not enforce policy starts pods open.
//!
//! Pods here are Kubernetes pods: ADD gets their names in CNI_ARGS, as kubelet
//! passes them, and their Pod objects are in the cluster state before their ADD, as
//! the API server has them when kubelet runs it (scheduled, without addresses).
#![cfg(feature = "privileged")]

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use velox_test_env::cluster_state::write_objects;
use velox_test_env::netns::{create_pod_netns, spawn_in};
use velox_test_env::netpol::{namespace_object, policy, scheduled_pod_object, PortServer, PORTS};
use velox_test_env::{wait_for, ClusterGuard, Family, Node, Pod};

/// The namespace of the new pods, whose policy exists before them.
const NAMESPACE: &str = "fp";
/// The port the peers serve TCP and UDP on.
const PORT: u16 = PORTS[0];

/// The cluster's peers of the new pods, serving: `pod-1` (the one the policy lets
/// them reach), `pod-4` beside them and `pod-2` on the other node (both denied).
struct Peers {
    allowed: Vec<SocketAddr>,
    denied: Vec<SocketAddr>,
    _servers: Vec<PortServer>,
}

impl Peers {
    fn serve(cluster: &ClusterGuard) -> Self {
        let probe = &cluster.nodes[0].bins.probe;
        let (allowed, near, far) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-2"));
        let servers = [&allowed, &near, &far]
            .map(|pod| PortServer::start(pod, probe).unwrap())
            .into();
        let addresses = |pods: &[&Pod]| -> Vec<SocketAddr> {
            pods.iter()
                .flat_map(|pod| Family::ALL.map(|family| SocketAddr::new(pod.ip(family), PORT)))
                .collect()
        };
        Self {
            allowed: addresses(&[&allowed]),
            denied: addresses(&[&near, &far]),
            _servers: servers,
        }
    }

    /// The namespace and its policy: every pod of it isolated both ways, egress to
    /// `pod-1`'s addresses only.
    fn write_policy(&self, cluster: &ClusterGuard) {
        let blocks: Vec<Value> = self
            .allowed
            .iter()
            .map(|to| json!({"ipBlock": {"cidr": ipnet::IpNet::from(to.ip()).to_string()}}))
            .collect();
        let only_to_pod_1 = policy(
            NAMESPACE,
            "only-to-pod-1",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "egress": [{"to": blocks}]}),
        );
        write_state(cluster, "fp-policies.json", vec![only_to_pod_1]);
        let namespaces = [NAMESPACE, "default"].map(|name| namespace_object(name, &Default::default()));
        write_state(cluster, "fp-namespaces.json", namespaces.into());
    }
}

fn write_state(cluster: &ClusterGuard, file: &str, objects: Vec<Value>) {
    write_objects(&cluster.cluster_state.join(file), objects).unwrap();
}

/// The Pod object of `name` in the namespace, as kubelet finds it at ADD.
fn scheduled(node: &Node, name: &str) -> Value {
    let labels = [("app".to_string(), "new".to_string())].into();
    scheduled_pod_object(NAMESPACE, name, &labels, &node.name)
}

/// What a prober saw: packets that left the pod (it had its address and route),
/// and answers from the denied peers.
#[derive(Debug, Default)]
struct Probed {
    sent: usize,
    answered: usize,
}

/// Probes started in a pod's netns before its ADD, as a process of the pod that
/// runs from its first instruction would: UDP datagrams (each peer echoes them) and
/// TCP connections to every target, over and over, until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Prober {
    fn start(netns: &str, targets: &[SocketAddr]) -> Self {
        let (stop, sent, answered) = Default::default();
        let mut prober = Self {
            stop,
            sent,
            answered,
            threads: Vec::new(),
        };
        let udp = prober.counting(targets, |target, counts| {
            let any: SocketAddr = match target.ip() {
                IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                IpAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(Duration::from_millis(1)))?;
            let sent = socket.send_to(b"first", target).is_ok();
            let answered = socket.recv(&mut [0u8; 16]).is_ok();
            counts(sent, answered);
            Ok(())
        });
        let tcp = prober.counting(targets, |target, counts| {
            match TcpStream::connect_timeout(target, Duration::from_millis(30)) {
                Ok(mut stream) => counts(true, stream.read(&mut [0u8; 1]).is_ok_and(|n| n == 1)),
                // A connection that timed out sent its SYN; one without a route did not.
                Err(e) => counts(e.kind() != std::io::ErrorKind::NetworkUnreachable, false),
            }
            Ok(())
        });
        prober.threads = vec![spawn_in(netns, udp), spawn_in(netns, tcp)];
        prober
    }

    /// A loop over `targets` until stopped, each round's packets counted; it pauses
    /// while the pod has no route yet, so it does not spin.
    fn counting(
        &self,
        targets: &[SocketAddr],
        probe: impl Fn(&SocketAddr, &mut dyn FnMut(bool, bool)) -> std::io::Result<()> + Send + 'static,
    ) -> impl FnOnce() -> anyhow::Result<()> + Send + 'static {
        let (stop, sent, answered) = (self.stop.clone(), self.sent.clone(), self.answered.clone());
        let targets = targets.to_vec();
        move || {
            while !stop.load(Ordering::Relaxed) {
                let mut left = false;
                for target in &targets {
                    probe(target, &mut |was_sent, was_answered| {
                        left |= was_sent;
                        sent.fetch_add(usize::from(was_sent), Ordering::Relaxed);
                        answered.fetch_add(usize::from(was_answered), Ordering::Relaxed);
                    })?;
                }
                if !left {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(())
        }
    }

    fn stop(mut self) -> Probed {
        self.stop.store(true, Ordering::Relaxed);
        for thread in std::mem::take(&mut self.threads) {
            thread.join().expect("a prober panicked").unwrap();
        }
        Probed {
            sent: self.sent.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
        }
    }
}

/// Stops the probes also when a test fails halfway.
impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether `target` answers a TCP connection (its server's byte) from `netns`.
fn connects(netns: &str, target: SocketAddr, timeout: Duration) -> bool {
    spawn_in(netns, move || {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(stream.read(&mut [0u8; 1])? == 1)
    })
    .join()
    .is_ok_and(|answered| answered.unwrap_or(false))
}

/// How long after `since` every one of `targets` answered from `netns`, tried with
/// short timeouts (a dropped SYN would wait a second for its retry); `None` if one
/// did not within `limit`.
fn all_connect_within(netns: &str, targets: &[SocketAddr], since: Instant, limit: Duration) -> Option<Duration> {
    for target in targets {
        while !connects(netns, *target, Duration::from_millis(100)) {
            if since.elapsed() > limit {
                return None;
            }
        }
    }
    Some(since.elapsed())
}

/// 200 pods, one after another, in a namespace whose deny policy exists first, each
/// probing two denied peers (one on its node, one on the other) in both families from
/// before its ADD until its allowed peer answers: not one answer. 50 of them come
/// while the loader is killed or stopped and started again, over and over. The
/// others reach their allowed peer within a second of ADD returning (p99).
#[test]
fn two_hundred_new_pods_are_isolated_from_their_first_packet_across_loader_restarts() {
    const PODS: usize = 200;
    const ACROSS_RESTARTS: std::ops::Range<usize> = 100..150;
    let cluster = ClusterGuard::up("fp").unwrap();
    let node = &cluster.nodes[0];
    let peers = Peers::serve(&cluster);
    peers.write_policy(&cluster);
    let mut objects = Vec::new();
    let mut allowed_after = Vec::new();
    let mut leaks = Vec::new();
    let restarting = AtomicBool::new(false);
    let restarts = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        /// Ends the restarts also when an assertion fails, so the scope can end.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&restarting);
        let mut restarter = None;
        for i in 0..PODS {
            if i == ACROSS_RESTARTS.start {
                restarting.store(true, Ordering::Relaxed);
                restarter = Some(scope.spawn(|| {
                    while restarting.load(Ordering::Relaxed) {
                        let signal = match restarts.fetch_add(1, Ordering::Relaxed) % 2 {
                            0 => Signal::SIGKILL,
                            _ => Signal::SIGTERM,
                        };
                        node.stop_loader(signal).unwrap();
                        std::thread::sleep(Duration::from_millis(300));
                        node.start_loader().unwrap();
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }));
            }
            if i == ACROSS_RESTARTS.end {
                // The pods after these meet a loader that runs.
                restarting.store(false, Ordering::Relaxed);
                restarter.take().expect("started").join().unwrap();
            }
            let name = format!("p{i}");
            let netns = cluster.pod_name(0, &format!("fp{i}"));
            objects.push(scheduled(node, &name));
            write_state(&cluster, "fp-pods.json", objects.clone());
            create_pod_netns(&netns).unwrap();
            let prober = Prober::start(&netns, &peers.denied);
            node.add_kubernetes_pod(&netns, NAMESPACE, &name).unwrap();
            let returned = Instant::now();
            // Across a restart the loader may be away for seconds: the pod waits
            // denied for it, and the probes go on until it is back.
            let limit = match ACROSS_RESTARTS.contains(&i) {
                true => Duration::from_secs(15),
                false => Duration::from_secs(5),
            };
            let allowed = all_connect_within(&netns, &peers.allowed, returned, limit);
            // One loader tick more: a pod left open would have been found out.
            std::thread::sleep(Duration::from_millis(250));
            let probed = prober.stop();
            assert!(probed.sent > 0, "{name}: no probe left the pod after its ADD");
            if probed.answered > 0 {
                leaks.push(format!("{name}: {probed:?}"));
            }
            let allowed = allowed.unwrap_or_else(|| panic!("{name} never reached pod-1"));
            if !ACROSS_RESTARTS.contains(&i) {
                allowed_after.push(allowed);
            }
            node.delete_pod(&netns).unwrap();
        }
    });
    assert!(
        restarts.load(Ordering::Relaxed) >= 2,
        "the loader restarted during the 50"
    );
    assert!(leaks.is_empty(), "denied peers answered new pods: {leaks:?}");
    allowed_after.sort();
    let p99 = allowed_after[allowed_after.len() * 99 / 100];
    eprintln!(
        "allowed connection after ADD returned: p50 {:?}, p99 {p99:?}, max {:?}",
        allowed_after[allowed_after.len() / 2],
        allowed_after.last().unwrap()
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    drop(peers);
    cluster.finish().unwrap();
}

/// A pod whose Pod object the source has not shown denies everything, ADD returns
/// within its bound, health and the metrics name the pod; once its Pod object is
/// there, it gets its rules.
#[test]
fn a_named_pod_without_its_pod_object_stays_denied_and_health_says_so() {
    const METRICS: &str = "127.0.0.1:9981";
    let cluster = ClusterGuard::up("fpwait").unwrap();
    let node = &cluster.nodes[0];
    node.restart_loader_with(&["--metrics-address", METRICS]).unwrap();
    let peers = Peers::serve(&cluster);
    peers.write_policy(&cluster);
    let netns = cluster.pod_name(0, "ghost");
    create_pod_netns(&netns).unwrap();
    let prober = Prober::start(&netns, &peers.denied);
    let (_, took) = node.add_kubernetes_pod(&netns, NAMESPACE, "ghost").unwrap();
    assert!(took < Duration::from_secs(4), "ADD took {took:?}");
    for target in &peers.allowed {
        assert!(
            !connects(&netns, *target, Duration::from_millis(500)),
            "{target}: nothing gets out before the pod's labels are known"
        );
    }
    let health = node.health().unwrap();
    assert_eq!(health["policy"]["waiting_for_pod_object"], 1, "{health}");
    assert_eq!(health["policy"]["waiting"], json!(["fp/ghost"]), "{health}");
    let gauge = |value: f64| {
        node.metrics(METRICS)
            .unwrap()
            .iter()
            .any(|(name, v)| name == "velox_policy_pods_waiting_for_pod_object" && *v == value)
    };
    assert!(gauge(1.0), "the metric counts it");

    write_state(&cluster, "fp-pods.json", vec![scheduled(node, "ghost")]);
    let since = Instant::now();
    assert!(
        all_connect_within(&netns, &peers.allowed, since, Duration::from_secs(5)).is_some(),
        "the pod's rules once its Pod object is known"
    );
    assert!(wait_for(Duration::from_secs(2), || gauge(0.0)));
    assert!(node.health().unwrap()["policy"]["waiting_for_pod_object"] == 0);
    let probed = prober.stop();
    assert!(probed.sent > 0, "{probed:?}");
    assert_eq!(probed.answered, 0, "a denied peer answered: {probed:?}");
    drop(peers);
    cluster.finish().unwrap();
}

/// A pod no policy selects (another namespace) starts denied like every named pod,
/// and is open as soon as the loader has its Pod object: within a second of ADD.
/// Found on a real kubelet: with no policy selecting it, no pass ever looked at the
/// pod's slot, and it stayed denied for good.
#[test]
fn a_pod_no_policy_selects_is_open_within_a_second_of_add() {
    let cluster = ClusterGuard::up("fpopen").unwrap();
    let node = &cluster.nodes[0];
    let peers = Peers::serve(&cluster);
    peers.write_policy(&cluster);
    let labels = [("app".to_string(), "new".to_string())].into();
    write_state(
        &cluster,
        "open-pods.json",
        vec![
            namespace_object("open", &Default::default()),
            scheduled_pod_object("open", "free", &labels, &node.name),
        ],
    );
    let netns = cluster.pod_name(0, "free");
    create_pod_netns(&netns).unwrap();
    let (_, took) = node.add_kubernetes_pod(&netns, "open", "free").unwrap();
    let returned = Instant::now();
    let targets: Vec<SocketAddr> = peers.allowed.iter().chain(&peers.denied).copied().collect();
    assert!(
        all_connect_within(&netns, &targets, returned, Duration::from_secs(1)).is_some(),
        "every peer answers within a second of ADD (took {took:?}): {:?}",
        node.health()
    );
    drop(peers);
    cluster.finish().unwrap();
}

/// `--network-policy=false`: no marker, so ADD starts a named pod open and does not
/// wait, whatever policies say.
#[test]
fn a_node_that_does_not_enforce_policy_starts_named_pods_open() {
    let cluster = ClusterGuard::up("fpoff").unwrap();
    let node = &cluster.nodes[0];
    node.restart_loader_with(&["--network-policy=false"]).unwrap();
    let peers = Peers::serve(&cluster);
    peers.write_policy(&cluster);
    write_state(&cluster, "fp-pods.json", vec![scheduled(node, "free")]);
    let netns = cluster.pod_name(0, "free");
    create_pod_netns(&netns).unwrap();
    let (_, took) = node.add_kubernetes_pod(&netns, NAMESPACE, "free").unwrap();
    let returned = Instant::now();
    assert!(
        all_connect_within(&netns, &peers.denied, returned, Duration::from_secs(1)).is_some(),
        "a peer the (unenforced) policy denies answers within a second of ADD (took {took:?})"
    );
    drop(peers);
    cluster.finish().unwrap();
}
