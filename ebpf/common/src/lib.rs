//! The contract between the eBPF datapath and userspace: map names, key and value
//! layouts, and the names under which the loader pins everything.
//!
//! Addresses of both families share one key shape: IPv6 as is, IPv4 as an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the way dual-stack sockets show them.
//! One map per concept then serves both families, and every later feature (Services,
//! source validation, policy) keys on the same type.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Pinned under `<bpffsRoot>/maps/`: pod address -> where to deliver it.
pub const ENDPOINTS_MAP: &str = "VELOX_ENDPOINTS";
/// Pinned under `<bpffsRoot>/maps/`: counters slot -> per-CPU counters (an array:
/// slot 0 is the uplink's, each pod's slot is in its endpoint entry).
pub const COUNTERS_MAP: &str = "VELOX_COUNTERS";
/// Pinned under `<bpffsRoot>/maps/`: host veth ifindex -> its counters slot, for the
/// packets whose source address names no endpoint of the interface (spoofed, ARP).
pub const INTERFACES_MAP: &str = "VELOX_INTERFACES";
/// Pinned under `<bpffsRoot>/maps/`: [`ENDPOINTS_MAP`]'s entries again, in an array
/// by the address's last bits ([`CachedEndpoint`]).
pub const ENDPOINT_CACHE_MAP: &str = "VELOX_ENDPOINT_CACHE";
/// Pinned under `<bpffsRoot>/maps/`: other nodes' pod CIDRs -> how to reach that node.
pub const PEERS_MAP: &str = "VELOX_PEERS";
/// Pinned under `<bpffsRoot>/maps/`: every other node's InternalIPs ([`IpKey`]) ->
/// [`NodeEntry`]: who may send through the tunnel, and how this node's pods reach
/// a tunnelled node's own addresses.
pub const NODES_MAP: &str = "VELOX_NODES";
/// Pinned under `<bpffsRoot>/maps/`: pod connection ends whose traffic the kernel
/// handled (LRU); replies to them go back through the kernel, which may have NATed them.
pub const KERNEL_FLOWS_MAP: &str = "VELOX_KERNEL_FLOWS";
/// Pinned under `<bpffsRoot>/maps/`: by counters slot, whether an end of the slot's
/// pod (of a pod on another node, for the uplink's slot) may be in
/// [`KERNEL_FLOWS_MAP`]: packets to a pod whose slot says [`NO_KERNEL_FLOWS`] skip
/// that lookup. Anything else, 0 (a new map's) included, means "look it up".
pub const KERNEL_FLOW_SLOTS_MAP: &str = "VELOX_KERNEL_FLOW_SLOTS";
/// [`KERNEL_FLOW_SLOTS_MAP`]: no end of this slot recorded since its pod was added.
pub const NO_KERNEL_FLOWS: u32 = 1;
/// Pinned under `<bpffsRoot>/maps/`: Service frontend (ClusterIP or node address,
/// port, protocol) -> its id and how many backends it has.
pub const SERVICES_MAP: &str = "VELOX_SERVICES";
/// Pinned under `<bpffsRoot>/maps/`: (Service id, slot) -> backend address and port.
pub const BACKENDS_MAP: &str = "VELOX_BACKENDS";
/// Pinned under `<bpffsRoot>/maps/`: NodePort (port, protocol, family) -> its Service,
/// answered on every address in `VELOX_NODE_ADDRESSES`: one entry per port, however
/// many nodes and addresses the cluster has.
pub const NODE_PORTS_MAP: &str = "VELOX_NODE_PORTS";
/// Pinned under `<bpffsRoot>/maps/`: this node's addresses a NodePort answers on ->
/// [`NodeAddress`] (from which network namespace, whether from outside).
pub const NODE_ADDRESSES_MAP: &str = "VELOX_NODE_ADDRESSES";
/// Pinned under `<bpffsRoot>/maps/`: connections from outside that Velox translated
/// (LRU), one entry per direction -> [`NatEntry`].
pub const NAT_MAP: &str = "VELOX_NAT";
/// Pinned under `<bpffsRoot>/maps/`: (Service, client) -> the backend it stuck to
/// (`sessionAffinity: ClientIP`, LRU).
pub const AFFINITY_MAP: &str = "VELOX_AFFINITY";
/// Pinned under `<bpffsRoot>/maps/`: Service id -> its [`MaglevTable`] (frontends
/// that serve outside traffic, with `--node-port-algorithm maglev`).
pub const MAGLEV_MAP: &str = "VELOX_MAGLEV";
/// Pinned under `<bpffsRoot>/maps/`: this node's address of each family (index 0
/// IPv4, 1 IPv6) that connections from outside are masqueraded as.
pub const MASQUERADE_MAP: &str = "VELOX_MASQUERADE";
/// Not pinned, one per load of the programs: the tail calls into [`NAT_PROGRAMS`],
/// by index.
pub const NAT_PROGRAMS_MAP: &str = "VELOX_NAT_PROGRAMS";
/// The NAT halves of `from_net` and `from_pod`, by their index in
/// `VELOX_NAT_PROGRAMS`: outside traffic to Services and replies to it; and the
/// opening of a new connection, which `from_net_nat` hands over.
pub const NAT_PROGRAMS: [&str; 3] = ["from_net_nat", "from_pod_nat", "nat_open"];
pub const FROM_NET_NAT: u32 = 0;
pub const FROM_POD_NAT: u32 = 1;
pub const NAT_OPEN: u32 = 2;
/// Pinned under `<bpffsRoot>/maps/`: socket-local storage (freed with the socket) of
/// the frontend a connected socket was translated from, so replies and getpeername
/// show the Service ...
pub const CONNECTED_FRONTEND_MAP: &str = "VELOX_CONNECTED_FRONTEND";
/// ... and of the frontends of an unconnected UDP socket's datagrams.
pub const DATAGRAM_FRONTENDS_MAP: &str = "VELOX_DATAGRAM_FRONTENDS";
/// Pinned under `<bpffsRoot>/iterators/`: read in a network namespace, each of its
/// UDP sockets connected through a Service, as its cookie and its
/// `VELOX_CONNECTED_FRONTEND`.
pub const UDP_SOCKET_FRONTENDS_ITER: &str = "udp_socket_frontends";
/// Pinned under `<bpffsRoot>/maps/`: network namespace cookies of the pods that opted
/// out of the socket load balancer; their sockets are left as they are.
pub const LB_OPT_OUT_MAP: &str = "VELOX_LB_OPT_OUT";
/// Pinned under `<bpffsRoot>/maps/`: a ring buffer of [`FlowEvent`]s, written while
/// the loader keeps flow records or someone follows them.
pub const EVENTS_MAP: &str = "VELOX_EVENTS";
/// Pinned under `<bpffsRoot>/maps/`: per CPU, the events the programs did not write:
/// the ring was full, or the source was over its limit.
pub const EVENTS_LOST_MAP: &str = "VELOX_EVENTS_LOST";
/// Pinned under `<bpffsRoot>/maps/`: per source address, its drop events this second
/// (LRU).
pub const EVENT_BUDGETS_MAP: &str = "VELOX_EVENT_BUDGETS";
/// Pinned under `<bpffsRoot>/maps/`: one u64, the `CLOCK_MONOTONIC` time until
/// which the programs write events (the end of time while the loader keeps flow
/// records; pushed forward while someone follows them otherwise).
pub const MONITOR_MAP: &str = "VELOX_MONITOR";
/// Pinned under `<bpffsRoot>/maps/`: counters slot -> [`PolicyState`] (an array, sized
/// like the counters): whether the pod is isolated and which rule version is live.
pub const POLICY_STATE_MAP: &str = "VELOX_POLICY_STATE";
/// Pinned under `<bpffsRoot>/maps/`: (slot, direction, version, peer prefix) ->
/// [`PolicyPorts`] (an LPM trie): what an isolated pod may exchange with a peer.
pub const POLICY_RULES_MAP: &str = "VELOX_POLICY_RULES";
/// Pinned under `<bpffsRoot>/maps/`: a cluster pod's address ([`IpKey`]) -> its
/// identity (u64, never 0): one per label set (namespace, labels, named ports), so
/// rules grow with label sets, not addresses.
pub const POLICY_IDENTITIES_MAP: &str = "VELOX_POLICY_IDENTITIES";
/// Pinned under `<bpffsRoot>/maps/`: [`IdentityRuleKey`] -> [`PolicyPorts`]: what an
/// isolated pod may exchange with the pods of one identity.
pub const POLICY_IDENTITY_RULES_MAP: &str = "VELOX_POLICY_IDENTITY_RULES";
/// Pinned under `<bpffsRoot>/maps/`: connections policy allowed (LRU), both
/// directions under one key -> the rules generation that allowed them, who opened,
/// whose share holds them, their state and last packet.
pub const POLICY_FLOWS_MAP: &str = "VELOX_POLICY_FLOWS";
/// Pinned under `<bpffsRoot>/maps/`: counters slot -> how many `VELOX_POLICY_FLOWS`
/// entries that pod holds (u64, memory-mapped, changed atomically by the programs
/// and the loader), then the pool's ([`POLICY_FLOW_POOL_USED`]).
pub const POLICY_FLOW_SHARES_MAP: &str = "VELOX_POLICY_FLOW_SHARES";
/// Pinned under `<bpffsRoot>/maps/`: one [`ConnectionTimeouts`], written by the loader.
pub const CT_TIMEOUTS_MAP: &str = "VELOX_CT_TIMEOUTS";
/// Pinned under `<bpffsRoot>/maps/`: one u32, the rule generation; the loader bumps it
/// after every change, so connections are checked against the new rules once.
pub const POLICY_GENERATION_MAP: &str = "VELOX_POLICY_GENERATION";
/// Bytes of the events ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: usize = 256 * 1024;
/// Events of each kind (drops, connections opened and ended, the kernel's drops)
/// one source address may write per second: a flood from one address cannot fill
/// the ring and hide everyone else's. The rest are counted (`EVENTS_LIMITED` in
/// `VELOX_EVENTS_LOST`).
pub const EVENTS_PER_SOURCE: u32 = 100;
/// Source addresses whose drop events are counted against the limit at once (LRU).
pub const EVENT_SOURCES: usize = 16_384;
/// `VELOX_EVENTS_LOST` slots: events the full ring lost, drop events over a source's
/// limit.
pub const EVENTS_RING_FULL: u32 = 0;
pub const EVENTS_LIMITED: u32 = 1;
/// Pinned under `<bpffsRoot>/programs/`: TC ingress of every host-side pod veth.
pub const FROM_POD_PROGRAM: &str = "from_pod";
/// Pinned under `<bpffsRoot>/programs/`: TC ingress of the node's uplink.
pub const FROM_NET_PROGRAM: &str = "from_net";
/// Pinned under `<bpffsRoot>/programs/`: TC egress of every host-side pod veth, where
/// the kernel delivers into the pod what Velox did not redirect.
pub const TO_POD_PROGRAM: &str = "to_pod";
/// Pinned under `<bpffsRoot>/programs/`: TC ingress of the node's VXLAN device, what
/// tunnelled peers send.
pub const FROM_TUNNEL_PROGRAM: &str = "from_tunnel";
/// Pinned under `<bpffsRoot>/programs/`: TC egress of the node's VXLAN device, where
/// every packet for a tunnelled peer gets its tunnel key.
pub const TO_TUNNEL_PROGRAM: &str = "to_tunnel";
/// The VXLAN network identifier of Velox's tunnel: one for the whole cluster.
pub const TUNNEL_VNI: u32 = 1;
/// The tunnel's UDP port unless the loader's `--vxlan-port` says otherwise: the
/// Linux kernel's default, flannel's and Cilium's.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The programs' global holding the tunnel's UDP port, set when the loader loads them.
pub const VXLAN_PORT_GLOBAL: &str = "VELOX_VXLAN_PORT";
/// The program on the kernel's `kfree_skb` tracepoint: drops of pod traffic the
/// kernel makes outside Velox's programs (no route, rp_filter, netfilter, a full
/// queue), with the kernel's own reason. Attached by each loader, not pinned.
pub const KERNEL_DROPS_PROGRAM: &str = "kernel_drops";
/// The programs' global holding [`SkbLayout`], set when the loader loads them.
pub const SKB_LAYOUT_GLOBAL: &str = "VELOX_SKB_LAYOUT";
/// The global holding how often (ns) a flow still going gets a record with its
/// counts; 0 (flow records off): the programs keep no flow table.
pub const FLOW_REPORT_GLOBAL: &str = "VELOX_FLOW_REPORT_NS";
/// Pinned under `<bpffsRoot>/maps/`: the flow table, one direction of a connection
/// -> its counts (LRU).
pub const FLOWS_MAP: &str = "VELOX_FLOWS";
/// Connection directions the flow table follows at once: the least recently seen
/// go first, and come back as started.
pub const FLOWS: usize = 65_536;
/// Entries of `VELOX_KERNEL_FLOWS` when the kernel's `nf_conntrack_max` cannot be read.
pub const DEFAULT_KERNEL_FLOWS: u32 = 262_144;

