//! `velox-loader run`: owns the BPF objects. Maps are reused across restarts (pinned
//! by path), so a restart or a crash never interrupts forwarding.

use crate::kernel_drops::KernelLayout;
use crate::names::PolicyNames;
use anyhow::Context;
use aya::maps::MapData;
use aya::maps::ProgramArray;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::raw_trace_point::RawTracePointLink;
use aya::programs::{loaded_programs, CgroupSockAddr, Iter, Program, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use futures_util::StreamExt;
use nix::fcntl::Flock;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::statfs;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{Receiver, Sender};
use velox_common::{
    Affinity, AffinityKey, AllowedFlow, ConnectionTimeouts, FlowEnd, NatEntry, NatKey, PolicyFlow, AFFINITY_MAP,
    COUNTERS_MAP, DEFAULT_KERNEL_FLOWS, FLOW_REPORT_GLOBAL, FROM_NET_PROGRAM, FROM_POD_PROGRAM, FROM_TUNNEL_PROGRAM,
    KERNEL_FLOWS_MAP, NAT_MAP, NAT_PROGRAMS, NAT_PROGRAMS_MAP, POLICY_FLOWS_MAP, POLICY_IDENTITY_RULES_MAP,
    POLICY_RULES_MAP, SKB_LAYOUT_GLOBAL, SOCKET_LB_PROGRAMS, TO_POD_PROGRAM, TO_TUNNEL_PROGRAM,
    UDP_SOCKET_FRONTENDS_ITER, UPLINK_SLOT, VXLAN_PORT_GLOBAL,
};
use velox_node::endpoint::EndpointStore;
use velox_node::fs::{create_private_dir, list_dir, remove_if_exists, try_lock_dir, write_atomic};
use velox_node::health::{Health, PolicyHealth, MAX_NAMED_WAITING};
use velox_node::layout::Hook;
use velox_node::layout::PRIVATE_FILE_MODE;
use velox_node::link::{attach_cgroup, update_pinned_link};
use velox_node::maps::{
    check_object_layout, check_pinned_layouts, layouts, pinned_layout, EndpointMaps, PolicyFlowShares,
};
use velox_node::netlink::LinkEvent;
use velox_node::netlink::Netlink;
use velox_node::pod_policy::{self, PolicyAnswer, PolicyRequest};
use velox_node::{Bpffs, StateDir};

use crate::install::InstallTarget;
use crate::metrics::Metrics;
use crate::reconcile::endpoints::sync_endpoints;
use crate::reconcile::policy::{lift_isolation, PolicyReconciler};
use crate::reconcile::routes::{NodeNetwork, NodeNetworkConfig};
use crate::reconcile::services::{NodePortAlgorithm, ServiceBalancer, ThisNode};
use crate::reconcile::tunnel::TunnelMode;
use crate::source::files::FileSource;
use crate::source::kubernetes::ApiSource;
use crate::source::ClusterSource;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VELOX_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Reads the programs' aya-log records into this process's logger.
type DatapathLogger = EbpfLogger<&'static dyn log::Log>;

// `velox-loader run`'s flags; the command's help is on `Commands::Run`.
#[derive(clap::Args)]
pub struct RunArgs {
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
    /// Where the host's root is mounted in this container (`/host` in the
    /// DaemonSet): the install record names the host's paths too.
    #[arg(long, requires = "cni_bin_dir")]
    host_root: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. 127.0.0.1:9962
    /// (0.0.0.0 lets every pod of the node read them).
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Flow records kept for `velox-loader flows` (every drop, every connection a
    /// policy allowed), the oldest let go first; 0 keeps none, and the programs then
    /// write events only while someone follows (`monitor`, `flows --follow`).
    #[arg(long, default_value_t = crate::flow_log::DEFAULT_RECORDS)]
    flow_records: usize,
    /// Also append every flow record to this file, one JSON object per line, for a
    /// log shipper to tail; at 64 MiB it moves to `<file>.1`.
    #[arg(long)]
    flow_records_file: Option<PathBuf>,
    /// Seconds between the records of a flow that goes on (its packets and bytes so
    /// far). With flow records on, the programs keep a flow table for it (one map
    /// lookup per packet of a pod), which also gives every UDP flow its first
    /// record. 0: no flow table, no counts (the records of drops and of TCP and ICMP
    /// connections stay).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    flow_report_interval: u64,
    /// Masquerade pod traffic leaving the cluster to the node's IP.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// Which peers are reached through VXLAN (the device `velox-vxlan`): auto tunnels
    /// those whose address is not on a subnet of the uplink, always tunnels every
    /// peer, never none (the network must then route pod CIDRs to off-link peers).
    #[arg(long, value_enum, default_value_t)]
    tunnel: TunnelMode,
    /// The VXLAN device's UDP port; every node must use the same.
    #[arg(long, default_value_t = crate::reconcile::tunnel::DEFAULT_VXLAN_PORT)]
    vxlan_port: u16,
    /// aya-log level of the eBPF programs: off, error, warn, info, debug (a line per
    /// packet) or trace. Set when the programs load; off costs nothing per packet.
    #[arg(long, default_value = "off")]
    pub datapath_log_level: log::LevelFilter,
    /// Load this eBPF object instead of the one built into the loader (a
    /// datapath fix without a new loader). Pods and the uplink move to it at start.
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// Kubernetes Services and EndpointSlices as JSON (`kubectl get
    /// services,endpointslices -A -o json`): a file, or a directory of such files.
    /// Looked at four times a second, read again when a file changes.
    #[arg(long, conflicts_with_all = ["kubernetes", "kubeconfig"])]
    cluster_state: Option<PathBuf>,
    /// Learn the cluster (Nodes, Services, EndpointSlices, and with
    /// `--network-policy` NetworkPolicies, Pods and Namespaces) from the Kubernetes API
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
    /// Replace kube-proxy for traffic from outside too (needs `--socket-lb`):
    /// NodePorts on this node's addresses, external and load-balancer IPs are
    /// translated at the uplink with Velox's own connection tracking and NAT, and
    /// `healthCheckNodePort`s answer.
    #[arg(long, requires = "socket_lb")]
    kube_proxy_replacement: bool,
    /// How a connection from outside picks its backend: at random, or by Maglev
    /// consistent hashing of its ends (every node picks the same backend for it, and
    /// a backend that comes or goes moves only its own share of new connections).
    #[arg(long, value_enum, default_value_t, requires = "kube_proxy_replacement")]
    node_port_algorithm: NodePortAlgorithm,
    /// Entries of the NAT's connection table (two per connection from outside, LRU).
    #[arg(long, default_value_t = velox_common::DEFAULT_NAT_ENTRIES, value_parser = clap::value_parser!(u32).range(2..))]
    nat_entries: u32,
    /// The most pods this node runs: the per-CPU counters array has a slot for
    /// each (80 bytes per CPU), and an ADD beyond it fails with code 104.
    #[arg(long, default_value_t = velox_common::DEFAULT_MAX_PODS, value_parser = clap::value_parser!(u32).range(1..=velox_common::MAX_ENDPOINTS as i64 - 1))]
    max_pods: u32,
    /// Entries of each NetworkPolicy rules map (one per isolated pod, direction and
    /// peer prefix or peer identity, both rule versions together). A pod whose rules
    /// do not fit denies what they would allow, and health and metrics say so.
    #[arg(long, default_value_t = velox_common::MAX_POLICY_RULES as u32, value_parser = clap::value_parser!(u32).range(1..))]
    policy_rules: u32,
    /// Entries of the map of connections NetworkPolicy follows (those of isolated
    /// pods). Half is reserved in equal shares for `--max-pods` pods, so no pod's
    /// connections can push out another's; the other half is a pool a pod takes
    /// from once its share is used. A connection that finds neither is dropped
    /// (`policy_flows_full`).
    #[arg(long, default_value_t = velox_common::MAX_POLICY_FLOWS as u32, value_parser = clap::value_parser!(u32).range(1024..))]
    policy_flows: u32,
    /// Seconds a TCP connection never answered lives without a packet, in the NAT
    /// and in the connections NetworkPolicy follows. Each `--ct-timeout-*` is 2 s at
    /// least (the programs note a connection's time once a second) and 30 days at
    /// most.
    #[arg(long, default_value_t = velox_common::CT_TIMEOUTS[velox_common::CT_OPENING as usize], value_parser = clap::value_parser!(u64).range(2..=MAX_CT_TIMEOUT))]
    ct_timeout_tcp_syn: u64,
    /// Seconds an established TCP connection lives without a packet.
    #[arg(long, default_value_t = velox_common::CT_TIMEOUTS[velox_common::CT_ESTABLISHED as usize], value_parser = clap::value_parser!(u64).range(2..=MAX_CT_TIMEOUT))]
    ct_timeout_tcp: u64,
    /// Seconds a TCP connection lives without a packet after a FIN.
    #[arg(long, default_value_t = velox_common::CT_TIMEOUTS[velox_common::CT_CLOSING as usize], value_parser = clap::value_parser!(u64).range(2..=MAX_CT_TIMEOUT))]
    ct_timeout_tcp_fin: u64,
    /// Seconds a UDP (or ICMP, SCTP) exchange lives without a packet.
    #[arg(long, default_value_t = velox_common::CT_TIMEOUTS[velox_common::CT_OTHER as usize], value_parser = clap::value_parser!(u64).range(2..=MAX_CT_TIMEOUT))]
    ct_timeout_any: u64,
    /// Enforce Kubernetes NetworkPolicy in the datapath, from the NetworkPolicies,
    /// Pods and Namespaces of `--cluster-state` or `--kubernetes`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
}

impl RunArgs {
    /// What the flags ask for, checked against each other.
    pub fn options(self) -> anyhow::Result<RunOptions> {
        let kubernetes = self.kubernetes || self.kubeconfig.is_some();
        anyhow::ensure!(
            !self.socket_lb || kubernetes || self.cluster_state.is_some(),
            "--socket-lb needs the Services: give --cluster-state or --kubernetes"
        );
        let source = match kubernetes {
            true => SourceOptions::Kubernetes {
                kubeconfig: self.kubeconfig,
                node_name: self.node_name.clone(),
            },
            false => SourceOptions::Files {
                peers_file: self.peers_file,
                cluster_state: self.cluster_state,
            },
        };
        let socket_lb_cgroup = match (self.socket_lb, self.socket_lb_cgroup) {
            (false, _) => None,
            (true, Some(cgroup)) => Some(velox_node::layout::cgroup2_at(&cgroup)?),
            (true, None) => Some(velox_node::layout::cgroup2_root()?),
        };
        let node_network = (self.uplink.is_some() || kubernetes).then_some(NodeNetworkConfig {
            uplink: self.uplink,
            pod_cidrs: self.pod_cidr,
            ip_masq: self.ip_masq,
            node_name: self.node_name,
            tunnel: self.tunnel,
            vxlan_port: self.vxlan_port,
        });
        Ok(RunOptions {
            interval: Duration::from_secs(self.reconcile_interval),
            node_network,
            source,
            datapath: DatapathOptions {
                object: self.ebpf_object,
                log_level: self.datapath_log_level,
                socket_lb_cgroup,
                kube_proxy_replacement: self.kube_proxy_replacement,
                node_port_algorithm: self.node_port_algorithm,
                nat_entries: self.nat_entries,
                max_pods: self.max_pods,
                policy_rules: self.policy_rules,
                policy_flows: self.policy_flows,
                vxlan_port: self.vxlan_port,
                flow_report_ns: match self.flow_records > 0 || self.flow_records_file.is_some() {
                    true => Duration::from_secs(self.flow_report_interval).as_nanos() as u64,
                    false => 0,
                },
                timeouts: crate::reconcile::flows::timeouts(
                    self.ct_timeout_tcp_syn,
                    self.ct_timeout_tcp,
                    self.ct_timeout_tcp_fin,
                    self.ct_timeout_any,
                ),
            },
            install_into: self
                .cni_bin_dir
                .zip(self.cni_conf_dir)
                .map(|(cni_bin_dir, cni_conf_dir)| InstallTarget {
                    cni_bin_dir,
                    cni_conf_dir,
                    host_root: self.host_root,
                }),
            metrics_address: self.metrics_address,
            flow_records: self.flow_records,
            flow_records_file: self.flow_records_file,
            network_policy: self.network_policy,
        })
    }
}

/// What `velox-loader run` was asked to do beyond its bpffs root and state dir.
pub struct RunOptions {
    /// Between two full reconcile passes.
    pub interval: Duration,
    /// The node's place in a cluster (uplink, peers, masquerade), if it has one.
    pub node_network: Option<NodeNetworkConfig>,
    pub source: SourceOptions,
    pub datapath: DatapathOptions,
    /// The CNI bin and conf dirs to install the plugin and conflist into.
    pub install_into: Option<InstallTarget>,
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Flow records to keep (0: none).
    pub flow_records: usize,
    /// Where to append them as JSON lines too.
    pub flow_records_file: Option<PathBuf>,
    /// Enforce NetworkPolicy.
    pub network_policy: bool,
}

pub async fn run(bpffs: Bpffs, state_dir: StateDir, options: RunOptions) -> anyhow::Result<()> {
    let RunOptions {
        interval,
        node_network,
        source,
        datapath,
        install_into,
        metrics_address,
        flow_records,
        flow_records_file,
        network_policy,
    } = options;
    let _owned = take_over(&bpffs, &state_dir)?;
    if source.in_cluster() {
        ensure_pins_outlive_the_container(&bpffs)?;
    }
    let store = EndpointStore::new(&state_dir);
    refuse_max_pods_below_live_slots(&store, datapath.max_pods)?;
    let enforces_policy = network_policy && source.gives_policy();
    // Before the programs ADD needs are pinned: from the first pod on, ADD knows.
    mark_policy_enforcement(&store, &state_dir, enforces_policy)?;
    if datapath.kube_proxy_replacement {
        reserve_nat_ports()?;
    }
    let mut ebpf = load_and_pin(&bpffs, &datapath)?;
    let kernel_drops = crate::kernel_drops::attach(&mut ebpf)
        .inspect_err(|e| log::warn!("the flow records will not show the kernel's own drops: {e:#}"))
        .ok();
    if datapath.socket_lb_cgroup.is_some() {
        // Before the first pass may close sockets by what it reads: this build's.
        if let Err(e) = pin_udp_socket_iterator(&bpffs, &mut ebpf) {
            log::error!(
                "the load balancer cannot tell which Service a connected UDP socket came through, so it closes \
                 none when a backend leaves: {e:#}"
            );
        }
    }
    carry_over_connections(&bpffs)?;
    crate::reconcile::flows::sweep_forever(bpffs.clone(), datapath.timeouts)?;
    // Not enforcing (turned off, or no source of policy): no pod stays isolated by
    // an earlier run's rules, nor denied by an ADD that saw the earlier marker.
    if !enforces_policy {
        lift_isolation(&bpffs)?;
        // Nor do an earlier run's names (pods since gone, its policies) name anyone
        // in the records: the Pods, once read, name them again.
        if let Err(e) = PolicyNames::default().write(&state_dir) {
            log::warn!("clearing an earlier run's names of pods and policies: {e:#}");
        }
    }
    let maps = EndpointMaps::open(&bpffs)?;
    let netlink = Netlink::connect()?;
    let node_network = node_network
        .map(|config| NodeNetwork::new(config, bpffs.clone()))
        .transpose()?;
    let metrics = Metrics::new();
    let metrics_failure = Arc::default();
    if let Some(address) = metrics_address {
        metrics.serve(address, bpffs.clone(), state_dir.clone(), Arc::clone(&metrics_failure));
    }
    let name_pods = flow_records > 0 || flow_records_file.is_some();
    if let Err(e) =
        crate::flow_log::FlowLog::start(&bpffs, &state_dir, flow_records, flow_records_file, metrics.clone())
    {
        log::error!("no flow records (velox-loader flows, monitor): {e:#}");
    }
    let with_services = datapath.socket_lb_cgroup.is_some();
    let source = source
        .start(with_services, network_policy, name_pods, metrics.clone())
        .await?;
    let sync = SourceSync {
        policy: enforces_policy.then(PolicyReconciler::default),
        source,
        node_network,
        balancer: with_services
            .then(|| ServiceBalancer::new(datapath.kube_proxy_replacement, datapath.node_port_algorithm)),
        this_node: None,
        endpoints_changed_at: None,
        name_pods,
        named_pods: None,
    };
    let mut daemon = Daemon {
        bpffs,
        state_dir,
        store,
        maps,
        netlink,
        sync,
        metrics,
        metrics_failure,
        install_into,
        unmoved: None,
        _kernel_drops: kernel_drops,
        waiting: Vec::new(),
    };
    // A source that cannot be read never stops the start; a missing uplink does.
    daemon.apply_source(Pass::Full).await?;
    sync_endpoints(
        &daemon.bpffs,
        &daemon.state_dir,
        &daemon.store,
        &mut daemon.maps,
        daemon.sync.uplink(),
    )?;
    attach_socket_lb(&daemon.bpffs, &mut ebpf, datapath.socket_lb_cgroup.as_deref())?;
    if !with_services {
        // Started without the load balancer: nothing an earlier start wrote may
        // translate on (a NodePort from outside would still be served).
        ServiceBalancer::clear(&daemon.bpffs)?;
    }
    if datapath.log_level != log::LevelFilter::Off {
        let logger = EbpfLogger::init(&mut ebpf).context("reading the datapath's log records")?;
        tokio::spawn(forward_datapath_logs(logger));
    }
    daemon.unmoved = Some(ebpf);
    daemon.move_to_this_build()?;
    daemon.serve(interval).await
}

/// Refuses a --max-pods that leaves a live pod's counters slot outside the arrays: its
/// policy state would read as "not isolated" and its counters would go. The datapath
/// that runs keeps its maps and rules.
fn refuse_max_pods_below_live_slots(store: &EndpointStore, max_pods: u32) -> anyhow::Result<()> {
    let records = store.list()?;
    if let Some(record) = records.iter().filter(|r| r.slot > max_pods).max_by_key(|r| r.slot) {
        anyhow::bail!(
            "--max-pods {max_pods} is below counters slot {} of the pod on {}: start with --max-pods {} or more, \
             or lower it once the pods above it have gone",
            record.slot,
            record.host_ifname,
            record.slot
        );
    }
    Ok(())
}

/// Tells ADD whether this node enforces NetworkPolicy (a new named pod then starts
/// denied both ways until the loader applies its policy), under the endpoint lock
/// ADD reads it under: an ADD sees the marker this loader left, or none.
fn mark_policy_enforcement(store: &EndpointStore, state_dir: &StateDir, enforced: bool) -> anyhow::Result<()> {
    let _lock = store.lock()?;
    let marker = state_dir.policy_enforced_marker();
    match enforced {
        true => write_atomic(&marker, b"", PRIVATE_FILE_MODE)?,
        false => remove_if_exists(&marker)?,
    }
    Ok(())
}

/// Makes sure the bpffs root and the state dir exist and that no other loader runs
/// on either: two would fight over pins and maps. The guards hold that until dropped.
fn take_over(bpffs: &Bpffs, state_dir: &StateDir) -> anyhow::Result<Vec<Flock<std::fs::File>>> {
    ensure_bpffs(bpffs)?;
    create_private_dir(&state_dir.root)?;
    let mut owned = Vec::new();
    for dir in [&bpffs.root, &state_dir.root] {
        match try_lock_dir(dir)? {
            Some(guard) => owned.push(guard),
            None => anyhow::bail!(
                "another velox-loader is running on {}: refusing to start a second one",
                dir.display()
            ),
        }
    }
    Ok(owned)
}

/// The running loader: its handles, and what it keeps in line.
struct Daemon {
    bpffs: Bpffs,
    state_dir: StateDir,
    store: EndpointStore,
    maps: EndpointMaps,
    netlink: Netlink,
    sync: SourceSync,
    metrics: Metrics,
    /// Why `/metrics` is not served, while it is not.
    metrics_failure: Arc<Mutex<Option<String>>>,
    /// The CNI bin and conf dirs to install into, until that is done.
    install_into: Option<InstallTarget>,
    /// This build's programs, while the links still run an earlier build's: they
    /// move once the maps hold the policy (see [`Daemon::move_to_this_build`]).
    unmoved: Option<Ebpf>,
    /// `kernel_drops` on `kfree_skb`, attached while the loader runs.
    _kernel_drops: Option<RawTracePointLink>,
    /// ADDs waiting for their pod's policy, answered after a policy pass has seen
    /// the pod, or when their time is up.
    waiting: Vec<WaitingRequest>,
}

/// An ADD's request for its pod's policy, until answered.
struct WaitingRequest {
    host_ifname: String,
    stream: UnixStream,
    /// The policy passes done when it came: a later one has seen the pod's record.
    passes_before: u64,
    /// When ADD gives up waiting; the pod stays denied until its rules land.
    until: Instant,
}

/// Requests kept at once: more ADDs at a time than a node runs pods would be a
/// runaway client; the ones beyond are answered at once (their pods stay denied
/// until the next pass).
const MAX_WAITING_REQUESTS: usize = 256;
/// How long a client has to send its request line.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// What a pass of the cluster source covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// What changed since the last pass (a quarter of a second apart).
    Changes,
    /// Everything, routes repaired (the periodic pass).
    Full,
    /// What changed, and the policy of every pod now: an ADD waits for it.
    PolicyNow,
}

impl Daemon {
    /// Moves every link to this build's programs once its maps are filled, the policy
    /// rules included: until the source has given them, the links keep their programs
    /// and maps, and with them the last rules they enforced (a new layout or a new
    /// --max-pods starts on empty maps, which would isolate nobody).
    fn move_to_this_build(&mut self) -> anyhow::Result<()> {
        let policy_known = self.sync.policy.as_ref().is_none_or(|policy| policy.applied_once);
        let Some(ebpf) = self.unmoved.as_ref().filter(|_| policy_known) else {
            if self.unmoved.is_some() {
                log::info!("the links keep their programs until NetworkPolicy is known");
            }
            return Ok(());
        };
        if repoint_links(&self.bpffs, ebpf) {
            carry_over_connections(&self.bpffs)?;
            remove_other_layouts(&self.bpffs)?;
            remove_other_nat_programs(&self.bpffs, ebpf)?;
        }
        self.unmoved = None;
        Ok(())
    }

    /// Answers health probes and reconciles until SIGTERM or SIGINT. Pins stay: the
    /// datapath keeps forwarding without us.
    async fn serve(mut self, interval: Duration) -> anyhow::Result<()> {
        let socket = self.state_dir.health_socket();
        let listener = bind_private(&socket)?;
        let policy_socket = self.state_dir.policy_socket();
        let policy_listener = bind_private(&policy_socket)?;
        let (requests_in, mut requests) = tokio::sync::mpsc::channel(MAX_WAITING_REQUESTS);
        log::info!(
            "ready: bpffs {}, state {}",
            self.bpffs.root.display(),
            self.state_dir.root.display()
        );

        self.sync.source.network_ready();
        let mut tick = tokio::time::interval(interval);
        let mut source_tick = tokio::time::interval(Duration::from_millis(250));
        let mut deleted_links = velox_node::netlink::link_deletions()?;
        let mut hears_deletions = true;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = tick.tick() => self.full_pass().await,
                _ = source_tick.tick() => self.source_pass().await,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        self.answer_health(stream).await;
                    }
                }
                accepted = policy_listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        read_policy_request(stream, requests_in.clone());
                    }
                }
                Some(request) = requests.recv() => self.apply_policy_now(request, &mut requests).await,
                event = deleted_links.next(), if hears_deletions => match event {
                    Some(LinkEvent::Deleted(ifindex)) => self.forget_interface(ifindex),
                    Some(LinkEvent::Lost) => {
                        log::warn!("link events were lost: looking at every pod's interface now");
                        self.sync_endpoints_now();
                    }
                    None => {
                        log::error!("link events ended: vanished pods leave the maps at the periodic pass only");
                        hears_deletions = false;
                    }
                },
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        remove_if_exists(&policy_socket)?;
        remove_if_exists(&socket)?;
        remove_if_exists(&self.state_dir.flows_socket())?;
        log::info!("stopped; datapath left in place");
        Ok(())
    }

    async fn apply_source(&mut self, pass: Pass) -> anyhow::Result<()> {
        let applied = self
            .sync
            .apply(&self.netlink, &self.bpffs, &self.store, &self.state_dir, pass)
            .await;
        if let Some(policy) = &self.sync.policy {
            self.metrics.policy_failed_closed.set(policy.failed_closed.len() as i64);
            let waiting = policy.waiting_for_pod_object.len() as i64;
            self.metrics.policy_waiting_for_pod_object.set(waiting);
            let without_identity = policy.without_identity.len() as i64;
            self.metrics.policy_addresses_without_identity.set(without_identity);
        }
        if let Some(balancer) = &self.sync.balancer {
            let failed = balancer.health().failed.len() as i64;
            self.metrics.services_failed_frontends.set(failed);
        }
        self.answer_waiting().await;
        applied
    }

    /// An ADD asks for its pod's policy (and any others that asked meanwhile): a
    /// policy pass now, answered as soon as it has seen their pods.
    async fn apply_policy_now(&mut self, first: ArrivedRequest, more: &mut Receiver<ArrivedRequest>) {
        let mut arrived = vec![first];
        while let Ok(request) = more.try_recv() {
            arrived.push(request);
        }
        let Some(policy) = &self.sync.policy else {
            let why = "velox-loader does not enforce NetworkPolicy".to_string();
            for (_, stream) in arrived {
                pod_policy::answer(stream, &PolicyAnswer::NotApplied { why: why.clone() }).await;
            }
            return;
        };
        let passes_before = policy.passes;
        for (request, stream) in arrived {
            if self.waiting.len() >= MAX_WAITING_REQUESTS {
                let why = format!("{MAX_WAITING_REQUESTS} ADDs wait already");
                pod_policy::answer(stream, &PolicyAnswer::NotApplied { why }).await;
                continue;
            }
            self.waiting.push(WaitingRequest {
                host_ifname: request.host_ifname,
                stream,
                passes_before,
                until: Instant::now() + pod_policy::WAIT,
            });
        }
        if let Err(e) = self.apply_source(Pass::PolicyNow).await {
            log::error!("applying the cluster's nodes: {e:#}");
        }
    }

    /// Answers the ADDs whose pods a policy pass has seen since they asked, and the
    /// ones whose time is up; the others keep waiting.
    async fn answer_waiting(&mut self) {
        let Some(policy) = &self.sync.policy else {
            return;
        };
        if self.waiting.is_empty() {
            return;
        }
        let slots: HashMap<String, u32> = match self.store.list() {
            Ok(records) => records.into_iter().map(|r| (r.host_ifname, r.slot)).collect(),
            Err(e) => return log::error!("reading the endpoint records: {e:#}"),
        };
        let now = Instant::now();
        for request in std::mem::take(&mut self.waiting) {
            let slot = slots.get(&request.host_ifname);
            let seen = policy.passes > request.passes_before;
            let answer = match slot {
                _ if !seen && now < request.until => None,
                _ if !seen => Some(PolicyAnswer::NotApplied {
                    why: "no policy pass has finished since it asked: the source has not given the policy, \
                          or writing it failed (see velox-loader's log)"
                        .into(),
                }),
                None => Some(PolicyAnswer::NotApplied {
                    why: "velox-loader has no endpoint record of it".into(),
                }),
                Some(slot) => match (policy.failed_closed.get(slot), policy.waiting_for_pod_object.get(slot)) {
                    (Some(why), _) => Some(PolicyAnswer::NotApplied { why: why.clone() }),
                    (None, Some(name)) if now >= request.until => Some(PolicyAnswer::NotApplied {
                        why: format!("the cluster source has not shown the Pod object {name} yet"),
                    }),
                    (None, Some(_)) => None,
                    (None, None) => Some(PolicyAnswer::Applied),
                },
            };
            match answer {
                Some(answer) => pod_policy::answer(request.stream, &answer).await,
                None => self.waiting.push(request),
            }
        }
    }

    /// A pod's veth is gone (its netns went without a DEL): its addresses leave the
    /// endpoints map at once, since the datapath redirects to whatever interface an
    /// entry names (a redirect to a vanished one is a drop nobody counts). The next
    /// full pass frees the rest.
    fn forget_interface(&mut self, ifindex: u32) {
        // Under the endpoint lock, as every endpoint map writer: an ADD between its
        // map entry and its cache entry is never half-seen.
        let removed = self
            .store
            .lock()
            .and_then(|_lock| Ok(self.maps.remove_all_owned(ifindex)?));
        if let Err(e) = removed {
            log::error!("removing the entries of deleted interface {ifindex}: {e:#}");
        }
    }

    /// The periodic pass: everything the source feeds, routes repaired, then the
    /// endpoints.
    async fn full_pass(&mut self) {
        if let Err(e) = self.apply_source(Pass::Full).await {
            log::error!("cluster reconcile: {e:#}");
        }
        let started = std::time::Instant::now();
        self.sync_endpoints_now();
        self.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// The endpoint records, their map entries and links, brought in line.
    fn sync_endpoints_now(&mut self) {
        let uplink = self.sync.uplink();
        if let Err(e) = sync_endpoints(&self.bpffs, &self.state_dir, &self.store, &mut self.maps, uplink) {
            log::error!("reconcile: {e:#}");
        }
    }

    /// What the source changed, and the CNI install once the pod CIDRs are known.
    async fn source_pass(&mut self) {
        if let Err(e) = self.apply_source(Pass::Changes).await {
            log::error!("applying the cluster's nodes: {e:#}");
        }
        if let Err(e) = self.move_to_this_build() {
            log::error!("moving the links to this build: {e:#}");
        }
        let Some(network) = self.sync.node_network.as_ref() else {
            return;
        };
        let (pod_cidrs, pod_mtu) = (network.pod_cidrs(), network.pod_mtu());
        if let Some((target, mtu)) = self.install_into.clone().zip(pod_mtu).filter(|_| !pod_cidrs.is_empty()) {
            // The conflist tells kubelet the node's network is ready: only now.
            let args = target.args(pod_cidrs.to_vec(), mtu);
            match crate::install::install(&args, &self.bpffs.root, &self.state_dir.root) {
                Ok(()) => self.install_into = None,
                Err(e) => log::error!("installing the plugin and its conflist (trying again): {e:#}"),
            }
        }
    }

    async fn answer_health(&self, mut stream: tokio::net::UnixStream) {
        let health = Health {
            ready: true,
            endpoints: self.store.list().map(|r| r.len()).unwrap_or(0),
            cluster: Some(self.sync.source.health()),
            policy_failed_closed: self
                .sync
                .policy
                .as_ref()
                .map(|policy| policy.failed_closed.values().cloned().collect())
                .unwrap_or_default(),
            links_held: self.unmoved.is_some().then(|| {
                "the NetworkPolicy is not known yet: the links keep the programs and rules they had".to_string()
            }),
            policy: self.sync.policy.as_ref().map(|policy| PolicyHealth {
                synced_once: policy.applied_once,
                waiting_for_pod_object: policy.waiting_for_pod_object.len(),
                waiting: policy
                    .waiting_for_pod_object
                    .values()
                    .take(MAX_NAMED_WAITING)
                    .cloned()
                    .collect(),
                without_identity: policy
                    .without_identity
                    .values()
                    .take(MAX_NAMED_WAITING)
                    .cloned()
                    .collect(),
            }),
            services: self.sync.balancer.as_ref().map(ServiceBalancer::health),
            metrics_error: crate::metrics::lock(&self.metrics_failure).clone(),
        };
        let _ = stream.write_all(health.to_json().as_bytes()).await;
    }
}

