//! The CNI commands. ADD either completes or is undone by the same teardown DEL runs.

use anyhow::Context;
use ipnet::IpNet;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;
use velox_node::endpoint::{host_ifname, EndpointRecord, EndpointStore};
use velox_node::link::{attach_pod_veth_programs, detach_tc, POD_VETH_PROGRAMS};
use velox_node::maps::{EndpointMaps, NewPodPolicy, PeerMap};
use velox_node::netlink::{format_mac, netns_cookie, Link, Netlink};
use velox_node::pod_policy::{self, PolicyAnswer};
use velox_node::{health, Bpffs, ErrorList, Family, StateDir};

use crate::config::{Attachment, Command, Environment, NetConf};
use crate::error::{fail, CniError, Code};
use crate::ipam::Ipam;
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::version::{version_info, CniVersion};

/// The pods' default gateway of a family: link-local, answered by a static neighbour
/// entry that points at the host-side veth.
pub fn gateway(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
    }
}

fn gateway_of(ip: &IpAddr) -> IpAddr {
    gateway(Family::of(ip))
}

/// A pod address as configured: a /32 or a /128.
fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

pub struct Plugin {
    conf: NetConf,
    version: CniVersion,
    env: Environment,
    stdin: Vec<u8>,
    bpffs: Bpffs,
    state_dir: StateDir,
    store: EndpointStore,
}

