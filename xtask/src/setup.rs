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
use velox_test_env::real_cluster::{kubernetes_bin_dir, KUBERNETES_VERSION};

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
    // The real cluster: Kubernetes builds from source with these, etcd runs its store.
    "rsync",
    "golang-github-modern-go-reflect2-dev",
    "etcd-server",
    "openssl",
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
    build_kubernetes()?;
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

/// Adds Debian's source list once, for `apt-get source`.
fn add_deb_src() -> anyhow::Result<()> {
    if std::path::Path::new(DEB_SRC).exists() {
        return Ok(());
    }
    std::fs::write(
        DEB_SRC,
        "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    run_checked(Command::new("apt-get").args(["update", "-qq"]))
}

/// The one source package of `package` in the current directory `dir`: its
/// `.orig.tar.*`, downloaded with `apt-get source`.
fn fetch_source(package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    add_deb_src()?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    run_checked(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["source", "-qq", "--download-only", package]),
    )?;
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(".orig.tar."))
        .with_context(|| format!("no .orig.tar.* in the source package {package}"))
}

/// The Kubernetes the real-cluster tests run: Debian bookworm's `kubernetes` source
/// package (v1.20.2, the newest that builds here), built with Debian's Go.
const KUBERNETES_SOURCE_PACKAGE: &str = "kubernetes";
const KUBERNETES_COMMIT: &str = "faecb196815e248d3ecfb03c680a4507229c2a56";
const KUBERNETES_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
];

/// Builds Kubernetes from Debian's source package into the cache the tests read,
/// unless it is there: `make generated_files`, then the binaries, after one fix:
/// the vendored reflect2 1.0.1 crashes under Go >= 1.18 (any JSON map encoding),
/// Debian's 1.0.2 replaces it.
fn build_kubernetes() -> anyhow::Result<()> {
    let bin_dir = kubernetes_bin_dir();
    if KUBERNETES_BINARIES.iter().all(|b| bin_dir.join(b).exists()) {
        return Ok(());
    }
    println!("xtask: building Kubernetes {KUBERNETES_VERSION} from Debian's source package (about ten minutes)");
    let work = PathBuf::from("/var/tmp/velox-kubernetes-build");
    let orig = fetch_source(KUBERNETES_SOURCE_PACKAGE, &work)?;
    let tree = work.join("src");
    std::fs::create_dir_all(&tree)?;
    run_checked(
        Command::new("tar")
            .arg("xf")
            .arg(&orig)
            .arg("-C")
            .arg(&tree)
            .arg("--strip-components=1"),
    )?;
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    std::fs::remove_dir_all(&vendored)?;
    run_checked(
        Command::new("cp")
            .arg("-r")
            .arg("/usr/share/gocode/src/github.com/modern-go/reflect2")
            .arg(&vendored),
    )?;
    let make = |args: &[&str]| {
        run_checked(
            Command::new("make")
                .current_dir(&tree)
                .env("KUBE_GIT_VERSION", KUBERNETES_VERSION)
                .env("KUBE_GIT_COMMIT", KUBERNETES_COMMIT)
                .env("KUBE_GIT_TREE_STATE", "clean")
                .env("GOCACHE", work.join("gocache"))
                .env("GOPATH", work.join("gopath"))
                .args(args),
        )
    };
    make(&["generated_files"])?;
    let what: Vec<String> = KUBERNETES_BINARIES.iter().map(|b| format!("cmd/{b}")).collect();
    make(&[&format!("WHAT={}", what.join(" "))])?;
    std::fs::create_dir_all(&bin_dir)?;
    for binary in KUBERNETES_BINARIES {
        std::fs::copy(tree.join("_output/bin").join(binary), bin_dir.join(binary))
            .with_context(|| format!("copying {binary}"))?;
    }
    // Go's module cache is read-only; the tree is 3.5 GB.
    let _ = run_checked(Command::new("chmod").args(["-R", "u+w"]).arg(&work));
    std::fs::remove_dir_all(&work)?;
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
    let orig = fetch_source(CNI_SOURCE_PACKAGE, &tools.join("src"))?;
    let gopath = tools.join("gopath");
    let checkout = gopath.join("src/github.com/containernetworking/cni");
    let _ = std::fs::remove_dir_all(&checkout);
    std::fs::create_dir_all(&checkout)?;
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
