//! `healthCheckNodePort`: for a Service with `externalTrafficPolicy: Local`, the
//! loader answers HTTP on that port as kube-proxy does, 200 with the number of this
//! node's endpoints where it has some and 503 where it has none, so a cloud load
//! balancer sends outside traffic only to nodes that can serve it.

use bytes::Bytes;
use http_body_util::Full;
use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

use super::ThisNode;
use crate::source::{namespace_of, ServicesInput};

/// Connections one health check port serves at once, and for how long each.
const MAX_CONNECTIONS: usize = 64;
const CONNECTION_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

impl Check {
    /// kube-proxy's answer: status and JSON body.
    pub fn answer(&self) -> (u16, String) {
        let status = if self.local_endpoints > 0 { 200 } else { 503 };
        let body = serde_json::json!({
            "service": {"namespace": self.namespace, "name": self.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": true,
        });
        (status, body.to_string())
    }
}

/// The health check ports the Services ask for, with what each answers.
pub fn wanted(state: &ServicesInput, node: &ThisNode) -> BTreeMap<u16, Check> {
    let mut out = BTreeMap::new();
    for (service, slices) in super::services_with_slices(state) {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0);
        let Some(port) = port.filter(|_| spec.external_traffic_policy.as_deref() == Some("Local")) else {
            continue;
        };
        let ready =
            |e: &&k8s_openapi::api::discovery::v1::Endpoint| e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
        // A dual-stack pod is an endpoint in a slice of each family: counted per
        // family, the larger count, as kube-proxy's proxier of each family would.
        let local_in = |address_type: &str| {
            slices
                .iter()
                .filter(|slice| slice.address_type == address_type)
                .flat_map(|slice| slice.endpoints.iter().filter(ready))
                .filter(|e| {
                    e.addresses
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .any(|ip| node.holds_ip(ip))
                })
                .count()
        };
        let local_endpoints = local_in("IPv4").max(local_in("IPv6"));
        out.insert(
            port,
            Check {
                namespace: namespace_of(&service.metadata).to_string(),
                name: service.metadata.name.clone().unwrap_or_default(),
                local_endpoints,
            },
        );
    }
    out
}

/// The listeners, one per health check port, each answering from its shared
/// [`Check`].
#[derive(Default)]
pub struct HealthCheckServer {
    listening: BTreeMap<u16, (Arc<Mutex<Check>>, JoinHandle<()>)>,
}

impl HealthCheckServer {
    /// Listens on exactly the ports of `wanted`, each answering what it says. A
    /// port that cannot be bound is logged and tried again with the next change.
    pub fn serve(&mut self, wanted: BTreeMap<u16, Check>) {
        self.listening.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, check) in wanted {
            if let Some((shared, _)) = self.listening.get(&port) {
                *shared.lock().expect("no panics under the lock") = check;
                continue;
            }
            let shared = Arc::new(Mutex::new(check));
            match listen(port, shared.clone()) {
                Ok(task) => {
                    self.listening.insert(port, (shared, task));
                }
                Err(e) => log::error!("health check node port {port}: {e:#}"),
            }
        }
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for (_, task) in self.listening.values() {
            task.abort();
        }
    }
}

/// Answers on `port` of every address, both families (an IPv6 socket that takes
/// IPv4 too).
fn listen(port: u16, check: Arc<Mutex<Check>>) -> anyhow::Result<JoinHandle<()>> {
    let address = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    log::info!("health check node port {port} answers");
    // Anyone outside may connect: few connections at once, each for a short while.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("health check node port {port}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: too many at once
            };
            let check = check.clone();
            let service = hyper::service::service_fn(move |_request| {
                let (status, body) = check.lock().expect("no panics under the lock").answer();
                let response = hyper::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("x-content-type-options", "nosniff")
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid response");
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
                drop(slot);
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_with_local_endpoints_answers_200_and_one_without_503() {
        let check = |n| Check {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: n,
        };
        let (status, body) = check(2).answer();
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["service"]["name"], "web");
        assert_eq!(check(0).answer().0, 503);
    }
}