pub const MAX_ENDPOINTS: usize = 16384;
/// The counters slot of the node's uplink (`from_net`); pods have 1..=max pods.
pub const UPLINK_SLOT: u32 = 0;
/// Pods per node when the loader is not told (`--max-pods`): the counters array
/// holds one slot more, per CPU.
pub const DEFAULT_MAX_PODS: u32 = 1024;
pub const MAX_PEERS: usize = 4096;
/// InternalIPs of other nodes: two families each.
pub const MAX_NODE_IPS: usize = 2 * MAX_PEERS;
pub const MAX_SERVICES: usize = 65536;
pub const MAX_BACKENDS: usize = 262_144;
/// NodePorts: one per port, protocol and family.
pub const MAX_NODE_PORTS: usize = 65536;
pub const MAX_NODE_ADDRESSES: usize = 64;
/// Entries of `VELOX_NAT` when the loader is not told (`--nat-entries`): two per
/// connection.
pub const DEFAULT_NAT_ENTRIES: u32 = 262_144;
pub const MAX_AFFINITIES: usize = 65536;
/// Rule entries on a node, both versions together, in each of the two rules maps:
/// (pod, direction, peer prefix) and (pod, direction, peer identity).
pub const MAX_POLICY_RULES: usize = 262_144;
/// Cluster pod addresses with an identity (`VELOX_POLICY_IDENTITIES`).
pub const MAX_POLICY_IDENTITIES: usize = 262_144;
/// Connections policy follows on a node.
pub const MAX_POLICY_FLOWS: usize = 262_144;
/// Port ranges one rule entry holds: what a pod may exchange with one peer prefix.
pub const MAX_PORT_RULES: usize = 16;

