//! `prepare-bench`: throughput of `cleanroom prepare` on e-mails (normalise,
//! HMAC-SHA256, write Parquet) against a baseline measured in the same run:
//! reading the same CSV and writing it to Parquet unchanged, the I/O floor
//! any preparation pays. Both run on one core. A benchmark, not a test.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cleanroom_prepare::identifier::{Hasher, Kind, Normaliser};
use cleanroom_prepare::{prepare, InputFormat, PrepareOptions};

#[derive(Parser)]
#[command(about = "Time `cleanroom prepare` on e-mails against reading and rewriting the same CSV")]
struct Args {
    /// Rows of the generated CSV.
    #[arg(long, default_value_t = 5_000_000)]
    rows: usize,
    /// Timed runs of each (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the CSV and outputs go.
    #[arg(long, default_value = "bench-data/prepare")]
    dir: PathBuf,
}

/// A CRM-like export: mixed-case e-mails with stray spaces, a segment and a value.
fn write_csv(path: &std::path::Path, rows: usize) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "email,segment,ltv")?;
    let domains = ["Example.com", "mail.example.org", "GMAIL.com", "example.net"];
    for i in 0..rows {
        let pad = if i % 7 == 0 { " " } else { "" };
        writeln!(out, "{pad}Customer.{i}@{}{pad},{},{}", domains[i % 4], if i % 3 == 0 { "gold" } else { "silver" }, i % 997)?;
    }
    Ok(())
}

/// The baseline: CSV in, the same columns to Parquet out, nothing computed.
fn rewrite(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<u64> {
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (schema, _) = format.infer_schema(std::fs::File::open(input)?, Some(100_000))?;
    let reader = arrow::csv::ReaderBuilder::new(Arc::new(schema.clone()))
        .with_format(format)
        .with_batch_size(64 * 1024)
        .build(std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(input)?))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::try_new(1)?))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(output)?, Arc::new(schema), Some(props))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(rows)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let csv = args.dir.join(format!("emails-{}.csv", args.rows));
    if !csv.exists() {
        write_csv(&csv, args.rows).context("writing the CSV")?;
    }
    let size = std::fs::metadata(&csv)?.len();
    println!("input: {} rows, {:.1} MB of CSV ({})", args.rows, size as f64 / 1e6, csv.display());
    let (mut base, mut prep) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let started = Instant::now();
        let rows = rewrite(&csv, &args.dir.join("baseline.parquet"))?;
        base.push(started.elapsed());
        assert_eq!(rows as usize, args.rows);

        let options = PrepareOptions {
            input: csv.clone(),
            format: InputFormat::Csv { delimiter: b',' },
            id_column: "email".into(),
            uid_column: "uid".into(),
            normaliser: Normaliser { kind: Kind::Email, provider_rules: false, default_country: None },
            hasher: Hasher::hmac(b"benchmark collaboration key, 32B"),
            key_fingerprint: None,
            out_dir: args.dir.join("prepared"),
            overwrite: true,
            progress: false,
        };
        let started = Instant::now();
        let report = prepare(&options)?;
        prep.push(started.elapsed());
        assert_eq!(report.rows_written as usize, args.rows);
    }
    let (base, prep) = (median(base), median(prep));
    let rate = |d: Duration| args.rows as f64 / d.as_secs_f64();
    println!("baseline  CSV -> Parquet, unchanged:        {:>8.3} s  {:>6.2} M rows/s", base.as_secs_f64(), rate(base) / 1e6);
    println!("prepare   normalise + HMAC-SHA256 + write: {:>8.3} s  {:>6.2} M rows/s", prep.as_secs_f64(), rate(prep) / 1e6);
    println!("ratio     prepare / baseline time:         {:>8.2}x", prep.as_secs_f64() / base.as_secs_f64());
    Ok(())
}
