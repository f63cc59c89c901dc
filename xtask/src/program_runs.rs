//! A program's ns per run on one packet, from the kernel's own repeated test runs
//! (`BPF_PROG_TEST_RUN`): no traffic and no other CPU, the same packet a million
//! times through the pinned program, so two objects' figures differ by their
//! instructions and lookups alone. Caches are warm: a floor under what `bpf_stats`
//! reports under traffic. Run with `kernel.bpf_stats_enabled` off and on, the
//! difference is what the stats' own clock reads add to each run.

use anyhow::Context;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use std::net::IpAddr;
use velox_test_env::{netns::spawn_in, Family, Node, Pod};

/// Runs per measurement: about a fifth of a second.
const REPEAT: u32 = 1_000_000;
/// `TC_ACT_REDIRECT`: every measured path ends in a redirect; another action means
/// the packet took some other path than the one named.
const REDIRECT: u32 = 7;
/// Bytes of TCP payload, an MSS-sized segment of an established stream.
const PAYLOAD: usize = 1400;
const CLIENT_PORT: u16 = 40_000;
const SERVER_PORT: u16 = 5201;

/// One pinned program and the packet it is measured with.
pub struct TestPacket {
    pub path: &'static str,
    pub program: &'static str,
    /// The node whose pinned program runs, in its netns.
    pub node: Node,
    /// The interface the packet arrives on, in the node's netns.
    pub ifindex: u32,
    /// The destination MAC: the receiving interface's own where the program wants a
    /// frame addressed to the host (`from_net`).
    pub to_mac: [u8; 6],
    pub from: IpAddr,
    pub to: IpAddr,
}

impl TestPacket {
    /// `program` on `node`, with a packet of `client`'s stream to `server` arriving
    /// on `ifname` (a host veth, or the uplink).
    pub fn new(
        path: &'static str,
        program: &'static str,
        node: &Node,
        ifname: &str,
        (client, server, family): (&Pod, &Pod, Family),
    ) -> anyhow::Result<Self> {
        let (ifindex, to_mac) = interface(node, ifname)?;
        Ok(Self {
            path,
            program,
            node: node.clone(),
            ifindex,
            to_mac,
            from: client.ip(family),
            to: server.ip(family),
        })
    }

    /// A TCP segment of the stream, `syn` opening it or else an acknowledging one.
    fn frame(&self, syn: bool) -> anyhow::Result<Vec<u8>> {
        let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], self.to_mac);
        let ip = match (self.from, self.to) {
            (IpAddr::V4(from), IpAddr::V4(to)) => ethernet.ipv4(from.octets(), to.octets(), 64),
            (IpAddr::V6(from), IpAddr::V6(to)) => ethernet.ipv6(from.octets(), to.octets(), 64),
            _ => anyhow::bail!("{} and {} are of two families", self.from, self.to),
        };
        let tcp = ip.tcp(CLIENT_PORT, SERVER_PORT, 1, 64_000);
        let (tcp, payload) = match syn {
            true => (tcp.syn(), Vec::new()),
            false => (tcp.ack(1), vec![0u8; PAYLOAD]),
        };
        let mut frame = Vec::with_capacity(tcp.size(payload.len()));
        tcp.write(&mut frame, &payload)?;
        Ok(frame)
    }

    /// Opens the connection with one run of a SYN, so the runs that follow are an
    /// established stream's (an isolated pod's connection is then followed).
    pub fn open(&self) -> anyhow::Result<()> {
        self.run(&self.frame(true)?, 1).map(drop)
    }

    /// ns per run of an established stream's segment.
    pub fn ns_per_run(&self) -> anyhow::Result<f64> {
        let frame = self.frame(false)?;
        let (action, ns) = self.run(&frame, REPEAT)?;
        anyhow::ensure!(
            action == REDIRECT,
            "{} on {}: action {action}, not a redirect",
            self.program,
            self.path
        );
        Ok(ns)
    }

    /// The program's action and ns per run over `repeat` runs of `frame`, in the
    /// node's netns (the kernel finds the interface by `__sk_buff.ifindex` there).
    fn run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, f64)> {
        let pin = velox_node::layout::Bpffs::new(&self.node.bpffs_root).program(self.program);
        // `__sk_buff` up to `ifindex` (offset 40): the kernel takes a shorter context,
        // zeros past it.
        let mut context = [0u8; 44];
        context[40..].copy_from_slice(&self.ifindex.to_ne_bytes());
        let frame = frame.to_vec();
        spawn_in(&self.node.name, move || {
            let program = SchedClassifier::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            let result = program.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&context),
                repeat,
                ..TestRunOptions::default()
            })?;
            Ok((result.return_value, result.duration.as_nanos() as f64))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the test run's thread panicked"))?
    }
}

/// `ifname`'s index and MAC address in `node`'s netns.
fn interface(node: &Node, ifname: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let output = node.exec("ip", &["-j", "link", "show", "dev", ifname])?;
    anyhow::ensure!(output.status.success(), "no {ifname} on {}", node.name);
    let links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let link = &links[0];
    let ifindex = link["ifindex"].as_u64().context("no ifindex")? as u32;
    let mut mac = [0u8; 6];
    for (byte, hex) in mac
        .iter_mut()
        .zip(link["address"].as_str().context("no address")?.split(':'))
    {
        *byte = u8::from_str_radix(hex, 16)?;
    }
    Ok((ifindex, mac))
}
