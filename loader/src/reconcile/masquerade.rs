//! Masquerading of pod traffic that leaves the cluster: iptables for IPv4 and
//! ip6tables for IPv6, one chain each.

use ipnet::IpNet;
use std::collections::BTreeSet;
use velox_node::Family;

use crate::netfilter::{remove_chain, replace_chain};

/// The nat chain holding the masquerade rule and its exceptions, in both families.
pub const MASQ_CHAIN: &str = "VELOX-MASQ";
/// The built-in chain that jumps to it.
pub const MASQ_HOOK: &str = "POSTROUTING";

/// Removes the masquerade chains and their jumps in both families.
pub fn remove_masquerade() -> anyhow::Result<()> {
    for family in Family::ALL {
        remove_chain(family, "nat", MASQ_CHAIN, MASQ_HOOK)?;
    }
    Ok(())
}

/// Pod traffic from `pod_cidrs` to anywhere outside `inside` leaves with the node's
/// address, in each family this node has pods of.
pub fn masquerade_outside(pod_cidrs: &[IpNet], inside: &BTreeSet<IpNet>) -> anyhow::Result<()> {
    for family in Family::ALL {
        let of_family = |net: &&IpNet| Family::of(&net.addr()) == family;
        let sources: Vec<IpNet> = pod_cidrs.iter().filter(of_family).copied().collect();
        if !sources.is_empty() {
            let exempt: Vec<IpNet> = inside.iter().filter(of_family).copied().collect();
            masquerade(family, &sources, &exempt)?;
        }
    }
    Ok(())
}

/// Pod traffic from `sources` to anywhere outside `inside` leaves with the node's
/// address.
fn masquerade(family: Family, sources: &[IpNet], inside: &[IpNet]) -> anyhow::Result<()> {
    let mut rules: Vec<String> = inside.iter().map(|net| format!("-d {net} -j RETURN")).collect();
    rules.push("-j MASQUERADE".into());
    let jumps: Vec<Vec<String>> = sources.iter().map(|s| vec!["-s".into(), s.to_string()]).collect();
    replace_chain(family, "nat", MASQ_CHAIN, &rules, MASQ_HOOK, &jumps)
}
