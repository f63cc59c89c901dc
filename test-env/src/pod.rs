//! A pod: a network namespace named after it, wired by the CNI plugin.

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use velox_node::Family;

use crate::netns::{in_netns, in_netns_and_cgroup};

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// At most one address per family, IPv4 first.
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// The pod a CNI ADD result describes: every address in `ips`.
    pub fn from_result(name: &str, result: &Value) -> anyhow::Result<Self> {
        let ips = result["ips"]
            .as_array()
            .context("ADD result has no ips")?
            .iter()
            .map(|ip| {
                let address: IpNet = ip["address"].as_str().context("ip without address")?.parse()?;
                Ok(address.addr())
            })
            .collect::<anyhow::Result<Vec<IpAddr>>>()?;
        anyhow::ensure!(!ips.is_empty(), "ADD result has no address: {result}");
        Ok(Self {
            name: name.to_string(),
            ips,
        })
    }

    /// The pod's address of `family`; a pod of the test environment has both.
    pub fn ip(&self, family: Family) -> IpAddr {
        self.ips
            .iter()
            .copied()
            .find(|ip| Family::of(ip) == family)
            .unwrap_or_else(|| panic!("{} has no {family:?} address: {:?}", self.name, self.ips))
    }

    pub fn netns_path(&self) -> PathBuf {
        crate::netns_path(&self.name)
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(in_netns(&self.name, program, args).output()?)
    }

    /// `count` pings to `ip`; true when every one was answered.
    pub fn ping(&self, ip: IpAddr, count: u32) -> bool {
        self.exec(
            "ping",
            &["-c", &count.to_string(), "-i", "0.1", "-W", "1", "-q", &ip.to_string()],
        )
        .is_ok_and(|o| o.status.success())
    }

    /// Pings `ip` `count` times, 50 ms apart, while `during` runs (a restart, say);
    /// returns how many were answered.
    pub fn ping_while(&self, ip: IpAddr, count: u32, during: impl FnOnce()) -> anyhow::Result<u32> {
        let ping = in_netns(
            &self.name,
            "ping",
            &["-c", &count.to_string(), "-i", "0.05", "-W", "1", &ip.to_string()],
        )
        .stdout(Stdio::piped())
        .spawn()?;
        during();
        let output = ping.wait_with_output()?;
        let summary = String::from_utf8_lossy(&output.stdout);
        let received = summary
            .split(", ")
            .find_map(|part| part.strip_suffix(" received"))
            .context("ping summary")?;
        Ok(received.trim().parse()?)
    }

    /// iperf3 TCP from this pod to `server`'s address of `family` for `seconds`;
    /// Gbit/s received.
    pub fn iperf3_to(&self, server: &Pod, family: Family, seconds: u32) -> anyhow::Result<f64> {
        Ok(self.iperf3(server, family, seconds, 1)?.gbps)
    }

    /// iperf3 TCP with `streams` parallel streams.
    pub fn iperf3(&self, server: &Pod, family: Family, seconds: u32, streams: u32) -> anyhow::Result<Throughput> {
        self.iperf3_via(server, family, None, seconds, streams)
    }

    /// iperf3 to `server` through `via`, a Service frontend that leads to the server's
    /// port 5201, with the client in `via`'s cgroup (where the socket load balancer's
    /// hooks act); straight to the server's address when `via` is `None`.
    pub fn iperf3_via(
        &self,
        server: &Pod,
        family: Family,
        via: Option<(SocketAddr, &Path)>,
        seconds: u32,
        streams: u32,
    ) -> anyhow::Result<Throughput> {
        self.iperf3_run(server, family, IPERF3_PORT, via, seconds, streams)
    }

    /// iperf3 TCP with one stream to a server of its own on `port`: one of several
    /// iperf3 processes at once (3.12 runs all the streams of one in one thread).
    pub fn iperf3_on(&self, server: &Pod, family: Family, port: u16, seconds: u32) -> anyhow::Result<Throughput> {
        self.iperf3_run(server, family, port, None, seconds, 1)
    }

    fn iperf3_run(
        &self,
        server: &Pod,
        family: Family,
        server_port: u16,
        via: Option<(SocketAddr, &Path)>,
        seconds: u32,
        streams: u32,
    ) -> anyhow::Result<Throughput> {
        let ip = server.ip(family).to_string();
        let listen = server_port.to_string();
        let _server = Server::start(server, "iperf3", &["-s", "-1", "-B", &ip, "-p", &listen])?;
        let (host, port) = match via {
            Some((frontend, _)) => (frontend.ip().to_string(), frontend.port().to_string()),
            None => (ip.clone(), listen),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        // iperf3 3.12 can spin forever on a connection that went dead: the run
        // gets half a minute beyond its length, then ends with no report.
        let limit = (seconds + 30).to_string();
        let args = [
            &limit,
            "iperf3",
            "-c",
            &host,
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ];
        // iperf3 3.12 exits 0 even when it cannot connect: the report says.
        let report = loop {
            let output = match via {
                Some((_, cgroup)) => in_netns_and_cgroup(&self.name, cgroup, "timeout", &args).output()?,
                None => self.exec("timeout", &args)?,
            };
            let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 report")?;
            if report.get("error").is_none() || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(100)); // the server is still starting
        };
        let received = &report["end"]["sum_received"];
        let slowest_second_gbps = report["intervals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
            .fold(f64::INFINITY, f64::min)
            / 1e9;
        match (received["bits_per_second"].as_f64(), received["bytes"].as_f64()) {
            (Some(bps), Some(bytes)) => Ok(Throughput {
                gbps: bps / 1e9,
                bytes,
                slowest_second_gbps,
            }),
            _ => bail!("iperf3 to {host}:{port} failed: {}", report["error"]),
        }
    }

    /// TCP request/response with sockperf ping-pong, both ends busy-polling: blocking
    /// sockets would measure the vCPU's wake-up time, not the datapath. Server and
    /// client are pinned to different CPUs so each busy-poller has one. Even so, on
    /// this VM every configuration lands in one of two modes per run (about 7 or
    /// 10.5 us): read latency and tps with their spread.
    pub fn sockperf_to(&self, server: &Pod, family: Family, seconds: u32) -> anyhow::Result<Latency> {
        self.sockperf(server, family, seconds, SOCKPERF_PORT, true)
    }

    /// TCP request/response with sockperf ping-pong on blocking sockets, unpinned, to
    /// a server of its own on `port` (netperf's TCP_RR): one of several at once, where
    /// busy-polling processes would outnumber the CPUs.
    pub fn sockperf_blocking(&self, server: &Pod, family: Family, port: u16, seconds: u32) -> anyhow::Result<Latency> {
        self.sockperf(server, family, seconds, port, false)
    }

    fn sockperf(
        &self,
        server: &Pod,
        family: Family,
        seconds: u32,
        port: u16,
        busy_poll: bool,
    ) -> anyhow::Result<Latency> {
        let ip = server.ip(family).to_string();
        let port = port.to_string();
        // Busy-polling: server on CPU 0, client on CPU 1, non-blocking sockets.
        let pinned = |cpu: &'static str| -> Vec<&'static str> {
            match busy_poll {
                true => vec!["taskset", "-c", cpu, "sockperf"],
                false => vec!["sockperf"],
            }
        };
        let nonblocked = busy_poll.then_some("--nonblocked");
        let mut serve = pinned("0");
        serve.extend(["sr", "--tcp"].into_iter().chain(nonblocked));
        serve.extend(["-i", &ip, "-p", &port]);
        let _server = Server::start(server, serve[0], &serve[1..])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let seconds = seconds.to_string();
        let mut args = pinned("1");
        args.extend(["pp", "--tcp"].into_iter().chain(nonblocked));
        args.extend(["--full-rtt", "-i", &ip, "-p", &port, "-t", &seconds]);
        loop {
            let output = self.exec(args[0], &args[1..])?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            match Latency::parse(&text) {
                Some(latency) => return Ok(latency),
                None if Instant::now() > deadline => bail!("sockperf to {ip} failed: {text}"),
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// Where iperf3 serves unless told otherwise.
pub const IPERF3_PORT: u16 = 5201;
/// Where sockperf serves unless told otherwise.
pub const SOCKPERF_PORT: u16 = 11111;

#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub gbps: f64,
    pub bytes: f64,
    /// The slowest of iperf3's one-second intervals, as the sender saw it: 0 means
    /// the traffic stopped for a second.
    pub slowest_second_gbps: f64,
}

/// Round-trip times in microseconds, and transactions per second.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub tps: f64,
}

impl Latency {
    fn parse(text: &str) -> Option<Self> {
        let after = |marker: &str| -> Option<f64> {
            let rest = &text[text.find(marker)? + marker.len()..];
            rest.trim_start()
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()?
                .parse()
                .ok()
        };
        let runtime = after("[Valid Duration] RunTime=")?;
        let received = after("ReceivedMessages=")?;
        Some(Self {
            p50_us: after("percentile 50.000 =")?,
            p99_us: after("percentile 99.000 =")?,
            tps: received / runtime,
        })
    }
}

/// A server process in a pod's netns, killed when dropped.
pub struct Server(std::process::Child);

impl Server {
    pub fn start(pod: &Pod, program: &str, args: &[&str]) -> anyhow::Result<Self> {
        let child = in_netns(&pod.name, program, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_output() {
        let text = "sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=156119; ReceivedMessages=156119\n\
            sockperf: ---> percentile 99.000 =   11.377\nsockperf: ---> percentile 50.000 =    9.754\n";
        let latency = Latency::parse(text).unwrap();
        assert_eq!(latency.p50_us, 9.754);
        assert_eq!(latency.p99_us, 11.377);
        assert!((latency.tps - 100_721.9).abs() < 1.0);
    }
}
