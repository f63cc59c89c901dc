//! `/metrics` in Prometheus text format on `--metrics-address`: the datapath's
//! counters per interface and drops by reason (read from the maps at each scrape),
//! map fill levels, reconcile durations, and the cluster source's watch events and
//! failures.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use velox_common::DROP_REASONS;
use velox_node::maps::{EndpointMaps, PeerMap, PolicyFlowShares, PolicyMaps, ServiceMaps};
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
    /// Cluster pod addresses whose identity the last pass could not write.
    pub policy_addresses_without_identity: Gauge,
    /// Service frontends the last pass could not write.
    pub services_failed_frontends: Gauge,
    /// Drops and allowed connections without a flow record: the datapath's event
    /// ring was full.
    pub flow_records_lost: Counter,
    /// Drops not recorded because their source was over its limit.
    pub flow_records_limited: Counter,
    /// Flow records the loader holds.
    pub flow_records_kept: Gauge,
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
            policy_addresses_without_identity: Gauge::default(),
            services_failed_frontends: Gauge::default(),
            flow_records_lost: Counter::default(),
            flow_records_limited: Counter::default(),
            flow_records_kept: Gauge::default(),
        }
    }

    /// Serves `/metrics` on `address` from a thread of its own, for as long as the
    /// loader runs: a scrape never holds up the reconcile loop. An address that
    /// cannot be bound is tried again every few seconds; until then `failure` holds
    /// why, which health shows (the datapath and the loader work on).
    pub fn serve(&self, address: SocketAddr, bpffs: Bpffs, state_dir: StateDir, failure: Arc<Mutex<Option<String>>>) {
        let scrapes = Arc::new(Scrapes {
            registry: self.registry(bpffs, state_dir),
            last: Mutex::new(None),
        });
        let report = Arc::clone(&failure);
        let serving = move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let listener = loop {
                    match tokio::net::TcpListener::bind(address).await {
                        Ok(listener) => break listener,
                        Err(e) => {
                            let why = format!("binding the metrics address {address}: {e}");
                            log::error!("{why}; trying again in {BIND_RETRY:?}");
                            *lock(&failure) = Some(why);
                            tokio::time::sleep(BIND_RETRY).await;
                        }
                    }
                };
                *lock(&failure) = None;
                log::info!("metrics on http://{address}/metrics");
                accept(listener, scrapes).await;
            });
            anyhow::Ok(())
        };
        // However the server ends (it serves for good otherwise), health says so.
        let stopped = move |why: String| {
            log::error!("{why}");
            *lock(&report) = Some(why);
        };
        let spawned = std::thread::Builder::new().name("metrics".into()).spawn({
            let stopped = stopped.clone();
            move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(serving)) {
                Ok(Ok(())) => stopped("the metrics server stopped".into()),
                Ok(Err(e)) => stopped(format!("the metrics server stopped: {e:#}")),
                Err(_) => stopped("the metrics server panicked".into()),
            }
        });
        if let Err(e) = spawned {
            stopped(format!("starting the metrics thread: {e}"));
        }
    }

    fn registry(&self, bpffs: Bpffs, state_dir: StateDir) -> Registry {
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
            "policy_addresses_without_identity",
            "Cluster pod addresses whose identity could not be written (a full map, a failed write): no \
             selector admits them",
            self.policy_addresses_without_identity.clone(),
        );
        registry.register(
            "services_failed_frontends",
            "Service frontends the last pass could not write (a full map, a failed write): they keep what the \
             maps had until a later pass writes them",
            self.services_failed_frontends.clone(),
        );
        registry.register(
            "flow_records_lost",
            "Drops and allowed connections with no flow record: the datapath's event ring was full",
            self.flow_records_lost.clone(),
        );
        registry.register(
            "flow_records_limited",
            "Drops with no flow record because their source address was over its limit of events a second",
            self.flow_records_limited.clone(),
        );
        registry.register(
            "flow_records_kept",
            "Flow records the loader holds (at most --flow-records)",
            self.flow_records_kept.clone(),
        );
        registry.register_collector(Box::new(Datapath { bpffs, state_dir }));
        registry
    }
}

/// Connections served at once; one more is closed at once.
const MAX_CONNECTIONS: usize = 8;
/// A client has this long to send its request's headers...
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and this long in all, keep-alive included.
const CONNECTION_TIME: Duration = Duration::from_secs(30);
/// Scrapes within this of the one before get its text: the maps are read at most
/// once per interval, however often anyone asks.
const SCRAPE_REUSE: Duration = Duration::from_secs(1);
/// After a failed accept (out of file descriptors, say), the next one waits this.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
const BIND_RETRY: Duration = Duration::from_secs(5);

/// The registry, and the last scrape's text with when it was taken.
struct Scrapes {
    registry: Registry,
    last: Mutex<Option<(Instant, String)>>,
}

impl Scrapes {
    fn text(&self) -> Result<String, std::fmt::Error> {
        let mut last = lock(&self.last);
        if let Some((taken, text)) = last.as_ref().filter(|(taken, _)| taken.elapsed() < SCRAPE_REUSE) {
            log::trace!("metrics: reusing the scrape of {:?} ago", taken.elapsed());
            return Ok(text.clone());
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        *last = Some((Instant::now(), text.clone()));
        Ok(text)
    }

    fn answer(&self, path: &str) -> hyper::Response<Full<Bytes>> {
        let (status, body) = match path {
            "/metrics" => match self.text() {
                Ok(text) => (200, text),
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
}

/// A lock whose holder panicked still guards a whole value here: take it.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves connections until the loader ends: at most `MAX_CONNECTIONS` at once, each
/// within its time limits, and a failed accept never ends the loop.
async fn accept(listener: tokio::net::TcpListener, scrapes: Arc<Scrapes>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Over the limit the stream is dropped: closed.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(scrapes.answer(request.uri().path())) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
            drop(permit);
        });
    }
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
            (
                "policy_identity_rules",
                policy.as_ref().map(PolicyMaps::identity_rule_count),
            ),
            ("policy_identities", policy.as_ref().map(PolicyMaps::identity_count)),
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
        if let Ok(shares) = PolicyFlowShares::open(&self.bpffs) {
            let (_, size) = shares.limits();
            for (name, help, value) in [
                (
                    "policy_flow_pool_entries",
                    "Allowed connections held beyond their pods' reserved shares (--policy-flows)",
                    shares.pool_used(),
                ),
                (
                    "policy_flow_pool_size",
                    "How many connections the shared pool holds at most; beyond it, a pod past its share is refused",
                    size,
                ),
            ] {
                let gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value as i64).encode(gauge)?;
            }
        }
        Ok(())
    }
}
