//! The network configuration on stdin and the CNI_* environment.

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use std::path::{Component, Path, PathBuf};
pub use velox_node::endpoint::Attachment;
use velox_node::endpoint::PodName;
use velox_node::layout::{DEFAULT_BPFFS_ROOT, DEFAULT_STATE_DIR};
use velox_node::Family;

use crate::error::{fail, CniError, Code};
use crate::result::{CniResult, Dns};
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
    pub dns: Option<Dns>,
    /// Runtime arguments (`args`) and capabilities (`runtimeConfig`): Velox reads
    /// neither, but they must be objects.
    #[serde(default)]
    pub args: Option<Map<String, Value>>,
    #[serde(default)]
    pub runtime_config: Option<Map<String, Value>>,
    #[serde(default = "default_bpffs_root")]
    pub bpffs_root: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub log_level: Option<log::LevelFilter>,
    /// Parsed with the rest of the config, so a bad one fails before anything changes.
    #[serde(default, deserialize_with = "prev_result")]
    pub prev_result: Option<CniResult>,
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

fn prev_result<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<CniResult>, D::Error> {
    let value = Value::deserialize(deserializer)?;
    CniResult::parse(&value)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("prevResult: {e:#}")))
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
        if !is_spec_name(&self.name) {
            return fail(
                Code::InvalidConfig,
                format!(
                    "network name {:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
                    self.name
                ),
            );
        }
        let paths = [
            ("bpffsRoot", Some(&self.bpffs_root)),
            ("stateDir", Some(&self.state_dir)),
            ("logFile", self.log_file.as_ref()),
        ];
        for (key, path) in paths {
            if let Some(path) = path.filter(|p| !is_normal_absolute(p)) {
                return fail(
                    Code::InvalidConfig,
                    format!("{key} {} must be an absolute path without '.' or '..'", path.display()),
                );
            }
        }
        if self.socket_lb_arg().is_some_and(|v| !v.is_boolean()) {
            return fail(Code::InvalidConfig, "args.cni.socketLB must be true or false");
        }
        for attachment in self.valid_attachments.iter().flatten() {
            check_attachment(attachment, Code::InvalidConfig, "cni.dev/valid-attachments: ")?;
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65535).contains(&mtu) {
                return fail(Code::InvalidConfig, format!("mtu {mtu} is outside 68..=65535"));
            }
        }
        self.ipam_source().map(|_| ())
    }

    /// Whether the pod opted out of the socket load balancer: `args.cni.socketLB:
    /// false`, where a runtime or Multus puts per-pod arguments.
    pub fn socket_lb_opt_out(&self) -> bool {
        self.socket_lb_arg() == Some(&Value::Bool(false))
    }

    fn socket_lb_arg(&self) -> Option<&Value> {
        self.args.as_ref()?.get("cni")?.get("socketLB")
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

/// A file name without path tricks: CNI plugin names.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The spec's rule for network names and container IDs: an alphanumeric first
/// character, then alphanumerics, '_', '.' or '-'.
fn is_spec_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric()) && is_plain_name(name)
}

/// The spec's rule for interface names: 1 to 15 bytes, not "." or "..", no '/', ':'
/// or whitespace.
fn is_spec_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Absolute, and already in its shortest form: no '.', '..', '//' or trailing '/'.
fn is_normal_absolute(path: &Path) -> bool {
    let normal: PathBuf = path.components().collect();
    path.is_absolute()
        && normal.as_os_str() == path.as_os_str()
        && !path.components().any(|c| c == Component::ParentDir)
}

