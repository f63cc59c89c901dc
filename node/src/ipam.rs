//! Velox's built-in address allocator: one file per reserved address under a
//! per-network directory, every change made under an exclusive file lock, so
//! concurrent plugin runs never hand out one address twice and restarts lose nothing.
//! A network has one subnet per address family; a pod gets one address from each.

use ipnet::IpNet;
use nix::fcntl::Flock;
use std::collections::HashSet;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use crate::endpoint::Attachment;
use crate::error::{Error, Result};
use crate::fs::{list_dir, write_atomic, write_new};
use crate::layout::{StateDir, PRIVATE_FILE_MODE};
use crate::Family;

pub struct Allocator {
    dir: PathBuf,
    subnets: Vec<IpNet>,
}

const LOCK: &str = "lock";
/// Where a reservation is written before it is linked into place (under the lock).
const STAGED_RESERVATION: &str = "staged";

/// Where the round-robin of one family goes on.
fn last_reserved_file(family: Family) -> String {
    format!("last_reserved_ip.{}", family.number())
}

/// The addresses of `subnet` a pod may get, as offsets from its network address:
/// IPv4 leaves out the network and broadcast addresses, IPv6 the subnet-router
/// anycast address.
fn host_offsets(subnet: &IpNet) -> (u128, u128) {
    let host_bits = u32::from(subnet.max_prefix_len() - subnet.prefix_len());
    let last = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
    match subnet {
        IpNet::V4(_) => (1, last - 1),
        IpNet::V6(_) => (1, last),
    }
}

fn offset_of(subnet: &IpNet, ip: IpAddr) -> u128 {
    match (subnet.network(), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => u128::from(u32::from(ip).wrapping_sub(u32::from(net))),
        (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip).wrapping_sub(u128::from(net)),
        _ => u128::MAX,
    }
}

fn at_offset(subnet: &IpNet, offset: u128) -> IpAddr {
    match subnet.network() {
        IpAddr::V4(net) => IpAddr::V4(Ipv4Addr::from(u32::from(net) + offset as u32)),
        IpAddr::V6(net) => IpAddr::V6(Ipv6Addr::from(u128::from(net) + offset)),
    }
}

impl Allocator {
    /// `<stateDir>/ipam/<network>` holds the reservations of one network; `subnets`
    /// may be empty for a caller that only releases.
    pub fn new(state_dir: &StateDir, network: &str, subnets: Vec<IpNet>) -> Self {
        Self {
            dir: state_dir.ipam_dir(network),
            subnets,
        }
    }

    fn lock(&self) -> Result<Flock<File>> {
        crate::fs::lock(&self.dir.join(LOCK))
    }

    /// Reserves one address per subnet for the attachment; the same attachment gets
    /// the same addresses back (a retried ADD after a crash).
    pub fn allocate(&self, attachment: &Attachment) -> Result<Vec<IpAddr>> {
        let _lock = self.lock()?;
        let reserved = self.reservations()?;
        let mut out = Vec::new();
        for subnet in &self.subnets {
            let held = reserved
                .iter()
                .find(|(ip, owner)| owner == attachment && subnet.contains(ip));
            let ip = match held {
                Some((ip, _)) => *ip,
                None => self.reserve(subnet, &reserved, attachment)?,
            };
            out.push(ip);
        }
        Ok(out)
    }

