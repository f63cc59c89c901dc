//! `velox-loader install` / `uninstall` into CNI dirs, run directly and from the image `cargo xtask image` builds.

use std::path::Path;
use std::process::Command;
use velox_test_env::Binaries;

fn loader(state: &Path, args: &[&str]) -> std::process::Output {
    let bins = Binaries::locate().unwrap();
    Command::new(&bins.loader)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn install_adds_the_plugin_and_a_conflist_and_uninstall_removes_exactly_that() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf, state) = (
        dir.path().join("bin"),
        dir.path().join("net.d"),
        dir.path().join("state"),
    );
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("10-other.conflist"), "{}").unwrap();
    let dirs = [
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ];
    let out = loader(
        &state,
        &[
            &[
                "install",
                "--pod-cidr",
                "200.200.1.0/24",
                "--pod-cidr",
                "fd00:200:1::/64",
            ][..],
            &dirs,
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let installed = std::fs::read(bin.join("velox")).unwrap();
    assert_eq!(installed, std::fs::read(Binaries::locate().unwrap().velox).unwrap());
    let mut names: Vec<_> = std::fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["00-velox.conflist", "10-other.conflist"], "ours sorts first");
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conf.join("00-velox.conflist")).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "velox");
    assert_eq!(
        conflist["plugins"][0]["subnets"],
        serde_json::json!(["200.200.1.0/24", "fd00:200:1::/64"])
    );
    assert_eq!(conflist["plugins"][0]["stateDir"], state.to_str().unwrap());

    // The installed plugin answers like the original.
    let version = Command::new(bin.join("velox"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("1.1.0"));

    let out = loader(&state, &["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!bin.join("velox").exists());
    assert!(!conf.join("00-velox.conflist").exists());
    assert!(
        conf.join("10-other.conflist").exists(),
        "someone else's config was touched"
    );
    assert!(loader(&state, &["uninstall"]).status.success(), "uninstall twice");
}

#[test]
fn uninstall_keeps_files_changed_since_install() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf, state) = (
        dir.path().join("bin"),
        dir.path().join("net.d"),
        dir.path().join("state"),
    );
    let dirs = [
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        conf.to_str().unwrap(),
    ];
    assert!(loader(
        &state,
        &[
            &["install", "--pod-cidr", "10.1.0.0/24", "--network", "pods"][..],
            &dirs
        ]
        .concat()
    )
    .status
    .success());
    std::fs::write(conf.join("00-pods.conflist"), "{\"edited\": true}").unwrap();
    assert!(loader(&state, &["uninstall"]).status.success());
    assert!(
        conf.join("00-pods.conflist").exists(),
        "an edited config must survive uninstall"
    );
    assert!(!bin.join("velox").exists());
}

