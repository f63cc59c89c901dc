//! Kubernetes Services and EndpointSlices turned into the load balancer's maps: every
//! frontend (a ClusterIP, an external or load-balancer IP, a NodePort by port) with
//! its backends of that family, this node's first, and its traffic policies.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use velox_common::{
    FlowEnd, IpKey, NodeAddress, NodePortKey, Service, AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_UDP,
    SERVICE_EXTERNAL_LOCAL, SERVICE_FROM_OUTSIDE, SERVICE_INTERNAL_LOCAL, SERVICE_MAGLEV,
};
use velox_node::maps::{Frontend, ServiceMaps};
use velox_node::Family;

use crate::names::{protocol_number, ServiceNames};
use crate::source::{namespace_of, ServicesInput};

pub mod health_check;
mod udp_sockets;

use udp_sockets::destroy_connected_udp;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when the Service does not say.
const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

/// How a connection from outside picks its backend (`--node-port-algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePortAlgorithm {
    #[default]
    Random,
    Maglev,
}

/// What one frontend balances over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    /// Sorted, each once: this node's backends, then the others.
    pub backends: Vec<FlowEnd>,
    /// How many of `backends` are this node's.
    pub local: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
    /// `sessionAffinity: ClientIP`'s timeout, 0 without.
    pub affinity_seconds: u32,
    /// The Service's `namespace/name`, for the flow records.
    pub service: String,
}

/// This node, as the Services see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThisNode {
    /// Its addresses: NodePorts answer on them (and on loopback, for its own
    /// processes), and backends there are its own (host network).
    pub addresses: Vec<IpAddr>,
    /// Its pod CIDRs: backends there are its own.
    pub pod_cidrs: Vec<IpNet>,
}

impl ThisNode {
    fn holds(&self, backend: &FlowEnd) -> bool {
        self.holds_ip(backend.addr.ip())
    }

    fn holds_ip(&self, ip: IpAddr) -> bool {
        self.addresses.contains(&ip) || self.pod_cidrs.iter().any(|net| net.contains(&ip))
    }
}

/// The load balancer's maps, kept in line with the cluster source. Each frontend is
/// written on its own: one that fails (a full map) is reported and retried, and the
/// others go on.
#[derive(Default)]
pub struct ServiceBalancer {
    /// Serve NodePorts, external and load-balancer IPs to traffic from outside too.
    from_outside: bool,
    algorithm: NodePortAlgorithm,
    /// What the maps were last made to hold in full; `None` after a pass that could
    /// not write everything, so the next pass tries again.
    applied: Option<(BTreeMap<Frontend, Balancing>, ThisNode)>,
    synced_once: bool,
    /// Frontends the last pass could not write, and why.
    failed: Vec<String>,
    health_checks: health_check::HealthCheckServer,
}

impl ServiceBalancer {
    pub fn new(from_outside: bool, algorithm: NodePortAlgorithm) -> Self {
        Self {
            from_outside,
            algorithm,
            ..Self::default()
        }
    }

    /// Health: whether the Services were ever applied, how many frontends, and which
    /// ones could not be written.
    pub fn health(&self) -> velox_node::health::ServicesHealth {
        velox_node::health::ServicesHealth {
            synced_once: self.synced_once,
            frontends: self.applied.as_ref().map_or(0, |(frontends, _)| frontends.len()),
            failed: self.failed.clone(),
        }
    }

    /// Empties the load balancer's maps and the NAT's connections: the loader runs
    /// without it now.
    pub fn clear(bpffs: &velox_node::Bpffs) -> anyhow::Result<()> {
        let mut maps = ServiceMaps::open(bpffs)?;
        write_frontends(&mut maps, &BTreeMap::new())?;
        maps.set_node_addresses(&BTreeMap::new())?;
        maps.set_masquerade([IpKey::default(); 2])?;
        velox_node::maps::clear_nat(bpffs)?;
        Ok(())
    }

