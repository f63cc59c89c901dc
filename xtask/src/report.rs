//! The bench's outputs: a markdown table of medians, spreads and ratios, the raw JSON,
//! and a PNG chart.

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::bench::{Config, ControlPlane, Sample, PROGRAMS};
use crate::policy_bench::{Engine, PolicySample};
use crate::service_bench::{Balancer, ServiceSample, ServiceThroughput};

#[derive(Serialize, Deserialize)]
pub struct System {
    pub kernel: String,
    pub cpus: usize,
    pub loadavg: String,
}

impl System {
    pub fn read() -> anyhow::Result<Self> {
        Ok(Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_string(),
            cpus: std::thread::available_parallelism()?.get(),
            loadavg: std::fs::read_to_string("/proc/loadavg")?
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

#[derive(Serialize, Deserialize)]
pub struct Run {
    pub command: String,
    pub seconds: u32,
    pub rounds: u32,
    pub system_before: System,
    pub system_after: System,
    pub wall_time_s: f64,
    pub samples: Vec<Sample>,
    pub control_plane: ControlPlane,
    #[serde(default)]
    pub service_samples: Vec<ServiceSample>,
    #[serde(default)]
    pub service_throughput: Vec<ServiceThroughput>,
    #[serde(default)]
    pub policy_samples: Vec<PolicySample>,
    /// CNI ADD latency in ms of a pod a deny policy selects, by mode: the loader
    /// enforcing (first-packet isolation) or not.
    #[serde(default)]
    pub policy_add_ms: Vec<(String, Vec<f64>)>,
}

/// Median and range of one metric.
#[derive(Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// `median (min..max)`, or `-` for nothing measured.
    pub fn show(stat: Option<Self>) -> String {
        stat.map_or("-".into(), |s| {
            format!("{} ({}..{})", number(s.median), number(s.min), number(s.max))
        })
    }

    /// `ours` against `theirs` as the ratio of their medians (`1.07x`), or `-` when
    /// either was not measured (or `theirs` is 0).
    pub fn ratio(ours: Option<Self>, theirs: Option<Self>) -> String {
        match (ours, theirs) {
            (Some(ours), Some(theirs)) if theirs.median > 0.0 => format!("{:.2}x", ours.median / theirs.median),
            _ => "-".into(),
        }
    }

    /// `of`, or `None` for nothing measured.
    pub fn of_any(values: &[f64]) -> Option<Self> {
        (!values.is_empty()).then(|| Self::of(values))
    }

    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: percentile(&sorted, 50.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A metric, where it was measured.
type Metric = (&'static str, fn(&Sample) -> Option<f64>);

const METRICS: [Metric; 7] = [
    ("1 stream Gb/s", |s| Some(s.gbps_1)),
    ("4 streams Gb/s", |s| Some(s.gbps_4)),
    ("p50 us", |s| s.p50_us),
    ("p99 us", |s| s.p99_us),
    ("tps", |s| s.tps),
    ("CPU s/GB", |s| Some(s.cpu_s_per_gb)),
    ("conn/s", |s| s.crr_per_s),
];

/// Medians per (rules, config, metric); `None` for a metric never measured there.
fn summarize(samples: &[Sample]) -> BTreeMap<(u32, Config), Vec<Option<Stat>>> {
    let mut groups: BTreeMap<(u32, Config), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups.entry((s.netfilter_rules, s.config)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|(key, group)| {
            let stats = METRICS
                .iter()
                .map(|(_, get)| {
                    let values: Vec<f64> = group.iter().filter_map(|s| get(s)).collect();
                    Stat::of_any(&values)
                })
                .collect();
            (key, stats)
        })
        .collect()
}

/// The distinct values, in order.
fn distinct<T: Ord>(values: impl Iterator<Item = T>) -> Vec<T> {
    values.collect::<std::collections::BTreeSet<_>>().into_iter().collect()
}

fn number(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn markdown(run: &Run) -> String {
    let summary = summarize(&run.samples);
    let mut out = String::new();
    let s = &run.system_before;
    let _ = writeln!(
        out,
        "Kernel {}, {} CPUs, load average {} before and {} after; {} rounds of {} s per test, \
         configurations interleaved round-robin; wall time {:.0} s.\n",
        s.kernel, s.cpus, s.loadavg, run.system_after.loadavg, run.rounds, run.seconds, run.wall_time_s
    );
    let rule_sets = distinct(summary.keys().map(|(r, _)| *r));
    for rules in rule_sets {
        let _ = writeln!(out, "### Data plane, {rules} rules in FORWARD\n");
        let _ = writeln!(out, "Medians with (min..max) over the rounds.\n");
        let header: Vec<&str> = METRICS.iter().map(|(name, _)| *name).collect();
        let _ = writeln!(out, "| configuration | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(header.len()));
        for ((_, config), stats) in summary.iter().filter(|((r, _), _)| *r == rules) {
            let cells: Vec<String> = stats
                .iter()
                .map(|st| {
                    st.map_or("-".into(), |st| {
                        format!("{} ({}..{})", number(st.median), number(st.min), number(st.max))
                    })
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", config.name(), cells.join(" | "));
        }
        collapses_markdown(run, rules, &mut out);
        let _ = writeln!(
            out,
            "\nRatios of medians (higher is better, except p99: lower is better).\n"
        );
        let _ = writeln!(
            out,
            "| configuration | 1 stream vs ptp | vs limit | 4 streams vs ptp | vs limit | tps vs ptp | vs limit | p99 vs limit | conn/s vs limit | CPU s/GB vs limit |{}",
            if rules > 0 { " 1 stream vs own 0 rules | tps vs own 0 rules |" } else { "" }
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|{}",
            if rules > 0 { "---|---|" } else { "" }
        );
        for ((_, config), stats) in summary.iter().filter(|((r, _), _)| *r == rules) {
            let ratio = |other: Option<&Vec<Option<Stat>>>, metric: usize| {
                Stat::ratio(stats[metric], other.and_then(|o| o[metric]))
            };
            let ptp = summary.get(&(rules, Config::Ptp));
            let limit = summary.get(&(rules, config.limit()));
            let mut row = format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                config.name(),
                ratio(ptp, 0),
                ratio(limit, 0),
                ratio(ptp, 1),
                ratio(limit, 1),
                ratio(ptp, 4),
                ratio(limit, 4),
                ratio(limit, 3),
                ratio(limit, 6),
                ratio(limit, 5)
            );
            if rules > 0 {
                let unloaded = summary.get(&(0, *config));
                let _ = write!(row, " {} | {} |", ratio(unloaded, 0), ratio(unloaded, 4));
            }
            let _ = writeln!(out, "{row}");
        }
        let twins: Vec<_> = summary
            .iter()
            .filter(|((r, _), _)| *r == rules)
            .filter_map(|((_, config), stats)| {
                let twin = config.ipv4_twin()?;
                Some((config, stats, twin, summary.get(&(rules, twin))?))
            })
            .collect();
        let costs: Vec<_> = summary
            .keys()
            .filter(|(r, _)| *r == rules)
            .filter_map(|(_, config)| {
                let samples: Vec<&Sample> = run
                    .samples
                    .iter()
                    .filter(|s| s.config == *config && s.netfilter_rules == rules && !s.ns_per_run.is_empty())
                    .collect();
                (!samples.is_empty()).then_some((config, samples))
            })
            .collect();
        if !costs.is_empty() {
            let _ = writeln!(
                out,
                "\nCost of Velox's programs, ns per run (`kernel.bpf_stats_enabled`, over a 1-stream run of its own, medians with min..max).\n\n| configuration | {} |\n|---|{}",
                PROGRAMS.join(" | "),
                "---|".repeat(PROGRAMS.len())
            );
            for (config, samples) in costs {
                let cells: Vec<String> = PROGRAMS
                    .iter()
                    .map(|program| {
                        let values: Vec<f64> = samples
                            .iter()
                            .filter_map(|s| s.ns_per_run.get(*program).copied())
                            .collect();
                        match values.is_empty() {
                            true => "-".into(),
                            false => {
                                let st = Stat::of(&values);
                                format!("{:.0} ({:.0}..{:.0})", st.median, st.min, st.max)
                            }
                        }
                    })
                    .collect();
                let _ = writeln!(out, "| {} | {} |", config.name(), cells.join(" | "));
            }
        }
        if let Some(velox) = summary.get(&(rules, Config::VeloxVxlan)) {
            let references = [Config::KernelVxlan, Config::FlannelVxlan]
                .into_iter()
                .filter_map(|config| Some((config, summary.get(&(rules, config))?)))
                .collect::<Vec<_>>();
            if !references.is_empty() {
                let _ = writeln!(
                    out,
                    "\nVelox's VXLAN (pod to pod) against the kernel's, same run.\n\n\
                     | against | 1 stream | 4 streams | tps | conn/s | CPU s/GB |\n|---|---|---|---|---|---|"
                );
            }
            for (config, kernel) in references {
                let vs = |metric: usize| Stat::ratio(velox[metric], kernel[metric]);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    config.name(),
                    vs(0),
                    vs(1),
                    vs(4),
                    vs(6),
                    vs(5)
                );
            }
        }
        if !twins.is_empty() {
            let _ = writeln!(
                out,
                "\nIPv6 against the same path over IPv4, same run.\n\n| configuration | 1 stream vs IPv4 | 4 streams vs IPv4 |\n|---|---|---|"
            );
            for (config, stats, twin, v4) in twins {
                let vs = |metric: usize| Stat::ratio(stats[metric], v4[metric]);
                let _ = writeln!(out, "| {} vs {} | {} | {} |", config.name(), twin.name(), vs(0), vs(1));
            }
        }
        out.push('\n');
    }
    let shapes: Vec<(Config, &[crate::anchor_shapes::ShapeSample])> =
        run.samples.iter().map(|s| (s.config, s.shapes.as_slice())).collect();
    crate::anchor_shapes::markdown(&shapes, &mut out);
    services_markdown(run, &mut out);
    policies_markdown(run, &mut out);
    let cp = &run.control_plane;
    let _ = writeln!(out, "### Control plane\n");
    let _ = writeln!(
        out,
        "CNI calls timed as a runtime sees them (process start included), {} pods each.\n",
        cp.parallel_pods
    );
    let _ = writeln!(
        out,
        "| configuration | ADD median ms | ADD p99 ms | DEL median ms | DEL p99 ms |\n|---|---|---|---|---|"
    );
    for ((label, add), (_, del)) in cp.add_ms.iter().zip(&cp.del_ms) {
        let (mut add, mut del) = (add.clone(), del.clone());
        add.sort_by(f64::total_cmp);
        del.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} |",
            percentile(&add, 50.0),
            percentile(&add, 99.0),
            percentile(&del, 50.0),
            percentile(&del, 99.0)
        );
    }
    let _ = writeln!(
        out,
        "\n8 ADDs at a time ({} pods each):\n\n| configuration | ADD median ms | ADD p99 ms |\n|---|---|---|",
        cp.parallel_pods
    );
    for (label, add) in &cp.concurrent_add_ms {
        let mut add = add.clone();
        add.sort_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "| {label} | {:.1} | {:.1} |",
            percentile(&add, 50.0),
            percentile(&add, 99.0)
        );
    }
    let _ = writeln!(
        out,
        "\n{} Velox pods created 8 at a time in {:.2} s.",
        cp.parallel_pods, cp.parallel_create_s
    );
    for (endpoints, kib) in &cp.loader_rss_kib {
        let _ = writeln!(
            out,
            "velox-loader resident memory with {endpoints} endpoints: {:.1} MiB.",
            *kib as f64 / 1024.0
        );
    }
    out
}

/// Rounds whose throughput fell below 0.8x of their configuration's own median: a
/// collapse shows here instead of being averaged away.
fn collapses_markdown(run: &Run, rules: u32, out: &mut String) {
    let configs = distinct(
        run.samples
            .iter()
            .filter(|s| s.netfilter_rules == rules)
            .map(|s| s.config),
    );
    let _ = writeln!(
        out,
        "\nRounds below 0.8x of the configuration's own median (collapses), of {} rounds.\n",
        run.rounds
    );
    let _ = writeln!(
        out,
        "| configuration | 1 stream | 4 streams | CPU steal in the 4-stream test (s): collapsed rounds / the others |\n|---|---|---|---|"
    );
    for config in configs {
        let samples: Vec<&Sample> = run
            .samples
            .iter()
            .filter(|s| s.netfilter_rules == rules && s.config == config)
            .collect();
        let collapsed = |get: fn(&Sample) -> f64| {
            let median = Stat::of(&samples.iter().map(|s| get(s)).collect::<Vec<_>>()).median;
            samples.iter().map(|s| get(s) < 0.8 * median).collect::<Vec<bool>>()
        };
        let (one, four) = (collapsed(|s| s.gbps_1), collapsed(|s| s.gbps_4));
        let steal = |collapsed: bool| {
            let steal: Vec<String> = samples
                .iter()
                .zip(&four)
                .filter(|(_, c)| **c == collapsed)
                .map(|(s, _)| format!("{:.2}", s.steal_4_s))
                .collect();
            if steal.is_empty() {
                "-".to_string()
            } else {
                steal.join(", ")
            }
        };
        let count = |flags: &[bool]| flags.iter().filter(|c| **c).count();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} |",
            config.name(),
            count(&one),
            count(&four),
            steal(true),
            steal(false)
        );
    }
}

/// The Service section: connection rate and first-byte latency per balancer and
/// Service count, and throughput through a Service.
fn services_markdown(run: &Run, out: &mut String) {
    if run.service_samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Services\n");
    let _ = writeln!(
        out,
        "TCP connect, first byte, close, again, for {} s from a pod on worker-1 (pod-1 through kube-proxy, pod-4 \
         through the socket LB) to a ClusterIP with two backends on worker-2; the measured Service sits in the \
         middle of the list. Medians with (min..max) over the rounds.\n",
        run.seconds
    );
    let _ = writeln!(
        out,
        "| balancer | Services | connections/s | first byte p50 us | first byte p99 us | conn/s vs kube-proxy |\n|---|---|---|---|---|---|"
    );
    let counts = distinct(run.service_samples.iter().map(|s| s.services));
    let balancers = distinct(run.service_samples.iter().map(|s| s.balancer));
    let stat = |balancer: Balancer, count: usize, get: fn(&ServiceSample) -> f64| {
        let values: Vec<f64> = run
            .service_samples
            .iter()
            .filter(|s| s.balancer == balancer && s.services == count)
            .map(get)
            .collect();
        Stat::of_any(&values)
    };
    for &count in &counts {
        for &balancer in &balancers {
            let rate = stat(balancer, count, |s| s.connections_per_s);
            let baseline = stat(Balancer::KubeProxy, count, |s| s.connections_per_s);
            let ratio = Stat::ratio(rate, baseline);
            let _ = writeln!(
                out,
                "| {} | {count} | {} | {} | {} | {ratio} |",
                balancer.name(),
                Stat::show(rate),
                Stat::show(stat(balancer, count, |s| s.first_byte_p50_us)),
                Stat::show(stat(balancer, count, |s| s.first_byte_p99_us)),
            );
        }
    }
    if !run.service_throughput.is_empty() {
        let via: Vec<f64> = run.service_throughput.iter().map(|t| t.via_service_gbps).collect();
        let direct: Vec<f64> = run.service_throughput.iter().map(|t| t.pod_to_pod_gbps).collect();
        let (via, direct) = (Stat::of(&via), Stat::of(&direct));
        let _ = writeln!(
            out,
            "\nOne iperf3 stream through a Service (socket LB) {} Gb/s ({}..{}), pod to pod {} Gb/s ({}..{}): {:.2}x.\n",
            number(via.median),
            number(via.min),
            number(via.max),
            number(direct.median),
            number(direct.min),
            number(direct.max),
            via.median / direct.median
        );
    } else {
        out.push('\n');
    }
}

/// The NetworkPolicy section: per engine and policy count, established-flow
/// throughput and round trips and the connection rate, each against the same engine
/// without policy.
fn policies_markdown(run: &Run, out: &mut String) {
    if run.policy_samples.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "### NetworkPolicy
"
    );
    let _ = writeln!(
        out,
        "The server pod isolated by N policies (each admits one peer; the last also admits the client), the client \
         on the same node. One iperf3 stream and busy-poll TCP round trips (sockperf) are established flows; \
         connections/s is connect, first byte, close. iptables: the same policies as FORWARD rules on the ptp \
         plugin (conntrack ESTABLISHED first, then a rule per peer). {} s per test, medians with (min..max) over \
         the rounds; \"vs 0\" compares an engine with itself without policy. from_pod ns/packet: bpf_stats \
         during 2 s of one stream and of connections, the datapath's own cost, which the machine's noise \
         does not blur.\n",
        run.seconds
    );
    let _ = writeln!(
        out,
        "| engine | policies | Gb/s | vs 0 | RTT p50 us | vs 0 | RTT p99 us | connections/s | vs 0 | from_pod ns/packet, flow | connections |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let stat_of = |engine: Engine, count: usize, get: &dyn Fn(&PolicySample) -> Option<f64>| {
        let values: Vec<f64> = run
            .policy_samples
            .iter()
            .filter(|s| s.engine == engine && s.policies == count)
            .filter_map(get)
            .collect();
        Stat::of_any(&values)
    };
    let stat = |engine, count, get: fn(&PolicySample) -> f64| stat_of(engine, count, &|s| Some(get(s)));
    let versus = |engine, count, get: fn(&PolicySample) -> f64| match (stat(engine, count, get), stat(engine, 0, get)) {
        (Some(s), Some(base)) => format!("{:.3}x", s.median / base.median),
        _ => "-".into(),
    };
    for engine in distinct(run.policy_samples.iter().map(|s| s.engine)) {
        for count in distinct(run.policy_samples.iter().map(|s| s.policies)) {
            let _ = writeln!(
                out,
                "| {} | {count} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                engine.name(),
                Stat::show(stat(engine, count, |s| s.gbps)),
                versus(engine, count, |s| s.gbps),
                Stat::show(stat(engine, count, |s| s.rtt_p50_us)),
                versus(engine, count, |s| s.rtt_p50_us),
                Stat::show(stat(engine, count, |s| s.rtt_p99_us)),
                Stat::show(stat(engine, count, |s| s.connections_per_s)),
                versus(engine, count, |s| s.connections_per_s),
                Stat::show(stat_of(engine, count, &|s| s.from_pod_ns_established)),
                Stat::show(stat_of(engine, count, &|s| s.from_pod_ns_connections)),
            );
        }
    }
    if !run.policy_add_ms.is_empty() {
        let modes: Vec<String> = run
            .policy_add_ms
            .iter()
            .map(|(mode, ms)| format!("{mode} {}", Stat::show(Stat::of_any(ms))))
            .collect();
        let _ = writeln!(
            out,
            "\nCNI ADD of a pod a deny policy selects, ms, interleaved by round: {}",
            modes.join("; ")
        );
    }
    out.push('\n');
}

/// Renders the table and chart again from a run's `results.json`.
pub fn rerender(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let run: Run =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
    write(&run, dir)
}

pub fn write(run: &Run, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let table = markdown(run);
    std::fs::write(dir.join("results.md"), &table)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(run)?)?;
    chart(run, &dir.join("results.png"))?;
    println!("\n{table}");
    println!(
        "written: {0}/results.md, {0}/results.json, {0}/results.png",
        dir.display()
    );
    Ok(())
}

