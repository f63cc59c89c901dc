//! The policy reconciler: compiles NetworkPolicies (see [`compile`]) and brings the
//! maps in line, one pod at a time and each pod at once. A pod's new rules are written
//! beside its live ones (the other rules version), then one write of its state makes
//! them live, then the old ones go: no packet meets half of an update. After any
//! change the rules generation moves on, so every allowed connection meets the new
//! rules at its next packet (the datapath lets it go on if they allow it still).
//! The cluster pods' identities (address -> label set) change beside the rules in
//! an order that admits nothing neither the old nor the new state admits (see
//! `apply_policy`).

mod compile;

pub use compile::{compile, name_of, reported_addresses, Compiled, LocalPod, PodPolicy, Prefix};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use velox_common::{IdentityRuleKey, PolicyKey, PolicyPorts, PolicyState, MAX_PORT_RULES, RULES_VERSION};
use velox_node::endpoint::{EndpointRecord, EndpointStore};
use velox_node::maps::PolicyMaps;
use velox_node::{Bpffs, StateDir};

use crate::names::PolicyNames;
use crate::source::PolicyInput;

/// A pod's entries as the maps hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    state: PolicyState,
    rules: BTreeMap<(u8, Prefix), PolicyPorts>,
    identity_rules: BTreeMap<(u8, u64), PolicyPorts>,
}

#[derive(Default)]
pub struct PolicyReconciler {
    /// By slot, the pods with a policy. `None`: read the maps first (at start, after
    /// a failure).
    applied: Option<BTreeMap<u32, Applied>>,
    /// The cluster pod addresses' identities as the map holds them. `None`: read the
    /// map first.
    identities: Option<BTreeMap<IpAddr, u64>>,
    names: Option<PolicyNames>,
    /// The pods whose rules the last pass could not write, by slot, and why: they
    /// deny what those rules would have allowed.
    pub failed_closed: BTreeMap<u32, String>,
    /// This node's named pods the last pass found no Pod object for, by slot: they
    /// deny everything until the source shows it.
    pub waiting_for_pod_object: BTreeMap<u32, String>,
    /// Cluster pod addresses whose identity the last pass could not write (a full
    /// map, a failed write), and why: selectors admit none of them.
    pub without_identity: BTreeMap<IpAddr, String>,
    /// A pass has written the source's policy into the maps (failed-closed pods too).
    pub applied_once: bool,
    /// Passes that wrote the source's policy into the maps: a pod whose record a
    /// pass saw has its state in the maps once this moves on.
    pub passes: u64,
}

