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

/// Creates `dir` and its missing parents as root-only (0700): records, IPAM state,
/// pins and the health socket are nobody else's business.
pub fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}
