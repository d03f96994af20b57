//! `cleanroom study <kind>`: run a study over Flight SQL — the same
//! `SELECT * FROM <kind>(…)` table function every client can call — and
//! print its figures as a table or as JSON.

use arrow::array::RecordBatch;
use futures::TryStreamExt;

#[derive(clap::Args)]
pub struct StudyArgs {
    /// The study: lift (incrementality of a test group over its hold-out),
    /// attribution (outcomes credited to touches, net value and commission
    /// per campaign, channel or affiliate), reach (people reached per
    /// channel and pair of channels, and how often), cohorts (people by
    /// first-exposure period and their outcomes in the periods after),
    /// match_rate (people of two datasets, and in both).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(cleanroom_dp::studies::STUDIES))]
    kind: String,
    /// The server and the party running the study (it is charged).
    #[command(flatten)]
    connection: crate::connection::Connection,
    /// A study parameter, NAME=VALUE (repeatable); those left out come from
    /// the manifest's [studies.<kind>]. For lift: exposure, outcome, group,
    /// control, time, outcome_time, window_days, value, value_cap,
    /// expected_rate, epsilon; for attribution: touches, outcome, credit,
    /// model (last, first, linear), time, outcome_time, window_days, value,
    /// value_cap, returns, commission_rate, conversions_cap,
    /// groups_per_person, epsilon; for reach: exposure, channel, buckets,
    /// epsilon; for cohorts: exposure, outcome, time, outcome_time, period
    /// (day, week, month), periods, value, value_cap, epsilon; for
    /// match_rate: left, right, epsilon.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Print the figures as JSON (one object per row) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the report: one self-contained HTML file with the
    /// figures, their intervals, plots and the privacy cost.
    #[arg(long, value_name = "FILE.html")]
    report: Option<std::path::PathBuf>,
}

/// The study call, with each parameter as a text literal.
fn call(kind: &str, params: &[String]) -> anyhow::Result<String> {
    let mut args = Vec::new();
    for p in params {
        let (name, value) = p.split_once('=').ok_or_else(|| anyhow::anyhow!("--param {p}: expected NAME=VALUE"))?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            anyhow::bail!("--param {p}: a parameter name is letters, digits and _");
        }
        args.push(format!("{name} => '{}'", value.trim().replace('\'', "''")));
    }
    Ok(format!("SELECT * FROM {kind}({})", args.join(", ")))
}

pub async fn study(args: StudyArgs) -> anyhow::Result<std::process::ExitCode> {
    let sql = call(&args.kind, &args.params)?;
    let mut client = args.connection.client().await?;
    eprintln!("planning the {} study: {sql}", args.kind);
    // A spinner with the time so far while the server plans, charges and
    // runs the study (drawn only on a terminal).
    let progress = indicatif::ProgressBar::new_spinner()
        .with_style(indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"))
        .with_message(format!("planning the {} study", args.kind));
    progress.enable_steady_tick(std::time::Duration::from_millis(120));
    let fetched = fetch(&mut client, &sql, &args.kind, &progress).await;
    progress.finish_and_clear();
    let batches = fetched?;
    if let Some(path) = &args.report {
        let html = match args.kind.as_str() {
            "lift" => crate::report::lift(&sql, &args.connection.party, &batches)?,
            "match_rate" => crate::report::match_rate(&sql, &args.connection.party, &batches)?,
            "reach" => crate::report::reach(&sql, &args.connection.party, &batches)?,
            "attribution" => crate::report::attribution(&sql, &args.connection.party, &batches)?,
            "cohorts" => crate::report::cohorts(&sql, &args.connection.party, &batches)?,
            other => anyhow::bail!("no report for the {other} study"),
        };
        std::fs::write(path, html).map_err(|e| anyhow::anyhow!("cannot write the report to {}: {e}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if args.json {
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        for b in &batches {
            writer.write(b)?;
        }
        writer.finish()?;
        let rows = writer.into_inner();
        println!("{}", if rows.is_empty() { "[]".to_string() } else { String::from_utf8(rows)? });
    } else {
        println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
        if let Some(b) = batches.first() {
            let meta = b.schema().metadata().clone();
            if let (Some(charged), Some(left)) = (meta.get("cleanroom.charge.epsilon"), meta.get("cleanroom.budget.remaining_epsilon")) {
                eprintln!("privacy cost: epsilon {charged}; {left} left in {}'s budget", args.connection.party);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The study's answer: the statement's charge (said on stderr) and its rows,
/// the spinner saying what is under way.
async fn fetch(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
    kind: &str,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<RecordBatch>> {
    let info = client.execute(sql.to_string(), None).await.map_err(|e| anyhow::anyhow!("the study was refused: {}", message(&e)))?;
    progress.set_message(format!("running the {kind} study"));
    if let Some(charge) = info.clone().try_decode_schema().ok().and_then(|s| s.metadata().get("cleanroom.charge.epsilon").cloned()) {
        progress.suspend(|| eprintln!("running it: epsilon {charge} is charged once (nothing if the same study was already answered)"));
    }
    let mut batches: Vec<RecordBatch> = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("the server sent an endpoint without a ticket"))?;
        let stream = client.do_get(ticket).await.map_err(|e| anyhow::anyhow!("the study failed: {}", message(&e)))?;
        batches.extend(stream.try_collect::<Vec<_>>().await.map_err(|e| anyhow::anyhow!("the study failed: {e}"))?);
        progress.set_message(format!("received {} rows", batches.iter().map(|b| b.num_rows()).sum::<usize>()));
    }
    Ok(batches)
}

/// What the server said, without the transport's wrapping.
fn message(e: &arrow_flight::error::FlightError) -> String {
    match e {
        arrow_flight::error::FlightError::Tonic(status) => status.message().to_string(),
        e => e.to_string(),
    }
}