/// A unix socket only root reaches, in place of one a loader before left.
fn bind_private(socket: &Path) -> anyhow::Result<UnixListener> {
    let listener = crate::flow_log::bind_private(socket)?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// A policy request with the connection to answer on.
type ArrivedRequest = (PolicyRequest, UnixStream);

/// Reads the request off a new connection beside the loop, which a slow client
/// must not hold up, and hands it over.
fn read_policy_request(mut stream: UnixStream, to: Sender<ArrivedRequest>) {
    tokio::spawn(async move {
        match pod_policy::read_request(&mut stream, REQUEST_READ_TIMEOUT).await {
            Ok(request) => {
                let _ = to.send((request, stream)).await;
            }
            Err(e) => log::warn!("refusing a policy request: {e}"),
        }
    });
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

/// In a pod, pins on a mount that does not propagate to the host's die with the
/// container, and the datapath with them at its next restart: refused, saying why.
fn ensure_pins_outlive_the_container(bpffs: &Bpffs) -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading the mount table")?;
    anyhow::ensure!(
        velox_node::layout::mount_is_shared(&mountinfo, &bpffs.root) == Some(true),
        "{} is not on a shared mount: pins would not outlive this container. Mount the host's bpffs with \
         mountPropagation: Bidirectional (deploy/velox.yaml does); the host's /sys/fs/bpf must be a shared \
         mount (mount --make-shared /sys/fs/bpf)",
        bpffs.root.display()
    );
    Ok(())
}

/// Where the cluster is learnt from.
pub enum SourceOptions {
    /// `--peers-file` and `--cluster-state`.
    Files {
        peers_file: Option<PathBuf>,
        cluster_state: Option<PathBuf>,
    },
    /// The API server, from `kubeconfig` or the usual places; `node_name` is this
    /// node's Node.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        node_name: Option<String>,
    },
}

