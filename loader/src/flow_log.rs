//! Flow records: every packet the datapath drops, every connection's start and end,
//! a long flow's progress with its counts, and each translation to a Service's
//! backend, with its ends, their pods, the interface, the deciding policies and the
//! Service, kept by the loader in a bounded ring (`--flow-records`) so they can be
//! asked for after the fact (`velox-loader flows`), and followed as they come
//! (`velox-loader flows --follow`, `velox-loader monitor`).
//!
//! The loader is the one reader of the datapath's event ring. The programs write
//! events while the loader keeps a deadline ahead of them: always with records on,
//! only while someone follows with them off (`--flow-records 0`); within seconds of
//! a loader that stopped, they write none. An event the programs did not write (their
//! ring full, its source over its limit) is counted in `VELOX_EVENTS_LOST`, and every
//! answer says how many: a gap is never silent.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use velox_common::{
    DropReason, FlowEvent, DROP_POLICY_EGRESS, DROP_POLICY_INGRESS, EVENTS_LIMITED, EVENTS_PER_SOURCE,
    EVENTS_RING_FULL, FLOW_ACTIVE, FLOW_STARTED, FORWARDED, IPPROTO_TCP, KERNEL_DROP, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN, TRANSLATED, VERDICT_ALLOWED,
};
use velox_node::endpoint::EndpointStore;
use velox_node::maps::FlowEvents;
use velox_node::{Bpffs, StateDir};

use crate::metrics::{lock, Metrics};
use crate::names::{protocol_name, socket_address, PolicyNames, ServiceNames};

/// Records kept when the loader is not told (`--flow-records`): a few megabytes.
pub const DEFAULT_RECORDS: usize = 16_384;
/// The size at which the export file (`--flow-records-file`) moves to `<file>.1`.
const EXPORT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// How often the collector drains the datapath's ring.
const POLL: Duration = Duration::from_millis(50);
/// Records a follower may fall behind by before it is told it lost some.
const FOLLOWER_QUEUE: usize = 4096;
/// Clients served at once; one more is closed at once.
const MAX_CLIENTS: usize = 16;
/// How long a client has to send its request line, and how long it is.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: u64 = 4096;
/// How long a write to a client may wait for it to read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How far ahead the collector keeps the programs writing events, and how often it
/// renews that.
const LISTEN_AHEAD: Duration = Duration::from_secs(10);
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// One drop, connection event or translation, as `flows` and `monitor` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// When the loader read it (within a poll, 50 ms, of the packet), RFC 3339.
    pub time: String,
    /// The same, in milliseconds since the epoch.
    pub unix_ms: u64,
    /// `dropped`; `allowed` for a new connection a policy rule let through;
    /// `forwarded` for a connection's start, end or progress no policy decided;
    /// `translated` for a connection sent to a Service's backend.
    pub verdict: String,
    /// The drop reason's name in the drop-reason table, `kernel:NAME` for the
    /// kernel's; `policy` for an allowed connection; the TCP flags, `echo`,
    /// `started` or `active` for a forwarded one; `service` for a translation.
    pub reason: String,
    pub protocol: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The cluster's names of the ends (`namespace/name`), when they are pods, and
    /// their nodes.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    pub src_node: Option<String>,
    pub dst_node: Option<String>,
    pub ifname: String,
    /// The container behind the interface, when it is a pod's.
    pub pod: Option<String>,
    /// What decided: the policies whose rules allowed it, or for a denial the
    /// policies that select the pod and of which no rule allows it.
    pub policies: Vec<String>,
    /// For a connection to a Service (the translation, and the records of its
    /// packets): the Service (`namespace/name`) and the frontend the client asked
    /// for; `dst` (or `src`, for a reply) is the backend.
    pub service: Option<String>,
    pub frontend: Option<SocketAddr>,
    /// This direction's packets and bytes so far, for a flow this node counts.
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// A drop's reason as the drop-reason table names it; `policy` for a connection a
/// policy rule allowed; the TCP flags (`SYN`, `FIN,ACK`) or `echo` of a packet that
/// opened or ended a connection; `started` for a flow's first packet that shows no
/// start, `active` for a flow's progress; `service` for a translation;
/// `kernel:NAME` for a drop the kernel made.
fn reason(code: u32, proto: u8) -> String {
    match DropReason::of(code) {
        Some(reason) => reason.name.into(),
        None if code == VERDICT_ALLOWED => "policy".into(),
        None if code == TRANSLATED => "service".into(),
        None if forwarded(code) && code & FLOW_STARTED != 0 => "started".into(),
        None if forwarded(code) && code & FLOW_ACTIVE != 0 => "active".into(),
        None if forwarded(code) => match proto {
            IPPROTO_TCP => {
                let flags = [(TCP_SYN, "SYN"), (TCP_FIN, "FIN"), (TCP_RST, "RST"), (TCP_ACK, "ACK")];
                let set: Vec<&str> = flags
                    .iter()
                    .filter(|(bit, _)| code & u32::from(*bit) != 0)
                    .map(|(_, name)| *name)
                    .collect();
                set.join(",")
            }
            _ => "echo".into(),
        },
        None => crate::kernel_drops::reason_name(code).unwrap_or_else(|| "unknown".into()),
    }
}

