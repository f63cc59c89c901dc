//! NetworkPolicy to map entries: a pure function of the policies, the cluster's pods
//! and namespaces, and this node's pods.
//!
//! Pods a selector picks are named by identity: one per label set (namespace, labels,
//! named container ports), so the replicas of a workload share one, and a rule's
//! entries grow with the label sets it selects, not with their addresses. Every
//! cluster pod address maps to its identity.
//!
//! Each of this node's pods gets, per direction, whether a policy isolates it, the
//! peer identities with the ports it may use with them, and a set of peer prefixes
//! (`ipBlock`s, everyone) with theirs. The datapath allows what either allows. It
//! takes the longest prefix that holds a peer's address, so the prefix entries are
//! cut such that the longest one always says everything: every prefix a rule names
//! (an `ipBlock`, its `except`s) gets the union of the ports of all the rules whose
//! peers hold that whole prefix. Prefixes of a rule nest or are disjoint, so an
//! address's longest prefix decides exactly as the rules would one by one.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use velox_common::{
    PortRule, ANY_PROTOCOL, EGRESS, INGRESS, IPV4_MAPPED_PREFIX, ISOLATED_EGRESS, ISOLATED_INGRESS, MAX_PORT_RULES,
};
use velox_node::endpoint::PodName;
use velox_node::maps::mapped_prefix_len;

use crate::names::protocol_number;
use crate::source::namespace_of;

/// A prefix of the datapath's address space (IPv4 mapped into IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: u128,
    pub len: u8,
}

impl Prefix {
    /// Every address, both families.
    const ALL: Prefix = Prefix { addr: 0, len: 0 };
    /// Where IPv4 lives: no IPv6 block holds it.
    const IPV4: Prefix = Prefix {
        addr: 0xffff << 32,
        len: IPV4_MAPPED_PREFIX as u8,
    };

    fn new(addr: u128, len: u8) -> Self {
        Self {
            addr: addr & mask(len),
            len,
        }
    }

    pub fn host(ip: IpAddr) -> Self {
        Self::new(u128::from_be_bytes(velox_common::IpKey::from(ip).addr), 128)
    }

    fn parse(cidr: &str) -> Option<Self> {
        let net: ipnet::IpNet = cidr.trim().parse().ok()?;
        Some(Self::new(Self::host(net.network()).addr, mapped_prefix_len(&net) as u8))
    }

    pub fn contains(&self, other: &Prefix) -> bool {
        self.len <= other.len && other.addr & mask(self.len) == self.addr
    }

    pub fn ip_key(&self) -> velox_common::IpKey {
        velox_common::IpKey::v6(self.addr.to_be_bytes())
    }
}

fn mask(len: u8) -> u128 {
    match len {
        0 => 0,
        len => u128::MAX << (128 - u32::from(len)),
    }
}

/// A pod of this node: its counters slot and addresses, and its name when the
/// runtime gave one at ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub slot: u32,
    pub ips: Vec<IpAddr>,
    pub pod: Option<PodName>,
}

/// What one pod of this node may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// `ISOLATED_INGRESS` and `ISOLATED_EGRESS`.
    pub isolation: u32,
    /// (direction, peer prefix) -> ports, merged and sorted.
    pub rules: BTreeMap<(u8, Prefix), Vec<PortRule>>,
    /// (direction, peer identity) -> ports, merged and sorted.
    pub identity_rules: BTreeMap<(u8, u64), Vec<PortRule>>,
    /// The ids of the policies that select it.
    pub selected_by: BTreeSet<u16>,
}

#[derive(Debug, Default)]
pub struct Compiled {
    /// By slot; pods no policy selects are absent.
    pub pods: BTreeMap<u32, PodPolicy>,
    /// `namespace/name` of policy id n at n - 1.
    pub policy_names: Vec<String>,
    /// `namespace/name` of every pod address.
    pub pod_names: BTreeMap<IpAddr, String>,
    /// The identity of every pod address. An address two pods of different label
    /// sets claim has none (it is one pod's, who knows which): selectors do not
    /// admit it until the cluster says.
    pub identities: BTreeMap<IpAddr, u64>,
    /// Old identity -> new: identities that only `previous` still gives some
    /// addresses, all of which moved to the new one. Their entries are the new
    /// one's (a pod relabelled is neither refused nor let in on the way); once the
    /// identities are in the datapath, a compile against them drops these entries.
    pub aliases: BTreeMap<u64, u64>,
    /// What could not be compiled as written (too many port ranges for one peer).
    pub problems: Vec<String>,
    /// This node's named pods whose Pod object the source has not shown (yet), by
    /// slot: each denies everything until it has.
    pub waiting_for_pod_object: BTreeMap<u32, String>,
}

/// A cluster pod as policy sees it.
#[derive(Clone)]
struct PodView<'a> {
    identity: u64,
    /// A pod of this node: its addresses are its records', which no other pod's
    /// status can claim.
    local: bool,
    namespace: &'a str,
    name: &'a str,
    uid: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
    ips: Vec<IpAddr>,
    /// Named container ports: (name, protocol, number).
    ports: Vec<(&'a str, u8, u16)>,
}

/// Who a rule's peers are.
enum RulePeers {
    All,
    /// `ipBlock`s (cidr, excepts) and the identities of the selected pods.
    Some {
        blocks: Vec<(Prefix, Vec<Prefix>)>,
        identities: HashSet<u64>,
    },
}

/// One rule of one policy that applies to a pod in one direction.
struct Rule<'a> {
    policy: u16,
    peers: &'a RulePeers,
    ports: &'a [NetworkPolicyPort],
}

