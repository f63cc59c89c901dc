//! The ADD result, kept version-neutral and written in the format of the caller's version.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::IpAddr;
use velox_node::Family;

use crate::error::{CniError, Code};
use crate::version::CniVersion;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// The spec's DNS object, typed so a malformed one is refused before ADD changes anything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
}

impl CniResult {
    /// Reads a result of any supported version (a `prevResult`, or a delegated IPAM
    /// plugin's answer), with addresses of either family.
    pub fn parse(value: &Value) -> anyhow::Result<Self> {
        serde_json::from_value(value.clone())
            .map_err(|e| CniError::new(Code::Decode, format!("cannot read CNI result: {e}")).into())
    }

    /// Appends `other`, renumbering its interface indices after ours (chaining).
    pub fn extend(&mut self, other: CniResult) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        self.dns = self.dns.take().or(other.dns);
    }

    /// The result JSON in the format `version` defines.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let mut out = serde_json::to_value(self).expect("result serializes");
        out["cniVersion"] = version.as_str().into();
        if version < CniVersion::V1_0_0 {
            // 0.3.x and 0.4.0 tag every IP with its family.
            for (ip, config) in out["ips"].as_array_mut().into_iter().flatten().zip(&self.ips) {
                ip["version"] = json!(Family::of(&config.address.addr()).number());
            }
        }
        if version < CniVersion::V1_1_0 {
            for iface in out["interfaces"].as_array_mut().into_iter().flatten() {
                iface.as_object_mut().map(|o| o.remove("mtu"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "vlx0".into(),
                    mac: "aa:bb:cc:dd:ee:01".into(),
                    mtu: Some(1500),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:02".into(),
                    mtu: Some(1500),
                    sandbox: "/var/run/netns/x".into(),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "200.200.1.2/32".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:200:1::2/128".parse().unwrap(),
                    gateway: Some("fe80::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("169.254.1.1".parse().unwrap()),
                },
                Route {
                    dst: "::/0".parse().unwrap(),
                    gw: Some("fe80::1".parse().unwrap()),
                },
            ],
            dns: None,
        }
    }

    #[test]
    fn old_versions_tag_ips_with_version() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let json = sample().to_json(version);
            assert_eq!(json["cniVersion"], version.as_str());
            assert_eq!(json["ips"][0]["version"], "4");
            assert_eq!(json["ips"][1]["version"], "6");
            assert!(json["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn v1_drops_ip_version_and_only_1_1_has_mtu() {
        let v100 = sample().to_json(CniVersion::V1_0_0);
        assert!(v100["ips"][0].get("version").is_none());
        assert!(v100["interfaces"][1].get("mtu").is_none());
        let v110 = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v110["interfaces"][1]["mtu"], 1500);
        assert_eq!(v110["ips"][0]["address"], "200.200.1.2/32");
        assert_eq!(v110["ips"][0]["interface"], 1);
        assert_eq!(v110["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(v110["ips"][1]["address"], "fd00:200:1::2/128");
        assert_eq!(v110["routes"][1]["gw"], "fe80::1");
        assert!(v110.get("dns").is_none());
    }

    #[test]
    fn parses_any_version_and_chains() {
        let old = sample().to_json(CniVersion::V0_3_1);
        let mut prev = CniResult::parse(&old).unwrap();
        assert_eq!(prev.ips[0].address, sample().ips[0].address);
        prev.extend(sample());
        assert_eq!(prev.interfaces.len(), 4);
        assert_eq!(prev.ips[2].interface, Some(3));
        assert_eq!(prev.ips[3].address, sample().ips[1].address);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = CniResult::parse(&json!({"ips": [{"address": "not-an-ip"}]})).unwrap_err();
        assert_eq!(CniError::from_anyhow(&err).code, Code::Decode);
    }
}
