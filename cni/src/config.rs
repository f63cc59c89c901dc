//! The network configuration on stdin and the CNI_* environment.

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;
pub use velox_node::endpoint::Attachment;
use velox_node::layout::{DEFAULT_BPFFS_ROOT, DEFAULT_STATE_DIR};
use velox_node::Family;

use crate::error::{fail, CniError, Code};
use crate::version::CniVersion;

pub const DEFAULT_MTU: u32 = 1500;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The pod CIDR of one family for the built-in allocator.
    #[serde(default)]
    pub subnet: Option<IpNet>,
    /// The pod CIDRs for the built-in allocator, at most one per family (dual-stack).
    #[serde(default)]
    pub subnets: Option<Vec<IpNet>>,
    /// Delegated IPAM: any CNI IPAM plugin on CNI_PATH, named by `type`.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub dns: Option<Value>,
    #[serde(default = "default_bpffs_root")]
    pub bpffs_root: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub log_level: Option<log::LevelFilter>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Where the pod's address comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum IpamSource {
    /// One pod CIDR per family, IPv4 first.
    Builtin(Vec<IpNet>),
    Delegated(String),
}

fn default_bpffs_root() -> PathBuf {
    DEFAULT_BPFFS_ROOT.into()
}

fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}

impl NetConf {
    /// Parses stdin: bad JSON is code 6, an unknown version 1, a bad field 7.
    pub fn parse(stdin: &[u8]) -> anyhow::Result<(Self, CniVersion)> {
        let value: Value = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(Code::Decode, format!("network config on stdin is not valid JSON: {e}")))?;
        let version = match value.get("cniVersion") {
            Some(Value::String(v)) => CniVersion::parse(v)?,
            _ => return fail(Code::InvalidConfig, "network config has no string \"cniVersion\""),
        };
        let conf: NetConf = serde_json::from_value(value)
            .map_err(|e| CniError::new(Code::InvalidConfig, format!("invalid network config: {e}")))?;
        conf.validate()?;
        Ok((conf, version))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty() {
            return fail(Code::InvalidConfig, "network config needs a non-empty \"name\"");
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return fail(Code::InvalidConfig, format!("mtu {mtu} is outside 68..=65535"));
            }
        }
        self.ipam_source().map(|_| ())
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    pub fn ipam_source(&self) -> anyhow::Result<IpamSource> {
        let delegated = self.ipam.as_ref().map(|ipam| ipam.get("type").and_then(Value::as_str));
        let subnets = match (&self.subnet, &self.subnets) {
            (Some(_), Some(_)) => return fail(Code::InvalidConfig, "give \"subnet\" or \"subnets\", not both"),
            (Some(one), None) => Some(vec![*one]),
            (None, Some(many)) => Some(many.clone()),
            (None, None) => None,
        };
        match (subnets, delegated) {
            (Some(subnets), None) => Ok(IpamSource::Builtin(pod_subnets(subnets)?)),
            (None, Some(Some(plugin))) if is_plain_name(plugin) => Ok(IpamSource::Delegated(plugin.to_string())),
            (None, Some(_)) => fail(
                Code::InvalidConfig,
                "\"ipam\" needs a \"type\" naming an IPAM plugin binary (e.g. \"host-local\")",
            ),
            (Some(_), Some(_)) => fail(
                Code::InvalidConfig,
                "give either \"subnets\" (built-in IPAM) or \"ipam\" (delegated), not both",
            ),
            (None, None) => fail(
                Code::InvalidConfig,
                "no address source: set \"subnets\" (e.g. [\"200.200.1.0/24\", \"fd00:200:1::/64\"]) or \"ipam\"",
            ),
        }
    }
}