/// `previous`: each address's identity as the datapath holds it now. An address whose
/// identity changes keeps, until the new one is in the datapath, what its new
/// identity is allowed (see [`Compiled::aliases`]).
pub fn compile(
    policies: &[NetworkPolicy],
    pods: &[Pod],
    namespaces: &[Namespace],
    local: &[LocalPod],
    previous: &BTreeMap<IpAddr, u64>,
) -> Compiled {
    let empty = BTreeMap::new();
    let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
        .iter()
        .filter_map(|ns| {
            Some((
                ns.metadata.name.as_deref()?,
                ns.metadata.labels.as_ref().unwrap_or(&empty),
            ))
        })
        .collect();
    // A pod of this node has the addresses of its records: its Pod object shows
    // them only once kubelet has posted them, after ADD.
    let mut local_addresses: HashMap<(&str, &str), Vec<IpAddr>> = HashMap::new();
    for pod in local {
        if let Some(name) = &pod.pod {
            let ips = local_addresses.entry((&name.namespace, &name.name)).or_default();
            for ip in &pod.ips {
                if !ips.contains(ip) {
                    ips.push(*ip);
                }
            }
        }
    }
    let views: Vec<PodView> = pods
        .iter()
        .filter_map(|pod| {
            let local = local_addresses.get(&(namespace_of(&pod.metadata), pod.metadata.name.as_deref()?));
            view(pod, &empty, local.cloned())
        })
        .collect();
    let by_name: HashMap<(&str, &str), &PodView> = views.iter().map(|v| ((v.namespace, v.name), v)).collect();
    let mut policies: Vec<&NetworkPolicy> = policies.iter().collect();
    policies.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    let mut compiled = Compiled {
        policy_names: policies.iter().map(|p| name_of(&p.metadata)).collect(),
        pod_names: views
            .iter()
            .flat_map(|v| v.ips.iter().map(move |ip| (*ip, format!("{}/{}", v.namespace, v.name))))
            .collect(),
        ..Default::default()
    };
    let (by_identity, collided) = representatives(&views);
    for identity in &collided {
        compiled.problems.push(format!(
            "two label sets have the identity {identity:016x}: no selector admits the pods of either"
        ));
    }
    compiled.identities = identities_of_addresses(&views);
    compiled.identities.retain(|_, identity| !collided.contains(identity));
    compiled.aliases = aliases(previous, &compiled.identities, &views);
    let by_address: HashMap<Prefix, &PodView> = views
        .iter()
        .flat_map(|v| v.ips.iter().map(move |ip| (Prefix::host(*ip), v)))
        .collect();
    // Peers depend on the policy only (its namespace), not on the pod it selects.
    let peers: Vec<[Vec<RulePeers>; 2]> = policies
        .iter()
        .map(|policy| {
            let namespace = namespace_of(&policy.metadata);
            let resolve = |list| resolve(list, namespace, &by_identity, &namespace_labels);
            let spec = policy.spec.as_ref();
            [
                spec.iter()
                    .flat_map(|s| s.ingress.iter().flatten())
                    .map(|r| resolve(&r.from))
                    .collect(),
                spec.iter()
                    .flat_map(|s| s.egress.iter().flatten())
                    .map(|r| resolve(&r.to))
                    .collect(),
            ]
        })
        .collect();
    for pod in local {
        let me = match &pod.pod {
            // Found by its name, and it must be the same pod, not an earlier one of
            // that name.
            Some(name) => by_name
                .get(&(name.namespace.as_str(), name.name.as_str()))
                .copied()
                .filter(|view| name.uid.is_none() || view.uid.is_none() || name.uid.as_deref() == view.uid),
            // A pod without a name (a record of an earlier release, a runtime that
            // does not say) is found by its addresses.
            None => pod
                .ips
                .iter()
                .find_map(|ip| by_address.get(&Prefix::host(*ip)).copied()),
        };
        let Some(me) = me else {
            if let Some(name) = &pod.pod {
                // Its policies cannot be known without its labels: nothing in or out.
                compiled.waiting_for_pod_object.insert(pod.slot, name.to_string());
                compiled.pods.insert(
                    pod.slot,
                    PodPolicy {
                        isolation: ISOLATED_INGRESS | ISOLATED_EGRESS,
                        ..Default::default()
                    },
                );
            }
            continue; // unnamed and not known to the cluster (yet): no policy selects it
        };
        let Selection {
            isolation,
            selected_by,
            rules,
        } = select(&policies, &peers, me);
        if isolation == 0 {
            continue;
        }
        let mut policy = PodPolicy {
            isolation,
            selected_by,
            ..Default::default()
        };
        for direction in [INGRESS, EGRESS] {
            let rules = &rules[usize::from(direction)];
            let entries = entries(rules, direction, me, &views, &by_address, &mut compiled.problems);
            policy
                .rules
                .extend(entries.into_iter().map(|(prefix, ports)| ((direction, prefix), ports)));
            let mut entries = identity_entries(rules, direction, me, &by_identity, &mut compiled.problems);
            for (old, new) in &compiled.aliases {
                if let Some(ports) = entries.get(new).cloned() {
                    entries.insert(*old, ports);
                }
            }
            policy.identity_rules.extend(
                entries
                    .into_iter()
                    .map(|(identity, ports)| ((direction, identity), ports)),
            );
        }
        compiled.pods.insert(pod.slot, policy);
    }
    compiled
}

/// What the policies that select a pod make of it.
#[derive(Default)]
struct Selection<'a> {
    /// `ISOLATED_INGRESS` and `ISOLATED_EGRESS`.
    isolation: u32,
    /// The ids of the selecting policies.
    selected_by: BTreeSet<u16>,
    /// The selecting policies' rules, by direction.
    rules: [Vec<Rule<'a>>; 2],
}

/// The policies (sorted; id n + 1 at n) that select `me`, with each one's peers by
/// direction.
fn select<'a>(policies: &[&'a NetworkPolicy], peers: &'a [[Vec<RulePeers>; 2]], me: &PodView) -> Selection<'a> {
    let mut selection = Selection::default();
    for (index, policy) in policies.iter().enumerate() {
        let Some(spec) = &policy.spec else { continue };
        if namespace_of(&policy.metadata) != me.namespace || !selects(spec.pod_selector.as_ref(), me.labels) {
            continue;
        }
        let id = u16::try_from(index + 1).unwrap_or(u16::MAX);
        let types = spec.policy_types.clone().unwrap_or_else(|| {
            let mut types = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                types.push("Egress".into());
            }
            types
        });
        for (direction, flag, type_name) in [
            (INGRESS, ISOLATED_INGRESS, "Ingress"),
            (EGRESS, ISOLATED_EGRESS, "Egress"),
        ] {
            if !types.iter().any(|t| t == type_name) {
                continue;
            }
            selection.isolation |= flag;
            selection.selected_by.insert(id);
            let ports = match direction {
                INGRESS => spec.ingress.iter().flatten().map(|r| &r.ports).collect::<Vec<_>>(),
                _ => spec.egress.iter().flatten().map(|r| &r.ports).collect(),
            };
            for (peers, ports) in peers[index][usize::from(direction)].iter().zip(ports) {
                selection.rules[usize::from(direction)].push(Rule {
                    policy: id,
                    peers,
                    ports: ports.as_deref().unwrap_or_default(),
                });
            }
        }
    }
    selection
}

pub fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!("{}/{}", namespace_of(meta), meta.name.as_deref().unwrap_or_default())
}

/// Whether `pod` has addresses of its own: not on the host's network, not finished.
fn has_own_addresses(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.spec.as_ref().is_some_and(|spec| spec.host_network != Some(true))
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The addresses `pod`'s status reports, when it has its own.
pub fn reported_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref().filter(|_| has_own_addresses(pod)) else {
        return Vec::new();
    };
    // `::ffff:a.b.c.d` is the datapath's a.b.c.d.
    let parse = |ip: &str| ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|ip| parse(&ip.ip)).collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(parse) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// A running pod with addresses on the pod network; host-network pods have the
/// node's address and are not selected, finished pods have given theirs back. A pod
/// of this node has `local_ips`, its records' addresses, whatever its status says.
fn view<'a>(pod: &'a Pod, empty: &'a BTreeMap<String, String>, local_ips: Option<Vec<IpAddr>>) -> Option<PodView<'a>> {
    let spec = pod.spec.as_ref()?;
    if !has_own_addresses(pod) {
        return None;
    }
    let local = local_ips.is_some();
    let ips = local_ips.unwrap_or_else(|| reported_addresses(pod));
    if ips.is_empty() {
        return None;
    }
    let ports: Vec<(&str, u8, u16)> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let proto = protocol_number(p.protocol.as_deref())?;
            Some((p.name.as_deref()?, proto, u16::try_from(p.container_port).ok()?))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let namespace = namespace_of(&pod.metadata);
    let labels = pod.metadata.labels.as_ref().unwrap_or(empty);
    Some(PodView {
        identity: identity(namespace, labels, &ports),
        local,
        namespace,
        name: pod.metadata.name.as_deref().unwrap_or_default(),
        uid: pod.metadata.uid.as_deref(),
        labels,
        ips,
        ports,
    })
}

