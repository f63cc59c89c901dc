//! `--peers-file` (a `NodeList`) and `--cluster-state` (Services, EndpointSlices,
//! NetworkPolicies, Pods, Namespaces: a file or a directory of them), the same
//! Kubernetes JSON that `kubectl get -o json` prints.

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use velox_node::fs::{list_dir, read_if_exists};
use velox_node::health::SourceHealth;

use super::{endpoint_slice_from_v1beta1, ClusterSource, PolicyInput, ServicesInput};
use crate::metrics::{Metrics, SourceLabels};

/// A file's identity as far as re-reading goes: a file that looks the same is not
/// parsed again (10,000 Services are megabytes of JSON).
type Fingerprint = Vec<(PathBuf, Option<std::time::SystemTime>, u64)>;

/// The peers file and the cluster state, looked at whenever the daemon asks.
pub struct FileSource {
    peers_file: Option<PathBuf>,
    cluster_state: Option<PathBuf>,
    seen: Option<Fingerprint>,
    /// The cluster state's objects as last read, until the files change.
    objects: Option<Vec<Value>>,
    /// The last failure to read each file, until it reads again.
    errors: std::collections::BTreeMap<&'static str, String>,
    /// The objects of the cluster state left out because they do not parse, per
    /// input (`services`, `policy`), as of the last read.
    skipped: std::collections::BTreeMap<&'static str, Vec<String>>,
    metrics: Metrics,
}

impl FileSource {
    pub fn new(peers_file: Option<PathBuf>, cluster_state: Option<PathBuf>, metrics: Metrics) -> Self {
        Self {
            peers_file,
            cluster_state,
            seen: None,
            objects: None,
            errors: Default::default(),
            skipped: Default::default(),
            metrics,
        }
    }

    /// Notes what an input left out: health names it, the metric counts it.
    fn left_out(&mut self, input: &'static str, skipped: Vec<String>) {
        if self.skipped.get(input) == Some(&skipped) {
            return;
        }
        let mut per_kind = std::collections::BTreeMap::<&str, i64>::new();
        for what in self.skipped.get(input).into_iter().flatten().chain(&skipped) {
            per_kind
                .entry(what.split_whitespace().next().unwrap_or_default())
                .or_default();
        }
        for what in &skipped {
            log::warn!("cluster state: skipping {what}");
            *per_kind
                .entry(what.split_whitespace().next().unwrap_or_default())
                .or_default() += 1;
        }
        for (kind, count) in per_kind {
            let labels = SourceLabels {
                resource: kind.to_string(),
            };
            self.metrics.objects_skipped.get_or_create(&labels).set(count);
        }
        self.skipped.insert(input, skipped);
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut files: Vec<PathBuf> = self.peers_file.iter().cloned().collect();
        if let Some(path) = &self.cluster_state {
            files.extend(state_files(path).unwrap_or_default());
        }
        files
            .into_iter()
            .map(|file| {
                let meta = std::fs::metadata(&file).ok();
                let modified = meta.as_ref().and_then(|m| m.modified().ok());
                let len = meta.map_or(0, |m| m.len());
                (file, modified, len)
            })
            .collect()
    }

    /// The cluster state's objects, read once per change of its files.
    fn objects(&mut self) -> Option<&[Value]> {
        if self.objects.is_none() {
            let path = self.cluster_state.clone()?;
            self.objects = self.read("cluster state", read_objects(&path));
        }
        self.objects.as_deref()
    }

    /// Records how reading `what` went.
    fn read<T>(&mut self, what: &'static str, outcome: anyhow::Result<T>) -> Option<T> {
        match outcome {
            Ok(value) => {
                self.errors.remove(what);
                Some(value)
            }
            Err(e) => {
                log::warn!("{e:#}");
                self.errors.insert(what, format!("{e:#}"));
                None
            }
        }
    }
}

impl ClusterSource for FileSource {
    fn changed(&mut self) -> bool {
        let fingerprint = self.fingerprint();
        let changed = self.seen.as_ref() != Some(&fingerprint);
        if changed {
            self.objects = None;
        }
        self.seen = Some(fingerprint);
        changed
    }

    /// No peers file, or none yet: a cluster of this node alone.
    fn nodes(&mut self) -> Option<Vec<Node>> {
        let Some(path) = &self.peers_file else {
            return Some(Vec::new());
        };
        let parsed = read_if_exists(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| bytes.map_or(Ok(Vec::new()), |bytes| parse_node_list(&bytes)))
            .map_err(|e| e.context(format!("reading the peers file {}", path.display())));
        self.read("peers file", parsed)
    }

    fn services(&mut self) -> Option<ServicesInput> {
        let (input, skipped) = ServicesInput::read(self.objects()?);
        self.left_out("services", skipped);
        Some(input)
    }

    /// `None` (the maps keep the last rules) when an object of the policy's input
    /// does not read: a policy left out would open what it isolates.
    fn policy(&mut self) -> Option<PolicyInput> {
        let (input, skipped) = PolicyInput::read(self.objects()?);
        let complete = skipped.is_empty();
        self.left_out("policy", skipped);
        complete.then_some(input)
    }

    fn pods(&mut self) -> Option<Vec<Pod>> {
        Some(PolicyInput::read(self.objects()?).0.pods)
    }

