//! The connectivity matrix: every kind of connection the cluster must carry, in both
//! address families, with ICMP and TCP, and the source address the *receiver* sees,
//! captured there with raw sockets. Only traffic leaving the cluster may be NATed.

use anyhow::Context;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use nix::sys::socket::{
    recvfrom, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage,
};
use nix::sys::time::TimeVal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use velox_node::Family;

use crate::cluster::{external_ip, Cluster, HOST_NETWORK_PORT};
use crate::netns::{in_netns, spawn_in};
use crate::Pod;

/// One end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub label: String,
    pub netns: String,
    pub ip: IpAddr,
    /// The TCP port it is reached on.
    pub port: u16,
    /// Whether the matrix runs a listener there (a host-network pod serves itself).
    pub serve: bool,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub family: Family,
    pub from: Peer,
    pub to: Peer,
    /// The source the receiver must see.
    pub expected_source: IpAddr,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub case: Case,
    pub icmp: bool,
    pub tcp: bool,
    pub seen: Option<IpAddr>,
}

impl Row {
    pub fn nat(&self) -> Option<bool> {
        self.seen.map(|seen| seen != self.case.from.ip)
    }

    pub fn pass(&self) -> bool {
        self.icmp && self.tcp && self.seen == Some(self.case.expected_source)
    }
}

const POD_PORT: u16 = 8080;
const NODE_PORT: u16 = 8081;

/// The connections checked, 16 per family: pod-1 (node 0) to itself, to pod-4 (same
/// node) and pod-2 (other node); pod-3 to pod-4; pod-1 to and from a process and a
/// host-network pod on each node; pod-1 to each node IP; pod-1 and pod-2 to the
/// external host, which sees their node's IP.
pub fn cases(cluster: &Cluster, pods: &[(usize, Pod)]) -> anyhow::Result<Vec<Case>> {
    let mut cases = Vec::new();
    for family in Family::ALL {
        cases.extend(cases_of(cluster, pods, family)?);
    }
    Ok(cases)
}

fn cases_of(cluster: &Cluster, pods: &[(usize, Pod)], family: Family) -> anyhow::Result<Vec<Case>> {
    let pod = |name: &str| -> anyhow::Result<Peer> {
        let (_, p) = pods
            .iter()
            .find(|(_, p)| p.name.ends_with(name))
            .with_context(|| format!("no {name}"))?;
        Ok(Peer {
            label: name.into(),
            netns: p.name.clone(),
            ip: p.ip(family),
            port: POD_PORT,
            serve: true,
        })
    };
    let node_process = |node: usize, what: &str| Peer {
        label: format!("{what} {}", short(&cluster.nodes[node].name)),
        netns: cluster.nodes[node].name.clone(),
        ip: cluster.node_ip(node, family),
        port: NODE_PORT,
        serve: true,
    };
    let host_network = |node: usize| {
        let h = cluster.host_network_pod(node);
        Peer {
            label: h.name,
            netns: cluster.nodes[node].name.clone(),
            ip: cluster.node_ip(h.node, family),
            port: HOST_NETWORK_PORT,
            serve: false,
        }
    };
    let external = Peer {
        label: "external".into(),
        netns: cluster.external.clone(),
        ip: external_ip(family),
        port: 8082,
        serve: true,
    };
    let (p1, p2, p3, p4) = (pod("pod-1")?, pod("pod-2")?, pod("pod-3")?, pod("pod-4")?);
    let case = |from: &Peer, to: &Peer| Case {
        family,
        from: from.clone(),
        to: to.clone(),
        expected_source: from.ip,
    };
    let mut cases = vec![
        case(&p1, &p1),
        case(&p1, &p4),
        case(&p1, &p2),
        case(&p3, &p4),
        case(&p1, &node_process(0, "process on")),
        case(&node_process(0, "process on"), &p1),
        case(&p1, &node_process(1, "process on")),
        case(&node_process(1, "process on"), &p1),
        case(&p1, &host_network(0)),
        case(&host_network(0), &p1),
        case(&p1, &host_network(1)),
        case(&host_network(1), &p1),
        case(&p1, &node_process(0, "node IP of")),
        case(&p1, &node_process(1, "node IP of")),
    ];
    for (from, node) in [(&p1, 0), (&p2, 1)] {
        cases.push(Case {
            family,
            from: from.clone(),
            to: external.clone(),
            expected_source: cluster.node_ip(node, family),
        });
    }
    Ok(cases)
}

fn short(node: &str) -> &str {
    node.strip_prefix("my-k8s-").unwrap_or(node)
}

pub fn run(cases: &[Case]) -> anyhow::Result<Vec<Row>> {
    cases.iter().map(run_case).collect()
}

