//! `cleanroom prepare`: turn a party's export (CSV or Parquet) with raw
//! identifiers into Parquet keyed by the collaboration's hashed identifier,
//! on the party's own machine.
//!
//! Raw identifiers never leave the party: each one is normalised
//! ([`identifier::Normaliser`]) and replaced by its HMAC-SHA256 under the
//! collaboration key (or plain SHA-256 for ad-platform uploads); the raw
//! column is dropped. Rows whose identifier is invalid are left out and
//! counted by reason. The output is written to a temporary file beside its
//! final name and renamed into place only when the whole input has been
//! read, so a failed run leaves no partial file.

pub mod identifier;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, BooleanBuilder, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use indicatif::{ProgressBar, ProgressStyle};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use parquet::file::metadata::KeyValue;
use sha2::{Digest, Sha256};

use identifier::{hex_str, Hasher, Invalid, Normaliser};

/// Rows per batch read and written.
const BATCH_ROWS: usize = 64 * 1024;
/// Rows read to infer a CSV file's column types.
const CSV_INFER_ROWS: usize = 100_000;
/// Row numbers kept per invalid reason, for the report.
const EXAMPLES_PER_REASON: usize = 5;
/// The shortest collaboration key accepted.
pub const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("{path}: no column `{column}`; its columns are: {available}")]
    UnknownColumn { path: PathBuf, column: String, available: String },
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
}

/// The input's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Csv { delimiter: u8 },
    Parquet,
}

impl InputFormat {
    /// By file extension: `.parquet` / `.pq` is Parquet, `.tsv` tab-separated,
    /// anything else CSV.
    pub fn from_path(path: &Path) -> InputFormat {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("parquet" | "pq") => InputFormat::Parquet,
            Some("tsv") => InputFormat::Csv { delimiter: b'\t' },
            _ => InputFormat::Csv { delimiter: b',' },
        }
    }
}

pub struct PrepareOptions {
    pub input: PathBuf,
    pub format: InputFormat,
    /// The column holding the raw identifier; dropped from the output.
    pub id_column: String,
    /// The name of the hashed identifier column in the output.
    pub uid_column: String,
    pub normaliser: Normaliser,
    pub hasher: Hasher,
    /// [`key_fingerprint`] of the HMAC key, recorded in the output.
    pub key_fingerprint: Option<String>,
    /// Output directory; the file is named after the input (`<stem>.parquet`).
    pub out_dir: PathBuf,
    /// Replace an existing output file of the same name.
    pub overwrite: bool,
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub output: PathBuf,
    pub rows_read: u64,
    pub rows_written: u64,
    /// Invalid identifiers by reason: how many, and the first few row
    /// numbers (1-based, counting data rows, not the header).
    pub invalid: BTreeMap<Invalid, (u64, Vec<u64>)>,
    /// Rows whose identifier had already appeared in an earlier row.
    pub duplicates: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn invalid_total(&self) -> u64 {
        self.invalid.values().map(|(n, _)| n).sum()
    }
}

/// Read the collaboration key: the file's bytes, trailing whitespace
/// (a final newline) removed.
pub fn load_key(path: &Path) -> Result<Vec<u8>, PrepareError> {
    let mut bytes = std::fs::read(path).map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    let hint = "put the collaboration's shared key in it, e.g. `openssl rand -hex 32 > collaboration.key`, and give every party the same file";
    if bytes.is_empty() {
        return Err(PrepareError::Key { path: path.to_path_buf(), message: format!("the key file is empty: {hint}") });
    }
    if bytes.len() < MIN_KEY_BYTES {
        return Err(PrepareError::Key {
            path: path.to_path_buf(),
            message: format!("the key has {} bytes, fewer than {MIN_KEY_BYTES}: a short key can be guessed; {hint}", bytes.len()),
        });
    }
    Ok(bytes)
}

/// A short fingerprint of the key (not the key): parties compare it to check
/// they hashed under the same key.
pub fn key_fingerprint(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"cleanroom collaboration key fingerprint\0");
    h.update(key);
    hex::encode(&h.finalize()[..8])
}

/// A reader that counts the bytes read through it (for the progress bar).
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

type Batches = Box<dyn Iterator<Item = Result<RecordBatch, String>>>;