fn check_attachment(attachment: &Attachment, code: Code, context: &str) -> anyhow::Result<()> {
    if !is_spec_name(&attachment.container_id) {
        return fail(
            code,
            format!(
                "{context}container ID {:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
                attachment.container_id
            ),
        );
    }
    if !is_spec_ifname(&attachment.ifname) {
        return fail(
            code,
            format!(
                "{context}interface name {:?} must be 1 to 15 bytes, not '.' or '..', without '/', ':' or whitespace",
                attachment.ifname
            ),
        );
    }
    Ok(())
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
    /// The Kubernetes pod of an ADD, when CNI_ARGS names it.
    pub pod: Option<PodName>,
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
        if per_container {
            let attachment = Attachment {
                container_id: container_id.clone(),
                ifname: ifname.clone(),
            };
            check_attachment(&attachment, Code::InvalidEnvironment, "CNI_CONTAINERID/CNI_IFNAME: ")?;
        }
        // DEL must work when the runtime has already lost the netns. VERSION and the
        // node-wide commands ignore it (libcni probes VERSION with CNI_NETNS=dummy).
        let netns = match get("CNI_NETNS").filter(|v| !v.is_empty()) {
            Some(_) if !per_container => None,
            Some(path) if !Path::new(&path).is_absolute() => {
                return fail(
                    Code::InvalidEnvironment,
                    format!("CNI_NETNS {path:?} is not an absolute path"),
                )
            }
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
        // Only ADD reads it: DEL and CHECK must not fail on arguments they ignore.
        let pod = match command {
            Command::Add => pod_of_cni_args(&get("CNI_ARGS").unwrap_or_default())?,
            _ => None,
        };
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            cni_path,
            pod,
        })
    }
}

/// The Kubernetes pod CNI_ARGS names (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, and
/// `K8S_POD_UID` where the runtime sends it), as `KEY=VALUE` pairs split by `;`.
/// Other keys are the runtime's business, and so is a pod name without a namespace
/// (podman's container names). A pair without `=` or a name Kubernetes would refuse
/// is an error: the name decides which policy the pod gets.
fn pod_of_cni_args(args: &str) -> anyhow::Result<Option<PodName>> {
    let mut pairs = std::collections::HashMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return fail(Code::InvalidEnvironment, format!("CNI_ARGS: {pair:?} is not KEY=VALUE"));
        };
        pairs.insert(key, value);
    }
    // Podman passes K8S_POD_NAME alone (its container's name): without a namespace
    // it names no Kubernetes pod.
    let (Some(namespace), Some(name)) = (pairs.get("K8S_POD_NAMESPACE"), pairs.get("K8S_POD_NAME")) else {
        return Ok(None);
    };
    if !is_dns_label(namespace) {
        return fail(
            Code::InvalidEnvironment,
            format!("CNI_ARGS: K8S_POD_NAMESPACE {namespace:?} is not a Kubernetes namespace name"),
        );
    }
    if !is_dns_subdomain(name) {
        return fail(
            Code::InvalidEnvironment,
            format!("CNI_ARGS: K8S_POD_NAME {name:?} is not a Kubernetes pod name"),
        );
    }
    let uid = pairs.get("K8S_POD_UID").filter(|uid| !uid.is_empty());
    if let Some(uid) = uid.filter(|uid| uid.len() > 128 || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return fail(
            Code::InvalidEnvironment,
            format!("CNI_ARGS: K8S_POD_UID {uid:?} is not a Kubernetes UID"),
        );
    }
    Ok(Some(PodName {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: uid.map(|uid| uid.to_string()),
    }))
}

