//! kube-proxy's iptables mode in miniature, for testing the datapath beside it: a
//! Service is a DNAT rule in the nat chain `KUBE-SERVICES`, jumped to from PREROUTING
//! (pods, other nodes) and OUTPUT (host processes), as kube-proxy writes it; a
//! NodePort without `externalTrafficPolicy: Local` also masquerades.

use std::net::{IpAddr, SocketAddr};

use crate::node::Node;
use crate::run;
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
    let netns = format!("--net=/run/netns/{}", node.name);
    run("nsenter", &[&[netns.as_str(), binary, "-w"][..], args].concat())
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