/// The identity of the pods of `namespace` with `labels` and the named container
/// `ports` (sorted): everything a rule can tell pods apart by. 64 bits of SHA-256, so
/// the same label set has the same identity on every node and across restarts and
/// upgrades (no table to keep), and no one can choose labels that take another
/// set's identity. Never 0.
fn identity(namespace: &str, labels: &BTreeMap<String, String>, ports: &[(&str, u8, u16)]) -> u64 {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::to_vec(&(namespace, labels, ports)).expect("strings and numbers serialize");
    let digest = Sha256::digest(canonical);
    let id = u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 has 32 bytes"));
    id.max(1)
}

/// One pod for each identity (selectors see only what identities hold), and the
/// identities two label sets share. Those (64 bits of a hash: found only by a search
/// that labels can be chosen for) stand for neither: no selector admits their pods.
fn representatives<'a, 'v>(views: &'v [PodView<'a>]) -> (HashMap<u64, &'v PodView<'a>>, HashSet<u64>) {
    let mut by_identity: HashMap<u64, &PodView> = HashMap::new();
    let mut collided = HashSet::new();
    for view in views {
        let first = *by_identity.entry(view.identity).or_insert(view);
        if (first.namespace, first.labels, &first.ports) != (view.namespace, view.labels, &view.ports) {
            collided.insert(view.identity);
        }
    }
    for identity in &collided {
        by_identity.remove(identity);
    }
    (by_identity, collided)
}

/// Each pod address's identity. An address a pod of this node has is that pod's; one
/// that other pods of different identities claim (a finished pod's status not yet
/// updated, say) has none, so no selector admits it on the word of either.
fn identities_of_addresses(views: &[PodView]) -> BTreeMap<IpAddr, u64> {
    let mut claims: HashMap<IpAddr, (u64, bool)> = HashMap::new();
    let mut ambiguous = HashSet::new();
    for view in views {
        for ip in &view.ips {
            match claims.get(ip).copied() {
                None => {
                    claims.insert(*ip, (view.identity, view.local));
                }
                Some((_, true)) => {}
                Some(_) if view.local => {
                    claims.insert(*ip, (view.identity, true));
                    ambiguous.remove(ip);
                }
                Some((identity, false)) if identity != view.identity => {
                    ambiguous.insert(*ip);
                }
                Some(_) => {}
            }
        }
    }
    claims
        .into_iter()
        .filter(|(ip, _)| !ambiguous.contains(ip))
        .map(|(ip, (identity, _))| (ip, identity))
        .collect()
}

/// Old identity -> new, for the identities that `previous` gives addresses and no
/// pod has any more, where every such address moved to one and the same new
/// identity: until the datapath has the new identities, the old one stands for the
/// new one. An old identity that split (its addresses went different ways) stands
/// for nothing.
fn aliases(previous: &BTreeMap<IpAddr, u64>, now: &BTreeMap<IpAddr, u64>, views: &[PodView]) -> BTreeMap<u64, u64> {
    let current: HashSet<u64> = views.iter().map(|v| v.identity).collect();
    let mut moves: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for (addr, old) in previous {
        if current.contains(old) || now.get(addr) == Some(old) {
            continue;
        }
        let new = now.get(addr).copied();
        moves
            .entry(*old)
            .and_modify(|to| {
                if *to != new {
                    *to = None;
                }
            })
            .or_insert(new);
    }
    moves.into_iter().filter_map(|(old, new)| Some((old, new?))).collect()
}

/// Whether a label selector selects `labels`: an empty one selects everything, and
/// so does an absent one (where the API makes a selector optional, absent means all).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    labels_match
        && selector.match_expressions.iter().flatten().all(|expression| {
            let value = labels.get(&expression.key);
            let values = expression.values.as_deref().unwrap_or_default();
            match expression.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false, // an operator the API would refuse selects nothing
            }
        })
}

/// The peers of a rule in a policy of `namespace`: no list (or an empty one) is
/// everyone.
fn resolve(
    list: &Option<Vec<NetworkPolicyPeer>>,
    namespace: &str,
    by_identity: &HashMap<u64, &PodView>,
    namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
) -> RulePeers {
    let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else {
        return RulePeers::All;
    };
    let mut blocks = Vec::new();
    let mut identities = HashSet::new();
    for peer in list {
        if let Some(block) = &peer.ip_block {
            let Some(cidr) = Prefix::parse(&block.cidr) else {
                log::warn!("ignoring the ipBlock {:?}: not a CIDR", block.cidr);
                continue;
            };
            // An IPv6 block of IPv4-mapped addresses names no IPv4 address.
            if block.cidr.contains(':') && Prefix::IPV4.contains(&cidr) {
                log::warn!(
                    "ignoring the ipBlock {:?}: IPv4-mapped IPv6 addresses hold no IPv4 peer",
                    block.cidr
                );
                continue;
            }
            // Without all of its excepts a block would admit what they shut: it goes.
            let except: Option<Vec<Prefix>> = block.except.iter().flatten().map(|e| Prefix::parse(e)).collect();
            let Some(mut except) = except else {
                log::warn!("ignoring the ipBlock {:?}: an except is not a CIDR", block.cidr);
                continue;
            };
            // An IPv6 block that holds ::ffff:0:0/96 would hold every IPv4 address too.
            if cidr.contains(&Prefix::IPV4) && cidr != Prefix::IPV4 {
                except.push(Prefix::IPV4);
            }
            blocks.push((cidr, except));
            continue;
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            continue;
        }
        for (identity, pod) in by_identity {
            let in_namespace = match &peer.namespace_selector {
                None => pod.namespace == namespace,
                // A namespace the source has not shown (yet) has labels we do not
                // know: only the selector of every namespace takes it, never one that
                // asks for a label to be absent (`NotIn`, `DoesNotExist`).
                Some(selector) => match namespace_labels.get(pod.namespace) {
                    Some(labels) => selects(Some(selector), labels),
                    None => {
                        selector.match_labels.as_ref().is_none_or(|l| l.is_empty())
                            && selector.match_expressions.as_ref().is_none_or(|e| e.is_empty())
                    }
                },
            };
            if in_namespace && selects(peer.pod_selector.as_ref(), pod.labels) {
                identities.insert(*identity);
            }
        }
    }
    RulePeers::Some { blocks, identities }
}

impl RulePeers {
    /// Whether every address of `prefix` is a peer by address (its pods by identity
    /// aside).
    fn hold(&self, prefix: &Prefix) -> bool {
        match self {
            RulePeers::All => true,
            RulePeers::Some { blocks, .. } => blocks
                .iter()
                .any(|(cidr, except)| cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix))),
        }
    }

    /// The prefixes the peers name.
    fn prefixes(&self, out: &mut BTreeSet<Prefix>) {
        match self {
            RulePeers::All => {
                out.insert(Prefix::ALL);
            }
            RulePeers::Some { blocks, .. } => {
                for (cidr, except) in blocks {
                    out.insert(*cidr);
                    out.extend(except.iter().copied());
                }
            }
        }
    }
}

/// Whether a rule out names a port by name: the destination pod's port of that name.
fn names_ports_out(rule: &Rule, direction: u8) -> bool {
    direction == EGRESS
        && rule
            .ports
            .iter()
            .any(|p| matches!(p.port, Some(IntOrString::String(_))))
}