/// The socket load balancer's programs (cgroup sock_addr hooks), by the hook each
/// attaches to: `connect` and `sendmsg` turn a Service frontend into a backend,
/// `recvmsg` and `getpeername` show the frontend again.
pub const SOCKET_LB_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
];

/// IP protocol numbers, as in `FlowEnd::proto`.
pub const IPPROTO_TCP: u8 = 6;
/// TCP header flags, as the programs read them and pass them on in events.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Address families as the kernel numbers them (`bpf_redir_neigh.nh_family`).
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// How many leading bits of an [`IpKey`] an IPv4 address's mapping takes: an IPv4
/// prefix of length n is an LPM key of length `IPV4_MAPPED_PREFIX + n`.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// An address of either family in network byte order (IPv4 mapped into IPv6); a
/// byte array so bpftool prints it readably. Word-aligned (every struct holds it at
/// a word's offset, so no layout changes): LLVM's BPF backend copies and zeroes an
/// unaligned one a byte at a time, through a `memset` loop, which cost from_pod a
/// third of its run.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialOrd, Ord)]
#[allow(clippy::derived_hash_with_manual_eq)] // the same equality, bytes or words
pub struct IpKey {
    pub addr: [u8; 16],
}

/// Compared as four words: LLVM's BPF backend compares the bytes of a derived
/// comparison one load at a time (about fifty instructions), and merges chained
/// word comparisons into a `bcmp` call, so the words are compared with one test.
impl PartialEq for IpKey {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.words(), other.words());
        ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
    }
}

impl IpKey {
    /// The third word of an IPv4-mapped address (`::ffff:0:0/96`), in memory order.
    const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    #[inline(always)]
    pub const fn v4(octets: [u8; 4]) -> Self {
        // Four words, not sixteen bytes: LLVM merges ten zero bytes into a `memset`
        // call, which the BPF backend does not inline.
        Self::from_words([0, 0, Self::V4_MAPPED_WORD, u32::from_ne_bytes(octets)])
    }

    #[inline(always)]
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// The address as four words in memory order, as the kernel's `__be32[4]`
    /// fields hold it (an IPv4 address is the last).
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: sixteen bytes, word-aligned.
        unsafe { *(self as *const Self).cast::<[u32; 4]>() }
    }

    /// The address from four words in memory order, as [`Self::words`] gives them.
    #[inline(always)]
    pub const fn from_words(words: [u32; 4]) -> Self {
        // SAFETY: sixteen bytes either way.
        Self {
            addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) },
        }
    }

    /// Where the address's entry of [`ENDPOINT_CACHE_MAP`] lies: its last bits,
    /// mixed with the word before so an IPv4 address and an IPv6 one of the same
    /// last bits (`.5`, `::5`) lie apart. A node's pod addresses are dense in its
    /// CIDRs, so they rarely share an index.
    #[inline(always)]
    pub fn cache_index(&self) -> u32 {
        let words = self.words();
        (u32::from_be(words[3]) ^ u32::from_be(words[2])) & (ENDPOINT_CACHE_SLOTS - 1)
    }

    /// Whether this is an IPv4 address (mapped). Its first three words, tested at
    /// once, as `eq` does.
    #[inline(always)]
    pub fn is_v4_mapped(&self) -> bool {
        let words = self.words();
        (words[0] | words[1] | (words[2] ^ Self::V4_MAPPED_WORD)) == 0
    }

    /// The address as Rust sees it: mapped addresses come back as IPv4.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::v4(v4.octets()),
            IpAddr::V6(v6) => Self::v6(v6.octets()),
        }
    }
}

impl From<Ipv4Addr> for IpKey {
    fn from(ip: Ipv4Addr) -> Self {
        Self::v4(ip.octets())
    }
}

/// One end of a connection: address, port in network byte order (the identifier of an
/// ICMP echo, 0 for protocols without either) and IP protocol. A packet's source end
/// is the destination end of its replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowEnd {
    pub addr: IpKey,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// [`Service::flags`]: outside traffic (`from_net`) to this frontend is translated
/// (a NodePort, an external or load-balancer IP, with `--kube-proxy-replacement`).
pub const SERVICE_FROM_OUTSIDE: u32 = 1;
/// [`Service::flags`]: `externalTrafficPolicy: Local`: a client outside the cluster
/// gets a backend of this node only (slots `0..local_backends`) and keeps its address.
pub const SERVICE_EXTERNAL_LOCAL: u32 = 2;
/// [`Service::flags`]: `internalTrafficPolicy: Local`: pods and hosts get a backend
/// of this node only.
pub const SERVICE_INTERNAL_LOCAL: u32 = 4;
/// [`Service::flags`]: a connection from outside gets its backend from the
/// frontend's Maglev table (`--node-port-algorithm maglev`), by a hash of its ends:
/// every node picks the same backend for it, and a backend that comes or goes moves
/// only its own share of connections.
pub const SERVICE_MAGLEV: u32 = 8;

