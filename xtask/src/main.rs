//! `cargo xtask`: what cargo alone cannot do for Velox.

mod anchor_shapes;
mod bench;
mod build;
mod env;
mod image;
mod node_port_bench;
mod policy_bench;
mod program_ab;
mod program_runs;
mod report;
mod service_bench;
mod setup;

use clap::{Parser, Subcommand};
use std::process::{Command, ExitCode};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need, when missing: Debian packages, bpf-linker,
    /// cnitool, the runtime tests' images and CRI client, the bpffs mount.
    Setup,
    /// Build the eBPF object (Debian's toolchain), then velox and velox-loader (release).
    Build,
    /// Setup, build, then every test, privileged ones included (needs root).
    Test,
    /// The simulated cluster in network namespaces.
    TestEnv {
        #[command(subcommand)]
        action: env::TestEnvAction,
    },
    /// Velox next to the reference plugins and the physical limits, in one interleaved run.
    Bench(bench::BenchArgs),
    /// Install the toolchain and what the demo runs, build, bring up the cluster,
    /// ping, iperf3, the endpoint dumps, tear down.
    Demo,
    /// Setup, build, then the OCI image deploy/velox.yaml runs (podman, no registry),
    /// saved to target/velox-image.tar.
    Image,
}

/// The feature that builds the integration tests, which need root.
const PRIVILEGED_TESTS: &str = "velox-test-env/privileged";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::setup(),
        Task::Build => build::build(),
        Task::Test => test(),
        Task::TestEnv { action } => env::test_env(action),
        // Re-rendering a saved run needs neither root nor a build.
        Task::Bench(args) if args.report_only => bench::bench(args),
        Task::Bench(args) => setup::setup()
            .and_then(|()| build::build())
            .and_then(|()| bench::bench(args)),
        Task::Demo => setup::base().and_then(|()| build::build()).and_then(|()| env::demo()),
        Task::Image => setup::setup()
            .and_then(|()| build::build())
            .and_then(|()| image::image()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the suite, privileged integration tests included, with nextest when it is
/// installed (one summary line, a process per test), else with cargo test. The
/// runner's summary is the last thing printed.
fn test() -> anyhow::Result<()> {
    setup::setup()?;
    build::build()?;
    build::build_upgrade_test_object()?;
    build::build_previous_release()?;
    image::image()?;
    let nextest = Command::new(build::cargo())
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = Command::new(build::cargo());
    if nextest {
        cmd.args([
            "nextest",
            "run",
            "--workspace",
            "--exclude",
            "velox-ebpf",
            "--features",
            PRIVILEGED_TESTS,
            "--no-fail-fast",
        ]);
    } else {
        cmd.args([
            "test",
            "--workspace",
            "--exclude",
            "velox-ebpf",
            "--features",
            PRIVILEGED_TESTS,
        ])
        .arg("--no-fail-fast");
    }
    build::run_checked(&mut cmd)
}
