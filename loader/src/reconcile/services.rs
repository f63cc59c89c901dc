//! Kubernetes Services and EndpointSlices turned into the socket load balancer's
//! maps: every frontend (a ClusterIP, or for a NodePort every node
//! address and loopback) with the ready backends of its family.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use velox_common::{FlowEnd, Service, IPPROTO_SCTP, IPPROTO_UDP};
use velox_node::maps::ServiceMaps;
use velox_node::Family;

use crate::names::protocol_number;
use crate::source::{namespace_of, ServicesInput};

mod udp_sockets;

use udp_sockets::destroy_connected_udp;

/// The socket load balancer's maps, kept in line with the cluster source.
#[derive(Default)]
pub struct ServiceBalancer {
    applied: Option<BTreeMap<FlowEnd, Vec<FlowEnd>>>,
}

impl ServiceBalancer {
    /// Health: whether the Services were ever applied, and how many frontends.
    pub fn health(&self) -> velox_node::health::ServicesHealth {
        velox_node::health::ServicesHealth {
            synced_once: self.applied.is_some(),
            frontends: self.applied.as_ref().map_or(0, BTreeMap::len),
        }
    }

    /// Applies `state` (`None`: the source cannot say, the maps keep the last
    /// Services) with NodePorts on `node_ips`. Connected UDP sockets to a backend
    /// that left are closed, here and in every netns `pod_netns` lists (asked only
    /// then).
    pub fn apply_services(
        &mut self,
        bpffs: &velox_node::Bpffs,
        state: Option<ServicesInput>,
        node_ips: &[IpAddr],
        pod_netns: impl FnOnce() -> Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let Some(state) = state else {
            return Ok(());
        };
        let wanted = frontends(&state, node_ips);
        if self.applied.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let lost_udp = write_frontends(&mut ServiceMaps::open(bpffs)?, &wanted)?;
        log::info!("services: {} frontend(s)", wanted.len());
        self.applied = Some(wanted);
        if !lost_udp.is_empty() {
            close_udp_sockets_to(&lost_udp, &pod_netns());
        }
        Ok(())
    }
}

/// Closes the connected UDP sockets to `backends` of this node's host and pods; a
/// netns that is gone or refuses is logged and skipped.
fn close_udp_sockets_to(backends: &HashSet<SocketAddr>, pod_netns: &[PathBuf]) {
    let mut closed = 0;
    match destroy_connected_udp(backends) {
        Ok(n) => closed += n,
        Err(e) => log::warn!("closing UDP sockets on the host: {e:#}"),
    }
    for path in pod_netns {
        let outcome = std::fs::File::open(path)
            .map_err(anyhow::Error::from)
            .and_then(|netns| velox_node::netlink::in_netns(&netns, || destroy_connected_udp(backends))?);
        match outcome {
            Ok(n) => closed += n,
            Err(e) => log::warn!("closing UDP sockets in {}: {e:#}", path.display()),
        }
    }
    if closed > 0 {
        log::info!("closed {closed} connected UDP socket(s) to backends that left: {backends:?}");
    }
}

/// The protocols the socket hooks see: SCTP does not go through them.
fn socket_protocol(kubernetes_name: Option<&str>) -> Option<u8> {
    protocol_number(kubernetes_name).filter(|proto| *proto != IPPROTO_SCTP)
}

fn end(addr: IpAddr, port: u16, proto: u8) -> FlowEnd {
    FlowEnd {
        addr: addr.into(),
        port: port.to_be(),
        proto,
        pad: 0,
    }
}

/// Every frontend with its ready backends (sorted, each once); `node_ips` are the
/// addresses a NodePort answers on besides loopback.
pub fn frontends(state: &ServicesInput, node_ips: &[IpAddr]) -> BTreeMap<FlowEnd, Vec<FlowEnd>> {
    // The slices of each Service, by namespace and name, found in one pass.
    let mut slices_of: std::collections::HashMap<(&str, &str), Vec<&EndpointSlice>> = Default::default();
    for slice in &state.slices {
        let namespace = namespace_of(&slice.metadata);
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            slices_of.entry((namespace, service.as_str())).or_default().push(slice);
        }
    }
    let mut out = BTreeMap::new();
    for service in &state.services {
        let (Some(name), Some(spec)) = (service.metadata.name.as_deref(), service.spec.as_ref()) else {
            continue;
        };
        let namespace = namespace_of(&service.metadata);
        let slices = slices_of.get(&(namespace, name)).map(Vec::as_slice).unwrap_or_default();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for port in spec.ports.iter().flatten() {
            let Some(proto) = socket_protocol(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let backends_of = |family| ready_backends(slices, port.name.as_deref(), proto, family);
            for ip in &cluster_ips {
                out.insert(end(*ip, service_port, proto), backends_of(Family::of(ip)));
            }
            let node_port = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
            if let Some(node_port) = node_port {
                let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
                for ip in node_ips.iter().chain(loopback.iter()) {
                    out.insert(end(*ip, node_port, proto), backends_of(Family::of(ip)));
                }
            }
        }
    }
    out
}

/// The ready backends of `family` of a Service port (its name, its protocol), from
/// the Service's slices: sorted, each once.
fn ready_backends(slices: &[&EndpointSlice], port_name: Option<&str>, proto: u8, family: Family) -> Vec<FlowEnd> {
    let mut backends = BTreeSet::new();
    for slice in slices {
        let slice_family = match slice.address_type.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            _ => continue,
        };
        if slice_family != family {
            continue;
        }
        // The slice's port of the same name (both unnamed for a one-port Service).
        let target = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name.unwrap_or("")
                && socket_protocol(p.protocol.as_deref()) == Some(proto)
        });
        let Some(target) = target.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Kubernetes: an unset `ready` means ready.
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    backends.insert(end(ip, target, proto));
                }
            }
        }
    }
    backends.into_iter().collect()
}