/// Open the input as a stream of batches, the identifier column as text.
fn open_input(options: &PrepareOptions, bytes_read: Arc<AtomicU64>) -> Result<(SchemaRef, Batches, u64, bool), PrepareError> {
    let path = &options.input;
    let io = |source| PrepareError::Io { path: path.clone(), source };
    let input = |message: String| PrepareError::Input { path: path.clone(), message };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    match options.format {
        InputFormat::Csv { delimiter } => {
            let format = arrow::csv::reader::Format::default().with_header(true).with_delimiter(delimiter);
            let (schema, _) = format
                .infer_schema(BufReader::new(&mut file), Some(CSV_INFER_ROWS))
                .map_err(|e| input(csv_message(&e)))?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            // The identifier stays text whatever it looks like (a phone
            // number is not an integer: its leading + or 0 matters).
            let fields: Vec<Field> = schema
                .fields()
                .iter()
                .map(|f| if f.name() == &options.id_column { Field::new(f.name(), DataType::Utf8, true) } else { f.as_ref().clone() })
                .collect();
            let schema = Arc::new(Schema::new(fields));
            check_id_column(options, &schema)?;
            let reader = arrow::csv::ReaderBuilder::new(schema.clone())
                .with_format(format)
                .with_batch_size(BATCH_ROWS)
                .build(Counting { inner: BufReader::with_capacity(1 << 20, file), read: bytes_read })
                .map_err(|e| input(csv_message(&e)))?;
            Ok((schema, Box::new(reader.map(|r| r.map_err(|e| csv_message(&e)))), size, true))
        }
        InputFormat::Parquet => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| input(format!("not a readable Parquet file: {e}")))?;
            let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
            let schema = builder.schema().clone();
            check_id_column(options, &schema)?;
            let reader = builder
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| input(format!("not a readable Parquet file: {e}")))?;
            Ok((schema, Box::new(reader.map(|r| r.map_err(|e| e.to_string()))), rows, false))
        }
    }
}

/// Arrow's CSV errors, without the row's data (which may hold identifiers).
fn csv_message(e: &arrow::error::ArrowError) -> String {
    let text = e.to_string();
    let text = text.split(". Row data:").next().unwrap_or(&text);
    format!("cannot read the CSV: {text}")
}

fn check_id_column(options: &PrepareOptions, schema: &Schema) -> Result<(), PrepareError> {
    if schema.field_with_name(&options.id_column).is_err() {
        return Err(PrepareError::UnknownColumn {
            path: options.input.clone(),
            column: options.id_column.clone(),
            available: schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
        });
    }
    if options.uid_column != options.id_column && schema.field_with_name(&options.uid_column).is_ok() {
        return Err(PrepareError::Input {
            path: options.input.clone(),
            message: format!(
                "the input already has a column `{}`, the name of the hashed identifier column; choose another with --uid-column",
                options.uid_column
            ),
        });
    }
    Ok(())
}

