//! Uploads over Flight SQL bulk ingest, as a data owner's tool sends them:
//! committed as new data versions that queries read; refused, cut or crashed
//! uploads leave the previous version answering exactly as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Float64Type, Int64Type, Schema};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{TableExistsOption, TableNotExistOption};
use arrow_flight::sql::TableDefinitionOptions;
use arrow_flight::sql::CommandStatementIngest;
use cleanroom_ledger::audit;
use cleanroom_ledger::{Ledger, RedbLedger};
use futures::StreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tonic::transport::Channel;

/// The engine `serve` runs queries on in these tests.
const ENGINE: &str = "ballista";

#[path = "support/server.rs"]
mod server;
use server::*;

/// The demo collaboration with its own copy of the conversions (uploads
/// change them) and an empty `crm` dataset owned by the advertiser.
fn private_collaboration(name: &str) -> (PathBuf, PathBuf) {
    let root = tempfile::Builder::new().prefix(name).tempdir().unwrap().keep();
    let conversions = root.join("conversions");
    std::fs::create_dir_all(&conversions).unwrap();
    for entry in std::fs::read_dir(demo().join("data/conversions")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), conversions.join(entry.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(demo().join("manifest.toml"))
        .unwrap()
        .replace("location = \"data/conversions/\"", &format!("location = \"{}/\"", conversions.display()))
        .replace("location = \"data/", &format!("location = \"{}/data/", demo().display()));
    let text = format!(
        "{text}\n[[datasets]]\nname = \"crm\"\nowner = \"advertiser\"\nlocation = \"{}/crm/\"\nformat = \"parquet\"\nprivacy_unit = \"uid\"\nreaders = [\"advertiser\", \"adnetwork\"]\n\n[datasets.columns]\nuid = {{ role = \"join_key\" }}\nsegment = {{ role = \"dimension\", domain = [\"gold\", \"silver\"] }}\n",
        root.display()
    );
    let manifest = root.join("manifest.toml");
    std::fs::write(&manifest, text).unwrap();
    (manifest, conversions)
}

/// The first `n` conversions of the demo, each given a new person.
fn new_conversions(n: usize, tag: &str) -> RecordBatch {
    let mut batches = Vec::new();
    for path in std::fs::read_dir(demo().join("data/conversions")).unwrap().map(|e| e.unwrap().path()) {
        if path.extension().is_some_and(|e| e == "parquet") {
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap().build().unwrap();
            batches.extend(reader.map(Result::unwrap));
        }
    }
    let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert!(all.num_rows() >= n, "the demo has {} conversions", all.num_rows());
    let batch = all.slice(0, n);
    let uids = StringArray::from_iter_values((0..n).map(|i| {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(format!("{tag}-{i}")))
    }));
    let mut columns = batch.columns().to_vec();
    let at = batch.schema().index_of("uid").unwrap();
    columns[at] = Arc::new(uids);
    RecordBatch::try_new(batch.schema(), columns).unwrap()
}

fn ingest_command(table: &str, if_exists: TableExistsOption) -> CommandStatementIngest {
    CommandStatementIngest {
        table_definition_options: Some(TableDefinitionOptions { if_not_exist: TableNotExistOption::Fail as i32, if_exists: if_exists as i32 }),
        table: table.to_string(),
        ..Default::default()
    }
}

async fn upload(client: &mut FlightSqlServiceClient<Channel>, table: &str, mode: TableExistsOption, batches: Vec<RecordBatch>) -> Result<i64, tonic::Status> {
    client
        .execute_ingest(ingest_command(table, mode), futures::stream::iter(batches.into_iter().map(Ok)))
        .await
        .map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            e => tonic::Status::unknown(e.to_string()),
        })
}

const COUNT: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_contributions_per_group = 1) COUNT(*) AS n FROM conversions";

