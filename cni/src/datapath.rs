//! The loader's pinned BPF objects, as the plugin and the operator CLI use them.
//! Nothing here loads a program: the loader owns loading and pinning.

use anyhow::Context;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use velox_common::{Endpoint, EndpointCounters, EndpointKey, Peer, COUNTERS_MAP, ENDPOINTS_MAP, PEERS_MAP};

use crate::error::{CniError, Code};

/// Where everything lives under the bpffs root (`bpffsRoot`).
#[derive(Clone, Debug)]
pub struct Bpffs {
    pub root: PathBuf,
}

impl Bpffs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directories the loader creates: maps, programs, links.
    pub fn dirs(&self) -> [PathBuf; 3] {
        [self.root.join("maps"), self.root.join("programs"), self.links_dir()]
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join("programs").join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pinned TCX link of the Velox program on an interface.
    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links_dir().join(ifname)
    }
}

fn open_map(path: &Path) -> anyhow::Result<Map> {
    let data = MapData::from_pin(path).map_err(|e| {
        CniError::new(
            Code::TryAgainLater,
            format!(
                "velox-loader is not ready: cannot open {} ({e}); is velox-loader running?",
                path.display()
            ),
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// The endpoint map and its counters.
pub struct Maps {
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    counters: PerCpuHashMap<MapData, u32, EndpointCounters>,
}

fn key(ip: Ipv4Addr) -> EndpointKey {
    EndpointKey { ipv4: ip.octets() }
}

fn ignore_missing(result: Result<(), MapError>) -> anyhow::Result<()> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}

impl Maps {
    pub fn open(bpffs: &Bpffs) -> anyhow::Result<Self> {
        Ok(Self {
            endpoints: open_map(&bpffs.map(ENDPOINTS_MAP))?.try_into()?,
            counters: open_map(&bpffs.map(COUNTERS_MAP))?.try_into()?,
        })
    }

    pub fn put(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> anyhow::Result<()> {
        self.endpoints
            .insert(key(ip), endpoint, 0)
            .with_context(|| format!("adding {ip} to the endpoint map"))
    }

    pub fn get(&self, ip: Ipv4Addr) -> anyhow::Result<Option<Endpoint>> {
        match self.endpoints.get(&key(ip), 0) {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the endpoint map"),
        }
    }

    /// Removes the entry of `ip` and the counters of its interface; absent is fine.
    pub fn remove(&mut self, ip: Ipv4Addr, ifindex: u32) -> anyhow::Result<()> {
        ignore_missing(self.endpoints.remove(&key(ip)))
            .with_context(|| format!("removing {ip} from the endpoint map"))?;
        ignore_missing(self.counters.remove(&ifindex)).context("removing counters")
    }

    pub fn entries(&self) -> anyhow::Result<Vec<(Ipv4Addr, Endpoint)>> {
        self.endpoints
            .iter()
            .map(|entry| entry.map(|(k, v)| (Ipv4Addr::from(k.ipv4), v)))
            .collect::<Result<_, _>>()
            .context("reading the endpoint map")
    }

    /// The counters of a host veth, summed over CPUs.
    pub fn counters(&self, ifindex: u32) -> anyhow::Result<EndpointCounters> {
        let mut total = EndpointCounters::default();
        match self.counters.get(&ifindex, 0) {
            Ok(per_cpu) => per_cpu.iter().for_each(|c| total.add(c)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("reading counters"),
        }
        Ok(total)
    }

    /// Interfaces that have counters (to find ones whose endpoint is gone).
    pub fn counter_ifindexes(&self) -> anyhow::Result<Vec<u32>> {
        self.counters
            .keys()
            .collect::<Result<_, _>>()
            .context("reading counters")
    }

    pub fn remove_counters(&mut self, ifindex: u32) -> anyhow::Result<()> {
        ignore_missing(self.counters.remove(&ifindex))
    }
}

/// Other nodes' pod CIDRs and how to reach them (the loader's, from the peers file).
pub struct PeerMap {
    peers: LpmTrie<MapData, [u8; 4], Peer>,
}

impl PeerMap {
    pub fn open(bpffs: &Bpffs) -> anyhow::Result<Self> {
        Ok(Self {
            peers: open_map(&bpffs.map(PEERS_MAP))?.try_into()?,
        })
    }

    pub fn entries(&self) -> anyhow::Result<Vec<(Ipv4Net, Peer)>> {
        let mut out = Vec::new();
        for entry in self.peers.iter() {
            let (key, peer) = entry.context("reading the peer map")?;
            out.push((Ipv4Net::new(key.data().into(), key.prefix_len() as u8)?, peer));
        }
        Ok(out)
    }

    pub fn put(&mut self, cidr: Ipv4Net, peer: Peer) -> anyhow::Result<()> {
        let key = Key::new(cidr.prefix_len().into(), cidr.network().octets());
        self.peers
            .insert(&key, peer, 0)
            .with_context(|| format!("adding {cidr} to the peer map"))
    }

    pub fn remove(&mut self, cidr: Ipv4Net) -> anyhow::Result<()> {
        let key = Key::new(cidr.prefix_len().into(), cidr.network().octets());
        ignore_missing(self.peers.remove(&key)).with_context(|| format!("removing {cidr} from the peer map"))
    }
}

/// Attaches the pinned `program` to the ingress of `ifname` (TCX) and pins the link,
/// so the attachment outlives this process.
pub fn attach(bpffs: &Bpffs, program: &str, ifname: &str) -> anyhow::Result<()> {
    let program_pin = bpffs.program(program);
    let mut classifier = SchedClassifier::from_pin(&program_pin).map_err(|e| {
        CniError::new(
            Code::TryAgainLater,
            format!("velox-loader is not ready: cannot open {} ({e})", program_pin.display()),
        )
    })?;
    let link_id = classifier
        .attach(ifname, TcAttachType::Ingress)
        .with_context(|| format!("attaching {program} to {ifname}"))?;
    let link: FdLink = classifier.take_link(link_id)?.try_into().context("TCX link expected")?;
    crate::create_private_dir(&bpffs.links_dir())?;
    link.pin(bpffs.link(ifname))
        .with_context(|| format!("pinning the link of {ifname}"))?;
    Ok(())
}

/// Removes the pinned link; the kernel detaches the program when the pin goes (or
/// already did, when the interface went away).
pub fn detach(bpffs: &Bpffs, ifname: &str) -> anyhow::Result<()> {
    match std::fs::remove_file(bpffs.link(ifname)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpinning the link of {ifname}"))
        }
        _ => Ok(()),
    }
}