    /// Synced when every file reads; objects left out are errors all the same.
    fn health(&self) -> SourceHealth {
        let skipped = self.skipped.values().flatten().map(|what| format!("skipped {what}"));
        SourceHealth {
            source: "files".into(),
            synced: self.errors.is_empty(),
            errors: self.errors.values().cloned().chain(skipped).collect(),
        }
    }
}

/// The peers file: a Kubernetes `NodeList` (`kubectl get nodes -o json`). The items
/// are read one by one, so one bad node does not hide the others.
#[derive(Deserialize)]
struct NodeList {
    items: Vec<Value>,
}

/// The nodes of a `NodeList`. An item that is not a Node is skipped with a log
/// line; only a file that is not a list fails.
pub fn parse_node_list(json: &[u8]) -> anyhow::Result<Vec<Node>> {
    let list: NodeList = serde_json::from_slice(json)?;
    let nodes = list
        .items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            serde_json::from_value(item)
                .map_err(|e| log::warn!("peers file: skipping node #{i}: {e}"))
                .ok()
        })
        .collect();
    Ok(nodes)
}

/// What an input left out: `<Kind> <namespace>/<name>: <why>`, one per object.
type Skipped = Vec<String>;

impl ServicesInput {
    /// The Services and EndpointSlices of `objects`, slices of `v1beta1` included.
    pub fn read(objects: &[Value]) -> (Self, Skipped) {
        let mut skipped = Skipped::new();
        let input = Self {
            services: objects_of(objects, "Service", &mut skipped, serde_json::from_value),
            slices: objects_of(objects, "EndpointSlice", &mut skipped, |object| {
                match object["apiVersion"].as_str() {
                    Some("discovery.k8s.io/v1beta1") => endpoint_slice_from_v1beta1(object),
                    _ => serde_json::from_value(object),
                }
            }),
        };
        (input, skipped)
    }
}

impl PolicyInput {
    pub fn read(objects: &[Value]) -> (Self, Skipped) {
        let mut skipped = Skipped::new();
        let input = Self {
            policies: objects_of(objects, "NetworkPolicy", &mut skipped, serde_json::from_value),
            pods: objects_of(objects, "Pod", &mut skipped, serde_json::from_value),
            namespaces: objects_of(objects, "Namespace", &mut skipped, serde_json::from_value),
        };
        (input, skipped)
    }
}

/// Every object in `path`: a file, or every `*.json` file of a directory, each one
/// Kubernetes object or a `List` of them. A path that does not exist (yet) holds
/// nothing.
fn read_objects(path: &Path) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for file in state_files(path)? {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let value: Value = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", file.display()))?;
        objects.extend(objects_in(value));
    }
    Ok(objects)
}

/// A list's items, or the one object.
pub fn objects_in(value: Value) -> Vec<Value> {
    match value {
        Value::Object(mut object) if object.get("items").is_some_and(Value::is_array) => match object.remove("items") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        other => vec![other],
    }
}

/// The objects of `kind`, each read by `parse`; one that does not parse is left out
/// and named in `skipped`.
fn objects_of<T: DeserializeOwned>(
    objects: &[Value],
    kind: &str,
    skipped: &mut Skipped,
    parse: impl Fn(Value) -> serde_json::Result<T>,
) -> Vec<T> {
    objects
        .iter()
        .filter(|object| object.get("kind").and_then(Value::as_str) == Some(kind))
        .filter_map(|object| {
            parse(object.clone())
                .map_err(|e| {
                    let meta = &object["metadata"];
                    let name = meta["name"].as_str().unwrap_or("(no name)");
                    let namespace = meta["namespace"]
                        .as_str()
                        .map(|ns| format!("{ns}/"))
                        .unwrap_or_default();
                    skipped.push(format!("{kind} {namespace}{name}: {e}"));
                })
                .ok()
        })
        .collect()
}

/// The files of the source: `path` itself, or the `*.json` files in it, sorted.
fn state_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<_> = list_dir(path)?
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A file from a Kubernetes 1.20 cluster: its EndpointSlices are v1beta1 and
    /// count; an object that does not parse is named, not dropped in silence.
    #[test]
    fn v1beta1_slices_count_and_what_does_not_parse_is_named() {
        let objects = objects_in(json!({"kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "default"},
             "spec": {"ports": "eighty"}},
            {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
             "metadata": {"name": "web-x1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "web"}},
             "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.0.5"]}], "ports": [{"port": 8080}]},
        ]}));
        let (input, skipped) = ServicesInput::read(&objects);
        assert_eq!(input.services.len(), 1);
        assert_eq!(input.slices.len(), 1);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].starts_with("Service default/bad: "), "{skipped:?}");
    }

    /// A NetworkPolicy that does not read must not open what it isolates: the
    /// policy input is withheld (the maps keep the last rules) and health says why.
    #[test]
    fn a_policy_that_does_not_parse_withholds_the_policy_input() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        std::fs::write(
            &state,
            json!({"kind": "List", "items": [
                {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": "everything"}},
            ]})
            .to_string(),
        )
        .unwrap();
        let mut source = FileSource::new(None, Some(state), Metrics::new());
        assert!(source.changed());
        assert!(source.policy().is_none());
        let health = source.health();
        assert!(
            health
                .errors
                .iter()
                .any(|e| e.starts_with("skipped NetworkPolicy x/deny: ")),
            "{health:?}"
        );
    }
}
