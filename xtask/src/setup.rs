//! Installs what is missing, quick otherwise: `base` what the demo builds and runs,
//! `setup` that and everything the tests and the benchmark use.
//!
//! The eBPF object builds with Debian's rustc and cargo (`rustc-web`, `cargo-web`),
//! the only toolchain here with a prebuilt `core` for `bpfel-unknown-none`
//! (`libstd-rust-web-dev-bpf`); bpf-linker links against Debian's LLVM 22, the LLVM
//! rustc-web is built on.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::{cargo, cargo_bin_dir, run_checked, workspace_root};
use crate::image::import_rootfs;

/// The build toolchain and what the simulated cluster and the demo's traffic run.
const BASE_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "iptables",
    "procps",
    "util-linux",
];

/// What the tests and the benchmark add: datapath inspection, measurement, the
/// reference plugins, kube-proxy-style rules, the chart's font.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "sockperf",
    "tcpdump",
    "fonts-dejavu-core",
    "conntrack",
    "containernetworking-plugins",
    // Real runtimes and clients for the runtime tests.
    "containerd",
    "runc",
    "podman",
    "busybox-static",
    "python3-pip",
    "xz-utils",
    "golang-go",
    "golang-github-appc-cni-dev",
];

/// cnitool is not packaged; it is built from Debian's source package of libcni.
const CNI_SOURCE_PACKAGE: &str = "golang-github-appc-cni";
const DEB_SRC: &str = "/etc/apt/sources.list.d/velox-deb-src.sources";

/// The CRI client the containerd tests use (generated CRI v1 stubs).
const CRI_PYTHON_PACKAGE: &str = "container-runtime-interface-api==2.0.1";

const BPF_LINKER: &str = "bpf-linker@0.13.0";

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// What `cargo xtask demo` needs: the toolchain, bpf-linker, the cluster's tools,
/// the bpffs mount.
pub fn base() -> anyhow::Result<()> {
    install(&[BASE_PACKAGES])
}

/// Everything the tests and the benchmark need: `base`, and the test packages,
/// cnitool, the offline images and the CRI client.
pub fn setup() -> anyhow::Result<()> {
    install(&[BASE_PACKAGES, TEST_PACKAGES])?;
    build_cnitool()?;
    build_images()?;
    install_cri_client()
}

/// The packages of `lists`, bpf-linker and the bpffs mount.
fn install(lists: &[&[&str]]) -> anyhow::Result<()> {
    install_packages(lists)?;
    install_bpf_linker()?;
    velox_test_env::ensure_bpffs()
}

/// The packages of `lists` that are not installed yet, in one apt-get run.
fn install_packages(lists: &[&[&str]]) -> anyhow::Result<()> {
    let missing: Vec<&str> = lists
        .iter()
        .flat_map(|list| list.iter().copied())
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    let linker_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if linker_ok {
        return Ok(());
    }
    println!("xtask: installing {BPF_LINKER} (about a minute)");
    run_checked(Command::new(cargo()).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        BPF_LINKER,
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
    .context("installing bpf-linker")
}

/// Into a directory of the project's own: Debian's python3 refuses system-wide pip
/// installs, and nothing else on the machine should change.
fn install_cri_client() -> anyhow::Result<()> {
    let python_libs = workspace_root().join("target/tools/python");
    if python_libs.join("cri_api").exists() {
        return Ok(());
    }
    println!("xtask: installing {CRI_PYTHON_PACKAGE}");
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--target"])
            .arg(&python_libs)
            .arg(CRI_PYTHON_PACKAGE),
    )
}

/// The images the runtime tests run, built offline: `pause` (busybox sleeping, the
/// CRI sandbox image) and `toolbox` (busybox and iperf3 with its libraries), each
/// imported into podman and saved as a docker archive under `target/tools/images`.
fn build_images() -> anyhow::Result<()> {
    let images = workspace_root().join("target/tools/images");
    for (name, extra) in [("pause", &[][..]), ("toolbox", &["/usr/bin/iperf3"][..])] {
        let archive = images.join(format!("{name}.tar"));
        if archive.exists() {
            continue;
        }
        println!("xtask: building the {name} image");
        let rootfs = images.join(format!("{name}-rootfs"));
        let _ = std::fs::remove_dir_all(&rootfs);
        std::fs::create_dir_all(rootfs.join("bin"))?;
        // iperf3 keeps a temporary file per stream.
        std::fs::create_dir_all(rootfs.join("tmp"))?;
        std::fs::set_permissions(rootfs.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
        for binary in extra {
            copy_with_libraries(Path::new(binary), &rootfs, Path::new(binary))?;
        }
        let tag = format!("velox.test/{name}:1");
        import_rootfs(&rootfs, &tag, &[r#"CMD ["/bin/busybox", "sleep", "2147483647"]"#])?;
        run_checked(
            Command::new("podman")
                .args(["save", "--quiet", "--format", "docker-archive", "-o"])
                .arg(&archive)
                .arg(&tag),
        )?;
        std::fs::remove_dir_all(&rootfs)?;
    }
    Ok(())
}

/// Copies `binary` to `at` in `rootfs`, and every shared library `ldd` names to the
/// same path there.
pub fn copy_with_libraries(binary: &Path, rootfs: &Path, at: &Path) -> anyhow::Result<()> {
    let ldd = Command::new("ldd").arg(binary).output()?;
    let libraries = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect::<Vec<_>>();
    let copies = std::iter::once((binary.to_path_buf(), at.to_path_buf()))
        .chain(libraries.into_iter().map(|library| (library.clone(), library)));
    for (from, to) in copies {
        let target = rootfs.join(to.strip_prefix("/").unwrap_or(&to));
        std::fs::create_dir_all(target.parent().context("no parent")?)?;
        std::fs::copy(&from, &target).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// `target/tools/cnitool`, from `apt-get source golang-github-appc-cni` built with
/// Debian's Go in GOPATH mode (its dependencies come from /usr/share/gocode).
fn build_cnitool() -> anyhow::Result<()> {
    let tools = workspace_root().join("target/tools");
    let cnitool = tools.join("cnitool");
    if cnitool.exists() {
        return Ok(());
    }
    println!("xtask: building cnitool from Debian's {CNI_SOURCE_PACKAGE} source package");
    if !std::path::Path::new(DEB_SRC).exists() {
        std::fs::write(
            DEB_SRC,
            "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )?;
        run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    let src = tools.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    run_checked(Command::new("apt-get").current_dir(&src).args([
        "source",
        "-qq",
        "--download-only",
        CNI_SOURCE_PACKAGE,
    ]))?;
    let gopath = tools.join("gopath");
    let checkout = gopath.join("src/github.com/containernetworking/cni");
    let _ = std::fs::remove_dir_all(&checkout);
    std::fs::create_dir_all(&checkout)?;
    let orig = std::fs::read_dir(&src)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".orig.tar.xz"))
        .context("no .orig.tar.xz in the source package")?;
    run_checked(
        Command::new("tar")
            .arg("xf")
            .arg(&orig)
            .arg("-C")
            .arg(&checkout)
            .arg("--strip-components=1"),
    )?;
    run_checked(
        Command::new("go")
            .env("GO111MODULE", "off")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", tools.join("gocache"))
            .arg("build")
            .arg("-o")
            .arg(&cnitool)
            .arg("github.com/containernetworking/cni/cnitool"),
    )
}
