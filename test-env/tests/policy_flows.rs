//! What an allowed connection of an isolated pod must get whole, on the two-node
//! cluster, in both families:
//! - a UDP datagram larger than the MTU: its later fragments carry no ports, and
//!   must be judged as the connection they belong to, not as new flows;
//! - ICMP errors about the connection (a port unreachable from its peer, a
//!   fragmentation-needed / packet-too-big from anywhere on the path), without which
//!   path MTU discovery black-holes;
//! - a life as long as its timeout without a packet, not for good;
//! - its entry, however many connections another pod opens.
//!
//! Needs root and `cargo xtask build`; `cargo xtask test` does both.

use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use velox_test_env::cluster_state::write_objects;
use velox_test_env::icmp::{send_icmp, too_big};
use velox_test_env::netns::spawn_in;
use velox_test_env::netpol::{namespace_object, pod_object, policy};
use velox_test_env::{Cluster, ClusterGuard, Family, Pod};

/// The port the isolated server may be reached on, and the one its rules let it
/// send to (where nobody listens: the peer's kernel answers port unreachable).
const ALLOWED_IN: u16 = 9000;
const ALLOWED_OUT: u16 = 9002;
/// Larger than any pod MTU here: it leaves its sender as three fragments.
const LARGE: usize = 4000;
/// How long the loaders may take to apply a change.
const CONVERGE: Duration = Duration::from_secs(20);
const WAIT: Duration = Duration::from_millis(1000);

/// Writes `server` (namespace `guarded`) and `clients` (namespace `clients`, label
/// `app: client`) where every loader reads them.
fn write_pods(cluster: &Cluster, server: &Pod, clients: &[(&Pod, usize)]) {
    let labelled: Vec<_> = clients.iter().map(|(pod, node)| (*pod, *node, "client")).collect();
    write_labelled_pods(cluster, server, &labelled);
}

/// `write_pods` with each client's `app` label.
fn write_labelled_pods(cluster: &Cluster, server: &Pod, clients: &[(&Pod, usize, &str)]) {
    let labels = |app: &str| -> BTreeMap<String, String> { [("app".to_string(), app.to_string())].into() };
    let mut objects = vec![pod_object(
        "guarded",
        &server.name,
        &labels("server"),
        &cluster.nodes[0].name,
        server,
    )];
    for (pod, node, app) in clients {
        objects.push(pod_object(
            "clients",
            &pod.name,
            &labels(app),
            &cluster.nodes[*node].name,
            pod,
        ));
    }
    for name in ["guarded", "clients"] {
        let labels = [("kubernetes.io/metadata.name".to_string(), name.to_string())].into();
        objects.push(namespace_object(name, &labels));
    }
    write_objects(&cluster.cluster_state.join("pods.json"), objects).unwrap();
}

/// The server isolated both ways: in from the clients on UDP `ALLOWED_IN`, out to
/// them on UDP `ALLOWED_OUT`, nothing else.
fn isolate_the_server(cluster: &Cluster) {
    let clients = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clients"}}}]);
    let spec = json!({
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": clients, "ports": [{"protocol": "UDP", "port": ALLOWED_IN}]}],
        "egress": [{"to": clients, "ports": [{"protocol": "UDP", "port": ALLOWED_OUT}]}],
    });
    let policies = vec![policy("guarded", "server", spec)];
    write_objects(&cluster.cluster_state.join("policies.json"), policies).unwrap();
}

/// A UDP echo server in `netns` on `addr` until the returned flag is set.
fn echo_server(netns: &str, addr: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<anyhow::Result<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let socket = spawn_in(netns, move || Ok(UdpSocket::bind(addr)?))
        .join()
        .unwrap()
        .unwrap();
    let thread = std::thread::spawn(move || {
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 65536];
        while !stopped.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut buf) {
                socket.send_to(&buf[..len], from)?;
            }
        }
        Ok(())
    });
    (stop, thread)
}

/// One datagram of `size` bytes from `netns` to `to` on a connected socket: whether
/// the same bytes came back.
fn echoed(netns: &str, to: SocketAddr, size: usize) -> bool {
    spawn_in(netns, move || {
        let socket = UdpSocket::bind(any(to.ip()))?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(WAIT))?;
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        socket.send(&sent)?;
        let mut buf = vec![0u8; 65536];
        let len = socket.recv(&mut buf)?;
        Ok(buf[..len] == sent[..])
    })
    .join()
    .unwrap()
    .unwrap_or(false)
}

