//! `cleanroom`: a differentially-private data clean room over Arrow Flight SQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod operator;

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
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// See and change privacy budgets (operators; reads the ledger directly).
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Check and read the tamper-evident audit log (operators).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
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

/// Where the budget ledger and audit log live.
#[derive(clap::Args, Clone)]
struct LedgerArgs {
    /// Directory of the embedded ledger [default: state/ beside the manifest].
    #[arg(long, conflicts_with = "etcd")]
    state_dir: Option<PathBuf>,
    /// Keep the ledger on etcd instead: comma-separated endpoints, e.g.
    /// http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379.
    #[arg(long, env = "CLEANROOM_ETCD")]
    etcd: Option<String>,
    /// Key prefix of the ledger in etcd.
    #[arg(long, default_value = cleanroom_scheduler::serve::DEFAULT_ETCD_PREFIX)]
    etcd_prefix: String,
}

/// The ledger for an operator command: `--state-dir`, `--etcd`, or the
/// state directory beside `--manifest`.
#[derive(clap::Args, Clone)]
struct OperatorLedgerArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// The collaboration manifest, for the parties' budgets (and the default state directory).
    #[arg(long)]
    manifest: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Spent and remaining budget per party and for the whole collaboration.
    Show {
        #[command(flatten)]
        at: OperatorLedgerArgs,
        /// Only this party.
        #[arg(long)]
        party: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add to a party's budget, beyond its manifest budget (recorded in the audit log).
    Grant {
        #[command(flatten)]
        at: OperatorLedgerArgs,
        #[arg(long)]
        party: String,
        /// Epsilon to add.
        #[arg(long, default_value_t = 0.0)]
        epsilon: f64,
        /// Delta to add.
        #[arg(long, default_value_t = 0.0)]
        delta: f64,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain: report every record edited, removed, reordered or inserted.
    Verify {
        #[command(flatten)]
        at: OperatorLedgerArgs,
        /// A record known from outside the log (an answer's cleanroom.audit.record), SEQ:HASH; repeatable.
        #[arg(long, value_name = "SEQ:HASH")]
        expect: Vec<String>,
    },
    /// Print audit records, oldest first.
    List {
        #[command(flatten)]
        at: OperatorLedgerArgs,
        /// Only records of this party.
        #[arg(long)]
        party: Option<String>,
        /// Only records at or after this time (2026-11-23, 2026-11-23T09:30:00Z, or Unix seconds; UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only records of this kind (auth, auth_failure, query, answer, query_failure, refusal, budget_grant, manifest, upload, export, retention).
        #[arg(long)]
        kind: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
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
        Command::Serve { manifest, listen, executors, executor_slots, ledger } => {
            let options = cleanroom_scheduler::serve::ServeOptions {
                manifest,
                listen,
                executors,
                executor_slots,
                state_dir: ledger.state_dir,
                etcd: ledger.etcd,
                etcd_prefix: ledger.etcd_prefix,
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
        Command::Budget { command } => tokio::task::spawn_blocking(move || operator::budget(command)).await?,
        Command::Audit { command } => tokio::task::spawn_blocking(move || operator::audit(command)).await?,
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
