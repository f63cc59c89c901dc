//! Every path Velox uses on a node, and its mode, in one place.
//!
//! ```text
//! <bpffsRoot>/                        0700  default /sys/fs/bpf/velox; one per node
//! ├── maps/<layout id>/               0700  created and pinned by the loader; one
//! │   │                                     directory per map layout (upgrades)
//! │   ├── VELOX_ENDPOINTS                   pod address -> host veth, counters slot
//! │   ├── VELOX_PEERS                       other nodes' pod CIDRs -> node address, route
//! │   ├── VELOX_NODES                       other nodes' InternalIPs -> node id (tunnel senders)
//! │   ├── VELOX_COUNTERS                    per-slot, per-CPU counters (an array)
//! │   ├── VELOX_INTERFACES                  host veth or uplink -> counters slot
//! │   ├── VELOX_KERNEL_FLOWS                pod connection ends the kernel handles (LRU)
//! │   ├── VELOX_SERVICES                    Service frontend -> its id, backend count
//! │   ├── VELOX_BACKENDS                    (Service id, slot) -> backend
//! │   ├── VELOX_CONNECTED_FRONTEND          connected socket -> backend, frontend (socket storage)
//! │   ├── VELOX_DATAGRAM_FRONTENDS          UDP socket -> last 8 backends' frontends (socket storage)
//! │   ├── VELOX_LB_OPT_OUT                  netns cookies the socket LB leaves alone
//! │   ├── VELOX_EVENTS                      drops and connections policy allowed (ring
//! │   │                                     buffer), for the loader's flow records
//! │   ├── VELOX_EVENTS_LOST                 per CPU, events the full ring lost
//! │   ├── VELOX_MONITOR                     until when the programs write events
//! │   ├── VELOX_FLOWS                       each direction of a pod connection -> its
//! │   │                                     packets and bytes (LRU), for the records
//! │   ├── VELOX_POLICY_STATE                per-slot isolation and live rules version
//! │   ├── VELOX_POLICY_RULES                (slot, direction, version, peer prefix) -> ports
//! │   ├── VELOX_POLICY_IDENTITY_RULES       (slot, direction, version, peer identity) -> ports
//! │   ├── VELOX_POLICY_IDENTITIES           cluster pod address -> identity (label set)
//! │   ├── VELOX_POLICY_FLOWS                connections policy allowed (LRU), by state
//! │   ├── VELOX_POLICY_FLOW_SHARES          each pod's share of them, and the pool's
//! │   ├── VELOX_CT_TIMEOUTS                 seconds a connection lives, by state
//! │   └── VELOX_POLICY_GENERATION           bumped at every rules change
//! ├── programs/                       0700  replaced atomically at every loader start
//! │   ├── from_pod                          each through a `<name>_staged` pin
//! │   ├── from_net
//! │   ├── to_pod
//! │   ├── from_tunnel, to_tunnel            the VXLAN device's ingress and egress
//! │   └── lb_<hook><4|6>                    the socket load balancer's: connect,
//! │                                         sendmsg, recvmsg, getpeername
//! ├── iterators/                      0700  with the socket load balancer, replaced at
//! │   └── udp_socket_frontends              every start: read in a netns, its UDP
//! │                                         sockets' frontends (by socket cookie)
//! └── links/                          0700  one directory per hook, so no sweep of one
//!     ├── tc-ingress/<ifname>               kind can touch another: pods' host veths
//!     │                                     (pinned by the plugin), the uplink and the
//!     │                                     VXLAN device `velox-vxlan` (loader)
//!     ├── tc-egress/<ifname>                pods' host veths (`to_pod`), `velox-vxlan`
//!     └── cgroup/<program>                  the socket load balancer's hooks
//!
//! <stateDir>/                         0700  default /run/velox
//! ├── endpoints/                      0700
//! │   ├── .lock                       0600  held around every record-and-map change
//! │   ├── <host ifname>.json          0600  one record per attachment (atomic writes)
//! │   └── slots/<n>                   0600  counters slot n, claimed: its host ifname
//! ├── ipam/<network>/                 0700  the built-in allocator, one network each
//! │   ├── lock                        0600
//! │   ├── <address>                   0600  reserved: container ID and ifname
//! │   └── last_reserved_ip.<4|6>      0600  where the round-robin goes on
//! ├── policy-names.json               0600  policy ids and pod names, for the monitor
//! ├── service-names.json              0600  Service frontends' names, for the flow records
//! ├── network-policy-enforced         0600  present while the loader enforces NetworkPolicy:
//! │                                         ADD starts a named pod denied in both directions
//! ├── install.json                    0600  what `install` wrote, with checksums
//! ├── loader.sock                     0600  the health socket (STATUS, probes)
//! ├── flows.sock                      0600  `velox-loader flows` asks for flow records here
//! └── policy.sock                     0600  ADD asks for a new pod's policy here, and waits
//! ```

