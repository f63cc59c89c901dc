//! `velox-loader`: the per-node daemon (`run`) and the operator CLI.

mod daemon;
mod dump;
mod install;
mod metrics;
mod monitor;
mod names;
mod netfilter;
mod reconcile;
mod source;

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
        /// path (`from_net` on it, `bpf_redirect_neigh` towards peers). With
        /// `--kubernetes` and `--node-name` it defaults to the interface holding an
        /// InternalIP of this node's Node.
        #[arg(long)]
        uplink: Option<String>,
        /// The cluster's nodes as a Kubernetes NodeList (`kubectl get nodes -o json`):
        /// each node's `spec.podCIDRs` and `InternalIP`s. Looked at four times a
        /// second; this node's own entry is skipped.
        #[arg(long, requires = "uplink", conflicts_with_all = ["kubernetes", "kubeconfig"])]
        peers_file: Option<PathBuf>,
        /// This node's pod CIDRs, one per family (repeat for dual-stack): the source
        /// ranges to masquerade. With `--kubernetes` and `--node-name` they default
        /// to its Node's `spec.podCIDRs`.
        #[arg(long)]
        pod_cidr: Vec<ipnet::IpNet>,
        /// Install the `velox` plugin into this directory and write the conflist for
        /// this node's pod CIDRs into `--cni-conf-dir` once they are known (what
        /// `velox-loader install` does, for a DaemonSet with no init container).
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
        #[arg(long, requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// Serve Prometheus metrics on this address (`/metrics`), e.g. 0.0.0.0:9962.
        #[arg(long)]
        metrics_address: Option<std::net::SocketAddr>,
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
        #[arg(long, conflicts_with_all = ["kubernetes", "kubeconfig"])]
        cluster_state: Option<PathBuf>,
        /// Learn the cluster (Nodes, Services, EndpointSlices) from the Kubernetes API
        /// server instead of files: with the in-cluster service account, or
        /// `KUBECONFIG`, or `--kubeconfig`.
        #[arg(long)]
        kubernetes: bool,
        /// The kubeconfig to reach the API server with (implies `--kubernetes`).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name in the cluster (the DaemonSet passes `spec.nodeName`):
        /// its Node gets `NetworkUnavailable=False` once the datapath is up.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Turn on the socket load balancer (Velox's kube-proxy replacement for
        /// ClusterIPs and NodePorts): cgroup socket hooks translate Service addresses
        /// in connect, sendmsg, recvmsg and getpeername. Needs Services from
        /// `--cluster-state` or `--kubernetes`.
        #[arg(long)]
        socket_lb: bool,
        /// The cgroup (v2) the socket hooks attach to; by default the root of the
        /// cgroup2 hierarchy, found in the mount table.
        #[arg(long, requires = "socket_lb")]
        socket_lb_cgroup: Option<PathBuf>,
        /// The most pods this node runs: the per-CPU counters array has a slot for
        /// each (56 bytes per CPU), and an ADD beyond it fails with code 104.
        #[arg(long, default_value_t = velox_common::DEFAULT_MAX_PODS, value_parser = clap::value_parser!(u32).range(1..=velox_common::MAX_ENDPOINTS as i64 - 1))]
        max_pods: u32,
        /// Enforce Kubernetes NetworkPolicy in the datapath, from the NetworkPolicies,
        /// Pods and Namespaces of `--cluster-state` or `--kubernetes`.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        network_policy: bool,
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
    /// Ask the running loader how it is, as the DaemonSet's probes do: prints its
    /// answer (JSON); fails when it does not answer or is not ready.
    Health {
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// Every packet the datapath drops from now on, and every new connection a
    /// policy rule allows, with its connection ends, their pods, the interface and
    /// the deciding policies (like `cilium monitor --type drop`, `hubble observe`);
    /// until interrupted.
    Monitor {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
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
    /// Each pod a NetworkPolicy isolates, with its live rules: per direction, the
    /// peer prefixes and the ports it may use with them, and the policies behind them.
    Policy {
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
    // kube's client logs every failed connection; the watches report them once.
    logger.filter_module("kube_client::client::builder", log::LevelFilter::Off);
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
            kubernetes,
            kubeconfig,
            node_name,
            socket_lb,
            socket_lb_cgroup,
            max_pods,
            network_policy,
            cni_bin_dir,
            cni_conf_dir,
            metrics_address,
        } => {
            let kubernetes = kubernetes || kubeconfig.is_some();
            anyhow::ensure!(
                !socket_lb || kubernetes || cluster_state.is_some(),
                "--socket-lb needs the Services: give --cluster-state or --kubernetes"
            );
            let source = match kubernetes {
                true => daemon::SourceOptions::Kubernetes {
                    kubeconfig,
                    node_name: node_name.clone(),
                },
                false => daemon::SourceOptions::Files {
                    peers_file,
                    cluster_state,
                },
            };
            let socket_lb_cgroup = match (socket_lb, socket_lb_cgroup) {
                (false, _) => None,
                (true, Some(cgroup)) => Some(cgroup),
                (true, None) => Some(velox_node::layout::cgroup2_root()?),
            };
            let node_network = (uplink.is_some() || kubernetes).then_some(reconcile::routes::NodeNetworkConfig {
                uplink,
                pod_cidrs: pod_cidr,
                ip_masq,
                node_name,
            });
            let interval = std::time::Duration::from_secs(reconcile_interval);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(
                    bpffs,
                    state_dir,
                    daemon::RunOptions {
                        interval,
                        node_network,
                        source,
                        datapath: daemon::DatapathOptions {
                            object: ebpf_object,
                            log_level: datapath_log_level,
                            socket_lb_cgroup,
                            max_pods,
                        },
                        install_into: cni_bin_dir.zip(cni_conf_dir),
                        metrics_address,
                        network_policy,
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
        Commands::Health { timeout } => {
            let health =
                velox_node::health::query(&state_dir.health_socket(), std::time::Duration::from_secs(timeout))?;
            println!("{}", health.to_json());
            anyhow::ensure!(health.ready, "velox-loader is not ready");
            Ok(())
        }
        Commands::Monitor { json } => monitor::monitor(&bpffs, &state_dir, json),
        Commands::Endpoints { json } => dump::endpoints(&bpffs, &state_dir, json),
        Commands::Peers { json } => dump::peers(&bpffs, json),
        Commands::Stats { json } => dump::stats(&bpffs, json),
        Commands::KernelFlows { json } => dump::kernel_flows(&bpffs, json),
        Commands::Services { json } => dump::services(&bpffs, json),
        Commands::Policy { json } => dump::policy(&bpffs, &state_dir, json),
    }
}