impl PolicyReconciler {
    /// Applies `input` (`None`: the source cannot say; the maps keep the last rules)
    /// to this node's pods, the pods of `records`. The maps are written under the
    /// endpoint lock, and only for slots whose pod is still the one compiled for: a
    /// pod that took a slot over meanwhile keeps what ADD gave it until the next pass.
    pub fn apply_policy(
        &mut self,
        bpffs: &Bpffs,
        state_dir: &StateDir,
        store: &EndpointStore,
        input: Option<PolicyInput>,
        records: &[EndpointRecord],
    ) -> anyhow::Result<()> {
        let Some(input) = input else {
            return Ok(());
        };
        let local: Vec<LocalPod> = records
            .iter()
            .map(|r| LocalPod {
                slot: r.slot,
                ips: r.ips.clone(),
                pod: r.pod.clone(),
            })
            .collect();
        let mut maps = PolicyMaps::open(bpffs)?;
        let mut identities = match self.identities.take() {
            Some(identities) => identities,
            None => maps.identities()?.into_iter().collect(),
        };
        let compiled = compile(&input.policies, &input.pods, &input.namespaces, &local, &identities);
        for problem in &compiled.problems {
            log::warn!("NetworkPolicy: {problem}");
        }
        let mut names = PolicyNames {
            policies: compiled.policy_names.clone(),
            pods: compiled.pod_names.clone(),
            selected_by: BTreeMap::new(),
            nodes: crate::names::pod_nodes(&input.pods),
        };
        for pod in &local {
            if let Some(policy) = compiled.pods.get(&pod.slot) {
                let selecting: Vec<String> = policy.selected_by.iter().filter_map(|id| names.policy(*id)).collect();
                for ip in &pod.ips {
                    names.selected_by.insert(*ip, selecting.clone());
                }
            }
        }
        if self.names.as_ref() != Some(&names) {
            names.write(state_dir)?;
            self.names = Some(names);
        }
        let mut applied = match self.applied.take() {
            Some(applied) => applied,
            None => read_applied(&mut maps)?,
        };
        let compiled_for: HashMap<u32, &str> = records.iter().map(|r| (r.slot, r.host_ifname.as_str())).collect();
        let mut write = |maps: &mut PolicyMaps, compiled: &Compiled| -> anyhow::Result<_> {
            let _lock = store.lock()?;
            let owners: HashMap<u32, String> = store.list()?.into_iter().map(|r| (r.slot, r.host_ifname)).collect();
            let same_pod = |slot| owners.get(&slot).map(String::as_str) == compiled_for.get(&slot).copied();
            // On a failure the maps are read again next time: they are the truth.
            write_rules(maps, &mut applied, compiled, compiled_for.keys().copied(), same_pod)
        };
        // An address leaving an identity that is not an alias of its new one loses
        // it first: the rules about to be written judge that identity by the pods
        // that keep it, and the address would pass as one of them. It is refused a
        // moment instead. Then the rules, then the new identities: an alias
        // judges its addresses as their new identity under the new rules.
        let leaving: Vec<IpAddr> = identities
            .iter()
            .filter(|(addr, old)| compiled.identities.get(addr) != Some(old) && !compiled.aliases.contains_key(old))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in &leaving {
            // A failure leaves the map unknown: it is read again next time.
            maps.remove_identity(*addr)?;
            identities.remove(addr);
        }
        if !leaving.is_empty() {
            maps.bump_generation()?;
        }
        let mut failed_closed = write(&mut maps, &compiled)?;
        let (identities, without_identity) = write_identities(&mut maps, identities, &compiled.identities)?;
        if !compiled.aliases.is_empty() {
            let settled = compile(&input.policies, &input.pods, &input.namespaces, &local, &identities);
            failed_closed = write(&mut maps, &settled)?;
        }
        self.identities = Some(identities);
        self.without_identity = without_identity;
        self.failed_closed = failed_closed;
        self.waiting_for_pod_object = compiled.waiting_for_pod_object;
        self.applied_once = true;
        self.passes += 1;
        let mut failures = Vec::new();
        if !self.without_identity.is_empty() {
            failures.push(format!(
                "{} pod address(es) have no identity, selectors admit none of them: {}",
                self.without_identity.len(),
                self.without_identity.values().next().cloned().unwrap_or_default()
            ));
        }
        if !self.failed_closed.is_empty() {
            failures.push(format!(
                "{} pod(s) deny what their rules would allow, their rules could not be written: {}",
                self.failed_closed.len(),
                self.failed_closed.values().cloned().collect::<Vec<_>>().join("; ")
            ));
        }
        anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
        self.applied = Some(applied);
        Ok(())
    }
}

/// Turns enforcement off (`--network-policy=false`, or no source of policy): no pod
/// stays isolated by rules an earlier run left in the maps, and no connection by the
/// flows they allowed.
pub fn lift_isolation(bpffs: &Bpffs) -> anyhow::Result<()> {
    let mut maps = PolicyMaps::open(bpffs)?;
    let mut lifted = 0;
    for (slot, state) in maps.states()? {
        if state != PolicyState::default() {
            maps.set_state(slot, PolicyState::default())?;
            lifted += 1;
        }
    }
    for (key, prefix, _) in maps.rules()? {
        maps.remove_rule(key, prefix)?;
    }
    for (key, _) in maps.identity_rules()? {
        maps.remove_identity_rule(key)?;
    }
    for (addr, _) in maps.identities()? {
        maps.remove_identity(addr)?;
    }
    maps.bump_generation()?;
    if lifted > 0 {
        log::info!("NetworkPolicy is off: {lifted} pod(s) no longer isolated");
    }
    Ok(())
}

