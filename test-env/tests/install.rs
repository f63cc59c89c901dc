//! `velox-loader install` / `uninstall` into CNI dirs, as a DaemonSet's init container runs it.

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