/// Checks the built-in allocator's CIDRs: one or two, at most one per family, each
/// with room for pods; IPv4 first.
fn pod_subnets(subnets: Vec<IpNet>) -> anyhow::Result<Vec<IpNet>> {
    let mut subnets: Vec<IpNet> = subnets.into_iter().map(|s| s.trunc()).collect();
    subnets.sort_by_key(|s| Family::of(&s.addr()));
    if subnets.is_empty() {
        return fail(Code::InvalidConfig, "\"subnets\" is empty");
    }
    let one_per_family = match subnets.as_slice() {
        [_] => true,
        [a, b] => Family::of(&a.addr()) != Family::of(&b.addr()),
        _ => false,
    };
    if !one_per_family {
        return fail(
            Code::InvalidConfig,
            format!("\"subnets\" takes at most one CIDR per address family, got {subnets:?}"),
        );
    }
    for subnet in &subnets {
        if subnet.prefix_len() > subnet.max_prefix_len() - 2 {
            return fail(
                Code::InvalidConfig,
                format!("subnet {subnet} is too small for pods: leave at least two bits for hosts"),
            );
        }
    }
    Ok(subnets)
}

/// A file name without path tricks: CNI plugin names, container IDs.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

/// The CNI_* variables, validated for the command at hand.
#[derive(Clone, Debug)]
pub struct Environment {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub cni_path: Vec<PathBuf>,
}

impl Environment {
    pub fn command_from(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Command> {
        Ok(match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some(other) => return fail(Code::InvalidEnvironment, format!("unknown CNI_COMMAND {other:?}")),
            None => return fail(Code::InvalidEnvironment, "CNI_COMMAND is not set"),
        })
    }

    /// Reads the environment through `get` (`std::env::var` in the binary, a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let command = Self::command_from(&get)?;
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |name: &str| -> anyhow::Result<String> {
            match get(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if per_container => fail(Code::InvalidEnvironment, format!("{name} is not set")),
                None => Ok(String::new()),
            }
        };
        let container_id = required("CNI_CONTAINERID")?;
        let ifname = required("CNI_IFNAME")?;
        if per_container && !is_plain_name(&container_id) {
            return fail(
                Code::InvalidEnvironment,
                format!("CNI_CONTAINERID {container_id:?} may only hold letters, digits, '-', '_' and '.'"),
            );
        }
        if per_container && (ifname.len() > 15 || !is_plain_name(&ifname)) {
            return fail(
                Code::InvalidEnvironment,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name (at most 15 of [A-Za-z0-9_.-])"),
            );
        }
        // DEL must work when the runtime has already lost the netns.
        let netns = match get("CNI_NETNS").filter(|v| !v.is_empty()) {
            Some(path) => Some(PathBuf::from(path)),
            None if matches!(command, Command::Add | Command::Check) => {
                return fail(Code::InvalidEnvironment, "CNI_NETNS is not set")
            }
            None => None,
        };
        let cni_path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            cni_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn code_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> Code {
        CniError::from_anyhow(&result.unwrap_err()).code
    }