fn run_case(case: &Case) -> anyhow::Result<Row> {
    let to = case.to.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = mpsc::channel();
    let icmp = match case.family {
        Family::V4 => SockProtocol::Icmp,
        Family::V6 => SockProtocol::IcmpV6,
    };
    let icmp = capture(&to, icmp, stop.clone(), ready_tx.clone());
    let tcp = capture(&to, SockProtocol::Tcp, stop.clone(), ready_tx.clone());
    let listener = to.serve.then(|| {
        let (to, ready_tx) = (to.clone(), ready_tx.clone());
        spawn_in(&to.netns, move || {
            let listener = TcpListener::bind(SocketAddr::new(to.ip, to.port))?;
            ready_tx.send(()).ok();
            listener.set_nonblocking(false)?;
            let _ = listener.accept();
            Ok(())
        })
    });
    let expected_ready = 2 + usize::from(to.serve);
    for _ in 0..expected_ready {
        ready
            .recv_timeout(Duration::from_secs(5))
            .context("capture did not start")?;
    }
    let icmp_ok = (0..2).any(|_| {
        in_netns(
            &case.from.netns,
            "ping",
            &["-c", "1", "-W", "1", "-q", &to.ip.to_string()],
        )
        .output()
        .is_ok_and(|o| o.status.success())
    });
    let target = SocketAddr::new(to.ip, to.port);
    let tcp_ok = spawn_in(&case.from.netns, move || {
        Ok(TcpStream::connect_timeout(&target, Duration::from_secs(2))?)
    })
    .join()
    .is_ok_and(|r| r.is_ok());
    stop.store(true, Ordering::Relaxed);
    if let Some(listener) = listener {
        // Unblock accept() if nothing connected.
        let _ = spawn_in(&to.netns, move || {
            Ok(TcpStream::connect_timeout(&target, Duration::from_millis(200))?)
        })
        .join();
        let _ = listener.join();
    }
    let icmp_seen = icmp.join().map_err(|_| anyhow::anyhow!("capture panicked"))??;
    let tcp_seen = tcp.join().map_err(|_| anyhow::anyhow!("capture panicked"))??;
    // Both protocols must agree on what the receiver sees.
    let seen = match (icmp_seen, tcp_seen) {
        (Some(a), Some(b)) if a != b => None,
        (a, b) => b.or(a),
    };
    Ok(Row {
        case: case.clone(),
        icmp: icmp_ok && icmp_seen.is_some(),
        tcp: tcp_ok && tcp_seen.is_some(),
        seen,
    })
}

/// The source of the first ICMP echo request, or TCP SYN to the port, for `to.ip`.
fn capture(
    to: &Peer,
    protocol: SockProtocol,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<()>,
) -> std::thread::JoinHandle<anyhow::Result<Option<IpAddr>>> {
    let to = to.clone();
    spawn_in(&to.netns.clone(), move || {
        let family = match to.ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let sock = socket(family, SockType::Raw, SockFlag::empty(), protocol)?;
        setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000))?;
        ready.send(()).ok();
        let mut buf = [0u8; 1500];
        let mut seen = None;
        while !stop.load(Ordering::Relaxed) {
            let Ok((len, Some(from))) = recvfrom::<SockaddrStorage>(sock.as_raw_fd(), &mut buf) else {
                continue;
            };
            if seen.is_none() && matches_case(&buf[..len], protocol, to.ip, to.port) {
                seen = source_of(&from);
            }
        }
        Ok(seen)
    })
}

fn source_of(from: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = from.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    from.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Whether a packet a raw socket delivered is the case's echo request or SYN. IPv4
/// raw sockets deliver the IP header too (its destination is checked); IPv6 ones
/// start at the transport header.
fn matches_case(packet: &[u8], protocol: SockProtocol, dst: IpAddr, port: u16) -> bool {
    let payload = match dst {
        IpAddr::V4(dst) => {
            if packet.len() < 20 || Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]) != dst {
                return false;
            }
            &packet[usize::from(packet[0] & 0x0f) * 4..]
        }
        IpAddr::V6(_) => packet,
    };
    match protocol {
        SockProtocol::Icmp => payload.first() == Some(&8),     // echo request
        SockProtocol::IcmpV6 => payload.first() == Some(&128), // echo request
        _ => payload.len() >= 14 && u16::from_be_bytes([payload[2], payload[3]]) == port && payload[13] & 0x02 != 0, // SYN
    }
}

pub fn table(rows: &[Row]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "FAMILY",
        "FROM",
        "TO",
        "ICMP",
        "TCP",
        "SOURCE SEEN",
        "NAT",
        "EXPECTED",
        "RESULT",
    ]);
    let yes_no = |b: bool| if b { "ok" } else { "FAIL" };
    for row in rows {
        let expected_nat = row.case.expected_source != row.case.from.ip;
        table.add_row([
            format!("IPv{}", row.case.family.number()),
            format!("{} ({})", row.case.from.label, row.case.from.ip),
            format!(
                "{} ({})",
                row.case.to.label,
                SocketAddr::new(row.case.to.ip, row.case.to.port)
            ),
            yes_no(row.icmp).into(),
            yes_no(row.tcp).into(),
            row.seen.map_or("-".into(), |s| s.to_string()),
            row.nat().map_or("-", |nat| if nat { "yes" } else { "no" }).into(),
            format!(
                "{}{}",
                row.case.expected_source,
                if expected_nat { " (NAT)" } else { "" }
            ),
            if row.pass() { "PASS" } else { "FAIL" }.into(),
        ]);
    }
    table
}

/// Runs every case of `cluster`'s pods and fails unless all pass, 16 per family,
/// with NAT only to the external host (two rows per family); the table otherwise.
pub fn assert_all_pass_with_nat_only_to_the_outside(cluster: &Cluster) -> anyhow::Result<()> {
    let rows = run(&cases(cluster, &cluster.pods()?)?)?;
    let table = table(&rows);
    for family in Family::ALL {
        let count = rows.iter().filter(|r| r.case.family == family).count();
        anyhow::ensure!(count == 16, "{count} {family:?} rows:\n{table}");
    }
    anyhow::ensure!(rows.iter().all(|r| r.pass()), "{table}");
    let natted: Vec<_> = rows
        .iter()
        .filter(|r| r.nat() == Some(true))
        .map(|r| (r.case.family, r.case.to.label.as_str()))
        .collect();
    let external = Family::ALL.into_iter().flat_map(|family| [(family, "external"); 2]);
    anyhow::ensure!(natted.into_iter().eq(external), "NAT inside the cluster:\n{table}");
    Ok(())
}
