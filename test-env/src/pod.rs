//! A pod: a network namespace named after it, wired by the CNI plugin.

use anyhow::{bail, Context};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::in_netns;

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(in_netns(&self.name, program, args).output()?)
    }

    /// `count` pings to `ip`; true when every one was answered.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        self.exec(
            "ping",
            &["-c", &count.to_string(), "-i", "0.1", "-W", "1", "-q", &ip.to_string()],
        )
        .is_ok_and(|o| o.status.success())
    }

    /// iperf3 TCP from this pod to `server` for `seconds`; Gbit/s received.
    pub fn iperf3_to(&self, server: &Pod, seconds: u32) -> anyhow::Result<f64> {
        let mut listener = in_netns(&server.name, "iperf3", &["-s", "-1", "-B", &server.ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        // iperf3 3.12 exits 0 even when it cannot connect: the report says.
        let report = loop {
            let output = self.exec(
                "iperf3",
                &["-c", &server.ip.to_string(), "-t", &seconds.to_string(), "-J"],
            )?;
            let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 report")?;
            if report.get("error").is_none() || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(100)); // the server is still starting
        };
        let _ = listener.kill();
        let _ = listener.wait();
        match report["end"]["sum_received"]["bits_per_second"].as_f64() {
            Some(bps) => Ok(bps / 1e9),
            None => bail!("iperf3 to {} failed: {}", server.ip, report["error"]),
        }
    }
}
