//! The netfilter rules Velox keeps, in both families: each in a chain of its own,
//! replaced in one `iptables-restore` transaction (no packet sees half a rule set),
//! and jumped to from a built-in chain.

use anyhow::Context;
use std::process::{Command, Stdio};
use velox_node::Family;

fn tools(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("iptables-restore", "iptables"),
        Family::V6 => ("ip6tables-restore", "ip6tables"),
    }
}

/// Makes `chain` of `table` hold exactly `rules` (each an iptables rule spec after
/// `-A <chain>`), and `hook` jump to it for each of `jump_matches`.
pub fn replace_chain(
    family: Family,
    table: &str,
    chain: &str,
    rules: &[String],
    hook: &str,
    jump_matches: &[Vec<String>],
) -> anyhow::Result<()> {
    let (restore, iptables) = tools(family);
    let mut script = format!("*{table}\n:{chain} - [0:0]\n");
    for rule in rules {
        script.push_str(&format!("-A {chain} {rule}\n"));
    }
    script.push_str("COMMIT\n");
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), script.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "{restore} refused the {chain} chain");
    for matches in jump_matches {
        let jump: Vec<&str> = std::iter::once(hook)
            .chain(matches.iter().map(String::as_str))
            .chain(["-j", chain])
            .collect();
        let present = Command::new(iptables)
            .args(["-t", table, "-C"])
            .args(&jump)
            .stderr(Stdio::null())
            .status()?;
        if !present.success() {
            let added = Command::new(iptables).args(["-t", table, "-A"]).args(&jump).status()?;
            anyhow::ensure!(added.success(), "{iptables} could not add the jump to {chain}");
        }
    }
    Ok(())
}
