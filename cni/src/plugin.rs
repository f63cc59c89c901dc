//! The CNI commands. ADD either completes or is undone by the same teardown DEL runs.

use anyhow::Context;
use ipnet::Ipv4Net;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use velox_common::FROM_POD_PROGRAM;

use crate::config::{Attachment, Command, Environment, NetConf};
use crate::datapath::{self, Bpffs, Maps};
use crate::endpoint::{host_ifname, EndpointRecord, EndpointStore};
use crate::error::{fail, CniError, Code};
use crate::ipam::Ipam;
use crate::netlink::{format_mac, Link, Netlink};
use crate::result::{CniResult, Interface, IpConfig, Route};
use crate::version::{version_info, CniVersion};

/// The pods' default gateway: link-local, answered by a static neighbour entry.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The loader's health socket, asked by STATUS.
pub fn health_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("loader.sock")
}

pub struct Plugin {
    conf: NetConf,
    version: CniVersion,
    env: Environment,
    stdin: Vec<u8>,
    bpffs: Bpffs,
    store: EndpointStore,
}

/// Runs one CNI invocation; `Some` is the JSON for stdout.
pub async fn run(env: Environment, stdin: Vec<u8>) -> anyhow::Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(version_info()));
    }
    let (conf, version) = NetConf::parse(&stdin)?;
    init_logging(&conf);
    let plugin = Plugin {
        bpffs: Bpffs::new(&conf.bpffs_root),
        store: EndpointStore::new(&conf.state_dir),
        conf,
        version,
        env,
        stdin,
    };
    let started = std::time::Instant::now();
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
        if let Ok(file) = File::options().create(true).append(true).open(path) {
            builder.target(env_logger::Target::Pipe(Box::new(file)));
        }
    }
    // Never stdout: it carries the result.
    let _ = builder.try_init();
}