    /// Whether a pass must come even if nothing changed: the last one left frontends
    /// unwritten.
    pub fn retry_due(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Applies `state` (`None`: the source cannot say, the maps keep the last
    /// Services) for `node`. Connected UDP sockets to a backend that left are
    /// closed, here and in every netns `pod_netns` lists (asked only then).
    pub fn apply_services(
        &mut self,
        bpffs: &velox_node::Bpffs,
        state_dir: &velox_node::StateDir,
        state: Option<ServicesInput>,
        node: &ThisNode,
        pod_netns: impl FnOnce() -> Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let Some(state) = state else {
            return Ok(());
        };
        let mut wanted = frontends(&state, node, self.from_outside);
        if self.algorithm == NodePortAlgorithm::Maglev {
            for balancing in wanted.values_mut().filter(|b| b.flags & SERVICE_FROM_OUTSIDE != 0) {
                balancing.flags |= SERVICE_MAGLEV;
            }
        }
        if self.from_outside {
            self.health_checks.serve(health_check::wanted(&state, node));
        }
        if self
            .applied
            .as_ref()
            .is_some_and(|(frontends, at)| *frontends == wanted && at == node)
        {
            return Ok(());
        }
        if let Err(e) = service_names(&wanted).write(state_dir) {
            log::warn!("the flow records will not name the Services: {e:#}");
        }
        let mut maps = ServiceMaps::open(bpffs)?;
        maps.set_node_addresses(&node_addresses(node)?)?;
        maps.set_masquerade(masquerade_addresses(node))?;
        let written = write_frontends(&mut maps, &wanted)?;
        if !written.lost_udp.is_empty() && self.from_outside {
            // As kube-proxy clears conntrack for UDP: a client that keeps sending must
            // not keep reaching a backend that left.
            let backends = written
                .lost_udp
                .keys()
                .map(|b| end(b.ip(), b.port(), IPPROTO_UDP))
                .collect();
            match velox_node::maps::forget_nat_to(bpffs, &backends) {
                Ok(0) => {}
                Ok(n) => log::info!("NAT: forgot {n} UDP connection(s) to backends that left"),
                Err(e) => log::warn!("NAT: forgetting connections to backends that left: {e:#}"),
            }
        }
        self.synced_once = true;
        self.failed = written
            .failed
            .iter()
            .map(|(frontend, e)| format!("{}: {e:#}", describe(frontend)))
            .collect();
        match self.failed.is_empty() {
            true => log::info!("services: {} frontend(s)", wanted.len()),
            false => log::error!(
                "services: {} of {} frontend(s) could not be written, retried next pass: {}",
                self.failed.len(),
                wanted.len(),
                self.failed.join("; ")
            ),
        }
        self.applied = self.failed.is_empty().then(|| (wanted, node.clone()));
        if !written.lost_udp.is_empty() {
            close_udp_sockets_to(bpffs, &written.lost_udp, node, &pod_netns());
        }
        Ok(())
    }
}

/// Each frontend's Service, as the flow records look them up.
fn service_names(wanted: &BTreeMap<Frontend, Balancing>) -> ServiceNames {
    let frontends = wanted
        .iter()
        .map(|(frontend, balancing)| {
            let key = match frontend {
                Frontend::Address(end) => ServiceNames::key(end.proto, Some(end.addr.ip()), u16::from_be(end.port)),
                Frontend::NodePort(key) => ServiceNames::key(key.proto, None, u16::from_be(key.port)),
            };
            (key, balancing.service.clone())
        })
        .collect();
    ServiceNames { frontends }
}

/// A frontend as the log and health name it.
fn describe(frontend: &Frontend) -> String {
    match frontend {
        Frontend::Address(end) => format!(
            "{} {}",
            crate::names::protocol_name(end.proto),
            SocketAddr::new(end.addr.ip(), u16::from_be(end.port))
        ),
        Frontend::NodePort(key) => format!(
            "{} NodePort {} (IPv{})",
            crate::names::protocol_name(key.proto),
            u16::from_be(key.port),
            if u32::from(key.family) == AF_INET { 4 } else { 6 }
        ),
    }
}

/// The addresses NodePorts answer on: this node's, for every socket and from
/// outside, and loopback for the node's own processes only (kube-proxy's localhost
/// NodePorts: a pod's own loopback stays its own).
fn node_addresses(node: &ThisNode) -> anyhow::Result<BTreeMap<IpKey, NodeAddress>> {
    let host = std::fs::File::open("/proc/self/ns/net")?;
    let host_netns = velox_node::netlink::netns_cookie(&host)?;
    let mut addresses: BTreeMap<IpKey, NodeAddress> = node
        .addresses
        .iter()
        .map(|ip| (IpKey::from(*ip), NodeAddress { netns_cookie: 0 }))
        .collect();
    for loopback in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        addresses.insert(
            loopback.into(),
            NodeAddress {
                netns_cookie: host_netns,
            },
        );
    }
    Ok(addresses)
}

/// This node's first address of each family: what clients from outside are
/// masqueraded as when the backend may be on another node.
fn masquerade_addresses(node: &ThisNode) -> [IpKey; 2] {
    Family::ALL.map(|family| {
        node.addresses
            .iter()
            .find(|ip| Family::of(ip) == family)
            .map_or(IpKey::default(), |ip| IpKey::from(*ip))
    })
}
/// Closes the connected UDP sockets that came through a frontend that lost their
/// backend (`lost`: backend -> those frontends), on this node's host and in every
/// netns `pod_netns` lists. A socket connected to the backend itself, or through
/// another frontend, stays. A netns that is gone or refuses is logged and skipped.
fn close_udp_sockets_to(
    bpffs: &velox_node::Bpffs,
    lost: &HashMap<SocketAddr, Vec<Frontend>>,
    node: &ThisNode,
    pod_netns: &[PathBuf],
) {
    let backends: HashSet<SocketAddr> = lost.keys().copied().collect();
    // What each socket of the current network namespace asked for is read there.
    let close_here = || -> anyhow::Result<usize> {
        let kept = velox_node::maps::connected_frontends_here(bpffs)?;
        let close = |backend: SocketAddr, cookie: u64| {
            let asked = kept
                .get(&cookie)
                .filter(|kept| kept.backend == end(backend.ip(), backend.port(), IPPROTO_UDP))
                .map(|kept| &kept.frontend);
            let Some(asked) = asked else {
                return false;
            };
            lost.get(&backend).into_iter().flatten().any(|frontend| match frontend {
                Frontend::Address(end) => end == asked,
                Frontend::NodePort(key) => {
                    NodePortKey::of(asked) == *key
                        && (node.addresses.contains(&asked.addr.ip()) || asked.addr.ip().is_loopback())
                }
            })
        };
        destroy_connected_udp(&backends, &close)
    };
    let mut closed = 0;
    match close_here() {
        Ok(n) => closed += n,
        Err(e) => log::warn!("closing UDP sockets on the host: {e:#}"),
    }
    for path in pod_netns {
        let outcome = std::fs::File::open(path)
            .map_err(anyhow::Error::from)
            .and_then(|netns| velox_node::netlink::in_netns(&netns, close_here)?);
        match outcome {
            Ok(n) => closed += n,
            Err(e) => log::warn!("closing UDP sockets in {}: {e:#}", path.display()),
        }
    }
    if closed > 0 {
        log::info!("closed {closed} connected UDP socket(s) to backends that left their Service: {backends:?}");
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

/// Every frontend with its backends, for `node`; with `from_outside`, NodePorts,
/// external and load-balancer IPs serve traffic from outside too.
pub fn frontends(state: &ServicesInput, node: &ThisNode, from_outside: bool) -> BTreeMap<Frontend, Balancing> {
    let mut out = BTreeMap::new();
    for (service, slices) in services_with_slices(state) {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let is_local = |policy: &Option<String>| policy.as_deref() == Some("Local");
        let affinity_seconds = match spec.session_affinity.as_deref() {
            Some("ClientIP") => spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u32::try_from(s).ok())
                .filter(|s| *s > 0)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS),
            _ => 0,
        };
        let mut external_flags = if is_local(&spec.external_traffic_policy) {
            SERVICE_EXTERNAL_LOCAL
        } else {
            0
        };
        if from_outside {
            external_flags |= SERVICE_FROM_OUTSIDE;
        }
        let internal_flags = if is_local(&spec.internal_traffic_policy) {
            SERVICE_INTERNAL_LOCAL
        } else {
            0
        };
        let parsed = |ips: &mut dyn Iterator<Item = &String>| -> BTreeSet<IpAddr> {
            ips.filter_map(|ip| ip.parse().ok()).collect()
        };
        let cluster_ips = parsed(&mut spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()));
        // External and load-balancer IPs are kube-proxy's business unless Velox
        // replaces it. A load-balancer IP limited to source ranges is not served from
        // outside (the ranges are not enforced here): closed, rather than open to all.
        let load_balancer_ips = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ingress| ingress.ip.as_ref())
            .filter(|_| spec.load_balancer_source_ranges.as_ref().is_none_or(Vec::is_empty));
        let external_ips = match from_outside {
            true => parsed(&mut spec.external_ips.iter().flatten().chain(load_balancer_ips)),
            false => BTreeSet::new(),
        };
        for port in spec.ports.iter().flatten() {
            let Some(proto) = socket_protocol(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let balancing = |family, flags| {
                let backends = backends(&slices, port.name.as_deref(), proto, family);
                let (mut local, others): (Vec<FlowEnd>, Vec<FlowEnd>) =
                    backends.into_iter().partition(|b| node.holds(b));
                let count = local.len() as u32;
                local.extend(others);
                Balancing {
                    backends: local,
                    local: count,
                    flags,
                    affinity_seconds,
                    service: format!(
                        "{}/{}",
                        namespace_of(&service.metadata),
                        service.metadata.name.as_deref().unwrap_or_default()
                    ),
                }
            };
            for ip in &cluster_ips {
                let frontend = Frontend::Address(end(*ip, service_port, proto));
                out.insert(frontend, balancing(Family::of(ip), internal_flags));
            }
            for ip in &external_ips {
                let frontend = Frontend::Address(end(*ip, service_port, proto));
                out.insert(frontend, balancing(Family::of(ip), external_flags));
            }
            let node_port = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
            if let Some(node_port) = node_port {
                for (family, af) in [(Family::V4, AF_INET), (Family::V6, AF_INET6)] {
                    let key = NodePortKey {
                        port: node_port.to_be(),
                        proto,
                        family: af as u8,
                    };
                    out.insert(Frontend::NodePort(key), balancing(family, external_flags));
                }
            }
        }
    }
    out
}