/// The noisy count, its 95 % half-width, and the answer's receipt.
async fn noisy_count(client: &mut FlightSqlServiceClient<Channel>) -> (f64, f64, String) {
    let batches = query(client, COUNT).await.unwrap();
    let schema = batches[0].schema();
    let column = batches[0].column(0);
    let n = match column.data_type() {
        arrow::datatypes::DataType::Int64 => column.as_primitive::<Int64Type>().value(0) as f64,
        _ => column.as_primitive::<Float64Type>().value(0),
    };
    let half: f64 = schema.field(0).metadata()["cleanroom.ci95.half_width"].parse().unwrap();
    (n, half, schema.metadata()["cleanroom.receipt"].clone())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn owner_uploads_commit_new_versions_that_queries_read() {
    let (manifest, conversions) = private_collaboration("upload-ok");
    let state = state_dir("upload-ok");
    let server = Server::start_with(&manifest, &state);
    let mut client = server.login("advertiser").await;
    let (before, h0, _) = noisy_count(&mut client).await;

    let added = upload(&mut client, "conversions", TableExistsOption::Append, vec![new_conversions(2000, "a"), new_conversions(1000, "b")]).await.unwrap();
    assert_eq!(added, 3000);
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(conversions.join("_versions/00000000000000000001.json")).unwrap()).unwrap();
    assert_eq!((record["number"].as_u64(), record["mode"].as_str(), record["rows_added"].as_u64()), (Some(1), Some("append"), Some(3000)));
    let (after, h1, _) = noisy_count(&mut client).await;
    assert!((after - before - 3000.0).abs() <= 2.0 * (h0 + h1), "appended 3000 rows: {before} -> {after}");

    let replaced = upload(&mut client, "conversions", TableExistsOption::Replace, vec![new_conversions(500, "c")]).await.unwrap();
    assert_eq!(replaced, 500);
    let (now, h2, _) = noisy_count(&mut client).await;
    assert!((now - 500.0).abs() <= 2.0 * h2, "replaced by 500 rows: {now}");
    // The other party reads the new version too.
    let mut network = server.login("adnetwork").await;
    let (seen, h3, _) = noisy_count(&mut network).await;
    assert!((seen - 500.0).abs() <= 2.0 * h3, "{seen}");
    server.kill();
    // After a restart the newest version is still the one read.
    let server = Server::start_with(&manifest, &state);
    let mut client = server.login("advertiser").await;
    let (again, h4, _) = noisy_count(&mut client).await;
    assert!((again - 500.0).abs() <= 2.0 * h4, "{again}");
    println!("append 3000: {before:.0} -> {after:.0}; replace by 500: {now:.0}; after restart {again:.0}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_cut_and_crashed_uploads_leave_the_previous_version_answering() {
    let (manifest, conversions) = private_collaboration("upload-refused");
    let state = state_dir("upload-refused");
    let server = Server::start_with(&manifest, &state);
    let mut owner = server.login("advertiser").await;
    let (n, _, receipt) = noisy_count(&mut owner).await;

    // Not the owner.
    let mut other = server.login("adnetwork").await;
    let err = upload(&mut other, "conversions", TableExistsOption::Append, vec![new_conversions(10, "x")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("only its owner, `advertiser`, may"), "{err}");
    // No mode that says what to do with the existing rows.
    let err = upload(&mut owner, "conversions", TableExistsOption::Fail, vec![new_conversions(10, "x")]).await.unwrap_err();
    assert!(err.message().contains("mode 'append'"), "{err}");
    // A column missing.
    let good = new_conversions(10, "x");
    let without_revenue = good.project(&(0..good.num_columns()).filter(|&i| good.schema().field(i).name() != "revenue").collect::<Vec<_>>()).unwrap();
    let err = upload(&mut owner, "conversions", TableExistsOption::Append, vec![without_revenue]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("missing [revenue]"), "{err}");
    // Identifiers that are not the collaboration's hashed format, in a later batch.
    let mut columns = good.columns().to_vec();
    let at = good.schema().index_of("uid").unwrap();
    columns[at] = Arc::new(StringArray::from_iter_values((0..10).map(|i| format!("person{i}@example.com"))));
    let raw_ids = RecordBatch::try_new(good.schema(), columns).unwrap();
    let err = upload(&mut owner, "conversions", TableExistsOption::Append, vec![new_conversions(100, "y"), raw_ids]).await.unwrap_err();
    assert!(err.message().contains("column `uid` at row 101 is not the collaboration's hashed identifier"), "{err}");
    // A type that does not fit.
    let schema = Schema::new(good.schema().fields().iter().map(|f| {
        if f.name() == "revenue" { Arc::new(f.as_ref().clone().with_data_type(arrow::datatypes::DataType::Utf8)) } else { f.clone() }
    }).collect::<Vec<_>>());
    let mut columns = good.columns().to_vec();
    let at = good.schema().index_of("revenue").unwrap();
    columns[at] = Arc::new(StringArray::from_iter_values((0..10).map(|i| i.to_string())));
    let err = upload(&mut owner, "conversions", TableExistsOption::Append, vec![RecordBatch::try_new(Arc::new(schema), columns).unwrap()]).await.unwrap_err();
    assert!(err.message().contains("column `revenue` has type Utf8"), "{err}");
    // A dataset name outside cleanroom's catalog.
    let mut elsewhere = ingest_command("conversions", TableExistsOption::Append);
    elsewhere.catalog = Some("warehouse".into());
    let err = owner
        .execute_ingest(elsewhere, futures::stream::iter([Ok(new_conversions(10, "x"))]))
        .await
        .map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            e => tonic::Status::unknown(e.to_string()),
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("catalog `warehouse` does not exist: datasets are in catalog `cleanroom`"), "{err}");
    // A stream that is not Arrow IPC.
    {
        use arrow_flight::sql::ProstMessageExt;
        use prost::Message;
        let descriptor = arrow_flight::FlightDescriptor::new_cmd(ingest_command("conversions", TableExistsOption::Append).as_any().encode_to_vec());
        let garbage = arrow_flight::FlightData::new().with_descriptor(descriptor).with_data_header(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        let err = match owner.do_put(futures::stream::iter([garbage])).await {
            Ok(mut results) => loop {
                match results.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => break status,
                    None => panic!("an undecodable upload was accepted"),
                }
            },
            Err(e) => tonic::Status::unknown(e.to_string()),
        };
        assert!(err.message().contains("cannot decode the upload"), "{err}");
    }

    // The connection cut mid-upload: a client that sends two batches and dies.
    let mut cut = server.login("advertiser").await;
    let stream = futures::stream::iter(vec![Ok(new_conversions(1000, "z")), Ok(new_conversions(1000, "w"))]).chain(futures::stream::pending());
    let task = tokio::spawn(async move { cut.execute_ingest(ingest_command("conversions", TableExistsOption::Append), stream).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let started = Instant::now();
    while files_under(&conversions.join("_uploads")).iter().any(|p| p.extension().is_some_and(|e| e == "parquet")) {
        assert!(started.elapsed() < Duration::from_secs(20), "the cut upload's files stay: {:?}", files_under(&conversions.join("_uploads")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!conversions.join("_versions").exists(), "nothing was committed");
    // The same question gets the very same answer: same data version, no new charge.
    let (n2, _, receipt2) = noisy_count(&mut owner).await;
    assert_eq!((n2, &receipt2), (n, &receipt));

    // A crash mid-upload: kill -9 while a client is still sending.
    let mut crashing = server.login("advertiser").await;
    let stream = futures::stream::iter((0..3).map(|i| Ok(new_conversions(1000, &format!("k{i}"))))).chain(futures::stream::pending());
    let _task = tokio::spawn(async move { crashing.execute_ingest(ingest_command("conversions", TableExistsOption::Append), stream).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.kill();
    let ledger = RedbLedger::open(&state).unwrap();
    let refusals: Vec<String> = ledger
        .audit_records(0)
        .unwrap()
        .iter()
        .map(|(_, b)| audit::parse(b).unwrap())
        .filter(|r| r.kind == "refusal" && r.detail.get("upload").is_some())
        .map(|r| r.detail["rule"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(refusals, ["upload_owner", "upload_mode", "upload_schema", "upload_schema", "upload_schema", "upload_target", "upload_format"]);
    let failures = ledger.audit_records(0).unwrap().iter().filter(|(_, b)| audit::parse(b).unwrap().kind == "upload_failure").count();
    assert_eq!(failures, 1, "the cut upload is on the audit log: {}", std::fs::read_to_string(state.with_extension("log")).unwrap());
    drop(ledger);
    let server = Server::start_with(&manifest, &state);
    assert!(
        !files_under(&conversions.join("_uploads")).iter().any(|p| p.extension().is_some_and(|e| e == "parquet")),
        "a restart collects what the crashed upload wrote"
    );
    assert!(!conversions.join("_versions").exists());
    let mut owner = server.login("advertiser").await;
    let (n3, _, receipt3) = noisy_count(&mut owner).await;
    assert_eq!((n3, &receipt3), (n, &receipt), "after the crash the same version answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dataset_without_data_takes_its_schema_from_the_first_upload() {
    let (manifest, _) = private_collaboration("upload-first");
    let server = Server::start_with(&manifest, &state_dir("upload-first"));
    let mut owner = server.login("advertiser").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) segment, COUNT(*) AS n FROM crm GROUP BY segment ORDER BY segment";
    let err = query(&mut owner, sql).await.unwrap_err();
    assert!(err.message().contains("crm"), "{err}");
    let uids = StringArray::from_iter_values((0..4000).map(|i| {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(format!("crm-{i}")))
    }));
    let segments = StringArray::from_iter_values((0..4000).map(|i| if i % 4 == 0 { "gold" } else { "silver" }));
    let batch = RecordBatch::try_from_iter(vec![("uid", Arc::new(uids) as _), ("segment", Arc::new(segments) as _)]).unwrap();
    assert_eq!(upload(&mut owner, "crm", TableExistsOption::Append, vec![batch]).await.unwrap(), 4000);
    let batches = query(&mut owner, sql).await.unwrap();
    let counts = batches[0].column(1).as_primitive::<Int64Type>();
    assert!((counts.value(0) - 1000).abs() < 100 && (counts.value(1) - 3000).abs() < 100, "{counts:?}");
    // A first upload without the privacy unit is refused.
    let (manifest, _) = private_collaboration("upload-first-bad");
    let server = Server::start_with(&manifest, &state_dir("upload-first-bad"));
    let mut owner = server.login("advertiser").await;
    let batch = RecordBatch::try_from_iter(vec![("segment", Arc::new(StringArray::from(vec!["gold"])) as _)]).unwrap();
    let err = upload(&mut owner, "crm", TableExistsOption::Append, vec![batch]).await.unwrap_err();
    assert!(err.message().contains("no column `uid`"), "{err}");
}

/// All rows of the Parquet files directly in `dir` (not in subfolders).
fn rows_in(dir: &Path, recursive: bool) -> Vec<RecordBatch> {
    let files = if recursive { files_under(dir) } else { std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect() };
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .flat_map(|p| ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap()).unwrap().build().unwrap().map(Result::unwrap))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_past_the_retention_period_are_deleted_at_start_and_audited() {
    let (manifest, conversions) = private_collaboration("retention");
    // A period that ends on 2026-03-01 (day 20513), mid-way through the demo's conversions.
    let today = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let days = today - 20_513;
    let text = std::fs::read_to_string(&manifest).unwrap().replace(
        &format!("location = \"{}/\"", conversions.display()),
        &format!("location = \"{}/\"\nretention = {{ column = \"ts\", days = {days} }}", conversions.display()),
    );
    std::fs::write(&manifest, text).unwrap();
    let originals: Vec<PathBuf> = std::fs::read_dir(&conversions).unwrap().map(|e| e.unwrap().path()).collect();
    let before: usize = rows_in(&conversions, false).iter().map(RecordBatch::num_rows).sum();
    let cutoff_micros = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - days * 86_400) as i64 * 1_000_000;

    let state = state_dir("retention");
    let server = Server::start_with(&manifest, &state);
    let mut client = server.login("advertiser").await;
    let (n, half, _) = noisy_count(&mut client).await;
    server.kill();

    for original in &originals {
        assert!(!original.exists(), "{} held expired rows and is deleted", original.display());
    }
    let kept = rows_in(&conversions, true);
    let after: usize = kept.iter().map(RecordBatch::num_rows).sum();
    for batch in &kept {
        let ts = arrow::compute::cast(batch.column_by_name("ts").unwrap(), &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None)).unwrap();
        let ts = ts.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert!(ts.iter().flatten().all(|t| t >= cutoff_micros), "only rows within the period are kept");
    }
    let ledger = RedbLedger::open(&state).unwrap();
    let records: Vec<audit::AuditRecord> = ledger.audit_records(0).unwrap().iter().map(|(_, b)| audit::parse(b).unwrap()).filter(|r| r.kind == "retention").collect();
    assert_eq!(records.len(), 1, "one pass deleted something, and it is on the audit log");
    let deleted = records[0].detail["rows_deleted"].as_u64().unwrap() as usize;
    assert!(deleted > 0 && after > 0, "the period splits the data: {deleted} deleted, {after} kept");
    assert_eq!(deleted + after, before, "every row is either kept or counted as deleted");
    // Queries read what is left (one row per person counted).
    let people = kept.iter().flat_map(|b| b.column_by_name("uid").unwrap().as_string::<i32>().iter().flatten().map(str::to_string).collect::<Vec<_>>()).collect::<std::collections::HashSet<_>>().len();
    assert!((n - people as f64).abs() <= 2.0 * half, "{n} vs {people} people left");
    println!("retention: {before} rows, {deleted} deleted, {after} kept; noisy count of people {n} vs {people}");
}
