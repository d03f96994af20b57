//! The release path: the only code that turns exact aggregates into values a
//! party may see.
//!
//! [`release`] needs the [`Receipt`] of the query's charge, so nothing is
//! released before the charge is durable. When every group key has a public
//! domain it completes the groups to the full domain (a group with no rows is
//! released too, as a noisy zero, so the answer's shape never shows which
//! groups exist) and drops any group key outside it; otherwise the groups
//! released are those DP partition selection keeps (which depends on the
//! data, within the selection's (ε, δ)). It adds OpenDP noise to every cell. [`Released`], the answer,
//! can only be built here. [`finish`] then runs the analyst's post-processing
//! (projection, HAVING, ORDER BY, LIMIT) on the released values alone, which
//! costs no privacy.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;

use crate::error::{DpError, Result, Rule};
use crate::accountant::{round_for_display, Receipt};
use crate::mechanism::{Mechanism, Noise, NoisyMin, Share, Threshold};
use crate::policy::Domain;
use crate::rewrite::{release_table_schema, AggregateKind, DpQuery, ExactColumn, ExplainQuery, NoDataQuery, PlannedQuery};

/// Arrow field metadata keys on every noisy column.
pub const META_MECHANISM: &str = "cleanroom.noise.mechanism";
pub const META_STDDEV: &str = "cleanroom.noise.stddev";
pub const META_CI95: &str = "cleanroom.ci95.half_width";
pub const META_EPSILON: &str = "cleanroom.epsilon";
/// Arrow schema metadata keys on every answer.
pub const META_CHARGE: &str = "cleanroom.charge.epsilon";
pub const META_CHARGE_DELTA: &str = "cleanroom.charge.delta";
pub const META_REMAINING: &str = "cleanroom.budget.remaining_epsilon";
pub const META_REMAINING_DELTA: &str = "cleanroom.budget.remaining_delta";
pub const META_RECEIPT: &str = "cleanroom.receipt";
/// `SEQ:HASH` of the charge's record in the audit log: a party can keep it and
/// later prove the log still holds it (`cleanroom audit verify --expect`).
pub const META_AUDIT_RECORD: &str = "cleanroom.audit.record";
/// The contribution bounds the answer was computed with, and what they may
/// have dropped: `none`, `groups` (a person's groups beyond the bound),
/// `rows` (a person's rows in a group beyond the bound) or `groups,rows`.
pub const META_GROUPS_PER_PERSON: &str = "cleanroom.contribution.max_groups_contributed";
pub const META_ROWS_PER_GROUP: &str = "cleanroom.contribution.max_contributions_per_group";
pub const META_CLIPPING: &str = "cleanroom.contribution.clipping";
/// `query` when the query, session or connection set both bounds,
/// `manifest` when a bound comes from the manifest's declarations.
pub const META_BOUNDS_FROM: &str = "cleanroom.contribution.bounds_from";
/// The study an answer is, with every parameter it ran with.
pub const META_STUDY: &str = "cleanroom.study";
/// `true` when noisy counts below 0 are reported as 0.
pub const META_CLAMP_COUNTS: &str = "cleanroom.clamp_counts";

/// Noisy values of the DP aggregate, one row per cell of the public domain,
/// and the charge that paid for them.
#[derive(Debug, Clone)]
pub struct NoisyAggregate {
    batch: RecordBatch,
    paid: Paid,
}

/// What an answer says about the charge that paid for its release.
#[derive(Debug, Clone)]
struct Paid {
    receipt: String,
    remaining: f64,
    remaining_delta: f64,
    audit_record: String,
}

impl Paid {
    /// The charge's entries of an answer's (or a kept release's) schema
    /// metadata; [`NoisyAggregate::from_stored`] reads them back.
    fn write(&self, metadata: &mut HashMap<String, String>) {
        metadata.insert(META_RECEIPT.to_string(), self.receipt.clone());
        metadata.insert(META_REMAINING.to_string(), format!("{}", self.remaining));
        metadata.insert(META_REMAINING_DELTA.to_string(), format!("{}", self.remaining_delta));
        metadata.insert(META_AUDIT_RECORD.to_string(), self.audit_record.clone());
    }
}

impl NoisyAggregate {
    /// The release as kept in the released-answer store (Arrow IPC, the
    /// charge in the schema metadata).
    pub fn to_stored(&self) -> Result<Vec<u8>> {
        let mut metadata = self.batch.schema().metadata().clone();
        self.paid.write(&mut metadata);
        let schema = Arc::new(self.batch.schema().as_ref().clone().with_metadata(metadata));
        let batch = self.batch.clone().with_schema(schema.clone()).map_err(|e| DpError::Ledger(format!("cannot store the release: {e}")))?;
        Released { schema, batches: vec![batch] }.to_stored()
    }

    /// A release [`Self::to_stored`] wrote, read back from the store (which
    /// only ever holds releases that were paid for).
    pub fn from_stored(bytes: &[u8]) -> Result<NoisyAggregate> {
        let stored = Released::from_stored(bytes)?;
        let metadata = stored.schema.metadata().clone();
        let field = |key: &str| {
            metadata.get(key).cloned().ok_or_else(|| DpError::Ledger(format!("the stored release has no {key}")))
        };
        let number = |key: &str| -> Result<f64> {
            field(key)?.parse().map_err(|_| DpError::Ledger(format!("the stored release has an unreadable {key}")))
        };
        let paid = Paid {
            receipt: field(META_RECEIPT)?,
            remaining: number(META_REMAINING)?,
            remaining_delta: number(META_REMAINING_DELTA)?,
            audit_record: field(META_AUDIT_RECORD)?,
        };
        let schema = Arc::new(stored.schema.as_ref().clone().with_metadata(HashMap::new()));
        let batch = arrow::compute::concat_batches(&schema, &stored.batches)
            .map_err(|e| DpError::Ledger(format!("unreadable stored release: {e}")))?;
        Ok(NoisyAggregate { batch, paid })
    }