/// Makes the service maps hold exactly `wanted`. A frontend keeps its id for as long
/// as it exists; a new one gets the smallest free id. The maps are the only state,
/// so a restarted loader picks up where the last one stopped. Returns the UDP
/// backends that some frontend lost.
pub fn write_frontends(
    maps: &mut ServiceMaps,
    wanted: &BTreeMap<FlowEnd, Vec<FlowEnd>>,
) -> anyhow::Result<HashSet<SocketAddr>> {
    let current: BTreeMap<FlowEnd, Service> = maps.services()?.into_iter().collect();
    let mut used: BTreeSet<u32> = current.values().map(|s| s.id).collect();
    let mut next_free = 1;
    let mut lost_udp = HashSet::new();
    let mut note_lost = |frontend: &FlowEnd, gone: &[FlowEnd], kept: &[FlowEnd]| {
        if frontend.proto == IPPROTO_UDP {
            let gone = gone.iter().filter(|b| !kept.contains(b));
            lost_udp.extend(gone.map(|b| SocketAddr::new(b.addr.ip(), u16::from_be(b.port))));
        }
    };
    for (frontend, backends) in wanted {
        let before = current.get(frontend).copied();
        let id = match before {
            Some(service) => {
                let had = maps.backends(&service)?;
                if had == *backends {
                    continue;
                }
                note_lost(frontend, &had, backends);
                service.id
            }
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        maps.set(*frontend, id, backends, before)?;
    }
    for (frontend, service) in &current {
        if !wanted.contains_key(frontend) {
            note_lost(frontend, &maps.backends(service)?, &[]);
            maps.remove(frontend, service)?;
        }
    }
    Ok(lost_udp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use velox_common::IPPROTO_TCP;

    fn state(objects: Value) -> ServicesInput {
        ServicesInput::read(&crate::source::files::objects_in(objects)).0
    }

    fn ends(list: &[(&str, u16, u8)]) -> Vec<FlowEnd> {
        list.iter()
            .map(|(ip, port, proto)| end(ip.parse().unwrap(), *port, *proto))
            .collect()
    }

    fn dns_cluster() -> Value {
        json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "dns", "namespace": "kube-system"},
             "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::a"],
                      "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": "dns-a", "namespace": "kube-system", "labels": {"kubernetes.io/service-name": "dns"}},
             "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}],
             "endpoints": [{"addresses": ["200.200.1.5"], "conditions": {"ready": true}},
                           {"addresses": ["200.200.2.7"]},
                           {"addresses": ["200.200.2.9"], "conditions": {"ready": false}}]},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv6",
             "metadata": {"name": "dns-b", "namespace": "kube-system", "labels": {"kubernetes.io/service-name": "dns"}},
             "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
             "endpoints": [{"addresses": ["fd00:200:1::5"]}]},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": "other", "namespace": "default", "labels": {"kubernetes.io/service-name": "dns"}},
             "ports": [{"name": "dns", "port": 1, "protocol": "UDP"}],
             "endpoints": [{"addresses": ["10.1.1.1"]}]},
            {"kind": "Service", "metadata": {"name": "broken"}, "spec": {"ports": "not a list"}}
        ]})
    }

    #[test]
    fn cluster_ips_of_both_families_get_the_ready_backends_of_their_family_and_port() {
        let frontends = frontends(&state(dns_cluster()), &[]);
        let udp4 = end("10.96.0.10".parse().unwrap(), 53, IPPROTO_UDP);
        assert_eq!(
            frontends[&udp4],
            ends(&[("200.200.1.5", 5353, IPPROTO_UDP), ("200.200.2.7", 5353, IPPROTO_UDP)]),
            "ready or unset, same namespace only"
        );
        let udp6 = end("fd00:96::a".parse().unwrap(), 53, IPPROTO_UDP);
        assert_eq!(frontends[&udp6], ends(&[("fd00:200:1::5", 5353, IPPROTO_UDP)]));
        let tcp6 = end("fd00:96::a".parse().unwrap(), 53, IPPROTO_TCP);
        assert_eq!(
            frontends[&tcp6],
            vec![],
            "no IPv6 backend on the TCP port: refused, not hanging"
        );
        assert_eq!(frontends.len(), 4);
    }

    #[test]
    fn a_node_port_answers_on_every_node_address_and_loopback() {
        let objects = json!({"kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.1.1",
                     "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}});
        let frontends = frontends(&state(objects), &["10.0.0.3".parse().unwrap()]);
        let at = |ip: &str, port| end(ip.parse().unwrap(), port, IPPROTO_TCP);
        for frontend in [
            at("10.96.1.1", 80),
            at("10.0.0.3", 30080),
            at("127.0.0.1", 30080),
            at("::1", 30080),
        ] {
            assert!(frontends.contains_key(&frontend), "{frontend:?}");
        }
    }

    #[test]
    fn headless_services_and_other_kinds_are_no_frontends() {
        let objects = json!({"items": [
            {"kind": "Service", "metadata": {"name": "headless"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
            {"kind": "Pod", "metadata": {"name": "p"}}
        ]});
        assert!(frontends(&state(objects), &[]).is_empty());
    }
}