/// RFC 1123 label, as Kubernetes checks namespace names: 1 to 63 lowercase
/// alphanumerics or '-', alphanumeric at both ends.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// RFC 1123 subdomain, as Kubernetes checks pod names: labels joined by '.', 253
/// bytes at most.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
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
        // What libcni sends when it validates a config.
        let probe = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_CONTAINERID", "cni"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
        ]);
        assert_eq!(probe.unwrap().command, Command::Version);
        assert_eq!(env(&[("CNI_COMMAND", "STATUS")]).unwrap().command, Command::Status);
    }

    #[test]
    fn cni_args_name_the_pod_on_add_only() {
        let base = [
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let with = |command: &str, args: &str| {
            let mut vars = vec![("CNI_COMMAND", command), ("CNI_ARGS", args)];
            vars.extend(base);
            env(&vars)
        };
        let kubelet = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=web-0.a;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=0f1e-2d";
        let pod = with("ADD", kubelet).unwrap().pod.unwrap();
        assert_eq!(pod.to_string(), "x/web-0.a");
        assert_eq!(pod.uid.as_deref(), Some("0f1e-2d"));
        assert_eq!(with("ADD", "IgnoreUnknown=1").unwrap().pod, None, "cnitool");
        assert_eq!(
            with("ADD", "IgnoreUnknown=1;K8S_POD_NAME=My_Container").unwrap().pod,
            None,
            "podman names its container, no Kubernetes pod"
        );
        assert_eq!(with("ADD", "K8S_POD_NAMESPACE=x").unwrap().pod, None);
        assert_eq!(with("ADD", "").unwrap().pod, None);
        for bad in [
            "K8S_POD_NAMESPACE=x;K8S_POD_NAME",
            "K8S_POD_NAMESPACE=X;K8S_POD_NAME=a",
            "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a/b",
            "K8S_POD_NAMESPACE=x;K8S_POD_NAME=",
            "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_UID=a b",
        ] {
            assert_eq!(code_of(with("ADD", bad)), Code::InvalidEnvironment, "{bad}");
        }
        assert_eq!(with("DEL", "K8S_POD_NAME=a").unwrap().pod, None, "DEL ignores CNI_ARGS");
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

#[cfg(test)]
mod validation {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const BASE: &str = r#"{"cniVersion":"1.1.0","name":"n","type":"velox","subnets":["10.0.0.0/24"]}"#;

    fn with(key: &str, value: Value) -> Vec<u8> {
        let mut conf: Value = serde_json::from_str(BASE).unwrap();
        conf[key] = value;
        serde_json::to_vec(&conf).unwrap()
    }

    fn rejection(conf: &[u8]) -> CniError {
        CniError::from_anyhow(&NetConf::parse(conf).unwrap_err())
    }

    #[test]
    fn every_field_is_checked_before_anything_runs() {
        let bad: [(&str, Value); 15] = [
            ("args", json!({"cni": {"socketLB": "no"}})),
            ("name", json!("-leading-dash")),
            ("name", json!("has space")),
            ("name", json!("a/b")),
            ("bpffsRoot", json!("relative/velox")),
            ("stateDir", json!("/var/lib/../velox")),
            ("stateDir", json!("/var/lib//velox")),
            ("logFile", json!("/tmp/./velox.log")),
            ("dns", json!({"nameservers": ["not-an-address"]})),
            ("dns", json!({"nameserver": ["10.0.0.10"]})),
            ("args", json!("K8S_POD_NAME=x")),
            ("runtimeConfig", json!(["portMappings"])),
            ("prevResult", json!({"ips": [{"address": "10.0.0.2"}]})),
            ("prevResult", json!("a string")),
            (
                "cni.dev/valid-attachments",
                json!([{"containerID": "../x", "ifname": "eth0"}]),
            ),
        ];
        for (key, value) in bad {
            let err = rejection(&with(key, value.clone()));
            assert_eq!(err.code, Code::InvalidConfig, "{key}={value}: {err:?}");
        }
        let err = rejection(&with("prevResult", json!({"ips": [{"address": "10.0.0.2"}]})));
        assert!(err.msg.contains("prevResult"), "{err:?}");
    }

    #[test]
    fn well_formed_optional_fields_are_accepted() {
        let (conf, _) = NetConf::parse(&with(
            "dns",
            json!({"nameservers": ["10.96.0.10", "fd00::a"], "search": ["svc.cluster.local"], "options": ["ndots:5"]}),
        ))
        .unwrap();
        assert_eq!(conf.dns.unwrap().nameservers.len(), 2);
        let prev = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "x"}], "ips": [{"address": "10.9.0.2/24"}]});
        let (conf, _) = NetConf::parse(&with("prevResult", prev)).unwrap();
        assert_eq!(conf.prev_result.unwrap().ips.len(), 1);
        NetConf::parse(&with("runtimeConfig", json!({"portMappings": []}))).unwrap();
        NetConf::parse(&with("args", json!({"cni": {"ips": []}}))).unwrap();
        let (opted_out, _) = NetConf::parse(&with("args", json!({"cni": {"socketLB": false}}))).unwrap();
        assert!(opted_out.socket_lb_opt_out());
        assert!(!NetConf::parse(BASE.as_bytes()).unwrap().0.socket_lb_opt_out());
        NetConf::parse(&with("name", json!("k8s-pod-network_1.x"))).unwrap();
    }

    #[test]
    fn spec_names_and_interface_names() {
        for ok in ["a", "0abc", "a.b-c_d"] {
            assert!(is_spec_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a b", "a/b", "ä"] {
            assert!(!is_spec_name(bad), "{bad}");
        }
        for ok in ["eth0", "net1", "e@th", "0123456789abcde"] {
            assert!(is_spec_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "0123456789abcdef"] {
            assert!(!is_spec_ifname(bad), "{bad}");
        }
    }

    /// Field values a runtime or a user could send, good and bad.
    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[ -~]{0,20}".prop_map(Value::from),
            Just(json!("/abs/path")),
            Just(json!("10.0.0.0/24")),
            Just(json!("fd00::/64")),
            Just(json!(["10.0.0.0/24", "fd00::/64"])),
            Just(json!({"type": "host-local"})),
            Just(json!({"nameservers": ["10.0.0.1"]})),
            Just(json!({"ips": [{"address": "10.0.0.2/32"}]})),
            Just(json!([{"containerID": "c", "ifname": "eth0"}])),
            Just(json!([])),
            Just(json!({})),
        ]
    }

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("cniVersion"),
            Just("name"),
            Just("type"),
            Just("mtu"),
            Just("subnet"),
            Just("subnets"),
            Just("ipam"),
            Just("dns"),
            Just("args"),
            Just("runtimeConfig"),
            Just("bpffsRoot"),
            Just("stateDir"),
            Just("logFile"),
            Just("logLevel"),
            Just("prevResult"),
            Just("cni.dev/valid-attachments"),
            Just("unknownKey"),
        ]
        .prop_map(String::from)
    }

    proptest! {
        /// Whatever arrives on stdin: no panic, and a rejection is one CNI error
        /// with a spec code for config problems.
        #[test]
        fn any_config_is_accepted_or_refused_with_a_config_code(
            changes in prop::collection::vec((field_name(), field_value()), 0..6),
            garbage in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        ) {
            let mut conf: Value = serde_json::from_str(BASE).unwrap();
            for (key, value) in changes {
                conf[key] = value;
            }
            let stdin = match garbage {
                Some(bytes) => bytes,
                None => serde_json::to_vec(&conf).unwrap(),
            };
            if let Err(err) = NetConf::parse(&stdin) {
                let cni = CniError::from_anyhow(&err);
                prop_assert!(matches!(cni.code, Code::IncompatibleVersion | Code::Decode | Code::InvalidConfig), "{cni:?}");
                let json = cni.to_json("1.1.0");
                prop_assert!(json["msg"].as_str().is_some_and(|m| !m.is_empty()));
            }
        }

        #[test]
        fn any_environment_is_accepted_or_refused_with_code_4(
            command in prop_oneof![
                prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]).prop_map(String::from),
                "[A-Z]{0,6}",
            ],
            container_id in prop::option::of("[ -~]{0,70}"),
            netns in prop::option::of(prop_oneof![Just("/run/netns/x".to_string()), "[ -~]{0,30}"]),
            ifname in prop::option::of("[ -~]{0,20}"),
        ) {
            let vars = [("CNI_COMMAND", Some(command)), ("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)];
            let outcome = Environment::from_vars(|name| vars.iter().find(|(k, _)| *k == name).and_then(|(_, v)| v.clone()));
            match outcome {
                Ok(env) if matches!(env.command, Command::Add | Command::Del | Command::Check) => {
                    prop_assert!(is_spec_name(&env.container_id) && is_spec_ifname(&env.ifname));
                    prop_assert!(env.netns.as_ref().is_none_or(|p| p.is_absolute()));
                }
                Ok(_) => {}
                Err(err) => prop_assert_eq!(CniError::from_anyhow(&err).code, Code::InvalidEnvironment),
            }
        }
    }
}