    /// The receipt of the charge that paid for this release.
    pub fn receipt(&self) -> &str {
        &self.paid.receipt
    }
}

/// An answer a party may see: every value in it went through [`release`].
#[derive(Debug, Clone)]
pub struct Released {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl Released {
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }

    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// The answer as stored in the released-answer store (Arrow IPC).
    pub fn to_stored(&self) -> Result<Vec<u8>> {
        let stored = |e: arrow::error::ArrowError| DpError::Ledger(format!("cannot store the released answer: {e}"));
        let mut bytes = Vec::new();
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &self.schema).map_err(stored)?;
        for batch in &self.batches {
            writer.write(batch).map_err(stored)?;
        }
        writer.finish().map_err(stored)?;
        drop(writer);
        Ok(bytes)
    }

    /// An answer [`Released::to_stored`] wrote, read back from the store
    /// (which only ever holds answers that were released).
    pub fn from_stored(bytes: &[u8]) -> Result<Released> {
        let unreadable = |e: arrow::error::ArrowError| DpError::Ledger(format!("unreadable released answer: {e}"));
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(unreadable)?;
        let schema = reader.schema();
        let batches = reader.collect::<std::result::Result<Vec<_>, _>>().map_err(unreadable)?;
        Ok(Released { schema, batches })
    }
}

