//! Where the loader learns the cluster from: the Kubernetes API server (a node of a
//! real cluster, [`kubernetes::ApiSource`]) or files of the same Kubernetes JSON
//! ([`files::FileSource`]: test-env, or a node without the API in reach). Both hand
//! out the same `k8s_openapi` objects; the reconcilers read one interface and never
//! know which source fed them.

pub mod files;
pub mod kubernetes;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use velox_node::health::SourceHealth;

pub trait ClusterSource {
    /// Whether anything may have changed since the last call; cheap, asked often.
    fn changed(&mut self) -> bool;
    /// Every node, this one included. `None` when the source cannot say (a file that
    /// does not parse, a watch that has not listed yet): the reconciler keeps what
    /// it has, and the datapath goes on with the last known cluster.
    fn nodes(&mut self) -> Option<Vec<Node>>;
    /// The Services and their EndpointSlices; `None` likewise, or when the node does
    /// not balance Services.
    fn services(&mut self) -> Option<ServicesInput>;
    /// NetworkPolicies, Pods and Namespaces; `None` likewise, or when the node does
    /// not enforce policy.
    fn policy(&mut self) -> Option<PolicyInput>;
    /// Every Pod, to name the ends of flow records where no policy pass does; `None`
    /// likewise, or when the source was not asked to watch them.
    fn pods(&mut self) -> Option<Vec<Pod>>;
    /// How the source is doing, for the health answer.
    fn health(&self) -> SourceHealth;
    /// The datapath is up: tell the cluster, where it listens.
    fn network_ready(&mut self) {}
}

/// The objects the socket load balancer is built from.
#[derive(Debug, Default)]
pub struct ServicesInput {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

/// The objects policy is compiled from.
#[derive(Debug, Default)]
pub struct PolicyInput {
    pub policies: Vec<NetworkPolicy>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
}

/// An EndpointSlice of `discovery.k8s.io/v1beta1` (the only version before
/// Kubernetes 1.21, served until 1.25) as the `v1` object it converts to: the same
/// fields, except that an endpoint's node and zone sit in its `topology` map.
pub fn endpoint_slice_from_v1beta1(mut object: serde_json::Value) -> serde_json::Result<EndpointSlice> {
    object["apiVersion"] = "discovery.k8s.io/v1".into();
    if let Some(endpoints) = object.get_mut("endpoints").and_then(serde_json::Value::as_array_mut) {
        for endpoint in endpoints.iter_mut().filter_map(serde_json::Value::as_object_mut) {
            let Some(serde_json::Value::Object(topology)) = endpoint.remove("topology") else {
                continue;
            };
            for (label, field) in [
                ("kubernetes.io/hostname", "nodeName"),
                ("topology.kubernetes.io/zone", "zone"),
            ] {
                if let (Some(value), None | Some(serde_json::Value::Null)) = (topology.get(label), endpoint.get(field))
                {
                    endpoint.insert(field.to_string(), value.clone());
                }
            }
        }
    }
    serde_json::from_value(object)
}

/// The namespace of a namespaced object: the API server always fills it in, a file
/// may leave it out and mean `default`, as kubectl does.
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a Kubernetes 1.20 API server and `kubectl get endpointslices -o json`
    /// give: `discovery.k8s.io/v1beta1`, the node in `topology`.
    #[test]
    fn a_v1beta1_endpoint_slice_reads_as_v1_with_its_node_and_zone() {
        let slice = endpoint_slice_from_v1beta1(json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z1"}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": false}, "nodeName": "node-b",
                 "topology": {"kubernetes.io/hostname": "stale"}},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(slice.address_type, "IPv4");
        let ends = &slice.endpoints;
        assert_eq!(ends[0].addresses, ["10.244.0.5"]);
        assert_eq!(ends[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(ends[0].zone.as_deref(), Some("z1"));
        assert_eq!(ends[0].conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(ends[1].node_name.as_deref(), Some("node-b"), "its own field wins");
        assert_eq!(slice.ports.unwrap()[0].port, Some(8080));
    }
}
