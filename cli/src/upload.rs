//! `cleanroom upload`: send Parquet files to a dataset the party owns, over
//! Flight SQL bulk ingest, as one new data version (all files or none).

use std::path::PathBuf;

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::sql::{TableExistsOption, TableNotExistOption};
use arrow_flight::sql::TableDefinitionOptions;
use arrow_flight::sql::CommandStatementIngest;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[derive(clap::Args)]
pub struct UploadArgs {
    /// The server and the uploading party (it must own the dataset).
    #[command(flatten)]
    connection: crate::connection::Connection,
    /// The dataset to upload into.
    #[arg(long)]
    dataset: String,
    /// append: add the rows to the dataset's; replace: the rows become the whole dataset.
    #[arg(long, value_enum, default_value = "append")]
    mode: UploadMode,
    /// Parquet files (as `cleanroom prepare` writes them), sent as one upload.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum UploadMode {
    Append,
    Replace,
}

pub async fn upload(args: UploadArgs) -> anyhow::Result<std::process::ExitCode> {
    for f in &args.files {
        // Fail before connecting if a file is not readable Parquet.
        let file = std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
        ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{} is not a readable Parquet file", f.display()))?;
    }
    let mut client = args.connection.client().await?;

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, FlightError>>(4);
    let files = args.files.clone();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut rows = 0u64;
        for path in files {
            let file = std::fs::File::open(&path)?;
            let batches = ParquetRecordBatchReaderBuilder::try_new(file)?.with_batch_size(64 * 1024).build()?;
            for batch in batches {
                let batch = batch.with_context(|| format!("cannot read {}", path.display()))?;
                rows += batch.num_rows() as u64;
                if tx.blocking_send(Ok(batch)).is_err() {
                    // The server ended the upload early; its answer says why.
                    return Ok(rows);
                }
            }
        }
        Ok(rows)
    });
    let if_exists = match args.mode {
        UploadMode::Append => TableExistsOption::Append,
        UploadMode::Replace => TableExistsOption::Replace,
    };
    let command = CommandStatementIngest {
        table_definition_options: Some(TableDefinitionOptions { if_not_exist: TableNotExistOption::Fail as i32, if_exists: if_exists as i32 }),
        table: args.dataset.clone(),
        ..Default::default()
    };
    let outcome = client.execute_ingest(command, tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    let read = reader.await.context("the file reader failed")?;
    let read = read?;
    let rows = outcome.map_err(|e| anyhow::anyhow!("upload refused or failed, nothing was committed: {}", flight_message(&e)))?;
    println!(
        "uploaded {rows} rows ({read} read from {} file(s)) to `{}` ({}): committed as a new data version",
        args.files.len(),
        args.dataset,
        match args.mode {
            UploadMode::Append => "append",
            UploadMode::Replace => "replace",
        }
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn flight_message(e: &FlightError) -> String {
    match e {
        FlightError::Tonic(status) => status.message().to_string(),
        e => e.to_string(),
    }
}
