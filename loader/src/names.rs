//! How the loader, its CLI views and its metrics name what the maps hold by number:
//! interfaces, IP protocols, connection ends, policies and pods.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use velox_common::{FlowEnd, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use velox_node::layout::PRIVATE_FILE_MODE;
use velox_node::StateDir;

/// Every interface of this network namespace, by ifindex.
pub fn interface_names() -> BTreeMap<u32, String> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// This node's named pods (`namespace/name`) by their host veth, from the endpoint
/// records.
pub fn pods_by_interface(state_dir: &StateDir) -> BTreeMap<String, velox_node::endpoint::PodName> {
    velox_node::endpoint::EndpointStore::new(state_dir)
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|record| Some((record.host_ifname, record.pod?)))
        .collect()
}

/// The IP protocols Velox names: Kubernetes' spelling and the number.
const PROTOCOLS: [(&str, u8); 3] = [("TCP", IPPROTO_TCP), ("UDP", IPPROTO_UDP), ("SCTP", IPPROTO_SCTP)];

/// The number of a protocol as Kubernetes spells it; an absent one is TCP.
pub fn protocol_number(kubernetes_name: Option<&str>) -> Option<u8> {
    let name = kubernetes_name.unwrap_or("TCP");
    PROTOCOLS.iter().find(|(n, _)| *n == name).map(|(_, number)| *number)
}

/// A protocol's name for people (`tcp`, `icmp`), or its number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        1 | 58 => "icmp".into(),
        _ => PROTOCOLS
            .iter()
            .find(|(_, number)| *number == proto)
            .map_or_else(|| proto.to_string(), |(name, _)| name.to_lowercase()),
    }
}

/// A connection end as a socket address.
pub fn socket_address(end: &FlowEnd) -> SocketAddr {
    SocketAddr::new(end.addr.ip(), u16::from_be(end.port))
}

/// Who is who, for `velox-loader monitor`: written by the loader next to the
/// endpoint records whenever it changes.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyNames {
    /// `namespace/name` of policy id n at n - 1.
    pub policies: Vec<String>,
    /// `namespace/name` of every pod address the cluster reports.
    pub pods: BTreeMap<IpAddr, String>,
    /// This node's isolated pods: the policies that select each.
    pub selected_by: BTreeMap<IpAddr, Vec<String>>,
    /// The node of every pod address the cluster reports.
    #[serde(default)]
    pub nodes: BTreeMap<IpAddr, String>,
}

impl PolicyNames {
    pub fn write(&self, state_dir: &StateDir) -> anyhow::Result<()> {
        write_names(&state_dir.policy_names(), self).context("writing the policy names")
    }

    pub fn read(state_dir: &StateDir) -> Self {
        read_names(&state_dir.policy_names())
    }

    /// The names a node that does not enforce policy knows: every Pod's reported
    /// addresses (`namespace/name`), no policies.
    pub fn of_pods(pods: &[k8s_openapi::api::core::v1::Pod]) -> Self {
        let names = pods
            .iter()
            .flat_map(|pod| {
                let name = crate::reconcile::policy::name_of(&pod.metadata);
                crate::reconcile::policy::reported_addresses(pod)
                    .into_iter()
                    .map(move |ip| (ip, name.clone()))
            })
            .collect();
        Self {
            pods: names,
            nodes: pod_nodes(pods),
            ..Self::default()
        }
    }

    pub fn policy(&self, id: u16) -> Option<String> {
        self.policies.get(usize::from(id).checked_sub(1)?).cloned()
    }
}

/// The node (`spec.nodeName`) of every address the cluster's Pods report.
pub fn pod_nodes(pods: &[k8s_openapi::api::core::v1::Pod]) -> BTreeMap<IpAddr, String> {
    pods.iter()
        .filter_map(|pod| Some((pod, pod.spec.as_ref()?.node_name.clone()?)))
        .flat_map(|(pod, node)| {
            crate::reconcile::policy::reported_addresses(pod)
                .into_iter()
                .map(move |ip| (ip, node.clone()))
        })
        .collect()
}

/// Each Service frontend's Service (`namespace/name`), for the flow records of
/// translated connections: written by the loader whenever the Services change.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNames {
    /// By [`ServiceNames::key`]: a frontend address, or a NodePort's port on any
    /// address of a node.
    pub frontends: BTreeMap<String, String>,
}

impl ServiceNames {
    /// `TCP 10.96.0.10:80` for an address, `TCP *:30080` for a NodePort.
    pub fn key(proto: u8, frontend: Option<IpAddr>, port: u16) -> String {
        let proto = protocol_name(proto).to_uppercase();
        match frontend {
            Some(ip) => format!("{proto} {}", SocketAddr::new(ip, port)),
            None => format!("{proto} *:{port}"),
        }
    }

    /// The Service behind `frontend`: its address's, or a NodePort's on it.
    pub fn of(&self, proto: u8, frontend: SocketAddr) -> Option<String> {
        let exact = Self::key(proto, Some(frontend.ip()), frontend.port());
        let node_port = Self::key(proto, None, frontend.port());
        self.frontends
            .get(&exact)
            .or_else(|| self.frontends.get(&node_port))
            .cloned()
    }

    pub fn write(&self, state_dir: &StateDir) -> anyhow::Result<()> {
        write_names(&state_dir.service_names(), self).context("writing the Service names")
    }

    pub fn read(state_dir: &StateDir) -> Self {
        read_names(&state_dir.service_names())
    }
}

/// A names file, replaced whole for the readers (the flow records) to read.
fn write_names(path: &std::path::Path, names: &impl Serialize) -> anyhow::Result<()> {
    Ok(velox_node::fs::write_atomic(
        path,
        &serde_json::to_vec(names)?,
        PRIVATE_FILE_MODE,
    )?)
}

/// A names file; none (or one that cannot be read) names nothing.
fn read_names<T: serde::de::DeserializeOwned + Default>(path: &std::path::Path) -> T {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path());
        let names = PolicyNames {
            policies: vec!["x/allow-b".into()],
            pods: [
                ("fd00::1".parse().unwrap(), "x/a".into()),
                ("10.0.0.1".parse().unwrap(), "x/a".into()),
            ]
            .into(),
            selected_by: [("10.0.0.1".parse().unwrap(), vec!["x/allow-b".into()])].into(),
            nodes: [("10.0.0.1".parse().unwrap(), "worker-1".into())].into(),
        };
        names.write(&state_dir).unwrap();
        assert_eq!(PolicyNames::read(&state_dir), names);
        assert_eq!(names.policy(1).as_deref(), Some("x/allow-b"));
        assert_eq!(names.policy(0), None);
    }

    #[test]
    fn protocols_by_kubernetes_name_and_by_number() {
        assert_eq!(protocol_number(None), Some(IPPROTO_TCP));
        assert_eq!(protocol_number(Some("SCTP")), Some(IPPROTO_SCTP));
        assert_eq!(protocol_number(Some("ICMP")), None);
        let names: Vec<String> = [6, 17, 132, 1, 58, 47].into_iter().map(protocol_name).collect();
        assert_eq!(names, ["tcp", "udp", "sctp", "icmp", "icmp", "47"]);
    }
}
