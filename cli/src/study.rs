//! `cleanroom study <kind>`: run a study over Flight SQL — the same
//! `SELECT * FROM <kind>(…)` table function every client can call — and
//! print its figures as a table or as JSON.

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct StudyArgs {
    /// The study: lift (incrementality of a test group over its hold-out).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(cleanroom_dp::studies::STUDIES))]
    kind: String,
    /// The clean room's Flight SQL address.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    server: String,
    /// The party running the study (it is charged).
    #[arg(long, env = "CLEANROOM_PARTY")]
    party: String,
    /// The party's password; read from this environment variable.
    #[arg(long, env = "CLEANROOM_PASSWORD", hide_env_values = true)]
    password: String,
    /// A study parameter, NAME=VALUE (repeatable); those left out come from
    /// the manifest's [studies.<kind>]. For lift: exposure, outcome, group,
    /// control, time, outcome_time, window_days, value, value_cap, epsilon.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Print the figures as JSON (one object per row) instead of a table.
    #[arg(long)]
    json: bool,
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
    let endpoint = args
        .server
        .strip_prefix("grpc://")
        .map(|rest| format!("http://{rest}"))
        .ok_or_else(|| anyhow::anyhow!("--server must look like grpc://host:port"))?;
    let channel = Channel::from_shared(endpoint)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the clean room at {}", args.server))?;
    let mut client = FlightSqlServiceClient::new(channel);
    client.handshake(&args.party, &args.password).await.map_err(|e| anyhow::anyhow!("cannot log in as {}: {e}", args.party))?;
    eprintln!("planning the {} study: {sql}", args.kind);
    let info = client.execute(sql, None).await.map_err(|e| anyhow::anyhow!("the study was refused: {}", message(&e)))?;
    let schema = info.clone().try_decode_schema().ok();
    if let Some(schema) = &schema {
        if let Some(charge) = schema.metadata().get("cleanroom.charge.epsilon") {
            eprintln!("running it: epsilon {charge} is charged once (nothing if the same study was already answered)");
        }
    }
    let mut batches: Vec<RecordBatch> = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("the server sent an endpoint without a ticket"))?;
        let stream = client.do_get(ticket).await.map_err(|e| anyhow::anyhow!("the study failed: {}", message(&e)))?;
        batches.extend(stream.try_collect::<Vec<_>>().await.map_err(|e| anyhow::anyhow!("the study failed: {e}"))?);
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
                eprintln!("privacy cost: epsilon {charged}; {left} left in {}'s budget", args.party);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// What the server said, without the transport's wrapping.
fn message(e: &arrow_flight::error::FlightError) -> String {
    match e {
        arrow_flight::error::FlightError::Tonic(status) => status.message().to_string(),
        e => e.to_string(),
    }
}
