//! What an allowed connection of an isolated pod must get whole, on the two-node
//! cluster, in both families:
//! - a UDP datagram larger than the MTU: its later fragments carry no ports, and
//!   must be judged as the connection they belong to, not as new flows;
//! - ICMP errors about the connection (a port unreachable from its peer, a
//!   fragmentation-needed / packet-too-big from anywhere on the path), without which
//!   path MTU discovery black-holes.
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

/// Writes `server` (namespace `guarded`) and `clients` (namespace `clients`) where
/// every loader reads them.
fn write_pods(cluster: &Cluster, server: &Pod, clients: &[(&Pod, usize)]) {
    let labels = |app: &str| -> BTreeMap<String, String> { [("app".to_string(), app.to_string())].into() };
    let mut objects = vec![pod_object(
        "guarded",
        &server.name,
        &labels("server"),
        &cluster.nodes[0].name,
        server,
    )];
    for (pod, node) in clients {
        objects.push(pod_object(
            "clients",
            &pod.name,
            &labels("client"),
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
