//! The netfilter rules Velox keeps, in both families: each in a chain of its own,
//! replaced in one `iptables-restore` transaction (no packet sees half a rule set),
//! and jumped to from a built-in chain. Every call waits for the xtables lock (`-w`)
//! instead of failing beside kube-proxy or a firewall daemon.

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
        .args(["-w", "--noflush"])
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
            .args(["-w", "-t", table, "-C"])
            .args(&jump)
            .stderr(Stdio::null())
            .status()?;
        if !present.success() {
            let added = Command::new(iptables)
                .args(["-w", "-t", table, "-A"])
                .args(&jump)
                .status()?;
            anyhow::ensure!(added.success(), "{iptables} could not add the jump to {chain}");
        }
    }
    Ok(())
}

/// Removes `chain` of `table` and every jump to it from `hook`; a chain that is not
/// there is fine (masquerading was never on, or a family without the tools).
pub fn remove_chain(family: Family, table: &str, chain: &str, hook: &str) -> anyhow::Result<()> {
    let (_, iptables) = tools(family);
    let listed = Command::new(iptables).args(["-w", "-t", table, "-S", hook]).output();
    let Ok(listed) = listed.map_err(|e| log::warn!("{iptables}: {e}")) else {
        return Ok(());
    };
    let target = format!("-j {chain}");
    for rule in String::from_utf8_lossy(&listed.stdout).lines() {
        // `-A POSTROUTING -s 200.200.1.0/24 -j VELOX-MASQ` is deleted as `-D POSTROUTING ...`.
        if let Some(spec) = rule.strip_prefix("-A ").filter(|r| r.ends_with(&target)) {
            let deleted = Command::new(iptables)
                .args(["-w", "-t", table, "-D"])
                .args(spec.split_whitespace())
                .status()?;
            anyhow::ensure!(deleted.success(), "{iptables} could not delete `{rule}`");
        }
    }
    let exists = Command::new(iptables)
        .args(["-w", "-t", table, "-S", chain])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()?
        .success();
    if exists {
        for step in ["-F", "-X"] {
            let done = Command::new(iptables).args(["-w", "-t", table, step, chain]).status()?;
            anyhow::ensure!(done.success(), "{iptables} {step} {chain} failed");
        }
    }
    Ok(())
}
