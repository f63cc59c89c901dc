//! Endpoint records: the one source of truth for which pod is where. A record and
//! its map entries are added together and removed together, under the endpoint lock
//! (the record written first, removed last); the loader rebuilds the maps from the
//! records under the same lock.

use nix::fcntl::Flock;
use serde::{Deserialize, Deserializer, Serialize};
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use velox_common::Endpoint;

use crate::error::{Error, Result};
use crate::fs::{create_private_dir, list_dir, lock, read_if_exists, remove_if_exists, write_atomic};
use crate::layout::{StateDir, PRIVATE_FILE_MODE};

/// One interface of one container: what CNI calls an attachment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    /// The interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    pub netns: PathBuf,
    pub network: String,
    /// The pod's addresses, at most one per family. Records of the IPv4-only
    /// releases (`"ip": "a.b.c.d"`) read as a list of one.
    #[serde(alias = "ip", deserialize_with = "one_or_many")]
    pub ips: Vec<IpAddr>,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub pod_mac: String,
    /// The pod's network namespace cookie when it opted out of the socket load
    /// balancer (CNI `args.cni.socketLB: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_lb_opt_out: Option<u64>,
    /// The pod's counters slot, claimed under `endpoints/slots/`; 0 in records of
    /// earlier releases, until the loader claims one.
    #[serde(default)]
    pub slot: u32,
    /// The Kubernetes pod this attachment is for, as the runtime named it in
    /// CNI_ARGS; absent in records of earlier releases and of runtimes that do not
    /// say (the loader then knows the pod by its addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodName>,
}

/// A Kubernetes pod as a runtime names it at ADD (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`, `K8S_POD_UID` in CNI_ARGS).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
    /// Tells a pod from an earlier one of the same name (a StatefulSet's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(IpAddr),
        Many(Vec<IpAddr>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(ip) => vec![ip],
        OneOrMany::Many(ips) => ips,
    })
}

impl EndpointRecord {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// The map value each of the record's addresses stands for.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ifindex: self.host_ifindex,
            slot: self.slot,
        }
    }
}

/// The host-side veth name: derived from the attachment alone, so DEL finds the
/// interface without any state.
pub fn host_ifname(attachment: &Attachment) -> String {
    let hex = crate::sha256_hex(format!("{}/{}", attachment.container_id, attachment.ifname));
    format!("{HOST_IFNAME_PREFIX}{}", &hex[..11])
}

const HOST_IFNAME_PREFIX: &str = "vlx";

/// The records under `<stateDir>/endpoints`, guarded by one lock that the plugin and
/// the loader take around every record-and-map change.
pub struct EndpointStore {
    dir: PathBuf,
}

impl EndpointStore {
    pub fn new(state_dir: &StateDir) -> Self {
        Self {
            dir: state_dir.endpoints_dir(),
        }
    }

    pub fn lock(&self) -> Result<Flock<File>> {
        lock(&self.dir.join(".lock"))
    }

    /// Serialises ADD, CHECK, DEL and GC of one attachment, so a duplicate ADD waits
    /// and then finds the first one's veth instead of tearing it down. Attachments
    /// share 256 lock files by their host veth's hash: bounded, and never unlinked
    /// (unlinking a lock file others wait on would split them).
    pub fn attachment_lock(&self, attachment: &Attachment) -> Result<Flock<File>> {
        let host_ifname = host_ifname(attachment);
        let bucket = &host_ifname[HOST_IFNAME_PREFIX.len()..HOST_IFNAME_PREFIX.len() + 2];
        lock(&self.dir.join(format!(".attachment-{bucket}.lock")))
    }

    fn path(&self, attachment: &Attachment) -> PathBuf {
        self.dir.join(format!("{}.json", host_ifname(attachment)))
    }

    pub fn write(&self, record: &EndpointRecord) -> Result<()> {
        create_private_dir(&self.dir)?;
        let json = serde_json::to_vec_pretty(record).expect("records serialize");
        write_atomic(&self.path(&record.attachment()), &json, PRIVATE_FILE_MODE)
    }

    pub fn get(&self, attachment: &Attachment) -> Result<Option<EndpointRecord>> {
        let path = self.path(attachment);
        read_if_exists(&path)?.map(|bytes| parse(&path, &bytes)).transpose()
    }