/// Runs one CNI invocation; `Some` is the JSON for stdout.
pub async fn run(env: Environment, stdin: Vec<u8>) -> anyhow::Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(version_info()));
    }
    let (conf, version) = NetConf::parse(&stdin)?;
    init_logging(&conf);
    let state_dir = StateDir::new(&conf.state_dir);
    let plugin = Plugin {
        bpffs: Bpffs::new(&conf.bpffs_root),
        store: EndpointStore::new(&state_dir),
        state_dir,
        conf,
        version,
        env,
        stdin,
    };
    let started = std::time::Instant::now();
    let _attachment = match plugin.env.command {
        Command::Add | Command::Del | Command::Check => Some(plugin.store.attachment_lock(&plugin.attachment())?),
        _ => None,
    };
    let outcome = match plugin.env.command {
        Command::Add => plugin.add().await.map(Some),
        Command::Del => plugin.del().await.map(|()| None),
        Command::Check => plugin.check().await.map(|()| None),
        Command::Gc => plugin.gc().await.map(|()| None),
        Command::Status => plugin.status().map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    log::info!(
        "{:?} container={} ifname={} ok={} took_ms={:.2}",
        plugin.env.command,
        plugin.env.container_id,
        plugin.env.ifname,
        outcome.is_ok(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    outcome
}

fn init_logging(conf: &NetConf) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(conf.log_level.unwrap_or(log::LevelFilter::Warn));
    if let Some(path) = &conf.log_file {
        if let Ok(file) = velox_node::fs::open_log(path) {
            builder.target(env_logger::Target::Pipe(Box::new(file)));
        }
    }
    // Never stdout: it carries the result.
    let _ = builder.try_init();
}

/// The pod side (addresses, gateway neighbours, default routes) and the host side's
/// neighbours of a new veth pair, for every family the pod has an address of; the
/// host end stays down (see [`open_host_end`]). Returns the pod's interface.
async fn configure_ends(
    netns: &File,
    host: &Netlink,
    ifname: &str,
    host_link: &Link,
    pod_ips: &[IpAddr],
) -> anyhow::Result<Link> {
    let pod = Netlink::connect_in(netns)?;
    let pod_link = pod
        .link(ifname)
        .await?
        .context("pod interface vanished after creation")?;
    for ip in pod_ips {
        pod.add_address(pod_link.index, host_net(*ip)).await?;
        pod.add_permanent_neighbour(pod_link.index, gateway_of(ip), host_link.mac)
            .await?;
    }
    pod.set_up(pod_link.index).await?;
    for ip in pod_ips {
        pod.add_default_route_onlink(pod_link.index, gateway_of(ip)).await?;
    }

    for ip in pod_ips {
        host.add_permanent_neighbour(host_link.index, *ip, pod_link.mac).await?;
    }
    Ok(pod_link)
}

/// Brings the host end up and routes the pod's addresses to it. A veth whose host end
/// is down carries nothing either way: until its programs are attached, a packet
/// of the pod would reach the kernel without `from_pod`, and one to it without
/// `to_pod`, so no policy would see it.
async fn open_host_end(host: &Netlink, host_link: &Link, pod_ips: &[IpAddr]) -> anyhow::Result<()> {
    host.set_up(host_link.index).await?;
    for ip in pod_ips {
        host.add_link_route(host_link.index, host_net(*ip)).await?;
    }
    Ok(())
}

impl Plugin {
    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.env.container_id.clone(),
            ifname: self.env.ifname.clone(),
        }
    }

    fn ipam(&self) -> anyhow::Result<Ipam> {
        Ipam::new(&self.conf, &self.env, &self.stdin)
    }

    fn open_netns(&self) -> anyhow::Result<File> {
        let path = self.env.netns.as_ref().expect("validated for ADD and CHECK");
        File::open(path).map_err(|e| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("cannot open CNI_NETNS {}: {e}", path.display()),
            )
            .into()
        })
    }

    async fn add(&self) -> anyhow::Result<Value> {
        let attachment = self.attachment();
        let netns = self.open_netns()?;
        // Fail before touching anything when the loader has not set up the datapath.
        let mut maps = EndpointMaps::open(&self.bpffs)?;
        for (_, name) in POD_VETH_PROGRAMS {
            let program = self.bpffs.program(name);
            if !program.exists() {
                return fail(
                    Code::TryAgainLater,
                    format!("velox-loader is not ready: {} is missing", program.display()),
                );
            }
        }
        let host = Netlink::connect()?;
        let host_name = host_ifname(&attachment);
        if host.link(&host_name).await?.is_some() || self.store.get(&attachment)?.is_some() {
            return fail(
                Code::AlreadyExists,
                format!(
                    "container {} already has {} on this node (host veth {host_name})",
                    attachment.container_id, attachment.ifname
                ),
            );
        }
        let ipam = self.ipam()?;
        match self.setup(&attachment, &netns, &host, &mut maps, &ipam).await {
            Ok((result, NewPodPolicy::DenyAll)) => {
                self.wait_for_policy(&host_name).await;
                Ok(self.chain(result).to_json(self.version))
            }
            Ok((result, NewPodPolicy::NotIsolated)) => Ok(self.chain(result).to_json(self.version)),
            Err(err) => {
                log::warn!("ADD failed, undoing: {err:#}");
                if let Err(undo) = self.teardown(&attachment, &host, Some(&mut maps), Some(&ipam)).await {
                    log::error!("undoing the failed ADD: {undo:#}");
                }
                Err(err)
            }
        }
    }

    /// Asks the loader to apply the new pod's policy now and waits for it, up to
    /// [`pod_policy::WAIT`]. Whatever the loader answers, or if it does not, ADD succeeds:
    /// the pod denies everything until its rules are in the maps.
    async fn wait_for_policy(&self, host_name: &str) {
        let started = std::time::Instant::now();
        let socket = self.state_dir.policy_socket();
        let outcome = pod_policy::request(&socket, host_name, pod_policy::WAIT).await;
        let waited_ms = started.elapsed().as_secs_f64() * 1000.0;
        match outcome {
            Ok(PolicyAnswer::Applied) => log::info!("{host_name}: policy applied after {waited_ms:.2} ms"),
            Ok(PolicyAnswer::NotApplied { why }) => {
                log::warn!("{host_name}: starts denying everything until velox-loader applies its policy: {why}")
            }
            Err(e) => log::warn!(
                "{host_name}: starts denying everything until velox-loader applies its policy \
                 (waited {waited_ms:.0} ms): {e}"
            ),
        }
    }

    /// How a new pod starts: denied both ways when the loader enforces NetworkPolicy
    /// and the runtime named the pod (the loader finds its Pod object by that name),
    /// open otherwise, as before pods had names.
    fn new_pod_policy(&self) -> NewPodPolicy {
        match self.env.pod.is_some() && self.state_dir.policy_enforced_marker().exists() {
            true => NewPodPolicy::DenyAll,
            false => NewPodPolicy::NotIsolated,
        }
    }

    async fn setup(
        &self,
        attachment: &Attachment,
        netns: &File,
        host: &Netlink,
        maps: &mut EndpointMaps,
        ipam: &Ipam,
    ) -> anyhow::Result<(CniResult, NewPodPolicy)> {
        let host_name = host_ifname(attachment);
        let (host_link, ips, pod_link) = self.plumb(attachment, netns, host, maps, ipam, &host_name).await?;
        let socket_lb_opt_out = match self.conf.socket_lb_opt_out() {
            true => Some(netns_cookie(netns)?),
            false => None,
        };
        let record = EndpointRecord {
            slot: 0,
            socket_lb_opt_out,
            container_id: attachment.container_id.clone(),
            ifname: attachment.ifname.clone(),
            netns: self.env.netns.clone().unwrap_or_default(),
            network: self.conf.name.clone(),
            ips,
            host_ifname: host_name,
            host_ifindex: host_link.index,
            host_mac: format_mac(&host_link.mac),
            pod_mac: format_mac(&pod_link.mac),
            pod: self.env.pod.clone(),
        };
        let (record, policy) = self.publish(record, maps)?;
        log::info!(
            "added {:?} on {} (ifindex {}, pod {}, starting {policy:?})",
            record.ips,
            record.host_ifname,
            host_link.index,
            record.pod.as_ref().map_or("unnamed".to_string(), ToString::to_string),
        );
        Ok((self.result(record), policy))
    }

    /// The veth pair with `from_pod` and `to_pod` on its host end, and the pod's addresses
    /// configured on both ends: the host's link, the addresses and the pod's link.
    async fn plumb(
        &self,
        attachment: &Attachment,
        netns: &File,
        host: &Netlink,
        maps: &EndpointMaps,
        ipam: &Ipam,
        host_name: &str,
    ) -> anyhow::Result<(Link, Vec<IpAddr>, Link)> {
        host.create_veth(host_name, &attachment.ifname, netns, self.conf.mtu())
            .await?;
        let host_link = host
            .link(host_name)
            .await?
            .context("host veth vanished after creation")?;

        // Attaching TCX holds the rtnl lock through an RCU grace period (about 10 ms
        // here, per program), which no netlink request can overlap: allocate the
        // addresses (a delegated IPAM plugin's exec included) and check them meanwhile.
        // Both are attached before ADD publishes the pod: until then `to_pod` drops
        // what the kernel forwards to the pod's new addresses.
        let attach = tokio::task::spawn_blocking({
            let (bpffs, name) = (self.bpffs.clone(), host_name.to_string());
            move || attach_pod_veth_programs(&bpffs, &name)
        });
        let configured = async {
            let ips = ipam.allocate(attachment)?;
            self.check_unused(&ips, maps, host).await?;
            let pod_link = configure_ends(netns, host, &attachment.ifname, &host_link, &ips).await?;
            anyhow::Ok((ips, pod_link))
        }
        .await;
        // Undoing a failed ADD must not race the attach.
        let attached = attach.await.context("attaching the veth's programs")?;
        let (ips, pod_link) = configured?;
        attached?;
        open_host_end(host, &host_link, &ips).await?;
        Ok((host_link, ips, pod_link))
    }

    /// Writes the record with a counters slot of its own and puts the pod into the
    /// maps, under the endpoint lock. The slot's policy state is set before the pod's
    /// interface and addresses point at the slot: no packet of the pod, or to it, is
    /// judged by what the slot's previous pod left.
    fn publish(
        &self,
        mut record: EndpointRecord,
        maps: &mut EndpointMaps,
    ) -> anyhow::Result<(EndpointRecord, NewPodPolicy)> {
        let _lock = self.store.lock()?;
        // Under the lock the loader changes the marker under: a loader starting
        // without enforcement lifts what was set before it, and is seen after.
        let policy = self.new_pod_policy();
        record.slot = self.store.claim_slot(&record.host_ifname, maps.max_pods())?;
        self.store.write(&record)?;
        maps.reset_slot(record.slot, policy)?;
        maps.mark_no_kernel_flows(record.slot)?;
        maps.set_interface(record.host_ifindex, record.slot)?;
        for ip in &record.ips {
            maps.insert_new(*ip, record.endpoint())?;
        }
        if let Some(cookie) = record.socket_lb_opt_out {
            maps.set_lb_opt_out(cookie, true)?;
        }
        Ok((record, policy))
    }

    /// The ADD result for a pod's record.
    fn result(&self, record: EndpointRecord) -> CniResult {
        let mtu = self.conf.mtu();
        CniResult {
            interfaces: vec![
                Interface {
                    name: record.host_ifname,
                    mac: record.host_mac,
                    mtu: Some(mtu),
                    sandbox: String::new(),
                },
                Interface {
                    name: record.ifname,
                    mac: record.pod_mac,
                    mtu: Some(mtu),
                    sandbox: record.netns.display().to_string(),
                },
            ],
            ips: record
                .ips
                .iter()
                .map(|ip| IpConfig {
                    address: host_net(*ip),
                    gateway: Some(gateway_of(ip)),
                    interface: Some(1),
                })
                .collect(),
            routes: record
                .ips
                .iter()
                .map(|ip| Route {
                    dst: IpNet::new(gateway_of(ip), 0).expect("a /0 is valid").trunc(),
                    gw: Some(gateway_of(ip)),
                })
                .collect(),
            dns: self.conf.dns.clone(),
        }
    }

    /// Refuses addresses that would take another's place: a pod's on this node, one in
    /// another node's pod CIDR, or one of the node's own (delegated or static IPAM
    /// can hand out any of them). `insert_new` closes the race with a concurrent ADD.
    async fn check_unused(&self, ips: &[IpAddr], maps: &EndpointMaps, host: &Netlink) -> anyhow::Result<()> {
        let peers = PeerMap::open(&self.bpffs)?;
        let node_addresses = host.all_addresses().await?;
        for ip in ips {
            let holder = if let Some(endpoint) = maps.get(*ip)? {
                format!("the pod behind host veth ifindex {}", endpoint.ifindex)
            } else if let Some(peer) = peers.route(*ip)? {
                format!("a pod CIDR of the node at {}", peer.node_ip.ip())
            } else if node_addresses.iter().any(|a| a.addr() == *ip) {
                "this node".to_string()
            } else {
                continue;
            };
            return fail(Code::AddressInUse, format!("IPAM gave {ip}, which belongs to {holder}"));
        }
        Ok(())
    }

    /// An earlier plugin's result comes first; ours is appended to it.
    fn chain(&self, ours: CniResult) -> CniResult {
        match &self.conf.prev_result {
            Some(prev) => {
                let mut chained = prev.clone();
                chained.extend(ours);
                chained
            }
            None => ours,
        }
    }

    async fn del(&self) -> anyhow::Result<()> {
        let host = Netlink::connect()?;
        // Without the loader's maps DEL still frees everything else; the loader drops
        // map entries that have no record when it comes back.
        let mut maps = EndpointMaps::open(&self.bpffs)
            .map_err(|e| log::warn!("DEL without endpoint map: {e:#}"))
            .ok();
        self.teardown(&self.attachment(), &host, maps.as_mut(), Some(&self.ipam()?))
            .await
    }

    /// Removes whatever exists of an attachment and keeps going past failures.
    async fn teardown(
        &self,
        attachment: &Attachment,
        host: &Netlink,
        maps: Option<&mut EndpointMaps>,
        ipam: Option<&Ipam>,
    ) -> anyhow::Result<()> {
        let host_name = host_ifname(attachment);
        let mut errors = ErrorList::default();
        // A corrupt record must not make DEL fail forever: the interface still says
        // which map entries are the pod's, and the file goes at the end.
        let record = match self.store.get(attachment) {
            Err(e @ velox_node::Error::Record { .. }) => {
                log::warn!("{e}; tearing down by the interface instead");
                None
            }
            other => errors.keep(other).flatten(),
        };
        let ifindex = match &record {
            Some(record) => Some(record.host_ifindex),
            None => errors
                .keep(host.link(&host_name).await)
                .flatten()
                .map(|link| link.index),
        };
        // The map entries and the record go in one step under the endpoint lock: the
        // loader must never see the record without its entries (it would put them
        // back). What stays (veth, link pin, addresses) is found from the attachment
        // alone, so a retry needs no record.
        errors.keep(self.store.lock().and_then(|_lock| {
            if let (Some(ifindex), Some(maps)) = (ifindex, maps) {
                match &record {
                    Some(record) => {
                        for ip in &record.ips {
                            maps.remove_owned(*ip, ifindex)?;
                        }
                        if let Some(cookie) = record.socket_lb_opt_out {
                            maps.set_lb_opt_out(cookie, false)?;
                        }
                    }
                    None => maps.remove_all_owned(ifindex)?,
                }
                maps.remove_interface(ifindex)?;
            }
            self.store.remove(attachment, record.as_ref().map(|r| r.slot))
        }));
        // Deleting the veth detaches the TCX link in the same step; unpinning a live
        // link first would cost a second RCU grace period under the rtnl lock.
        errors.keep(host.delete_link(&host_name).await);
        errors.keep(detach_tc(&self.bpffs, &host_name));
        if let Some(ipam) = ipam {
            errors.keep(ipam.release(attachment));
        }
        match errors.into_result() {
            Ok(()) => Ok(()),
            Err(errors) => fail(Code::Datapath, format!("tearing down {host_name}: {errors}")),
        }
    }

    async fn check(&self) -> anyhow::Result<()> {
        self.version.require("CHECK", CniVersion::V0_4_0)?;
        let attachment = self.attachment();
        let Some(prev) = &self.conf.prev_result else {
            return fail(Code::InvalidConfig, "CHECK needs the prevResult of ADD");
        };
        let Some(record) = self.store.get(&attachment)? else {
            return fail(
                Code::UnknownContainer,
                format!(
                    "no velox endpoint for container {} {}",
                    attachment.container_id, attachment.ifname
                ),
            );
        };
        let ips = &record.ips;
        let broken = |what: String| fail::<()>(Code::Datapath, format!("CHECK of {ips:?}: {what}"));
        let host = Netlink::connect()?;
        match host.link(&record.host_ifname).await? {
            Some(link) if link.index == record.host_ifindex => {}
            _ => return broken(format!("host veth {} is missing or was replaced", record.host_ifname)),
        }
        for (hook, program) in POD_VETH_PROGRAMS {
            if !self.bpffs.tc_link(hook, &record.host_ifname).exists() {
                return broken(format!("{program} is not attached to {}", record.host_ifname));
            }
        }
        let maps = EndpointMaps::open(&self.bpffs)?;
        let pod = Netlink::connect_in(&self.open_netns()?)?;
        let Some(pod_link) = pod.link(&attachment.ifname).await? else {
            return broken(format!("{} is missing in the pod", attachment.ifname));
        };
        let addresses = pod.addresses(pod_link.index).await?;
        for ip in ips {
            if !prev.ips.iter().any(|c| c.address.addr() == *ip) {
                return broken(format!("prevResult does not hold {ip}"));
            }
            if maps.get(*ip)? != Some(record.endpoint()) {
                return broken(format!("the endpoint map entry of {ip} is missing or wrong"));
            }
            if !addresses.contains(&host_net(*ip)) {
                return broken(format!("{} lost its address {}", attachment.ifname, host_net(*ip)));
            }
            let gateway = gateway_of(ip);
            let default_route = pod.routes(Family::of(ip)).await?.into_iter().any(|route| {
                route.dst.prefix_len() == 0 && route.gateway == Some(gateway) && route.oif == Some(pod_link.index)
            });
            if !default_route {
                return broken(format!("the pod has no default route via {gateway}"));
            }
        }
        self.ipam()?.check(&attachment, ips)
    }

    async fn gc(&self) -> anyhow::Result<()> {
        self.version.require("GC", CniVersion::V1_1_0)?;
        // Without the list, "everything not listed" would be every pod on the node.
        let Some(valid) = &self.conf.valid_attachments else {
            return fail(Code::InvalidConfig, "GC needs \"cni.dev/valid-attachments\"");
        };
        let valid: HashSet<Attachment> = valid.iter().cloned().collect();
        let host = Netlink::connect()?;
        let mut maps = EndpointMaps::open(&self.bpffs).ok();
        let ipam = self.ipam()?;
        let mut errors = ErrorList::default();
        for record in self.store.list()? {
            let attachment = record.attachment();
            if record.network == self.conf.name && !valid.contains(&attachment) {
                let _attachment = self.store.attachment_lock(&attachment)?;
                log::info!("GC: removing stale endpoint {:?} ({})", record.ips, record.container_id);
                // Addresses are released in one pass below.
                errors.keep(self.teardown(&attachment, &host, maps.as_mut(), None).await);
            }
        }
        errors.keep(ipam.gc(&valid));
        match errors.into_result() {
            Ok(()) => Ok(()),
            Err(errors) => fail(Code::Datapath, format!("GC: {errors}")),
        }
    }

    fn status(&self) -> anyhow::Result<()> {
        self.version.require("STATUS", CniVersion::V1_1_0)?;
        let not_available = |why: String| {
            fail::<()>(
                Code::PluginNotAvailable,
                format!("velox-loader is not available ({why}); start velox-loader run"),
            )
        };
        match health::query(&self.state_dir.health_socket(), Duration::from_secs(2)) {
            Ok(health) if health.ready => Ok(()),
            Ok(health) => not_available(format!("it answered {health:?}")),
            Err(e) => not_available(e.to_string()),
        }
    }
}