/// Whether an event's code is a delivered packet that opened or ended a connection
/// (its flag bit, and not the kernel's drop bit above it).
fn forwarded(code: u32) -> bool {
    code & FORWARDED != 0 && code & KERNEL_DROP == 0
}

/// Whether an event's packet opened its connection: a SYN, a flow's first packet,
/// or a new connection a policy allowed.
fn opens(code: u32) -> bool {
    // The TCP flags are the low byte: a SYN alone, not a SYN-ACK.
    let syn = u32::from(TCP_SYN);
    code == VERDICT_ALLOWED || (forwarded(code) && (code & 0xff == syn || code & FLOW_STARTED != 0))
}

/// `allowed` by a policy, `forwarded` (no policy decided), `translated` (to a
/// Service's backend), or `dropped`.
fn verdict(code: u32) -> &'static str {
    match code {
        VERDICT_ALLOWED => "allowed",
        TRANSLATED => "translated",
        _ if forwarded(code) => "forwarded",
        _ => "dropped",
    }
}

impl Record {
    fn new(event: &FlowEvent, naming: &Naming, at: SystemTime) -> Self {
        let names = &naming.policies;
        let ifname = match event.ifindex {
            0 => "socket".into(),
            ifindex => nix::net::if_::if_indextoname(ifindex)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|_| ifindex.to_string()),
        };
        let (mut src, dst) = (socket_address(&event.src), socket_address(&event.dst));
        // A socket's translation: its client is the pod of that network namespace,
        // by its address of the backend's family (the node's sockets have none here).
        if event.reason == TRANSLATED && event.netns != 0 {
            let of_family = |ip: &&IpAddr| ip.is_ipv4() == dst.is_ipv4();
            if let Some(ip) = naming
                .netns
                .get(&event.netns)
                .and_then(|ips| ips.iter().find(of_family))
            {
                src.set_ip(*ip);
            }
        }
        let translation = (event.reason == TRANSLATED).then(|| Translation {
            service: naming.services.of(event.src.proto, socket_address(&event.frontend)),
            frontend: socket_address(&event.frontend),
        });
        let counted = event.packets > 0;
        let selecting = |ip: IpAddr| names.selected_by.get(&ip).cloned().unwrap_or_default();
        let policies = match event.reason {
            VERDICT_ALLOWED => [event.egress_policy, event.ingress_policy]
                .into_iter()
                .filter_map(|id| names.policy(id))
                .collect(),
            DROP_POLICY_EGRESS => selecting(src.ip()),
            DROP_POLICY_INGRESS => selecting(dst.ip()),
            _ => Vec::new(),
        };
        Record {
            time: humantime::format_rfc3339_millis(at).to_string(),
            unix_ms: unix_ms(at),
            verdict: verdict(event.reason).into(),
            reason: reason(event.reason, event.src.proto),
            protocol: protocol_name(event.src.proto).to_uppercase(),
            src,
            dst,
            src_pod: names.pods.get(&src.ip()).cloned(),
            dst_pod: names.pods.get(&dst.ip()).cloned(),
            src_node: names.nodes.get(&src.ip()).cloned(),
            dst_node: names.nodes.get(&dst.ip()).cloned(),
            ifname,
            pod: naming.containers.get(&event.ifindex).cloned(),
            policies,
            service: translation.as_ref().and_then(|t| t.service.clone()),
            frontend: translation.map(|t| t.frontend),
            packets: counted.then_some(event.packets),
            bytes: counted.then_some(event.bytes),
        }
    }

    fn line(&self) -> String {
        let end = |addr: &SocketAddr, pod: &Option<String>| match pod {
            Some(pod) => format!("{addr} ({pod})"),
            None => addr.to_string(),
        };
        let decided = match (self.verdict.as_str(), self.policies.is_empty()) {
            (_, true) => String::new(),
            ("allowed", false) => format!(" by {}", self.policies.join(", ")),
            _ => format!(" by {} (no rule allows it)", self.policies.join(", ")),
        };
        let service = match (&self.service, self.frontend) {
            (Some(service), Some(frontend)) => format!(" via {service} ({frontend})"),
            (None, Some(frontend)) => format!(" via {frontend}"),
            _ => String::new(),
        };
        let counts = match (self.packets, self.bytes) {
            (Some(packets), Some(bytes)) => format!(" [{packets} packets, {bytes} bytes]"),
            _ => String::new(),
        };
        format!(
            "{} {} {:<15} {} {} -> {}{service} on {}{}{decided}{counts}",
            self.time,
            match self.verdict.as_str() {
                "allowed" => "ALLOW",
                "forwarded" => "FWD  ",
                "translated" => "XLATE",
                _ => "DROP ",
            },
            self.reason,
            self.protocol,
            end(&self.src, &self.src_pod),
            end(&self.dst, &self.dst_pod),
            self.ifname,
            self.pod
                .as_ref()
                .map(|p| format!(" (container {p})"))
                .unwrap_or_default()
        )
    }

    /// Whether `pod` (`namespace/name`) is either end.
    fn involves(&self, pod: &str) -> bool {
        self.src_pod.as_deref() == Some(pod) || self.dst_pod.as_deref() == Some(pod)
    }
}