/// Each Service with its EndpointSlices (same namespace, labelled with its name),
/// found in one pass.
fn services_with_slices(state: &ServicesInput) -> Vec<(&KubeService, Vec<&EndpointSlice>)> {
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
    state
        .services
        .iter()
        .filter_map(|service| {
            let name = service.metadata.name.as_deref()?;
            let key = (namespace_of(&service.metadata), name);
            Some((service, slices_of.get(&key).cloned().unwrap_or_default()))
        })
        .collect()
}

/// The backends of `family` of a Service port (its name, its protocol), from the
/// Service's slices, sorted, each once: the ready endpoints, or when none is ready
/// the serving ones that are terminating (as kube-proxy falls back to them, so a
/// rolling update's last pods finish their work).
fn backends(slices: &[&EndpointSlice], port_name: Option<&str>, proto: u8, family: Family) -> Vec<FlowEnd> {
    let ready = |e: &Endpoint| e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
    let serving_terminating = |e: &Endpoint| {
        let conditions = e.conditions.as_ref();
        conditions.and_then(|c| c.serving) == Some(true) && conditions.and_then(|c| c.terminating) == Some(true)
    };
    let ready_ones = endpoints_where(slices, port_name, proto, family, &ready);
    if !ready_ones.is_empty() {
        return ready_ones;
    }
    endpoints_where(slices, port_name, proto, family, &serving_terminating)
}

