//! `cleanroom generate`: builds the AdBench reference collaboration — a synthetic ad network
//! (`impressions`) and advertiser (`conversions`) over one shared person population — plus the
//! manifest, demo credentials and the exact (non-private) answers of the AdBench queries.
//!
//! Everything is a pure function of `(scale_factor, seed)`: each Parquet part is drawn from its
//! own ChaCha stream derived from the seed, the table/stage and the part index, so parts can be
//! produced on any number of threads and the same seed always yields the same bytes (on a given
//! platform and build). The population model builds in a known true effect — exposed people in
//! the `test` group convert after their first impression `TRUE_LIFT` (1.3) times as often as
//! `control` people — so DP answers can be judged against ground truth, not just against noise.
//!
//! Layout written under `out_dir`:
//! - `data/impressions/part-NNNN.parquet`, `data/conversions/part-NNNN.parquet`
//! - `manifest.toml` (parties `advertiser` and `adnetwork`, both datasets, column roles)
//! - `credentials.toml` (the demo passwords matching the manifest's Argon2 hashes)
//! - `truth.json` (AdBench Q1–Q5 run as plain SQL with DataFusion over the written files)

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::{SessionConfig, SessionContext};
use hmac::{Hmac, Mac};
use indicatif::{ProgressBar, ProgressStyle};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::queries::{adbench_queries, register_adbench_tables};

/// What to generate and where.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// 1.0 ⇒ 2M people, 10M impressions, ~400k conversions; everything scales linearly.
    pub scale_factor: f64,
    pub out_dir: PathBuf,
    pub seed: u64,
    /// Draw progress on stderr.
    pub progress: bool,
    /// Also compute the exact answers (`truth.json`).
    pub truth: bool,
    /// Which collaboration: AdBench, or a vertical's.
    pub vertical: crate::verticals::Vertical,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GenerateSummary {
    /// The two tables (touches, outcomes) and their rows.
    pub tables: [&'static str; 2],
    pub impressions: u64,
    pub conversions: u64,
    /// Distinct people appearing in at least one of the two tables.
    pub people: u64,
    pub out_dir: PathBuf,
}

// ---- scale -------------------------------------------------------------------------------

const PEOPLE_PER_SF: f64 = 2_000_000.0;
const IMPRESSIONS_PER_SF: f64 = 10_000_000.0;
/// Expected conversions per person under the model below; only sizes the progress bar.
const CONVERSIONS_PER_PERSON_ESTIMATE: f64 = 0.2;
const MAX_IMPRESSIONS_PER_FILE: u64 = 1_000_000;
const MIN_FILES_PER_TABLE: u64 = 2;
const MIN_PEOPLE: u64 = 10;
/// Keeps `person * MAX_CONVERSIONS_PER_PERSON` inside the 40-bit order-id space.
const MAX_SCALE_FACTOR: f64 = 10_000.0;
const BATCH_ROWS: usize = 65_536;
/// Several row groups per file let readers split a part across cores.
const ROW_GROUP_ROWS: usize = 262_144;

// ---- time --------------------------------------------------------------------------------

const US_PER_SECOND: i64 = 1_000_000;
const US_PER_DAY: i64 = 86_400 * US_PER_SECOND;
/// 2026-01-01T00:00:00Z.
const START_US: i64 = 1_767_225_600 * US_PER_SECOND;
/// 2026-01-01 ..= 2026-03-31: 31 + 28 + 31 days.
const CAMPAIGN_SECONDS: i64 = 90 * 86_400;

// ---- population model --------------------------------------------------------------------

/// Share of the population the ad network reached; everyone else is an advertiser customer
/// the network never saw, so every person appears in at least one table.
const P_EXPOSED: f64 = 0.92;
const P_CONTROL: f64 = 0.20;
/// Chance that an exposed control person converts after their first impression.
const P_CONVERT_CONTROL: f64 = 0.06;
/// The effect Q3 is meant to recover: test converts this many times as often as control.
pub const TRUE_LIFT: f64 = 1.3;
/// Exposed people who bought before the network first reached them (not incremental).
const P_CONVERT_BEFORE_EXPOSURE: f64 = 0.015;
const P_REPEAT_CONVERSION: f64 = 0.2;
const MAX_CONVERSIONS_PER_PERSON: u64 = 32;
const MEAN_CONVERSION_DELAY_US: f64 = 3.0 * US_PER_DAY as f64;
const MAX_CONVERSION_DELAY_US: i64 = 30 * US_PER_DAY;
/// Lomax tail index of per-person activity: most people see 1–2 impressions, a few hundreds.
const ACTIVITY_TAIL: f64 = 1.3;
const MAX_ACTIVITY: f64 = 200.0;
/// Floor so that every exposed person can receive extra impressions.
const MIN_ACTIVITY: f64 = 0.05;
const P_FAVOURITE_CAMPAIGN: f64 = 0.5;
const P_CAMPAIGN_CHANNEL: f64 = 0.5;
const P_PRIMARY_DEVICE: f64 = 0.85;
const P_AFFILIATE: f64 = 0.4;
const P_RETURN: f64 = 0.05;

const CAMPAIGNS: i64 = 50;
const CREATIVES_PER_CAMPAIGN: i64 = 10;
const AFFILIATES: i64 = 20;
const MIN_COST_MICROS: f64 = 100.0;
const MAX_COST_MICROS: f64 = 20_000.0;
const MAX_REVENUE: f64 = 10_000.0;

const CHANNELS: [&str; 5] = ["display", "email", "search", "social", "video"];
const CHANNEL_WEIGHTS: [f64; 5] = [35.0, 8.0, 20.0, 25.0, 12.0];
const CHANNEL_COST_MICROS: [f64; 5] = [800.0, 150.0, 2_500.0, 1_500.0, 6_000.0];
const COUNTRIES: [&str; 10] = ["AU", "BR", "CA", "DE", "ES", "FR", "GB", "IN", "JP", "US"];
const COUNTRY_WEIGHTS: [f64; 10] = [5.0, 7.0, 6.0, 9.0, 4.0, 8.0, 10.0, 9.0, 7.0, 35.0];
const DEVICES: [&str; 4] = ["ctv", "desktop", "mobile", "tablet"];
const DEVICE_WEIGHTS: [f64; 4] = [7.0, 30.0, 55.0, 8.0];
const TEST_GROUPS: [&str; 2] = ["control", "test"];
const PRODUCT_CATEGORIES: [&str; 8] = [
    "apparel",
    "beauty",
    "books",
    "electronics",
    "garden",
    "grocery",
    "home",
    "toys",
];
const CATEGORY_WEIGHTS: [f64; 8] = [20.0, 10.0, 8.0, 12.0, 5.0, 25.0, 12.0, 8.0];
/// Median basket per category; revenue is lognormal around it.
const CATEGORY_MEDIAN_REVENUE: [f64; 8] = [45.0, 30.0, 18.0, 120.0, 50.0, 35.0, 70.0, 28.0];
const REVENUE_SIGMA: f64 = 0.9;
const COST_SIGMA: f64 = 0.5;

// ---- identities and secrets --------------------------------------------------------------

/// The demo collaboration's matching key: both parties HMAC their customers' e-mails under it,
/// so `uid` joins across datasets without either side revealing raw identifiers.
pub(crate) const DEMO_COLLABORATION_KEY: &[u8] = b"cleanroom/adbench/demo-collaboration-key/v1";
const PARTIES: [&str; 2] = ["advertiser", "adnetwork"];
const DEMO_PASSWORD_HEX_CHARS: usize = 20;

const TABLE_IMPRESSIONS: &str = "impressions";
const TABLE_CONVERSIONS: &str = "conversions";

/// Generates the collaboration `opts.vertical` under `opts.out_dir`: AdBench
/// as the module docs describe it, or a vertical's (see [`crate::verticals`]).
pub async fn generate(opts: &GenerateOptions) -> Result<GenerateSummary> {
    match opts.vertical {
        crate::verticals::Vertical::Adbench => generate_adbench(opts).await,
        vertical => crate::verticals::generate(opts, vertical).await,
    }
}

/// Generates the AdBench collaboration described in the module docs under `opts.out_dir`.
pub(crate) async fn generate_adbench(opts: &GenerateOptions) -> Result<GenerateSummary> {
    let plan = Plan::new(opts.scale_factor, opts.seed)?;
    let out_dir = opts.out_dir.clone();
    let progress = opts.progress;

    let written = tokio::task::spawn_blocking({
        let out_dir = out_dir.clone();
        move || -> Result<Written> {
            prepare_output_dir(&out_dir)?;
            let written = write_tables(&plan, &out_dir, progress)?;
            write_atomically(
                &out_dir.join("manifest.toml"),
                manifest_toml(&plan)?.as_bytes(),
                false,
            )?;
            write_atomically(
                &out_dir.join("credentials.toml"),
                credentials_toml(plan.seed, &PARTIES).as_bytes(),
                true,
            )?;
            // The key both demo parties hashed their customers' e-mails under,
            // for `cleanroom prepare --key-file` (a real collaboration keeps
            // its key with the parties, never in the clean room).
            write_atomically(&out_dir.join("collaboration.key"), DEMO_COLLABORATION_KEY, true)?;
            Ok(written)
        }
    })
    .await
    .context("generator task failed")??;

    let spinner = if progress {
        let spinner = ProgressBar::new_spinner();
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .expect("static progress template"),
        );
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner
    } else {
        ProgressBar::hidden()
    };
    if opts.truth {
        let truth = compute_truth(&plan, &out_dir, &spinner).await;
        spinner.finish_and_clear();
        write_atomically(&out_dir.join("truth.json"), &truth?, false)?;
    }

    Ok(GenerateSummary {
        tables: [TABLE_IMPRESSIONS, TABLE_CONVERSIONS],
        impressions: written.impressions,
        conversions: written.conversions,
        people: written.people,
        out_dir,
    })
}