/// Normalise, hash and write. See the module documentation.
pub fn prepare(options: &PrepareOptions) -> Result<Report, PrepareError> {
    let started = Instant::now();
    let bytes_read = Arc::new(AtomicU64::new(0));
    let (schema, batches, total, by_bytes) = open_input(options, bytes_read.clone())?;
    let id_index = schema.index_of(&options.id_column).expect("checked");

    let out_schema = {
        let mut fields = vec![Field::new(&options.uid_column, DataType::Utf8, false)];
        fields.extend(schema.fields().iter().enumerate().filter(|(i, _)| *i != id_index).map(|(_, f)| f.as_ref().clone()));
        Arc::new(Schema::new(fields).with_metadata(output_metadata(options).into_iter().collect()))
    };

    let stem = options.input.file_stem().and_then(|s| s.to_str()).unwrap_or("prepared");
    let final_path = options.out_dir.join(format!("{stem}.parquet"));
    let out_io = |source| PrepareError::Io { path: options.out_dir.clone(), source };
    if final_path.exists() && !options.overwrite {
        return Err(PrepareError::Output {
            path: final_path,
            message: "already exists; choose another --out directory or pass --overwrite".into(),
        });
    }
    std::fs::create_dir_all(&options.out_dir).map_err(out_io)?;
    // Deleted on drop unless persisted: a failed run leaves nothing behind.
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{stem}."))
        .suffix(".parquet.tmp")
        .tempfile_in(&options.out_dir)
        .map_err(out_io)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("valid level")))
        // Keyed hashes are all distinct and uniformly spread: a dictionary
        // and min/max statistics cost time and help no reader.
        .set_column_dictionary_enabled(ColumnPath::from(options.uid_column.as_str()), false)
        .set_column_statistics_enabled(ColumnPath::from(options.uid_column.as_str()), EnabledStatistics::None)
        .set_column_compression(ColumnPath::from(options.uid_column.as_str()), Compression::UNCOMPRESSED)
        .set_key_value_metadata(Some(output_metadata(options).into_iter().map(|(k, v)| KeyValue::new(k, v)).collect()))
        .build();
    let output_error = |e: parquet::errors::ParquetError| PrepareError::Output { path: final_path.clone(), message: e.to_string() };
    let mut writer = ArrowWriter::try_new(temp.as_file().try_clone().map_err(out_io)?, out_schema.clone(), Some(props)).map_err(output_error)?;

    let bar = progress_bar(options.progress, total, by_bytes);
    let mut report = Report { output: final_path.clone(), ..Report::default() };
    // The digests' first 8 bytes, sorted at the end to count duplicates
    // (cheaper per row than probing a hash set that outgrows the caches).
    let mut prefixes: Vec<u64> = Vec::with_capacity(if by_bytes { 0 } else { total.min(1 << 24) as usize });
    let mut normalised = String::with_capacity(256);
    for batch in batches {
        let batch = batch.map_err(|message| PrepareError::Input { path: options.input.clone(), message })?;
        let ids = arrow::compute::cast(batch.column(id_index), &DataType::Utf8).map_err(|e| PrepareError::Input {
            path: options.input.clone(),
            message: format!("column `{}` cannot be read as text: {e}", options.id_column),
        })?;
        let ids = ids.as_any().downcast_ref::<StringArray>().expect("cast to Utf8");
        let mut uids = StringBuilder::with_capacity(ids.len(), ids.len() * 64);
        let mut keep = BooleanBuilder::with_capacity(ids.len());
        let mut hex = [0u8; 64];
        let mut dropped = 0;
        for i in 0..ids.len() {
            let row = report.rows_read + i as u64 + 1;
            let outcome = if ids.is_null(i) { Err(Invalid::Missing) } else { options.normaliser.normalise(ids.value(i), &mut normalised) };
            match outcome {
                Ok(()) => {
                    let digest = options.hasher.digest(normalised.as_bytes());
                    let prefix = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
                    prefixes.push(prefix);
                    uids.append_value(hex_str(&digest, &mut hex));
                    keep.append_value(true);
                }
                Err(reason) => {
                    let (n, rows) = report.invalid.entry(reason).or_default();
                    *n += 1;
                    if rows.len() < EXAMPLES_PER_REASON {
                        rows.push(row);
                    }
                    keep.append_value(false);
                    dropped += 1;
                }
            }
        }
        report.rows_read += ids.len() as u64;
        let mut columns: Vec<ArrayRef> = vec![Arc::new(uids.finish())];
        let keep = keep.finish();
        for (i, column) in batch.columns().iter().enumerate() {
            if i == id_index {
                continue;
            }
            columns.push(if dropped == 0 {
                column.clone()
            } else {
                arrow::compute::filter(column, &keep).map_err(|e| PrepareError::Output { path: final_path.clone(), message: e.to_string() })?
            });
        }
        let out = RecordBatch::try_new(out_schema.clone(), columns)
            .map_err(|e| PrepareError::Output { path: final_path.clone(), message: e.to_string() })?;
        report.rows_written += out.num_rows() as u64;
        writer.write(&out).map_err(output_error)?;
        bar.set_position(if by_bytes { bytes_read.load(Ordering::Relaxed) } else { report.rows_read });
    }
    writer.close().map_err(output_error)?;
    prefixes.sort_unstable();
    report.duplicates = prefixes.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    drop(prefixes);
    temp.as_file().sync_all().map_err(out_io)?;
    temp.persist(&final_path).map_err(|e| PrepareError::Io { path: final_path.clone(), source: e.error })?;
    bar.finish_and_clear();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What the output records about how it was made (never the key itself).
fn output_metadata(options: &PrepareOptions) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("cleanroom.prepare.kind".into(), options.normaliser.kind.as_str().into());
    m.insert("cleanroom.prepare.normalisation".into(), options.normaliser.describe());
    m.insert("cleanroom.prepare.hash".into(), options.hasher.name().into());
    if let Some(fingerprint) = &options.key_fingerprint {
        m.insert("cleanroom.prepare.key_fingerprint".into(), fingerprint.clone());
    }
    m
}

fn progress_bar(show: bool, total: u64, by_bytes: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = if by_bytes {
        "{spinner} preparing [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)"
    } else {
        "{spinner} preparing [{bar:40}] {pos}/{len} rows ({per_sec}, {eta} left)"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

