//! Pinned links: a program attached to an interface (TCX) or a cgroup stays attached
//! after the process that attached it exits, for as long as the pin (or the
//! interface) lives; and it can be moved to another program in one step.

use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use velox_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};

use crate::error::{Error, Result};
use crate::fs::{create_private_dir, remove_if_exists};
use crate::layout::{Bpffs, Hook};

/// The programs on a pod's host veth: `from_pod` on its ingress (what the pod sends),
/// `to_pod` on its egress (what the kernel delivers into the pod).
pub const POD_VETH_PROGRAMS: [(Hook, &str); 2] =
    [(Hook::TcIngress, FROM_POD_PROGRAM), (Hook::TcEgress, TO_POD_PROGRAM)];

/// Attaches whichever of [`POD_VETH_PROGRAMS`] the host veth `ifname` lacks; the
/// names of those it attached.
pub fn attach_pod_veth_programs(bpffs: &Bpffs, ifname: &str) -> Result<Vec<&'static str>> {
    let mut attached = Vec::new();
    for (hook, program) in POD_VETH_PROGRAMS {
        if !bpffs.tc_link(hook, ifname).exists() {
            attach_tc(bpffs, hook, program, ifname)?;
            attached.push(program);
        }
    }
    Ok(attached)
}

/// Attaches the pinned `program` to `ifname`'s TCX `hook` (ingress or egress) and
/// pins the link.
pub fn attach_tc(bpffs: &Bpffs, hook: Hook, program: &str, ifname: &str) -> Result<()> {
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

/// Removes the pinned TC links of `ifname`; the kernel detaches a program when its
/// pin goes (or already did, when the interface went away).
pub fn detach_tc(bpffs: &Bpffs, ifname: &str) -> Result<()> {
    for hook in Hook::TC {
        remove_if_exists(&bpffs.tc_link(hook, ifname))?;
    }
    Ok(())
}

/// Attaches a loaded socket hook program to `cgroup` (only it, no program of a
/// sub-cgroup may override: links take only that mode) and pins the link as
/// `links/cgroup/<name>`.
pub fn attach_cgroup(bpffs: &Bpffs, program: &mut CgroupSockAddr, name: &str, cgroup: &Path) -> Result<()> {
    let cgroup_dir =
        std::fs::File::open(cgroup).map_err(Error::io(format!("opening the cgroup {}", cgroup.display())))?;
    let link_id = program
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(Error::program(format!("attaching {name} to {}", cgroup.display())))?;
    let link: FdLink = program
        .take_link(link_id)
        .map_err(Error::program(format!("taking the link of {name}")))?
        .try_into()
        .map_err(Error::invalid(format!("the link of {name} is not a bpf_link")))?;
    create_private_dir(&bpffs.links_dir(Hook::Cgroup))?;
    link.pin(bpffs.cgroup_link(name))
        .map_err(Error::invalid(format!("pinning the link of {name}")))?;
    Ok(())
}

const BPF_OBJ_GET: i64 = 7;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_LINK_UPDATE: i64 = 29;

/// The object pinned at `pin`, opened (`BPF_OBJ_GET`).
fn open_pinned(pin: &Path) -> Result<OwnedFd> {
    let what = format!("opening {}", pin.display());
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(Error::invalid(&what))?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Spelled out: the kernel refuses non-zero bytes after the last field, and
        // implicit padding may hold anything.
        pad: u32,
    }
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET and outlives the call.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, BPF_OBJ_GET, &get, std::mem::size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(Error::io(what)(std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The id of the cgroup the cgroup link pinned at `pin` is attached to (the
/// cgroup2 directory's inode number), from `bpf_link_info`; aya does not expose it.
pub fn cgroup_of_pinned_link(pin: &Path) -> Result<u64> {
    let link = open_pinned(pin)?;
    // bpf_link_info: type, id, prog_id (u32 each), then the 8-aligned union whose
    // cgroup member starts with the cgroup id.
    let mut info = [0u64; 8];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut get = InfoByFd {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD, and its
    // buffer is `info_len` bytes that outlive the call.
    let done = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut get,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if done < 0 {
        return Err(Error::io(format!("reading the link {}", pin.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    const BPF_LINK_TYPE_CGROUP: u64 = 3;
    if info[0] & u64::from(u32::MAX) != BPF_LINK_TYPE_CGROUP {
        return Err(Error::Invalid(format!("{} is not a cgroup link", pin.display())));
    }
    Ok(info[2])
}

/// Moves the link pinned at `pin` (any hook) to `program` in one step
/// (`BPF_LINK_UPDATE`): no packet or socket call meets the hook without a program.
/// aya keeps its wrapper of this call private.
pub fn update_pinned_link(pin: &Path, program: BorrowedFd<'_>) -> Result<()> {
    let what = format!("moving {} to a new program", pin.display());
    let link = open_pinned(pin)?;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `update` is a valid bpf_attr prefix for BPF_LINK_UPDATE.
    let done = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &update,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if done < 0 {
        return Err(Error::io(what)(std::io::Error::last_os_error()));
    }
    Ok(())
}