/// The key under which the release of `query`'s DP aggregate for `party` is
/// kept: the party, the DP aggregate as checked (its structural `Debug`
/// form, not the rewrite, whose keyed-hash salt is fresh each time), its
/// group keys with their public domains, its aggregates with their
/// sensitivities and shares, the partition selection, the calibrated
/// mechanisms, the privacy options that shape the release, the policy it
/// was checked against, the files of every table the aggregate resolved,
/// and the data versions the gateway read.
///
/// What surrounds the DP aggregate — projections, `ORDER BY`, `LIMIT`,
/// filters, outer aggregates, a client's wrapper around the question — is
/// not part of the key: those run on the kept release again ([`finish`]).
/// The parts are length-prefixed; the files come from the aggregate's own
/// table scans, so a release is never filed under a version other than the
/// one it was computed on.
///
/// Why the cache is private: a release, once paid for by a party, is that
/// party's; computing anything from the same noisy values again is
/// post-processing, which costs nothing and reveals nothing new (a fresh
/// draw would instead give an averaging attack another sample). Any change
/// of party, DP aggregate, option, mechanism, policy or data is a new key.
pub fn release_key(query: &DpQuery, party: &str, policy: &crate::policy::Policy, data_version: &str) -> String {
    use sha2::{Digest, Sha256};
    // Without what does not shape the release: the companion interval
    // columns (computed after it), where the bounds came from, the privacy
    // unit's name (checked against the manifest's), and the study asking.
    let options = crate::options::ResolvedOptions {
        confidence_intervals: false,
        bounds_chosen: Default::default(),
        privacy_unit_column: None,
        // A study's name and split: the split is in the mechanisms; the
        // same aggregate asked as another study or as SQL is the same release.
        study: None,
        column_split: None,
        ..query.options.clone()
    };
    let mut h = Sha256::new();
    for part in [
        "noisy aggregate 1".to_string(),
        party.to_string(),
        query.core.clone(),
        format!("{:?}", query.groups),
        format!("{:?}", query.aggregates),
        format!("{:?}", query.selection),
        format!("{:?}", query.mechanisms),
        format!("{:?}", (query.epsilon, query.delta)),
        format!("{options:?}"),
        format!("{policy:?}"),
        resolved_files(&query.original).join("\n"),
        data_version.to_string(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The files each table scan of `plan` reads (listing tables), in plan order.
fn resolved_files(plan: &LogicalPlan) -> Vec<String> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::datasource::listing::ListingTable;
    let mut files = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            files.push(format!("table {}", scan.table_name));
            if let Ok(provider) = datafusion::datasource::source_as_provider(&scan.source) {
                if let Some(listing) = provider.downcast_ref::<ListingTable>() {
                    files.extend(listing.table_paths().iter().map(|p| p.to_string()));
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    files
}

/// The schema of an `EXPLAIN` answer: one row per part of the explanation.
pub fn explain_schema() -> Schema {
    Schema::new(vec![
        Field::new("plan_type", DataType::Utf8, true),
        Field::new("plan", DataType::Utf8, true),
    ])
}

/// Answer `EXPLAIN`: the privacy cost and the rewritten plan. Everything in it
/// is derived from the SQL text and the policy (the plan is a logical plan,
/// with no statistics of any dataset), so it is public and costs nothing.
pub fn explain(query: &ExplainQuery) -> Result<Released> {
    let mut rows: Vec<(String, String)> = Vec::new();
    match query.inner.as_ref() {
        PlannedQuery::Dp(q) => {
            let mut cost = if q.delta > 0.0 {
                format!(
                    "epsilon = {}, delta = {}, charged to the querying party when the query runs\n",
                    round_for_display(q.epsilon),
                    q.delta
                )
            } else {
                format!(
                    "epsilon = {} (pure DP, delta = 0), charged to the querying party when the query runs\n",
                    round_for_display(q.epsilon)
                )
            };
            let keys: Vec<String> = q
                .groups
                .iter()
                .map(|g| match &g.domain {
                    Some(d) => format!("{} ({} public keys)", g.name, d.len()),
                    None => format!("{} (no public domain)", g.name),
                })
                .collect();
            match &q.selection {
                None => {
                    let cells: usize = q.groups.iter().filter_map(|g| g.domain.as_ref().map(Domain::len)).product();
                    cost.push_str(&format!(
                        "groups: {} -> {cells} rows released, every key of the public domains\n",
                        if keys.is_empty() { "none".to_string() } else { keys.join(" x ") }
                    ));
                }
                Some(t) => cost.push_str(&format!(
                    "groups: {} -> keys chosen by DP partition selection: a key is released when its count of people plus discrete Laplace noise (scale {}) is at least {}; epsilon {}, delta {} (at most {} groups per person)\n",
                    keys.join(" x "),
                    t.scale,
                    t.threshold,
                    round_for_display(t.epsilon),
                    t.delta,
                    t.max_groups
                )),
            }
            let c = &q.clipping;
            cost.push_str(&format!(
                "contribution bounds{}: at most {} group(s) per person ({}), at most {} row(s) per person and group ({})\n",
                if c.derived { " (the query set none: the manifest's)" } else { "" },
                c.groups_per_person,
                if c.groups { "a person's further groups are dropped" } else { "no person can reach more, nothing dropped" },
                c.rows_per_group,
                if c.rows { "further rows are dropped" } else { "nothing dropped" },
            ));
            if let Some(s) = &q.options.column_split {
                let parts: Vec<String> = q
                    .aggregates
                    .iter()
                    .map(|a| match a.share {
                        Share::Epsilon(e) => format!("{} epsilon {}", a.output_name, round_for_display(e)),
                        Share::Rho(r) => format!("{} rho {r}", a.output_name),
                    })
                    .collect();
                cost.push_str(&format!("budget split across the columns: {} ({})\n", parts.join(", "), s.why));
            }
            if let Share::Rho(rho) = q.aggregates[0].share {
                // The columns' δ: the query's, less the selection's.
                let (total, each) = match &q.options.column_split {
                    None => (rho * q.aggregates.len() as f64, format!("{rho} per column")),
                    Some(_) => (
                        q.aggregates.iter().map(|a| if let Share::Rho(r) = a.share { r } else { 0.0 }).sum(),
                        "split across the columns as above".to_string(),
                    ),
                };
                let delta = q.delta - q.selection.map(|t| t.delta).unwrap_or(0.0);
                cost.push_str(&format!(
                    "noise: Gaussian, composed in zCDP: rho = {total} in all ({each}), converted to epsilon <= {} at delta = {delta}\n",
                    round_for_display(crate::mechanism::zcdp_epsilon(total, delta)?),
                ));
            }
            for (name, l) in calibrations(q)? {
                let (norm, sensitivity) = l.sensitivity();
                let (what, spent) = l.cost();
                cost.push_str(&format!(
                    "{name}: {} noise, {norm} sensitivity {sensitivity}, {what} {}, scale {}, stddev {:.6}, 95% interval +/- {:.6}{}\n",
                    l.name().replace('_', " "),
                    round_for_display(spent),
                    l.scale(),
                    l.stddev(),
                    l.ci95_half_width(),
                    resolution(l.unit())
                ));
            }
            for a in q.aggregates.iter() {
                if let (Some(spec), Share::Epsilon(e)) = (&a.quantile, a.share) {
                    cost.push_str(&format!(
                        "{}: quantile {} chosen per group by noisy max (permute-and-flip) among {} candidates from {} to {}, score L-infinity sensitivity {}, epsilon {} per group ({} groups per person)\n",
                        a.output_name,
                        spec.permille as f64 / 1000.0,
                        spec.candidates.len(),
                        spec.candidates[0],
                        spec.candidates[spec.candidates.len() - 1],
                        a.sensitivity,
                        round_for_display(e / spec.groups_per_person),
                        spec.groups_per_person
                    ));
                }
            }
            for a in q.aggregates.iter().filter(|a| a.average.is_some()) {
                let parts = if a.squares.is_some() { 3.0 } else { 2.0 };
                let (what, part) = match a.share.split(parts) {
                    Share::Epsilon(e) => ("epsilon", e),
                    Share::Rho(r) => ("rho", r),
                };
                let text = match a.squares {
                    None => format!("noisy sum (L1 sensitivity {}{}) / noisy count", a.sensitivity * a.unit, resolution(a.unit)),
                    Some((l1, _)) => format!(
                        "from a noisy count, a noisy sum of values centred on the bounds' midpoint (L1 sensitivity {}{}) and a noisy sum of their squares (L1 sensitivity {}{})",
                        a.sensitivity * a.unit,
                        resolution(a.unit),
                        l1 * a.squares_unit,
                        resolution(a.squares_unit)
                    ),
                };
                cost.push_str(&format!(
                    "{}: {text}, each with {what} {}, clamped to what the bounds allow\n",
                    a.output_name,
                    round_for_display(part)
                ));
            }
            rows.push(("dp_cost".into(), cost.trim_end().to_string()));
            rows.push(("dp_rewritten_plan".into(), q.exact_plan.display_indent().to_string()));
            rows.push(("post_processing_plan".into(), q.original.display_indent().to_string()));
        }
        PlannedQuery::NoData(q) => {
            rows.push(("dp_cost".into(), "epsilon = 0: the statement reads no dataset".into()));
            rows.push(("logical_plan".into(), q.plan.display_indent().to_string()));
        }
        PlannedQuery::Explain(_) => {
            return Err(DpError::refused(Rule::Explain, "EXPLAIN of an EXPLAIN is not supported"));
        }
    }
    let schema = Arc::new(explain_schema());
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.as_str()))),
        ],
    )
    .map_err(|e| DpError::Mechanism(e.to_string()))?;
    Ok(Released { schema, batches: vec![batch] })
}