/// A connection's Service, as its translation told.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Translation {
    service: Option<String>,
    frontend: SocketAddr,
}

/// Translations kept waiting for their connection's first packet, and connections
/// named: as many of each as this, the oldest let go first.
const TRANSLATIONS: usize = 16_384;
/// How long a translation waits for its connection's first packet (it comes within
/// a moment of the connect).
const TRANSLATION_WAITS: Duration = Duration::from_secs(5);

/// Which connections went to a Service through the socket load balancer. A
/// translation comes before its connection's first packet (the socket's connect or
/// first datagram): it waits, by client address, backend and protocol, for the
/// first record of a connection between them that opens it, which takes it, or for
/// [`TRANSLATION_WAITS`]. The connection's later records (either direction) are then
/// named by its ends. A connection of the same client straight to the backend takes
/// none. (The NAT's translations name their Service in their own record: its
/// packets' records carry the masquerading node's address.)
#[derive(Default)]
struct Translations {
    waiting: HashMap<(IpAddr, SocketAddr, u8), VecDeque<Waiting>>,
    /// Every waiting translation's key and number, oldest first.
    waiting_order: VecDeque<((IpAddr, SocketAddr, u8), u64)>,
    next: u64,
    named: HashMap<(SocketAddr, SocketAddr, u8), Translation>,
    named_order: VecDeque<(SocketAddr, SocketAddr, u8)>,
}

struct Waiting {
    number: u64,
    since: Instant,
    translation: Translation,
}

impl Translations {
    /// A socket's translation record: its connection's first packet is still to come.
    fn wait(&mut self, record: &Record, proto: u8) {
        let Some(frontend) = record.frontend else {
            return;
        };
        if record.src.ip().is_unspecified() {
            return;
        }
        let key = (record.src.ip(), record.dst, proto);
        let number = self.next;
        self.next += 1;
        self.waiting.entry(key).or_default().push_back(Waiting {
            number,
            since: Instant::now(),
            translation: Translation {
                service: record.service.clone(),
                frontend,
            },
        });
        self.waiting_order.push_back((key, number));
        // The oldest go when they are too many, or waited too long.
        while let Some(&(oldest, number)) = self.waiting_order.front() {
            let queue = self.waiting.get_mut(&oldest);
            let expired = queue
                .as_ref()
                .and_then(|queue| queue.iter().find(|w| w.number == number))
                .is_none_or(|w| w.since.elapsed() > TRANSLATION_WAITS);
            if self.waiting_order.len() <= TRANSLATIONS && !expired {
                break;
            }
            self.waiting_order.pop_front();
            if let Some(queue) = queue {
                queue.retain(|w| w.number != number);
                if queue.is_empty() {
                    self.waiting.remove(&oldest);
                }
            }
        }
    }