/// Entries of a Maglev table: a prime, so every backend's walk through the table
/// visits each entry. Up to about ten backends share it within a few percent of
/// evenly (Maglev's rule of thumb: a table a hundred times the backends).
pub const MAGLEV_TABLE_SIZE: usize = 1021;

/// A frontend's Maglev table: for each hash of a connection (modulo the size), the
/// slot of its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// How many slots, from 0, the table spreads over. A pick among another number
    /// (the Service changed and the table is not rewritten yet, or a client the
    /// table was not built for) is random.
    pub backends: u32,
    pub slots: [u16; MAGLEV_TABLE_SIZE],
    pub pad: u16,
}

/// A Service frontend's entry: its id (the backends' key) and how many backends it
/// has; 0 refuses connections (ECONNREFUSED) instead of letting them hang.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    pub backends: u32,
    /// The first `local_backends` slots hold the backends on this node.
    pub local_backends: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
    /// `sessionAffinity: ClientIP`'s timeout; 0 without affinity.
    pub affinity_seconds: u32,
}

impl Service {
    /// How many slots, from 0, a client may be given: the local ones only where a
    /// traffic policy of `local_flag` says so.
    #[inline(always)]
    pub fn choices(&self, local_flag: u32) -> u32 {
        if self.flags & local_flag != 0 {
            self.local_backends
        } else {
            self.backends
        }
    }
}

/// A NodePort's key: the port (network byte order), protocol and address family
/// (`AF_INET`, `AF_INET6`): a family's backends serve its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortKey {
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl NodePortKey {
    /// The NodePort a connection to `end` asks for, if `end` is a node address.
    #[inline(always)]
    pub fn of(end: &FlowEnd) -> Self {
        Self {
            port: end.port,
            proto: end.proto,
            family: if end.addr.is_v4_mapped() {
                AF_INET as u8
            } else {
                AF_INET6 as u8
            },
        }
    }
}

/// One of this node's addresses a NodePort answers on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddress {
    /// The only network namespace whose sockets reach a NodePort here (loopback: the
    /// node's own, as kube-proxy's localhost NodePorts); 0 for every namespace.
    pub netns_cookie: u64,
}

/// One direction of a translated connection, as its packets carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub src: FlowEnd,
    pub dst: FlowEnd,
}

/// The state of a connection Velox tracks ([`NatEntry::state`],
/// [`AllowedFlow::state`]): a TCP connection before its first reply, established,
/// half-closed (a FIN one way), and closed (FINs both ways and the last ACK, or a
/// RST); other protocols stay `CT_OTHER`.
pub const CT_OPENING: u32 = 0;
pub const CT_ESTABLISHED: u32 = 1;
pub const CT_CLOSING: u32 = 2;
pub const CT_OTHER: u32 = 3;
pub const CT_CLOSED: u32 = 4;
/// Seconds a connection in each `CT_*` state lives without a packet, unless the
/// loader is told otherwise (`--ct-timeout-*`): a SYN that is never answered holds
/// a masquerading port for 30 s at most. A closed connection's ends can be taken by
/// a new one before that (as conntrack reopens a TIME_WAIT tuple). An unknown state
/// expires at once.
pub const CT_TIMEOUTS: [u64; 8] = [30, 6 * 3600, 60, 60, 10, 0, 0, 0];

/// `VELOX_CT_TIMEOUTS`'s one entry: the seconds of each `CT_*` state in force,
/// written by the loader before any program runs. All zero (never written) expires
/// everything at once: nothing is kept that no timeout was set for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    pub seconds: [u64; 8],
}

impl ConnectionTimeouts {
    /// Whether a connection in `state` whose last packet was at `last_seen` has
    /// lived out its timeout at `now` (`CLOCK_MONOTONIC`, or its coarse reading).
    #[inline(always)]
    pub fn expired(&self, state: u32, last_seen: u64, now: u64) -> bool {
        let timeout = self.seconds[(state & 7) as usize] * 1_000_000_000;
        // Another CPU may have stamped a later time than this packet's `now`.
        now.saturating_sub(last_seen) > timeout
    }
}
/// [`NatEntry::direction`].
pub const NAT_ORIGINAL: u32 = 0;
pub const NAT_REPLY: u32 = 1;
/// Source ports Velox gives translated connections it masquerades as the node:
/// above the kernel's ephemeral range (32768-60999 by default) and the NodePort range.
pub const NAT_PORTS: core::ops::RangeInclusive<u16> = 61000..=65535;

/// How a packet of one direction of a translated connection is rewritten. The other
/// direction's key is these ends swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// `bpf_ktime_get_ns` of the connection's last packet, either way.
    pub last_seen: u64,
    pub state: u32,
    pub direction: u32,
    /// The uplink the connection came in on: replies leave there.
    pub uplink: u32,
    /// 1 once this direction sent a FIN (TCP).
    pub fin: u32,
}

impl NatEntry {
    /// The key of the other direction's packets.
    #[inline(always)]
    pub fn reverse_key(&self) -> NatKey {
        NatKey {
            src: self.dst,
            dst: self.src,
        }
    }

    /// Whether it has lived out its state's timeout.
    #[inline(always)]
    pub fn expired(&self, now: u64, timeouts: &ConnectionTimeouts) -> bool {
        timeouts.expired(self.state, self.last_seen, now)
    }
}

/// Who stuck to a backend (`sessionAffinity: ClientIP`): the Service's id and the
/// client, an address from outside or a socket's network namespace cookie (in the
/// first 8 bytes of `client`, `from_socket` 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: u32,
    pub from_socket: u32,
    pub client: IpKey,
}

/// The backend a client stuck to, by slot (checked against the slot's backend, so a
/// backend that left is never picked again), and when it last connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend: FlowEnd,
    pub slot: u32,
    pub last_seen: u64,
}

/// One backend of a Service: slots 0..backends of its id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlot {
    pub service: u32,
    pub slot: u32,
}

/// How many backends an unconnected UDP socket remembers the frontend of: it gets a
/// backend per datagram, and a reply from one of its last eight shows the Service's
/// address.
pub const SOCKET_FRONTEND_SLOTS: usize = 8;

