//! The loader's health answer on its unix socket, typed on both ends: the loader
//! writes one [`Health`] per connection; STATUS and probes read it.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The datapath is loaded and the maps are in line with the records.
    pub ready: bool,
    /// Endpoint records on this node.
    pub endpoints: usize,
    /// The cluster source, when the loader has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<SourceHealth>,
    /// Pods whose NetworkPolicy rules could not be written (a full rules map, a failed
    /// write), and why: each denies what those rules would have allowed until a
    /// later pass writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_failed_closed: Vec<String>,
    /// Why the links still run the programs (and maps) of the loader before this one:
    /// this one moves them once the NetworkPolicy is in its maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links_held: Option<String>,
    /// NetworkPolicy enforcement, when the loader enforces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyHealth>,
    /// The socket load balancer, when the loader runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServicesHealth>,
    /// Why `/metrics` is not served (its address could not be bound): the datapath
    /// and the loader work on, so the loader stays ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_error: Option<String>,
}

/// How the socket load balancer is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesHealth {
    /// The source has given Services and EndpointSlices at least once and the maps
    /// hold them. Until then no Service of the cluster answers from this node, and
    /// the loader is not ready.
    pub synced_once: bool,
    /// Frontends (address or NodePort, port, protocol) in the maps.
    pub frontends: usize,
    /// Frontends the last pass could not write (a full map, a failed write), and
    /// why: each keeps what the maps had, the others are in place, and the next pass
    /// tries again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// How NetworkPolicy enforcement is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyHealth {
    /// The source has given NetworkPolicies, Pods and Namespaces at least once and
    /// the maps hold them. Until then new named pods deny everything, and the loader
    /// is not ready.
    pub synced_once: bool,
    /// Named pods that deny everything because the source has not shown their Pod
    /// object (yet).
    pub waiting_for_pod_object: usize,
    /// The first [`MAX_NAMED_WAITING`] of them, `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    /// Cluster pod addresses whose identity could not be written (a full map, a
    /// failed write), the first [`MAX_NAMED_WAITING`] with why: no selector admits
    /// them until a later pass writes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub without_identity: Vec<String>,
}

/// How many waiting pods health names; the count says how many there are.
pub const MAX_NAMED_WAITING: usize = 10;

/// How the loader's cluster source is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHealth {
    /// `kubernetes` or `files`.
    pub source: String,
    /// Everything listed and nothing failing: the datapath follows the cluster. When
    /// false, it forwards with the last state it knew.
    pub synced: bool,
    /// What fails, per resource or file.
    pub errors: Vec<String>,
}

impl Health {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("health serializes")
    }

    /// Ready for the readiness probe: the datapath is up and every input the node
    /// needs has come at least once: the policy where the loader enforces it, the
    /// Services where it balances them.
    pub fn probe_ready(&self) -> bool {
        self.ready
            && self.policy.as_ref().is_none_or(|policy| policy.synced_once)
            && self.services.as_ref().is_none_or(|services| services.synced_once)
    }
}

/// Asks the loader listening on `socket`.
pub fn query(socket: &Path, timeout: Duration) -> Result<Health> {
    let what = || format!("asking {}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(Error::io(what()))?;
    stream.set_read_timeout(Some(timeout)).map_err(Error::io(what()))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(Error::io(what()))?;
    serde_json::from_str(&answer).map_err(|e| Error::Invalid(format!("{} answered {answer:?}: {e}", socket.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn both_ends_speak_the_same_struct() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("loader.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let sent = Health {
            ready: true,
            endpoints: 4,
            cluster: Some(SourceHealth {
                source: "kubernetes".into(),
                synced: false,
                errors: vec!["nodes: connection refused".into()],
            }),
            policy_failed_closed: vec!["the pod in slot 3: adding a policy rule".into()],
            links_held: Some("the NetworkPolicy is not known yet".into()),
            policy: Some(PolicyHealth {
                synced_once: false,
                waiting_for_pod_object: 1,
                waiting: vec!["x/a".into()],
                without_identity: vec!["10.0.0.9: setting the identity of 10.0.0.9".into()],
            }),
            services: Some(ServicesHealth {
                synced_once: true,
                frontends: 2,
                failed: vec!["TCP 10.96.0.1:443: adding a service".into()],
            }),
            metrics_error: Some("binding the metrics address 127.0.0.1:9962: address in use".into()),
        };
        assert!(!sent.probe_ready(), "never had the policy");
        let policy_synced = |services_synced| Health {
            policy: sent.policy.clone().map(|p| PolicyHealth { synced_once: true, ..p }),
            services: Some(ServicesHealth {
                synced_once: services_synced,
                frontends: 0,
                failed: Vec::new(),
            }),
            ..sent.clone()
        };
        assert!(policy_synced(true).probe_ready());
        assert!(!policy_synced(false).probe_ready(), "never had the Services");
        let server = std::thread::spawn({
            let sent = sent.clone();
            move || {
                let (mut stream, _) = listener.accept().unwrap();
                stream.write_all(sent.to_json().as_bytes()).unwrap();
            }
        });
        assert_eq!(query(&socket, Duration::from_secs(2)).unwrap(), sent);
        server.join().unwrap();
        assert!(matches!(
            query(&dir.path().join("none"), Duration::from_secs(1)),
            Err(Error::Io { .. })
        ));
    }
}