/// Sizes derived from the scale factor; shared by every shard.
#[derive(Debug, Clone, Copy)]
struct Plan {
    scale_factor: f64,
    seed: u64,
    people: u64,
    impressions: u64,
    /// One shard = one contiguous range of people = one part file per table.
    shards: u64,
}

impl Plan {
    fn new(scale_factor: f64, seed: u64) -> Result<Self> {
        if !scale_factor.is_finite() || scale_factor <= 0.0 {
            bail!("scale factor must be a positive number, got {scale_factor}");
        }
        if scale_factor > MAX_SCALE_FACTOR {
            bail!("scale factor {scale_factor} is above the supported maximum {MAX_SCALE_FACTOR}");
        }
        let people = (PEOPLE_PER_SF * scale_factor).round() as u64;
        if people < MIN_PEOPLE {
            bail!("scale factor {scale_factor} is too small: it yields {people} people (minimum {MIN_PEOPLE})");
        }
        let impressions = (IMPRESSIONS_PER_SF * scale_factor).round() as u64;
        let shards = impressions
            .div_ceil(MAX_IMPRESSIONS_PER_FILE)
            .max(MIN_FILES_PER_TABLE);
        Ok(Self {
            scale_factor,
            seed,
            people,
            impressions,
            shards,
        })
    }

    fn people_range(&self, shard: u64) -> std::ops::Range<u64> {
        split_point(self.people, shard, self.shards)
            ..split_point(self.people, shard + 1, self.shards)
    }

    fn impression_target(&self, shard: u64) -> u64 {
        split_point(self.impressions, shard + 1, self.shards)
            - split_point(self.impressions, shard, self.shards)
    }
}

fn split_point(total: u64, part: u64, parts: u64) -> u64 {
    (total as u128 * part as u128 / parts as u128) as u64
}

/// Independent, reproducible random stream per (seed, stage, shard): shards can run in any
/// order on any thread, and changing one stage's draws leaves the other stages' output as is.
fn stream_rng(seed: u64, stage: &str, shard: u64) -> ChaCha8Rng {
    let mut hasher = Sha256::new();
    hasher.update(b"adbench/rng/v1");
    hasher.update(seed.to_le_bytes());
    hasher.update((stage.len() as u64).to_le_bytes());
    hasher.update(stage.as_bytes());
    hasher.update(shard.to_le_bytes());
    ChaCha8Rng::from_seed(hasher.finalize().into())
}

fn seeded_digest(seed: u64, purpose: &str, party: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"adbench/");
    hasher.update(purpose.as_bytes());
    hasher.update(b"/");
    hasher.update(seed.to_le_bytes());
    hasher.update(party.as_bytes());
    hasher.finalize().into()
}

// ---- sampling ----------------------------------------------------------------------------