use std::path::{Path, PathBuf};

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/velox";
pub const DEFAULT_STATE_DIR: &str = "/run/velox";
/// Directories and files nobody but root has any business reading.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// The hooks a link can be pinned under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
    Cgroup,
}

impl Hook {
    /// The hooks of interfaces' links (pods' veths, the uplink).
    pub const TC: [Hook; 2] = [Hook::TcIngress, Hook::TcEgress];
    /// Every hook.
    pub const ALL: [Hook; 3] = [Hook::TcIngress, Hook::TcEgress, Hook::Cgroup];

    fn dir(self) -> &'static str {
        match self {
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
            Self::Cgroup => "cgroup",
        }
    }
}

/// Velox's objects under one bpffs root (`bpffsRoot`).
#[derive(Clone, Debug)]
pub struct Bpffs {
    pub root: PathBuf,
}

impl Bpffs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Every directory the loader creates.
    pub fn dirs(&self) -> Vec<PathBuf> {
        [self.maps_dir(), self.root.join("programs"), self.root.join("iterators")]
            .into_iter()
            .chain(Hook::ALL.map(|hook| self.links_dir(hook)))
            .collect()
    }

    /// Where every map layout has its directory.
    pub fn all_maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// The maps of this build's layout.
    pub fn maps_dir(&self) -> PathBuf {
        self.all_maps_dir().join(crate::maps::layout_id())
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join("programs").join(name)
    }

    pub fn links_dir(&self, hook: Hook) -> PathBuf {
        self.root.join("links").join(hook.dir())
    }

    /// The pinned TCX link of the Velox program on an interface's `hook`.
    pub fn tc_link(&self, hook: Hook, ifname: &str) -> PathBuf {
        self.links_dir(hook).join(ifname)
    }

    /// A pinned iterator link: reading the file runs the iterator.
    pub fn iterator(&self, name: &str) -> PathBuf {
        self.root.join("iterators").join(name)
    }

    /// The pinned link of a socket hook program on the load balancer's cgroup.
    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.links_dir(Hook::Cgroup).join(program)
    }
}

/// Velox's files under one state directory (`stateDir`).
#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn endpoints_dir(&self) -> PathBuf {
        self.root.join("endpoints")
    }

    /// The built-in allocator's state of one network.
    pub fn ipam_dir(&self, network: &str) -> PathBuf {
        self.root.join("ipam").join(network)
    }

    /// Policy ids and pod names, for `velox-loader monitor`.
    pub fn policy_names(&self) -> PathBuf {
        self.root.join("policy-names.json")
    }

    /// Service frontends' names, for the flow records.
    pub fn service_names(&self) -> PathBuf {
        self.root.join("service-names.json")
    }

    pub fn health_socket(&self) -> PathBuf {
        self.root.join("loader.sock")
    }

    /// Present while the loader enforces NetworkPolicy (written before it pins the
    /// programs ADD needs, removed when it starts without enforcing).
    pub fn policy_enforced_marker(&self) -> PathBuf {
        self.root.join("network-policy-enforced")
    }

    /// Where ADD asks the loader to apply a new pod's policy now.
    pub fn policy_socket(&self) -> PathBuf {
        self.root.join("policy.sock")
    }

    /// Where the loader serves its flow records (`velox-loader flows`).
    pub fn flows_socket(&self) -> PathBuf {
        self.root.join("flows.sock")
    }
}