    /// Names `record`'s connection if it went to a Service; a record that `opens`
    /// one takes the oldest translation waiting for its ends.
    fn name(&mut self, record: &mut Record, proto: u8, opens: bool) {
        let (src, dst) = (record.src, record.dst);
        let mut found = self
            .named
            .get(&(src, dst, proto))
            .or_else(|| self.named.get(&(dst, src, proto)))
            .cloned();
        if found.is_none() && opens {
            let key = (src.ip(), dst, proto);
            if let Some(queue) = self.waiting.get_mut(&key) {
                queue.retain(|w| w.since.elapsed() <= TRANSLATION_WAITS);
                found = queue.pop_front().map(|w| w.translation);
                if queue.is_empty() {
                    self.waiting.remove(&key);
                }
            }
            if let Some(translation) = &found {
                self.named.insert((src, dst, proto), translation.clone());
                self.named_order.push_back((src, dst, proto));
                if self.named_order.len() > TRANSLATIONS {
                    if let Some(oldest) = self.named_order.pop_front() {
                        self.named.remove(&oldest);
                    }
                }
            }
        }
        if let Some(translation) = found {
            record.service = translation.service;
            record.frontend = Some(translation.frontend);
        }
    }
}

/// What the collector names the events' numbers with.
#[derive(Default)]
struct Naming {
    policies: PolicyNames,
    services: ServiceNames,
    /// The container behind each host veth, by ifindex.
    containers: HashMap<u32, String>,
    /// Each pod's addresses by its network namespace's cookie: the socket load
    /// balancer's clients.
    netns: HashMap<u64, Vec<IpAddr>>,
    /// The cookies found so far, by network namespace path (each is read in the
    /// namespace once; one that could not be read is tried again).
    cookies: HashMap<PathBuf, u64>,
    /// The node's own network namespace: its sockets are no pod's.
    host_netns: Option<u64>,
    translations: Translations,
}

impl Naming {
    /// The node's pods as their endpoint records say now.
    fn read_endpoints(&mut self, store: &EndpointStore) {
        let records = store.list().unwrap_or_default();
        self.containers = records
            .iter()
            .map(|r| (r.host_ifindex, format!("{} {}", r.container_id, r.ifname)))
            .collect();
        self.cookies.retain(|path, _| records.iter().any(|r| &r.netns == path));
        self.netns.clear();
        for record in &records {
            let cookie = match self.cookies.get(&record.netns) {
                Some(cookie) => Some(*cookie),
                None => netns_cookie(&record.netns),
            };
            if let Some(cookie) = cookie {
                self.cookies.insert(record.netns.clone(), cookie);
                self.netns.entry(cookie).or_default().extend(record.ips.iter().copied());
            }
        }
    }

    /// Whether an event comes from an interface or a network namespace not looked
    /// up yet: a pod newer than the last look.
    fn unknown(&self, event: &FlowEvent) -> bool {
        match event.netns {
            0 => event.ifindex != 0 && !self.containers.contains_key(&event.ifindex),
            netns => Some(netns) != self.host_netns && !self.netns.contains_key(&netns),
        }
    }
}

/// The cookie of the network namespace at `path` (an endpoint record's), read
/// inside it.
fn netns_cookie(path: &Path) -> Option<u64> {
    velox_node::netlink::netns_cookie(&open_netns(path)?).ok()
}

/// The network namespace at `path`, if that is one. Looked at first without opening
/// it (`O_PATH`: a FIFO or a device put there is neither waited on nor woken), and
/// opened only once it is nsfs, through that same descriptor.
fn open_netns(path: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let found = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open(path)
        .ok()?;
    let is_nsfs =
        nix::sys::statfs::fstatfs(&found).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
    is_nsfs.then_some(())?;
    std::fs::File::open(format!("/proc/thread-self/fd/{}", found.as_raw_fd())).ok()
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// What an answer starts with: how much of the story the records tell.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Status {
    /// Records the ring holds, and at most.
    kept: usize,
    capacity: usize,
    /// Events the datapath could not write (its ring was full) since the maps were
    /// made: those drops and connections have no record.
    lost_in_datapath: u64,
    /// Events over their source address's limit (`EVENTS_PER_SOURCE` a second):
    /// counted, not recorded.
    limited_in_datapath: u64,
    /// Records the ring let go to make room for newer ones since the loader started.
    pushed_out: u64,
}

/// A request: the kept records since `since_ms` (all without it), then with
/// `follow` every new one as it comes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Request {
    since_ms: Option<u64>,
    follow: bool,
}

/// One line of an answer after the status: a record, or a note that a slow
/// follower missed some.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Record(Box<Record>),
    Missed(u64),
}

/// The ring, and the followers new records go to.
pub struct FlowLog {
    capacity: usize,
    inner: Mutex<Kept>,
    /// Followers still connected (a gone one stays in `Kept` until the next record).
    following: AtomicUsize,
}

#[derive(Default)]
struct Kept {
    records: VecDeque<Record>,
    pushed_out: u64,
    lost_in_datapath: u64,
    limited_in_datapath: u64,
    followers: Vec<Follower>,
}

