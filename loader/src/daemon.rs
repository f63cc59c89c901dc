//! `velox-loader run`: owns the BPF objects. Maps are reused across restarts (pinned
//! by path), so a restart or a crash never interrupts forwarding.

use anyhow::Context;
use aya::programs::SchedClassifier;
use aya::EbpfLoader;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::statfs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use velox_cni::datapath::{Bpffs, Maps};
use velox_cni::endpoint::EndpointStore;
use velox_cni::plugin::health_socket;
use velox_common::{COUNTERS_MAP, ENDPOINTS_MAP, FROM_POD_PROGRAM};

use crate::reconcile::reconcile;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VELOX_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub async fn run(bpffs: Bpffs, state_dir: PathBuf, interval: Duration) -> anyhow::Result<()> {
    ensure_bpffs(&bpffs)?;
    load_and_pin(&bpffs)?;
    let mut maps = Maps::open(&bpffs)?;
    let store = EndpointStore::new(&state_dir);
    reconcile(&bpffs, &store, &mut maps)?;

    let socket = health_socket(&state_dir);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    log::info!("ready: bpffs {}, state {}", bpffs.root.display(), state_dir.display());

    let mut tick = tokio::time::interval(interval);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = reconcile(&bpffs, &store, &mut maps) {
                    log::error!("reconcile: {e:#}");
                }
            }
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    let endpoints = store.list().map(|r| r.len()).unwrap_or(0);
                    let answer = serde_json::json!({"ready": true, "endpoints": endpoints});
                    let _ = stream.write_all(answer.to_string().as_bytes()).await;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Pins stay: the datapath keeps forwarding without us.
    let _ = std::fs::remove_file(&socket);
    log::info!("stopped; datapath left in place");
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when the root is not on one already (it is not at boot here).
fn ensure_bpffs(bpffs: &Bpffs) -> anyhow::Result<()> {
    let root = &bpffs.root;
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if statfs(existing)?.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        let target = Path::new("/sys/fs/bpf");
        anyhow::ensure!(
            root.starts_with(target),
            "{} is not on a bpffs; mount one there or use a root under /sys/fs/bpf",
            root.display()
        );
        mount(Some("bpf"), target, Some("bpf"), MsFlags::empty(), None::<&str>).context("mounting bpffs")?;
        log::info!("mounted bpffs at {}", target.display());
    }
    for dir in bpffs.dirs() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Loads the embedded object, reusing pinned maps, and pins `from_pod`. A new
/// program pin replaces the old one atomically; attached links keep their program.
fn load_and_pin(bpffs: &Bpffs) -> anyhow::Result<()> {
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(ENDPOINTS_MAP, bpffs.map(ENDPOINTS_MAP))
        .map_pin_path(COUNTERS_MAP, bpffs.map(COUNTERS_MAP))
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(FROM_POD_PROGRAM)
        .context("from_pod missing from the eBPF object")?
        .try_into()?;
    program.load().context("loading from_pod")?;
    let pin = bpffs.program(FROM_POD_PROGRAM);
    // bpffs refuses names with a dot.
    let staged = pin.with_file_name(format!("{FROM_POD_PROGRAM}_staged"));
    let _ = std::fs::remove_file(&staged);
    program.pin(&staged).context("pinning from_pod")?;
    std::fs::rename(&staged, &pin).context("replacing the from_pod pin")?;
    Ok(())
}
