//! The shapes the anchors publish (Cilium's CNI benchmark: netperf's TCP_STREAM,
//! TCP_RR and TCP_CRR, with 1 and N processes, CPU normalised by the work done), so
//! Velox's ratios to the limit can sit next to theirs. N is 2 here: this machine has
//! 2 vCPUs. Each process has a server of its own; none busy-polls (two busy-polling
//! pairs would outnumber the CPUs), as netperf does not.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use velox_test_env::{Binaries, Family, Pod, Server};

use crate::bench::{Config, CpuTimes};
use crate::report::Stat;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Shape {
    /// iperf3, one stream per process: Gb/s, and CPU seconds per GB.
    Stream,
    /// sockperf ping-pong on blocking sockets: transactions/s, and CPU seconds per
    /// 100k transactions.
    Rr,
    /// `velox-probe crr` (connect, one byte, close): connections/s, and CPU seconds
    /// per 100k connections.
    Crr,
}

impl Shape {
    const ALL: [Shape; 3] = [Shape::Stream, Shape::Rr, Shape::Crr];

    fn name(self) -> &'static str {
        match self {
            Shape::Stream => "TCP_STREAM",
            Shape::Rr => "TCP_RR",
            Shape::Crr => "TCP_CRR",
        }
    }

    fn units(self) -> (&'static str, &'static str) {
        match self {
            Shape::Stream => ("Gb/s", "CPU s/GB"),
            Shape::Rr => ("tps", "CPU s/100k"),
            Shape::Crr => ("conn/s", "CPU s/100k"),
        }
    }
}

/// Processes measured for each shape.
pub const PROCESSES: [u32; 2] = [1, 2];

/// One shape with some processes, measured once: the summed rate of all processes,
/// and the whole machine's busy CPU time per unit of work while they ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShapeSample {
    pub shape: Shape,
    pub processes: u32,
    pub rate: f64,
    pub cpu: f64,
}

/// Where the processes' servers listen: the first, and one port up for each next.
const STREAM_PORT: u16 = 5301;
const RR_PORT: u16 = 11301;
const CRR_PORT: u16 = 7401;

/// Every shape with 1 and 2 processes from `client` to `server`. TCP_RR is left out
/// over IPv6: Debian's sockperf 3.7 has none.
pub fn measure(client: &Pod, server: &Pod, family: Family, seconds: u32) -> anyhow::Result<Vec<ShapeSample>> {
    let mut samples = Vec::new();
    for shape in Shape::ALL {
        if shape == Shape::Rr && family == Family::V6 {
            continue;
        }
        for processes in PROCESSES {
            let before = CpuTimes::read()?;
            let (rate, work) = run_processes(shape, processes, client, server, family, seconds)?;
            let cpu = CpuTimes::read()?.busy - before.busy;
            samples.push(ShapeSample {
                shape,
                processes,
                rate,
                cpu: cpu / work,
            });
        }
    }
    Ok(samples)
}

/// `processes` clients of `shape` at once, each to its own server: their summed rate,
/// and the work done in the units the CPU is normalised by (GB, 100k transactions).
fn run_processes(
    shape: Shape,
    processes: u32,
    client: &Pod,
    server: &Pod,
    family: Family,
    seconds: u32,
) -> anyhow::Result<(f64, f64)> {
    let probe = Binaries::locate()?.probe;
    let probe = probe.to_str().context("probe path")?;
    let _crr_servers = match shape {
        Shape::Crr => {
            let servers = (0..processes)
                .map(|i| {
                    let on = SocketAddr::new(server.ip(family), CRR_PORT + i as u16);
                    Server::start(server, probe, &["serve", &on.to_string()])
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Listening before the first connect.
            std::thread::sleep(std::time::Duration::from_millis(200));
            servers
        }
        _ => Vec::new(),
    };
    let results: Vec<anyhow::Result<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..processes as u16)
            .map(|i| {
                scope.spawn(move || -> anyhow::Result<(f64, f64)> {
                    match shape {
                        Shape::Stream => {
                            let run = client.iperf3_on(server, family, STREAM_PORT + i, seconds)?;
                            Ok((run.gbps, run.bytes / 1e9))
                        }
                        Shape::Rr => {
                            let run = client.sockperf_blocking(server, family, RR_PORT + i, seconds)?;
                            Ok((run.tps, run.tps * f64::from(seconds) / 1e5))
                        }
                        Shape::Crr => {
                            let to = SocketAddr::new(server.ip(family), CRR_PORT + i);
                            let (per_s, ..) = crate::service_bench::connection_rate(client, None, probe, to, seconds)?;
                            Ok((per_s, per_s * f64::from(seconds) / 1e5))
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    results
        .into_iter()
        .try_fold((0.0, 0.0), |(rate, work), r| r.map(|(r, w)| (rate + r, work + w)))
}

/// The anchors' table: medians (min..max) of each shape, then each configuration
/// against its limit and against ptp, for the rate and the CPU per unit of work.
pub fn markdown(samples: &[(Config, &[ShapeSample])], out: &mut String) {
    if samples.iter().all(|(_, s)| s.is_empty()) {
        return;
    }
    let columns: Vec<(Shape, u32)> = Shape::ALL
        .into_iter()
        .flat_map(|shape| PROCESSES.map(|p| (shape, p)))
        .collect();
    let stat = |config: Config, (shape, processes): (Shape, u32), cpu: bool| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|(c, _)| *c == config)
            .flat_map(|(_, s)| s.iter())
            .filter(|s| s.shape == shape && s.processes == processes)
            .map(|s| if cpu { s.cpu } else { s.rate })
            .collect();
        Stat::of_any(&values)
    };
    let mut configs: Vec<Config> = samples.iter().map(|(c, _)| *c).collect();
    configs.sort();
    configs.dedup();
    let header: Vec<String> = columns
        .iter()
        .map(|(shape, p)| {
            let (rate, cpu) = shape.units();
            format!("{} x{p} {rate} | {cpu}", shape.name())
        })
        .collect();
    let _ = writeln!(
        out,
        "\n### The anchors' shapes\n\nnetperf's shapes as Cilium's CNI benchmark publishes them, 1 and 2 processes \
         (2 vCPUs), each process to a server of its own, no busy-polling; CPU is the whole machine's busy time \
         (/proc/stat) per GB or per 100k transactions. Medians (min..max).\n\n| configuration | {} |\n|---|{}",
        header.join(" | "),
        "---|".repeat(columns.len() * 2)
    );
    for &config in &configs {
        let cells: Vec<String> = columns
            .iter()
            .map(|&column| {
                format!(
                    "{} | {}",
                    Stat::show(stat(config, column, false)),
                    Stat::show(stat(config, column, true))
                )
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", config.name(), cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nRatios of medians: the rate (higher is better) and the CPU per unit of work (lower is better), \
         against the configuration's limit and against ptp.\n\n| configuration | against | {} |\n|---|---|{}",
        header.join(" | "),
        "---|".repeat(columns.len() * 2)
    );
    for &config in &configs {
        // ptp is a same-node reference.
        let ptp = (config.limit() == Config::Direct).then_some(Config::Ptp);
        for against in [config.limit()].into_iter().chain(ptp) {
            if against == config || !configs.contains(&against) {
                continue;
            }
            let ratio = |column, cpu| Stat::ratio(stat(config, column, cpu), stat(against, column, cpu));
            let cells: Vec<String> = columns
                .iter()
                .map(|&column| format!("{} | {}", ratio(column, false), ratio(column, true)))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                config.name(),
                against.name(),
                cells.join(" | ")
            );
        }
    }
    out.push('\n');
}
