//! Velox's CNI plugin, as a library: the binary `velox` is a thin wrapper, and the
//! loader and tests share the state layout (records, pins) from here.

pub mod config;
pub mod datapath;
pub mod endpoint;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod plugin;
pub mod result;
pub mod version;
