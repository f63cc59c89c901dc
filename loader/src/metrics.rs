//! `/metrics` in Prometheus text format on `--metrics-address`: the datapath's
//! counters per interface and drops by reason (read from the maps at each scrape),
//! map fill levels, reconcile durations, and the cluster source's watch events and
//! failures.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use velox_common::DROP_REASONS;
use velox_node::maps::{EndpointMaps, PeerMap, PolicyMaps, ServiceMaps};
use velox_node::{Bpffs, StateDir};

use crate::names::{interface_names, pods_by_interface};

/// A resource (`nodes`, `services`, ...) or file the cluster source reads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub resource: String,
}

/// What the loader's own work records; the datapath's numbers are read at scrape.
#[derive(Clone)]
pub struct Metrics {
    /// Seconds per reconcile pass of the endpoints and links.
    pub reconcile_seconds: Histogram,
    /// Events a watch delivered, per resource.
    pub watch_events: Family<SourceLabels, Counter>,
    /// Failed lists, watches and requests of the API server, per resource.
    pub api_errors: Family<SourceLabels, Counter>,
    /// Objects the source leaves out because it cannot read them, per resource
    /// (the kind, from files): as of the last read of the files, or since the watch
    /// last listed.
    pub objects_skipped: Family<SourceLabels, Gauge>,
    /// Pods whose policy rules the last pass could not write (they deny instead).
    pub policy_failed_closed: Gauge,
    /// Named pods that deny everything until the source shows their Pod object.
    pub policy_waiting_for_pod_object: Gauge,
    /// Service frontends the last pass could not write.
    pub services_failed_frontends: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            // 1 ms to about 4 s.
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            watch_events: Family::default(),
            api_errors: Family::default(),
            objects_skipped: Family::default(),
            policy_failed_closed: Gauge::default(),
            policy_waiting_for_pod_object: Gauge::default(),
            services_failed_frontends: Gauge::default(),
        }
    }

    /// Serves `/metrics` on `address` for as long as the loader runs.
    pub async fn serve(&self, address: SocketAddr, bpffs: Bpffs, state_dir: StateDir) -> anyhow::Result<()> {
        let mut registry = Registry::with_prefix("velox");
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile pass over the endpoint records, maps and links",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "watch_events",
            "Events the cluster source's watches delivered, per resource",
            self.watch_events.clone(),
        );
        registry.register(
            "api_errors",
            "Failed requests to the Kubernetes API server, per resource",
            self.api_errors.clone(),
        );
        registry.register(
            "source_objects_skipped",
            "Objects the cluster source leaves out because it cannot read them, per resource",
            self.objects_skipped.clone(),
        );
        registry.register(
            "policy_pods_failed_closed",
            "Pods whose NetworkPolicy rules could not be written (a full rules map, a failed write): they deny \
             what those rules would allow",
            self.policy_failed_closed.clone(),
        );
        registry.register(
            "policy_pods_waiting_for_pod_object",
            "Pods that deny everything because the cluster source has not shown their Pod object yet",
            self.policy_waiting_for_pod_object.clone(),
        );
        registry.register(
            "services_failed_frontends",
            "Service frontends the last pass could not write (a full map, a failed write): they keep what the \
             maps had until a later pass writes them",
            self.services_failed_frontends.clone(),
        );
        registry.register_collector(Box::new(Datapath { bpffs, state_dir }));
        let registry = Arc::new(registry);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics address {address}"))?;
        log::info!("metrics on http://{address}/metrics");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let registry = registry.clone();
                let service = hyper::service::service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&registry, request.uri().path())) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Ok(())
    }
}

