//! The cluster's Services and EndpointSlices (and any other objects) as Kubernetes
//! JSON, written where the loaders read them (`--cluster-state`): what `kubectl get
//! services,endpointslices -A -o json` would print. The stand-in for the API server's
//! objects.

use serde_json::{json, Value};
use std::net::IpAddr;
use std::path::Path;
use velox_node::Family;

use crate::kube_proxy::Protocol;

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: &'static str,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

/// A Service and the pod addresses behind it (all ready).
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<IpAddr>,
}

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

impl ServiceSpec {
    /// The Service object and one EndpointSlice per address family.
    pub fn objects(&self) -> Vec<Value> {
        let node_port = self.ports.iter().any(|p| p.node_port.is_some());
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({"name": p.name, "protocol": protocol(p.protocol), "port": p.port,
                                      "targetPort": p.target_port});
                if let Some(node_port) = p.node_port {
                    port["nodePort"] = json!(node_port);
                }
                port
            })
            .collect();
        let mut objects = vec![json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": "default"},
            "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" },
                     "clusterIP": self.cluster_ips.first(), "clusterIPs": self.cluster_ips, "ports": ports},
        })];
        for family in Family::ALL {
            let addresses: Vec<Value> = self
                .backends
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
                .collect();
            let slice_ports: Vec<Value> = self
                .ports
                .iter()
                .map(|p| json!({"name": p.name, "protocol": protocol(p.protocol), "port": p.target_port}))
                .collect();
            let address_type = if family == Family::V4 { "IPv4" } else { "IPv6" };
            objects.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
                "metadata": {"name": format!("{}-{}", self.name, family.number()), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": self.name}},
                "ports": slice_ports, "endpoints": addresses,
            }));
        }
        objects
    }
}

/// Replaces the file at `path` with `services`, atomically (the loaders poll it).
pub fn write(path: &Path, services: &[ServiceSpec]) -> anyhow::Result<()> {
    let items: Vec<Value> = services.iter().flat_map(ServiceSpec::objects).collect();
    write_objects(path, items)
}

/// Replaces the file at `path` with a `List` of `items`, atomically.
pub fn write_objects(path: &Path, items: Vec<Value>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    // Not `*.json`: a loader reading the directory never sees it half written.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
