//! `cleanroom`: a differentially-private data clean room over Arrow Flight SQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cleanroom",
    version,
    about = "A differentially-private data clean room: parties query each other's event data over Arrow Flight SQL and get only noisy aggregates, paid from a durable privacy budget."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the clean room on this machine: the Flight SQL gateway, an embedded
    /// Ballista scheduler and executors, and the budget ledger.
    Serve {
        /// The collaboration manifest (TOML).
        #[arg(long)]
        manifest: PathBuf,
        /// Address the Flight SQL gateway listens on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Number of in-process Ballista executors.
        #[arg(long, default_value_t = 2)]
        executors: usize,
        /// Task slots per executor.
        #[arg(long, default_value_t = 2)]
        executor_slots: usize,
        /// Directory of the durable budget ledger [default: state/ beside the manifest].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Generate the AdBench demo collaboration: Parquet data, a manifest, demo
    /// credentials and the exact answers (truth.json).
    Generate {
        /// Scale factor: 1.0 is 10 M impressions of 2 M people.
        #[arg(long, default_value_t = 0.01)]
        sf: f64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Random seed; the same seed gives the same bytes.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Do not draw a progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Work with collaboration manifests.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Report every problem of a manifest, each with its path in the file.
    Check {
        /// The manifest (TOML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ballista=warn,ballista_scheduler=warn,ballista_executor=warn,ballista_core=warn,datafusion=warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { manifest, listen, executors, executor_slots, state_dir } => {
            let options = cleanroom_scheduler::serve::ServeOptions {
                manifest,
                listen,
                executors,
                executor_slots,
                state_dir,
            };
            let running = cleanroom_scheduler::serve::start(&options, cleanroom_scheduler::serve::shutdown_signal()).await?;
            println!(
                "cleanroom is serving Flight SQL on grpc://{} ({} executors); press Ctrl-C to stop",
                running.addr, running.cluster.executors
            );
            running.wait().await?;
            eprintln!("cleanroom stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { sf, out, seed, quiet } => {
            if !(sf.is_finite() && sf > 0.0) {
                anyhow::bail!("--sf must be a number above 0, got {sf}");
            }
            let summary = cleanroom_bench::generate::generate(&cleanroom_bench::generate::GenerateOptions {
                scale_factor: sf,
                out_dir: out,
                seed,
                progress: !quiet,
            })
            .await?;
            println!(
                "wrote {} impressions and {} conversions of {} people to {}",
                summary.impressions,
                summary.conversions,
                summary.people,
                summary.out_dir.display()
            );
            println!("  manifest:    {}", summary.out_dir.join("manifest.toml").display());
            println!("  credentials: {}", summary.out_dir.join("credentials.toml").display());
            println!("  truth:       {}", summary.out_dir.join("truth.json").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manifest { command: ManifestCommand::Check { file } } => {
            let problems = cleanroom_scheduler::manifest::Manifest::check(&file);
            if problems.is_empty() {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    println!("{p}");
                }
                eprintln!("{}: {} problem(s)", file.display(), problems.len());
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
