//! `cleanroom-bench`: the parts of the AdBench benchmark that run inside one
//! process. `--plain-json` times each query's plain SQL on in-process
//! DataFusion (a column of `benchmarks/run.py`'s table); `--profile` runs each
//! DP query's rewritten plan (the exact, contribution-bounded aggregates the
//! DP path computes before noise) on the in-process engine's session, beside
//! the plain SQL on plain DataFusion, and prints both plans with the metrics
//! of every operator: where the DP path's time goes. A benchmark, not a test:
//! run it on a quiet machine, on data `cleanroom generate` wrote.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use cleanroom_bench::queries::{adbench_dp_queries, adbench_queries, register_adbench_tables};
use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;

#[derive(Parser)]
#[command(about = "AdBench inside one process: plain SQL timings (--plain-json) and per-operator profiles of the DP plans (--profile)")]
struct Args {
    /// Scale factors to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,1")]
    sf: Vec<f64>,
    /// Where generated data is kept (`DIR/sf-<SF>/`, as `benchmarks/run.py` writes it).
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// Timed runs per query (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Time the plain SQL of every AdBench query on in-process DataFusion
    /// and print one JSON line per scale factor and query
    /// (`{"sf", "system": "datafusion", "query", "ms": [...]}`): the
    /// DataFusion column of `benchmarks/run.py`.
    #[arg(long, conflicts_with = "profile")]
    plain_json: bool,
    /// Print, per AdBench query, the plain plan and the DP plan with the
    /// metrics of each operator (rows, time, memory, spills).
    #[arg(long)]
    profile: bool,
    /// Only these queries (name prefixes, e.g. `Q3,Q5`).
    #[arg(long, value_delimiter = ',')]
    query: Vec<String>,
    /// The party whose catalog and policy the DP plans use.
    #[arg(long, default_value = "advertiser")]
    party: String,
    /// DataFusion settings for the DP session (`key=value`, repeatable), to
    /// try a setting before making it the engine's.
    #[arg(long = "set")]
    settings: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.plain_json {
        plain_json(&args).await
    } else if args.profile {
        profile(&args).await
    } else {
        anyhow::bail!("say what to run: --plain-json or --profile (the whole benchmark is `python3 benchmarks/run.py`)")
    }
}

fn wanted(args: &Args, name: &str) -> bool {
    args.query.is_empty() || args.query.iter().any(|q| name.starts_with(q.as_str()))
}

/// Runs `plan` `runs` times after a warm-up; the median milliseconds and the
/// plan of the last run, whose operators carry that run's metrics.
async fn timed(
    runs: usize,
    mut plan: impl AsyncFnMut() -> anyhow::Result<(Arc<dyn ExecutionPlan>, Arc<datafusion::execution::TaskContext>)>,
) -> anyhow::Result<(f64, Arc<dyn ExecutionPlan>)> {
    let mut ms = Vec::new();
    let mut last = None;
    for run in 0..=runs {
        let (physical, task) = plan().await?;
        let start = Instant::now();
        collect(physical.clone(), task).await?;
        if run > 0 {
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        last = Some(physical);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], last.expect("at least one run")))
}

/// Per AdBench query: the plain SQL on plain DataFusion and the DP query's
/// exact plan on the session the in-process engine gives a party, each timed
/// (execution only, planning apart) and printed with per-operator metrics.
async fn profile(args: &Args) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for sf in &args.sf {
        let dir = args.data_dir.join(format!("sf-{sf}"));
        anyhow::ensure!(dir.join("manifest.toml").exists(), "no AdBench data in {}: generate it first", dir.display());
        let plain = SessionContext::new();
        register_adbench_tables(&plain, &dir).await?;

        let manifest = Arc::new(cleanroom_manifest::Manifest::load(&dir.join("manifest.toml"))?);
        // One query at a time here, with the whole default memory.
        let engine = cleanroom_scheduler::engine::InProcess::new(
            cleanroom_executor::in_process_runtime(cleanroom_executor::default_memory_limit(), None)?,
            1,
        );
        let mut state = engine.session_state(cleanroom_executor::session_state(cores));
        for setting in &args.settings {
            let (key, value) = setting.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {setting}: expected key=value"))?;
            state.config_mut().options_mut().set(key, value)?;
        }
        let catalog = Arc::new(cleanroom_storage::catalog::Catalog::open(manifest.clone(), &state).await?);
        let ctx = SessionContext::new_with_state(state);
        catalog.register_for(&args.party, &ctx)?;
        let policy = manifest.policy_for(&args.party);

        let plain_sql: std::collections::HashMap<String, String> = adbench_queries().into_iter().collect();
        for (name, dp_sql) in adbench_dp_queries() {
            if !wanted(args, &name) {
                continue;
            }
            let sql = plain_sql.get(&name).ok_or_else(|| anyhow::anyhow!("{name}: no plain SQL"))?;
            let (plain_ms, plain_plan) = timed(args.runs, async || {
                let physical = plain.sql(sql).await?.create_physical_plan().await?;
                Ok((physical, plain.task_ctx()))
            })
            .await?;
            let (dp_ms, dp_plan) = timed(args.runs, async || {
                let cleanroom_dp::rewrite::PlannedQuery::Dp(query) =
                    cleanroom_dp::plan_sql(&ctx.state(), &dp_sql, &policy, &Default::default()).await?
                else {
                    anyhow::bail!("{name} is not a DP query");
                };
                let physical = ctx.state().create_physical_plan(&query.exact_plan).await?;
                Ok((physical, ctx.task_ctx()))
            })
            .await?;
            println!("## SF {sf} {name}: plain {plain_ms:.1} ms, DP exact plan {dp_ms:.1} ms ({:.2}×)\n", dp_ms / plain_ms);
            println!("DP exact plan on the in-process engine:\n{}", DisplayableExecutionPlan::with_metrics(dp_plan.as_ref()).indent(true));
            println!("plain SQL on DataFusion:\n{}", DisplayableExecutionPlan::with_metrics(plain_plan.as_ref()).indent(true));
        }
    }
    Ok(())
}

/// Time each AdBench query's plain SQL on in-process DataFusion (one
/// warm-up run, then `runs` timed runs) on already generated data.
async fn plain_json(args: &Args) -> anyhow::Result<()> {
    for sf in &args.sf {
        let dir = args.data_dir.join(format!("sf-{sf}"));
        anyhow::ensure!(dir.join("manifest.toml").exists(), "no AdBench data in {}: generate it first", dir.display());
        let ctx = SessionContext::new();
        register_adbench_tables(&ctx, &dir).await?;
        for (name, sql) in adbench_queries() {
            let mut ms = Vec::new();
            for run in 0..=args.runs {
                let start = Instant::now();
                ctx.sql(&sql).await?.collect().await?;
                if run > 0 {
                    ms.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            println!("{}", serde_json::json!({ "sf": sf, "system": "datafusion", "query": name, "ms": ms }));
        }
    }
    Ok(())
}
