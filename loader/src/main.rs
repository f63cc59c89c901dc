//! `velox-loader`: the per-node daemon (`run`) and the operator CLI.

mod daemon;
mod dump;
mod flow_log;
mod install;
mod kernel_drops;
mod metrics;
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
    Run(daemon::RunArgs),
    /// Put `velox` into the CNI bin dir and a conflist into the CNI conf dir (what a
    /// DaemonSet's init container runs; see deploy/velox.yaml).
    Install(install::InstallArgs),
    /// Remove exactly what `install` added.
    Uninstall {
        /// Also remove the node's datapath: every attached program (pods and uplink),
        /// the pins under the bpffs root, the routes to other nodes, the VXLAN device
        /// and the masquerade chains. The loader must be stopped first; pods keep working on kernel routes.
        #[arg(long)]
        purge: bool,
    },
    /// Ask the running loader how it is, as the DaemonSet's probes do: prints its
    /// answer (JSON); fails when it does not answer or is not ready (the datapath is
    /// not up, or the NetworkPolicy it enforces has never been known).
    Health {
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
        /// The liveness probe's question: fail only when the loader does not answer
        /// or its datapath is not up (a policy source that is away is no reason to
        /// restart it).
        #[arg(long)]
        live: bool,
    },
    /// Every packet the datapath drops from now on, and every new connection a
    /// policy rule allows, with its connection ends, their pods, the interface and
    /// the deciding policies (like `cilium monitor --type drop`, `hubble observe`);
    /// until interrupted. The same as `flows --follow --since 0s`.
    Monitor {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The flow records the running loader keeps (`--flow-records`): every drop and
    /// every new connection a policy rule allowed, after the fact, with their ends,
    /// pods, interface, reason and deciding policies (like `hubble observe`).
    Flows(flow_log::FlowsArgs),
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
    /// The load balancer's Services as the datapath sees them: each frontend (a
    /// NodePort once, for every address of the node) with its backends, this node's
    /// first, and its traffic policies.
    Services {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The connections from outside that the NAT translates
    /// (`--kube-proxy-replacement`), each direction as it arrives and as it leaves.
    Nat {
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
    init_logging(&cli)?;
    let bpffs = Bpffs::new(&cli.bpffs_root);
    let state_dir = StateDir::new(&cli.state_dir);
    match cli.command {
        Commands::Run(args) => {
            let options = args.options()?;
            runtime()?.block_on(daemon::run(bpffs, state_dir, options))
        }
        Commands::Install(args) => install::install(&args, &bpffs.root, &cli.state_dir),
        Commands::Uninstall { purge } => {
            if purge {
                runtime()?.block_on(install::purge(&bpffs))?;
            }
            install::uninstall(&cli.state_dir)
        }
        Commands::Health { timeout, live } => {
            let health =
                velox_node::health::query(&state_dir.health_socket(), std::time::Duration::from_secs(timeout))?;
            println!("{}", health.to_json());
            anyhow::ensure!(health.ready, "velox-loader is not ready");
            anyhow::ensure!(
                live || health.probe_ready(),
                "velox-loader is not ready: it has never had the NetworkPolicy it enforces or the Services it balances"
            );
            Ok(())
        }
        Commands::Monitor { json } => flow_log::flows(&state_dir, &flow_log::FlowsArgs::monitor(json)),
        Commands::Flows(args) => flow_log::flows(&state_dir, &args),
        Commands::Endpoints { json } => dump::endpoints(&bpffs, &state_dir, json),
        Commands::Peers { json } => dump::peers(&bpffs, json),
        Commands::Stats { json } => dump::stats(&bpffs, &state_dir, json),
        Commands::KernelFlows { json } => dump::kernel_flows(&bpffs, json),
        Commands::Services { json } => dump::services(&bpffs, json),
        Commands::Nat { json } => dump::nat(&bpffs, json),
        Commands::Policy { json } => dump::policy(&bpffs, &state_dir, json),
    }
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let mut logger = env_logger::Builder::new();
    logger.filter_level(cli.log_level);
    // kube's client logs every failed connection; the watches report them once.
    logger.filter_module("kube_client::client::builder", log::LevelFilter::Off);
    if let Commands::Run(args) = &cli.command {
        // The programs' records (target: the eBPF crate) follow their own level.
        logger.filter_module("velox_ebpf", args.datapath_log_level);
    }
    if let Some(path) = &cli.log_file {
        let file = velox_node::fs::open_log(path)?;
        logger.target(env_logger::Target::Pipe(Box::new(file)));
    }
    logger.init();
    Ok(())
}

/// The daemon and the purge talk netlink and watch the API server on one thread.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_timeouts_below_two_seconds_or_above_thirty_days_are_refused() {
        let run = |flag: &str, seconds: &str| Cli::try_parse_from(["velox-loader", "run", flag, seconds]);
        for flag in [
            "--ct-timeout-tcp-syn",
            "--ct-timeout-tcp",
            "--ct-timeout-tcp-fin",
            "--ct-timeout-any",
        ] {
            assert!(run(flag, "1").is_err(), "{flag} 1");
            assert!(run(flag, "2592001").is_err(), "{flag} beyond 30 days");
            assert!(run(flag, "2").is_ok(), "{flag} 2");
        }
    }
}