fn any(ip: IpAddr) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

/// Asks until `done` holds, for `CONVERGE` at most.
fn eventually(what: &str, done: impl Fn() -> bool) {
    assert!(
        velox_test_env::wait_for(CONVERGE, done),
        "{what}: not within {CONVERGE:?}"
    );
}

/// An isolated pod's allowed flows get their datagrams whole, larger than the MTU
/// too, from a client on its node and one on the other, in both families; a port
/// its rules do not open stays closed to small and large datagrams alike.
#[test]
fn an_allowed_flow_gets_datagrams_larger_than_the_mtu() {
    let cluster = ClusterGuard::up("pf1").unwrap();
    let (server, same_node, other_node) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-2"));
    write_pods(&cluster, &server, &[(&same_node, 0), (&other_node, 1)]);
    write_objects(&cluster.cluster_state.join("policies.json"), vec![]).unwrap();
    let echoes: Vec<_> = Family::ALL
        .into_iter()
        .flat_map(|family| [ALLOWED_IN, ALLOWED_OUT].map(|port| (family, port)))
        .map(|(family, port)| echo_server(&server.name, SocketAddr::new(server.ip(family), port)))
        .collect();
    let clients = [(&same_node, "pod-4 (same node)"), (&other_node, "pod-2 (node 1)")];
    for family in Family::ALL {
        for (client, who) in clients {
            let to = SocketAddr::new(server.ip(family), ALLOWED_IN);
            assert!(
                echoed(&client.name, to, LARGE),
                "{who} {family:?}: without policy a {LARGE}-byte datagram comes back"
            );
        }
    }

    isolate_the_server(&cluster);
    let closed =
        |client: &Pod, family: Family| !echoed(&client.name, SocketAddr::new(server.ip(family), ALLOWED_OUT), 100);
    eventually("the policy isolates the server", || {
        clients
            .iter()
            .all(|(client, _)| Family::ALL.into_iter().all(|family| closed(client, family)))
    });
    for family in Family::ALL {
        for (client, who) in clients {
            let to = SocketAddr::new(server.ip(family), ALLOWED_IN);
            assert!(
                echoed(&client.name, to, 100),
                "{who} {family:?}: the allowed port answers"
            );
            assert!(
                echoed(&client.name, to, LARGE),
                "{who} {family:?}: a {LARGE}-byte datagram on the allowed port did not come back whole"
            );
            let denied = SocketAddr::new(server.ip(family), ALLOWED_OUT);
            assert!(
                !echoed(&client.name, denied, LARGE),
                "{who} {family:?}: a {LARGE}-byte datagram got in on a port the rules do not open"
            );
        }
    }
    for (stop, thread) in echoes {
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap().unwrap();
    }
    cluster.finish().unwrap();
}