fn answer(registry: &Registry, path: &str) -> hyper::Response<Full<Bytes>> {
    let mut text = String::new();
    let (status, body) = match path {
        "/metrics" => match prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
            Ok(()) => (200, text),
            Err(e) => (500, format!("encoding the metrics: {e}\n")),
        },
        _ => (404, "only /metrics is here\n".to_string()),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// One counter family of constant samples.
fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The datapath's numbers, read from the pinned maps when scraped.
#[derive(Debug)]
struct Datapath {
    bpffs: Bpffs,
    state_dir: StateDir,
}

/// An interface, and the pod behind it where the runtime named it (empty for the
/// uplink and unnamed pods), as the `namespace` and `pod` labels kube-state-metrics
/// and cAdvisor use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    #[prometheus(flatten)]
    interface: InterfaceLabels,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    #[prometheus(flatten)]
    interface: InterfaceLabels,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

/// The drops' help lists every reason the `reason` label takes, from the drop-reason table.
fn drops_help() -> String {
    let reasons: Vec<String> = DROP_REASONS
        .iter()
        .map(|reason| format!("{}: {}", reason.name, reason.help))
        .collect();
    format!("Packets dropped on an interface, by reason ({})", reasons.join("; "))
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A map that cannot be read (the loader is still starting) is left out.
        let Ok(maps) = EndpointMaps::open(&self.bpffs) else {
            return Ok(());
        };
        let mut interfaces = maps.interfaces().unwrap_or_default();
        interfaces.sort();
        let names = interface_names();
        let pods = pods_by_interface(&self.state_dir);
        let counters: Vec<(InterfaceLabels, _)> = interfaces
            .iter()
            .filter_map(|(ifindex, slot)| {
                let name = names.get(ifindex).cloned().unwrap_or_else(|| ifindex.to_string());
                let pod = pods.get(&name);
                let labels = InterfaceLabels {
                    namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
                    pod: pod.map(|p| p.name.clone()).unwrap_or_default(),
                    interface: name,
                };
                Some((labels, maps.counters(*slot).ok()?))
            })
            .collect();

        let (mut packets, mut bytes, mut drops) = (Vec::new(), Vec::new(), Vec::new());
        for (interface, c) in &counters {
            let verdict = |verdict, value| {
                let interface = interface.clone();
                (VerdictLabels { interface, verdict }, value)
            };
            packets.extend([
                verdict("redirected", c.redirected_packets),
                verdict("passed", c.passed_packets),
                verdict("dropped", c.dropped_packets()),
            ]);
            bytes.extend([
                verdict("redirected", c.redirected_bytes),
                verdict("passed", c.passed_bytes),
            ]);
            drops.extend(DROP_REASONS.iter().zip(c.dropped).map(|(reason, count)| {
                let interface = interface.clone();
                (
                    DropLabels {
                        interface,
                        reason: reason.name,
                    },
                    count,
                )
            }));
        }
        encode_counters(
            &mut encoder,
            "interface_packets",
            "Packets a Velox program saw on an interface (a pod's host veth: what the pod sent; the uplink: \
             what arrived), by verdict",
            packets,
        )?;
        encode_counters(
            &mut encoder,
            "interface_bytes",
            "Bytes a Velox program redirected or passed to the kernel on an interface",
            bytes,
        )?;
        encode_counters(&mut encoder, "drops", &drops_help(), drops)?;

        self.encode_map_fill(&mut encoder, &maps, interfaces.len())
    }
}

impl Datapath {
    /// How full the maps are, and how many pods the counters have slots for.
    fn encode_map_fill(
        &self,
        encoder: &mut DescriptorEncoder,
        maps: &EndpointMaps,
        interfaces: usize,
    ) -> Result<(), std::fmt::Error> {
        let policy = PolicyMaps::open(&self.bpffs).ok();
        let fill = [
            ("endpoints", maps.entries().map(|e| e.len()).ok()),
            ("interfaces", Some(interfaces)),
            (
                "peers",
                PeerMap::open(&self.bpffs)
                    .and_then(|m| m.entries())
                    .map(|e| e.len())
                    .ok(),
            ),
            (
                "services",
                ServiceMaps::open(&self.bpffs)
                    .and_then(|m| m.frontends())
                    .map(|s| s.len())
                    .ok(),
            ),
            (
                "policy_rules",
                policy.as_ref().and_then(|m| m.rules().ok()).map(|r| r.len()),
            ),
            ("policy_flows", policy.as_ref().map(PolicyMaps::flows)),
        ];
        let mut entries =
            encoder.encode_descriptor("map_entries", "Entries in a Velox map", None, MetricType::Gauge)?;
        for (map, count) in fill {
            if let Some(count) = count {
                ConstGauge::new(count as i64).encode(entries.encode_family(&MapLabels { map })?)?;
            }
        }
        let max_pods = encoder.encode_descriptor(
            "max_pods",
            "Pods this node has counters slots for (--max-pods)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(maps.max_pods())).encode(max_pods)?;
        Ok(())
    }
}