    fn reserve(&self, subnet: &IpNet, reserved: &[(IpAddr, Attachment)], attachment: &Attachment) -> Result<IpAddr> {
        let family = Family::of(&subnet.addr());
        let taken: HashSet<IpAddr> = reserved
            .iter()
            .map(|(ip, _)| *ip)
            .filter(|ip| subnet.contains(ip))
            .collect();
        let (first, last) = host_offsets(subnet);
        let count = last - first + 1;
        // Round-robin from the last address handed out, as host-local does, so a freed
        // address is not reused at once by the next pod.
        let start = fs::read_to_string(self.dir.join(last_reserved_file(family)))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .map(|last| offset_of(subnet, last))
            .filter(|offset| (first..=last).contains(offset))
            .map_or(first, |offset| offset + 1);
        // Among `taken + 1` distinct candidates one is free, however large the subnet.
        let tries = count.min(taken.len() as u128 + 1);
        let Some(ip) = (0..tries)
            .map(|i| at_offset(subnet, first + (start - first + i) % count))
            .find(|ip| !taken.contains(ip))
        else {
            return Err(Error::Exhausted {
                subnet: *subnet,
                in_use: taken.len(),
            });
        };
        self.create_reservation(ip, attachment)?;
        write_atomic(
            &self.dir.join(last_reserved_file(family)),
            ip.to_string().as_bytes(),
            PRIVATE_FILE_MODE,
        )?;
        Ok(ip)
    }

    /// Creates the reservation file with its owner in one step: written under a
    /// temporary name and hard-linked into place, so a plugin killed halfway leaves
    /// either no reservation or a complete one (never one without an owner, which no
    /// DEL would free).
    fn create_reservation(&self, ip: IpAddr, attachment: &Attachment) -> Result<()> {
        let staged = self.dir.join(STAGED_RESERVATION);
        let owner = format!("{}\n{}\n", attachment.container_id, attachment.ifname);
        write_new(&staged, owner.as_bytes(), PRIVATE_FILE_MODE)?;
        fs::hard_link(&staged, self.dir.join(ip.to_string())).map_err(Error::io(format!("reserving {ip}")))?;
        crate::fs::remove_if_exists(&staged)
    }

    /// Frees whatever the attachment holds; nothing held is fine (DEL is idempotent).
    pub fn release(&self, attachment: &Attachment) -> Result<()> {
        self.retain(|owner| owner != attachment)
    }

    /// Frees every reservation not owned by one of `valid` (CNI GC).
    pub fn retain_only(&self, valid: &HashSet<Attachment>) -> Result<()> {
        self.retain(|owner| valid.contains(owner))
    }

    fn retain(&self, keep: impl Fn(&Attachment) -> bool) -> Result<()> {
        let _lock = self.lock()?;
        for (ip, owner) in self.reservations()? {
            if !keep(&owner) {
                fs::remove_file(self.dir.join(ip.to_string())).map_err(Error::io(format!("releasing {ip}")))?;
            }
        }
        Ok(())
    }

    /// Every reserved address of both families and its owner.
    pub fn reservations(&self) -> Result<Vec<(IpAddr, Attachment)>> {
        let mut out = Vec::new();
        for path in list_dir(&self.dir)? {
            let Some(ip) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let content = fs::read_to_string(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let mut lines = content.lines();
            let owner = Attachment {
                container_id: lines.next().unwrap_or_default().to_string(),
                ifname: lines.next().unwrap_or_default().to_string(),
            };
            out.push((ip, owner));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: usize) -> Attachment {
        Attachment {
            container_id: format!("c{id}"),
            ifname: "eth0".into(),
        }
    }

    fn allocator(dir: &tempfile::TempDir, subnets: &[&str]) -> Allocator {
        let subnets = subnets.iter().map(|s| s.parse().unwrap()).collect();
        Allocator::new(&StateDir::new(dir.path()), "net", subnets)
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn allocates_hosts_only_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = allocator(&dir, &["10.9.0.0/30"]);
        let a = alloc.allocate(&attachment(1)).unwrap();
        assert_eq!(a, ips(&["10.9.0.1"]));
        assert_eq!(alloc.allocate(&attachment(1)).unwrap(), a, "same owner, same address");
        assert_eq!(alloc.allocate(&attachment(2)).unwrap(), ips(&["10.9.0.2"]));
        let err = alloc.allocate(&attachment(3)).unwrap_err();
        assert!(matches!(err, Error::Exhausted { in_use: 2, .. }), "{err}");
        alloc.release(&attachment(1)).unwrap();
        alloc.release(&attachment(1)).unwrap();
        assert_eq!(alloc.allocate(&attachment(3)).unwrap(), a);
    }

    #[test]
    fn dual_stack_gives_one_address_per_family_and_frees_both() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = allocator(&dir, &["10.9.0.0/24", "fd00:9::/64"]);
        assert_eq!(alloc.allocate(&attachment(1)).unwrap(), ips(&["10.9.0.1", "fd00:9::1"]));
        assert_eq!(alloc.allocate(&attachment(2)).unwrap(), ips(&["10.9.0.2", "fd00:9::2"]));
        assert_eq!(alloc.allocate(&attachment(1)).unwrap(), ips(&["10.9.0.1", "fd00:9::1"]));
        alloc.release(&attachment(1)).unwrap();
        let left: Vec<IpAddr> = alloc.reservations().unwrap().into_iter().map(|(ip, _)| ip).collect();
        assert_eq!(left, ips(&["10.9.0.2", "fd00:9::2"]));
    }

    #[test]
    fn ipv6_leaves_out_only_the_subnet_router_address() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = allocator(&dir, &["fd00:9::/126"]);
        let got: Vec<IpAddr> = (1..=3).flat_map(|i| alloc.allocate(&attachment(i)).unwrap()).collect();
        assert_eq!(got, ips(&["fd00:9::1", "fd00:9::2", "fd00:9::3"]));
        let err = alloc.allocate(&attachment(4)).unwrap_err();
        assert!(matches!(err, Error::Exhausted { in_use: 3, .. }), "{err}");
    }