impl SourceOptions {
    /// The API server from the pod's service account: the loader runs in a pod.
    fn in_cluster(&self) -> bool {
        matches!(self, SourceOptions::Kubernetes { kubeconfig: None, .. })
    }

    /// Whether the source has policy to give at all (a files source without
    /// `--cluster-state` has none: no pod is isolated).
    fn gives_policy(&self) -> bool {
        match self {
            SourceOptions::Files { cluster_state, .. } => cluster_state.is_some(),
            SourceOptions::Kubernetes { .. } => true,
        }
    }

    async fn start(
        self,
        with_services: bool,
        with_policy: bool,
        with_pods: bool,
        metrics: Metrics,
    ) -> anyhow::Result<Box<dyn ClusterSource>> {
        Ok(match self {
            SourceOptions::Files {
                peers_file,
                cluster_state,
            } => Box::new(FileSource::new(peers_file, cluster_state, metrics)),
            SourceOptions::Kubernetes { kubeconfig, node_name } => Box::new(
                ApiSource::start(
                    kubeconfig.as_deref(),
                    with_services,
                    with_policy,
                    with_pods,
                    node_name,
                    metrics,
                )
                .await?,
            ),
        })
    }
}

/// The cluster source and what it feeds: routes and peers, the socket load
/// balancer, NetworkPolicy.
struct SourceSync {
    source: Box<dyn ClusterSource>,
    node_network: Option<NodeNetwork>,
    balancer: Option<ServiceBalancer>,
    /// This node as the Services were last applied for.
    this_node: Option<ThisNode>,
    policy: Option<PolicyReconciler>,
    /// When the endpoint records last changed (the directory's mtime): a pod came
    /// or went, and policy must look at it.
    endpoints_changed_at: Option<std::time::SystemTime>,
    /// Without policy, whether the flow records want the pods named, and the names
    /// last written for them (the policy pass writes them otherwise).
    name_pods: bool,
    named_pods: Option<BTreeMap<IpAddr, String>>,
}

