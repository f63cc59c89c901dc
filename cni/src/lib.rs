//! Velox's CNI plugin, as a library: the binary `velox` is a thin wrapper. What the
//! plugin shares with the loader (layout, records, maps, netlink) is velox-node's.

pub mod config;
pub mod error;
pub mod ipam;
pub mod plugin;
pub mod result;
pub mod version;