/// How an exact sum in steps of `unit` is described: nothing for whole
/// numbers, else its fixed-point resolution.
fn resolution(unit: f64) -> String {
    if unit == 1.0 {
        String::new()
    } else {
        format!(", summed exactly in fixed point with resolution 2^{}", unit.log2())
    }
}

/// Answer a statement that reads no dataset (`SELECT 1`, a client's probe,
/// or the querying party's own system tables). The planner made a
/// [`NoDataQuery`] only after finding no scan of a collaboration dataset
/// anywhere in the plan (subqueries included), so it reveals nothing about
/// anyone else; it runs on a fresh context (the system tables it may read
/// travel inside the plan, built for this party only).
///
/// Such a statement can still ask for much work (`VALUES` lists joined with
/// each other): it runs under its own memory limit, and an answer of more
/// than [`MAX_NO_DATA_ROWS`] rows is refused, so no statement can exhaust
/// the server's memory.
pub async fn without_data(query: &NoDataQuery) -> Result<Released> {
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::logical_expr::LogicalPlanBuilder;
    let runtime = RuntimeEnvBuilder::new().with_memory_limit(NO_DATA_MEMORY, 1.0).build_arc()?;
    let ctx = SessionContext::new_with_config_rt(datafusion::prelude::SessionConfig::new(), runtime);
    let bounded = LogicalPlanBuilder::from(query.plan.clone()).limit(0, Some(MAX_NO_DATA_ROWS + 1))?.build()?;
    let batches = ctx.execute_logical_plan(bounded).await?.collect().await?;
    if batches.iter().map(RecordBatch::num_rows).sum::<usize>() > MAX_NO_DATA_ROWS {
        return Err(DpError::refused_with(
            Rule::AnswerSize,
            format!("the statement's answer has more than {MAX_NO_DATA_ROWS} rows"),
            "an aggregate or a LIMIT",
        ));
    }
    let schema = Arc::new(query.announced_schema());
    if query.probed.is_some() {
        // A probe: no row, the probed DP query's columns.
        return Ok(Released { schema, batches: Vec::new() });
    }
    let batches = batches
        .into_iter()
        .map(|b| RecordBatch::try_new(schema.clone(), columns_as(&b, &schema)?))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| DpError::Mechanism(e.to_string()))?;
    Ok(Released { schema, batches })
}

/// The columns of `batch` cast to the types of the first fields of
/// `schema` (the announced types).
fn columns_as(batch: &RecordBatch, schema: &Schema) -> std::result::Result<Vec<ArrayRef>, arrow::error::ArrowError> {
    batch.columns().iter().zip(schema.fields()).map(|(c, f)| cast(c, f.data_type())).collect()
}

/// Most rows a statement that reads no dataset may answer with.
pub const MAX_NO_DATA_ROWS: usize = 1_000_000;
/// Memory the operators of such a statement may hold.
const NO_DATA_MEMORY: usize = 256 << 20;

/// The schema announced for an answer before it runs: every column nullable,
/// as in the released batches (clients compare the two), and of a type every
/// client reads ([`plain_type`]).
pub fn announced_schema(schema: &Schema) -> Schema {
    Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_data_type(plain_type(f.data_type())).with_nullable(true))
            .collect::<Vec<_>>(),
    )
}

/// `t` as clients of every kind read it: text and bytes in their plain Arrow
/// forms (`Utf8`, `Binary`), not views or dictionaries, which SQLAlchemy
/// dialects, ODBC/JDBC type mappings and older Arrow readers do not know;
/// nested types likewise, field by field. Every value keeps its meaning
/// (the answer is cast to this type).
pub fn plain_type(t: &DataType) -> DataType {
    let field = |f: &arrow::datatypes::FieldRef| Arc::new(f.as_ref().clone().with_data_type(plain_type(f.data_type())));
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::Dictionary(_, value) => plain_type(value),
        DataType::List(f) | DataType::ListView(f) => DataType::List(field(f)),
        DataType::LargeList(f) | DataType::LargeListView(f) => DataType::LargeList(field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(field(f), *n),
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(field).collect()),
        other => other.clone(),
    }
}