/// The DaemonSet installs through the host's root mounted at `/host`; an operator
/// runs `uninstall` on the host afterwards: install.json names the host's paths
/// too, and uninstall removes the files there.
#[test]
fn what_the_daemon_set_installed_the_host_uninstalls() {
    let dir = tempfile::tempdir().unwrap();
    // Where the host keeps its CNI dirs, and the container's mount of the host's root.
    let (host_bin, host_conf) = (dir.path().join("opt/cni/bin"), dir.path().join("etc/cni/net.d"));
    let host_root = dir.path().join("container/host");
    let in_container = |path: &Path| host_root.join(path.strip_prefix("/").unwrap());
    let state = dir.path().join("state");
    let out = loader(
        &state,
        &[
            "install",
            "--pod-cidr",
            "10.1.0.0/24",
            "--cni-bin-dir",
            in_container(&host_bin).to_str().unwrap(),
            "--cni-conf-dir",
            in_container(&host_conf).to_str().unwrap(),
            "--host-root",
            host_root.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The host sees the same files at its own paths (in a cluster the mount is a
    // bind of the host's root; here they move there).
    for (host, container) in [
        (&host_bin, in_container(&host_bin)),
        (&host_conf, in_container(&host_conf)),
    ] {
        std::fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::fs::rename(&container, host).unwrap();
    }
    let out = loader(&state, &["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !host_bin.join("velox").exists(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!host_conf.join("00-velox.conflist").exists());
}

/// hostPorts need portmap chained after velox: installed where the bin dir has it,
/// and a plugin an operator chained by hand survives the next install (every
/// loader start installs again).
#[test]
fn portmap_is_chained_and_plugins_an_operator_chained_survive_a_new_install() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf, state) = (
        dir.path().join("bin"),
        dir.path().join("net.d"),
        dir.path().join("state"),
    );
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/lib/cni/portmap", bin.join("portmap")).unwrap();
    // An earlier release's conflist: velox alone.
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("00-velox.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "velox", "plugins": [{"type": "velox"}]}"#,
    )
    .unwrap();
    let install = || {
        let args = [
            "install",
            "--pod-cidr",
            "10.1.0.0/24",
            "--cni-bin-dir",
            bin.to_str().unwrap(),
            "--cni-conf-dir",
            conf.to_str().unwrap(),
        ];
        let out = loader(&state, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = conf.join("00-velox.conflist");
        let conflist: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        (path, conflist)
    };
    let (path, mut conflist) = install();
    let types = |c: &serde_json::Value| -> Vec<String> {
        c["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(types(&conflist), ["velox", "portmap"]);
    assert_eq!(conflist["plugins"][1]["capabilities"]["portMappings"], true);
    // An operator chains the bandwidth plugin by hand.
    conflist["plugins"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}));
    std::fs::write(&path, serde_json::to_vec_pretty(&conflist).unwrap()).unwrap();
    let (_, again) = install();
    assert_eq!(types(&again), ["velox", "portmap", "bandwidth"]);
    assert_eq!(again["plugins"][2]["capabilities"]["bandwidth"], true);
}

/// `podman run` of the image with `options`: cgroupfs, and ulimits of 4096, since
/// root here lacks CAP_SYS_RESOURCE and systemd.
fn podman_run(options: &[&str], args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args([
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            "run",
            "--rm",
            "--network=none",
        ])
        .args(["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"])
        .args(options)
        .arg(velox_test_env::IMAGE)
        .args(args)
        .output()
        .unwrap()
}

/// The loader in the image, with `host` mounted at /host.
fn in_image(host: &Path, args: &[&str]) -> std::process::Output {
    podman_run(&["-v", &format!("{}:/host", host.display())], args)
}

#[test]
fn the_image_runs_the_loader_and_installs_the_plugin_into_a_host_directory() {
    let host = tempfile::tempdir().unwrap();
    let version = in_image(host.path(), &["--version"]);
    assert!(version.status.success(), "{version:?}");
    let printed = String::from_utf8_lossy(&version.stdout);
    assert_eq!(printed.trim(), format!("velox-loader {}", env!("CARGO_PKG_VERSION")));

    let install = in_image(
        host.path(),
        &[
            "--state-dir",
            "/host/state",
            "install",
            "--pod-cidr",
            "200.200.7.0/24",
            "--pod-cidr",
            "fd00:200:7::/64",
            "--cni-bin-dir",
            "/host/bin",
            "--cni-conf-dir",
            "/host/net.d",
        ],
    );
    assert!(install.status.success(), "{install:?}");
    let plugin = std::fs::read(host.path().join("bin/velox")).unwrap();
    let built = std::fs::read(Binaries::locate().unwrap().velox).unwrap();
    assert_eq!(plugin, built, "the image carries this build's plugin");
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(host.path().join("net.d/00-velox.conflist")).unwrap()).unwrap();
    assert_eq!(
        conflist["plugins"][0]["subnets"],
        serde_json::json!(["200.200.7.0/24", "fd00:200:7::/64"])
    );
    // The loader's iptables runs inside the image too.
    let iptables = podman_run(&["--entrypoint=iptables"], &["--version"]);
    assert!(
        String::from_utf8_lossy(&iptables.stdout).contains("nf_tables"),
        "{iptables:?}"
    );
}