/// One backend a socket was sent to, and the frontend it asked for: a connected
/// socket's storage (`VELOX_CONNECTED_FRONTEND`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFrontend {
    pub backend: FlowEnd,
    pub frontend: FlowEnd,
}

/// An unconnected UDP socket's storage (`VELOX_DATAGRAM_FRONTENDS`): its last
/// backends, the oldest replaced first (`next`, modulo the slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFrontends {
    pub next: u32,
    pub pad: u32,
    pub slots: [SocketFrontend; SOCKET_FRONTEND_SLOTS],
}

impl SocketFrontends {
    /// The frontend this socket asked for when it was sent to `backend`.
    #[inline(always)]
    pub fn frontend_of(&self, backend: &FlowEnd) -> Option<&FlowEnd> {
        self.slots.iter().find(|s| s.backend == *backend).map(|s| &s.frontend)
    }
}

/// A pod reachable on this node. Frames are redirected as they are: rewriting the
/// MACs would make every cloned TCP skb be copied (measured: +25% per packet), and the
/// pod accepts them without it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side veth: `bpf_redirect_peer` to it lands in the pod's netns.
    pub ifindex: u32,
    /// The pod's index into the counters array, found by the same lookup that
    /// validates its source address.
    pub slot: u32,
}

impl Endpoint {
    /// No endpoint: no interface has index 0.
    pub const NONE: Self = Self { ifindex: 0, slot: 0 };

    #[inline(always)]
    pub fn exists(&self) -> bool {
        self.ifindex != 0
    }
}

/// Entries of [`ENDPOINT_CACHE_MAP`], a power of two.
pub const ENDPOINT_CACHE_SLOTS: u32 = 16384;

/// An entry of [`ENDPOINT_CACHE_MAP`]: a copy of one [`ENDPOINTS_MAP`] entry, at
/// [`IpKey::cache_index`] of its address, so the programs find a pod of this node
/// with an array read instead of a hash lookup. Kept by the endpoint map's writers:
/// an entry is filled after the endpoint entry it repeats, and emptied before that
/// entry goes or changes. What the cache does not hold (an address whose index
/// another address holds, a new map's empty entries) the endpoint map answers.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedEndpoint {
    pub addr: IpKey,
    pub endpoint: Endpoint,
    /// Odd: the entry holds `addr`'s endpoint; even: empty, or being written. The
    /// writer makes it even before it changes any other field and odd again after,
    /// one step each; a program reads it before and after the entry and takes the
    /// entry only if both reads are the same odd value. One byte, so no read sees it
    /// half-written. (The writer's steps reach other CPUs in order on x86-64's
    /// memory model, which this relies on.)
    pub seq: u8,
    pub pad: [u8; 7],
}

impl CachedEndpoint {
    #[inline(always)]
    pub fn is_filled(&self) -> bool {
        self.seq & 1 == 1
    }
}

/// [`PolicyState::flags`]: the pod is selected by a policy of that direction, so only
/// what a rule allows passes.
pub const ISOLATED_INGRESS: u32 = 1;
pub const ISOLATED_EGRESS: u32 = 2;
/// [`PolicyState::flags`]: which of the two versions of the pod's rules is live. The
/// loader writes the other version whole, then flips this bit: a pod's rules change
/// at once, never entry by entry.
pub const RULES_VERSION: u32 = 4;

/// A pod's policy switches, by counters slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub flags: u32,
}

impl PolicyState {
    pub fn version(&self) -> u8 {
        u8::from(self.flags & RULES_VERSION != 0)
    }
}

/// Direction of a rule, as in [`PolicyKey::direction`].
pub const INGRESS: u8 = 0;
pub const EGRESS: u8 = 1;

/// The key of a rule entry after the LPM prefix length: the pod's slot, direction and
/// rules version (64 bits that are always matched whole) and the peer's prefix. A
/// peer prefix of n bits is an LPM key of length `POLICY_KEY_FIXED_BITS + n` (IPv4
/// mapped, as everywhere).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub slot: u32,
    pub direction: u8,
    pub version: u8,
    pub pad: [u8; 2],
    pub peer: IpKey,
}

/// The key of a rule entry for the pods of one identity: the pod's slot, direction and
/// rules version, as in [`PolicyKey`], and the peers' identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityRuleKey {
    pub slot: u32,
    pub direction: u8,
    pub version: u8,
    pub pad: [u8; 2],
    pub identity: u64,
}

/// Bits of a [`PolicyKey`] before the peer address.
pub const POLICY_KEY_FIXED_BITS: u32 = 64;

/// [`PortRule::proto`] for a rule without ports: every protocol, every port (ICMP too).
pub const ANY_PROTOCOL: u8 = 0;

/// Ports `first..=last` (host byte order) of one protocol, and the policy that
/// allowed them (its id, as `velox-loader monitor` names it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    pub proto: u8,
    pub pad: u8,
    pub first: u16,
    pub last: u16,
    pub policy: u16,
}

impl PortRule {
    #[inline(always)]
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        self.proto == ANY_PROTOCOL || (self.proto == proto && self.first <= port && port <= self.last)
    }
}

/// What an isolated pod may exchange with a peer prefix: the rules in use come
/// first, the rest are zero (policy 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyPorts {
    pub rules: [PortRule; MAX_PORT_RULES],
}

/// A connection: its two ends in a fixed order (see [`PolicyFlow::of`]), so that
/// both directions find one entry with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyFlow {
    pub first: FlowEnd,
    pub second: FlowEnd,
}

impl PolicyFlow {
    /// The connection of a packet from `src` to `dst`, and whether `src` is its
    /// first end. Any fixed order serves: addresses compared as native words, then
    /// ports.
    #[inline(always)]
    pub fn of(src: &FlowEnd, dst: &FlowEnd) -> (Self, bool) {
        let (src_words, dst_words) = (src.addr.words(), dst.addr.words());
        let mut src_first = src.port <= dst.port;
        for i in 0..4 {
            if src_words[i] != dst_words[i] {
                src_first = src_words[i] < dst_words[i];
                break;
            }
        }
        match src_first {
            true => (
                Self {
                    first: *src,
                    second: *dst,
                },
                true,
            ),
            false => (
                Self {
                    first: *dst,
                    second: *src,
                },
                false,
            ),
        }
    }
}

/// [`AllowedFlow::opener`]: which end of the [`PolicyFlow`] opened it.
pub const OPENED_BY_FIRST: u32 = 0;
pub const OPENED_BY_SECOND: u32 = 1;