/// Add noise to the exact bounded aggregates of `query`.
///
/// Why it is private: `exact` comes from [`DpQuery::exact_plan`], where each
/// person changes aggregate column j (over all groups) by at most
/// `sensitivity_j` in L1 (and `l2_sensitivity_j` in L2); the cells are the
/// public domain's, so the set of rows released does not depend on the data
/// (or they are chosen by DP partition selection, see [`selected_cells`]);
/// each column gets Laplace noise with ε_j, or Gaussian noise with ρ_j, from
/// OpenDP's privacy maps, composed as [`crate::accountant`] explains into the
/// query's (ε, δ). The receipt proves that (ε, δ) is on the ledger.
pub fn release(query: &DpQuery, exact: &[RecordBatch], receipt: &Receipt) -> Result<NoisyAggregate> {
    if receipt.query_id() != query.id || receipt.epsilon() + 1e-12 < query.epsilon || receipt.delta() < query.delta {
        return Err(DpError::Ledger("the receipt does not pay for this query".into()));
    }
    let cells = match &query.selection {
        None => domain_cells(query),
        Some(threshold) => selected_cells(query, exact, threshold)?,
    };
    let index: HashMap<&[String], usize> = cells.iter().enumerate().map(|(i, k)| (k.as_slice(), i)).collect();

    let groups = query.groups.len();
    let exact_columns: Vec<String> = query
        .aggregates
        .iter()
        .enumerate()
        .flat_map(|(j, a)| ExactColumn::of_aggregate(j, a))
        .map(ExactColumn::name)
        .collect();
    // Every exact column holds whole numbers (counts, or sums in steps of
    // their grid): read exactly, as 128-bit integers.
    let mut exact_values: HashMap<&str, Vec<i128>> =
        exact_columns.iter().map(|n| (n.as_str(), vec![0i128; cells.len()])).collect();
    for batch in exact {
        let keys = row_keys(batch, groups)?;
        let aggs: Vec<(&str, ArrayRef)> = exact_columns
            .iter()
            .map(|name| {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| DpError::Mechanism(format!("exact column {name} missing")))?;
                let column = cast(column, &DataType::Decimal128(38, 0)).map_err(|e| DpError::Mechanism(e.to_string()))?;
                Ok((name.as_str(), column))
            })
            .collect::<Result<_>>()?;
        for (row, key) in keys.iter().enumerate() {
            // NULL is outside every public domain and never selected.
            let Some(key) = key else { continue };
            // Keys outside the public domain, or not selected, are dropped:
            // releasing them would reveal that someone has that value.
            let Some(&cell) = index.get(key.as_slice()) else { continue };
            for (name, a) in &aggs {
                let a = a.as_any().downcast_ref::<arrow::array::Decimal128Array>().expect("decimal");
                if !a.is_null(row) {
                    exact_values.get_mut(name).expect("known column")[cell] = a.value(row);
                }
            }
        }
    }

    let schema = release_table_schema(query);
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (g, key) in query.groups.iter().enumerate() {
        let array: ArrayRef = match key.domain {
            // Selected keys come back from their text form (the planner only
            // selects key types whose text form round-trips).
            None => Arc::new(StringArray::from_iter_values(cells.iter().map(|c| c[g].as_str()))),
            Some(Domain::Strings(_)) => Arc::new(StringArray::from_iter_values(cells.iter().map(|c| c[g].as_str()))),
            Some(Domain::IntRange { .. }) => Arc::new(Int64Array::from_iter_values(
                cells.iter().map(|c| c[g].parse::<i64>().expect("integer domain key")),
            )),
            Some(Domain::DateRange { .. } | Domain::Periods { .. }) => Arc::new(arrow::array::Date32Array::from_iter_values(
                cells.iter().map(|c| crate::policy::parse_date(&c[g]).expect("date domain key")),
            )),
        };
        columns.push(cast(&array, schema.field(g).data_type()).map_err(|e| DpError::Mechanism(e.to_string()))?);
    }
    if query.mechanisms.len() != query.aggregates.len() {
        return Err(DpError::Mechanism("the query's mechanisms were not calibrated".into()));
    }
    for (j, (agg, mechanism)) in query.aggregates.iter().zip(&query.mechanisms).enumerate() {
        let sums = &exact_values[ExactColumn::Total(j).name().as_str()];
        // Noisy values of one exact column, scaled back from steps.
        let steps = |noise: &Noise, exact: &[i128]| -> Result<Vec<f64>> {
            let unit = noise.unit();
            Ok(noise.apply_steps(exact)?.into_iter().map(|v| v as f64 * unit).collect())
        };
        let noisy = match mechanism {
            // A quantile: per group, OpenDP's noisy max picks the candidate
            // whose rank is closest to q·N.
            Mechanism::Quantile(selection) => {
                let Some(q) = &agg.quantile else {
                    return Err(DpError::Mechanism("a quantile mechanism for another aggregate".into()));
                };
                let counts = sums;
                let at_most: Vec<&Vec<i128>> =
                    (0..q.candidates.len()).map(|i| &exact_values[ExactColumn::AtMost(j, i).name().as_str()]).collect();
                let scores = (0..cells.len()).map(|cell| {
                    let n = counts[cell] as i64;
                    at_most.iter().map(|c| (1000 * c[cell] as i64 - q.permille as i64 * n).abs()).collect()
                });
                let chosen: Vec<f64> = selection.select_each(scores)?.into_iter().map(|i| q.candidates[i]).collect();
                let array: ArrayRef = Arc::new(Float64Array::from(chosen));
                columns.push(cast(&array, schema.field(groups + j).data_type()).map_err(|e| DpError::Mechanism(e.to_string()))?);
                continue;
            }
            Mechanism::Total(noise) if agg.integral => {
                // Whole numbers stay integers from the exact sum to the
                // answer; a noisy count below 0 becomes 0 when asked
                // (post-processing of the noisy value alone).
                let mut values = noise.apply_steps(sums)?;
                if clamped_count(query, agg) {
                    values.iter_mut().for_each(|v| *v = (*v).max(0));
                }
                let array: ArrayRef = Arc::new(Int64Array::from(values));
                columns.push(cast(&array, schema.field(groups + j).data_type()).map_err(|e| DpError::Mechanism(e.to_string()))?);
                continue;
            }
            Mechanism::Total(noise) => steps(noise, sums)?,
            // A variance: noisy count n, sum s and sum of squares q of the
            // values centred on the midpoint (a third of the budget each,
            // sequential composition); q/n − (s/n)² is post-processing,
            // clamped to [0, half-width²] (no population variance of
            // values in the bounds is larger), then sample-corrected and rooted as asked.
            Mechanism::Variance { sum, count, squares } => {
                let Some((_, _, (low, high))) = agg.average else {
                    return Err(DpError::Mechanism("a variance without its bounds".into()));
                };
                let noisy_sums = steps(sum, sums)?;
                let noisy_counts = steps(count, &exact_values[ExactColumn::Count(j).name().as_str()])?;
                let noisy_squares = steps(squares, &exact_values[ExactColumn::Squares(j).name().as_str()])?;
                let largest = ((high - low) / 2.0).powi(2);
                let (sample, root) = match agg.kind {
                    AggregateKind::Variance { sample, root } => (sample, root),
                    _ => (false, false),
                };
                (0..noisy_sums.len())
                    .map(|i| {
                        let n = noisy_counts[i].max(1.0);
                        let mean = noisy_sums[i] / n;
                        let mut var = (noisy_squares[i] / n - mean * mean).clamp(0.0, largest);
                        if sample && n > 1.0 {
                            var *= n / (n - 1.0);
                        }
                        if root { var.sqrt() } else { var }
                    })
                    .collect()
            }
            // AVG: a noisy sum and a noisy count, each with half of this
            // aggregate's ε (sequential composition); their ratio is
            // post-processing, clamped to the measure's bounds.
            Mechanism::Average { sum, count } => {
                let Some((_, _, (low, high))) = agg.average else {
                    return Err(DpError::Mechanism("an average without its bounds".into()));
                };
                let noisy_sums = steps(sum, sums)?;
                let noisy_counts = steps(count, &exact_values[ExactColumn::Count(j).name().as_str()])?;
                noisy_sums.iter().zip(noisy_counts).map(|(s, c)| (s / c.max(1.0)).clamp(low, high)).collect()
            }
        };
        let array: ArrayRef = Arc::new(Float64Array::from(noisy));
        columns.push(cast(&array, schema.field(groups + j).data_type()).map_err(|e| DpError::Mechanism(e.to_string()))?);
    }
    let batch = RecordBatch::try_new(schema, columns).map_err(|e| DpError::Mechanism(e.to_string()))?;
    let paid = Paid {
        receipt: receipt.id().to_string(),
        remaining: round_for_display(receipt.remaining()),
        remaining_delta: receipt.remaining_delta(),
        audit_record: receipt.audit_record(),
    };
    Ok(NoisyAggregate { batch, paid })
}

