//! The Kubernetes API server as the loader's cluster source: a watch with a
//! reflector cache per resource. While the API server is away, or a watch has
//! expired (410 Gone), the caches keep the last known state, the datapath forwards
//! with it, and the watches list again with back-off; the health answer and the
//! log say so.

use anyhow::Context;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use velox_node::health::SourceHealth;

use super::{endpoint_slice_from_v1beta1, ClusterSource, PolicyInput, ServicesInput};
use crate::metrics::{Metrics, SourceLabels};

/// How each watch is doing.
#[derive(Default)]
struct WatchStatus {
    /// It has listed at least once: its cache holds the cluster's state.
    listed: bool,
    /// The last failure, until the watch works again.
    error: Option<String>,
    /// The last object it could not read.
    skipped: Option<String>,
}

type Statuses = Arc<Mutex<BTreeMap<&'static str, WatchStatus>>>;

pub struct ApiSource {
    client: Client,
    metrics: Metrics,
    /// This node's Node, whose status says when its network is ready.
    node_name: Option<String>,
    nodes: Store<Node>,
    /// With the socket load balancer only.
    services: Option<(Store<Service>, Store<EndpointSlice>)>,
    /// With NetworkPolicy only.
    policy: Option<(Store<NetworkPolicy>, Store<Namespace>)>,
    /// With NetworkPolicy, or to name flow records' ends.
    pods: Option<Store<Pod>>,
    /// Bumped by every event of every watch.
    generation: Arc<AtomicU64>,
    seen: u64,
    statuses: Statuses,
}

impl ApiSource {
    /// A client from `kubeconfig`, or the usual places (`KUBECONFIG`, the
    /// in-cluster service account), and the watches. Nothing here waits for the API
    /// server: a node whose pins and state are there starts without it.
    pub async fn start(
        kubeconfig: Option<&Path>,
        with_services: bool,
        with_policy: bool,
        with_pods: bool,
        node_name: Option<String>,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(file, &Default::default()).await?
            }
            None => Config::infer()
                .await
                .context("no kubeconfig and not in a cluster (KUBERNETES_SERVICE_HOST)")?,
        };
        log::info!("cluster source: the Kubernetes API at {}", config.cluster_url);
        let client = Client::try_from(config)?;
        let generation = Arc::new(AtomicU64::new(0));
        let statuses = Statuses::default();
        let watch = |name| Watch {
            name,
            generation: generation.clone(),
            statuses: statuses.clone(),
            metrics: metrics.clone(),
        };
        let nodes = watch("nodes").start(Api::<Node>::all(client.clone()));
        let services = with_services.then(|| {
            (
                watch("services").start(Api::<Service>::all(client.clone())),
                watch("endpointslices").start_endpoint_slices(client.clone()),
            )
        });
        let policy = with_policy.then(|| {
            (
                watch("networkpolicies").start(Api::<NetworkPolicy>::all(client.clone())),
                watch("namespaces").start(Api::<Namespace>::all(client.clone())),
            )
        });
        let pods = (with_policy || with_pods).then(|| watch("pods").start(Api::<Pod>::all(client.clone())));
        Ok(Self {
            client,
            metrics,
            node_name,
            nodes,
            services,
            policy,
            pods,
            generation,
            seen: u64::MAX,
            statuses,
        })
    }

    fn listed(&self, name: &str) -> bool {
        self.statuses.lock().unwrap().get(name).is_some_and(|s| s.listed)
    }
}

/// Tells the cluster a node's network is up: the Node condition
/// `NetworkUnavailable=False`, which kubelet waits for from a network plugin.
async fn mark_network_available(client: Client, node_name: &str) -> anyhow::Result<()> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "VeloxIsUp",
        "message": "velox-loader runs on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}});
    Api::<Node>::all(client)
        .patch_status(node_name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(explain)
        .with_context(|| format!("setting NetworkUnavailable=False on node {node_name}"))?;
    log::info!("node {node_name}: NetworkUnavailable=False");
    Ok(())
}

impl ClusterSource for ApiSource {
    fn changed(&mut self) -> bool {
        let generation = self.generation.load(Ordering::Relaxed);
        let changed = generation != self.seen;
        self.seen = generation;
        changed
    }

    fn nodes(&mut self) -> Option<Vec<Node>> {
        if !self.listed("nodes") {
            return None;
        }
        Some(contents(&self.nodes))
    }

    fn services(&mut self) -> Option<ServicesInput> {
        let (services, slices) = self.services.as_ref()?;
        if !self.listed("services") || !self.listed("endpointslices") {
            return None;
        }
        Some(ServicesInput {
            services: contents(services),
            slices: contents(slices),
        })
    }

    fn policy(&mut self) -> Option<PolicyInput> {
        let ((policies, namespaces), pods) = (self.policy.as_ref()?, self.pods.as_ref()?);
        if !["networkpolicies", "pods", "namespaces"]
            .iter()
            .all(|name| self.listed(name))
        {
            return None;
        }
        Some(PolicyInput {
            policies: contents(policies),
            pods: contents(pods),
            namespaces: contents(namespaces),
        })
    }