    /// Removes the record, its counters slot claim, and the temporary file of a
    /// write that was killed halfway. `slot` is the record's, when the caller has
    /// read it; without it (no record, a corrupt one) the claim is looked for.
    pub fn remove(&self, attachment: &Attachment, slot: Option<u32>) -> Result<()> {
        let path = self.path(attachment);
        self.release_slot(&host_ifname(attachment), slot)?;
        remove_if_exists(&path.with_extension("tmp"))?;
        remove_if_exists(&path)
    }

    fn slots_dir(&self) -> PathBuf {
        self.dir.join("slots")
    }

    /// Claims a counters slot in 1..=`max_pods` for `host_ifname`'s pod, under the
    /// endpoint lock; a retried ADD gets its own claim back. Claims are files named
    /// by slot holding their owner, probed from the owner's hash so a claim is mostly
    /// one file creation.
    pub fn claim_slot(&self, host_ifname: &str, max_pods: u32) -> Result<u32> {
        let dir = self.slots_dir();
        create_private_dir(&dir)?;
        let start = host_ifname
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        for i in 0..max_pods {
            let slot = 1 + start.wrapping_add(i) % max_pods;
            match self.slot_owner(slot)? {
                None => {
                    write_atomic(&dir.join(slot.to_string()), host_ifname.as_bytes(), PRIVATE_FILE_MODE)?;
                    return Ok(slot);
                }
                Some(owner) if owner == host_ifname => return Ok(slot),
                Some(_) => {}
            }
        }
        Err(Error::NodeFull { max_pods })
    }

