//! `--peers-file` (a `NodeList`) and `--cluster-state` (Services, EndpointSlices,
//! NetworkPolicies, Pods, Namespaces: a file or a directory of them), the same
//! Kubernetes JSON that `kubectl get -o json` prints.

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use velox_node::fs::{list_dir, read_if_exists};
use velox_node::health::SourceHealth;

use super::{ClusterSource, PolicyInput, ServicesInput};

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
}

impl FileSource {
    pub fn new(peers_file: Option<PathBuf>, cluster_state: Option<PathBuf>) -> Self {
        Self {
            peers_file,
            cluster_state,
            seen: None,
            objects: None,
            errors: Default::default(),
        }
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
        self.objects().map(ServicesInput::from_objects)
    }

    fn policy(&mut self) -> Option<PolicyInput> {
        self.objects().map(PolicyInput::from_objects)
    }

    fn health(&self) -> SourceHealth {
        SourceHealth {
            source: "files".into(),
            synced: self.errors.is_empty(),
            errors: self.errors.values().cloned().collect(),
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

impl ServicesInput {
    pub fn from_objects(objects: &[Value]) -> Self {
        Self {
            services: objects_of(objects, "Service"),
            slices: objects_of(objects, "EndpointSlice"),
        }
    }
}

impl PolicyInput {
    pub fn from_objects(objects: &[Value]) -> Self {
        Self {
            policies: objects_of(objects, "NetworkPolicy"),
            pods: objects_of(objects, "Pod"),
            namespaces: objects_of(objects, "Namespace"),
        }
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

/// The objects of `kind`; one that does not parse is skipped, with a warning.
fn objects_of<T: DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|object| object.get("kind").and_then(Value::as_str) == Some(kind))
        .filter_map(|object| {
            serde_json::from_value(object.clone())
                .map_err(|e| log::warn!("skipping a {kind}: {e}"))
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