/// Two panels: single-stream throughput and transactions per second, each bar a
/// configuration's median, with and without the netfilter load side by side.
fn chart(run: &Run, path: &Path) -> anyhow::Result<()> {
    let font =
        std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").context("DejaVu font (fonts-dejavu-core)")?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("bad font"))?;
    let summary = summarize(&run.samples);
    let configs = distinct(summary.keys().map(|(_, c)| *c));
    let rules = distinct(summary.keys().map(|(r, _)| *r));
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];
    for (panel, (title, metric, scale)) in panels.iter().zip([
        ("iperf3 TCP, 1 stream (Gbit/s)", 0, 1.0),
        ("TCP request/response, busy poll (thousand transactions/s)", 4, 1e-3),
    ]) {
        // Headroom above the tallest bar keeps the legend clear of the bars.
        let max = summary
            .values()
            .filter_map(|s| s[metric])
            .map(|s| s.max * scale)
            .fold(0.0, f64::max)
            * 1.4;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..configs.len() as f64, 0f64..max.max(1.0))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(configs.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < configs.len() {
                    configs[i].name().to_string()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 15))
            .draw()?;
        let width = 0.8 / rules.len() as f64;
        for (k, rule_count) in rules.iter().enumerate() {
            let color = colors[k % colors.len()];
            let bars = configs.iter().enumerate().filter_map(|(i, c)| {
                let stat = summary.get(&(*rule_count, *c))?[metric]?;
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.95, stat.median * scale)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)?
                .label(format!("{rule_count} FORWARD rules"))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
            let spreads = configs.iter().enumerate().filter_map(|(i, c)| {
                let stat = summary.get(&(*rule_count, *c))?[metric]?;
                let x = i as f64 + 0.1 + k as f64 * width + width * 0.475;
                Some(PathElement::new(
                    vec![(x, stat.min * scale), (x, stat.max * scale)],
                    BLACK.stroke_width(2),
                ))
            });
            chart.draw_series(spreads)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present().context("writing the chart")?;
    Ok(())
}