/// The entries of one pod in one direction.
fn entries(
    rules: &[Rule],
    direction: u8,
    me: &PodView,
    pods: &[PodView],
    by_address: &HashMap<Prefix, &PodView>,
    problems: &mut Vec<String>,
) -> BTreeMap<Prefix, Vec<PortRule>> {
    let mut prefixes = BTreeSet::new();
    for rule in rules {
        rule.peers.prefixes(&mut prefixes);
        // A named port out is the destination pod's: each pod an `ipBlock` holds
        // needs an entry of its own (everyone's pods are named by identity).
        if names_ports_out(rule, direction) && matches!(rule.peers, RulePeers::Some { .. }) {
            for pod in pods {
                for ip in &pod.ips {
                    let host = Prefix::host(*ip);
                    if rule.peers.hold(&host) {
                        prefixes.insert(host);
                    }
                }
            }
        }
    }
    let mut values: BTreeMap<Prefix, Vec<PortRule>> = BTreeMap::new();
    for prefix in &prefixes {
        // The pod whose address this is, for named ports out.
        let named_by = match direction {
            INGRESS => Some(me),
            _ => by_address.get(prefix).copied(),
        };
        let mut ports = Vec::new();
        for rule in rules.iter().filter(|r| r.peers.hold(prefix)) {
            port_rules(rule, named_by, &mut ports);
        }
        let merged = merge(ports);
        if merged.len() > MAX_PORT_RULES {
            problems.push(format!(
                "{}/{}: {} port ranges for the peers {}/{}, more than the {MAX_PORT_RULES} an entry holds: the rest are denied",
                me.namespace,
                me.name,
                merged.len(),
                prefix.ip_key().ip(),
                prefix.len
            ));
        }
        values.insert(*prefix, merged.into_iter().take(MAX_PORT_RULES).collect());
    }
    // An empty entry matters only where it hides a wider one that allows something.
    let wider_allows = |prefix: &Prefix| {
        (0..prefix.len)
            .rev()
            .find_map(|len| values.get(&Prefix::new(prefix.addr, len)))
            .is_some_and(|ports| !ports.is_empty())
    };
    let drop: HashSet<Prefix> = values
        .iter()
        .filter(|(prefix, ports)| ports.is_empty() && !wider_allows(prefix))
        .map(|(prefix, _)| *prefix)
        .collect();
    values.retain(|prefix, _| !drop.contains(prefix));
    values
}

/// The entries by identity of one pod in one direction: each identity a rule selects
/// gets the ports of every rule that selects it, and so does every identity for a
/// rule out to everyone with named ports (each resolves them its own way).
fn identity_entries(
    rules: &[Rule],
    direction: u8,
    me: &PodView,
    by_identity: &HashMap<u64, &PodView>,
    problems: &mut Vec<String>,
) -> BTreeMap<u64, Vec<PortRule>> {
    let mut ports: HashMap<u64, Vec<PortRule>> = HashMap::new();
    for rule in rules {
        let mut add = |identity: u64, named_by: &PodView| {
            let named_by = if direction == INGRESS { me } else { named_by };
            port_rules(rule, Some(named_by), ports.entry(identity).or_default());
        };
        match rule.peers {
            RulePeers::Some { identities, .. } => {
                for identity in identities {
                    if let Some(pod) = by_identity.get(identity) {
                        add(*identity, pod);
                    }
                }
            }
            RulePeers::All if names_ports_out(rule, direction) => {
                for (identity, pod) in by_identity {
                    add(*identity, pod);
                }
            }
            RulePeers::All => {}
        }
    }
    ports
        .into_iter()
        .filter_map(|(identity, ports)| {
            let merged = merge(ports);
            if merged.len() > MAX_PORT_RULES {
                let pod = by_identity.get(&identity).map(|p| format!("{}/{}", p.namespace, p.name));
                problems.push(format!(
                    "{}/{}: {} port ranges for the pods like {}, more than the {MAX_PORT_RULES} an entry holds: the rest are denied",
                    me.namespace,
                    me.name,
                    merged.len(),
                    pod.unwrap_or_default()
                ));
            }
            (!merged.is_empty()).then(|| (identity, merged.into_iter().take(MAX_PORT_RULES).collect()))
        })
        .collect()
}

/// The port ranges a rule allows; a named port resolved against `named_by`'s
/// container ports (none when it has no such port).
fn port_rules(rule: &Rule, named_by: Option<&PodView>, out: &mut Vec<PortRule>) {
    let range = |proto, first, last| PortRule {
        proto,
        pad: 0,
        first,
        last,
        policy: rule.policy,
    };
    if rule.ports.is_empty() {
        out.push(range(ANY_PROTOCOL, 0, u16::MAX));
        return;
    }
    for port in rule.ports {
        let Some(proto) = protocol_number(port.protocol.as_deref()) else {
            continue;
        };
        match &port.port {
            None => out.push(range(proto, 0, u16::MAX)),
            Some(IntOrString::Int(number)) => {
                let Ok(first) = u16::try_from(*number) else { continue };
                let last = port.end_port.and_then(|end| u16::try_from(end).ok()).unwrap_or(first);
                if first <= last {
                    out.push(range(proto, first, last));
                }
            }
            Some(IntOrString::String(name)) => {
                for (_, _, number) in named_by
                    .iter()
                    .flat_map(|pod| pod.ports.iter())
                    .filter(|(n, p, _)| n == name && *p == proto)
                {
                    out.push(range(proto, *number, *number));
                }
            }
        }
    }
}