/// Whether `agg` is a count the query asked to report at 0 or above.
fn clamped_count(query: &DpQuery, agg: &crate::rewrite::DpAggregate) -> bool {
    query.options.clamp_counts && matches!(agg.kind, AggregateKind::CountRows | AggregateKind::CountValues | AggregateKind::CountPeople)
}

/// The group keys of the exact rows (as text), NULL when a key is NULL.
fn row_keys(batch: &RecordBatch, groups: usize) -> Result<Vec<Option<Vec<String>>>> {
    let keys: Vec<ArrayRef> = (0..groups)
        .map(|g| cast(batch.column(g), &DataType::Utf8))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| DpError::Mechanism(e.to_string()))?;
    let keys: Vec<&StringArray> = keys.iter().map(|a| a.as_any().downcast_ref::<StringArray>().expect("utf8")).collect();
    Ok((0..batch.num_rows())
        .map(|row| {
            if keys.iter().any(|k| k.is_null(row)) {
                None
            } else {
                Some(keys.iter().map(|k| k.value(row).to_string()).collect())
            }
        })
        .collect())
}

/// The keys DP partition selection releases: of the groups present in
/// `exact` (public-domain keys inside their domains, no NULL key), those
/// whose noisy people count ([`ExactColumn::People`]) reaches the threshold. Their order is
/// the keys' text order, not the data's.
///
/// Why it is private: see [`Threshold`]; the exact counts go to OpenDP's
/// thresholding measurement and only the set of keys comes back.
fn selected_cells(query: &DpQuery, exact: &[RecordBatch], threshold: &Threshold) -> Result<Vec<Vec<String>>> {
    let domains: Vec<Option<std::collections::HashSet<String>>> =
        query.groups.iter().map(|g| g.domain.as_ref().map(|d| d.values().into_iter().collect())).collect();
    let mut candidates: Vec<Vec<String>> = Vec::new();
    let mut counts: HashMap<u64, i64> = HashMap::new();
    for batch in exact {
        let people = batch
            .column_by_name(&ExactColumn::People.name())
            .ok_or_else(|| DpError::Mechanism("the exact column of people per group is missing".into()))?;
        let people = cast(people, &DataType::Int64).map_err(|e| DpError::Mechanism(e.to_string()))?;
        let people = people.as_any().downcast_ref::<Int64Array>().expect("i64");
        for (row, key) in row_keys(batch, query.groups.len())?.into_iter().enumerate() {
            let Some(key) = key else { continue };
            let inside = key.iter().zip(&domains).all(|(k, d)| d.as_ref().is_none_or(|d| d.contains(k)));
            if !inside || people.is_null(row) {
                continue;
            }
            counts.insert(candidates.len() as u64, people.value(row));
            candidates.push(key);
        }
    }
    let mut cells: Vec<Vec<String>> = threshold
        .select(counts)?
        .into_iter()
        .map(|i| std::mem::take(&mut candidates[i as usize]))
        .collect();
    cells.sort();
    Ok(cells)
}

