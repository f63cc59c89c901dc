//! `velox-loader run`: owns the BPF objects. Maps are reused across restarts (pinned
//! by path), so a restart or a crash never interrupts forwarding.

use anyhow::Context;
use aya::programs::SchedClassifier;
use aya::EbpfLoader;
use aya_log::EbpfLogger;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::statfs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::io::Interest;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use velox_common::{
    COUNTERS_MAP, DEFAULT_KERNEL_FLOWS, ENDPOINTS_MAP, FROM_NET_PROGRAM, FROM_POD_PROGRAM, KERNEL_FLOWS_MAP, PEERS_MAP,
};
use velox_node::endpoint::EndpointStore;
use velox_node::fs::{create_private_dir, remove_if_exists, try_lock_dir};
use velox_node::health::Health;
use velox_node::layout::PRIVATE_FILE_MODE;
use velox_node::maps::{check_pinned_layouts, EndpointMaps};
use velox_node::netlink::Netlink;
use velox_node::{Bpffs, StateDir};

use crate::cluster::{Cluster, ClusterConfig};
use crate::reconcile::reconcile;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VELOX_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Reads the programs' aya-log records into this process's logger.
type DatapathLogger = EbpfLogger<&'static dyn log::Log>;

pub async fn run(
    bpffs: Bpffs,
    state_dir: StateDir,
    interval: Duration,
    cluster: Option<ClusterConfig>,
    datapath_log_level: log::LevelFilter,
) -> anyhow::Result<()> {
    ensure_bpffs(&bpffs)?;
    create_private_dir(&state_dir.root)?;
    // One loader per bpffs root and per state dir: two would fight over pins and maps.
    let mut _owned = Vec::new();
    for dir in [&bpffs.root, &state_dir.root] {
        match try_lock_dir(dir)? {
            Some(guard) => _owned.push(guard),
            None => anyhow::bail!(
                "another velox-loader is running on {}: refusing to start a second one",
                dir.display()
            ),
        }
    }
    if let Some(logger) = load_and_pin(&bpffs, datapath_log_level)? {
        tokio::spawn(forward_datapath_logs(logger));
    }
    let mut maps = EndpointMaps::open(&bpffs)?;
    let store = EndpointStore::new(&state_dir);
    let netlink = Netlink::connect()?;
    let mut cluster = cluster.map(|config| Cluster::new(config, bpffs.clone())).transpose()?;
    if let Some(cluster) = &mut cluster {
        cluster.reconcile(&netlink).await?;
    }
    let uplink = cluster.as_ref().map(|c| c.uplink().to_string());
    reconcile(&bpffs, &state_dir, &store, &mut maps, uplink.as_deref())?;

    let socket = state_dir.health_socket();
    remove_if_exists(&socket)?;
    let listener = UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    log::info!(
        "ready: bpffs {}, state {}",
        bpffs.root.display(),
        state_dir.root.display()
    );

    let mut tick = tokio::time::interval(interval);
    let mut peers_tick = tokio::time::interval(Duration::from_secs(1));
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(cluster) = &mut cluster {
                    if let Err(e) = cluster.reconcile(&netlink).await {
                        log::error!("cluster reconcile: {e:#}");
                    }
                }
                if let Err(e) = reconcile(&bpffs, &state_dir, &store, &mut maps, uplink.as_deref()) {
                    log::error!("reconcile: {e:#}");
                }
            }
            _ = peers_tick.tick() => {
                if let Some(cluster) = cluster.as_mut().filter(|c| c.peers_changed()) {
                    if let Err(e) = cluster.reconcile(&netlink).await {
                        log::error!("applying the peers file: {e:#}");
                    }
                }
            }
            accepted = listener.accept() => {
                if let Ok((mut stream, _)) = accepted {
                    let health = Health {
                        ready: true,
                        endpoints: store.list().map(|r| r.len()).unwrap_or(0),
                    };
                    let _ = stream.write_all(health.to_json().as_bytes()).await;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // Pins stay: the datapath keeps forwarding without us.
    remove_if_exists(&socket)?;
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
        create_private_dir(&dir)?;
    }
    Ok(())
}

/// Loads the embedded object, reusing pinned maps, and pins the programs. A new
/// program pin replaces the old one atomically; attached links keep their program.
/// Returns the reader of the programs' log records when `log_level` is not off.
fn load_and_pin(bpffs: &Bpffs, log_level: log::LevelFilter) -> anyhow::Result<Option<DatapathLogger>> {
    anyhow::ensure!(
        !EBPF_OBJECT.is_empty(),
        "this velox-loader was built without the eBPF object: build it with `cargo xtask build`"
    );
    check_pinned_layouts(bpffs)?;
    let mut loader = EbpfLoader::new();
    for map in [ENDPOINTS_MAP, PEERS_MAP, COUNTERS_MAP, KERNEL_FLOWS_MAP] {
        loader.map_pin_path(map, bpffs.map(map));
    }
    // As many connections as conntrack can hold: an LRU map that size only evicts
    // the ends of connections the kernel has already forgotten.
    loader.map_max_entries(KERNEL_FLOWS_MAP, kernel_flows_capacity());
    // A constant once loaded: the verifier drops every log call above this level.
    let level = log_level as u8;
    loader.override_global(aya_log::LEVEL, &level, true);
    let mut ebpf = loader.load(EBPF_OBJECT).context("loading the eBPF object")?;
    for name in [FROM_POD_PROGRAM, FROM_NET_PROGRAM] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        let pin = bpffs.program(name);
        // bpffs refuses names with a dot.
        let staged = pin.with_file_name(format!("{name}_staged"));
        remove_if_exists(&staged)?;
        program.pin(&staged).with_context(|| format!("pinning {name}"))?;
        std::fs::rename(&staged, &pin).with_context(|| format!("replacing the {name} pin"))?;
    }
    if log_level == log::LevelFilter::Off {
        return Ok(None);
    }
    Ok(Some(
        EbpfLogger::init(&mut ebpf).context("reading the datapath's log records")?,
    ))
}

/// `nf_conntrack_max`, or a default where conntrack is not loaded yet.
fn kernel_flows_capacity() -> u32 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|max| max.trim().parse().ok())
        .filter(|max| *max > 0)
        .unwrap_or(DEFAULT_KERNEL_FLOWS)
}

/// Hands the programs' log records to this process's logger as they arrive.
async fn forward_datapath_logs(logger: DatapathLogger) {
    // SAFETY: the logger owns the ring buffer's fd, and the AsyncFd owns the logger, so
    // the fd outlives its registration.
    let Ok(mut logger) = (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }) else {
        return log::error!("cannot poll the datapath's log records");
    };
    while let Ok(mut ready) = logger.readable_mut().await {
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
