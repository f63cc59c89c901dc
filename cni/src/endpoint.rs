//! Endpoint records: the one source of truth for which pod is where. A record is
//! written before its map entry and removed after it; the loader rebuilds the map
//! from the records.

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use velox_common::Endpoint;

use crate::config::Attachment;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    /// The interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    pub netns: PathBuf,
    pub network: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub pod_mac: String,
}

impl EndpointRecord {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// The map value this record stands for.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ifindex: self.host_ifindex,
        }
    }
}

/// The host-side veth name: derived from the attachment alone, so DEL finds the
/// interface without any state.
pub fn host_ifname(attachment: &Attachment) -> String {
    let digest = Sha256::digest(format!("{}/{}", attachment.container_id, attachment.ifname));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("vlx{}", &hex[..11])
}

/// The records under `<stateDir>/endpoints`, guarded by one lock that the plugin and
/// the loader take around every record-and-map change.
pub struct EndpointStore {
    dir: PathBuf,
}

impl EndpointStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("endpoints"),
        }
    }

    pub fn lock(&self) -> anyhow::Result<Flock<File>> {
        crate::create_private_dir(&self.dir)?;
        let file = File::create(self.dir.join(".lock")).context("opening the endpoint lock")?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow::anyhow!("locking endpoint records: {errno}"))
    }

    fn path(&self, attachment: &Attachment) -> PathBuf {
        self.dir.join(format!("{}.json", host_ifname(attachment)))
    }

    /// Writes atomically: a reader sees the old record or the new one, never half.
    pub fn write(&self, record: &EndpointRecord) -> anyhow::Result<()> {
        crate::create_private_dir(&self.dir)?;
        let path = self.path(&record.attachment());
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(record)?).context("writing endpoint record")?;
        fs::rename(&tmp, &path).context("committing endpoint record")
    }

    pub fn get(&self, attachment: &Attachment) -> anyhow::Result<Option<EndpointRecord>> {
        match fs::read(self.path(attachment)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("reading endpoint record")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading endpoint record"),
        }
    }

    pub fn remove(&self, attachment: &Attachment) -> anyhow::Result<()> {
        match fs::remove_file(self.path(attachment)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("removing endpoint record"),
            _ => Ok(()),
        }
    }

    pub fn list(&self) -> anyhow::Result<Vec<EndpointRecord>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("listing endpoint records"),
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                let bytes = fs::read(&path)?;
                records.push(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?);
            }
        }
        records.sort_by_key(|r: &EndpointRecord| r.ip);
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ip: &str) -> EndpointRecord {
        EndpointRecord {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            network: "velox".into(),
            ip: ip.parse().unwrap(),
            host_ifname: host_ifname(&Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            }),
            host_ifindex: 7,
            host_mac: "02:00:00:00:00:01".into(),
            pod_mac: "02:00:00:00:00:02".into(),
        }
    }

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_ifname(&Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        });
        let b = host_ifname(&Attachment {
            container_id: "abc".into(),
            ifname: "eth1".into(),
        });
        assert_eq!(a.len(), 14);
        assert!(a.len() <= 15 && a.starts_with("vlx"));
        assert_ne!(a, b);
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(dir.path());
        let r = record("c1", "10.0.0.2");
        store.write(&r).unwrap();
        store.write(&record("c2", "10.0.0.1")).unwrap();
        assert_eq!(store.get(&r.attachment()).unwrap(), Some(r.clone()));
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(store.list().unwrap()[0].container_id, "c2", "sorted by IP");
        assert_eq!(r.endpoint().ifindex, 7);
        store.remove(&r.attachment()).unwrap();
        store.remove(&r.attachment()).unwrap();
        assert_eq!(store.get(&r.attachment()).unwrap(), None);
    }
}