struct Follower {
    to: SyncSender<Line>,
    missed: u64,
}

impl FlowLog {
    /// Starts the collector (the one reader of the datapath's events) and the server
    /// of `flows.sock`, each on a thread of its own.
    /// With `export`, every record is also appended to that file as a JSON line.
    pub fn start(
        bpffs: &Bpffs,
        state_dir: &StateDir,
        capacity: usize,
        export: Option<PathBuf>,
        metrics: Metrics,
    ) -> anyhow::Result<()> {
        let mut export = export.map(JsonLines::open).transpose()?;
        let mut events = FlowEvents::open(bpffs)?;
        // What an earlier loader (or monitor) asked for ends now; the collector asks
        // again if it wants events.
        events.stop_listening()?;
        let log = Arc::new(FlowLog {
            capacity,
            inner: Mutex::default(),
            following: AtomicUsize::new(0),
        });
        let listener = bind_private(&state_dir.flows_socket())?;
        let collector = (Arc::clone(&log), state_dir.clone());
        std::thread::Builder::new()
            .name("flow-records".into())
            .spawn(move || collect(&collector.0, events, &collector.1, export.as_mut(), &metrics))?;
        std::thread::Builder::new()
            .name("flows-socket".into())
            .spawn(move || serve(&log, listener))?;
        Ok(())
    }

    /// What `kept` (the locked ring) tells of itself.
    fn status(&self, kept: &Kept) -> Status {
        Status {
            kept: kept.records.len(),
            capacity: self.capacity,
            lost_in_datapath: kept.lost_in_datapath,
            limited_in_datapath: kept.limited_in_datapath,
            pushed_out: kept.pushed_out,
        }
    }

    fn keep(&self, record: Record) {
        let mut kept = lock(&self.inner);
        kept.followers.retain_mut(|follower| {
            if follower.missed > 0 {
                match follower.to.try_send(Line::Missed(follower.missed)) {
                    Ok(()) => follower.missed = 0,
                    Err(TrySendError::Full(_)) => {}
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            match follower.to.try_send(Line::Record(Box::new(record.clone()))) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    follower.missed += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        if self.capacity == 0 {
            return;
        }
        if kept.records.len() == self.capacity {
            kept.records.pop_front();
            kept.pushed_out += 1;
        }
        kept.records.push_back(record);
    }

    fn following(&self) -> bool {
        self.following.load(Ordering::SeqCst) > 0
    }
}

/// Drains the datapath's events into the ring, naming what they hold.
fn collect(
    log: &FlowLog,
    mut events: FlowEvents,
    state_dir: &StateDir,
    mut export: Option<&mut JsonLines>,
    metrics: &Metrics,
) {
    let store = EndpointStore::new(state_dir);
    let mut naming = Naming {
        host_netns: netns_cookie(Path::new("/proc/self/ns/net")),
        ..Naming::default()
    };
    let mut pods_read = Instant::now();
    let mut names_read = None;
    let mut service_names_read = None;
    let mut renewed: Option<Instant> = None;
    loop {
        if renewed.is_none_or(|at| at.elapsed() >= RENEW_EVERY) {
            renewed = Some(Instant::now());
            if log.capacity > 0 || export.is_some() || log.following() {
                let ahead = monotonic_ns().map(|now| now + LISTEN_AHEAD.as_nanos() as u64);
                if let Err(e) = ahead
                    .map_err(anyhow::Error::from)
                    .and_then(|until| Ok(events.listen_until(until)?))
                {
                    log::warn!("keeping the datapath's events on: {e:#}");
                }
            }
            naming.read_endpoints(&store);
            pods_read = Instant::now();
            match events
                .lost(EVENTS_RING_FULL)
                .and_then(|full| Ok((full, events.lost(EVENTS_LIMITED)?)))
            {
                Ok((lost, limited)) => {
                    let mut kept = lock(&log.inner);
                    metrics
                        .flow_records_lost
                        .inc_by(lost.saturating_sub(kept.lost_in_datapath));
                    metrics
                        .flow_records_limited
                        .inc_by(limited.saturating_sub(kept.limited_in_datapath));
                    kept.lost_in_datapath = kept.lost_in_datapath.max(lost);
                    kept.limited_in_datapath = kept.limited_in_datapath.max(limited);
                }
                Err(e) => log::warn!("reading the datapath's lost events: {e}"),
            }
            metrics.flow_records_kept.set(lock(&log.inner).records.len() as i64);
        }
        // The loader rewrites the names as policies and pods change: the records of a
        // new policy must name it.
        let written = |path: PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let names_written = written(state_dir.policy_names());
        if names_written != names_read {
            naming.policies = PolicyNames::read(state_dir);
            names_read = names_written;
        }
        let service_names_written = written(state_dir.service_names());
        if service_names_written != service_names_read {
            naming.services = ServiceNames::read(state_dir);
            service_names_read = service_names_written;
        }
        while let Some(event) = events.next_event() {
            // A pod newer than the last look: its records name it too (a look at most
            // every 100 ms, as an interface or a namespace no pod has would ask each
            // time).
            if naming.unknown(&event) && pods_read.elapsed() >= Duration::from_millis(100) {
                naming.read_endpoints(&store);
                pods_read = Instant::now();
            }
            let mut record = Record::new(&event, &naming, SystemTime::now());
            match event.reason {
                TRANSLATED if event.netns != 0 => naming.translations.wait(&record, event.src.proto),
                TRANSLATED => {}
                code => naming.translations.name(&mut record, event.src.proto, opens(code)),
            }
            if let Some(export) = export.as_deref_mut() {
                export.append(&record);
            }
            log.keep(record);
        }
        std::thread::sleep(POLL);
    }
}

/// The export file a log shipper tails: one JSON record per line, moved to
/// `<file>.1` (the one before goes) when it reaches 64 MiB.
struct JsonLines {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
    /// A write failed and was logged: the next failures are not.
    failing: bool,
}

impl JsonLines {
    fn open(path: PathBuf) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(velox_node::layout::PRIVATE_FILE_MODE)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            file: std::io::BufWriter::new(file),
            written,
            failing: false,
        })
    }

    fn append(&mut self, record: &Record) {
        let outcome = (|| -> anyhow::Result<()> {
            if self.written >= EXPORT_ROTATE_BYTES {
                self.file.flush()?;
                let mut older = self.path.clone().into_os_string();
                older.push(".1");
                std::fs::rename(&self.path, older)?;
                *self = Self::open(self.path.clone())?;
            }
            let mut line = serde_json::to_vec(record)?;
            line.push(b'\n');
            self.file.write_all(&line)?;
            // A shipper reads whole lines as they come.
            self.file.flush()?;
            self.written += line.len() as u64;
            Ok(())
        })();
        match outcome {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                log::error!("writing flow records to {}: {e:#}", self.path.display());
                self.failing = true;
            }
            Err(_) => {}
        }
    }
}

