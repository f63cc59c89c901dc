//! The CNI versions Velox speaks, and which operations each allows.

use crate::error::{fail, Code};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

impl CniVersion {
    pub fn parse(version: &str) -> anyhow::Result<Self> {
        Ok(match version {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            other => {
                return fail(
                    Code::IncompatibleVersion,
                    format!(
                        "cniVersion {other:?} is not supported; velox supports {}",
                        SUPPORTED_VERSIONS.join(", ")
                    ),
                )
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED_VERSIONS[self as usize]
    }

    /// The first version that has a given command, per the spec's version history.
    pub fn require(self, command: &str, since: CniVersion) -> anyhow::Result<()> {
        if self < since {
            return fail(
                Code::IncompatibleVersion,
                format!(
                    "{command} needs cniVersion {} or newer, the config says {}",
                    since.as_str(),
                    self.as_str()
                ),
            );
        }
        Ok(())
    }
}

/// The answer to VERSION.
pub fn version_info() -> serde_json::Value {
    serde_json::json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CniError;

    #[test]
    fn every_supported_version_round_trips() {
        for version in SUPPORTED_VERSIONS {
            assert_eq!(CniVersion::parse(version).unwrap().as_str(), version);
        }
    }

    #[test]
    fn unknown_versions_are_incompatible() {
        for version in ["0.1.0", "0.2.0", "1.2.0", "", "latest"] {
            let err = CniVersion::parse(version).unwrap_err();
            assert_eq!(CniError::from_anyhow(&err).code, Code::IncompatibleVersion, "{version}");
        }
    }

    #[test]
    fn check_gc_status_are_gated_by_version() {
        assert!(CniVersion::V0_3_1.require("CHECK", CniVersion::V0_4_0).is_err());
        assert!(CniVersion::V0_4_0.require("CHECK", CniVersion::V0_4_0).is_ok());
        assert!(CniVersion::V1_0_0.require("GC", CniVersion::V1_1_0).is_err());
        assert!(CniVersion::V1_1_0.require("STATUS", CniVersion::V1_1_0).is_ok());
    }

    #[test]
    fn version_answer_lists_all() {
        let info = version_info();
        assert_eq!(info["cniVersion"], "1.1.0");
        assert_eq!(info["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
