//! A node wired by one of the reference CNI plugins (ptp, bridge) with host-local
//! IPAM, driven through the same CNI calls as Velox, for side-by-side measurements.

use anyhow::bail;
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use crate::cni::{exec_plugin, CniOutcome, Invocation};
use crate::netns::{delete_netns, netns_with_prefix};
use crate::{run, Pod};

pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub struct ReferenceNode {
    pub name: String,
    pub plugin: String,
    pub conf: Value,
    state_dir: PathBuf,
}

impl ReferenceNode {
    /// `ptp`: a veth per pod, routed by the host (like Velox, without eBPF).
    pub fn ptp(name: &str, subnet: Ipv4Net) -> Self {
        Self::new(name, "ptp", subnet, json!({}))
    }

    /// `bridge`: pods on a Linux bridge with the gateway on it.
    pub fn bridge(name: &str, subnet: Ipv4Net) -> Self {
        Self::new(
            name,
            "bridge",
            subnet,
            json!({"bridge": "cni-bench0", "isGateway": true}),
        )
    }

    fn new(name: &str, plugin: &str, subnet: Ipv4Net, extra: Value) -> Self {
        let state_dir = PathBuf::from(format!("/run/velox-test/{name}"));
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("{plugin}-{name}"),
            "type": plugin,
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": state_dir.join("ipam")},
        });
        conf.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        Self {
            name: name.to_string(),
            plugin: plugin.to_string(),
            conf,
            state_dir,
        }
    }

    pub fn up(&self) -> anyhow::Result<()> {
        crate::netns::create_pod_netns(&self.name)
    }

    pub fn cni(&self, command: &str, pod: &str) -> anyhow::Result<CniOutcome> {
        let netns = crate::netns_path(pod);
        let plugin = Path::new(REFERENCE_PLUGINS).join(&self.plugin);
        let call = Invocation::new(command, pod, Some(&netns), "eth0");
        exec_plugin(&self.name, &plugin, &call, &self.conf)
    }

    /// A pod named `<node>-<pod>`: its netns, then ADD.
    pub fn add_pod(&self, pod: &str) -> anyhow::Result<(Pod, CniOutcome)> {
        let name = format!("{}-{pod}", self.name);
        run("ip", &["netns", "add", &name])?;
        let outcome = self.cni("ADD", &name)?;
        if !outcome.success {
            bail!("{} ADD of {name} failed: {}", self.plugin, outcome.stdout);
        }
        Ok((Pod::from_result(&name, &outcome.stdout)?, outcome))
    }

    pub fn delete_pod(&self, pod: &Pod) -> anyhow::Result<CniOutcome> {
        let outcome = self.cni("DEL", &pod.name)?;
        if !outcome.success {
            bail!("{} DEL of {} failed: {}", self.plugin, pod.name, outcome.stdout);
        }
        delete_netns(&pod.name)?;
        Ok(outcome)
    }

    /// Removes the pods (DEL first, as a runtime would), the node and the IPAM state.
    pub fn down(&self) -> anyhow::Result<()> {
        for pod in netns_with_prefix(&format!("{}-", self.name)) {
            let _ = self.cni("DEL", &pod);
            delete_netns(&pod)?;
        }
        delete_netns(&self.name)?;
        if self.state_dir.exists() {
            std::fs::remove_dir_all(&self.state_dir)?;
        }
        Ok(())
    }
}