/// A unix socket only root reaches, in place of one a loader before left.
pub fn bind_private(socket: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    velox_node::fs::remove_if_exists(socket)?;
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(
        socket,
        std::fs::Permissions::from_mode(velox_node::layout::PRIVATE_FILE_MODE),
    )?;
    Ok(listener)
}

fn serve(log: &Arc<FlowLog>, listener: UnixListener) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, say: a moment's pause, never the end of the server.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (log, clients) = (Arc::clone(log), Arc::clone(&clients));
        let spawned = std::thread::Builder::new().name("flows-client".into()).spawn(move || {
            if let Err(e) = answer(&log, stream) {
                log::debug!("a flows client: {e:#}");
            }
            clients.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            log::warn!("serving a flows client: {e}");
        }
    }
}

fn answer(log: &FlowLog, stream: UnixStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    // A client that stops reading is let go, not waited for.
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut request = String::new();
    BufReader::new(std::io::Read::take(&stream, MAX_REQUEST)).read_line(&mut request)?;
    let request: Request = serde_json::from_str(&request).context("reading the request")?;
    let mut out = std::io::BufWriter::new(&stream);
    let since = request.since_ms.unwrap_or(0);
    // The status is taken, the kept records are copied and the follower joins under
    // one lock: the status tells of these records, no record falls between, and none
    // comes twice.
    let (status, kept, follow) = {
        let mut inner = lock(&log.inner);
        let status = log.status(&inner);
        let kept: Vec<Record> = inner.records.iter().filter(|r| r.unix_ms >= since).cloned().collect();
        let follow: Option<Receiver<Line>> = request.follow.then(|| {
            let (to, from) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
            inner.followers.push(Follower { to, missed: 0 });
            from
        });
        (status, kept, follow)
    };
    writeln!(out, "{}", serde_json::to_string(&status)?)?;
    for record in kept {
        writeln!(out, "{}", serde_json::to_string(&Line::Record(Box::new(record)))?)?;
    }
    out.flush()?;
    let Some(follow) = follow else {
        return Ok(());
    };
    log.following.fetch_add(1, Ordering::SeqCst);
    let followed = (|| -> anyhow::Result<()> {
        loop {
            match follow.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    writeln!(out, "{}", serde_json::to_string(&line)?)?;
                    out.flush()?;
                }
                // A quiet node: a follower that left must not hold its slot.
                Err(RecvTimeoutError::Timeout) if gone(&stream) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    })();
    log.following.fetch_sub(1, Ordering::SeqCst);
    followed
}

