//! `velox`: the CNI plugin binary. Config on stdin, CNI_* in the environment, the
//! result or a CNI error JSON on stdout.

use std::io::Read;
use std::process::ExitCode;

use velox_cni::config::Environment;
use velox_cni::error::CniError;
use velox_cni::version::{CniVersion, LATEST};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(anyhow::Error::from)
        .and_then(|_| Environment::from_vars(|name| std::env::var(name).ok()))
        .and_then(|env| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(velox_cni::plugin::run(env, stdin.clone()))
        });
    match outcome {
        Ok(answer) => {
            if let Some(answer) = answer {
                println!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            let error = CniError::from_anyhow(&err);
            log::error!("{err:#}");
            println!("{}", error.to_json(answer_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}

/// Errors are written in the caller's version when it is one we speak.
fn answer_version(stdin: &[u8]) -> &'static str {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|conf| conf["cniVersion"].as_str().and_then(|v| CniVersion::parse(v).ok()))
        .map_or(LATEST, CniVersion::as_str)
}
