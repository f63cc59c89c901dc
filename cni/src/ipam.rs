//! Where pod addresses come from: the built-in allocator, or any CNI IPAM plugin.

use anyhow::Context;
use serde_json::Value;
use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use velox_node::{Family, StateDir};

use crate::config::{Attachment, Environment, IpamSource, NetConf};
use crate::error::{fail, CniError, Code};
use crate::result::CniResult;

pub use velox_node::ipam::Allocator;

pub enum Ipam {
    Builtin(Allocator),
    Delegated(Delegate),
}

impl Ipam {
    pub fn new(conf: &NetConf, env: &Environment, stdin: &[u8]) -> anyhow::Result<Self> {
        Ok(match conf.ipam_source()? {
            IpamSource::Builtin(subnets) => {
                Self::Builtin(Allocator::new(&StateDir::new(&conf.state_dir), &conf.name, subnets))
            }
            IpamSource::Delegated(plugin) => Self::Delegated(Delegate {
                plugin,
                cni_path: env.cni_path.clone(),
                stdin: stdin.to_vec(),
            }),
        })
    }

    /// The pod's addresses, at most one per family, IPv4 first. Velox gives every pod
    /// a /32 and a /128, whatever prefix IPAM reports.
    pub fn allocate(&self, attachment: &Attachment) -> anyhow::Result<Vec<IpAddr>> {
        match self {
            Self::Builtin(allocator) => Ok(allocator.allocate(attachment)?),
            Self::Delegated(delegate) => {
                let result = delegate.run("ADD")?.unwrap_or_default();
                let result = CniResult::parse(&result)?;
                let ips: Vec<IpAddr> = Family::ALL
                    .iter()
                    .filter_map(|family| {
                        let of_family = |ip: &&crate::result::IpConfig| Family::of(&ip.address.addr()) == *family;
                        result.ips.iter().find(of_family).map(|ip| ip.address.addr())
                    })
                    .collect();
                if ips.is_empty() {
                    return fail(
                        Code::InvalidConfig,
                        format!("IPAM plugin {} returned no address", delegate.plugin),
                    );
                }
                Ok(ips)
            }
        }
    }

    pub fn release(&self, attachment: &Attachment) -> anyhow::Result<()> {
        match self {
            Self::Builtin(allocator) => Ok(allocator.release(attachment)?),
            Self::Delegated(delegate) => delegate.run("DEL").map(drop),
        }
    }

    pub fn check(&self, attachment: &Attachment, ips: &[IpAddr]) -> anyhow::Result<()> {
        match self {
            Self::Builtin(allocator) => {
                let reservations = allocator.reservations()?;
                for ip in ips {
                    if !reservations
                        .iter()
                        .any(|(held, owner)| held == ip && owner == attachment)
                    {
                        return fail(
                            Code::Datapath,
                            format!("{ip} is not reserved for this container in the built-in IPAM"),
                        );
                    }
                }
                Ok(())
            }
            Self::Delegated(delegate) => delegate.run("CHECK").map(drop),
        }
    }

    /// Frees every address not held by a valid attachment.
    pub fn gc(&self, valid: &HashSet<Attachment>) -> anyhow::Result<()> {
        match self {
            Self::Builtin(allocator) => Ok(allocator.retain_only(valid)?),
            Self::Delegated(delegate) => delegate.run("GC").map(drop),
        }
    }
}

/// An IPAM plugin run as the spec says: same environment and stdin, our command.
pub struct Delegate {
    plugin: String,
    cni_path: Vec<PathBuf>,
    stdin: Vec<u8>,
}

impl Delegate {
    fn binary(&self) -> anyhow::Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(&self.plugin))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!(
                        "IPAM plugin {:?} not found in CNI_PATH {:?}",
                        self.plugin, self.cni_path
                    ),
                )
                .into()
            })
    }

    /// Runs the plugin; its error JSON keeps its code, with the plugin named in the message.
    fn run(&self, command: &str) -> anyhow::Result<Option<Value>> {
        let binary = self.binary()?;
        let mut child = Command::new(&binary)
            .env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        child.stdin.take().expect("piped").write_all(&self.stdin)?;
        let output = child.wait_with_output()?;
        let answer: Option<Value> = serde_json::from_slice(&output.stdout).ok();
        if !output.status.success() {
            let (code, msg) = match &answer {
                Some(err) => (
                    err["code"].as_u64().unwrap_or(0),
                    err["msg"].as_str().unwrap_or("").to_string(),
                ),
                None => (0, String::from_utf8_lossy(&output.stdout).into_owned()),
            };
            let code = match code {
                1 => Code::IncompatibleVersion,
                4 => Code::InvalidEnvironment,
                6 => Code::Decode,
                7 => Code::InvalidConfig,
                11 => Code::TryAgainLater,
                _ => Code::Datapath,
            };
            return fail(code, format!("IPAM plugin {} {command} failed: {msg}", self.plugin));
        }
        Ok(answer)
    }
}
