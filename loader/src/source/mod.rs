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

/// The namespace of a namespaced object: the API server always fills it in, a file
/// may leave it out and mean `default`, as kubectl does.
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}