impl SourceSync {
    fn uplink(&self) -> Option<&str> {
        self.node_network.as_ref().and_then(NodeNetwork::uplink)
    }

    /// Applies what `pass` covers. A failure to apply the Services or the policy is
    /// logged; one of the uplink, routes and peers is returned. The datapath keeps
    /// what it has.
    async fn apply(
        &mut self,
        netlink: &Netlink,
        bpffs: &Bpffs,
        store: &EndpointStore,
        state_dir: &StateDir,
        pass: Pass,
    ) -> anyhow::Result<()> {
        let full = pass == Pass::Full;
        let changed = self.source.changed();
        let mut result = Ok(());
        if let Some(node_network) = self.node_network.as_mut().filter(|_| changed || full) {
            result = node_network.apply_nodes(netlink, self.source.nodes()).await;
        }
        let this_node = self
            .node_network
            .as_ref()
            .map(NodeNetwork::this_node)
            .unwrap_or_default();
        if let Some(balancer) = self.balancer.as_mut() {
            if changed || balancer.retry_due() || self.this_node.as_ref() != Some(&this_node) {
                let pod_netns = || store.list().unwrap_or_default().into_iter().map(|r| r.netns).collect();
                match balancer.apply_services(bpffs, state_dir, self.source.services(), &this_node, pod_netns) {
                    Ok(()) => self.this_node = Some(this_node),
                    // Tried again next pass.
                    Err(e) => log::error!("applying the Services: {e:#}"),
                }
            }
        }
        let endpoints_changed_at = std::fs::metadata(state_dir.endpoints_dir())
            .and_then(|m| m.modified())
            .ok();
        if let Some(policy) = self.policy.as_mut() {
            if changed || pass != Pass::Changes || endpoints_changed_at != self.endpoints_changed_at {
                let applied = store
                    .list()
                    .map_err(anyhow::Error::from)
                    .and_then(|records| policy.apply_policy(bpffs, state_dir, store, self.source.policy(), &records));
                match applied {
                    Ok(()) => self.endpoints_changed_at = endpoints_changed_at,
                    Err(e) => log::error!("applying NetworkPolicy: {e:#}"),
                }
            }
        } else if self.name_pods && (changed || full) {
            if let Some(pods) = self.source.pods() {
                let names = PolicyNames::of_pods(&pods);
                if self.named_pods.as_ref() != Some(&names.pods) {
                    match names.write(state_dir) {
                        Ok(()) => self.named_pods = Some(names.pods),
                        Err(e) => log::warn!("naming the pods for the flow records: {e:#}"),
                    }
                }
            }
        }
        result
    }
}