/// Discrete distribution over `0..n` by inverse CDF.
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Self { cumulative }
    }

    fn zipf(n: i64, exponent: f64) -> Self {
        Self::new((1..=n).map(|k| 1.0 / (k as f64).powf(exponent)))
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = *self.cumulative.last().expect("non-empty distribution");
        let x = rng.gen::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

fn standard_normal(rng: &mut impl Rng) -> f64 {
    // Box–Muller; 1 - u keeps the logarithm finite.
    let u1 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn exponential(rng: &mut impl Rng, mean: f64) -> f64 {
    -(1.0 - rng.gen::<f64>()).ln() * mean
}

/// Lomax (Pareto II) draw: mostly below 1, with a heavy tail, capped.
fn activity(rng: &mut impl Rng) -> f64 {
    let u = 1.0 - rng.gen::<f64>();
    (u.powf(-1.0 / ACTIVITY_TAIL) - 1.0).min(MAX_ACTIVITY) + MIN_ACTIVITY
}

struct Distributions {
    channels: Weighted,
    countries: Weighted,
    devices: Weighted,
    campaigns: Weighted,
    creatives: Weighted,
    categories: Weighted,
    affiliates: Weighted,
}

impl Distributions {
    fn new() -> Self {
        Self {
            channels: Weighted::new(CHANNEL_WEIGHTS),
            countries: Weighted::new(COUNTRY_WEIGHTS),
            devices: Weighted::new(DEVICE_WEIGHTS),
            campaigns: Weighted::zipf(CAMPAIGNS, 0.9),
            creatives: Weighted::zipf(CREATIVES_PER_CAMPAIGN, 0.7),
            categories: Weighted::new(CATEGORY_WEIGHTS),
            affiliates: Weighted::zipf(AFFILIATES, 0.8),
        }
    }
}

/// Each campaign leans on one channel, so channel and campaign are correlated as in real
/// media plans.
fn campaign_channel(campaign_id: i64) -> usize {
    (campaign_id as usize * 3) % CHANNELS.len()
}

/// Unique across the whole dataset without coordination between shards: a bijection of
/// (person, sequence) inside a 40-bit space, so ids look arbitrary rather than sequential.
fn order_id(person: u64, seq: u64) -> i64 {
    const MASK: u64 = (1 << 40) - 1;
    // Odd multipliers are invertible modulo 2^40 and so is a right xorshift; the xorshift
    // mixes high bits down so ids do not share the zero low bits of `person * 32`.
    const M1: u64 = 0x9E37_79B9_7F4A_7C15;
    const M2: u64 = 0xBF58_476D_1CE4_E5B9;
    let raw = person * MAX_CONVERSIONS_PER_PERSON + seq;
    debug_assert!(raw <= MASK);
    let mut x = raw.wrapping_mul(M1) & MASK;
    x ^= x >> 20;
    x = x.wrapping_mul(M2) & MASK;
    (1_000_000_000_000 + x) as i64
}

/// HMAC-SHA256 of the person's synthetic e-mail under the demo collaboration key.
fn person_uid(keyed: &Hmac<Sha256>, person: u64, email: &mut String) -> String {
    email.clear();
    write!(email, "person{person}@example.com").expect("writing to a String");
    let mut mac = keyed.clone();
    mac.update(email.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

// ---- schemas and row buffers -------------------------------------------------------------

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn impressions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uid", DataType::Utf8, false),
        Field::new("ts", utc_micros(), false),
        Field::new("campaign_id", DataType::Int64, false),
        Field::new("creative_id", DataType::Int64, false),
        Field::new("channel", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, false),
        Field::new("test_group", DataType::Utf8, false),
        Field::new("cost_micros", DataType::Int64, false),
    ]))
}

fn conversions_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("uid", DataType::Utf8, false),
        Field::new("ts", utc_micros(), false),
        Field::new("order_id", DataType::Int64, false),
        Field::new("revenue", DataType::Float64, false),
        Field::new("product_category", DataType::Utf8, false),
        Field::new("affiliate_id", DataType::Int64, true),
        Field::new("is_return", DataType::Boolean, false),
    ]))
}

#[derive(Default)]
struct ImpressionRows {
    uid: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    campaign_id: Int64Builder,
    creative_id: Int64Builder,
    channel: StringBuilder,
    country: StringBuilder,
    device: StringBuilder,
    test_group: StringBuilder,
    cost_micros: Int64Builder,
    len: usize,
}

impl ImpressionRows {
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.len = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.uid.finish()),
            Arc::new(self.ts.finish().with_timezone("UTC")),
            Arc::new(self.campaign_id.finish()),
            Arc::new(self.creative_id.finish()),
            Arc::new(self.channel.finish()),
            Arc::new(self.country.finish()),
            Arc::new(self.device.finish()),
            Arc::new(self.test_group.finish()),
            Arc::new(self.cost_micros.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

#[derive(Default)]
struct ConversionRows {
    uid: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    order_id: Int64Builder,
    revenue: Float64Builder,
    product_category: StringBuilder,
    affiliate_id: Int64Builder,
    is_return: BooleanBuilder,
    len: usize,
}

impl ConversionRows {
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.len = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.uid.finish()),
            Arc::new(self.ts.finish().with_timezone("UTC")),
            Arc::new(self.order_id.finish()),
            Arc::new(self.revenue.finish()),
            Arc::new(self.product_category.finish()),
            Arc::new(self.affiliate_id.finish()),
            Arc::new(self.is_return.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

/// A Parquet part being written under a temporary name next to its final one.
pub(crate) struct PartWriter {
    writer: ArrowWriter<File>,
    rows: u64,
}

impl PartWriter {
    pub(crate) fn create(path: &Path, schema: SchemaRef) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = ArrowWriter::try_new(file, schema, Some(props))?;
        Ok(Self { writer, rows: 0 })
    }

    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        self.writer.write(batch)?;
        Ok(())
    }

    pub(crate) fn close(self) -> Result<u64> {
        let file = self.writer.into_inner()?;
        file.sync_all()?;
        Ok(self.rows)
    }
}

// ---- generation --------------------------------------------------------------------------