impl AsRef<Path> for StateDir {
    fn as_ref(&self) -> &Path {
        &self.root
    }
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host), from the mount table.
pub fn cgroup2_root() -> crate::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(crate::Error::io("reading the mount table"))?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .and_then(|fields| fields.get(1).map(PathBuf::from))
        .ok_or_else(|| crate::Error::Invalid("no cgroup2 hierarchy is mounted".into()))
}

/// The cgroup2 hierarchy at `path` or, on a hybrid host whose `path` is the tmpfs
/// of the v1 controllers, at `path/unified`: a program attached elsewhere fails
/// with EBADF, which says nothing.
pub fn cgroup2_at(path: &Path) -> crate::Result<PathBuf> {
    let is_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    };
    [path.to_path_buf(), path.join("unified")]
        .into_iter()
        .find(|p| is_cgroup2(p))
        .ok_or_else(|| {
            crate::Error::Invalid(format!(
                "{} is not a cgroup2 hierarchy, nor is {}/unified: give the host's cgroup2 mount",
                path.display(),
                path.display()
            ))
        })
}

/// Whether the mount `path` is on propagates its mounts to its peers (`shared:N` in
/// `mountinfo`), as read from `mountinfo` (the text of `/proc/self/mountinfo`).
/// `None` when no mount holds it.
pub fn mount_is_shared(mountinfo: &str, path: &Path) -> Option<bool> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - type ...
            let (fields, _) = line.split_once(" - ")?;
            let fields: Vec<&str> = fields.split_whitespace().collect();
            let mount_point = Path::new(fields.get(4)?);
            path.starts_with(mount_point).then(|| {
                let optional = fields.get(6..).unwrap_or_default();
                let shared = optional.iter().any(|tag| tag.starts_with("shared:"));
                (mount_point.as_os_str().len(), shared)
            })
        })
        // The deepest mount holding it; the last one of a depth is the one on top.
        .max_by_key(|(depth, _)| *depth)
        .map(|(_, shared)| shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_propagation_of_the_mount_a_path_is_on() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys rw,nosuid - sysfs sysfs rw
41 30 0:34 / /sys/fs/bpf rw,relatime shared:12 master:3 - bpf bpf rw
";
        assert_eq!(mount_is_shared(mountinfo, Path::new("/sys/fs/bpf/velox")), Some(true));
        assert_eq!(mount_is_shared(mountinfo, Path::new("/sys/class/net")), Some(false));
        assert_eq!(mount_is_shared(mountinfo, Path::new("/run/velox")), Some(true));
        assert_eq!(mount_is_shared("", Path::new("/x")), None);
    }

    /// This host mounts the v1 controllers on a tmpfs at /sys/fs/cgroup, cgroup2 at
    /// /sys/fs/cgroup/unified (as Debian without systemd and older systemd do).
    #[test]
    fn the_cgroup2_hierarchy_is_found_under_a_hybrid_mount() {
        let root = cgroup2_root().unwrap();
        assert_eq!(cgroup2_at(&root).unwrap(), root);
        if let Some(parent) = root.parent().filter(|_| root.ends_with("unified")) {
            assert_eq!(cgroup2_at(parent).unwrap(), root);
        }
        let err = cgroup2_at(Path::new("/tmp")).unwrap_err().to_string();
        assert!(err.contains("/tmp is not a cgroup2 hierarchy"), "{err}");
    }

    #[test]
    fn links_are_split_by_hook() {
        let bpffs = Bpffs::new("/sys/fs/bpf/x");
        assert_eq!(
            bpffs.tc_link(Hook::TcIngress, "eth0"),
            Path::new("/sys/fs/bpf/x/links/tc-ingress/eth0")
        );
        assert!(bpffs.dirs().contains(&PathBuf::from("/sys/fs/bpf/x/links/cgroup")));
        let state = StateDir::new("/run/v");
        assert_eq!(state.health_socket(), Path::new("/run/v/loader.sock"));
        assert_eq!(state.ipam_dir("net"), Path::new("/run/v/ipam/net"));
    }
}
