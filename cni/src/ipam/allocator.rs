//! Velox's built-in address allocator: one file per reserved address under a
//! per-network directory, every change made under an exclusive file lock, so
//! concurrent plugin runs never hand out one address twice and restarts lose nothing.

use anyhow::Context;
use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::Attachment;
use crate::error::{fail, Code};

pub struct Allocator {
    dir: PathBuf,
    subnet: Ipv4Net,
}

const LAST_RESERVED: &str = "last_reserved_ip";
const LOCK: &str = "lock";

impl Allocator {
    /// `state_dir/ipam/<network>` holds the reservations of one network.
    pub fn new(state_dir: &Path, network: &str, subnet: Ipv4Net) -> Self {
        Self {
            dir: state_dir.join("ipam").join(network),
            subnet,
        }
    }

    fn lock(&self) -> anyhow::Result<Flock<File>> {
        crate::create_private_dir(&self.dir)?;
        let file = File::create(self.dir.join(LOCK)).context("opening the IPAM lock")?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow::anyhow!("locking the IPAM state: {errno}"))
    }

    /// Reserves an address for the attachment; the same attachment gets the same
    /// address back (a retried ADD after a crash).
    pub fn allocate(&self, attachment: &Attachment) -> anyhow::Result<Ipv4Addr> {
        let _lock = self.lock()?;
        let reserved = self.reservations()?;
        if let Some((ip, _)) = reserved.iter().find(|(_, owner)| owner == attachment) {
            return Ok(*ip);
        }
        let taken: HashSet<Ipv4Addr> = reserved.iter().map(|(ip, _)| *ip).collect();
        let hosts: Vec<Ipv4Addr> = self.subnet.hosts().collect();
        // Round-robin from the last address handed out, as host-local does, so a freed
        // address is not reused at once by the next pod.
        let last = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
        let start = last
            .and_then(|l| hosts.iter().position(|h| *h == l))
            .map_or(0, |i| i + 1);
        let Some(ip) = (0..hosts.len())
            .map(|i| hosts[(start + i) % hosts.len()])
            .find(|ip| !taken.contains(ip))
        else {
            return fail(
                Code::AddressesExhausted,
                format!("no free address left in {} ({} in use)", self.subnet, taken.len()),
            );
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dir.join(ip.to_string()))
            .with_context(|| format!("reserving {ip}"))?;
        writeln!(file, "{}\n{}", attachment.container_id, attachment.ifname)?;
        fs::write(self.dir.join(LAST_RESERVED), ip.to_string())?;
        Ok(ip)
    }

    /// Frees whatever the attachment holds; nothing held is fine (DEL is idempotent).
    pub fn release(&self, attachment: &Attachment) -> anyhow::Result<()> {
        self.retain(|owner| owner != attachment)
    }

    /// Frees every reservation not owned by one of `valid` (CNI GC).
    pub fn retain_only(&self, valid: &HashSet<Attachment>) -> anyhow::Result<()> {
        self.retain(|owner| valid.contains(owner))
    }

    fn retain(&self, keep: impl Fn(&Attachment) -> bool) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        for (ip, owner) in self.reservations()? {
            if !keep(&owner) {
                fs::remove_file(self.dir.join(ip.to_string())).with_context(|| format!("releasing {ip}"))?;
            }
        }
        Ok(())
    }

    /// Every reserved address and its owner.
    pub fn reservations(&self) -> anyhow::Result<Vec<(Ipv4Addr, Attachment)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("reading IPAM state"),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let content = fs::read_to_string(entry.path())?;
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
    use crate::error::CniError;

    fn attachment(id: usize) -> Attachment {
        Attachment {
            container_id: format!("c{id}"),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocates_hosts_only_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::new(dir.path(), "net", "10.9.0.0/30".parse().unwrap());
        let a = alloc.allocate(&attachment(1)).unwrap();
        assert_eq!(a, "10.9.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(alloc.allocate(&attachment(1)).unwrap(), a, "same owner, same address");
        assert_eq!(
            alloc.allocate(&attachment(2)).unwrap(),
            "10.9.0.2".parse::<Ipv4Addr>().unwrap()
        );
        let err = alloc.allocate(&attachment(3)).unwrap_err();
        assert_eq!(CniError::from_anyhow(&err).code, Code::AddressesExhausted);
        alloc.release(&attachment(1)).unwrap();
        alloc.release(&attachment(1)).unwrap();
        assert_eq!(alloc.allocate(&attachment(3)).unwrap(), a);
    }

    #[test]
    fn survives_a_restart_and_round_robins() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.9.0.0/24".parse().unwrap();
        let first = Allocator::new(dir.path(), "net", subnet)
            .allocate(&attachment(1))
            .unwrap();
        Allocator::new(dir.path(), "net", subnet)
            .release(&attachment(1))
            .unwrap();
        let again = Allocator::new(dir.path(), "net", subnet);
        let second = again.allocate(&attachment(2)).unwrap();
        assert_ne!(first, second, "a just-freed address is not reused first");
        assert_eq!(again.reservations().unwrap(), vec![(second, attachment(2))]);
    }

    #[test]
    fn gc_keeps_only_valid_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::new(dir.path(), "net", "10.9.0.0/24".parse().unwrap());
        for id in 0..5 {
            alloc.allocate(&attachment(id)).unwrap();
        }
        let valid: HashSet<Attachment> = [attachment(1), attachment(3)].into();
        alloc.retain_only(&valid).unwrap();
        let left: HashSet<Attachment> = alloc.reservations().unwrap().into_iter().map(|(_, a)| a).collect();
        assert_eq!(left, valid);
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.9.0.0/24".parse().unwrap();
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|worker| {
                    let path = dir.path();
                    s.spawn(move || {
                        // A fresh allocator per call, as separate plugin processes would have.
                        (0..15)
                            .map(|i| {
                                Allocator::new(path, "net", subnet)
                                    .allocate(&attachment(worker * 100 + i))
                                    .unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<_> = ips.iter().collect();
        assert_eq!(ips.len(), 240);
        assert_eq!(unique.len(), 240, "an address was handed out twice");
        assert_eq!(
            Allocator::new(dir.path(), "net", subnet).reservations().unwrap().len(),
            240
        );
    }
}