/// Which datapath `run` loads, how verbosely it logs, and the socket load balancer.
pub struct DatapathOptions {
    /// An eBPF object file instead of the embedded one (a datapath fix without a new
    /// loader, the upgrade test's changed datapath).
    pub object: Option<PathBuf>,
    pub log_level: log::LevelFilter,
    /// The cgroup (v2) whose processes' sockets the load balancer translates; off
    /// when `None`.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Outside traffic to Services is translated at the uplink too.
    pub kube_proxy_replacement: bool,
    pub node_port_algorithm: NodePortAlgorithm,
    /// Entries of the NAT map.
    pub nat_entries: u32,
    /// Counters slots for this many pods (and one for the uplink).
    pub max_pods: u32,
    /// Entries of the policy rules map.
    pub policy_rules: u32,
    /// Entries of the policy flows map.
    pub policy_flows: u32,
    /// Of the NAT's connections and those NetworkPolicy follows.
    pub timeouts: ConnectionTimeouts,
    /// The VXLAN device's UDP port, whose packets `from_net` leaves to it.
    pub vxlan_port: u16,
    /// How often a flow that goes on is recorded; 0: no flow table.
    pub flow_report_ns: u64,
}

/// Loads the object, reusing the maps pinned in this build's layout directory (or
/// pinning fresh ones there), and pins the programs: new pods get them from now on.
/// A program pin is replaced atomically; links keep their program until
/// [`repoint_links`] moves them.
fn load_and_pin(bpffs: &Bpffs, options: &DatapathOptions) -> anyhow::Result<Ebpf> {
    check_pinned_layouts(bpffs)?;
    // No map pinned in any layout (nor an old release's flat pin): no datapath has
    // run on this node.
    let mut first_datapath = true;
    for entry in list_dir(&bpffs.all_maps_dir())? {
        first_datapath &= entry.is_dir() && list_dir(&entry)?.is_empty();
    }
    let mut loader = EbpfLoader::new();
    for map in layouts() {
        loader.map_pin_path(map.name, bpffs.map(map.name));
    }
    // Not required: an object of a build before the tunnel has no such global.
    loader.override_global(VXLAN_PORT_GLOBAL, &options.vxlan_port, false);
    // Not required either: an earlier build keeps no flow table.
    loader.override_global(FLOW_REPORT_GLOBAL, &options.flow_report_ns, false);
    // Without it the program records nothing; the rest of the datapath is whole.
    let kernel = KernelLayout::read()
        .inspect_err(|e| log::warn!("the flow records will not show the kernel's own drops: {e:#}"))
        .ok();
    if let Some(kernel) = &kernel {
        loader.override_global(SKB_LAYOUT_GLOBAL, &kernel.skb, false);
    }
    // As many connections as conntrack can hold: an LRU map that size only evicts
    // the ends of connections the kernel has already forgotten.
    loader.map_max_entries(KERNEL_FLOWS_MAP, kernel_flows_capacity());
    let counters_slots = options.max_pods + 1;
    // A pinned map keeps its size, so a new size needs a new map: the NAT for
    // --nat-entries and the connections NetworkPolicy follows for --policy-flows
    // (both carried over; the sweep counts the shares again), the counters for
    // --max-pods, the rules for --policy-rules. New rules maps start empty, and
    // the isolated pods deny everything until the policy pass writes their rules.
    // The other arrays by slot (policy switches, kernel-flow marks) are as long as
    // the largest --max-pods: recreated, they would leave the programs still
    // attached judging new pods by an old map's entries for their slots.
    let sized = [
        (POLICY_FLOWS_MAP, options.policy_flows, "--policy-flows"),
        (NAT_MAP, options.nat_entries, "--nat-entries"),
        (COUNTERS_MAP, counters_slots, "--max-pods"),
        (POLICY_RULES_MAP, options.policy_rules, "--policy-rules"),
        (POLICY_IDENTITY_RULES_MAP, options.policy_rules, "--policy-rules"),
    ];
    for (name, entries, flag) in sized {
        let pin = bpffs.map(name);
        if let Ok(pinned) = MapData::from_pin(&pin).and_then(|map| map.info()) {
            if pinned.max_entries() != entries {
                log::info!(
                    "{flag} asks for {entries} entries of {name}, the pinned one has {}: a new one is made",
                    pinned.max_entries()
                );
                set_aside(bpffs, name)?;
            }
        }
        loader.map_max_entries(name, entries);
    }
    // A constant once loaded: the verifier drops every log call above this level.
    let level = options.log_level as u8;
    loader.override_global(aya_log::LEVEL, &level, true);
    let from_file;
    let object = match &options.object {
        Some(path) => {
            from_file = std::fs::read(path).with_context(|| format!("reading the eBPF object {}", path.display()))?;
            &from_file[..]
        }
        None => {
            anyhow::ensure!(
                !EBPF_OBJECT.is_empty(),
                "this velox-loader was built without the eBPF object: build it with `cargo xtask build`"
            );
            EBPF_OBJECT
        }
    };
    check_object_layout(object)?;
    let mut ebpf = loader.load(object).context("loading the eBPF object")?;
    if let Some(kernel) = kernel {
        kernel.publish_reason_names();
    }
    // Before any program of this load runs: zero limits admit no connection, zero
    // timeouts keep none.
    let (reserved, pool) = policy_flow_limits(options);
    PolicyFlowShares::open(bpffs)?.set_limits(reserved, pool);
    velox_node::maps::set_connection_timeouts(bpffs, &options.timeouts)?;
    if first_datapath {
        // No program ran on this node yet, so no end of another node's pod is
        // recorded: packets to those pods skip the lookup until one is.
        EndpointMaps::open(bpffs)?.mark_no_kernel_flows(UPLINK_SLOT)?;
    }
    // Before the programs that tail-call them are pinned: a new pod's programs find
    // them in place.
    load_nat_programs(bpffs, &mut ebpf)?;
    for name in [
        FROM_POD_PROGRAM,
        FROM_NET_PROGRAM,
        TO_POD_PROGRAM,
        FROM_TUNNEL_PROGRAM,
        TO_TUNNEL_PROGRAM,
    ]
    .into_iter()
    .chain(SOCKET_LB_PROGRAMS)
    {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?;
        match program {
            Program::SchedClassifier(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            _ => anyhow::bail!("{name} is not a TC or socket hook program"),
        }
        .with_context(|| format!("loading {name}"))?;
        let pin = bpffs.program(name);
        // bpffs refuses names with a dot.
        let staged = pin.with_file_name(format!("{name}_staged"));
        remove_if_exists(&staged)?;
        program.pin(&staged).with_context(|| format!("pinning {name}"))?;
        std::fs::rename(&staged, &pin).with_context(|| format!("replacing the {name} pin"))?;
    }
    Ok(ebpf)
}

/// The longest `--ct-timeout-*`, in seconds.
const MAX_CT_TIMEOUT: u64 = 30 * 24 * 3600;

/// Each pod's reserved share of the policy flows map, and the pool's size.
fn policy_flow_limits(options: &DatapathOptions) -> (u64, u64) {
    let cpus = aya::util::nr_cpus().map_or(1, |cpus| cpus as u64);
    crate::reconcile::flows::limits(options.policy_flows, options.max_pods, cpus)
}

/// Moves this layout's pin of `name` out of the way of a new map of another size,
/// into a directory beside the layouts': like another layout's maps, the
/// connections it holds are carried over (`carry_over_connections`), and it goes
/// once the links have moved (`remove_other_layouts`). The programs still attached
/// use it until then.
fn set_aside(bpffs: &Bpffs, name: &str) -> anyhow::Result<()> {
    if !bpffs.map(name).exists() {
        return Ok(());
    }
    let dir = bpffs
        .all_maps_dir()
        .join(format!("resized-{}", velox_node::maps::layout_id()));
    create_private_dir(&dir)?;
    let aside = dir.join(name);
    remove_if_exists(&aside)?;
    std::fs::rename(bpffs.map(name), &aside).with_context(|| format!("setting {name} aside"))
}

/// Keeps the node's own sockets off the source ports the NAT masquerades with
/// (`ip_local_reserved_ports`, both families): a host connection on one of them
/// could meet a NAT entry's tuple, and its replies would be taken for the NAT's.
fn reserve_nat_ports() -> anyhow::Result<()> {
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let (first, last) = (*velox_common::NAT_PORTS.start(), *velox_common::NAT_PORTS.end());
    let current = std::fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
    let current = current.trim();
    let covered = current.split(',').filter(|r| !r.is_empty()).any(|range| {
        let mut ends = range.split('-').map(|p| p.trim().parse::<u16>().unwrap_or(0));
        let start = ends.next().unwrap_or(0);
        let end = ends.next().unwrap_or(start);
        start <= first && last <= end
    });
    if !covered {
        let wanted = match current.is_empty() {
            true => format!("{first}-{last}"),
            false => format!("{current},{first}-{last}"),
        };
        std::fs::write(RESERVED, &wanted).with_context(|| format!("reserving the NAT's ports in {RESERVED}"))?;
        log::info!("reserved ports {first}-{last} for the NAT (ip_local_reserved_ports {wanted})");
    }
    Ok(())
}

/// Pins of tail-call arrays start with this; the rest of the name is the load's.
const NAT_PROGRAMS_PIN: &str = "nat_programs_";

/// Loads the NAT programs `from_net` and `from_pod` tail-call, and fills their
/// array. A program array loses its entries when user space lets go of it, so it is
/// pinned, under a name of this load's own: the links keep the programs they run,
/// and those keep their array, until [`remove_other_nat_programs`] after the move.
fn load_nat_programs(bpffs: &Bpffs, ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut fds = Vec::new();
    let mut load_id = 0;
    for name in NAT_PROGRAMS {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        fds.push(program.fd()?.try_clone()?);
        load_id = program.info()?.id();
    }
    // Borrowed, not taken: the programs loaded after this one refer to the map's fd.
    let map = ebpf
        .map_mut(NAT_PROGRAMS_MAP)
        .with_context(|| format!("{NAT_PROGRAMS_MAP} missing from the eBPF object"))?;
    let mut tail_calls = ProgramArray::try_from(map)?;
    for (index, fd) in fds.iter().enumerate() {
        tail_calls
            .set(index as u32, fd, 0)
            .with_context(|| format!("adding {} to {NAT_PROGRAMS_MAP}", NAT_PROGRAMS[index]))?;
    }
    let pin = bpffs.program(&format!("{NAT_PROGRAMS_PIN}{load_id}"));
    tail_calls
        .pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Removes the tail-call arrays of earlier loads, once no link runs their programs.
fn remove_other_nat_programs(bpffs: &Bpffs, ebpf: &Ebpf) -> anyhow::Result<()> {
    let ours = match ebpf.program(NAT_PROGRAMS[NAT_PROGRAMS.len() - 1]) {
        Some(program) => format!("{NAT_PROGRAMS_PIN}{}", program.info()?.id()),
        None => return Ok(()),
    };
    for entry in list_dir(&bpffs.program(""))? {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(NAT_PROGRAMS_PIN) && name != ours {
            remove_if_exists(&entry)?;
        }
    }
    Ok(())
}

/// Attaches the socket load balancer's hooks to `cgroup` where they are not attached
/// yet, or detaches them when the load balancer is off (`None`).
fn attach_socket_lb(bpffs: &Bpffs, ebpf: &mut Ebpf, cgroup: Option<&Path>) -> anyhow::Result<()> {
    if cgroup.is_none() {
        remove_if_exists(&bpffs.iterator(UDP_SOCKET_FRONTENDS_ITER))?;
    }
    for name in SOCKET_LB_PROGRAMS {
        let pin = bpffs.cgroup_link(name);
        // A link an earlier start was moving off another cgroup (bpffs takes no
        // dots in names): back in place if that start stopped before the new one
        // was pinned, so it serves until its successor is attached.
        let moving = bpffs.cgroup_link(&format!("{name}_moving"));
        if moving.exists() && !pin.exists() {
            std::fs::rename(&moving, &pin)?;
        }
        remove_if_exists(&moving)?;
        match cgroup {
            None => remove_if_exists(&pin)?,
            Some(cgroup) if pin.exists() && attached_to(&pin, cgroup) => {}
            Some(cgroup) => {
                // Pinned on another cgroup (the flag changed): the new link first,
                // then the old one goes, so no connect goes untranslated between.
                if pin.exists() {
                    log::info!("moving {name} to the cgroup {}", cgroup.display());
                    std::fs::rename(&pin, &moving)?;
                }
                let program: &mut CgroupSockAddr = ebpf
                    .program_mut(name)
                    .with_context(|| format!("{name} missing from the eBPF object"))?
                    .try_into()?;
                if let Err(e) = attach_cgroup(bpffs, program, name, cgroup) {
                    // The old link keeps serving where it was.
                    let _ = std::fs::rename(&moving, &pin);
                    return Err(e.into());
                }
                remove_if_exists(&moving)?;
            }
        }
    }
    if let Some(cgroup) = cgroup {
        log::info!("socket load balancer on {}", cgroup.display());
    }
    Ok(())
}

/// Loads this build's iterator over UDP sockets and pins its link in place of the
/// last start's: the load balancer reads it to learn which Service each connected
/// socket came through.
fn pin_udp_socket_iterator(bpffs: &Bpffs, ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let name = UDP_SOCKET_FRONTENDS_ITER;
    let program: &mut Iter = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the eBPF object"))?
        .try_into()?;
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    program.load("udp", &btf).with_context(|| format!("loading {name}"))?;
    let link_id = program.attach().with_context(|| format!("attaching {name}"))?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    let pin = bpffs.iterator(name);
    create_private_dir(pin.parent().expect("an iterator pin has a directory"))?;
    let staged = pin.with_file_name(format!("{name}_staged"));
    remove_if_exists(&staged)?;
    link.pin(&staged).with_context(|| format!("pinning {name}"))?;
    std::fs::rename(&staged, &pin).with_context(|| format!("replacing the {name} pin"))?;
    Ok(())
}

/// Whether the cgroup link pinned at `pin` acts on `cgroup`; one that cannot be read
/// is taken for another's.
fn attached_to(pin: &Path, cgroup: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let wanted = std::fs::metadata(cgroup).map(|m| m.ino()).ok();
    velox_node::link::cgroup_of_pinned_link(pin).ok() == wanted
}

/// Moves every pinned link (pods' veths, the uplink) that runs an earlier build of
/// a program to this build's, in one atomic step per link (`BPF_LINK_UPDATE`): no
/// packet sees the interface without a program. True when every link runs this
/// build; a link that could not move is logged and keeps its program.
fn repoint_links(bpffs: &Bpffs, ebpf: &Ebpf) -> bool {
    // The running programs by id: name, and tag (a hash of the instructions that
    // leaves out map references, so the same build loaded again has the same tag).
    let running_programs: HashMap<u32, (String, u64)> = loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| Some((info.id(), (info.name_as_str()?.to_string(), info.tag()))))
        .collect();
    let mut pins = Vec::new();
    for hook in Hook::ALL {
        match list_dir(&bpffs.links_dir(hook)) {
            Ok(found) => pins.extend(found),
            Err(e) => {
                log::error!("listing the links to move to this build: {e}");
                return false;
            }
        }
    }
    let (mut changed, mut reloaded, mut failed) = (0, 0, 0);
    for pin in pins {
        let outcome = (|| -> anyhow::Result<Option<bool>> {
            let link: FdLink = PinnedLink::from_pin(&pin)?.into();
            let running = link.info()?.program_id();
            let (name, tag) = running_programs
                .get(&running)
                .with_context(|| format!("program {running} is gone"))?;
            let program = ebpf
                .program(name)
                .with_context(|| format!("this build has no program {name}"))?;
            let info = program.info()?;
            if info.id() == running {
                return Ok(None);
            }
            update_pinned_link(&pin, program.fd()?.as_fd())?;
            Ok(Some(info.tag() != *tag))
        })();
        match outcome {
            Ok(Some(true)) => changed += 1,
            Ok(Some(false)) => reloaded += 1,
            Ok(None) => {}
            Err(e) => {
                failed += 1;
                log::warn!("{} stays on its program: {e:#}", pin.display());
            }
        }
    }
    if changed > 0 {
        log::info!("moved {changed} link(s) to this build's changed programs");
    }
    if reloaded > 0 {
        log::info!("re-attached {reloaded} link(s) to the same programs, loaded again");
    }
    failed == 0
}

/// Removes the maps of other layouts (an earlier or later build's): once every link
/// runs this build's programs, no program uses them.
fn remove_other_layouts(bpffs: &Bpffs) -> anyhow::Result<()> {
    for entry in list_dir(&bpffs.all_maps_dir())? {
        if entry == bpffs.maps_dir() {
            continue;
        }
        log::info!("removing the maps of another layout, or set aside: {}", entry.display());
        if entry.is_dir() {
            std::fs::remove_dir_all(&entry)
        } else {
            std::fs::remove_file(&entry)
        }
        .with_context(|| format!("removing {}", entry.display()))?;
    }
    Ok(())
}

/// Copies what only the maps record from another layout's maps of the same shape
/// (or a map set aside for its size) into this layout's, so an upgrade that changes
/// the layout keeps live connections: the kernel flows (connections the kernel
/// NATs; without them replies would take the fast path), Velox's own NAT of
/// connections from outside, the connections NetworkPolicy allowed (without them an
/// egress-isolated server's replies would be judged as its own connections; the
/// sweep then counts the shares again), and the ClientIP affinities. Done when this
/// layout's maps are pinned, and again once the links have moved (the old programs
/// went on changing the old maps until then): an entry they changed later wins.
/// The endpoint and peer maps are rebuilt from the records and the peers file;
/// counters start again.
fn carry_over_connections(bpffs: &Bpffs) -> anyhow::Result<()> {
    carry_over::<FlowEnd, u32>(bpffs, KERNEL_FLOWS_MAP, |_, _| false)?;
    carry_over::<NatKey, NatEntry>(bpffs, NAT_MAP, |ours, theirs| theirs.last_seen > ours.last_seen)?;
    carry_over::<PolicyFlow, AllowedFlow>(bpffs, POLICY_FLOWS_MAP, |ours, theirs| {
        theirs.last_seen > ours.last_seen
    })?;
    carry_over::<AffinityKey, Affinity>(bpffs, AFFINITY_MAP, |ours, theirs| theirs.last_seen > ours.last_seen)
}

/// Copies the hash map `name` of another layout, where it has this layout's shape,
/// into this layout's: what it lacks, and what `newer(ours, theirs)` prefers.
fn carry_over<K: aya::Pod, V: aya::Pod>(
    bpffs: &Bpffs,
    name: &'static str,
    newer: impl Fn(&V, &V) -> bool + Copy,
) -> anyhow::Result<()> {
    let expected = layouts()
        .into_iter()
        .find(|l| l.name == name)
        .expect("a map of this layout");
    for dir in list_dir(&bpffs.all_maps_dir())? {
        let pin = dir.join(name);
        if dir == bpffs.maps_dir() || !pin.exists() {
            continue;
        }
        let theirs = pinned_layout(&pin, name)?;
        if (theirs.key_size, theirs.value_size) == (expected.key_size, expected.value_size) {
            let copied = velox_node::maps::copy_entries::<K, V>(bpffs, name, &pin, newer)?;
            log::info!("carried {copied} entries of {name} over from {}", dir.display());
        }
    }
    Ok(())
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