/// Whether the client closed its end: it sends nothing after its request, so a
/// read that would not block finds the end of the stream.
fn gone(stream: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let peeked = recv(
        stream.as_raw_fd(),
        &mut [0u8; 1],
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    !matches!(peeked, Err(nix::errno::Errno::EAGAIN))
}

/// What `velox-loader flows` asks for and how it shows it.
#[derive(clap::Args)]
pub struct FlowsArgs {
    /// Keep showing new records as they come, until interrupted.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Only records with this pod (`namespace/name`) at either end.
    #[arg(long)]
    pod: Option<String>,
    /// Only `dropped`, `allowed` (by a policy), `forwarded` (no policy decided) or
    /// `translated` (to a Service's backend) records.
    #[arg(long, value_parser = ["dropped", "allowed", "forwarded", "translated"])]
    verdict: Option<String>,
    /// Only records of the last while (`10m`, `1h30m`).
    #[arg(long)]
    since: Option<humantime::Duration>,
    /// A map of who talks to whom instead of records: source, destination (pod or
    /// address), port, verdict and reason, with counts.
    #[arg(long, conflicts_with = "follow")]
    summary: bool,
}

impl FlowsArgs {
    /// `velox-loader monitor`: what comes from now on, until interrupted.
    pub fn monitor(json: bool) -> Self {
        Self {
            follow: true,
            json,
            pod: None,
            verdict: None,
            since: Some(Duration::ZERO.into()),
            summary: false,
        }
    }

    fn wants(&self, record: &Record) -> bool {
        self.pod.as_deref().is_none_or(|pod| record.involves(pod))
            && self.verdict.as_deref().is_none_or(|verdict| record.verdict == verdict)
    }
}

/// `velox-loader flows`: asks the running loader for its records.
pub fn flows(state_dir: &StateDir, args: &FlowsArgs) -> anyhow::Result<()> {
    let socket = state_dir.flows_socket();
    let mut stream =
        UnixStream::connect(&socket).with_context(|| format!("asking the loader at {}", socket.display()))?;
    let since_ms = args
        .since
        .map(|since| unix_ms(SystemTime::now()).saturating_sub(Duration::from(since).as_millis() as u64));
    let request = Request {
        since_ms,
        follow: args.follow,
    };
    writeln!(stream, "{}", serde_json::to_string(&request)?)?;
    let mut lines = BufReader::new(stream).lines();
    let status: Status = serde_json::from_str(&lines.next().context("the loader did not answer")??)?;
    let mut out = std::io::stdout().lock();
    if args.follow && !args.json {
        writeln!(out, "listening for flow records (Ctrl-C stops)")?;
    }
    if args.follow && status.lost_in_datapath > 0 {
        eprintln!(
            "velox-loader flows: {} events lost in the datapath so far (its ring was full)",
            status.lost_in_datapath
        );
    }
    let mut summary: BTreeMap<(String, String, String, String), u64> = BTreeMap::new();
    let mut shown = 0;
    for line in lines {
        match serde_json::from_str::<Line>(&line?)? {
            Line::Record(record) if args.wants(&record) => {
                shown += 1;
                if args.summary {
                    let end = |pod: &Option<String>, addr: &SocketAddr| pod.clone().unwrap_or(addr.ip().to_string());
                    let destination = match &record.service {
                        Some(service) => format!("service {service}"),
                        None => end(&record.dst_pod, &record.dst),
                    };
                    let key = (
                        end(&record.src_pod, &record.src),
                        destination,
                        format!("{}/{}", record.protocol, record.frontend.unwrap_or(record.dst).port()),
                        format!("{} {}", record.verdict, record.reason),
                    );
                    *summary.entry(key).or_default() += 1;
                    continue;
                }
                match args.json {
                    true => writeln!(out, "{}", serde_json::to_string(&record)?)?,
                    false => writeln!(out, "{}", record.line())?,
                }
                out.flush()?;
            }
            Line::Record(_) => {}
            Line::Missed(count) => eprintln!("velox-loader flows: {count} records missed (this reader fell behind)"),
        }
    }
    if args.summary {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header(["SOURCE", "DESTINATION", "PORT", "VERDICT", "COUNT"]);
        for ((src, dst, port, verdict), count) in &summary {
            table.add_row([src, dst, port, verdict, &count.to_string()]);
        }
        writeln!(out, "{table}")?;
    }
    // What the records cannot show, said where a reader sees it.
    if status.lost_in_datapath > 0 || status.limited_in_datapath > 0 || status.pushed_out > 0 || !args.json {
        eprintln!(
            "{shown} records shown; the loader keeps {} of at most {}; {} events lost in the datapath (its ring \
             was full), {} events over their source's limit of {EVENTS_PER_SOURCE} a second not recorded, {} \
             records pushed out of the loader's ring by newer ones",
            status.kept, status.capacity, status.lost_in_datapath, status.limited_in_datapath, status.pushed_out
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use velox_common::FlowEnd;

    fn end(addr: &str) -> FlowEnd {
        let addr: SocketAddr = addr.parse().unwrap();
        FlowEnd {
            addr: addr.ip().into(),
            port: addr.port().to_be(),
            proto: IPPROTO_TCP,
            pad: 0,
        }
    }

    #[test]
    fn only_a_network_namespace_is_opened_as_one_and_nothing_blocks() {
        let dir = std::env::temp_dir().join(format!("velox-netns-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (fifo, plain) = (dir.join("fifo"), dir.join("plain"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(&plain, b"").unwrap();
        let paths = [PathBuf::from("/proc/self/ns/net"), fifo, plain, dir.clone()];
        let (done, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for path in paths {
                let _ = done.send(open_netns(&path).is_some());
            }
        });
        let opened: Vec<_> = (0..4)
            .map(|_| answers.recv_timeout(std::time::Duration::from_secs(2)))
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            opened,
            [Ok(true), Ok(false), Ok(false), Ok(false)],
            "own netns, a FIFO, a plain file, a directory"
        );
    }

    fn event(src: &str, dst: &str, reason: u32) -> FlowEvent {
        FlowEvent {
            src: end(src),
            dst: end(dst),
            reason,
            ..FlowEvent::default()
        }
    }

    /// The translation's record, then the connection's: its SYN takes the
    /// translation, the reply is named by the connection's ends, and the same
    /// client's next connection straight to the backend is no Service's.
    #[test]
    fn a_translation_names_the_one_connection_that_follows_it() {
        let mut naming = Naming::default();
        naming
            .services
            .frontends
            .insert("TCP 10.96.0.70:80".into(), "default/web".into());
        let mut translation = event("10.0.1.5:0", "10.0.2.7:8080", TRANSLATED);
        translation.frontend = end("10.96.0.70:80");
        let record = Record::new(&translation, &naming, SystemTime::now());
        assert_eq!(record.verdict, "translated");
        assert_eq!(record.service.as_deref(), Some("default/web"));
        naming.translations.wait(&record, IPPROTO_TCP);
        let mut named = |event: FlowEvent| {
            let mut record = Record::new(&event, &naming, SystemTime::now());
            naming.translations.name(&mut record, IPPROTO_TCP, opens(event.reason));
            (record.service, record.frontend.map(|f| f.to_string()))
        };
        let web = (Some("default/web".to_string()), Some("10.96.0.70:80".to_string()));
        let syn = FORWARDED | u32::from(TCP_SYN);
        assert_eq!(named(event("10.0.1.5:40000", "10.0.2.7:8080", syn)), web);
        let fin = FORWARDED | u32::from(TCP_FIN | TCP_ACK);
        assert_eq!(named(event("10.0.2.7:8080", "10.0.1.5:40000", fin)), web);
        assert_eq!(named(event("10.0.1.5:40002", "10.0.2.7:8080", syn)), (None, None));
    }

    #[test]
    fn reasons_and_verdicts_of_flow_progress() {
        assert_eq!(reason(FORWARDED | FLOW_STARTED, 17), "started");
        assert_eq!(reason(FORWARDED | FLOW_ACTIVE, IPPROTO_TCP), "active");
        assert_eq!(verdict(FORWARDED | FLOW_ACTIVE), "forwarded");
        assert_eq!(
            (verdict(TRANSLATED), reason(TRANSLATED, 6)),
            ("translated", "service".into())
        );
        assert!(opens(FORWARDED | FLOW_STARTED) && opens(FORWARDED | u32::from(TCP_SYN)));
        assert!(!opens(FORWARDED | u32::from(TCP_SYN | TCP_ACK)) && !opens(FORWARDED | FLOW_ACTIVE));
    }
}