/// A connection policy allowed: under which rules generation, and which way it
/// was opened (what decides again when the rules change); whose share of the map
/// holds it, and how long it lives without a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedFlow {
    pub generation: u32,
    pub opener: u32,
    /// 1 while the receiver's ingress is still to be judged, where the kernel delivers
    /// the connection (`to_pod`): until then only the replies may trust the entry.
    pub ingress_pending: u32,
    /// The counters slot of the pod whose share of `VELOX_POLICY_FLOWS` it takes.
    pub charged: u32,
    /// A `CT_*` state: what [`CT_TIMEOUTS`] it lives without a packet.
    pub state: u32,
    pub pad: u32,
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC_COARSE`) of its last packet, either
    /// way, to the second.
    pub last_seen: u64,
}

impl AllowedFlow {
    /// Whether it has lived out its state's timeout.
    #[inline(always)]
    pub fn expired(&self, now: u64, timeouts: &ConnectionTimeouts) -> bool {
        timeouts.expired(self.state, self.last_seen, now)
    }
}

/// `VELOX_POLICY_FLOW_SHARES` after the slots' counts: how many entries are held
/// beyond the slots' reserved shares (the pool), how many the pool may hold, and
/// each slot's reserved share. The loader sets the last two; zero (unset) admits
/// nothing.
pub const POLICY_FLOW_POOL_USED: u32 = MAX_ENDPOINTS as u32;
pub const POLICY_FLOW_POOL_SIZE: u32 = POLICY_FLOW_POOL_USED + 1;
pub const POLICY_FLOW_RESERVED: u32 = POLICY_FLOW_POOL_USED + 2;
pub const POLICY_FLOW_SHARES: usize = MAX_ENDPOINTS + 3;

/// Another node, as the next hop for one of its pod CIDRs: directly over the link
/// (`bpf_redirect_neigh` to its address of the CIDR's family), or through the VXLAN
/// device to its underlay address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer node's address on the underlay: the next hop, or the tunnel's remote.
    pub node_ip: IpKey,
    /// `AF_INET` or `AF_INET6`: the family of `node_ip`.
    pub family: u32,
    /// The local interface to send from: the uplink, or the VXLAN device.
    pub ifindex: u32,
    /// That interface's MTU, kept by the loader: a packet that fits needs no MTU check.
    pub mtu: u32,
    /// [`PEER_NATIVE`] or [`PEER_VXLAN`].
    pub route: u32,
    /// Why the loader chose that route (`PEER_ON_LINK` ..), for `velox-loader peers`.
    pub reason: u32,
    /// The node's id (from its name, never 0), as `VELOX_NODES` has it: a packet
    /// from this CIDR out of the tunnel must come from this node.
    pub node: u32,
}

/// Another node, by each of its InternalIPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// Its underlay address to tunnel to, when its pods are tunnelled: pods' packets
    /// to its own addresses go through the tunnel too, so no pod address is ever
    /// seen on the underlay (which may drop sources it does not know).
    pub remote: IpKey,
    /// `AF_INET` or `AF_INET6`, the family of `remote`; 0 when it is not tunnelled.
    pub family: u32,
    /// Its node id ([`Peer::node_id`]), or [`THIS_NODE`] for this node's own
    /// addresses (which never send into the tunnel from outside).
    pub node: u32,
}

/// [`NodeEntry::node`] of this node's own addresses: what it may put into the tunnel
/// as the source of a packet it forwards (a NodePort's masqueraded connection).
pub const THIS_NODE: u32 = u32::MAX;

/// [`Peer::route`]: over the link, or through the VXLAN device.
pub const PEER_NATIVE: u32 = 0;
pub const PEER_VXLAN: u32 = 1;
/// [`Peer::reason`]: the peer's address is on a subnet of the uplink, or not; or the
/// loader's `--tunnel` flag chose for every peer.
pub const PEER_ON_LINK: u32 = 0;
pub const PEER_NOT_ON_LINK: u32 = 1;
pub const PEER_FORCED: u32 = 2;

impl Peer {
    /// A peer reached directly over the uplink `ifindex`.
    pub fn native(node_ip: IpAddr, node: u32, ifindex: u32, mtu: u32, reason: u32) -> Self {
        Self {
            node_ip: node_ip.into(),
            family: if node_ip.is_ipv4() { AF_INET } else { AF_INET6 },
            ifindex,
            mtu,
            route: PEER_NATIVE,
            reason,
            node,
        }
    }

    /// A peer reached through the VXLAN device `ifindex`, to its underlay address `node_ip`.
    pub fn tunnelled(node_ip: IpAddr, node: u32, ifindex: u32, mtu: u32, reason: u32) -> Self {
        Self {
            route: PEER_VXLAN,
            ..Self::native(node_ip, node, ifindex, mtu, reason)
        }
    }

    /// A node's id: FNV-1a of its name, never 0 (no node) nor [`THIS_NODE`]. Two
    /// names with the same id could send with each other's sources through the
    /// tunnel: the loader keeps only the node that held the id first.
    pub fn node_id(name: &str) -> u32 {
        let hash = name.bytes().fold(0x811c_9dc5u32, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        });
        hash.clamp(1, THIS_NODE - 1)
    }
}

/// Why a program dropped a packet: the one table behind the programs' drop verdicts,
/// the counters, `velox-loader dump` and `monitor`, and the `reason` label of the
/// metrics. A reason's code is the value the programs carry as their verdict, and its
/// index in this table and in [`EndpointCounters::dropped`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropReason {
    pub code: u32,
    /// Lower snake case, the same in every view.
    pub name: &'static str,
    pub help: &'static str,
}

pub const DROP_SPOOFED: u32 = 0;
pub const DROP_NO_INTERFACE: u32 = 1;
pub const DROP_REDIRECT_FAILED: u32 = 2;
pub const DROP_POLICY_EGRESS: u32 = 3;
pub const DROP_POLICY_INGRESS: u32 = 4;
pub const DROP_UNKNOWN_RECEIVER: u32 = 5;
pub const DROP_NO_BACKEND: u32 = 6;
pub const DROP_NAT_PORTS_EXHAUSTED: u32 = 7;
pub const DROP_POLICY_FLOWS_FULL: u32 = 8;
pub const DROP_TUNNEL_SOURCE: u32 = 9;
pub const DROP_NO_TUNNEL_PEER: u32 = 10;

pub const DROP_REASONS: [DropReason; 11] = [
    DropReason {
        code: DROP_SPOOFED,
        name: "spoofed",
        help: "sent by a pod from an address that is not its own, or tagged for a VLAN",
    },
    DropReason {
        code: DROP_NO_INTERFACE,
        name: "no_interface",
        // No longer counted (the loader removes a vanished veth's entries as the
        // kernel announces it); the code stays so the others keep their indexes,
        // and the programs of an older release still count here during an upgrade.
        help: "for a pod whose interface is gone before its map entry (releases before 2026-12-06 only)",
    },
    DropReason {
        code: DROP_REDIRECT_FAILED,
        name: "redirect_failed",
        help: "the kernel refused a redirect",
    },
    DropReason {
        code: DROP_POLICY_EGRESS,
        name: "policy_egress",
        help: "no rule of a NetworkPolicy selecting the sender allows it out",
    },
    DropReason {
        code: DROP_POLICY_INGRESS,
        name: "policy_ingress",
        help: "no rule of a NetworkPolicy selecting the receiver allows it in",
    },
    DropReason {
        code: DROP_UNKNOWN_RECEIVER,
        name: "unknown_receiver",
        help:
            "forwarded into a pod for an address it does not hold in the maps (its ADD unfinished, its DEL under way)",
    },
    DropReason {
        code: DROP_NO_BACKEND,
        name: "no_backend",
        help: "from outside to a Service without a backend for it (none, or none on this node with \
               externalTrafficPolicy Local)",
    },
    DropReason {
        code: DROP_NAT_PORTS_EXHAUSTED,
        name: "nat_ports_exhausted",
        help: "a new connection from outside found no free source port to masquerade it with",
    },
    DropReason {
        code: DROP_POLICY_FLOWS_FULL,
        name: "policy_flows_full",
        help: "a connection NetworkPolicy allowed could not be followed: its pod holds its reserved share of \
               the allowed-connections map and the shared pool is full",
    },
    DropReason {
        code: DROP_TUNNEL_SOURCE,
        name: "tunnel_source",
        help: "out of the VXLAN tunnel from an address that is not another node of the cluster, or with an \
               inner source that is not that node's (its pods, its addresses), or not IP",
    },
    DropReason {
        code: DROP_NO_TUNNEL_PEER,
        name: "no_tunnel_peer",
        help: "routed into the VXLAN tunnel for an address no tunnelled peer's pod CIDR holds",
    },
];

impl DropReason {
    /// The reason with `code`, `None` for a code this build does not know.
    pub fn of(code: u32) -> Option<&'static Self> {
        DROP_REASONS.get(code as usize)
    }
}

/// Traffic seen by a Velox program on one interface: what a pod sent (`from_pod` on
/// its host veth), or what arrived from the network (`from_net` on the uplink).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Delivered straight to a pod, or to another node, by the eBPF datapath.
    pub redirected_packets: u64,
    pub redirected_bytes: u64,
    /// Handed to the kernel stack (host, other nodes, outside).
    pub passed_packets: u64,
    pub passed_bytes: u64,
    /// Dropped packets, by [`DropReason::code`].
    pub dropped: [u64; DROP_REASONS.len()],
}

impl EndpointCounters {
    pub fn add(&mut self, other: &Self) {
        self.redirected_packets += other.redirected_packets;
        self.redirected_bytes += other.redirected_bytes;
        self.passed_packets += other.passed_packets;
        self.passed_bytes += other.passed_bytes;
        for (sum, more) in self.dropped.iter_mut().zip(other.dropped) {
            *sum += more;
        }
    }

    /// Dropped packets, whatever the reason.
    pub fn dropped_packets(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// Counters as the loader's views show them: the totals, and the drops under each
/// reason's name (`"dropped": {"spoofed": 0, ...}`).
#[cfg(feature = "user")]
impl serde::Serialize for EndpointCounters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeStruct};
        struct ByReason<'a>(&'a [u64; DROP_REASONS.len()]);
        impl serde::Serialize for ByReason<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(DROP_REASONS.len()))?;
                for (reason, count) in DROP_REASONS.iter().zip(self.0) {
                    map.serialize_entry(reason.name, count)?;
                }
                map.end()
            }
        }
        let mut counters = serializer.serialize_struct("EndpointCounters", 6)?;
        counters.serialize_field("redirected_packets", &self.redirected_packets)?;
        counters.serialize_field("redirected_bytes", &self.redirected_bytes)?;
        counters.serialize_field("passed_packets", &self.passed_packets)?;
        counters.serialize_field("passed_bytes", &self.passed_bytes)?;
        counters.serialize_field("dropped_packets", &self.dropped_packets())?;
        counters.serialize_field("dropped", &ByReason(&self.dropped))?;
        counters.end()
    }
}

/// In a [`FlowEvent`], instead of a drop reason: a new connection a policy rule allowed.
pub const VERDICT_ALLOWED: u32 = u32::MAX;
/// In a [`FlowEvent`]'s reason: a packet that opens or ends a connection no
/// policy decided (a TCP SYN, FIN or RST, an ICMP echo request), delivered; the
/// TCP flags in the low byte.
pub const FORWARDED: u32 = 1 << 29;
/// In a [`FlowEvent`]'s reason: the kernel dropped the packet, for the
/// `skb_drop_reason` in the low bits.
pub const KERNEL_DROP: u32 = 1 << 30;
/// In a [`FlowEvent`]'s reason: the socket load balancer (`netns` set) or the NAT
/// of outside traffic sent a new connection for `frontend` to backend `dst`.
pub const TRANSLATED: u32 = 1 << 28;
/// With `FORWARDED`: the first packet this node saw of a flow that shows no start
/// of its own (UDP, or a connection older than the records).
pub const FLOW_STARTED: u32 = 1 << 27;
/// With `FORWARDED`: a flow still going, its counts so far (every
/// `VELOX_FLOW_REPORT_NS`).
pub const FLOW_ACTIVE: u32 = 1 << 26;

/// Where the running kernel keeps what `kernel_drops` reads of a `sk_buff`, byte
/// offsets from the kernel's BTF: Rust programs get no CO-RE relocations, so the
/// loader resolves them and sets them before the programs load. `netns` 0: the
/// loader found no layout, and the program records nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbLayout {
    /// `sk_buff.head`, `sk_buff.network_header`, `sk_buff.protocol`, `sk_buff.dev`.
    pub head: u32,
    pub network_header: u32,
    pub protocol: u32,
    pub dev: u32,
    /// `net_device.ifindex`, `net_device.nd_net` (the `struct net *` inside).
    pub dev_ifindex: u32,
    pub dev_net: u32,
    /// `net.ns.inum`: the network namespace's inode number.
    pub net_inum: u32,
    /// The loader's own network namespace: drops in any other are another node's.
    pub netns: u32,
    /// Reasons left out: Velox's own TC drops (`TC_INGRESS`, `TC_EGRESS`), which it
    /// records itself with its own reason.
    pub skipped: [u32; 2],
}

/// Whose events a budget counts: a source address and one kind of event, so one
/// kind (a pod's connections, or drops the kernel makes of packets claiming its
/// address) cannot use up the budget of another (its policy drops).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSource {
    pub addr: IpKey,
    /// `EVENT_*`.
    pub kind: u32,
}

/// [`EventSource::kind`]: drops by Velox's programs.
pub const EVENT_DROP: u32 = 0;
/// [`EventSource::kind`]: packets that opened or ended a connection.
pub const EVENT_CONNECTION: u32 = 1;
/// [`EventSource::kind`]: drops the kernel made.
pub const EVENT_KERNEL_DROP: u32 = 2;
/// [`EventSource::kind`]: flows a local pod's end starts in the flow table, and
/// their progress records: by the pod's address, whichever end it is, so that no
/// one (a pod, or sources outside that it cannot choose) can flush the table
/// faster than this budget or use up another kind's.
pub const EVENT_FLOW: u32 = 3;

/// A source address's events of one kind in the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// `bpf_ktime_get_coarse_ns` in seconds.
    pub second: u64,
    pub used: u32,
    pub pad: u32,
}

/// A dropped packet, a connection's start, end or progress, or a Service's
/// translation, as the flow records show it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub src: FlowEnd,
    pub dst: FlowEnd,
    /// With `TRANSLATED`: the Service frontend the client asked for (`dst` is the
    /// backend it got).
    pub frontend: FlowEnd,
    /// The interface the program saw it on (0: a socket's call).
    pub ifindex: u32,
    /// `VERDICT_ALLOWED`, a [`DropReason::code`], or one of the flag sets
    /// (`FORWARDED`, `KERNEL_DROP`, `TRANSLATED`).
    pub reason: u32,
    /// The policies whose rules allowed each direction (0: none was needed).
    pub egress_policy: u16,
    pub ingress_policy: u16,
    /// With `TRANSLATED` by the socket load balancer: the client socket's network
    /// namespace cookie (its `src` address is not chosen yet).
    pub netns: u64,
    /// The flow's packets and bytes in this direction so far, where this node
    /// counts it (0: not counted).
    pub packets: u64,
    pub bytes: u64,
}

/// One direction of a connection, as the flow table keys it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub src: FlowEnd,
    pub dst: FlowEnd,
}

/// What the flow table keeps of one direction of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub packets: u64,
    pub bytes: u64,
    /// When (`bpf_ktime_get_coarse_ns`) its last record was written.
    pub reported: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::FlowEnd {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowCounts {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::CachedEndpoint {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::NodeEntry {}
    unsafe impl aya::Pod for super::EndpointCounters {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::BackendSlot {}
    unsafe impl aya::Pod for super::SocketFrontend {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::EventSource {}
    unsafe impl aya::Pod for super::SkbLayout {}
    unsafe impl aya::Pod for super::PolicyState {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::IdentityRuleKey {}
    unsafe impl aya::Pod for super::PolicyPorts {}
    unsafe impl aya::Pod for super::PolicyFlow {}
    unsafe impl aya::Pod for super::AllowedFlow {}
    unsafe impl aya::Pod for super::NodePortKey {}
    unsafe impl aya::Pod for super::NodeAddress {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::ConnectionTimeouts {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::MaglevTable {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip_through_one_key() {
        let v4: IpAddr = Ipv4Addr::new(200, 200, 1, 7).into();
        let v6: IpAddr = "fd00:200:1::7".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(IpKey::from(v4).ip(), v4);
        assert_eq!(IpKey::from(v6).ip(), v6);
        assert_eq!(&IpKey::from(v4).addr[10..], &[0xff, 0xff, 200, 200, 1, 7]);
        assert_ne!(IpKey::from(v4), IpKey::from(v6));
        assert_eq!(IpKey::from_words(IpKey::from(v6).words()), IpKey::from(v6));
    }

    #[test]
    fn both_directions_of_a_connection_share_one_flow_key() {
        let end = |ip: &str, port: u16| FlowEnd {
            addr: ip.parse::<IpAddr>().unwrap().into(),
            port: port.to_be(),
            proto: IPPROTO_TCP,
            pad: 0,
        };
        for (a, b) in [
            (end("200.200.1.3", 80), end("200.200.2.3", 40000)),
            (end("fd00:200:1::3", 80), end("fd00:200:1::4", 80)),
            (end("200.200.1.3", 80), end("200.200.1.3", 81)),
        ] {
            let (forward, a_first) = PolicyFlow::of(&a, &b);
            let (reverse, b_first) = PolicyFlow::of(&b, &a);
            assert_eq!(forward, reverse);
            assert_ne!(a_first, b_first);
        }
    }

    #[test]
    fn each_drop_reason_sits_at_its_code_under_one_name() {
        for (index, reason) in DROP_REASONS.iter().enumerate() {
            assert_eq!(reason.code as usize, index, "{reason:?}");
            assert_eq!(DropReason::of(reason.code), Some(reason));
            assert!(
                reason.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{reason:?}"
            );
        }
        assert_eq!(DropReason::of(VERDICT_ALLOWED), None);
    }

    #[test]
    fn peers_carry_their_family_and_route() {
        let v4 = Peer::native(Ipv4Addr::new(10, 0, 0, 4).into(), 7, 3, 1500, PEER_ON_LINK);
        assert_eq!((v4.family, v4.route), (AF_INET, PEER_NATIVE));
        let v6 = Peer::tunnelled(
            "fd00:10::4".parse::<Ipv6Addr>().unwrap().into(),
            7,
            9,
            1430,
            PEER_FORCED,
        );
        assert_eq!((v6.family, v6.route, v6.ifindex, v6.node), (AF_INET6, PEER_VXLAN, 9, 7));
    }

    #[test]
    fn node_ids_are_never_zero_and_differ_by_name() {
        assert_ne!(Peer::node_id("my-k8s-worker-1"), Peer::node_id("my-k8s-worker-2"));
        assert_eq!(Peer::node_id("w1"), Peer::node_id("w1"));
        assert_ne!(Peer::node_id(""), 0);
    }
}
