//! `cleanroom-bench`: times AdBench Q4 on plain single-process DataFusion (the
//! baseline), the DP planner's rewritten plan on the same in-process
//! DataFusion, and cleanroom's whole DP path (Flight SQL gateway → DP planner
//! → embedded Ballista cluster → release), in the same run, and prints the
//! ratios. A benchmark, not a test: run it on a quiet machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_flight::sql::client::FlightSqlServiceClient;
use clap::Parser;
use cleanroom_bench::generate::{generate, GenerateOptions};
use cleanroom_bench::queries::{adbench_queries, register_adbench_tables};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Time AdBench Q4 (reach per channel): plain DataFusion vs cleanroom's DP path")]
struct Args {
    /// Scale factors to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,1")]
    sf: Vec<f64>,
    /// Where generated data is kept between runs.
    #[arg(long, default_value = "bench-data")]
    data_dir: PathBuf,
    /// Timed runs per query (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// In-process Ballista executors for the DP path.
    #[arg(long, default_value_t = 2)]
    executors: usize,
    /// Only time the plain SQL of every AdBench query on in-process
    /// DataFusion and print one JSON line per scale factor and query
    /// (`{"sf", "system": "datafusion", "query", "ms": [...]}`): the
    /// DataFusion column of `benchmarks/run.py`.
    #[arg(long)]
    plain_json: bool,
}

/// The DP form of Q4: people and impressions per channel, the average
/// frequency computed from the two noisy counts (post-processing). Each run
/// asks with a slightly different ε, so that no run is answered from the
/// released-answer cache.
fn dp_q4(run: usize) -> String {
    format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {}, max_groups_contributed = 5) \
         channel, COUNT(DISTINCT uid) AS users, COUNT(*) AS impressions, \
         CAST(COUNT(*) AS DOUBLE) / COUNT(DISTINCT uid) AS avg_frequency \
         FROM impressions GROUP BY channel ORDER BY channel",
        1.0 + run as f64 * 1e-6
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.plain_json {
        return plain_json(&args).await;
    }
    let plain_q4 = adbench_queries()
        .into_iter()
        .find(|(name, _)| name == "Q4_reach_frequency")
        .context("Q4 missing from the query suite")?
        .1;
    println!(
        "{:>6} {:>10} {:>14} {:>12} {:>10} {:>14}",
        "sf", "plain_ms", "dp_inproc_ms", "dp_path_ms", "dp/plain", "dp/dp_inproc"
    );
    for sf in &args.sf {
        let dir = args.data_dir.join(format!("sf-{sf}"));
        if !dir.join("truth.json").exists() {
            eprintln!("generating AdBench SF {sf} in {}", dir.display());
            generate(&GenerateOptions { scale_factor: *sf, out_dir: dir.clone(), seed: 42, progress: true }).await?;
        }

        let ctx = SessionContext::new();
        register_adbench_tables(&ctx, &dir).await?;
        let mut plain = Vec::new();
        for run in 0..=args.runs {
            let start = Instant::now();
            ctx.sql(&plain_q4).await?.collect().await?;
            if run > 0 {
                plain.push(start.elapsed());
            }
        }

        // The DP rewrite alone, on the same in-process DataFusion: separates the
        // cost of contribution bounding from the cost of Ballista and Flight.
        let manifest = cleanroom_manifest::Manifest::load(&dir.join("manifest.toml"))?;
        let policy = manifest.policy_for("adnetwork");
        let mut inproc = Vec::new();
        for run in 0..=args.runs {
            let start = Instant::now();
            let cleanroom_dp::rewrite::PlannedQuery::Dp(query) =
                cleanroom_dp::plan_sql(&ctx.state(), &dp_q4(run), &policy, &Default::default()).await?
            else {
                anyhow::bail!("Q4 is not a DP query");
            };
            ctx.execute_logical_plan(query.exact_plan.clone()).await?.collect().await?;
            if run > 0 {
                inproc.push(start.elapsed());
            }
        }

        // The DP path pays ε per run: give the benchmark its own manifest copy
        // (beside the generated one, so relative locations still resolve) with
        // a budget that cannot run out.
        let manifest = std::fs::read_to_string(dir.join("manifest.toml"))?;
        let bench_manifest = dir.join("bench-manifest.toml");
        let mut text = String::new();
        for line in manifest.lines() {
            if line.trim_start().starts_with("epsilon_budget") {
                text.push_str("epsilon_budget = 1000000000.0\n");
            } else {
                text.push_str(line);
                text.push('\n');
            }
        }
        std::fs::write(&bench_manifest, text)?;
        let state = tempfile::tempdir()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = cleanroom_scheduler::serve::start(
            &cleanroom_scheduler::serve::ServeOptions {
                listen: "127.0.0.1:0".parse()?,
                engine: cleanroom_scheduler::serve::EngineChoice::Ballista,
                executors: args.executors,
                state_dir: Some(state.path().to_path_buf()),
                ..cleanroom_scheduler::serve::ServeOptions::standalone(bench_manifest)
            },
            async move {
                let _ = stopped.await;
            },
        )
        .await?;
        let password = demo_password(&dir, "adnetwork")?;
        let channel = Channel::from_shared(format!("http://{}", running.addr))?.connect().await?;
        let mut client = FlightSqlServiceClient::new(channel);
        client.handshake("adnetwork", &password).await?;
        let mut dp = Vec::new();
        for run in 0..=args.runs {
            let start = Instant::now();
            let info = client.execute(dp_q4(run), None).await?;
            for endpoint in info.endpoint {
                let ticket = endpoint.ticket.context("no ticket")?;
                client.do_get(ticket).await?.try_collect::<Vec<_>>().await?;
            }
            if run > 0 {
                dp.push(start.elapsed());
            }
        }
        let _ = stop.send(());
        running.wait().await?;

        let (p, i, d) = (median(plain), median(inproc), median(dp));
        println!(
            "{:>6} {:>10.1} {:>14.1} {:>12.1} {:>10.2} {:>14.2}",
            sf,
            p.as_secs_f64() * 1e3,
            i.as_secs_f64() * 1e3,
            d.as_secs_f64() * 1e3,
            d.as_secs_f64() / p.as_secs_f64(),
            d.as_secs_f64() / i.as_secs_f64()
        );
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

fn demo_password(dir: &std::path::Path, party: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(dir.join("credentials.toml"))?;
    let value: toml::Value = toml::from_str(&text)?;
    value["parties"][party]["password"]
        .as_str()
        .map(str::to_string)
        .context("no demo password for the party")
}