/// Sorted by protocol and port, overlapping and adjacent ranges joined (the lowest
/// policy id keeps the credit); a rule for every protocol stands alone.
fn merge(mut ports: Vec<PortRule>) -> Vec<PortRule> {
    ports.sort_by_key(|r| (r.proto, r.first, r.last, r.policy));
    if let Some(any) = ports
        .iter()
        .filter(|r| r.proto == ANY_PROTOCOL)
        .min_by_key(|r| r.policy)
    {
        return vec![*any];
    }
    let mut merged: Vec<PortRule> = Vec::new();
    for rule in ports {
        match merged.last_mut() {
            Some(last) if last.proto == rule.proto && u32::from(rule.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(rule.last);
                last.policy = last.policy.min(rule.policy);
            }
            _ => merged.push(rule),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use velox_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

    fn pod(namespace: &str, name: &str, labels: Value, ips: &[&str]) -> Value {
        json!({
            "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "serve-80", "containerPort": 80},
                {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
            ]}]},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
        })
    }

    fn policy(namespace: &str, name: &str, spec: Value) -> NetworkPolicy {
        serde_json::from_value(json!({"metadata": {"namespace": namespace, "name": name}, "spec": spec})).unwrap()
    }

    /// Three namespaces x, y, z with pods a, b, c each (`x/a` is 10.0.0.1 and
    /// fd00::1, `y/b` 10.0.1.2, ...), like the upstream e2e suite; namespace labels
    /// `ns: <name>`, pod labels `pod: <name>`.
    struct Grid {
        pods: Vec<Pod>,
        namespaces: Vec<Namespace>,
    }

    impl Grid {
        fn new() -> Self {
            let mut pods = Vec::new();
            let mut namespaces = Vec::new();
            for (n, ns) in ["x", "y", "z"].iter().enumerate() {
                namespaces
                    .push(serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"ns": ns}}})).unwrap());
                for (p, name) in ["a", "b", "c"].iter().enumerate() {
                    let ips = [format!("10.0.{n}.{}", p + 1), format!("fd00::{n}:{}", p + 1)];
                    let value = pod(ns, name, json!({"pod": name}), &[&ips[0], &ips[1]]);
                    pods.push(serde_json::from_value(value).unwrap());
                }
            }
            Self { pods, namespaces }
        }

        fn ips(&self, who: &str) -> Vec<IpAddr> {
            let (ns, name) = who.split_once('/').unwrap();
            let pod = self
                .pods
                .iter()
                .find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name))
                .unwrap();
            let ips = pod.status.as_ref().unwrap().pod_ips.as_ref().unwrap();
            ips.iter().map(|ip| ip.ip.parse().unwrap()).collect()
        }

        /// Every pod of the grid on this node, slot n + 1 for pod n.
        fn compile(&self, policies: &[NetworkPolicy]) -> Compiled {
            self.compile_after(policies, &BTreeMap::new())
        }

        /// As `compile`, with the datapath holding the identities `previous`.
        fn compile_after(&self, policies: &[NetworkPolicy], previous: &BTreeMap<IpAddr, u64>) -> Compiled {
            let local: Vec<LocalPod> = self.pods.iter().enumerate().map(local_pod).collect();
            let compiled = compile(policies, &self.pods, &self.namespaces, &local, previous);
            assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
            compiled
        }

        fn slot(&self, who: &str) -> u32 {
            let (ns, name) = who.split_once('/').unwrap();
            let n = self
                .pods
                .iter()
                .position(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name))
                .unwrap();
            n as u32 + 1
        }
    }

    /// Pod n of a list on this node, unnamed, in slot n + 1, with its status's addresses.
    fn local_pod((n, pod): (usize, &Pod)) -> LocalPod {
        let ips = pod.status.as_ref().unwrap().pod_ips.iter().flatten();
        LocalPod {
            slot: n as u32 + 1,
            ips: ips.map(|ip| ip.ip.parse().unwrap()).collect(),
            pod: None,
        }
    }

    /// What the datapath decides for `from` -> `to` (`x/a`, or an address), as it
    /// does it: each end's isolation, the peer's identity, then its longest
    /// prefix, the port rules.
    fn allowed(grid: &Grid, compiled: &Compiled, from: &str, to: &str, proto: u8, port: u16, v6: bool) -> bool {
        let ip = |who: &str| -> IpAddr {
            match who.parse() {
                Ok(ip) => ip,
                Err(_) => grid.ips(who)[usize::from(v6)],
            }
        };
        let side = |who: &str, direction: u8, peer: IpAddr| {
            let Ok(slot) = std::panic::catch_unwind(|| grid.slot(who)) else {
                return true; // not a pod of the grid
            };
            let Some(policy) = compiled.pods.get(&slot) else {
                return true;
            };
            let flag = if direction == INGRESS {
                ISOLATED_INGRESS
            } else {
                ISOLATED_EGRESS
            };
            if policy.isolation & flag == 0 {
                return true;
            }
            let by_identity = compiled
                .identities
                .get(&peer)
                .and_then(|identity| policy.identity_rules.get(&(direction, *identity)));
            let host = Prefix::host(peer);
            let longest = (0..=128u8)
                .rev()
                .find_map(|len| policy.rules.get(&(direction, Prefix::new(host.addr, len))));
            [by_identity, longest]
                .into_iter()
                .flatten()
                .any(|rules| rules.iter().any(|r| r.allows(proto, port)))
        };
        side(from, EGRESS, ip(to)) && side(to, INGRESS, ip(from))
    }

    /// The entry by identity of the pod in `slot` for the pod at `peer`.
    fn identity_rule<'a>(compiled: &'a Compiled, slot: u32, direction: u8, peer: IpAddr) -> Option<&'a Vec<PortRule>> {
        let identity = compiled.identities.get(&peer)?;
        compiled.pods.get(&slot)?.identity_rules.get(&(direction, *identity))
    }

    const ALL: [&str; 9] = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];

    /// The pairs (from, to) allowed on TCP `port`, in both families alike.
    fn truth(grid: &Grid, policies: &[NetworkPolicy], proto: u8, port: u16) -> BTreeSet<(String, String)> {
        let compiled = grid.compile(policies);
        let mut pairs = BTreeSet::new();
        for from in ALL {
            for to in ALL {
                let v4 = allowed(grid, &compiled, from, to, proto, port, false);
                let v6 = allowed(grid, &compiled, from, to, proto, port, true);
                assert_eq!(v4, v6, "{from} -> {to}: the families disagree");
                if v4 {
                    pairs.insert((from.to_string(), to.to_string()));
                }
            }
        }
        pairs
    }

    fn everyone_but(denied: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        let mut pairs = BTreeSet::new();
        for from in ALL {
            for to in ALL {
                if !denied.contains(&(from, to)) {
                    pairs.insert((from.to_string(), to.to_string()));
                }
            }
        }
        pairs
    }

    fn denied_into(to: &str, except: &[&str]) -> Vec<(&'static str, String)> {
        ALL.iter()
            .filter(|f| !except.contains(f))
            .map(|f| (*f, to.to_string()))
            .collect()
    }

    fn expect(denied: Vec<(&str, String)>) -> BTreeSet<(String, String)> {
        let denied: Vec<(&str, &str)> = denied.iter().map(|(f, t)| (*f, t.as_str())).collect();
        everyone_but(&denied)
    }

    #[test]
    fn no_policy_allows_everything() {
        let grid = Grid::new();
        assert_eq!(truth(&grid, &[], IPPROTO_TCP, 80), everyone_but(&[]));
        assert!(grid.compile(&[]).pods.is_empty());
    }

    #[test]
    fn deny_all_ingress_isolates_every_pod_of_its_namespace_only() {
        let grid = Grid::new();
        let deny = policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
        let mut denied = Vec::new();
        for to in ["x/a", "x/b", "x/c"] {
            denied.extend(denied_into(to, &[]));
        }
        assert_eq!(
            truth(&grid, std::slice::from_ref(&deny), IPPROTO_TCP, 80),
            expect(denied)
        );
        let compiled = grid.compile(&[deny]);
        assert_eq!(compiled.pods[&grid.slot("x/a")].isolation, ISOLATED_INGRESS);
        assert!(compiled.pods[&grid.slot("x/a")].rules.is_empty());
        assert!(!compiled.pods.contains_key(&grid.slot("y/a")));
    }

    #[test]
    fn pod_selector_allows_pods_of_its_own_namespace() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "allow-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        );
        assert_eq!(
            truth(&grid, &[p], IPPROTO_TCP, 80),
            expect(denied_into("x/a", &["x/b"]))
        );
    }

    #[test]
    fn namespace_selector_and_both_together() {
        let grid = Grid::new();
        let ns_only = policy(
            "x",
            "from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        );
        assert_eq!(
            truth(&grid, &[ns_only], IPPROTO_TCP, 80),
            expect(denied_into("x/a", &["y/a", "y/b", "y/c"]))
        );
        // Both in one peer: pods b of namespaces other than x.
        let both = policy(
            "x",
            "b-elsewhere",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                       "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        );
        assert_eq!(
            truth(&grid, &[both], IPPROTO_TCP, 80),
            expect(denied_into("x/a", &["y/b", "z/b"]))
        );
    }

    #[test]
    fn match_expressions_of_every_operator() {
        let labels: BTreeMap<String, String> = [("pod".to_string(), "a".to_string())].into();
        let selector =
            |expr: Value| -> LabelSelector { serde_json::from_value(json!({"matchExpressions": [expr]})).unwrap() };
        let cases = [
            (json!({"key": "pod", "operator": "In", "values": ["a", "b"]}), true),
            (json!({"key": "pod", "operator": "In", "values": ["b"]}), false),
            (json!({"key": "pod", "operator": "NotIn", "values": ["b"]}), true),
            (json!({"key": "other", "operator": "NotIn", "values": ["b"]}), true),
            (json!({"key": "pod", "operator": "Exists"}), true),
            (json!({"key": "pod", "operator": "DoesNotExist"}), false),
            (json!({"key": "pod", "operator": "Bogus"}), false),
        ];
        for (expr, expected) in cases {
            assert_eq!(selects(Some(&selector(expr.clone())), &labels), expected, "{expr}");
        }
        assert!(selects(Some(&LabelSelector::default()), &labels));
    }

    #[test]
    fn ports_by_number_range_name_and_protocol() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "ports",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [
                {"port": 80},
                {"port": 1000, "endPort": 1010},
                {"port": "serve-81-udp", "protocol": "UDP"},
                {"protocol": "SCTP"},
            ]}]}),
        );
        let compiled = grid.compile(&[p]);
        let a = |proto, port| allowed(&grid, &compiled, "y/b", "x/a", proto, port, false);
        assert!(a(IPPROTO_TCP, 80));
        assert!(!a(IPPROTO_TCP, 81));
        assert!(!a(IPPROTO_UDP, 80));
        assert!(a(IPPROTO_TCP, 1000) && a(IPPROTO_TCP, 1005) && a(IPPROTO_TCP, 1010));
        assert!(!a(IPPROTO_TCP, 999) && !a(IPPROTO_TCP, 1011));
        assert!(a(IPPROTO_UDP, 81), "the named port, resolved on the pod that serves it");
        assert!(!a(IPPROTO_TCP, 81));
        assert!(a(IPPROTO_SCTP, 9) && a(IPPROTO_SCTP, 65535));
    }

    #[test]
    fn a_named_port_out_is_the_destination_pods() {
        let mut grid = Grid::new();
        // y/b calls its port 80 differently: egress to "serve-80" does not reach it.
        let renamed = pod("y", "b", json!({"pod": "b"}), &["10.0.1.2", "fd00::1:2"]);
        let mut renamed: Pod = serde_json::from_value(renamed).unwrap();
        renamed.spec.as_mut().unwrap().containers[0].ports.as_mut().unwrap()[0].name = Some("web".into());
        let at = grid
            .pods
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some("b") && p.metadata.namespace.as_deref() == Some("y"))
            .unwrap();
        grid.pods[at] = renamed;
        let p = policy(
            "x",
            "out",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"ports": [{"port": "serve-80"}]}]}),
        );
        let compiled = grid.compile(&[p]);
        assert!(allowed(&grid, &compiled, "x/a", "y/a", IPPROTO_TCP, 80, false));
        assert!(allowed(&grid, &compiled, "x/a", "y/a", IPPROTO_TCP, 80, true));
        assert!(!allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, false));
        assert!(
            !allowed(&grid, &compiled, "x/a", "192.0.2.1", IPPROTO_TCP, 80, false),
            "no pod: no name"
        );
    }

    #[test]
    fn ip_block_with_except_in_both_families() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "block",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [
                {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}},
                {"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::1:0/112"]}},
            ]}]}),
        );
        let compiled = grid.compile(&[p]);
        for v6 in [false, true] {
            let out = |to| allowed(&grid, &compiled, "x/a", to, IPPROTO_TCP, 80, v6);
            assert!(out("x/b") && out("z/c"), "inside the block");
            assert!(!out("y/a") && !out("y/c"), "the except");
        }
        assert!(!allowed(&grid, &compiled, "x/a", "192.0.2.1", IPPROTO_TCP, 80, false));
        assert!(allowed(&grid, &compiled, "x/a", "10.0.200.1", IPPROTO_TCP, 80, false));
    }

    #[test]
    fn an_ipv6_block_of_everything_holds_no_ipv4_address() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "v6",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]}),
        );
        let compiled = grid.compile(&[p]);
        assert!(allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, true));
        assert!(!allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, false));
        assert!(!allowed(&grid, &compiled, "x/a", "192.0.2.1", IPPROTO_TCP, 80, false));
    }

    #[test]
    fn an_ipv6_block_inside_the_ipv4_mapped_range_holds_no_ipv4_address() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "mapped",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "::ffff:10.0.0.0/104"}}]}]}),
        );
        let compiled = grid.compile(&[p]);
        assert!(!allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, false));
        assert!(!allowed(&grid, &compiled, "x/a", "10.0.200.1", IPPROTO_TCP, 80, false));
    }

    #[test]
    fn an_except_that_does_not_parse_takes_its_block_with_it() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "block",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/33"]}}]}]}),
        );
        let compiled = grid.compile(&[p]);
        assert!(
            !allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, false),
            "the except's range stays shut"
        );
        assert!(
            !allowed(&grid, &compiled, "x/a", "z/c", IPPROTO_TCP, 80, false),
            "and so does the block"
        );
    }

    #[test]
    fn leading_zero_ipv4_cidrs_parse_as_kubernetes_stored_them() {
        let grid = Grid::new();
        let p = policy(
            "x",
            "block",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "010.000.0.0/16", "except": ["010.000.001.0/24"]}}]}]}),
        );
        let compiled = grid.compile(&[p]);
        assert!(
            allowed(&grid, &compiled, "x/a", "z/c", IPPROTO_TCP, 80, false),
            "inside the block"
        );
        assert!(
            !allowed(&grid, &compiled, "x/a", "y/b", IPPROTO_TCP, 80, false),
            "the except"
        );
    }

    #[test]
    fn a_namespace_not_seen_yet_matches_no_selector_that_asks_for_an_absent_label() {
        let mut grid = Grid::new();
        grid.namespaces.retain(|ns| ns.metadata.name.as_deref() != Some("z"));
        let not_in = policy(
            "x",
            "not-in",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}]}),
        );
        let compiled = grid.compile(std::slice::from_ref(&not_in));
        assert!(
            allowed(&grid, &compiled, "x/b", "x/a", IPPROTO_TCP, 80, false),
            "x is not y"
        );
        assert!(!allowed(&grid, &compiled, "y/b", "x/a", IPPROTO_TCP, 80, false), "y is");
        assert!(
            !allowed(&grid, &compiled, "z/b", "x/a", IPPROTO_TCP, 80, false),
            "z's labels are unknown"
        );
        let every = policy(
            "x",
            "every",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        );
        let compiled = grid.compile(&[every]);
        assert!(
            allowed(&grid, &compiled, "z/b", "x/a", IPPROTO_TCP, 80, false),
            "z is some namespace"
        );
    }

    #[test]
    fn policies_add_up_and_their_ports_merge() {
        let grid = Grid::new();
        let one = policy(
            "x",
            "one",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80, "endPort": 90}]}]}),
        );
        let two = policy(
            "x",
            "two",
            json!({"podSelector": {},
                   "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 85, "endPort": 100}]}]}),
        );
        let compiled = grid.compile(&[one.clone(), two.clone()]);
        let a = &compiled.pods[&grid.slot("x/a")];
        let from_b = identity_rule(&compiled, grid.slot("x/a"), INGRESS, grid.ips("x/b")[0]).unwrap();
        assert_eq!(from_b.len(), 1, "80-90 and 85-100 are one range: {from_b:?}");
        assert_eq!((from_b[0].first, from_b[0].last, from_b[0].policy), (80, 100, 1));
        assert_eq!(a.selected_by, BTreeSet::from([1, 2]));
        assert_eq!(compiled.policy_names, ["x/one", "x/two"]);
        let t = |port| truth(&grid, &[one.clone(), two.clone()], IPPROTO_TCP, port);
        assert!(t(80).contains(&("x/b".into(), "x/a".into())));
        assert!(!t(80).contains(&("y/b".into(), "x/a".into())));
        assert!(t(95).contains(&("y/b".into(), "x/a".into())));
        assert!(!t(101).contains(&("x/b".into(), "x/a".into())));
    }

    #[test]
    fn an_egress_policy_leaves_ingress_open_and_the_reverse() {
        let grid = Grid::new();
        let egress = policy(
            "x",
            "egress",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
        );
        let mut denied: Vec<(&str, String)> = Vec::new();
        for to in ["y/a", "y/b", "y/c", "z/a", "z/b", "z/c"] {
            denied.push(("x/a", to.to_string()));
        }
        assert_eq!(truth(&grid, &[egress], IPPROTO_TCP, 80), expect(denied));
        // No policyTypes, an egress section: both directions isolated.
        let both = policy(
            "x",
            "both",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": []}),
        );
        assert_eq!(
            grid.compile(&[both]).pods[&1].isolation,
            ISOLATED_INGRESS | ISOLATED_EGRESS
        );
    }

    #[test]
    fn host_network_and_finished_pods_are_no_peers() {
        let mut grid = Grid::new();
        let mut host = pod("y", "host", json!({"pod": "b"}), &["10.9.9.9"]);
        host["spec"]["hostNetwork"] = json!(true);
        let mut done = pod("y", "done", json!({"pod": "b"}), &["10.9.9.8"]);
        done["status"]["phase"] = json!("Succeeded");
        grid.pods.push(serde_json::from_value(host).unwrap());
        grid.pods.push(serde_json::from_value(done).unwrap());
        let p = policy(
            "x",
            "from-b",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        );
        let compiled = grid.compile(&[p]);
        let rule = |ip: &str| identity_rule(&compiled, 1, INGRESS, ip.parse().unwrap());
        assert!(rule("10.9.9.9").is_none());
        assert!(rule("10.9.9.8").is_none());
        assert!(rule("10.0.1.2").is_some());
    }

    #[test]
    fn more_port_ranges_than_an_entry_holds_is_reported() {
        let grid = Grid::new();
        let ports: Vec<Value> = (0..20).map(|i| json!({"port": 1000 + 2 * i})).collect();
        let p = policy("x", "many", json!({"podSelector": {}, "ingress": [{"ports": ports}]}));
        let local = [LocalPod {
            slot: 1,
            ips: grid.ips("x/a"),
            pod: None,
        }];
        let compiled = compile(&[p], &grid.pods, &grid.namespaces, &local, &BTreeMap::new());
        assert_eq!(compiled.problems.len(), 1, "{:?}", compiled.problems);
        assert!(compiled.problems[0].contains("x/a"));
        assert!(compiled.pods[&1].rules.values().all(|r| r.len() == MAX_PORT_RULES));
    }

    #[test]
    fn an_unnamed_pod_the_cluster_does_not_know_yet_is_not_isolated() {
        let grid = Grid::new();
        let deny = policy("x", "deny", json!({"podSelector": {}}));
        let local = [LocalPod {
            slot: 7,
            ips: vec!["10.7.7.7".parse().unwrap()],
            pod: None,
        }];
        let compiled = compile(&[deny], &grid.pods, &grid.namespaces, &local, &BTreeMap::new());
        assert!(compiled.pods.is_empty());
        assert!(compiled.waiting_for_pod_object.is_empty());
    }

    fn named(namespace: &str, name: &str, uid: Option<&str>) -> Option<PodName> {
        Some(PodName {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.map(String::from),
        })
    }

    #[test]
    fn a_named_pod_the_cluster_does_not_show_yet_denies_everything_and_waits() {
        let grid = Grid::new();
        let local = [LocalPod {
            slot: 7,
            ips: vec!["10.7.7.7".parse().unwrap()],
            pod: named("w", "new", None),
        }];
        // No policy at all: without its labels nobody can tell which would select it.
        let compiled = compile(&[], &grid.pods, &grid.namespaces, &local, &BTreeMap::new());
        assert_eq!(compiled.pods[&7].isolation, ISOLATED_INGRESS | ISOLATED_EGRESS);
        assert!(compiled.pods[&7].rules.is_empty());
        assert_eq!(
            compiled.waiting_for_pod_object,
            BTreeMap::from([(7, "w/new".to_string())])
        );
    }

    #[test]
    fn a_named_pod_is_its_pod_object_before_kubelet_posts_its_addresses() {
        let mut grid = Grid::new();
        let mut new: Pod = serde_json::from_value(pod("x", "new", json!({"pod": "new"}), &[])).unwrap();
        new.metadata.uid = Some("u2".into());
        grid.pods.push(new);
        let ips: Vec<IpAddr> = vec!["10.0.0.9".parse().unwrap(), "fd00::9".parse().unwrap()];
        let local = |uid| {
            [LocalPod {
                slot: 20,
                ips: ips.clone(),
                pod: named("x", "new", uid),
            }]
        };
        let p = policy(
            "x",
            "new-from-b",
            json!({"podSelector": {"matchLabels": {"pod": "new"}}, "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        );
        // x/a admits x/new: the record's addresses, not the (empty) status's.
        let a_from_new = policy(
            "x",
            "a-from-new",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "new"}}}]}]}),
        );
        let mut everyone = local(Some("u2")).to_vec();
        everyone.push(LocalPod {
            slot: 1,
            ips: grid.ips("x/a"),
            pod: named("x", "a", None),
        });
        let compiled = compile(
            &[p.clone(), a_from_new],
            &grid.pods,
            &grid.namespaces,
            &everyone,
            &BTreeMap::new(),
        );
        assert!(compiled.waiting_for_pod_object.is_empty());
        let new = &compiled.pods[&20];
        assert_eq!(new.isolation, ISOLATED_INGRESS | ISOLATED_EGRESS);
        for ip in grid.ips("x/b") {
            assert!(identity_rule(&compiled, 20, INGRESS, ip).is_some(), "x/b may come in");
            assert!(identity_rule(&compiled, 20, EGRESS, ip).is_some(), "and be reached");
        }
        for ip in &ips {
            assert!(identity_rule(&compiled, 1, INGRESS, *ip).is_some(), "x/a admits {ip}");
        }
        // A pod of that name but another UID is an earlier one: not this pod's labels.
        let other = compile(
            std::slice::from_ref(&p),
            &grid.pods,
            &grid.namespaces,
            &local(Some("u1")),
            &BTreeMap::new(),
        );
        assert_eq!(
            other.waiting_for_pod_object,
            BTreeMap::from([(20, "x/new".to_string())])
        );
        assert!(other.pods[&20].rules.is_empty());
    }

    #[test]
    fn a_named_pod_is_found_by_name_not_by_an_address_another_pod_reports() {
        let grid = Grid::new();
        let deny_y = policy("y", "deny", json!({"podSelector": {}}));
        // y/b's status still shows 10.0.1.2, which this node gave to x/a anew.
        let local = [LocalPod {
            slot: 3,
            ips: vec!["10.0.1.2".parse().unwrap()],
            pod: named("x", "a", None),
        }];
        let compiled = compile(&[deny_y], &grid.pods, &grid.namespaces, &local, &BTreeMap::new());
        assert!(compiled.pods.is_empty(), "x/a is not in y: {:?}", compiled.pods);
    }

    #[test]
    fn a_pods_identity_is_its_label_set_and_the_same_everywhere() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let web = identity("x", &labels(&[("app", "web")]), &[]);
        // Fixed: another node, a restart or an upgrade computes the same.
        assert_eq!(web, 0x40c5_9977_f3eb_c8b5, "{web:#x}");
        assert_eq!(identity("x", &labels(&[("app", "web")]), &[]), web);
        assert_ne!(identity("y", &labels(&[("app", "web")]), &[]), web, "another namespace");
        assert_ne!(identity("x", &labels(&[("app", "db")]), &[]), web, "other labels");
        assert_ne!(
            identity("x", &labels(&[("app", "web"), ("v", "2")]), &[]),
            web,
            "one label more"
        );
        assert_ne!(
            identity("x", &labels(&[("app", "web")]), &[("http", 6, 80)]),
            web,
            "a named port"
        );
        assert_ne!(
            identity("x", &labels(&[("app", "web")]), &[("http", 6, 8080)]),
            identity("x", &labels(&[("app", "web")]), &[("http", 6, 80)])
        );
    }

    #[test]
    fn an_address_two_label_sets_claim_has_no_identity_unless_a_local_pod_has_it() {
        let mut grid = Grid::new();
        // y/stale still reports x/a's addresses with other labels.
        let stale = pod("y", "stale", json!({"pod": "stale"}), &["10.0.0.1", "fd00::0:1"]);
        grid.pods.push(serde_json::from_value(stale).unwrap());
        let remote_only: Vec<LocalPod> = Vec::new();
        let compiled = compile(&[], &grid.pods, &grid.namespaces, &remote_only, &BTreeMap::new());
        assert!(!compiled.identities.contains_key(&"10.0.0.1".parse().unwrap()));
        assert!(compiled.identities.contains_key(&"10.0.0.2".parse().unwrap()));
        // x/a runs here: its records say the address is its own.
        let local = [LocalPod {
            slot: 1,
            ips: grid.ips("x/a"),
            pod: Some(PodName {
                namespace: "x".into(),
                name: "a".into(),
                uid: None,
            }),
        }];
        let compiled = compile(&[], &grid.pods, &grid.namespaces, &local, &BTreeMap::new());
        let x_a = grid
            .pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("a"))
            .unwrap();
        let expected = identity(
            "x",
            x_a.metadata.labels.as_ref().unwrap(),
            &[("serve-80", 6, 80), ("serve-81-udp", 17, 81)],
        );
        assert_eq!(compiled.identities[&"10.0.0.1".parse::<IpAddr>().unwrap()], expected);
    }

    /// A cluster of 50,000 pod addresses (25,000 dual-stack pods: 500 workloads of 50
    /// replicas in 50 namespaces) and 110 pods on this node, each selected by a
    /// policy that admits `namespaceSelector: {}`: the entries grow with the 500 label
    /// sets, not the addresses, and fit the rules map with room for one pod's update.
    #[test]
    fn every_namespace_admitted_into_a_full_node_fits_in_a_cluster_of_50000_addresses() {
        let mut pods = Vec::new();
        let mut namespaces = Vec::new();
        for ns in 0..50 {
            let name = format!("ns{ns}");
            namespaces.push(serde_json::from_value(json!({"metadata": {"name": name}})).unwrap());
            for workload in 0..10 {
                for replica in 0..50 {
                    let n = (ns * 10 + workload) * 50 + replica;
                    let ips = [
                        format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255),
                        format!("fd00::{n:x}"),
                    ];
                    let labels = json!({"app": format!("w{workload}")});
                    let value = pod(&name, &format!("w{workload}-{replica}"), labels, &[&ips[0], &ips[1]]);
                    pods.push(serde_json::from_value::<Pod>(value).unwrap());
                }
            }
        }
        let local: Vec<LocalPod> = pods.iter().take(110).enumerate().map(local_pod).collect();
        let everyone = (0..50)
            .map(|ns| {
                policy(
                    &format!("ns{ns}"),
                    "from-everywhere",
                    json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
                )
            })
            .collect::<Vec<_>>();
        let started = std::time::Instant::now();
        let compiled = compile(&everyone, &pods, &namespaces, &local, &BTreeMap::new());
        eprintln!(
            "compiled 110 local pods over 50,000 addresses in {:?}",
            started.elapsed()
        );
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        assert_eq!(compiled.identities.len(), 50_000);
        assert_eq!(compiled.pods.len(), 110);
        let per_pod: Vec<usize> = compiled
            .pods
            .values()
            .map(|p| p.rules.len() + p.identity_rules.len())
            .collect();
        assert!(
            per_pod.iter().all(|n| *n == 500),
            "one entry per label set: {per_pod:?}"
        );
        let total: usize = per_pod.iter().sum();
        assert!(total + 500 <= velox_common::MAX_POLICY_RULES, "{total} entries");
    }

    /// x/b moves from `role: blue` to `role: green` (or `red`): until the datapath
    /// has its new identity, its old one is allowed what the new one is, and no more.
    #[test]
    fn a_relabelled_pods_old_identity_stands_for_its_new_one_until_the_datapath_has_it() {
        let mut grid = Grid::new();
        let from = |role: &str| {
            policy(
                "x",
                role,
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": role}}}]}]}),
            )
        };
        let policies = [from("blue"), from("green")];
        let relabel = |grid: &mut Grid, role: &str| {
            let b = grid
                .pods
                .iter_mut()
                .find(|p| p.metadata.namespace.as_deref() == Some("x") && p.metadata.name.as_deref() == Some("b"))
                .unwrap();
            b.metadata.labels.as_mut().unwrap().insert("role".into(), role.into());
        };
        let b = grid.ips("x/b")[0];
        relabel(&mut grid, "blue");
        let blue = grid.compile(&policies);
        let blue_identity = blue.identities[&b];
        let a = grid.slot("x/a");
        assert!(identity_rule(&blue, a, INGRESS, b).is_some());
        let entries = |compiled: &Compiled| compiled.pods[&a].identity_rules.clone();

        relabel(&mut grid, "green");
        let moving = grid.compile_after(&policies, &blue.identities);
        assert!(!moving.aliases.is_empty());
        let green_identity = moving.identities[&b];
        assert_ne!(green_identity, blue_identity);
        let rules = entries(&moving);
        assert_eq!(
            rules.get(&(INGRESS, blue_identity)),
            rules.get(&(INGRESS, green_identity)),
            "the old identity stands for the new"
        );
        assert!(rules.contains_key(&(INGRESS, green_identity)));
        let settled = grid.compile_after(&policies, &moving.identities);
        assert!(settled.aliases.is_empty());
        assert!(
            !entries(&settled).contains_key(&(INGRESS, blue_identity)),
            "then it goes"
        );

        relabel(&mut grid, "red");
        let leaving = grid.compile_after(&policies, &blue.identities);
        assert!(
            !entries(&leaving).contains_key(&(INGRESS, blue_identity)),
            "a label no policy admits: the old identity is allowed nothing either"
        );
    }

    /// Two label sets whose identities collide (forged here: no SHA-256 collision is
    /// at hand) stand for neither: no selector admits their pods, nor do their
    /// addresses keep the identity.
    #[test]
    fn two_label_sets_of_one_identity_are_neither() {
        let grid = Grid::new();
        let empty = BTreeMap::new();
        let mut views: Vec<PodView> = grid.pods.iter().filter_map(|p| view(p, &empty, None)).collect();
        let (x_a, y_b) = (views[0].identity, views[4].identity);
        views[4].identity = x_a; // y/b forged into x/a's identity
        let (by_identity, collided) = representatives(&views);
        assert_eq!(collided, HashSet::from([x_a]));
        assert!(!by_identity.contains_key(&x_a));
        assert!(!by_identity.contains_key(&y_b));
        assert_eq!(by_identity.len(), 7, "the other pods keep theirs");
        // A replica with the same label set is no collision.
        let mut replica = views[0].clone();
        replica.name = "a-2";
        let same = [views[0].clone(), replica];
        assert!(representatives(&same).1.is_empty());
    }
}