/// The pod side (address, gateway neighbour, default route) and the host side
/// (neighbour, /32 route) of a new veth pair; returns the pod's interface.
async fn configure_ends(
    netns: &File,
    host: &Netlink,
    ifname: &str,
    host_link: &Link,
    pod_ip: Ipv4Net,
) -> anyhow::Result<Link> {
    let pod = Netlink::connect_in(netns)?;
    let pod_link = pod
        .link(ifname)
        .await?
        .context("pod interface vanished after creation")?;
    pod.add_address(pod_link.index, pod_ip).await?;
    pod.add_permanent_neighbour(pod_link.index, GATEWAY, host_link.mac)
        .await?;
    pod.set_up(pod_link.index).await?;
    pod.add_default_route_onlink(pod_link.index, GATEWAY).await?;

    host.add_permanent_neighbour(host_link.index, pod_ip.addr(), pod_link.mac)
        .await?;
    host.set_up(host_link.index).await?;
    host.add_link_route(host_link.index, pod_ip).await?;
    Ok(pod_link)
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
        let mut maps = Maps::open(&self.bpffs)?;
        let program = self.bpffs.program(FROM_POD_PROGRAM);
        if !program.exists() {
            return fail(
                Code::TryAgainLater,
                format!("velox-loader is not ready: {} is missing", program.display()),
            );
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
            Ok(result) => Ok(self.chain(result)?.to_json(self.version)),
            Err(err) => {
                log::warn!("ADD failed, undoing: {err:#}");
                if let Err(undo) = self.teardown(&attachment, &host, Some(&mut maps), Some(&ipam)).await {
                    log::error!("undoing the failed ADD: {undo:#}");
                }
                Err(err)
            }
        }
    }

    async fn setup(
        &self,
        attachment: &Attachment,
        netns: &File,
        host: &Netlink,
        maps: &mut Maps,
        ipam: &Ipam,
    ) -> anyhow::Result<CniResult> {
        let mtu = self.conf.mtu();
        let ip = ipam.allocate(attachment)?;
        let pod_ip = Ipv4Net::new(ip, 32)?;
        let host_name = host_ifname(attachment);
        host.create_veth(&host_name, &attachment.ifname, netns, mtu).await?;
        let host_link = host
            .link(&host_name)
            .await?
            .context("host veth vanished after creation")?;

        // Attaching TCX waits out an RCU grace period in the kernel (about 9 ms here):
        // let it run while the two ends are configured.
        let attach = tokio::task::spawn_blocking({
            let (bpffs, name) = (self.bpffs.clone(), host_name.clone());
            move || datapath::attach(&bpffs, FROM_POD_PROGRAM, &name)
        });
        let configured = configure_ends(netns, host, &attachment.ifname, &host_link, pod_ip).await;
        let attached = attach.await.context("attaching from_pod")?;
        let pod_link = configured?;
        attached?;

        let record = EndpointRecord {
            container_id: attachment.container_id.clone(),
            ifname: attachment.ifname.clone(),
            netns: self.env.netns.clone().unwrap_or_default(),
            network: self.conf.name.clone(),
            ip,
            host_ifname: host_name.clone(),
            host_ifindex: host_link.index,
            host_mac: format_mac(&host_link.mac),
            pod_mac: format_mac(&pod_link.mac),
        };
        {
            let _lock = self.store.lock()?;
            self.store.write(&record)?;
            maps.put(ip, record.endpoint())?;
        }
        log::info!("added {ip} on {host_name} (ifindex {})", host_link.index);

        Ok(CniResult {
            interfaces: vec![
                Interface {
                    name: host_name,
                    mac: record.host_mac,
                    mtu: Some(mtu),
                    sandbox: String::new(),
                },
                Interface {
                    name: attachment.ifname.clone(),
                    mac: record.pod_mac,
                    mtu: Some(mtu),
                    sandbox: record.netns.display().to_string(),
                },
            ],
            ips: vec![IpConfig {
                address: pod_ip,
                gateway: Some(GATEWAY),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse()?,
                gw: Some(GATEWAY),
            }],
            dns: self.conf.dns.clone().unwrap_or_default(),
        })
    }

    /// An earlier plugin's result comes first; ours is appended to it.
    fn chain(&self, ours: CniResult) -> anyhow::Result<CniResult> {
        match &self.conf.prev_result {
            Some(prev) => {
                let mut chained = CniResult::parse(prev)?;
                chained.extend(ours);
                Ok(chained)
            }
            None => Ok(ours),
        }
    }

    async fn del(&self) -> anyhow::Result<()> {
        let host = Netlink::connect()?;
        // Without the loader's maps DEL still frees everything else; the loader drops
        // map entries that have no record when it comes back.
        let mut maps = Maps::open(&self.bpffs)
            .map_err(|e| log::warn!("DEL without endpoint map: {e:#}"))
            .ok();
        self.teardown(&self.attachment(), &host, maps.as_mut(), Some(&self.ipam()?))
            .await
    }

    /// Removes whatever exists of an attachment, keeps going past failures, and
    /// removes the record last so a retry still knows what to clean.
    async fn teardown(
        &self,
        attachment: &Attachment,
        host: &Netlink,
        maps: Option<&mut Maps>,
        ipam: Option<&Ipam>,
    ) -> anyhow::Result<()> {
        let host_name = host_ifname(attachment);
        let mut errors: Vec<anyhow::Error> = Vec::new();
        let record = self.store.get(attachment).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        if let (Some(record), Some(maps)) = (&record, maps) {
            let removed = self
                .store
                .lock()
                .and_then(|_lock| maps.remove(record.ip, record.host_ifindex));
            errors.extend(removed.err());
        }
        // Deleting the veth detaches the TCX link in the same step; unpinning a live
        // link first would cost a second RCU grace period under the rtnl lock.
        errors.extend(host.delete_link(&host_name).await.err());
        errors.extend(datapath::detach(&self.bpffs, &host_name).err());
        if let Some(ipam) = ipam {
            errors.extend(ipam.release(attachment).err());
        }
        if errors.is_empty() {
            return self.store.remove(attachment);
        }
        let joined: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        fail(
            Code::Datapath,
            format!("tearing down {host_name}: {}", joined.join("; ")),
        )
    }

    async fn check(&self) -> anyhow::Result<()> {
        self.version.require("CHECK", CniVersion::V0_4_0)?;
        let attachment = self.attachment();
        let Some(prev) = &self.conf.prev_result else {
            return fail(Code::InvalidConfig, "CHECK needs the prevResult of ADD");
        };
        let prev = CniResult::parse(prev)?;
        let Some(record) = self.store.get(&attachment)? else {
            return fail(
                Code::UnknownContainer,
                format!(
                    "no velox endpoint for container {} {}",
                    attachment.container_id, attachment.ifname
                ),
            );
        };
        let ip = record.ip;
        let broken = |what: String| fail::<()>(Code::Datapath, format!("CHECK of {ip}: {what}"));
        if !prev.ips.iter().any(|c| c.address.addr() == ip) {
            return broken(format!("prevResult does not hold {ip}"));
        }
        let host = Netlink::connect()?;
        match host.link(&record.host_ifname).await? {
            Some(link) if link.index == record.host_ifindex => {}
            _ => return broken(format!("host veth {} is missing or was replaced", record.host_ifname)),
        }
        if !self.bpffs.link(&record.host_ifname).exists() {
            return broken(format!("from_pod is not attached to {}", record.host_ifname));
        }
        if Maps::open(&self.bpffs)?.get(ip)? != Some(record.endpoint()) {
            return broken("the endpoint map entry is missing or wrong".into());
        }
        let pod = Netlink::connect_in(&self.open_netns()?)?;
        let Some(pod_link) = pod.link(&attachment.ifname).await? else {
            return broken(format!("{} is missing in the pod", attachment.ifname));
        };
        if !pod.addresses(pod_link.index).await?.contains(&Ipv4Net::new(ip, 32)?) {
            return broken(format!("{} lost its address {ip}/32", attachment.ifname));
        }
        let default_route = pod.routes().await?.into_iter().any(|route| {
            route.dst.prefix_len() == 0 && route.gateway == Some(GATEWAY) && route.oif == Some(pod_link.index)
        });
        if !default_route {
            return broken(format!("the pod has no default route via {GATEWAY}"));
        }
        self.ipam()?.check(&attachment, ip)
    }

    async fn gc(&self) -> anyhow::Result<()> {
        self.version.require("GC", CniVersion::V1_1_0)?;
        let valid: HashSet<Attachment> = self.conf.valid_attachments.iter().flatten().cloned().collect();
        let host = Netlink::connect()?;
        let mut maps = Maps::open(&self.bpffs).ok();
        let ipam = self.ipam()?;
        let mut errors = Vec::new();
        for record in self.store.list()? {
            let attachment = record.attachment();
            if record.network == self.conf.name && !valid.contains(&attachment) {
                log::info!("GC: removing stale endpoint {} ({})", record.ip, record.container_id);
                // Addresses are released in one pass below.
                errors.extend(self.teardown(&attachment, &host, maps.as_mut(), None).await.err());
            }
        }
        errors.extend(ipam.gc(&valid).err());
        match errors.first() {
            None => Ok(()),
            Some(_) => {
                let joined: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
                fail(Code::Datapath, format!("GC: {}", joined.join("; ")))
            }
        }
    }

    fn status(&self) -> anyhow::Result<()> {
        self.version.require("STATUS", CniVersion::V1_1_0)?;
        let socket = health_socket(&self.conf.state_dir);
        let not_available = |why: String| {
            fail::<()>(
                Code::PluginNotAvailable,
                format!("velox-loader is not available ({why}); start velox-loader run"),
            )
        };
        let answer = UnixStream::connect(&socket).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        });
        match answer {
            Ok(answer) if serde_json::from_str::<Value>(&answer).is_ok_and(|v| v["ready"] == true) => Ok(()),
            Ok(answer) => not_available(format!("it answered {answer:?}")),
            Err(e) => not_available(format!("{}: {e}", socket.display())),
        }
    }
}