/// Every combination of the group keys' public domains, as text, in domain order.
fn domain_cells(query: &DpQuery) -> Vec<Vec<String>> {
    let mut cells: Vec<Vec<String>> = vec![Vec::new()];
    for key in &query.groups {
        let values = key.domain.as_ref().map(Domain::values).unwrap_or_default();
        cells = cells
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push(v.clone());
                    c
                })
            })
            .collect();
    }
    cells
}

/// Calibrate every mechanism [`release`] will run for `query` — each
/// column's noise, AVG's and the variances' parts, each quantile's noisy
/// max — once, at planning. Calibration depends on the sensitivities and the
/// budget split only (the SQL and the policy), so a failure refuses the
/// query before anything is charged, and the answer's schema can announce
/// the noise before anything runs.
pub(crate) fn calibrate(query: &DpQuery) -> Result<Vec<Mechanism>> {
    query
        .aggregates
        .iter()
        .map(|agg| {
            if let Some(q) = &agg.quantile {
                let Share::Epsilon(epsilon) = agg.share else {
                    return Err(DpError::Mechanism("a quantile needs Laplace noise".into()));
                };
                // A person reaches at most k groups, so each group's
                // selection gets ε / k (sequential composition).
                return Ok(Mechanism::Quantile(NoisyMin::calibrate(agg.sensitivity as i64, epsilon / q.groups_per_person)?));
            }
            Ok(match (agg.average, agg.squares) {
                (None, _) => Mechanism::Total(Noise::calibrate_steps(agg.share, agg.sensitivity, agg.l2_sensitivity, agg.unit)?),
                (Some((count_l1, count_l2, _)), Some((squares_l1, squares_l2))) => {
                    let third = agg.share.split(3.0);
                    Mechanism::Variance {
                        sum: Noise::calibrate_steps(third, agg.sensitivity, agg.l2_sensitivity, agg.unit)?,
                        count: Noise::calibrate_steps(third, count_l1, count_l2, 1.0)?,
                        squares: Noise::calibrate_steps(third, squares_l1, squares_l2, agg.squares_unit)?,
                    }
                }
                (Some((count_l1, count_l2, _)), None) => {
                    let half = agg.share.split(2.0);
                    Mechanism::Average {
                        sum: Noise::calibrate_steps(half, agg.sensitivity, agg.l2_sensitivity, agg.unit)?,
                        count: Noise::calibrate_steps(half, count_l1, count_l2, 1.0)?,
                    }
                }
            })
        })
        .collect()
}

/// The noise each DP aggregate column of `query` will get, as calibrated at
/// planning.
fn calibrations(query: &DpQuery) -> Result<Vec<(String, Noise)>> {
    Ok(query
        .aggregates
        .iter()
        .zip(&query.mechanisms)
        .filter_map(|(a, m)| m.total().map(|n| (a.output_name.clone(), *n)))
        .collect())
}

/// The schema of `query`'s answer as announced before it runs (in FlightInfo
/// and prepared statements): every column nullable, each noisy column with
/// its mechanism, noise standard deviation, 95 % interval half-width and ε in
/// its field metadata, and the query's charge in the schema metadata.
pub fn announced_dp_schema(query: &DpQuery) -> Result<Schema> {
    let noise = noisy_outputs(query, &calibrations(query)?);
    let base = announced_schema(&query.output_schema());
    let fields: Vec<Field> = base
        .fields()
        .iter()
        .zip(noise)
        .map(|(f, n)| match n {
            Some(l) => f.as_ref().clone().with_metadata(HashMap::from([
                (META_MECHANISM.to_string(), l.name().to_string()),
                (META_STDDEV.to_string(), format!("{}", l.stddev())),
                (META_CI95.to_string(), format!("{}", l.ci95_half_width())),
                (format!("cleanroom.{}", l.cost().0), format!("{}", l.cost().1)),
            ])),
            None => f.as_ref().clone(),
        })
        .collect();
    let mut fields = fields;
    for (name, _) in companion_intervals(query, &fields)? {
        fields.push(Field::new(format!("{name}_ci_low"), DataType::Float64, true));
        fields.push(Field::new(format!("{name}_ci_high"), DataType::Float64, true));
    }
    let c = &query.clipping;
    let clipping = match (c.groups, c.rows) {
        (false, false) => "none",
        (true, false) => "groups",
        (false, true) => "rows",
        (true, true) => "groups,rows",
    };
    Ok(Schema::new_with_metadata(
        fields,
        HashMap::from([
            (META_CHARGE.to_string(), format!("{}", round_for_display(query.epsilon))),
            (META_CHARGE_DELTA.to_string(), format!("{}", query.delta)),
            (META_GROUPS_PER_PERSON.to_string(), c.groups_per_person.to_string()),
            (META_ROWS_PER_GROUP.to_string(), c.rows_per_group.to_string()),
            (META_CLIPPING.to_string(), clipping.to_string()),
            (META_BOUNDS_FROM.to_string(), if c.derived { "manifest" } else { "query" }.to_string()),
            (META_CLAMP_COUNTS.to_string(), query.options.clamp_counts.to_string()),
        ])
        .into_iter()
        .chain(query.options.study.clone().map(|s| (META_STUDY.to_string(), s)))
        .collect(),
    ))
}

