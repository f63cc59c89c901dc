//! The kernel's own drops of pod traffic in the flow records: the `sk_buff` layout
//! `kernel_drops` reads, and the names of the kernel's drop reasons, both from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`).

use anyhow::{bail, Context};
use aya::programs::raw_trace_point::RawTracePointLink;
use aya::programs::RawTracePoint;
use aya::Ebpf;
use btf_rs::{Btf, Type};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use velox_common::{SkbLayout, KERNEL_DROP, KERNEL_DROPS_PROGRAM};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const REASON_PREFIX: &str = "SKB_DROP_REASON_";

/// The kernel's drop reasons by number (`NO_SOCKET`, `IP_RPFILTER`), once read.
static REASON_NAMES: OnceLock<BTreeMap<u32, String>> = OnceLock::new();

/// What the loader needs of the kernel: where `kernel_drops` reads, and how the
/// kernel names its reasons.
pub struct KernelLayout {
    pub skb: SkbLayout,
    pub reasons: BTreeMap<u32, String>,
}

impl KernelLayout {
    /// From the running kernel's BTF, for the network namespace the loader runs in.
    pub fn read() -> anyhow::Result<Self> {
        let btf = Btf::from_file(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
        let skb = |path| byte_offset(&btf, "sk_buff", path);
        let reasons = drop_reasons(&btf)?;
        // Without them Velox's own drops would be recorded twice, once as the kernel's.
        let reason = |name: &str| {
            reasons
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(v, _)| *v)
                .with_context(|| format!("this kernel names no {name} drop reason"))
        };
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("this network namespace")?
            .ino();
        Ok(Self {
            skb: SkbLayout {
                head: skb("head")?,
                network_header: skb("network_header")?,
                protocol: skb("protocol")?,
                dev: skb("dev")?,
                dev_ifindex: byte_offset(&btf, "net_device", "ifindex")?,
                dev_net: byte_offset(&btf, "net_device", "nd_net")?,
                net_inum: byte_offset(&btf, "net", "ns.inum")?,
                netns: u32::try_from(netns).context("the network namespace's inode number")?,
                skipped: [reason("TC_INGRESS")?, reason("TC_EGRESS")?],
            },
            reasons,
        })
    }

    /// Keeps the reason names for [`reason_name`].
    pub fn publish_reason_names(self) {
        let _ = REASON_NAMES.set(self.reasons);
    }
}

/// Attaches `kernel_drops` (loaded with a layout) to the `kfree_skb` tracepoint
/// while the link lives. Not pinned: a loader that stops records nothing, and each
/// loader on a kernel (test-env's nodes share one) records its own netns's drops.
pub fn attach(ebpf: &mut Ebpf) -> anyhow::Result<RawTracePointLink> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(KERNEL_DROPS_PROGRAM)
        .with_context(|| format!("no {KERNEL_DROPS_PROGRAM} in the eBPF object"))?
        .try_into()?;
    program.load().context("loading kernel_drops")?;
    let link = program.attach("kfree_skb").context("attaching to kfree_skb")?;
    Ok(program.take_link(link)?)
}

/// A record's reason for a flow event's code, when it is a kernel drop:
/// `kernel:NO_SOCKET`.
pub fn reason_name(code: u32) -> Option<String> {
    if code & KERNEL_DROP == 0 || code == u32::MAX {
        return None;
    }
    let reason = code & !KERNEL_DROP;
    let name = REASON_NAMES.get().and_then(|names| names.get(&reason));
    Some(match name {
        Some(name) => format!("kernel:{name}"),
        None => format!("kernel:{reason}"),
    })
}

/// `enum skb_drop_reason`'s values by name, without the prefix.
fn drop_reasons(btf: &Btf) -> anyhow::Result<BTreeMap<u32, String>> {
    for candidate in btf.resolve_types_by_name("skb_drop_reason")? {
        if let Type::Enum(reasons) = candidate {
            return reasons
                .members
                .iter()
                .map(|member| {
                    let name = btf.resolve_name(member)?;
                    Ok((member.val(), name.trim_start_matches(REASON_PREFIX).to_string()))
                })
                .collect();
        }
    }
    bail!("the kernel's BTF has no enum skb_drop_reason")
}

/// The byte offset of `path` (`ns.inum`) in struct `name`, looking into anonymous
/// unions and structs on the way, as the C compiler does.
fn byte_offset(btf: &Btf, name: &str, path: &str) -> anyhow::Result<u32> {
    let structure = btf
        .resolve_types_by_name(name)?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .with_context(|| format!("the kernel's BTF has no struct {name}"))?;
    let mut bits = 0;
    let mut current = structure;
    let mut fields = path.split('.').peekable();
    while let Some(field) = fields.next() {
        let (offset, member) =
            find_member(btf, &current, field)?.with_context(|| format!("struct {name} has no {path}"))?;
        bits += offset;
        if fields.peek().is_some() {
            current = match resolve(btf, btf.resolve_chained_type(&member)?)? {
                Type::Struct(s) | Type::Union(s) => s,
                _ => bail!("{name}.{field} is not a struct"),
            };
        }
    }
    anyhow::ensure!(bits % 8 == 0, "{name}.{path} is a bit field");
    Ok(bits / 8)
}

/// `field` of `structure` and its bit offset, found directly or inside anonymous
/// members.
fn find_member(btf: &Btf, structure: &btf_rs::Struct, field: &str) -> anyhow::Result<Option<(u32, btf_rs::Member)>> {
    for member in &structure.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == field {
            return Ok(Some((member.bit_offset(), member.clone())));
        }
        if name.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = resolve(btf, btf.resolve_chained_type(member)?)? {
                if let Some((offset, found)) = find_member(btf, &inner, field)? {
                    return Ok(Some((member.bit_offset() + offset, found)));
                }
            }
        }
    }
    Ok(None)
}

/// `t` with typedefs and qualifiers looked through.
fn resolve(btf: &Btf, mut t: Type) -> anyhow::Result<Type> {
    loop {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x)?,
            Type::Const(x) => btf.resolve_chained_type(x)?,
            Type::Volatile(x) => btf.resolve_chained_type(x)?,
            Type::TypeTag(x) => btf.resolve_chained_type(x)?,
            _ => return Ok(t),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_reasons_are_named_and_others_are_not_kernel_drops() {
        assert_eq!(reason_name(7), None);
        assert_eq!(reason_name(u32::MAX), None);
        assert!(reason_name(KERNEL_DROP | 3).unwrap().starts_with("kernel:"));
    }
}