/// The server's own UDP socket, connected to `peer` on `ALLOWED_OUT` (allowed out),
/// one datagram sent: the flow its ICMP errors are about.
fn allowed_flow(server: &Pod, peer: IpAddr) -> UdpSocket {
    let to = SocketAddr::new(peer, ALLOWED_OUT);
    let local = SocketAddr::new(server.ip(Family::of(&peer)), 0);
    let socket = spawn_in(&server.name, move || {
        let socket = UdpSocket::bind(local)?;
        socket.connect(to)?;
        Ok(socket)
    })
    .join()
    .unwrap()
    .unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

/// Whether the peer's port unreachable reached the server's socket.
fn refused(socket: &UdpSocket) -> bool {
    socket.send(b"anyone?").unwrap();
    let mut buf = [0u8; 64];
    matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The path MTU the server's connected socket knows.
fn path_mtu(socket: &UdpSocket) -> u32 {
    let (level, name) = match socket.local_addr().unwrap() {
        SocketAddr::V4(_) => (nix::libc::IPPROTO_IP, nix::libc::IP_MTU),
        SocketAddr::V6(_) => (nix::libc::IPPROTO_IPV6, nix::libc::IPV6_MTU),
    };
    let mut mtu: nix::libc::c_int = 0;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: an int option into an int.
    let rc = unsafe { nix::libc::getsockopt(socket.as_raw_fd(), level, name, (&raw mut mtu).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    mtu as u32
}

/// An isolated pod's allowed flow gets the ICMP errors about it: the port
/// unreachable its peer's kernel answers, and a fragmentation-needed (packet too big)
/// whoever on the path sends it, from a peer on its node and one on the other, in
/// both families. Without them its socket never learns the port is closed, and path
/// MTU discovery black-holes.
#[test]
fn an_allowed_flow_gets_its_icmp_errors() {
    let cluster = ClusterGuard::up("pf2").unwrap();
    let (server, same_node, other_node) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-2"));
    write_pods(&cluster, &server, &[(&same_node, 0), (&other_node, 1)]);
    isolate_the_server(&cluster);
    // A port only the rules out would open: the server no longer reaches it once
    // the policy is in the maps.
    let (stop, echo) = echo_server(&same_node.name, SocketAddr::new(same_node.ip(Family::V4), ALLOWED_IN));
    eventually("the policy isolates the server", || {
        let to = SocketAddr::new(same_node.ip(Family::V4), ALLOWED_IN);
        !echoed(&server.name, to, 100)
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap().unwrap();

    let peers = [(&same_node, "pod-4 (same node)"), (&other_node, "pod-2 (node 1)")];
    for family in Family::ALL {
        for (peer, who) in peers {
            let socket = allowed_flow(&server, peer.ip(family));
            assert!(
                refused(&socket),
                "{who} {family:?}: the port unreachable about an allowed flow did not reach the isolated pod"
            );

            let before = path_mtu(&socket);
            let smaller = match family {
                Family::V4 => 1200,
                Family::V6 => 1280,
            };
            assert!(
                before > u32::from(smaller),
                "{who} {family:?}: path MTU {before} to start with"
            );
            let flow = socket.local_addr().unwrap();
            let message = too_big(flow, socket.peer_addr().unwrap(), smaller);
            send_icmp(&peer.name, peer.ip(family), server.ip(family), message);
            eventually(
                &format!("{who} {family:?}: the packet too big about an allowed flow reaches the isolated pod"),
                || path_mtu(&socket) == u32::from(smaller),
            );
        }
    }
    cluster.finish().unwrap();
}

/// An ICMP error proves no connection: one forged by a pod the server's rules do not
/// admit, quoting a datagram from the server's admitted port to a port its egress
/// rules close, neither reaches the server as an allowed connection's nor lets the
/// server send that datagram afterwards.
#[test]
fn a_forged_icmp_error_opens_nothing() {
    let cluster = ClusterGuard::up("pf3").unwrap();
    let (server, admitted, forger) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-3"));
    write_pods(&cluster, &server, &[(&admitted, 0)]);
    isolate_the_server(&cluster);
    const CLOSED_OUT: u16 = 9005;
    let (stop, echo) = echo_server(&admitted.name, SocketAddr::new(admitted.ip(Family::V4), ALLOWED_IN));
    eventually("the policy isolates the server", || {
        !echoed(&server.name, SocketAddr::new(admitted.ip(Family::V4), ALLOWED_IN), 100)
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap().unwrap();

    for family in Family::ALL {
        let (from, to) = (
            SocketAddr::new(server.ip(family), ALLOWED_IN),
            SocketAddr::new(admitted.ip(family), CLOSED_OUT),
        );
        let listener = spawn_in(&admitted.name, move || Ok(UdpSocket::bind(to)?))
            .join()
            .unwrap()
            .unwrap();
        listener.set_read_timeout(Some(WAIT)).unwrap();
        let forged = too_big(from, to, 1280);
        send_icmp(&forger.name, forger.ip(family), server.ip(family), forged);
        std::thread::sleep(Duration::from_millis(200));
        let sent = spawn_in(&server.name, move || {
            let socket = UdpSocket::bind(from)?;
            for _ in 0..3 {
                socket.send_to(b"out", to)?;
            }
            Ok(())
        })
        .join()
        .unwrap();
        assert!(sent.is_ok(), "{family:?}: {sent:?}");
        let mut buf = [0u8; 16];
        assert!(
            listener.recv(&mut buf).is_err(),
            "{family:?}: after a forged ICMP error the isolated server sent to a port its egress rules close"
        );
    }
    cluster.finish().unwrap();
}

/// How long an allowed UDP exchange lives without a packet in the tests below.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the loaders of `nodes` again with `flags`, and a UDP timeout of
/// `EXCHANGE_TIMEOUT`.
fn restart_loaders(cluster: &Cluster, nodes: &[usize], flags: &[&str]) {
    let timeout = EXCHANGE_TIMEOUT.as_secs().to_string();
    let flags: Vec<&str> = flags.iter().copied().chain(["--ct-timeout-any", &timeout]).collect();
    for node in nodes {
        cluster.nodes[*node].restart_loader_with(&flags).unwrap();
    }
}

/// Waits until the server's rules are in the maps: its UDP echo on `ALLOWED_OUT`
/// (a port its rules do not open in) no longer answers `client`.
fn wait_for_isolation(server: &Pod, client: &Pod) {
    let (stop, echo) = echo_server(&server.name, SocketAddr::new(server.ip(Family::V4), ALLOWED_OUT));
    eventually("the policy isolates the server", || {
        !echoed(&client.name, SocketAddr::new(server.ip(Family::V4), ALLOWED_OUT), 100)
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap().unwrap();
}

/// A UDP socket bound to `addr` in `netns`, reading with a timeout of `WAIT`.
fn udp_socket(netns: &str, addr: SocketAddr) -> UdpSocket {
    let socket = spawn_in(netns, move || Ok(UdpSocket::bind(addr)?))
        .join()
        .unwrap()
        .unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

/// An allowed exchange lives as long as its timeout without a packet, not for good:
/// once it is over, the isolated server's datagram back to the same client port is
/// a new connection, which its egress rules close. From the server's node and the
/// other, in both families.
#[test]
fn an_allowed_exchange_ends_after_its_timeout() {
    let cluster = ClusterGuard::up("pf4").unwrap();
    restart_loaders(&cluster, &[0, 1], &[]);
    let (server, same_node, other_node) = (cluster.pod("pod-1"), cluster.pod("pod-4"), cluster.pod("pod-2"));
    write_pods(&cluster, &server, &[(&same_node, 0), (&other_node, 1)]);
    isolate_the_server(&cluster);
    wait_for_isolation(&server, &same_node);

    let mut exchanges = Vec::new();
    for family in Family::ALL {
        let server_socket = udp_socket(&server.name, SocketAddr::new(server.ip(family), ALLOWED_IN));
        for (client, who) in [(&same_node, "pod-4 (same node)"), (&other_node, "pod-2 (node 1)")] {
            let client_socket = udp_socket(&client.name, SocketAddr::new(client.ip(family), 0));
            client_socket.connect(server_socket.local_addr().unwrap()).unwrap();
            client_socket.send(b"hello").unwrap();
            let mut buf = [0u8; 16];
            let (_, from) = server_socket.recv_from(&mut buf).expect("the allowed datagram in");
            server_socket.send_to(b"answer", from).unwrap();
            assert!(
                client_socket.recv(&mut buf).is_ok(),
                "{who} {family:?}: the answer of the allowed exchange arrives"
            );
            exchanges.push((server_socket.try_clone().unwrap(), client_socket, from, who, family));
        }
    }
    // The timeout, and a sweep of the loader's after it.
    std::thread::sleep(EXCHANGE_TIMEOUT + Duration::from_secs(2));
    for (server_socket, client_socket, to, who, family) in exchanges {
        server_socket.send_to(b"much later", to).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            client_socket.recv(&mut buf).is_err(),
            "{who} {family:?}: the server still sends back on an exchange over for {EXCHANGE_TIMEOUT:?}: its \
             egress rules do not open that port"
        );
    }
    cluster.finish().unwrap();
}

/// A TCP echo server on `addr` in `netns` for one connection, until the returned
/// flag is set.
fn tcp_echo_server(netns: &str, addr: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let listener = spawn_in(netns, move || Ok(std::net::TcpListener::bind(addr)?))
        .join()
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut buf = [0u8; 64];
        while !stopped.load(Ordering::Relaxed) {
            match std::io::Read::read(&mut stream, &mut buf) {
                Ok(0) => return,
                Ok(len) => {
                    let _ = std::io::Write::write_all(&mut stream, &buf[..len]);
                }
                Err(_) => {}
            }
        }
    });
    (stop, thread)
}

/// Whether `stream` gets its bytes back.
fn tcp_echoes(stream: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 4];
    std::io::Write::write_all(stream, b"ping").is_ok()
        && std::io::Read::read_exact(stream, &mut buf).is_ok()
        && &buf == b"ping"
}

/// One pod that opens connections by the thousand (an allowed UDP scan) takes its
/// reserved share of the node's allowed-connections map and the shared pool, and no
/// more: its further connections are dropped and counted (`policy_flows_full`),
/// while an egress-isolated server's open connections keep their entries, so its
/// replies still pass. Once the scan's exchanges time out, the loader's sweep gives
/// the scanner its share back. A restart with a map of another size leaves the
/// server's connections open.
#[test]
fn one_pods_connections_cannot_push_out_anothers() {
    let cluster = ClusterGuard::up("pf5").unwrap();
    // 8,192 entries for the default 1,024 pods (on 2 CPUs): 3 reserved for each, a
    // pool of 4,608. The scan below opens more connections than the map holds.
    restart_loaders(&cluster, &[0], &["--policy-flows", "8192"]);
    let (server, client, scanner, sink) = (
        cluster.pod("pod-1"),
        cluster.pod("pod-2"),
        cluster.pod("pod-4"),
        cluster.pod("pod-3"),
    );
    write_labelled_pods(
        &cluster,
        &server,
        &[(&client, 1, "client"), (&scanner, 0, "scanner"), (&sink, 1, "sink")],
    );
    let clients = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clients"}}}]);
    let server_rules = json!({
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": clients, "ports": [{"protocol": "TCP", "port": ALLOWED_IN}]}],
        "egress": [{"to": clients, "ports": [{"protocol": "UDP", "port": ALLOWED_OUT}]}],
    });
    // Egress-isolated, but allowed everywhere: every connection of its is followed.
    let scanner_rules = json!({
        "podSelector": {"matchLabels": {"app": "scanner"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]}],
    });
    let policies = vec![
        policy("guarded", "server", server_rules),
        policy("clients", "scanner", scanner_rules),
    ];
    write_objects(&cluster.cluster_state.join("policies.json"), policies).unwrap();
    wait_for_isolation(&server, &client);

    let mut servers = Vec::new();
    let mut connections: Vec<_> = Family::ALL
        .into_iter()
        .map(|family| {
            let to = SocketAddr::new(server.ip(family), ALLOWED_IN);
            servers.push(tcp_echo_server(&server.name, to));
            let mut stream = spawn_in(&client.name, move || Ok(std::net::TcpStream::connect(to)?))
                .join()
                .unwrap()
                .unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert!(tcp_echoes(&mut stream), "{family:?}: the allowed connection answers");
            (family, stream)
        })
        .collect();

    const SCANNED: u16 = 5000;
    for family in Family::ALL {
        let to = sink.ip(family);
        spawn_in(&scanner.name, move || {
            let socket = UdpSocket::bind(any(to))?;
            // Each connection used twice: a plain LRU evicts connections in use last.
            for port in 20_000..20_000 + SCANNED {
                socket.send_to(b"scan", SocketAddr::new(to, port))?;
                socket.send_to(b"scan", SocketAddr::new(to, port))?;
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
    }
    for (family, stream) in &mut connections {
        assert!(
            tcp_echoes(stream),
            "{family:?}: the isolated server's replies were dropped once another pod opened {} connections",
            2 * SCANNED
        );
    }
    let scanner_counters = cluster.nodes[0].endpoint(scanner.ip(Family::V4)).unwrap();
    assert!(
        scanner_counters["dropped"]["policy_flows_full"].as_u64().unwrap() > 0,
        "the scan's connections beyond its share are counted: {scanner_counters}"
    );

    let echo = SocketAddr::new(sink.ip(Family::V4), ALLOWED_IN);
    let (stop, echoing) = echo_server(&sink.name, echo);
    eventually("the scanner's share comes back once its exchanges are over", || {
        echoed(&scanner.name, echo, 100)
    });
    stop.store(true, Ordering::Relaxed);
    echoing.join().unwrap().unwrap();

    restart_loaders(&cluster, &[0], &["--policy-flows", "16384"]);
    for (family, stream) in &mut connections {
        assert!(
            tcp_echoes(stream),
            "{family:?}: the isolated server's replies were dropped after a restart with another --policy-flows"
        );
    }
    drop(connections);
    for (stop, thread) in servers {
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
    }
    cluster.finish().unwrap();
}