    fn pods(&mut self) -> Option<Vec<Pod>> {
        let pods = self.pods.as_ref()?;
        self.listed("pods").then(|| contents(pods))
    }

    fn health(&self) -> SourceHealth {
        let statuses = self.statuses.lock().unwrap();
        let errors: Vec<String> = statuses
            .iter()
            .flat_map(|(name, status)| {
                let skipped = status.skipped.as_ref().map(|s| format!("{name}: skipped {s}"));
                status.error.iter().map(move |e| format!("{name}: {e}")).chain(skipped)
            })
            .collect();
        SourceHealth {
            source: "kubernetes".into(),
            synced: errors.is_empty() && statuses.values().all(|s| s.listed),
            errors,
        }
    }

    /// Sets the condition in the background, retrying until the API server takes it.
    fn network_ready(&mut self) {
        let Some(node_name) = self.node_name.clone() else {
            return log::warn!("no --node-name: the Node's NetworkUnavailable condition is left alone");
        };
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let mut retry = Retry::default();
            while let Err(e) = mark_network_available(client.clone(), &node_name).await {
                metrics.api_errors.get_or_create(&labels("nodes/status")).inc();
                let delay = retry.next_delay();
                log::warn!("{e:#}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        });
    }
}

/// A copy of what a cache holds.
fn contents<K>(store: &Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|object| (**object).clone()).collect()
}

/// One resource's watch, feeding a reflector cache.
struct Watch {
    name: &'static str,
    generation: Arc<AtomicU64>,
    statuses: Statuses,
    metrics: Metrics,
}

impl Watch {
    fn start<K>(self, api: Api<K>) -> Store<K>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (reader, mut writer) = reflector::store();
        self.statuses.lock().unwrap().insert(self.name, WatchStatus::default());
        tokio::spawn(async move {
            let mut retry = Retry::default();
            loop {
                let ended = self
                    .follow(
                        watcher(api.clone(), watcher::Config::default()),
                        &mut writer,
                        &mut retry,
                    )
                    .await;
                self.failed(explain_watch(ended));
                tokio::time::sleep(retry.next_delay()).await;
            }
        });
        reader
    }

    /// EndpointSlices as `discovery.k8s.io/v1` where the API server serves it (from
    /// Kubernetes 1.21), else as `v1beta1` (1.17 to 1.24), as kube-proxy does: the
    /// version is asked again whenever neither answers.
    fn start_endpoint_slices(self, client: Client) -> Store<EndpointSlice> {
        let (reader, mut writer) = reflector::store();
        self.statuses.lock().unwrap().insert(self.name, WatchStatus::default());
        tokio::spawn(async move {
            let mut retry = Retry::default();
            let mut legacy = false;
            loop {
                let ended = if legacy {
                    let api = Api::<DynamicObject>::all_with(client.clone(), &endpoint_slices_v1beta1());
                    let events = watcher(api, watcher::Config::default())
                        .filter_map(|event| std::future::ready(self.convert_legacy_slice(event)));
                    self.follow(events, &mut writer, &mut retry).await
                } else {
                    let api = Api::<EndpointSlice>::all(client.clone());
                    self.follow(watcher(api, watcher::Config::default()), &mut writer, &mut retry)
                        .await
                };
                if is_not_found(&ended) {
                    legacy = !legacy;
                    if legacy {
                        log::info!(
                            "the API server serves no discovery.k8s.io/v1 EndpointSlices (Kubernetes before \
                             1.21): watching discovery.k8s.io/v1beta1"
                        );
                        continue;
                    }
                }
                self.failed(explain_watch(ended));
                tokio::time::sleep(retry.next_delay()).await;
            }
        });
        reader
    }