/// The pods' live entries; entries of a version that is not live (an update the
/// loader did not finish) are removed.
fn read_applied(maps: &mut PolicyMaps) -> anyhow::Result<BTreeMap<u32, Applied>> {
    let mut applied: BTreeMap<u32, Applied> = maps
        .states()?
        .into_iter()
        .map(|(slot, state)| {
            (
                slot,
                Applied {
                    state,
                    ..Default::default()
                },
            )
        })
        .collect();
    for (key, prefix, ports) in maps.rules()? {
        let live = applied.get(&key.slot).map(|a| a.state.version());
        if live == Some(key.version) {
            let prefix = Prefix {
                addr: u128::from_be_bytes(key.peer.addr),
                len: prefix as u8,
            };
            let entry = applied.get_mut(&key.slot).expect("looked up above");
            entry.rules.insert((key.direction, prefix), ports);
        } else {
            maps.remove_rule(key, prefix)?;
        }
    }
    for (key, ports) in maps.identity_rules()? {
        match applied.get_mut(&key.slot).filter(|a| a.state.version() == key.version) {
            Some(entry) => {
                entry.identity_rules.insert((key.direction, key.identity), ports);
            }
            None => maps.remove_identity_rule(key)?,
        }
    }
    Ok(applied)
}

/// Brings the map of cluster pod identities in line with `want`; `had` is what it
/// holds. The generation moves after any change: a connection allowed for a pod's old
/// labels meets the rules again. An address whose identity cannot be written has
/// none (it is removed): no selector admits it. Returns what the map holds and the
/// addresses without an identity, and why.
fn write_identities(
    maps: &mut PolicyMaps,
    mut had: BTreeMap<IpAddr, u64>,
    want: &BTreeMap<IpAddr, u64>,
) -> anyhow::Result<(BTreeMap<IpAddr, u64>, BTreeMap<IpAddr, String>)> {
    let mut changed = false;
    let mut failed = BTreeMap::new();
    let gone: Vec<IpAddr> = had.keys().filter(|addr| !want.contains_key(addr)).copied().collect();
    for addr in gone {
        // A failure leaves the map unknown: it is read again next time.
        maps.remove_identity(addr)?;
        had.remove(&addr);
        changed = true;
    }
    for (addr, identity) in want {
        if had.get(addr) == Some(identity) {
            continue;
        }
        changed = true;
        match maps.set_identity(*addr, *identity) {
            Ok(()) => {
                had.insert(*addr, *identity);
            }
            Err(e) => {
                failed.insert(*addr, format!("{addr}: {e}"));
                maps.remove_identity(*addr)?;
                had.remove(addr);
            }
        }
    }
    if changed {
        maps.bump_generation()?;
    }
    Ok((had, failed))
}

/// Brings every pod's entries in line with `compiled`, one pod at a time, for the
/// slots `same_pod` says still hold the pod compiled for: the pods with entries, the
/// pods compiled, and every pod of `local` (a pod the plugin started denied, which
/// no policy selects, is opened here). A pod whose rules cannot
/// all be written (the rules map is full, a write fails) fails closed: it becomes
/// isolated as wanted with none of its new rules, so it admits nothing in those
/// directions, and the others go on. The generation moves after any change, so no
/// connection keeps what the old rules allowed. Returns the pods that failed closed,
/// by slot, and why.
fn write_rules(
    maps: &mut PolicyMaps,
    applied: &mut BTreeMap<u32, Applied>,
    compiled: &Compiled,
    local: impl Iterator<Item = u32>,
    same_pod: impl Fn(u32) -> bool,
) -> anyhow::Result<BTreeMap<u32, String>> {
    let slots: BTreeSet<u32> = applied
        .keys()
        .chain(compiled.pods.keys())
        .copied()
        .chain(local)
        .collect();
    let mut changed = false;
    let mut failed = BTreeMap::new();
    let nothing = Applied::default();
    for slot in slots.into_iter().filter(|slot| same_pod(*slot)) {
        let want = compiled.pods.get(&slot).map(entries).unwrap_or_default();
        let had = applied.get(&slot).unwrap_or(&nothing).clone();
        // The plugin sets a slot's state for the pod that takes it over.
        let live = maps.state(slot)?;
        if live == had.state
            && had.state.flags & !RULES_VERSION == want.state.flags
            && had.rules == want.rules
            && had.identity_rules == want.identity_rules
        {
            continue;
        }
        changed = true;
        let now = match write_pod(maps, slot, live, &had, want) {
            Ok(now) => now,
            Err((now, e)) => {
                failed.insert(slot, format!("the pod in slot {slot}: {e:#}"));
                now
            }
        };
        match now.state == PolicyState::default() {
            true => applied.remove(&slot),
            false => applied.insert(slot, now),
        };
    }
    if changed {
        maps.bump_generation()?;
    }
    Ok(failed)
}

