//! `cargo xtask image`: the OCI image deploy/velox.yaml runs, built offline from
//! `cargo xtask build`'s binaries: no base image, only `velox`, `velox-loader`, the
//! iptables they call and the shared libraries of all of them, so no registry is
//! needed. Saved as an OCI archive for `ctr images import`.

use std::path::Path;
use std::process::Command;

use crate::build::{run_checked, workspace_root};
use crate::setup::copy_with_libraries;

/// Where the image is saved, under the workspace root.
pub const ARCHIVE: &str = "target/velox-image.tar";

/// iptables and ip6tables, Debian's nft flavour (what the nodes of a current
/// distribution use), under the names the loader calls.
const XTABLES: &str = "/usr/sbin/xtables-nft-multi";
const XTABLES_NAMES: [&str; 6] = [
    "iptables",
    "iptables-restore",
    "iptables-save",
    "ip6tables",
    "ip6tables-restore",
    "ip6tables-save",
];
const XTABLES_MODULES: &str = "/usr/lib/x86_64-linux-gnu/xtables";

pub fn image() -> anyhow::Result<()> {
    let root = workspace_root();
    let rootfs = root.join("target/image-rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    for name in ["velox", "velox-loader"] {
        let binary = root.join("target/release").join(name);
        copy_with_libraries(&binary, &rootfs, &Path::new("/usr/bin").join(name))?;
    }
    copy_with_libraries(Path::new(XTABLES), &rootfs, Path::new(XTABLES))?;
    for module in std::fs::read_dir(XTABLES_MODULES)? {
        let module = module?.path();
        copy_with_libraries(&module, &rootfs, &module)?;
    }
    let sbin = rootfs.join("usr/sbin");
    for name in XTABLES_NAMES {
        std::os::unix::fs::symlink("xtables-nft-multi", sbin.join(name))?;
    }
    // Where the loader keeps the xtables lock and mounts or finds bpffs.
    for dir in ["run", "tmp", "sys/fs/bpf"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    let tag = velox_test_env::IMAGE;
    import_rootfs(
        &rootfs,
        tag,
        &["ENV PATH=/usr/sbin:/usr/bin", r#"ENTRYPOINT ["velox-loader"]"#],
    )?;
    std::fs::remove_dir_all(&rootfs)?;
    let archive = root.join(ARCHIVE);
    let _ = std::fs::remove_file(&archive);
    run_checked(
        Command::new("podman")
            .args(["save", "--quiet", "--format", "oci-archive", "-o"])
            .arg(&archive)
            .arg(tag),
    )?;
    println!("xtask: {tag}, saved to {}", archive.display());
    Ok(())
}

/// Makes `rootfs` the one layer of podman's image `tag`, with Containerfile
/// instructions `changes` (`CMD`, `ENV`, `ENTRYPOINT`).
pub fn import_rootfs(rootfs: &Path, tag: &str, changes: &[&str]) -> anyhow::Result<()> {
    let layer = rootfs.with_extension("tar");
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    )?;
    let mut import = Command::new("podman");
    import.args(["import", "--quiet"]);
    for change in changes {
        import.args(["--change", change]);
    }
    let imported = run_checked(import.arg(&layer).arg(tag));
    std::fs::remove_file(&layer)?;
    imported
}