    fn slot_owner(&self, slot: u32) -> Result<Option<String>> {
        let owner = read_if_exists(&self.slots_dir().join(slot.to_string()))?;
        Ok(owner.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Every claimed slot and its owner's host veth.
    pub fn slots(&self) -> Result<Vec<(u32, String)>> {
        let mut claims = Vec::new();
        for path in list_dir(&self.slots_dir())? {
            let Some(slot) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()) else {
                continue; // a write's temporary file
            };
            if let Some(owner) = self.slot_owner(slot)? {
                claims.push((slot, owner));
            }
        }
        Ok(claims)
    }

    /// Frees `host_ifname`'s claim: at `slot` when the record said, else wherever it
    /// is (an ADD killed before its record was written).
    pub fn release_slot(&self, host_ifname: &str, slot: Option<u32>) -> Result<()> {
        let claimed = match slot.filter(|&slot| slot != 0) {
            Some(slot) => vec![(slot, self.slot_owner(slot)?.unwrap_or_default())],
            None => self.slots()?,
        };
        for (slot, owner) in claimed {
            if owner == host_ifname {
                remove_if_exists(&self.slots_dir().join(slot.to_string()))?;
            }
        }
        Ok(())
    }

    /// Every readable record, in address order. One that cannot be read (truncated,
    /// corrupt, vanished while listing) is logged and left out, so it cannot stop the
    /// loader or GC; [`EndpointStore::unreadable`] names them.
    pub fn list(&self) -> Result<Vec<EndpointRecord>> {
        let mut records: Vec<EndpointRecord> = self.scan()?.into_iter().filter_map(|(_, r)| r.ok()).collect();
        records.sort_by(|a, b| a.ips.cmp(&b.ips));
        Ok(records)
    }

    /// Record files that cannot be read, with the host veth each was written for.
    pub fn unreadable(&self) -> Result<Vec<(PathBuf, String)>> {
        Ok(self
            .scan()?
            .into_iter()
            .filter(|(_, record)| record.is_err())
            .filter_map(|(path, _)| {
                let host_ifname = path.file_stem()?.to_str()?.to_string();
                Some((path, host_ifname))
            })
            .collect())
    }

    fn scan(&self) -> Result<Vec<(PathBuf, Result<EndpointRecord>)>> {
        let mut out = Vec::new();
        for path in list_dir(&self.dir)? {
            if path.extension().is_some_and(|ext| ext == "json") {
                let record = match read_if_exists(&path) {
                    Ok(Some(bytes)) => parse(&path, &bytes),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                if let Err(e) = &record {
                    log::warn!("skipping an endpoint record: {e}");
                }
                out.push((path, record));
            }
        }
        Ok(out)
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<EndpointRecord> {
    serde_json::from_slice(bytes).map_err(|source| Error::Record {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ips: &[&str]) -> EndpointRecord {
        EndpointRecord {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            network: "velox".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            host_ifname: host_ifname(&Attachment {
                container_id: id.into(),
                ifname: "eth0".into(),
            }),
            host_ifindex: 7,
            host_mac: "02:00:00:00:00:01".into(),
            pod_mac: "02:00:00:00:00:02".into(),
            socket_lb_opt_out: None,
            slot: 0,
            pod: None,
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
        assert!(a.starts_with("vlx"));
        assert_ne!(a, b);
    }

    #[test]
    fn dual_stack_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(&StateDir::new(dir.path()));
        let r = record("c1", &["10.0.0.2", "fd00::2"]);
        store.write(&r).unwrap();
        store.write(&record("c2", &["10.0.0.1", "fd00::1"])).unwrap();
        assert_eq!(store.get(&r.attachment()).unwrap(), Some(r.clone()));
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].container_id, "c2", "sorted by address");
        assert_eq!(r.endpoint().ifindex, 7);
        store.remove(&r.attachment(), Some(r.slot)).unwrap();
        store.remove(&r.attachment(), None).unwrap();
        assert_eq!(store.get(&r.attachment()).unwrap(), None);
    }

    #[test]
    fn slots_are_unique_until_released_and_run_out_at_max_pods() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(&StateDir::new(dir.path()));
        let a = store.claim_slot("vlxa", 2).unwrap();
        let b = store.claim_slot("vlxb", 2).unwrap();
        assert_ne!(a, b);
        assert!([a, b].iter().all(|s| (1..=2).contains(s)), "slot 0 is the uplink's");
        assert_eq!(store.claim_slot("vlxa", 2).unwrap(), a, "a retry gets its own claim");
        assert!(matches!(
            store.claim_slot("vlxc", 2),
            Err(Error::NodeFull { max_pods: 2 })
        ));
        store.release_slot("vlxa", None).unwrap();
        store.release_slot("vlxc", Some(b)).unwrap(); // not its claim: kept
        assert_eq!(store.slots().unwrap(), vec![(b, "vlxb".to_string())]);
        assert_eq!(store.claim_slot("vlxc", 2).unwrap(), a);
    }

    #[test]
    fn ipv4_only_records_of_earlier_releases_still_read() {
        let old = r#"{"container_id":"c","ifname":"eth0","netns":"/x","network":"n","ip":"10.0.0.9",
            "host_ifname":"vlx0","host_ifindex":3,"host_mac":"m","pod_mac":"p"}"#;
        let record: EndpointRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(record.pod, None, "records before pod names name no pod");
    }

    #[test]
    fn a_named_pod_round_trips_and_an_unnamed_one_writes_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(&StateDir::new(dir.path()));
        let mut named = record("c1", &["10.0.0.2"]);
        named.pod = Some(PodName {
            namespace: "x".into(),
            name: "a".into(),
            uid: None,
        });
        store.write(&named).unwrap();
        assert_eq!(store.get(&named.attachment()).unwrap(), Some(named.clone()));
        assert_eq!(named.pod.as_ref().unwrap().to_string(), "x/a");
        let unnamed = serde_json::to_value(record("c2", &["10.0.0.3"])).unwrap();
        assert!(unnamed.get("pod").is_none(), "{unnamed}");
    }

    #[test]
    fn a_corrupt_record_is_skipped_by_list_and_named_by_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let store = EndpointStore::new(&state);
        let good = record("c1", &["10.0.0.2"]);
        store.write(&good).unwrap();
        let bad = record("c2", &["10.0.0.3"]);
        let bad_path = state.endpoints_dir().join(format!("{}.json", bad.host_ifname));
        std::fs::write(&bad_path, b"{\"container_id\": \"c2\", \"ifn").unwrap();
        assert_eq!(store.list().unwrap(), vec![good]);
        assert_eq!(store.unreadable().unwrap(), vec![(bad_path, bad.host_ifname.clone())]);
        let err = store.get(&bad.attachment()).unwrap_err();
        assert!(matches!(err, Error::Record { .. }), "{err}");
        assert!(err.to_string().contains(&bad.host_ifname));
        store.remove(&bad.attachment(), None).unwrap();
        assert!(store.unreadable().unwrap().is_empty());
    }
}