/// When the query asked for `confidence_intervals`, the noisy output columns
/// among `fields` (those carrying a 95 % half-width) as (name, (index,
/// half-width, whether it is a count reported at 0 or above)), in output
/// order.
fn companion_intervals<F: std::borrow::Borrow<Field>>(query: &DpQuery, fields: &[F]) -> Result<Vec<(String, (usize, f64, bool))>> {
    if !query.options.confidence_intervals {
        return Ok(Vec::new());
    }
    let noise = calibrations(query)?;
    Ok(fields
        .iter()
        .zip(shown_aggregates(query))
        .enumerate()
        .filter_map(|(i, (f, shown))| {
            let shown = shown?;
            let (_, l) = noise.iter().find(|(n, _)| *n == shown)?;
            let clamped = query.aggregates.iter().any(|a| a.output_name == shown && clamped_count(query, a));
            Some((f.borrow().name().clone(), (i, l.ci95_half_width(), clamped)))
        })
        .collect())
}

/// Run the analyst's post-processing on the released values and attach the
/// noise description and the receipt to the answer. Post-processing of a DP
/// release is DP with the same ε, so this step costs nothing.
pub async fn finish(query: &DpQuery, noisy: NoisyAggregate) -> Result<Released> {
    let table = Arc::new(MemTable::try_new(noisy.batch.schema(), vec![vec![noisy.batch.clone()]])?);
    let plan = query.post_processing_plan(table)?;
    let ctx = SessionContext::new();
    let batches = ctx.execute_logical_plan(plan).await?.collect().await?;

    let announced = announced_dp_schema(query)?;
    let mut metadata = announced.metadata().clone();
    noisy.paid.write(&mut metadata);
    let schema = Arc::new(announced.with_metadata(metadata));
    let intervals = companion_intervals(query, schema.fields())?;
    let batches = batches
        .into_iter()
        .map(|b| {
            let mut columns = columns_as(&b, &schema)?;
            // Interval bounds are computed from the released values only. A
            // count reported at 0 or above keeps its interval at 0 or above:
            // the true count is never negative, so this covers it whenever
            // the unclamped interval did.
            for (_, (index, half, nonnegative)) in &intervals {
                let values = cast(&columns[*index], &DataType::Float64)?;
                let values = values.as_any().downcast_ref::<Float64Array>().expect("f64");
                let floor = if *nonnegative { 0.0 } else { f64::NEG_INFINITY };
                let low: Float64Array = values.iter().map(|v| v.map(|v| (v - half).max(floor))).collect();
                let high: Float64Array = values.iter().map(|v| v.map(|v| v + half)).collect();
                columns.push(Arc::new(low));
                columns.push(Arc::new(high));
            }
            RecordBatch::try_new(schema.clone(), columns)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| DpError::Mechanism(e.to_string()))?;
    Ok(Released { schema, batches })
}

/// For each output column of `query`, the noise of the DP aggregate column
/// it shows unchanged (through aliases), if any.
fn noisy_outputs(query: &DpQuery, noise: &[(String, Noise)]) -> Vec<Option<Noise>> {
    shown_aggregates(query)
        .into_iter()
        .map(|shown| shown.and_then(|name| noise.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)))
        .collect()
}

/// For each output column of `query`, the name of the DP aggregate column
/// it shows unchanged, if any (none below an aggregate of the released rows).
fn shown_aggregates(query: &DpQuery) -> Vec<Option<String>> {
    let plan = &query.original;
    let columns = plan.schema().fields().len();
    if query.post_aggregates > 0 {
        return vec![None; columns];
    }
    (0..columns).map(|i| aggregate_column(plan, i)).collect()
}

/// The name of the DP aggregate's output column that output column `i` of
/// `node` shows unchanged — through projections (as a column or by
/// repeating the aggregate expression, under any aliases), subquery
/// aliases, filters, sorts and limits — if any.
fn aggregate_column(node: &LogicalPlan, i: usize) -> Option<String> {
    match node {
        LogicalPlan::Aggregate(a) => a.schema.fields().get(i).map(|f| f.name().clone()),
        LogicalPlan::Projection(p) => {
            let mut e = p.expr.get(i)?;
            while let Expr::Alias(alias) = e {
                e = &alias.expr;
            }
            let input = p.input.schema();
            let j = match e {
                Expr::Column(c) => input.index_of_column(c).ok()?,
                other => input.index_of_column_by_name(None, &other.schema_name().to_string())?,
            };
            aggregate_column(&p.input, j)
        }
        LogicalPlan::Filter(_) | LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::SubqueryAlias(_) => {
            aggregate_column(node.inputs()[0], i)
        }
        _ => None,
    }
}
