//! Where the loader learns the cluster from: the Kubernetes API server (a node of a
//! real cluster, [`crate::kubernetes::ApiSource`]) or files of the same Kubernetes
//! JSON ([`FileSource`]: test-env, or a node without the API in reach). The
//! reconcilers read one interface and never know which source fed them.

use std::path::PathBuf;
use velox_node::fs::read_if_exists;
use velox_node::health::ClusterHealth;

use crate::cluster::{parse_nodes, PeerNode};
use crate::services::{read_cluster_state, state_files, ClusterState};

pub trait ClusterSource {
    /// Whether anything may have changed since the last call; cheap, asked often.
    fn changed(&mut self) -> bool;
    /// Every node, this one included. `None` when the source cannot say (a file that
    /// does not parse, a watch that has not listed yet): the reconciler keeps what
    /// it has, and the datapath goes on with the last known cluster.
    fn nodes(&mut self) -> Option<Vec<PeerNode>>;
    /// The Services and their EndpointSlices; `None` likewise, or when the node does
    /// not balance Services.
    fn services(&mut self) -> Option<ClusterState>;
    /// How the source is doing, for the health answer.
    fn health(&self) -> ClusterHealth;
    /// The datapath is up: tell the cluster, where it listens.
    fn network_ready(&mut self) {}
}

/// A file's identity as far as re-reading goes: a file that looks the same is not
/// parsed again (10,000 Services are megabytes of JSON).
type Fingerprint = Vec<(PathBuf, Option<std::time::SystemTime>, u64)>;

/// `--peers-file` (a `NodeList`) and `--cluster-state` (Services and EndpointSlices,
/// a file or a directory of them), looked at whenever the daemon asks.
pub struct FileSource {
    peers_file: Option<PathBuf>,
    cluster_state: Option<PathBuf>,
    seen: Option<Fingerprint>,
    /// The last failure to read each file, until it reads again.
    errors: std::collections::BTreeMap<&'static str, String>,
}

impl FileSource {
    pub fn new(peers_file: Option<PathBuf>, cluster_state: Option<PathBuf>) -> Self {
        Self {
            peers_file,
            cluster_state,
            seen: None,
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
        self.seen = Some(fingerprint);
        changed
    }

    /// No peers file, or none yet: a cluster of this node alone.
    fn nodes(&mut self) -> Option<Vec<PeerNode>> {
        let Some(path) = &self.peers_file else {
            return Some(Vec::new());
        };
        let parsed = read_if_exists(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| bytes.map_or(Ok(Vec::new()), |bytes| parse_nodes(&bytes)))
            .map_err(|e| e.context(format!("reading the peers file {}", path.display())));
        self.read("peers file", parsed)
    }

    fn services(&mut self) -> Option<ClusterState> {
        let path = self.cluster_state.clone()?;
        let state = read_cluster_state(&path);
        self.read("cluster state", state)
    }

    fn health(&self) -> ClusterHealth {
        ClusterHealth {
            source: "files".into(),
            synced: self.errors.is_empty(),
            errors: self.errors.values().cloned().collect(),
        }
    }
}
