//! Running a CNI plugin exactly as a runtime does: inside the node's network
//! namespace, CNI_* variables in a clean environment, the config on stdin.

use anyhow::Context;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::in_netns;

/// What one CNI invocation returned.
#[derive(Debug)]
pub struct CniOutcome {
    pub success: bool,
    pub stdout: Value,
    pub elapsed: Duration,
}

impl CniOutcome {
    /// The error code, for a failed call.
    pub fn code(&self) -> Option<u64> {
        (!self.success).then(|| self.stdout["code"].as_u64()).flatten()
    }
}

/// One CNI call's CNI_* variables.
#[derive(Clone, Copy, Debug)]
pub struct Invocation<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    /// CNI_ARGS (`KEY=VALUE;...`), empty for none.
    pub args: &'a str,
}

impl<'a> Invocation<'a> {
    /// `command` for `container_id` without CNI_ARGS.
    pub fn new(command: &'a str, container_id: &'a str, netns: Option<&'a Path>, ifname: &'a str) -> Self {
        Self {
            command,
            container_id,
            netns,
            ifname,
            args: "",
        }
    }
}

/// CNI_ARGS as kubelet passes them for the pod `namespace/name`.
pub fn kubernetes_args(namespace: &str, name: &str, container_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
    )
}

/// Starts `plugin` in the netns `node` with the config written to its stdin, without
/// waiting for it (to kill it halfway).
pub fn spawn_plugin(node: &str, plugin: &Path, call: &Invocation, conf: &Value) -> anyhow::Result<Child> {
    let mut cmd = in_netns(node, plugin.to_str().context("plugin path")?, &[]);
    cmd.env_clear()
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    if let Some(netns) = call.netns {
        cmd.env("CNI_NETNS", netns);
    }
    if !call.args.is_empty() {
        cmd.env("CNI_ARGS", call.args);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(conf.to_string().as_bytes())?;
    Ok(child)
}

/// Runs `plugin` in the netns `node`; `elapsed` is what the runtime would wait.
pub fn exec_plugin(node: &str, plugin: &Path, call: &Invocation, conf: &Value) -> anyhow::Result<CniOutcome> {
    let start = Instant::now();
    let child = spawn_plugin(node, plugin, call, conf)?;
    let output = child.wait_with_output()?;
    let elapsed = start.elapsed();
    let stdout = if output.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "{} {} printed non-JSON: {}",
                plugin.display(),
                call.command,
                String::from_utf8_lossy(&output.stdout)
            )
        })?
    };
    Ok(CniOutcome {
        success: output.status.success(),
        stdout,
        elapsed,
    })
}
