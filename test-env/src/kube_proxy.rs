//! kube-proxy's iptables mode in miniature, for testing the datapath beside it: a
//! Service is a DNAT rule in the nat chain `KUBE-SERVICES`, jumped to from PREROUTING
//! (pods, other nodes) and OUTPUT (host processes), as kube-proxy writes it; a
//! NodePort without `externalTrafficPolicy: Local` also masquerades.

use anyhow::Context;
use std::net::{IpAddr, SocketAddr};

use crate::node::Node;
use crate::run_in_netns;
use velox_node::Family;

const SERVICES_CHAIN: &str = "KUBE-SERVICES";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One frontend of a Service and the backend it is translated to.
#[derive(Clone, Debug)]
pub struct ServiceRule {
    pub frontend: SocketAddr,
    pub protocol: Protocol,
    pub backend: SocketAddr,
    /// Masquerade the translated traffic to the node's address (a NodePort with the
    /// default `externalTrafficPolicy: Cluster`).
    pub snat: bool,
}

fn iptables(node: &Node, family: Family, args: &[&str]) -> anyhow::Result<String> {
    let binary = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    run_in_netns(&node.name, binary, &[&["-w"][..], args].concat())
}

impl ServiceRule {
    /// Installs the rule on `node`; the rules go with the node's netns.
    pub fn install(&self, node: &Node) -> anyhow::Result<()> {
        let family = Family::of(&self.frontend.ip());
        if iptables(node, family, &["-t", "nat", "-L", SERVICES_CHAIN, "-n"]).is_err() {
            iptables(node, family, &["-t", "nat", "-N", SERVICES_CHAIN])?;
            for hook in ["PREROUTING", "OUTPUT"] {
                iptables(node, family, &["-t", "nat", "-I", hook, "-j", SERVICES_CHAIN])?;
            }
        }
        let host = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        };
        let (frontend, backend) = (host(self.frontend.ip()), self.backend.to_string());
        let (protocol, port) = (self.protocol.name(), self.frontend.port().to_string());
        iptables(
            node,
            family,
            &[
                "-t",
                "nat",
                "-A",
                SERVICES_CHAIN,
                "-d",
                &frontend,
                "-p",
                protocol,
                "--dport",
                &port,
                "-j",
                "DNAT",
                "--to-destination",
                &backend,
            ],
        )?;
        if self.snat {
            let (backend_ip, backend_port) = (host(self.backend.ip()), self.backend.port().to_string());
            iptables(
                node,
                family,
                &[
                    "-t",
                    "nat",
                    "-I",
                    "POSTROUTING",
                    "-d",
                    &backend_ip,
                    "-p",
                    protocol,
                    "--dport",
                    &backend_port,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "DNAT",
                    "--ctorigdst",
                    &frontend,
                    "-j",
                    "MASQUERADE",
                ],
            )?;
        }
        Ok(())
    }
}

/// Many IPv4 TCP ClusterIP Services the way kube-proxy's iptables mode writes them,
/// in one `iptables-restore`: a match per Service in `KUBE-SERVICES` (walked in order
/// by the first packet of every connection), a `KUBE-SVC-*` chain picking an endpoint
/// with `-m statistic --mode random --probability 1/n`, and a `KUBE-SEP-*` chain per
/// endpoint doing the DNAT. Replaces what an earlier call wrote.
pub fn restore_services(node: &Node, services: &[(SocketAddr, Vec<SocketAddr>)]) -> anyhow::Result<()> {
    let mut chains = format!("*nat\n:{SERVICES_CHAIN} - [0:0]\n");
    let mut rules = String::new();
    for (i, (frontend, backends)) in services.iter().enumerate() {
        let svc = format!("KUBE-SVC-{i:08X}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A {SERVICES_CHAIN} -d {}/32 -p tcp -m tcp --dport {} -j {svc}\n",
            frontend.ip(),
            frontend.port()
        ));
        for (j, backend) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:08X}-{j}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let left = backends.len() - j;
            let pick = match left {
                1 => String::new(),
                n => format!("-m statistic --mode random --probability {:.11} ", 1.0 / n as f64),
            };
            rules.push_str(&format!("-A {svc} {pick}-j {sep}\n"));
            rules.push_str(&format!("-A {sep} -p tcp -m tcp -j DNAT --to-destination {backend}\n"));
        }
    }
    let script = format!("{chains}{rules}COMMIT\n");
    crate::iptables_restore(&node.name, &script).with_context(|| format!("restoring {} Services", services.len()))?;
    for hook in ["PREROUTING", "OUTPUT"] {
        let jump = ["-t", "nat", "-C", hook, "-j", SERVICES_CHAIN];
        if iptables(node, Family::V4, &jump).is_err() {
            iptables(node, Family::V4, &["-t", "nat", "-I", hook, "-j", SERVICES_CHAIN])?;
        }
    }
    Ok(())
}

/// Empties `KUBE-SERVICES`: no Service matches, and no packet walks a rule.
pub fn flush_services(node: &Node) -> anyhow::Result<()> {
    if iptables(node, Family::V4, &["-t", "nat", "-L", SERVICES_CHAIN, "-n"]).is_ok() {
        iptables(node, Family::V4, &["-t", "nat", "-F", SERVICES_CHAIN])?;
    }
    Ok(())
}