fn endpoints_where(
    slices: &[&EndpointSlice],
    port_name: Option<&str>,
    proto: u8,
    family: Family,
    keep: &dyn Fn(&Endpoint) -> bool,
) -> Vec<FlowEnd> {
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
        for endpoint in slice.endpoints.iter().filter(|e| keep(e)) {
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    backends.insert(end(ip, target, proto));
                }
            }
        }
    }
    backends.into_iter().collect()
}

/// What [`write_frontends`] did.
pub struct Written {
    /// UDP backends some frontend lost, with those frontends.
    pub lost_udp: HashMap<SocketAddr, Vec<Frontend>>,
    /// Frontends that could not be written (they keep what the maps had).
    pub failed: Vec<(Frontend, velox_node::Error)>,
}

/// Makes the service maps hold `wanted`, frontend by frontend. A frontend keeps its
/// id for as long as it exists; a new one gets the smallest free id. The maps are
/// the only state, so a restarted loader picks up where the last one stopped. Only
/// reading the maps fails the whole pass.
pub fn write_frontends(maps: &mut ServiceMaps, wanted: &BTreeMap<Frontend, Balancing>) -> anyhow::Result<Written> {
    let current: BTreeMap<Frontend, Service> = maps.frontends()?.into_iter().collect();
    let mut used: BTreeSet<u32> = current.values().map(|s| s.id).collect();
    let mut next_free = 1;
    let mut written = Written {
        lost_udp: HashMap::new(),
        failed: Vec::new(),
    };
    let mut note_lost = |frontend: &Frontend, gone: &[FlowEnd], kept: &[FlowEnd]| {
        let proto = match frontend {
            Frontend::Address(end) => end.proto,
            Frontend::NodePort(key) => key.proto,
        };
        if proto == IPPROTO_UDP {
            for backend in gone.iter().filter(|b| !kept.contains(b)) {
                let backend = SocketAddr::new(backend.addr.ip(), u16::from_be(backend.port));
                written.lost_udp.entry(backend).or_default().push(*frontend);
            }
        }
    };
    let mut failed = Vec::new();
    for (frontend, balancing) in wanted {
        let before = current.get(frontend).copied();
        if let Some(service) = before {
            let had = maps.backends(&service)?;
            if had == balancing.backends && service == service_entry(service.id, balancing) {
                continue;
            }
            note_lost(frontend, &had, &balancing.backends);
        }
        // A changed frontend with a local-only traffic policy gets a fresh id: its
        // slots are whole before the entry points at them, so no local-only pick
        // meets another node's backend in a slot being rewritten. Others keep their
        // id (and their clients' affinity): any backend serves them.
        let local_only = SERVICE_EXTERNAL_LOCAL | SERVICE_INTERNAL_LOCAL;
        let kept = before.filter(|old| (old.flags | balancing.flags) & local_only == 0);
        let id = match kept {
            Some(old) => old.id,
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                next_free
            }
        };
        let service = service_entry(id, balancing);
        match maps.set(*frontend, service, &balancing.backends) {
            // The slots no entry points at any more: a failure only leaves them unused.
            Ok(()) => {
                let unused = match before {
                    Some(old) if old.id == id => maps.remove_backends(&old, service.backends),
                    Some(old) => maps.remove_backends(&old, 0),
                    None => Ok(()),
                };
                if let Err(e) = unused {
                    log::warn!("removing unused backend slots of {}: {e:#}", describe(frontend));
                }
            }
            Err(e) => {
                if kept.is_none() {
                    let _ = maps.remove_backends(&service, 0);
                }
                failed.push((*frontend, e));
            }
        }
    }
    for (frontend, service) in &current {
        if !wanted.contains_key(frontend) {
            note_lost(frontend, &maps.backends(service)?, &[]);
            if let Err(e) = maps.remove(frontend, service) {
                failed.push((*frontend, e));
            }
        }
    }
    written.failed = failed;
    Ok(written)
}