    #[test]
    fn minimal_builtin_config() {
        let (conf, version) =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"velox","type":"velox","subnet":"200.200.1.0/24"}"#)
                .unwrap();
        assert_eq!(version, CniVersion::V1_0_0);
        assert_eq!(
            conf.ipam_source().unwrap(),
            IpamSource::Builtin(vec!["200.200.1.0/24".parse().unwrap()])
        );
        assert_eq!(conf.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
        assert_eq!(conf.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(conf.mtu(), DEFAULT_MTU);
    }

    #[test]
    fn dual_stack_subnets_come_ipv4_first() {
        let (conf, _) = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"velox","subnets":["fd00:200:1::/64","200.200.1.9/24"]}"#,
        )
        .unwrap();
        let expected = vec!["200.200.1.0/24".parse().unwrap(), "fd00:200:1::/64".parse().unwrap()];
        assert_eq!(conf.ipam_source().unwrap(), IpamSource::Builtin(expected));
        let (v6_only, _) =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"velox","subnet":"fd00::/120"}"#).unwrap();
        assert_eq!(
            v6_only.ipam_source().unwrap(),
            IpamSource::Builtin(vec!["fd00::/120".parse().unwrap()])
        );
    }

    #[test]
    fn velox_keys_and_delegated_ipam() {
        let (conf, _) = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"velox","mtu":9000,
                 "bpffsRoot":"/sys/fs/bpf/x","stateDir":"/tmp/s","logFile":"/tmp/l","logLevel":"debug",
                 "ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}]]}}"#,
        )
        .unwrap();
        assert_eq!(conf.ipam_source().unwrap(), IpamSource::Delegated("host-local".into()));
        assert_eq!(conf.mtu(), 9000);
        assert_eq!(conf.bpffs_root, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(conf.log_level, Some(log::LevelFilter::Debug));
    }

    #[test]
    fn error_codes_for_bad_configs() {
        assert_eq!(code_of(NetConf::parse(b"{not json")), Code::Decode);
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"0.2.0","name":"n","type":"velox","subnet":"10.0.0.0/24"}"#
            )),
            Code::IncompatibleVersion
        );
        assert_eq!(
            code_of(NetConf::parse(br#"{"name":"n","type":"velox"}"#)),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"velox"}"#)),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"velox","subnet":"10.0.0.0/24","mtu":20}"#
            )),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"velox","subnet":"banana"}"#
            )),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"velox","subnet":"10.0.0.0/31"}"#
            )),
            Code::InvalidConfig
        );
        assert_eq!(code_of(NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"velox","subnet":"10.0.0.0/24","ipam":{"type":"host-local"}}"#)), Code::InvalidConfig);
        for subnets in [
            r#"[]"#,
            r#"["10.0.0.0/24","10.1.0.0/24"]"#,
            r#"["fd00::/64","fd01::/64"]"#,
            r#"["10.0.0.0/24","fd00::/127"]"#,
        ] {
            let conf = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"velox","subnets":{subnets}}}"#);
            assert_eq!(
                code_of(NetConf::parse(conf.as_bytes())),
                Code::InvalidConfig,
                "{subnets}"
            );
        }
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"velox","subnet":"10.0.0.0/24","subnets":["fd00::/64"]}"#
            )),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"velox","ipam":{"type":"../../bin/sh"}}"#
            )),
            Code::InvalidConfig
        );
        assert_eq!(
            code_of(NetConf::parse(
                br#"{"cniVersion":"1.0.0","name":"","type":"velox","subnet":"10.0.0.0/24"}"#
            )),
            Code::InvalidConfig
        );
    }

    fn env(pairs: &[(&str, &str)]) -> anyhow::Result<Environment> {
        let vars: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Environment::from_vars(move |k| vars.get(k).cloned())
    }

    #[test]
    fn environment_per_command() {
        let add = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(add.command, Command::Add);
        assert_eq!(add.cni_path.len(), 2);
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(del.netns, None);
        assert_eq!(env(&[("CNI_COMMAND", "VERSION")]).unwrap().command, Command::Version);
        assert_eq!(env(&[("CNI_COMMAND", "STATUS")]).unwrap().command, Command::Status);
    }

    #[test]
    fn bad_environment_is_code_4() {
        assert_eq!(code_of(env(&[])), Code::InvalidEnvironment);
        assert_eq!(code_of(env(&[("CNI_COMMAND", "FROB")])), Code::InvalidEnvironment);
        assert_eq!(
            code_of(env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0")
            ])),
            Code::InvalidEnvironment
        );
        assert_eq!(
            code_of(env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "a/b"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "eth0")
            ])),
            Code::InvalidEnvironment
        );
        assert_eq!(
            code_of(env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_NETNS", "/x"),
                ("CNI_IFNAME", "much-too-long-ifname")
            ])),
            Code::InvalidEnvironment
        );
        assert_eq!(
            code_of(env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")])),
            Code::InvalidEnvironment
        );
    }
}