struct Person {
    index: u64,
    control: bool,
    country: usize,
    device: usize,
    favourite_campaign: i64,
    activity: f64,
    impressions: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Written {
    impressions: u64,
    conversions: u64,
    people: u64,
}

pub(crate) fn part_name(shard: u64) -> String {
    format!("part-{shard:04}.parquet")
}

pub(crate) fn temp_name(final_name: &str) -> String {
    format!(".{final_name}.tmp")
}

pub(crate) fn is_generated_part(name: &str) -> bool {
    let is_part = |n: &str| n.starts_with("part-") && n.ends_with(".parquet");
    is_part(name)
        || name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .is_some_and(is_part)
}

/// Removes the previous run's parts (their count may differ) and its truth (it would describe
/// data this run is about to replace, and a crash mid-run must not leave it looking valid).
fn prepare_output_dir(out_dir: &Path) -> Result<()> {
    for table in [TABLE_IMPRESSIONS, TABLE_CONVERSIONS] {
        let dir = out_dir.join("data").join(table);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_str().is_some_and(is_generated_part) && entry.file_type()?.is_file() {
                fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
    }
    let truth = out_dir.join("truth.json");
    if truth.exists() {
        fs::remove_file(&truth).with_context(|| format!("removing {}", truth.display()))?;
    }
    Ok(())
}

fn write_tables(plan: &Plan, out_dir: &Path, progress: bool) -> Result<Written> {
    let bar = if progress {
        let expected_rows =
            plan.impressions + (plan.people as f64 * CONVERSIONS_PER_PERSON_ESTIMATE) as u64;
        let bar = ProgressBar::new(expected_rows);
        bar.set_style(
            ProgressStyle::with_template(
                "generating {bar:40} {human_pos}/{human_len} rows [{elapsed}, eta {eta}] {msg}",
            )
            .expect("static progress template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let files_done = AtomicUsize::new(0);
    let total_files = plan.shards * 2;
    bar.set_message(format!("0/{total_files} files"));
    let next_shard = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(plan.shards as usize);
    let dists = Distributions::new();

    let results: Vec<Result<Vec<Written>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let shard = next_shard.fetch_add(1, Ordering::Relaxed) as u64;
                        if shard >= plan.shards {
                            break;
                        }
                        match write_shard(plan, &dists, out_dir, shard, &bar) {
                            Ok(written) => {
                                let n = files_done.fetch_add(2, Ordering::Relaxed) + 2;
                                bar.set_message(format!("{n}/{total_files} files"));
                                done.push(written);
                            }
                            Err(err) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(err.context(format!("generating shard {shard}")));
                            }
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow!("generator thread panicked")))
            })
            .collect()
    });

    let mut total = Written::default();
    let mut first_error = None;
    for result in results {
        match result {
            Ok(shards) => {
                for w in shards {
                    total.impressions += w.impressions;
                    total.conversions += w.conversions;
                    total.people += w.people;
                }
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    let parts: Vec<(PathBuf, PathBuf)> = [TABLE_IMPRESSIONS, TABLE_CONVERSIONS]
        .into_iter()
        .flat_map(|table| {
            let dir = out_dir.join("data").join(table);
            (0..plan.shards).map(move |shard| {
                let name = part_name(shard);
                (dir.join(temp_name(&name)), dir.join(name))
            })
        })
        .collect();
    if let Some(err) = first_error {
        bar.abandon();
        for (temp, _) in &parts {
            let _ = fs::remove_file(temp);
        }
        return Err(err);
    }
    // Publish the parts only once all of them exist, so the final names never describe a
    // partial dataset.
    for (temp, final_path) in &parts {
        fs::rename(temp, final_path)
            .with_context(|| format!("renaming {} to {}", temp.display(), final_path.display()))?;
    }
    bar.set_length(total.impressions + total.conversions);
    bar.finish_and_clear();
    Ok(total)
}

/// Writes `part-<shard>` of both tables for one contiguous range of people.
fn write_shard(
    plan: &Plan,
    dists: &Distributions,
    out_dir: &Path,
    shard: u64,
    bar: &ProgressBar,
) -> Result<Written> {
    let mut people = draw_people(plan, dists, shard);
    allocate_impressions(plan, shard, &mut people);

    let name = part_name(shard);
    let imp_schema = impressions_schema();
    let conv_schema = conversions_schema();
    let data = out_dir.join("data");
    let mut imp_writer = PartWriter::create(
        &data.join(TABLE_IMPRESSIONS).join(temp_name(&name)),
        imp_schema.clone(),
    )?;
    let mut conv_writer = PartWriter::create(
        &data.join(TABLE_CONVERSIONS).join(temp_name(&name)),
        conv_schema.clone(),
    )?;

    let mut imp_rng = stream_rng(plan.seed, TABLE_IMPRESSIONS, shard);
    let mut conv_rng = stream_rng(plan.seed, TABLE_CONVERSIONS, shard);
    let keyed = <Hmac<Sha256> as Mac>::new_from_slice(DEMO_COLLABORATION_KEY)
        .expect("HMAC accepts keys of any length");
    let mut email = String::new();
    let mut imp_rows = ImpressionRows::default();
    let mut conv_rows = ConversionRows::default();
    let mut times = Vec::new();
    let mut conversion_times = Vec::new();
    let mut written = Written::default();

    for person in &people {
        let uid = person_uid(&keyed, person.index, &mut email);
        draw_impression_times(&mut imp_rng, person.impressions, &mut times);
        for &ts in &times {
            push_impression(&mut imp_rng, dists, person, &uid, ts, &mut imp_rows);
        }
        draw_conversion_times(&mut conv_rng, person, &times, &mut conversion_times);
        for (seq, &ts) in conversion_times.iter().enumerate() {
            push_conversion(
                &mut conv_rng,
                dists,
                person,
                seq as u64,
                &uid,
                ts,
                &mut conv_rows,
            );
        }
        if !times.is_empty() || !conversion_times.is_empty() {
            written.people += 1;
        }
        if imp_rows.len >= BATCH_ROWS {
            let rows = imp_rows.len as u64;
            imp_writer.write(&imp_rows.finish(&imp_schema)?)?;
            bar.inc(rows);
        }
        if conv_rows.len >= BATCH_ROWS {
            let rows = conv_rows.len as u64;
            conv_writer.write(&conv_rows.finish(&conv_schema)?)?;
            bar.inc(rows);
        }
    }
    if imp_rows.len > 0 {
        let rows = imp_rows.len as u64;
        imp_writer.write(&imp_rows.finish(&imp_schema)?)?;
        bar.inc(rows);
    }
    if conv_rows.len > 0 {
        let rows = conv_rows.len as u64;
        conv_writer.write(&conv_rows.finish(&conv_schema)?)?;
        bar.inc(rows);
    }
    written.impressions = imp_writer.close()?;
    written.conversions = conv_writer.close()?;
    Ok(written)
}

fn draw_people(plan: &Plan, dists: &Distributions, shard: u64) -> Vec<Person> {
    let mut rng = stream_rng(plan.seed, "people", shard);
    plan.people_range(shard)
        .map(|index| {
            let exposed = rng.gen_bool(P_EXPOSED);
            Person {
                index,
                control: rng.gen_bool(P_CONTROL),
                country: dists.countries.sample(&mut rng),
                device: dists.devices.sample(&mut rng),
                favourite_campaign: dists.campaigns.sample(&mut rng) as i64 + 1,
                activity: if exposed { activity(&mut rng) } else { 0.0 },
                impressions: 0,
            }
        })
        .collect()
}

/// Gives the shard exactly its share of the impression total: one impression per exposed
/// person, the rest spread in proportion to activity (a multinomial draw), which yields the
/// long tail of heavy users.
fn allocate_impressions(plan: &Plan, shard: u64, people: &mut [Person]) {
    let mut rng = stream_rng(plan.seed, "allocation", shard);
    let exposed: Vec<usize> = (0..people.len())
        .filter(|&i| people[i].activity > 0.0)
        .collect();
    let target = plan.impression_target(shard);
    let singles = target.min(exposed.len() as u64) as usize;
    for &i in &exposed[..singles] {
        people[i].impressions = 1;
    }
    let extra = target - singles as u64;
    if extra == 0 || exposed.is_empty() {
        return;
    }
    let weights = Weighted::new(exposed.iter().map(|&i| people[i].activity));
    for _ in 0..extra {
        people[exposed[weights.sample(&mut rng)]].impressions += 1;
    }
}

/// Distinct whole seconds per person keep (uid, ts) unique, which last-touch attribution
/// (Q5) relies on to have a single latest impression.
fn draw_impression_times(rng: &mut ChaCha8Rng, count: u64, times: &mut Vec<i64>) {
    times.clear();
    let count = count.min(CAMPAIGN_SECONDS as u64) as usize;
    let mut seconds: Vec<i64> = Vec::with_capacity(count);
    while seconds.len() < count {
        let missing = count - seconds.len();
        seconds.extend((0..missing).map(|_| rng.gen_range(0..CAMPAIGN_SECONDS)));
        seconds.sort_unstable();
        seconds.dedup();
    }
    times.extend(
        seconds
            .into_iter()
            .map(|s| START_US + s * US_PER_SECOND + rng.gen_range(0..US_PER_SECOND)),
    );
}

fn push_impression(
    rng: &mut ChaCha8Rng,
    dists: &Distributions,
    person: &Person,
    uid: &str,
    ts: i64,
    rows: &mut ImpressionRows,
) {
    let campaign_id = if rng.gen_bool(P_FAVOURITE_CAMPAIGN) {
        person.favourite_campaign
    } else {
        dists.campaigns.sample(rng) as i64 + 1
    };
    let creative_id =
        (campaign_id - 1) * CREATIVES_PER_CAMPAIGN + dists.creatives.sample(rng) as i64 + 1;
    let channel = if rng.gen_bool(P_CAMPAIGN_CHANNEL) {
        campaign_channel(campaign_id)
    } else {
        dists.channels.sample(rng)
    };
    let device = if rng.gen_bool(P_PRIMARY_DEVICE) {
        person.device
    } else {
        dists.devices.sample(rng)
    };
    let cost = CHANNEL_COST_MICROS[channel] * (COST_SIGMA * standard_normal(rng)).exp();
    let cost = cost.round().clamp(MIN_COST_MICROS, MAX_COST_MICROS) as i64;

    rows.uid.append_value(uid);
    rows.ts.append_value(ts);
    rows.campaign_id.append_value(campaign_id);
    rows.creative_id.append_value(creative_id);
    rows.channel.append_value(CHANNELS[channel]);
    rows.country.append_value(COUNTRIES[person.country]);
    rows.device.append_value(DEVICES[device]);
    rows.test_group
        .append_value(TEST_GROUPS[if person.control { 0 } else { 1 }]);
    rows.cost_micros.append_value(cost);
    rows.len += 1;
}

/// Conversion timestamps of one person, sorted. `impression_times` is sorted and empty for
/// people the network never reached.
fn draw_conversion_times(
    rng: &mut ChaCha8Rng,
    person: &Person,
    impression_times: &[i64],
    out: &mut Vec<i64>,
) {
    out.clear();
    let Some(&first_seen) = impression_times.first() else {
        // Advertiser customers outside the network's reach: organic, any time in the window.
        let n = conversion_count(rng);
        out.extend((0..n).map(|_| START_US + rng.gen_range(0..CAMPAIGN_SECONDS * US_PER_SECOND)));
        out.sort_unstable();
        return;
    };
    if rng.gen_bool(P_CONVERT_BEFORE_EXPOSURE) && first_seen > START_US + US_PER_SECOND {
        out.push(START_US + rng.gen_range(0..first_seen - START_US));
    }
    let p_convert = if person.control {
        P_CONVERT_CONTROL
    } else {
        P_CONVERT_CONTROL * TRUE_LIFT
    };
    if rng.gen_bool(p_convert) {
        // Each purchase follows some impression (not necessarily the last), so every one
        // lands strictly after the first impression and last-touch credit varies.
        for _ in 0..conversion_count(rng) {
            let anchor = impression_times[rng.gen_range(0..impression_times.len())];
            let delay =
                (exponential(rng, MEAN_CONVERSION_DELAY_US) as i64).min(MAX_CONVERSION_DELAY_US);
            out.push(anchor + US_PER_SECOND + delay);
        }
    }
    out.sort_unstable();
}

fn conversion_count(rng: &mut ChaCha8Rng) -> u64 {
    let mut n = 1;
    while n < MAX_CONVERSIONS_PER_PERSON && rng.gen_bool(P_REPEAT_CONVERSION) {
        n += 1;
    }
    n
}

fn push_conversion(
    rng: &mut ChaCha8Rng,
    dists: &Distributions,
    person: &Person,
    seq: u64,
    uid: &str,
    ts: i64,
    rows: &mut ConversionRows,
) {
    let category = dists.categories.sample(rng);
    let revenue = CATEGORY_MEDIAN_REVENUE[category] * (REVENUE_SIGMA * standard_normal(rng)).exp();
    let revenue = ((revenue * 100.0).round() / 100.0).clamp(0.01, MAX_REVENUE);
    let affiliate_id = rng
        .gen_bool(P_AFFILIATE)
        .then(|| dists.affiliates.sample(rng) as i64 + 1);

    rows.uid.append_value(uid);
    rows.ts.append_value(ts);
    rows.order_id.append_value(order_id(person.index, seq));
    rows.revenue.append_value(revenue);
    rows.product_category
        .append_value(PRODUCT_CATEGORIES[category]);
    rows.affiliate_id.append_option(affiliate_id);
    rows.is_return.append_value(rng.gen_bool(P_RETURN));
    rows.len += 1;
}

// ---- manifest, credentials, truth --------------------------------------------------------

fn demo_password(seed: u64, party: &str) -> String {
    let mut password = hex::encode(seeded_digest(seed, "password", party));
    password.truncate(DEMO_PASSWORD_HEX_CHARS);
    password
}

pub(crate) fn password_hash(seed: u64, party: &str) -> Result<String> {
    // A seed-derived salt (instead of a random one) keeps manifest.toml reproducible.
    let salt_bytes = seeded_digest(seed, "salt", party);
    let salt =
        SaltString::encode_b64(&salt_bytes[..16]).map_err(|e| anyhow!("encoding salt: {e}"))?;
    let hash = Argon2::default()
        .hash_password(demo_password(seed, party).as_bytes(), &salt)
        .map_err(|e| anyhow!("hashing the {party} password: {e}"))?;
    Ok(hash.to_string())
}

fn toml_string_list(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("\"{v}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn manifest_toml(plan: &Plan) -> Result<String> {
    let advertiser = password_hash(plan.seed, "advertiser")?;
    let adnetwork = password_hash(plan.seed, "adnetwork")?;
    let channels = toml_string_list(&CHANNELS);
    let countries = toml_string_list(&COUNTRIES);
    let devices = toml_string_list(&DEVICES);
    let test_groups = toml_string_list(&TEST_GROUPS);
    let categories = toml_string_list(&PRODUCT_CATEGORIES);
    let sf = plan.scale_factor;
    let seed = plan.seed;
    Ok(format!(
        r#"# AdBench demo collaboration, generated by `cleanroom generate --sf {sf} --seed {seed}`.
# The advertiser owns conversions, the ad network owns impressions; both may query both.
# Passwords for these hashes are in credentials.toml.

[collaboration]
name = "adbench"

[defaults]
epsilon = 1.0
max_epsilon_per_query = 5.0
# delta = 0: queries are pure epsilon-DP unless they ask for a delta (needed to
# group by a column without a public domain, e.g. is_return).
max_delta_per_query = 1e-6
max_groups_contributed = 1
max_contributions_per_group = 10

# Default parameters of the studies: `SELECT * FROM lift()` (or `cleanroom
# study lift`) measures the campaign's lift on conversions within 30 days of a
# person's first impression, test group against the hold-out.
[studies.lift]
exposure = "impressions"
outcome = "conversions"
group = "test_group"
control = "control"
window_days = 30
value = "revenue"

# `SELECT * FROM reach()`: people reached per channel and in pairs of channels,
# and how many impressions they saw.
[studies.reach]
exposure = "impressions"
channel = "channel"
buckets = "1,2,3,5,10"

# `SELECT * FROM attribution()`: each conversion credited to the channel of the
# person's last impression in the 30 days before it; revenue net of returned
# orders, and a 10 % commission on it.
[studies.attribution]
touches = "impressions"
outcome = "conversions"
credit = "channel"
model = "last"
window_days = 30
value = "revenue"
returns = "is_return"
commission_rate = 0.1
# A person's revenue per channel, counted up to 500 (a few baskets).
value_cap = 500

# `SELECT * FROM cohorts()`: people by the week of their first impression, and
# how many of them bought (and for how much) in each of the 6 weeks from it.
[studies.cohorts]
exposure = "impressions"
outcome = "conversions"
period = "week"
periods = 6
value = "revenue"

# `SELECT * FROM match_rate()`: people in each party's dataset and in both.
[studies.match_rate]
left = "impressions"
right = "conversions"

[[parties]]
name = "advertiser"
password = "{advertiser}"
epsilon_budget = 50.0
delta_budget = 1e-5

[[parties]]
name = "adnetwork"
password = "{adnetwork}"
epsilon_budget = 50.0
delta_budget = 1e-5

[[datasets]]
name = "impressions"
owner = "adnetwork"
location = "data/impressions/"
format = "parquet"
privacy_unit = "uid"
readers = ["advertiser", "adnetwork"]

# groups_per_person: how many values of a dimension one person may have ("all":
# any of the domain). A query that sets no max_groups_contributed lets a person
# count in that many groups, so no one's groups are dropped.
[datasets.columns]
uid = {{ role = "join_key" }}
ts = {{ role = "dimension", domain = {{ from = "2026-01-01", to = "2026-03-31" }}, groups_per_person = "all" }}
campaign_id = {{ role = "dimension", domain = {{ min = 1, max = {CAMPAIGNS} }}, groups_per_person = "all" }}
creative_id = {{ role = "dimension", domain = {{ min = 1, max = {creatives} }}, groups_per_person = "all" }}
channel = {{ role = "dimension", domain = {channels}, groups_per_person = "all" }}
country = {{ role = "dimension", domain = {countries}, groups_per_person = 1 }}
device = {{ role = "dimension", domain = {devices}, groups_per_person = "all" }}
test_group = {{ role = "dimension", domain = {test_groups}, groups_per_person = 1 }}
cost_micros = {{ role = "measure", bounds = [0, {max_cost}] }}

[[datasets]]
name = "conversions"
owner = "advertiser"
location = "data/conversions/"
format = "parquet"
privacy_unit = "uid"
readers = ["advertiser", "adnetwork"]

[datasets.columns]
uid = {{ role = "join_key" }}
# A purchase follows an impression by at most 30 days and a second.
ts = {{ role = "dimension", domain = {{ from = "2026-01-01", to = "2026-05-01" }}, groups_per_person = "all" }}
order_id = {{ role = "hidden" }}
revenue = {{ role = "measure", bounds = [0, 500] }}
product_category = {{ role = "dimension", domain = {categories}, groups_per_person = "all" }}
affiliate_id = {{ role = "dimension", domain = {{ min = 1, max = {AFFILIATES} }}, groups_per_person = "all" }}
is_return = {{ role = "dimension", groups_per_person = 2 }}
"#,
        creatives = CAMPAIGNS * CREATIVES_PER_CAMPAIGN,
        max_cost = MAX_COST_MICROS as i64,
    ))
}

pub(crate) fn credentials_toml(seed: u64, parties: &[&str]) -> String {
    let mut out = String::from(
        "# Demo credentials for the generated collaboration. Keep them out of version control.\n",
    );
    for party in parties {
        let password = demo_password(seed, party);
        writeln!(out, "[parties.{party}]\npassword = \"{password}\"").expect("writing to a String");
    }
    out
}

/// One result row, keys in the query's column order whatever serde_json's map ordering is.
struct Row(Vec<(String, Value)>);

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// Query results in workload order.
struct QueryResults(Vec<(String, Vec<Row>)>);

impl Serialize for QueryResults {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, rows) in &self.0 {
            map.serialize_entry(name, rows)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct Truth {
    scale_factor: f64,
    seed: u64,
    queries: QueryResults,
}

/// Runs the workload over the files just written, so the truth describes the data as stored
/// (and as any engine reading it will see it), not the generator's intentions.
async fn compute_truth(plan: &Plan, out_dir: &Path, spinner: &ProgressBar) -> Result<Vec<u8>> {
    // One partition: floating-point sums are then accumulated in file order, so revenue
    // totals are bit-for-bit reproducible and truth.json is too.
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    register_adbench_tables(&ctx, out_dir).await?;
    // The studies with the manifest's default parameters, in plain SQL.
    let studies = [
        ("study_lift".to_string(), lift_truth_sql("impressions", "conversions", "revenue", 2000.0)),
        (
            "study_attribution".to_string(),
            attribution_truth_sql("impressions", "conversions", "channel", "revenue", "is_return", (0.0, 500.0)),
        ),
        ("study_cohorts".to_string(), COHORTS_TRUTH_SQL.to_string()),
    ];
    truth_json(&ctx, plan.scale_factor, plan.seed, adbench_queries().into_iter().chain(studies).collect(), spinner).await
}

/// `truth.json`: each of `queries` run on `ctx`, by name.
pub(crate) async fn truth_json(
    ctx: &SessionContext,
    scale_factor: f64,
    seed: u64,
    queries: Vec<(String, String)>,
    spinner: &ProgressBar,
) -> Result<Vec<u8>> {
    let mut results = Vec::new();
    for (name, sql) in queries {
        spinner.set_message(format!("computing truth.json: {name}"));
        let batches = ctx
            .sql(&sql)
            .await
            .with_context(|| format!("planning {name}"))?
            .collect()
            .await
            .with_context(|| format!("running {name}"))?;
        results.push((name, batches_to_rows(&batches)?));
    }
    let truth = Truth { scale_factor, seed, queries: QueryResults(results) };
    let mut json = serde_json::to_vec_pretty(&truth)?;
    json.push(b'\n');
    Ok(json)
}

/// The lift study's exact answer with its default parameters: people per
/// test group, those with an outcome within 30 days after their first
/// exposure, and their `value` (capped at `cap` per person).
pub(crate) fn lift_truth_sql(exposure: &str, outcome: &str, value: &str, cap: f64) -> String {
    format!(
        "WITH e AS (SELECT uid, MIN(test_group) AS grp, MIN(ts) AS first_at FROM {exposure} GROUP BY uid), \
         o AS (SELECT c.uid, LEAST(SUM(c.{value}), {cap:?}) AS value FROM {outcome} c JOIN e ON c.uid = e.uid \
               WHERE c.ts > e.first_at AND c.ts <= e.first_at + INTERVAL '30 days' GROUP BY c.uid) \
         SELECT e.grp AS test_group, COUNT(*) AS people, COUNT(o.uid) AS converters, SUM(o.value) AS {value} \
         FROM e LEFT JOIN o ON e.uid = o.uid GROUP BY e.grp ORDER BY e.grp"
    )
}

/// The attribution study's exact answer with its default parameters: each
/// outcome credited to the `credit` of the person's last touch in the 30
/// days before it; per person and key, kept outcomes capped at 5 and the
/// value (all, and of returned rows) kept within `cap`.
pub(crate) fn attribution_truth_sql(touches: &str, outcome: &str, credit: &str, value: &str, returns: &str, cap: (f64, f64)) -> String {
    let clamp = |sum: &str| format!("GREATEST(LEAST({sum}, {:?}), {:?})", cap.1, cap.0);
    format!(
        "WITH o AS (SELECT uid, ts AS at, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY ts) AS k, \
               CASE WHEN {returns} THEN 1.0 ELSE 0.0 END AS returned, CAST({value} AS DOUBLE) AS value FROM {outcome}), \
         t AS (SELECT o.uid, o.k, o.returned, o.value, i.{credit} AS credit, \
               ROW_NUMBER() OVER (PARTITION BY o.uid, o.k ORDER BY i.ts DESC) AS rn \
               FROM o JOIN {touches} i ON i.uid = o.uid WHERE i.ts < o.at AND i.ts >= o.at - INTERVAL '30 days'), \
         c AS (SELECT uid, credit, LEAST(SUM(1.0 - returned), 5.0) AS conversions, {gross} AS gross, \
               {returned_sum} AS returned FROM t WHERE rn = 1 GROUP BY uid, credit) \
         SELECT credit AS {credit}, SUM(conversions) AS conversions, SUM(gross) AS gross_{value}, \
           SUM(returned) AS returned_{value}, SUM(gross) - SUM(returned) AS net_{value} \
         FROM c GROUP BY credit ORDER BY credit",
        gross = clamp("SUM(value)"),
        returned_sum = clamp("SUM(value * returned)"),
    )
}

/// The match-rate study's exact answer: people of each dataset and of both.
pub(crate) fn match_rate_truth_sql(left: &str, right: &str) -> String {
    format!(
        "SELECT (SELECT COUNT(DISTINCT uid) FROM {left}) AS left_people, (SELECT COUNT(DISTINCT uid) FROM {right}) AS right_people, \
           (SELECT COUNT(*) FROM (SELECT uid FROM {left} INTERSECT SELECT uid FROM {right}) m) AS matched"
    )
}

/// The cohorts study's exact answer with the demo's defaults: people by the
/// week of their first impression, and per week from it (6 weeks) those who
/// bought and their revenue (capped at 500 per person and week).
const COHORTS_TRUTH_SQL: &str = "WITH e AS (SELECT uid, MIN(ts) AS first_at, DATE_TRUNC('week', MIN(ts)) AS cohort FROM impressions GROUP BY uid), \
     a AS (SELECT c.uid, e.cohort, DATE_TRUNC('week', c.ts) AS period, LEAST(SUM(c.revenue), 500.0) AS value \
           FROM conversions c JOIN e ON c.uid = e.uid \
           WHERE c.ts >= e.first_at AND c.ts < e.cohort + INTERVAL '6 weeks' GROUP BY c.uid, e.cohort, DATE_TRUNC('week', c.ts)), \
     sizes AS (SELECT cohort, COUNT(*) AS people FROM e GROUP BY cohort) \
     SELECT CAST(s.cohort AS DATE) AS cohort, \
       CAST(round((date_part('epoch', a.period) - date_part('epoch', s.cohort)) / 604800) AS BIGINT) AS periods_after, \
       MIN(s.people) AS people, COUNT(*) AS active, SUM(a.value) AS revenue \
     FROM sizes s JOIN a ON a.cohort = s.cohort GROUP BY s.cohort, a.period ORDER BY 1, 2";

fn batches_to_rows(batches: &[RecordBatch]) -> Result<Vec<Row>> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let columns: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut writer = arrow::json::ArrayWriter::new(Vec::new());
    writer.write_batches(&batches.iter().collect::<Vec<_>>())?;
    writer.finish()?;
    let json = writer.into_inner();
    if json.is_empty() {
        return Ok(Vec::new());
    }
    let objects: Vec<Map<String, Value>> = serde_json::from_slice(&json)?;
    Ok(objects
        .into_iter()
        .map(|mut object| {
            // The JSON writer omits nulls; keep every column so rows have one shape.
            Row(columns
                .iter()
                .map(|c| (c.clone(), object.remove(c).unwrap_or(Value::Null)))
                .collect())
        })
        .collect())
}

/// Writes to a hidden temporary next to `path`, then renames, so an interrupted run never
/// leaves a truncated file under the final name.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("invalid output path {}", path.display()))?;
    let temp = dir.join(temp_name(name));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&temp)
        .with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)
        .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(dir: &Path, scale_factor: f64, seed: u64) -> GenerateSummary {
        generate(&GenerateOptions {
            scale_factor,
            out_dir: dir.to_path_buf(),
            seed,
            progress: false,
            truth: true,
            vertical: Default::default(),
        })
        .await
        .expect("generate")
    }

    /// Every regular file under `dir`, relative path → bytes, in path order.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).unwrap().to_path_buf();
                    out.push((rel, fs::read(&path).unwrap()));
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, dir, &mut files);
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    fn truth(dir: &Path) -> Value {
        serde_json::from_slice(&fs::read(dir.join("truth.json")).unwrap()).unwrap()
    }

    fn count(row: &Value, key: &str) -> u64 {
        row[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {row}"))
    }

    #[tokio::test]
    async fn same_seed_gives_identical_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = run(a.path(), 0.001, 7).await;
        let sb = run(b.path(), 0.001, 7).await;
        assert_eq!(
            (sa.impressions, sa.conversions, sa.people),
            (sb.impressions, sb.conversions, sb.people)
        );
        assert_eq!(sa.impressions, 10_000);
        assert_eq!(sa.people, 2_000);

        let files_a = snapshot(a.path());
        let files_b = snapshot(b.path());
        let names: Vec<_> = files_a.iter().map(|(p, _)| p.clone()).collect();
        for expected in [
            "credentials.toml",
            "manifest.toml",
            "truth.json",
            "data/impressions/part-0000.parquet",
            "data/impressions/part-0001.parquet",
            "data/conversions/part-0000.parquet",
            "data/conversions/part-0001.parquet",
        ] {
            assert!(
                names.contains(&PathBuf::from(expected)),
                "missing {expected}: {names:?}"
            );
        }
        assert!(
            names.iter().all(|p| !p.to_string_lossy().ends_with(".tmp")),
            "temporary files left behind: {names:?}"
        );
        assert_eq!(
            names,
            files_b.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
        );
        for ((path, bytes_a), (_, bytes_b)) in files_a.iter().zip(&files_b) {
            assert!(
                bytes_a == bytes_b,
                "{} differs between runs",
                path.display()
            );
        }

        // Rerunning into a used directory replaces the previous output.
        let again = run(a.path(), 0.001, 7).await;
        assert_eq!(again.impressions, sa.impressions);
        assert_eq!(snapshot(a.path()), files_a);
    }

    #[tokio::test]
    async fn different_seed_gives_different_data() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        run(a.path(), 0.001, 1).await;
        run(b.path(), 0.001, 2).await;
        for part in [
            "data/impressions/part-0000.parquet",
            "data/conversions/part-0000.parquet",
            "credentials.toml",
            "manifest.toml",
        ] {
            assert_ne!(
                fs::read(a.path().join(part)).unwrap(),
                fs::read(b.path().join(part)).unwrap(),
                "{part} did not change with the seed"
            );
        }
        assert_ne!(truth(a.path())["queries"], truth(b.path())["queries"]);
    }

    #[tokio::test]
    async fn truth_reflects_matching_and_lift() {
        let dir = tempfile::tempdir().unwrap();
        let summary = run(dir.path(), 0.01, 42).await;
        assert_eq!(summary.impressions, 100_000);
        assert_eq!(summary.people, 20_000);
        assert!((3_000..5_000).contains(&summary.conversions), "{summary:?}");

        let truth = truth(dir.path());
        assert_eq!(truth["scale_factor"], 0.01);
        assert_eq!(truth["seed"], 42);
        let queries = &truth["queries"];

        let q1 = &queries["Q1_match_rate"][0];
        let (imp, conv, matched) = (
            count(q1, "imp_users"),
            count(q1, "conv_users"),
            count(q1, "matched_users"),
        );
        assert!(matched <= imp.min(conv), "{q1}");
        let match_rate = matched as f64 / conv as f64;
        assert!(
            (0.3..=0.6).contains(&match_rate),
            "match rate {match_rate}: {q1}"
        );

        let q3 = queries["Q3_incrementality"].as_array().unwrap();
        let rate = |group: &str| {
            let row = q3.iter().find(|r| r["test_group"] == group).unwrap();
            count(row, "converters") as f64 / count(row, "exposed_users") as f64
        };
        let (test, control) = (rate("test"), rate("control"));
        assert!(test > control, "test {test} vs control {control}: {q3:?}");

        for name in ["Q2_affiliate_ltv", "Q4_reach_frequency", "Q5_last_touch"] {
            assert!(
                !queries[name].as_array().unwrap().is_empty(),
                "{name} is empty"
            );
        }
        let q4 = queries["Q4_reach_frequency"].as_array().unwrap();
        let impressions: u64 = q4.iter().map(|r| count(r, "impressions")).sum();
        assert_eq!(impressions, summary.impressions);
    }

    #[test]
    fn order_ids_are_unique() {
        let mut ids: Vec<i64> = (0..5_000)
            .flat_map(|p| (0..MAX_CONVERSIONS_PER_PERSON).map(move |s| order_id(p, s)))
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