fn service_entry(id: u32, balancing: &Balancing) -> Service {
    Service {
        id,
        backends: balancing.backends.len() as u32,
        local_backends: balancing.local,
        flags: balancing.flags,
        affinity_seconds: balancing.affinity_seconds,
    }
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
        let frontends = frontends(&state(dns_cluster()), &ThisNode::default(), false);
        let at = |ip: &str, port, proto| Frontend::Address(end(ip.parse().unwrap(), port, proto));
        let udp4 = at("10.96.0.10", 53, IPPROTO_UDP);
        assert_eq!(
            frontends[&udp4].backends,
            ends(&[("200.200.1.5", 5353, IPPROTO_UDP), ("200.200.2.7", 5353, IPPROTO_UDP)]),
            "ready or unset, same namespace only"
        );
        let udp6 = at("fd00:96::a", 53, IPPROTO_UDP);
        assert_eq!(frontends[&udp6].backends, ends(&[("fd00:200:1::5", 5353, IPPROTO_UDP)]));
        let tcp6 = at("fd00:96::a", 53, IPPROTO_TCP);
        assert_eq!(
            frontends[&tcp6].backends,
            vec![],
            "no IPv6 backend on the TCP port: refused, not hanging"
        );
        assert_eq!(frontends.len(), 4);
    }

    fn node_port(port: u16, family: u32) -> Frontend {
        Frontend::NodePort(NodePortKey {
            port: port.to_be(),
            proto: IPPROTO_TCP,
            family: family as u8,
        })
    }

    #[test]
    fn a_node_port_is_one_frontend_per_family_with_this_nodes_backends_first() {
        let objects = json!({"items": [
            {"kind": "Service", "metadata": {"name": "web"},
             "spec": {"type": "LoadBalancer", "clusterIP": "10.96.1.1", "externalIPs": ["192.0.2.7"],
                      "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                      "sessionAffinity": "ClientIP",
                      "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]},
             "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": "web-a", "labels": {"kubernetes.io/service-name": "web"}},
             "ports": [{"port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": ["200.200.2.7"]}, {"addresses": ["200.200.1.5"]},
                           {"addresses": ["10.0.0.3"]}]}
        ]});
        let node = ThisNode {
            addresses: vec!["10.0.0.3".parse().unwrap()],
            pod_cidrs: vec!["200.200.1.0/24".parse().unwrap()],
        };
        let frontends = frontends(&state(objects), &node, true);
        let tcp = |ip: &str, port| Frontend::Address(end(ip.parse().unwrap(), port, IPPROTO_TCP));
        let v4 = &frontends[&node_port(30080, AF_INET)];
        assert_eq!(
            v4.backends,
            ends(&[
                ("10.0.0.3", 8080, IPPROTO_TCP),
                ("200.200.1.5", 8080, IPPROTO_TCP),
                ("200.200.2.7", 8080, IPPROTO_TCP)
            ]),
            "this node's (host network and pod CIDR) first"
        );
        assert_eq!(v4.local, 2);
        assert_eq!(v4.flags, SERVICE_EXTERNAL_LOCAL | SERVICE_FROM_OUTSIDE);
        assert_eq!(v4.affinity_seconds, DEFAULT_AFFINITY_SECONDS);
        assert!(frontends[&node_port(30080, AF_INET6)].backends.is_empty());
        assert_eq!(
            frontends[&tcp("10.96.1.1", 80)].flags,
            SERVICE_INTERNAL_LOCAL,
            "a ClusterIP is not for outside"
        );
        for external in ["192.0.2.7", "192.0.2.9"] {
            assert_eq!(
                frontends[&tcp(external, 80)].flags,
                SERVICE_EXTERNAL_LOCAL | SERVICE_FROM_OUTSIDE
            );
        }
        assert_eq!(frontends.len(), 5);
        let without = super::frontends(&state(json!({"items": []})), &node, false);
        assert!(without.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let objects = |ready: bool| {
            json!({"items": [
                {"kind": "Service", "metadata": {"name": "web"},
                 "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": 80}]}},
                {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                 "metadata": {"name": "web-a", "labels": {"kubernetes.io/service-name": "web"}},
                 "ports": [{"port": 8080, "protocol": "TCP"}],
                 "endpoints": [{"addresses": ["200.200.1.5"], "conditions": {"ready": ready}},
                               {"addresses": ["200.200.1.6"],
                                "conditions": {"ready": false, "serving": true, "terminating": true}},
                               {"addresses": ["200.200.1.7"],
                                "conditions": {"ready": false, "serving": false, "terminating": true}}]}
            ]})
        };
        let web = Frontend::Address(end("10.96.1.1".parse().unwrap(), 80, IPPROTO_TCP));
        let backends = |ready| {
            frontends(&state(objects(ready)), &ThisNode::default(), false)[&web]
                .backends
                .clone()
        };
        assert_eq!(backends(true), ends(&[("200.200.1.5", 8080, IPPROTO_TCP)]));
        assert_eq!(backends(false), ends(&[("200.200.1.6", 8080, IPPROTO_TCP)]));
    }

    /// Issue 21: one frontend per NodePort and family, however many nodes: 1,000
    /// nodes of two addresses and 70 NodePort Services took 140,000 frontends before.
    #[test]
    fn a_thousand_nodes_and_seventy_node_ports_stay_within_the_map_limits() {
        let mut items: Vec<serde_json::Value> = (0..1000)
            .map(|n| {
                json!({"kind": "Node", "metadata": {"name": format!("n{n}")},
                       "status": {"addresses": [{"type": "InternalIP", "address": format!("10.{}.{}.1", n / 256, n % 256)},
                                                {"type": "InternalIP", "address": format!("fd00::{n:x}")}]}})
            })
            .collect();
        for s in 0..70u16 {
            items.push(json!({"kind": "Service", "metadata": {"name": format!("s{s}")},
                "spec": {"type": "NodePort", "clusterIP": format!("10.96.2.{s}"),
                         "ports": [{"port": 80, "nodePort": 30000 + s}, {"port": 53, "protocol": "UDP", "nodePort": 30100 + s}]}}));
        }
        let node = ThisNode {
            addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::".parse().unwrap()],
            pod_cidrs: Vec::new(),
        };
        let frontends = frontends(&state(json!({ "items": items })), &node, true);
        let node_ports = frontends.keys().filter(|f| matches!(f, Frontend::NodePort(_))).count();
        assert_eq!(node_ports, 70 * 2 * 2, "a port, a protocol, a family");
        assert_eq!(frontends.len(), 70 * 2 * 3);
        assert!(node_ports <= velox_common::MAX_NODE_PORTS);
        assert!(frontends.len() <= velox_common::MAX_SERVICES);
    }

    #[test]
    fn headless_services_and_other_kinds_are_no_frontends() {
        let objects = json!({"items": [
            {"kind": "Service", "metadata": {"name": "headless"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
            {"kind": "Pod", "metadata": {"name": "p"}}
        ]});
        assert!(frontends(&state(objects), &ThisNode::default(), false).is_empty());
    }
}