/// Moves the pod in `slot` from `had` to `want`: the new rules under the version that
/// is not `live`, then the state, then the old rules go. What the maps hold afterwards
/// is returned, also on a failure: then the pod's new version holds nothing.
fn write_pod(
    maps: &mut PolicyMaps,
    slot: u32,
    live: PolicyState,
    had: &Applied,
    want: Applied,
) -> Result<Applied, (Applied, anyhow::Error)> {
    let version = 1 - live.version();
    // A new pod in the slot went live on the version the previous one did not use
    // (the plugin starts it so): that one's rules are under the version to write,
    // not live, and go first.
    let stale_first = had.state.version() == version;
    let remove_had = |maps: &mut PolicyMaps| remove_rules(maps, slot, had.state.version(), had);
    if stale_first {
        if let Err(e) = remove_had(maps) {
            return Err((
                had.clone(),
                anyhow::Error::from(e).context("removing the slot's previous rules"),
            ));
        }
    }
    let state = match want == Applied::default() {
        true => PolicyState::default(), // not isolated: its rules go after
        false => PolicyState {
            flags: want.state.flags | if version == 1 { RULES_VERSION } else { 0 },
        },
    };
    let written = want
        .rules
        .iter()
        .try_for_each(|((direction, prefix), ports)| {
            maps.put_rule(key(slot, *direction, version, prefix), u32::from(prefix.len), ports)
        })
        .and_then(|()| {
            want.identity_rules
                .iter()
                .try_for_each(|((direction, identity), ports)| {
                    maps.put_identity_rule(identity_key(slot, *direction, version, *identity), ports)
                })
        })
        .map_err(anyhow::Error::from);
    let now = match &written {
        Ok(()) => Applied { state, ..want.clone() },
        Err(_) => {
            // Fail closed: isolated as wanted, with an empty rules version (an entry
            // that cannot be removed is one of the wanted rules: it admits nothing
            // the new rules do not).
            let _ = remove_rules(maps, slot, version, &want);
            Applied {
                state,
                ..Default::default()
            }
        }
    };
    let switched = maps.set_state(slot, now.state).map_err(anyhow::Error::from);
    if let Err(e) = switched {
        // The old rules stay live, and so do their entries.
        return Err((had.clone(), e.context("switching the pod's rules")));
    }
    // Entries left of the old version would come back to life at the next switch:
    // a failure here makes the next pass read the maps again, which removes them.
    let removed = match stale_first {
        true => Ok(()),
        false => remove_had(maps),
    };
    match (written, removed) {
        (Ok(()), Ok(())) => Ok(now),
        (Err(e), _) => Err((now, e)),
        (_, Err(e)) => Err((now, anyhow::Error::from(e).context("removing the old rules"))),
    }
}

/// Removes `of`'s rule entries of both kinds, under `version`, of the pod in `slot`.
fn remove_rules(maps: &mut PolicyMaps, slot: u32, version: u8, of: &Applied) -> velox_node::Result<()> {
    for (direction, prefix) in of.rules.keys() {
        maps.remove_rule(key(slot, *direction, version, prefix), u32::from(prefix.len))?;
    }
    for (direction, identity) in of.identity_rules.keys() {
        maps.remove_identity_rule(identity_key(slot, *direction, version, *identity))?;
    }
    Ok(())
}

/// A pod's compiled policy as map values (its state without a version yet).
fn entries(policy: &PodPolicy) -> Applied {
    fn values<K: Copy + Ord>(rules: &BTreeMap<K, Vec<velox_common::PortRule>>) -> BTreeMap<K, PolicyPorts> {
        rules
            .iter()
            .map(|(key, rules)| {
                let mut ports = PolicyPorts::default();
                for (slot, rule) in ports.rules.iter_mut().zip(rules.iter().take(MAX_PORT_RULES)) {
                    *slot = *rule;
                }
                (*key, ports)
            })
            .collect()
    }
    Applied {
        state: PolicyState {
            flags: policy.isolation,
        },
        rules: values(&policy.rules),
        identity_rules: values(&policy.identity_rules),
    }
}

fn key(slot: u32, direction: u8, version: u8, prefix: &Prefix) -> PolicyKey {
    PolicyKey {
        slot,
        direction,
        version,
        pad: [0; 2],
        peer: prefix.ip_key(),
    }
}

fn identity_key(slot: u32, direction: u8, version: u8, identity: u64) -> IdentityRuleKey {
    IdentityRuleKey {
        slot,
        direction,
        version,
        pad: [0; 2],
        identity,
    }
}
