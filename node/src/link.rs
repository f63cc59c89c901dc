//! Pinned TCX links: a program attached to an interface stays attached after the
//! process that attached it exits, for as long as the pin (or the interface) lives.

use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType};
use velox_common::{FROM_NET_PROGRAM, FROM_POD_PROGRAM, NAT_TRACK_PROGRAM};

use crate::error::{Error, Result};
use crate::fs::{create_private_dir, remove_if_exists};
use crate::layout::{Bpffs, Hook};

/// The programs on a pod's host veth, by hook.
pub const POD_PROGRAMS: [(Hook, &str); 2] = [(Hook::TcIngress, FROM_POD_PROGRAM), (Hook::TcEgress, NAT_TRACK_PROGRAM)];
/// The programs on the node's uplink, by hook.
pub const UPLINK_PROGRAMS: [(Hook, &str); 2] =
    [(Hook::TcIngress, FROM_NET_PROGRAM), (Hook::TcEgress, NAT_TRACK_PROGRAM)];

/// Attaches those of `programs` whose link pin is missing; returns their names.
pub fn ensure_attached(bpffs: &Bpffs, ifname: &str, programs: &[(Hook, &'static str)]) -> Result<Vec<&'static str>> {
    let mut attached = Vec::new();
    for &(hook, program) in programs {
        if !bpffs.tc_link(hook, ifname).exists() {
            attach_tc(bpffs, program, ifname, hook)?;
            attached.push(program);
        }
    }
    Ok(attached)
}

/// Attaches the pinned `program` to `ifname`'s TC `hook` (TCX) and pins the link.
pub fn attach_tc(bpffs: &Bpffs, program: &str, ifname: &str, hook: Hook) -> Result<()> {
    let attach_type = match hook {
        Hook::TcIngress => TcAttachType::Ingress,
        Hook::TcEgress => TcAttachType::Egress,
        Hook::Cgroup => return Err(Error::Invalid(format!("{program}: a cgroup hook is not a TC hook"))),
    };
    let program_pin = bpffs.program(program);
    let mut classifier = SchedClassifier::from_pin(&program_pin)
        .map_err(Error::not_ready(format!("cannot open {}", program_pin.display())))?;
    let link_id = classifier
        .attach(ifname, attach_type)
        .map_err(Error::program(format!("attaching {program} to {ifname}")))?;
    let link: FdLink = classifier
        .take_link(link_id)
        .map_err(Error::program(format!("taking the link of {ifname}")))?
        .try_into()
        .map_err(Error::invalid(format!("the link of {ifname} is not a TCX link")))?;
    create_private_dir(&bpffs.links_dir(hook))?;
    link.pin(bpffs.tc_link(hook, ifname))
        .map_err(Error::invalid(format!("pinning the link of {ifname}")))?;
    Ok(())
}

/// Removes the pinned links of both TC hooks; the kernel detaches the programs when
/// the pins go (or already did, when the interface went away).
pub fn detach_tc(bpffs: &Bpffs, ifname: &str) -> Result<()> {
    for hook in Hook::TC {
        remove_if_exists(&bpffs.tc_link(hook, ifname))?;
    }
    Ok(())
}
