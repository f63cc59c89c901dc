//! The node contract both Velox binaries share: where everything lives on disk and
//! in bpffs, the endpoint records, the health protocol, handles on the pinned maps
//! and links, and netlink. The CNI plugin and the loader build on this; nothing here
//! knows CNI error codes or how the loader decides anything.

pub mod endpoint;
pub mod error;
pub mod fs;
pub mod health;
pub mod ipam;
pub mod layout;
pub mod link;
pub mod maglev;
pub mod maps;
pub mod netlink;
pub mod pod_policy;

pub use error::{Error, ErrorList, Result};
pub use layout::{Bpffs, StateDir};

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An address family, where a feature exists once per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &std::net::IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    /// "4" or "6", as CNI results before 1.0.0 and iproute2's `-4`/`-6` say it.
    pub fn number(self) -> &'static str {
        match self {
            Self::V4 => "4",
            Self::V6 => "6",
        }
    }
}
