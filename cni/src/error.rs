//! CNI errors: every failure leaves the plugin as `{"code", "msg", "details"}` on stdout.

use std::fmt;

/// Error codes of the CNI spec 1.1 (table "Error codes") and Velox's own (100+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    /// A netlink, bpf or filesystem step of Velox failed.
    Datapath = 100,
    /// The container already has an interface of that name on this network.
    AlreadyExists = 101,
    /// The built-in allocator has no free address left.
    AddressesExhausted = 102,
    /// The address IPAM gave is another pod's (here or on another node) or the node's.
    AddressInUse = 103,
    /// The node has as many pods as the loader's `--max-pods`.
    NodeFull = 104,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Turns any failure into a CNI error: a `CniError` anywhere in the chain keeps its
    /// code, a node layer's "loader not ready" is worth a retry (11), anything else is
    /// a datapath failure; the whole chain goes into `details`.
    pub fn from_anyhow(err: &anyhow::Error) -> Self {
        let chain = format!("{err:#}");
        if let Some(cni) = err.downcast_ref::<CniError>() {
            return match cni.details.is_empty() && chain != cni.msg {
                true => cni.clone().with_details(chain),
                false => cni.clone(),
            };
        }
        let node = err.chain().find_map(|cause| cause.downcast_ref::<velox_node::Error>());
        let code = match node {
            Some(velox_node::Error::NotReady { .. }) => Code::TryAgainLater,
            Some(velox_node::Error::AddressTaken { .. }) => Code::AddressInUse,
            Some(velox_node::Error::Exhausted { .. }) => Code::AddressesExhausted,
            Some(velox_node::Error::NodeFull { .. }) => Code::NodeFull,
            _ => return CniError::new(Code::Datapath, err.to_string()).with_details(chain),
        };
        CniError::new(code, node.map(ToString::to_string).unwrap_or_default()).with_details(chain)
    }

    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut out = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            out["details"] = self.details.clone().into();
        }
        out
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)
    }
}

impl std::error::Error for CniError {}

/// Shorthand for `Err(CniError::new(code, msg).into())`.
pub fn fail<T>(code: Code, msg: impl Into<String>) -> anyhow::Result<T> {
    Err(CniError::new(code, msg).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn code_survives_context() {
        let err = fail::<()>(Code::InvalidConfig, "bad mtu")
            .context("parsing config")
            .unwrap_err();
        let cni = CniError::from_anyhow(&err);
        assert_eq!(cni.code, Code::InvalidConfig);
        assert_eq!(cni.msg, "bad mtu");
        assert_eq!(cni.details, "parsing config: bad mtu");
    }

    #[test]
    fn foreign_errors_are_datapath_errors() {
        let err = anyhow::anyhow!("netlink said no").context("creating veth");
        let cni = CniError::from_anyhow(&err);
        assert_eq!(cni.code, Code::Datapath);
        assert_eq!(cni.details, "creating veth: netlink said no");
    }

    #[test]
    fn a_loader_that_is_not_ready_is_worth_a_retry() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no pin");
        let err = anyhow::Error::from(velox_node::Error::not_ready("cannot open maps/X")(missing)).context("ADD");
        let cni = CniError::from_anyhow(&err);
        assert_eq!(cni.code, Code::TryAgainLater);
        assert!(cni.msg.contains("velox-loader is not ready"), "{}", cni.msg);
    }

    #[test]
    fn json_shape_follows_spec() {
        let json = CniError::new(Code::TryAgainLater, "loader not ready").to_json("1.1.0");
        assert_eq!(json["code"], 11);
        assert_eq!(json["msg"], "loader not ready");
        assert_eq!(json["cniVersion"], "1.1.0");
        assert!(json.get("details").is_none());
    }
}
