//! Pinned TCX links: a program attached to an interface stays attached after the
//! process that attached it exits, for as long as the pin (or the interface) lives.

use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType};

use crate::error::{Error, Result};
use crate::fs::{create_private_dir, remove_if_exists};
use crate::layout::{Bpffs, Hook};

/// Attaches the pinned `program` to the ingress of `ifname` (TCX) and pins the link.
pub fn attach_tc_ingress(bpffs: &Bpffs, program: &str, ifname: &str) -> Result<()> {
    let program_pin = bpffs.program(program);
    let mut classifier = SchedClassifier::from_pin(&program_pin)
        .map_err(Error::not_ready(format!("cannot open {}", program_pin.display())))?;
    let link_id = classifier
        .attach(ifname, TcAttachType::Ingress)
        .map_err(Error::program(format!("attaching {program} to {ifname}")))?;
    let link: FdLink = classifier
        .take_link(link_id)
        .map_err(Error::program(format!("taking the link of {ifname}")))?
        .try_into()
        .map_err(Error::invalid(format!("the link of {ifname} is not a TCX link")))?;
    create_private_dir(&bpffs.links_dir(Hook::TcIngress))?;
    link.pin(bpffs.tc_ingress_link(ifname))
        .map_err(Error::invalid(format!("pinning the link of {ifname}")))?;
    Ok(())
}

/// Removes the pinned link; the kernel detaches the program when the pin goes (or
/// already did, when the interface went away).
pub fn detach_tc_ingress(bpffs: &Bpffs, ifname: &str) -> Result<()> {
    remove_if_exists(&bpffs.tc_ingress_link(ifname))
}