    #[test]
    fn the_largest_subnets_cost_no_more_than_the_addresses_in_use() {
        // Every address of a /0 in memory would be 2^32 (IPv4) or 2^128 (IPv6) entries.
        let dir = tempfile::tempdir().unwrap();
        let alloc = allocator(&dir, &["0.0.0.0/0", "::/0"]);
        for id in 0..3 {
            assert_eq!(alloc.allocate(&attachment(id)).unwrap().len(), 2);
        }
        let alloc = allocator(&tempfile::tempdir().unwrap(), &["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(alloc.allocate(&attachment(9)).unwrap(), ips(&["10.0.0.1", "fd00::1"]));
    }

    #[test]
    fn survives_a_restart_and_round_robins() {
        let dir = tempfile::tempdir().unwrap();
        let subnets = ["10.9.0.0/24", "fd00:9::/64"];
        let first = allocator(&dir, &subnets).allocate(&attachment(1)).unwrap();
        allocator(&dir, &subnets).release(&attachment(1)).unwrap();
        let again = allocator(&dir, &subnets);
        let second = again.allocate(&attachment(2)).unwrap();
        assert!(
            first.iter().all(|ip| !second.contains(ip)),
            "a just-freed address is not reused first"
        );
        assert_eq!(again.reservations().unwrap().len(), 2);
    }

    #[test]
    fn gc_keeps_only_valid_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = allocator(&dir, &["10.9.0.0/24", "fd00:9::/64"]);
        for id in 0..5 {
            alloc.allocate(&attachment(id)).unwrap();
        }
        let valid: HashSet<Attachment> = [attachment(1), attachment(3)].into();
        alloc.retain_only(&valid).unwrap();
        let left: Vec<Attachment> = alloc.reservations().unwrap().into_iter().map(|(_, a)| a).collect();
        assert_eq!(left.len(), 4);
        assert!(left.iter().all(|a| valid.contains(a)));
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let got: Vec<IpAddr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|worker| {
                    let dir = &dir;
                    s.spawn(move || {
                        // A fresh allocator per call, as separate plugin processes would have.
                        (0..15)
                            .flat_map(|i| {
                                allocator(dir, &["10.9.0.0/24", "fd00:9::/64"])
                                    .allocate(&attachment(worker * 100 + i))
                                    .unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<_> = got.iter().collect();
        assert_eq!(got.len(), 480);
        assert_eq!(unique.len(), 480, "an address was handed out twice");
    }
}