    /// Lists, then watches from the list's version, into `writer`, until the first
    /// failure (410 Gone included), which it returns: the next round, after a
    /// back-off, lists again. The cache keeps its content until a new list is
    /// complete. The back-off starts again only after a round that worked for a
    /// while: a list that succeeds before a watch that fails is no progress.
    async fn follow<K>(
        &self,
        events: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
        writer: &mut Writer<K>,
        retry: &mut Retry,
    ) -> watcher::Error
    where
        K: kube::Resource + Clone,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        let started = Instant::now();
        futures_util::pin_mut!(events);
        let ended = loop {
            match events.next().await {
                Some(Ok(event)) => {
                    writer.apply_watcher_event(&event);
                    self.observed(&event);
                }
                Some(Err(e)) => break e,
                // The watcher's stream has no end; were it to end, the round failed.
                None => break watcher::Error::NoResourceVersion,
            }
        };
        if started.elapsed() >= WORKED_FOR_A_WHILE {
            retry.reset();
        }
        ended
    }

    /// A `v1beta1` EndpointSlice event as a `v1` one; an object that does not convert
    /// is skipped, counted and named in health.
    fn convert_legacy_slice(
        &self,
        event: watcher::Result<watcher::Event<DynamicObject>>,
    ) -> Option<watcher::Result<watcher::Event<EndpointSlice>>> {
        use watcher::Event::*;
        let convert = |object: DynamicObject| -> Result<EndpointSlice, EndpointSlice> {
            let metadata = object.metadata.clone();
            serde_json::to_value(object)
                .map_err(anyhow::Error::from)
                .and_then(|v| endpoint_slice_from_v1beta1(v).map_err(anyhow::Error::from))
                .map_err(|e| {
                    let name = format!(
                        "{}/{}",
                        metadata.namespace.as_deref().unwrap_or_default(),
                        metadata.name.as_deref().unwrap_or_default()
                    );
                    self.skipped(&format!("EndpointSlice {name}: {e:#}"));
                    // Only its name: enough to take the cached one out.
                    EndpointSlice {
                        metadata,
                        ..Default::default()
                    }
                })
        };
        Some(match event {
            // A change that does not read: the slice's last known backends go too
            // (they may be pods gone, their addresses someone else's).
            Ok(Apply(object)) => Ok(convert(object).map_or_else(Delete, Apply)),
            Ok(Delete(object)) => Ok(Delete(convert(object).unwrap_or_else(|named| named))),
            Ok(InitApply(object)) => Ok(InitApply(convert(object).ok()?)),
            Ok(Init) => Ok(Init),
            Ok(InitDone) => Ok(InitDone),
            Err(e) => Err(e),
        })
    }

    fn observed<K>(&self, event: &watcher::Event<K>) {
        let mut statuses = self.statuses.lock().unwrap();
        let status = statuses.entry(self.name).or_default();
        if matches!(event, watcher::Event::Init) {
            self.metrics.objects_skipped.get_or_create(&labels(self.name)).set(0);
            status.skipped = None;
        }
        // A list in progress proves nothing yet; its end, or a change, does.
        if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            return;
        }
        status.listed = true;
        self.metrics.watch_events.get_or_create(&labels(self.name)).inc();
        if let Some(error) = status.error.take() {
            log::info!("watching {}: working again after: {error}", self.name);
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// An object the loader cannot read: health names it, the metric counts it.
    fn skipped(&self, what: &str) {
        log::warn!("watching {}: skipping {what}", self.name);
        self.metrics.objects_skipped.get_or_create(&labels(self.name)).inc();
        let mut statuses = self.statuses.lock().unwrap();
        statuses.entry(self.name).or_default().skipped = Some(what.to_string());
    }

    fn failed(&self, error: anyhow::Error) {
        self.metrics.api_errors.get_or_create(&labels(self.name)).inc();
        let error = format!("{error:#}");
        let mut statuses = self.statuses.lock().unwrap();
        let status = statuses.entry(self.name).or_default();
        if status.error.as_ref() != Some(&error) {
            log::warn!(
                "watching {}: {error}; the datapath keeps the last known state",
                self.name
            );
        }
        status.error = Some(error);
    }
}

fn labels(resource: &str) -> SourceLabels {
    SourceLabels {
        resource: resource.to_string(),
    }
}

/// The API group and version of EndpointSlices before Kubernetes 1.21.
fn endpoint_slices_v1beta1() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    )
}

/// The API server does not serve the resource (in this version).
fn is_not_found(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(response)) if response.code == 404)
}

/// A watch round that lasted this long was progress: the next failure retries soon.
const WORKED_FOR_A_WHILE: Duration = Duration::from_secs(30);

/// Delays between the attempts of a failing watch: 0.5 s doubling to 8 s, each
/// shortened by up to a quarter at random so nodes spread out. A node catches up
/// within seconds of the API server's return (kube's default waits up to 30 s).
struct Retry {
    next: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(8);

impl Default for Retry {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Retry {
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(LAST_RETRY);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        delay.mul_f64(1.0 - f64::from(nanos % 1000) / 4000.0)
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

fn explain_watch(error: watcher::Error) -> anyhow::Error {
    match error {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            explain(e)
        }
        other => other.into(),
    }
}

/// A refusal says what the loader knows: the API server's authorizer refused, and
/// deploy/velox.yaml grants the request, so either that ClusterRole is not bound
/// here or the API server has not loaded its RBAC policy yet (it refuses for a
/// while after it starts).
fn explain(error: kube::Error) -> anyhow::Error {
    match &error {
        kube::Error::Api(response) if response.code == 403 => anyhow::anyhow!(
            "forbidden by the API server ({}): velox-loader's ClusterRole in deploy/velox.yaml grants this, so \
             either it is not applied and bound to the loader's service account, or the API server has not \
             loaded its RBAC policy yet",
            response.message
        ),
        _ => error.into(),
    }
}
