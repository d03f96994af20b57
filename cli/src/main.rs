//! `cleanroom`: a differentially-private data clean room over Arrow Flight SQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cleanroom_scheduler::serve::{EngineChoice, Running, ServeOptions};

mod connection;
mod logging;
mod operator;
mod report;
mod study;
mod upload;

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

/// `serve --engine`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EngineArg {
    InProcess,
    Ballista,
}

#[derive(Subcommand)]
enum Command {
    /// Run the clean room on this machine: the Flight SQL gateway, the budget
    /// ledger, and the engine that runs queries (in-process DataFusion, or an
    /// embedded Ballista scheduler and executors).
    Serve {
        /// The collaboration manifest (TOML).
        #[arg(long)]
        manifest: PathBuf,
        /// Address the Flight SQL gateway listens on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Where queries run: `in-process` (DataFusion in this process, with a
        /// memory pool and spilling: least overhead on one machine) or
        /// `ballista` (an embedded Ballista scheduler and executors, as a
        /// cluster runs them).
        #[arg(long, value_enum, default_value_t = EngineArg::InProcess)]
        engine: EngineArg,
        /// Query memory of the in-process engine, e.g. 4GiB, shared equally
        /// by the --query-slots queries that run at once; beyond its share, a
        /// query's operators spill to --spill-dir
        /// [default: 70 % of the host's or container's memory].
        #[arg(long, value_parser = parse_bytes)]
        memory_limit: Option<u64>,
        /// Directory for the in-process engine's spill files [default: a
        /// temporary directory].
        #[arg(long)]
        spill_dir: Option<PathBuf>,
        /// Queries the in-process engine runs at once; more wait for a slot
        /// (within their deadline). Each running query gets an equal share
        /// of --memory-limit as its own pool, so one query's memory use never
        /// fails another [default: 4].
        #[arg(long)]
        query_slots: Option<usize>,
        /// With --engine ballista: number of in-process Ballista executors [default: 2].
        #[arg(long)]
        executors: Option<usize>,
        /// With --engine ballista: task slots per executor [default: 2].
        #[arg(long)]
        executor_slots: Option<usize>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run the clean room's front of a cluster: the Flight SQL gateway, the
    /// budget ledger and the Ballista scheduler, whose internal address
    /// `cleanroom executor` processes join. Runs no query work itself.
    Scheduler {
        /// The collaboration manifest (TOML).
        #[arg(long)]
        manifest: PathBuf,
        /// Address the Flight SQL gateway listens on: the only port parties reach.
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: SocketAddr,
        /// Address of the Ballista scheduler, for executors only (keep it off
        /// the parties' network: it accepts any plan).
        #[arg(long, default_value = "127.0.0.1:50050")]
        internal_bind: SocketAddr,
        /// Partitions each query's scans and shuffles are split into (about the
        /// cluster's total task slots).
        #[arg(long, default_value_t = 8)]
        partitions: usize,
        /// Seconds without a heartbeat after which an executor is lost and its
        /// work is run again elsewhere; with no executor left, running queries
        /// fail after as long.
        #[arg(long, default_value_t = 180)]
        executor_timeout: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a Ballista executor that joins `cleanroom scheduler`'s internal
    /// address and runs query tasks with cleanroom's functions.
    Executor {
        /// The scheduler's internal address, host:port.
        #[arg(long)]
        scheduler: String,
        /// Address the executor's shuffle (Flight) service binds; keep it internal.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// The shuffle service's port (the port after it is also taken).
        #[arg(long, default_value_t = 50060)]
        port: u16,
        /// Host name or address the scheduler and other executors reach this
        /// executor at [default: --bind].
        #[arg(long)]
        external_host: Option<String>,
        /// Concurrent tasks.
        #[arg(long, default_value_t = 2)]
        slots: usize,
        /// Directory for shuffle and spill files [default: a temporary directory].
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Memory for query execution, shared by the slots, e.g. 4GiB or
        /// 512MiB; beyond it, operators spill to the work directory
        /// [default: 70 % of the host's or container's memory].
        #[arg(long, value_parser = parse_bytes)]
        memory_limit: Option<u64>,
        /// The collaboration manifest, for datasets on S3 (its `[s3]` settings).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Seconds between heartbeats to the scheduler (keep it well under its --executor-timeout).
        #[arg(long, default_value_t = 60)]
        heartbeat_interval: u64,
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
    /// Generate a demo collaboration: Parquet data, a manifest (with the
    /// studies' default parameters), demo credentials and the exact answers
    /// (truth.json) — AdBench, or an iGaming, Forex or e-commerce vertical.
    Generate {
        /// Which collaboration: adbench (an ad network's impressions and an
        /// advertiser's conversions), igaming (affiliate clicks; players'
        /// deposits and GGR), forex (introducing brokers' referrals; trades
        /// in lots), ecommerce (publishers' clicks; orders and returns).
        #[arg(long, value_enum, default_value_t = cleanroom_bench::verticals::Vertical::Adbench)]
        vertical: cleanroom_bench::verticals::Vertical,
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
    /// Prepare a party's data on its own machine: normalise the identifier
    /// column (e-mail or phone), replace it with its HMAC-SHA256 under the
    /// collaboration key, and write Parquet ready to upload. No server needed;
    /// raw identifiers never leave this machine.
    Prepare(PrepareArgs),
    /// Upload Parquet files into a dataset the party owns, over Flight SQL,
    /// as one new data version (all or nothing).
    Upload(upload::UploadArgs),
    /// Run a study over Flight SQL (`SELECT * FROM lift(…)`): one charge,
    /// figures with their intervals, as a table or JSON.
    Study(study::StudyArgs),
    /// Work with collaboration manifests.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
}

/// What `serve` and `scheduler` share: retention, the ledger, the Flight SQL
/// endpoint's TLS and the operator's metrics port.
#[derive(clap::Args, Clone)]
struct ServerArgs {
    /// Seconds between passes that delete rows past their dataset's retention
    /// period and files of versions replaced over 10 minutes ago (one also runs at start).
    #[arg(long, default_value_t = 3600)]
    retention_interval: u64,
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Serve Flight SQL over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (keep it internal).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Allow Flight SQL without TLS on a non-loopback --listen address
    /// (passwords and answers then cross the network in clear text).
    #[arg(long)]
    allow_plaintext: bool,
}

impl ServerArgs {
    fn tls(&self) -> Option<cleanroom_scheduler::serve::TlsFiles> {
        Some(cleanroom_scheduler::serve::TlsFiles { cert: self.tls_cert.clone()?, key: self.tls_key.clone()? })
    }
}

/// The options `serve` and `scheduler` share.
fn server_options(manifest: PathBuf, listen: SocketAddr, server: ServerArgs) -> anyhow::Result<ServeOptions> {
    if server.retention_interval == 0 {
        anyhow::bail!("--retention-interval must be at least 1 second");
    }
    if !listen.ip().is_loopback() && server.tls_cert.is_none() && !server.allow_plaintext {
        anyhow::bail!(
            "--listen {listen} is reachable from other machines: give --tls-cert and --tls-key (or --allow-plaintext on a network you trust, since passwords and answers would travel in clear text)"
        );
    }
    Ok(ServeOptions {
        listen,
        retention_interval: std::time::Duration::from_secs(server.retention_interval),
        tls: server.tls(),
        metrics: server.metrics_listen,
        state_dir: server.ledger.state_dir,
        etcd: server.ledger.etcd,
        etcd_prefix: server.ledger.etcd_prefix,
        ..ServeOptions::standalone(manifest)
    })
}

fn flight_url(options: &ServeOptions, running: &Running) -> String {
    format!("{}://{}", if options.tls.is_some() { "grpc+tls" } else { "grpc" }, running.addr)
}

/// Start the server, print `banner` (closed with the metrics address), serve until Ctrl-C or SIGTERM.
async fn run_server(options: &ServeOptions, banner: impl Fn(&Running) -> String) -> anyhow::Result<ExitCode> {
    let running = cleanroom_scheduler::serve::start(options, cleanroom_scheduler::serve::shutdown_signal()).await?;
    println!(
        "{}{}); press Ctrl-C to stop",
        banner(&running),
        running.metrics_addr.map(|a| format!(", metrics on http://{a}/metrics")).unwrap_or_default()
    );
    running.wait().await?;
    eprintln!("cleanroom stopped");
    Ok(ExitCode::SUCCESS)
}

/// `4GiB`, `512MiB`, `1.5GB`, `1000000` → bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("`{text}` is not a size such as 4GiB or 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(format!("`{text}`: unknown unit (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)")),
    };
    let bytes = number * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes as u64)
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
        /// Only records of this kind (auth, auth_failure, query, answer, query_failure, refusal, budget_grant, manifest, upload, upload_failure, retention).
        #[arg(long)]
        kind: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// The input: CSV (with a header row; .tsv is tab-separated) or Parquet.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// The column holding the raw identifier (dropped from the output).
    #[arg(long, value_name = "COL")]
    id_column: String,
    /// What the identifier is.
    #[arg(long, value_enum)]
    kind: IdKind,
    /// The collaboration key (shared by all parties, at least 16 bytes); needed for --hash hmac-sha256.
    #[arg(long, value_name = "KEY")]
    key_file: Option<PathBuf>,
    /// hmac-sha256 (under the collaboration key) for the clean room; sha256 (no key) only for ad-platform customer lists.
    #[arg(long, value_enum, default_value = "hmac-sha256")]
    hash: HashKind,
    /// Output directory; the file is named after the input, <stem>.parquet.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Name of the hashed identifier column in the output.
    #[arg(long, default_value = "uid")]
    uid_column: String,
    /// E-mail: also apply provider rules (Gmail ignores dots and +tags; Outlook, iCloud and others ignore +tags). Every party must choose alike.
    #[arg(long)]
    provider_rules: bool,
    /// Phone: the country (ISO code, e.g. DE or US) of numbers written without a country code.
    #[arg(long, value_name = "CC")]
    default_country: Option<String>,
    /// Input format [default: from the extension].
    #[arg(long, value_enum)]
    format: Option<InputFormatArg>,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum IdKind {
    Email,
    Phone,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum HashKind {
    #[value(name = "hmac-sha256")]
    HmacSha256,
    Sha256,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum InputFormatArg {
    Csv,
    Tsv,
    Parquet,
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Report every problem of a manifest, each with its path in the file.
    Check {
        /// The manifest (TOML).
        file: PathBuf,
    },
    /// Print the argon2id hash of a party's password, for the manifest's
    /// `password` or a `password_file`. The password is read from
    /// CLEANROOM_PASSWORD, or else from the first line of standard input.
    HashPassword,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    // A command that prints its results (a study's table, generate's
    // summary) ends quietly when the reader of its output goes away, as
    // `| head` does, instead of failing on the write. Servers keep Rust's
    // default (a write to a closed pipe is an error they handle).
    #[cfg(unix)]
    if !matches!(cli.command, Command::Serve { .. } | Command::Scheduler { .. } | Command::Executor { .. }) {
        // SAFETY: setting a signal's disposition to its default before any
        // thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Planning and optimising recurse over a plan; statements are limited in
    // depth (`cleanroom_dp::limits`), and each thread gets a stack with room
    // to spare for what the limits allow (only the pages used are committed).
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_stack_size(16 << 20).build() {
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
        Command::Serve { manifest, listen, engine, memory_limit, spill_dir, query_slots, executors, executor_slots, server } => {
            let engine = match engine {
                EngineArg::InProcess => {
                    if executors.is_some() || executor_slots.is_some() {
                        anyhow::bail!("--executors and --executor-slots size an embedded Ballista cluster: add --engine ballista");
                    }
                    EngineChoice::InProcess
                }
                EngineArg::Ballista => {
                    if memory_limit.is_some() || spill_dir.is_some() || query_slots.is_some() {
                        anyhow::bail!(
                            "--memory-limit, --spill-dir and --query-slots set the in-process engine; with --engine ballista, run `cleanroom scheduler` with `cleanroom executor --memory-limit --work-dir` processes to bound executors' memory"
                        );
                    }
                    EngineChoice::Ballista
                }
            };
            let options = ServeOptions {
                engine,
                memory_limit,
                spill_dir,
                query_slots: query_slots.unwrap_or(cleanroom_scheduler::serve::DEFAULT_QUERY_SLOTS).max(1),
                executors: executors.unwrap_or(2).max(1),
                executor_slots: executor_slots.unwrap_or(2).max(1),
                ..server_options(manifest, listen, server)?
            };
            run_server(&options, |running| {
                format!("cleanroom is serving Flight SQL on {} ({}", flight_url(&options, running), running.engine)
            })
            .await
        }
        Command::Scheduler { manifest, listen, internal_bind, partitions, executor_timeout, server } => {
            if executor_timeout == 0 {
                anyhow::bail!("--executor-timeout must be at least 1 second");
            }
            if internal_bind.port() == listen.port() && listen.port() != 0 && (internal_bind.ip() == listen.ip() || internal_bind.ip().is_unspecified() || listen.ip().is_unspecified()) {
                anyhow::bail!("--internal-bind must differ from --listen: parties must never reach the Ballista scheduler");
            }
            let options = ServeOptions {
                engine: EngineChoice::Ballista,
                executors: 0,
                internal_bind,
                partitions: Some(partitions.max(1)),
                executor_timeout: std::time::Duration::from_secs(executor_timeout),
                ..server_options(manifest, listen, server)?
            };
            run_server(&options, |running| {
                let joins = running.cluster.as_ref().map(|c| c.scheduler_addr.to_string()).unwrap_or_default();
                format!("cleanroom scheduler: Flight SQL on {} (executors join {joins}", flight_url(&options, running))
            })
            .await
        }
        Command::Executor { scheduler, bind, port, external_host, slots, work_dir, memory_limit, manifest, heartbeat_interval } => {
            let options = cleanroom_executor::process::ExecutorOptions {
                scheduler,
                bind,
                port,
                external_host,
                slots,
                work_dir,
                memory_limit,
                manifest,
                heartbeat_interval,
            };
            println!("cleanroom executor: shuffle service on {bind}:{port}, joining the scheduler at {}", options.scheduler);
            cleanroom_executor::process::run(&options).await?;
            eprintln!("cleanroom executor stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { sf, out, seed, quiet, vertical } => {
            if !(sf.is_finite() && sf > 0.0) {
                anyhow::bail!("--sf must be a number above 0, got {sf}");
            }
            let summary = cleanroom_bench::generate::generate(&cleanroom_bench::generate::GenerateOptions {
                scale_factor: sf,
                out_dir: out,
                seed,
                progress: !quiet,
                truth: true,
                vertical,
            })
            .await?;
            println!(
                "wrote {} {} and {} {} of {} people to {}",
                summary.impressions,
                summary.tables[0],
                summary.conversions,
                summary.tables[1],
                summary.people,
                summary.out_dir.display()
            );
            println!("  manifest:    {}", summary.out_dir.join("manifest.toml").display());
            println!("  credentials: {}", summary.out_dir.join("credentials.toml").display());
            println!("  truth:       {}", summary.out_dir.join("truth.json").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Upload(args) => upload::upload(args).await,
        Command::Study(args) => study::study(args).await,
        Command::Prepare(args) => tokio::task::spawn_blocking(move || prepare(args)).await?,
        Command::Budget { command } => tokio::task::spawn_blocking(move || operator::budget(command)).await?,
        Command::Audit { command } => tokio::task::spawn_blocking(move || operator::audit(command)).await?,
        Command::Manifest { command: ManifestCommand::Check { file } } => {
            let problems = cleanroom_manifest::Manifest::check(&file);
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
        Command::Manifest { command: ManifestCommand::HashPassword } => {
            let password = match std::env::var("CLEANROOM_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if password.is_empty() {
                anyhow::bail!("no password: set CLEANROOM_PASSWORD or write it on standard input");
            }
            println!("{}", cleanroom_manifest::hash_password(&password));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn prepare(args: PrepareArgs) -> anyhow::Result<ExitCode> {
    use cleanroom_prepare::identifier::{Country, Hasher, Kind, Normaliser};
    use cleanroom_prepare::InputFormat;
    let default_country = match &args.default_country {
        None => None,
        Some(code) => Some(Country::from_iso(code).ok_or_else(|| {
            anyhow::anyhow!("--default-country {code}: not a country this version knows; known: {}", Country::known())
        })?),
    };
    let kind = match args.kind {
        IdKind::Email => Kind::Email,
        IdKind::Phone => Kind::Phone,
    };
    if args.provider_rules && kind != Kind::Email {
        anyhow::bail!("--provider-rules applies to e-mail addresses only");
    }
    if default_country.is_some() && kind != Kind::Phone {
        anyhow::bail!("--default-country applies to phone numbers only");
    }
    let (hasher, key_fingerprint) = match (args.hash, &args.key_file) {
        (HashKind::HmacSha256, Some(path)) => {
            let key = cleanroom_prepare::load_key(path)?;
            (Hasher::hmac(&key), Some(cleanroom_prepare::key_fingerprint(&key)))
        }
        (HashKind::HmacSha256, None) => anyhow::bail!(
            "--key-file is needed: identifiers are hashed with HMAC-SHA256 under the collaboration key (or pass --hash sha256 for an ad-platform customer list)"
        ),
        (HashKind::Sha256, Some(_)) => anyhow::bail!("--hash sha256 uses no key: drop --key-file, or use --hash hmac-sha256"),
        (HashKind::Sha256, None) => (Hasher::Sha256, None),
    };
    let format = match args.format {
        Some(InputFormatArg::Csv) => InputFormat::Csv { delimiter: b',' },
        Some(InputFormatArg::Tsv) => InputFormat::Csv { delimiter: b'\t' },
        Some(InputFormatArg::Parquet) => InputFormat::Parquet,
        None => InputFormat::from_path(&args.input),
    };
    let options = cleanroom_prepare::PrepareOptions {
        input: args.input,
        format,
        id_column: args.id_column,
        uid_column: args.uid_column,
        normaliser: Normaliser { kind, provider_rules: args.provider_rules, default_country },
        hasher,
        key_fingerprint: key_fingerprint.clone(),
        out_dir: args.out,
        overwrite: args.overwrite,
        progress: !args.quiet && !args.json,
    };
    let report = cleanroom_prepare::prepare(&options)?;
    let seconds = report.elapsed.as_secs_f64();
    if args.json {
        let invalid: serde_json::Map<String, serde_json::Value> = report
            .invalid
            .iter()
            .map(|(reason, (n, rows))| (reason.describe().to_string(), serde_json::json!({ "rows": n, "first_rows": rows })))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "output": report.output,
                "rows_read": report.rows_read,
                "rows_written": report.rows_written,
                "invalid": report.invalid_total(),
                "invalid_by_reason": invalid,
                "duplicates": report.duplicates,
                "hash": options.hasher.name(),
                "key_fingerprint": key_fingerprint,
                "normalisation": options.normaliser.describe(),
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "read {} rows, wrote {} to {} in {seconds:.2} s ({:.0} rows/s)",
            report.rows_read,
            report.rows_written,
            report.output.display(),
            report.rows_read as f64 / seconds.max(1e-9)
        );
        println!("  identifiers: {}; hash: {}{}", options.normaliser.describe(), options.hasher.name(),
            key_fingerprint.map(|f| format!(", key fingerprint {f}")).unwrap_or_default());
        if report.invalid.is_empty() {
            println!("  invalid identifiers: none");
        } else {
            println!("  invalid identifiers (rows left out): {}", report.invalid_total());
            for (reason, (n, rows)) in &report.invalid {
                let rows = rows.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
                let noun = if *n == 1 { "row" } else { "rows" };
                println!("    {}: {n} (first at data {noun} {rows})", reason.describe());
            }
        }
        println!("  duplicates: {} rows repeat an identifier of an earlier row (kept)", report.duplicates);
    }
    Ok(ExitCode::SUCCESS)
}
