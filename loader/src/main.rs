//! `velox-loader`: the per-node daemon (`run`) and the operator CLI.

mod cluster;
mod daemon;
mod dump;
mod install;
mod netfilter;
mod reconcile;
mod services;
mod sockets;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use velox_node::layout::{DEFAULT_BPFFS_ROOT, DEFAULT_STATE_DIR};
use velox_node::{Bpffs, StateDir};

/// The same knobs as the CNI config keys bpffsRoot, stateDir, logFile, logLevel.
#[derive(Parser)]
#[command(
    name = "velox-loader",
    version,
    about = "Velox per-node eBPF loader and operator CLI"
)]
struct Cli {
    /// bpffs directory holding Velox's pinned maps, programs and links.
    #[arg(long, global = true, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Directory of endpoint records, IPAM state and the health socket.
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Append logs here instead of stderr.
    #[arg(long, global = true)]
    log_file: Option<PathBuf>,
    #[arg(long, global = true, default_value = "info")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Load and pin the datapath, then keep the maps in line with the endpoint records.
    Run {
        /// Seconds between reconciliations.
        #[arg(long, default_value_t = 10)]
        reconcile_interval: u64,
        /// The node's interface towards the other nodes; enables the cross-node fast
        /// path (`from_net` on it, `bpf_redirect_neigh` towards peers).
        #[arg(long)]
        uplink: Option<String>,
        /// The cluster's nodes as a Kubernetes NodeList (`kubectl get nodes -o json`):
        /// each node's `spec.podCIDRs` and `InternalIP`s. Re-read every second; this
        /// node's own entry is skipped.
        #[arg(long, requires = "uplink")]
        peers_file: Option<PathBuf>,
        /// This node's pod CIDRs, one per family (repeat for dual-stack): the source
        /// ranges to masquerade.
        #[arg(long, requires = "uplink")]
        pod_cidr: Vec<ipnet::IpNet>,
        /// Masquerade pod traffic leaving the cluster to the node's IP.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        ip_masq: bool,
        /// aya-log level of the eBPF programs: off, error, warn, info, debug (a line per
        /// packet) or trace. Set when the programs load; off costs nothing per packet.
        #[arg(long, default_value = "off")]
        datapath_log_level: log::LevelFilter,
        /// Load this eBPF object instead of the one built into the loader (a
        /// datapath fix without a new loader). Pods and the uplink move to it at start.
        #[arg(long)]
        ebpf_object: Option<PathBuf>,
        /// Kubernetes Services and EndpointSlices as JSON (`kubectl get
        /// services,endpointslices -A -o json`): a file, or a directory of such files.
        /// Re-read every second.
        #[arg(long)]
        cluster_state: Option<PathBuf>,
        /// Turn on the socket load balancer (Velox's kube-proxy replacement for
        /// ClusterIPs and NodePorts): cgroup socket hooks translate Service addresses
        /// in connect, sendmsg, recvmsg and getpeername.
        #[arg(long, requires = "cluster_state")]
        socket_lb: bool,
        /// The cgroup (v2) the socket hooks attach to; by default the root of the
        /// cgroup2 hierarchy, found in the mount table.
        #[arg(long, requires = "socket_lb")]
        socket_lb_cgroup: Option<PathBuf>,
        /// The most pods this node runs: the per-CPU counters array has a slot for
        /// each (56 bytes per CPU), and an ADD beyond it fails with code 104.
        #[arg(long, default_value_t = velox_common::DEFAULT_MAX_PODS, value_parser = clap::value_parser!(u32).range(1..=velox_common::MAX_ENDPOINTS as i64 - 1))]
        max_pods: u32,
    },
    /// Put `velox` into the CNI bin dir and a conflist into the CNI conf dir (what a
    /// DaemonSet's init container runs; see deploy/velox.yaml).
    Install(install::InstallArgs),
    /// Remove exactly what `install` added.
    Uninstall {
        /// Also remove the node's datapath: every attached program (pods and uplink),
        /// the pins under the bpffs root, the routes to other nodes and the masquerade
        /// chains. The loader must be stopped first; pods keep working on kernel routes.
        #[arg(long)]
        purge: bool,
    },
    /// The endpoint map joined with the records, with each endpoint's counters.
    Endpoints {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Other nodes' pod CIDRs as the datapath routes them (the peer map).
    Peers {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Counters of every interface a Velox program runs on: pods' veths (from_pod)
    /// and the uplink (from_net).
    Stats {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The socket load balancer's Services as the datapath sees them: each frontend
    /// with its backends.
    Services {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pod connection ends whose traffic the kernel handled (Services, hostPorts,
    /// NodePorts, hosts, the outside): packets to them skip the fast path.
    KernelFlows {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::new();
    logger.filter_level(cli.log_level);
    if let Commands::Run { datapath_log_level, .. } = &cli.command {
        // The programs' records (target: the eBPF crate) follow their own level.
        logger.filter_module("velox_ebpf", *datapath_log_level);
    }
    if let Some(path) = &cli.log_file {
        let file = velox_node::fs::open_log(path)?;
        logger.target(env_logger::Target::Pipe(Box::new(file)));
    }
    logger.init();
    let bpffs = Bpffs::new(&cli.bpffs_root);
    let state_dir = StateDir::new(&cli.state_dir);
    match cli.command {
        Commands::Run {
            reconcile_interval,
            uplink,
            peers_file,
            pod_cidr,
            ip_masq,
            datapath_log_level,
            ebpf_object,
            cluster_state,
            socket_lb,
            socket_lb_cgroup,
            max_pods,
        } => {
            let socket_lb_cgroup = match (socket_lb, socket_lb_cgroup) {
                (false, _) => None,
                (true, Some(cgroup)) => Some(cgroup),
                (true, None) => Some(velox_node::layout::cgroup2_root()?),
            };
            let cluster = uplink.map(|uplink| cluster::ClusterConfig {
                uplink,
                peers_file,
                pod_cidrs: pod_cidr,
                ip_masq,
            });
            let interval = std::time::Duration::from_secs(reconcile_interval);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(
                    bpffs,
                    state_dir,
                    interval,
                    cluster,
                    daemon::DatapathOptions {
                        object: ebpf_object,
                        log_level: datapath_log_level,
                        cluster_state,
                        socket_lb_cgroup,
                        max_pods,
                    },
                ))
        }
        Commands::Install(args) => install::install(&args, &bpffs.root, &cli.state_dir),
        Commands::Uninstall { purge } => {
            if purge {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(install::purge(&bpffs))?;
            }
            install::uninstall(&cli.state_dir)
        }
        Commands::Endpoints { json } => dump::endpoints(&bpffs, &state_dir, json),
        Commands::Peers { json } => dump::peers(&bpffs, json),
        Commands::Stats { json } => dump::stats(&bpffs, json),
        Commands::KernelFlows { json } => dump::kernel_flows(&bpffs, json),
        Commands::Services { json } => dump::services(&bpffs, json),
    }
}
