//! Uploads into a dataset, by its owner only: which dataset and how
//! ([`resolve`]), each batch checked against the dataset's schema as it
//! arrives ([`conform`]: names, types, and the privacy-unit column's format —
//! 64 lower-case hex characters, or 32 bytes stored as such hex), written to
//! the upload's own files, and the new data version committed only after the
//! last batch ([`ingest`]), so a refused, interrupted or failed upload leaves
//! the previous version intact and nothing half-visible to queries.
//!
//! The transport (Flight SQL bulk ingest in the gateway) only decodes batches
//! and translates these outcomes. The uploader is the owner of the rows it
//! sends, so its errors may name a row and a value: they describe its own
//! data, never anyone else's.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, FixedSizeBinaryArray, LargeBinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use cleanroom_dp::DpError;
use cleanroom_manifest::Dataset;
use futures::{Stream, TryStreamExt};

use crate::catalog::Catalog;
use crate::storage::{Mode, Upload, Version};
use crate::{CATALOG, SCHEMA};

/// Why an upload was refused, as a class the transport maps to its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request or its data is malformed or does not fit the dataset.
    Invalid,
    /// The party may not upload to that dataset.
    Forbidden,
    /// The dataset exists and the upload did not say to append or replace.
    Exists,
}

/// A refused upload: the rule it broke (for the audit log) and what the
/// uploader is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub rule: &'static str,
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn invalid(rule: &'static str, message: impl Into<String>) -> Self {
        Refusal { rule, reason: Reason::Invalid, message: message.into() }
    }

    fn forbidden(message: String) -> Self {
        Refusal { rule: "upload_owner", reason: Reason::Forbidden, message }
    }
}

/// What an upload asks for, as its transport received it.
#[derive(Debug, Clone, Default)]
pub struct Target<'a> {
    /// The catalog and schema it names, if any (they must be ours).
    pub catalog: Option<&'a str>,
    pub schema: Option<&'a str>,
    /// The dataset.
    pub table: &'a str,
    /// A temporary table was asked for.
    pub temporary: bool,
    /// The upload is part of a transaction.
    pub in_transaction: bool,
    /// What to do with the dataset's rows: `None` when the upload did not
    /// say (it then fails: every dataset of the manifest exists).
    pub if_exists: Option<Mode>,
}

/// Which dataset, and how: checked before any data is read.
pub fn resolve<'a>(catalog: &'a Catalog, party: &str, target: &Target<'_>) -> Result<(&'a Dataset, Mode), Refusal> {
    let bad_name = |what: &str, got: &str, want: &str| {
        Refusal::invalid("upload_target", format!("{what} `{got}` does not exist: datasets are in {what} `{want}`"))
    };
    if let Some(c) = target.catalog.filter(|c| !c.is_empty() && *c != CATALOG) {
        return Err(bad_name("catalog", c, CATALOG));
    }
    if let Some(s) = target.schema.filter(|s| !s.is_empty() && *s != SCHEMA) {
        return Err(bad_name("schema", s, SCHEMA));
    }
    let dataset = match catalog.manifest.dataset(target.table) {
        Some(d) if d.owner == party => d,
        // A party learns that a dataset exists only if it may read it.
        Some(d) if d.readable_by(party) => {
            return Err(Refusal::forbidden(format!(
                "party `{party}` may not upload to dataset `{}`: only its owner, `{}`, may",
                d.name, d.owner
            )))
        }
        _ => {
            return Err(Refusal::forbidden(format!(
                "no dataset `{}` that party `{party}` owns: a party uploads only to its own datasets",
                target.table
            )))
        }
    };
    if target.temporary {
        return Err(Refusal::invalid("upload_mode", "temporary tables are not supported: upload into a dataset of the manifest"));
    }
    if target.in_transaction {
        return Err(Refusal::invalid("upload_mode", "transactions are not supported: each upload commits on its own, all or nothing"));
    }
    let Some(mode) = target.if_exists else {
        return Err(Refusal {
            rule: "upload_mode",
            reason: Reason::Exists,
            message: format!(
                "dataset `{}` exists (it is declared in the manifest): upload with mode 'append' to add rows or 'replace' to replace them",
                dataset.name
            ),
        });
    };
    Ok((dataset, mode))
}

/// Make `batch` fit `schema` exactly, or say why it cannot: same column
/// names (any order), types equal or safely castable, no NULL in a column
/// that has none, privacy-unit values in the collaboration's format.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, privacy_unit: Option<&str>, first_row: u64) -> Result<RecordBatch, Refusal> {
    let invalid = |message: String| Refusal::invalid("upload_schema", message);
    let got: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    let missing: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).filter(|n| !got.contains(n)).collect();
    let extra: Vec<&str> = got.iter().copied().filter(|n| schema.field_with_name(n).is_err()).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(invalid(format!(
            "the upload's columns do not match the dataset's: missing [{}], unknown [{}]; expected exactly [{}]",
            missing.join(", "),
            extra.join(", "),
            schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch.column_by_name(field.name()).expect("checked above");
        let column = if Some(field.name().as_str()) == privacy_unit {
            unit_column(column, field.name(), first_row).map_err(invalid)?
        } else if column.data_type() == field.data_type() {
            column.clone()
        } else if castable(column.data_type(), field.data_type()) {
            let cast = arrow::compute::cast(column, field.data_type())
                .map_err(|e| invalid(format!("column `{}`: cannot convert {} to {}: {e}", field.name(), column.data_type(), field.data_type())))?;
            if cast.null_count() != column.null_count() {
                return Err(invalid(format!(
                    "column `{}`: some values of type {} do not fit the dataset's type {}",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                )));
            }
            cast
        } else {
            return Err(invalid(format!(
                "column `{}` has type {}, the dataset's is {}",
                field.name(),
                column.data_type(),
                field.data_type()
            )));
        };
        if !field.is_nullable() && column.null_count() > 0 {
            return Err(invalid(format!("column `{}` has NULLs; the dataset's has none", field.name())));
        }
        columns.push(column);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| invalid(format!("the batch does not fit the dataset: {e}")))
}

/// Conversions that never change a value: wider integers and floats, other
/// string and binary encodings, timestamps of another unit or zone.
fn castable(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let int_rank = |t: &DataType| match t {
        Int8 => Some((true, 8)),
        Int16 => Some((true, 16)),
        Int32 => Some((true, 32)),
        Int64 => Some((true, 64)),
        UInt8 => Some((false, 8)),
        UInt16 => Some((false, 16)),
        UInt32 => Some((false, 32)),
        UInt64 => Some((false, 64)),
        _ => None,
    };
    match (from, to) {
        (a, b) if int_rank(a).is_some() && int_rank(b).is_some() => {
            let ((sa, ba), (sb, bb)) = (int_rank(a).unwrap(), int_rank(b).unwrap());
            (sa == sb && ba <= bb) || (!sa && sb && ba < bb)
        }
        (Float16 | Float32, Float64) | (Float16, Float32) => true,
        (Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32, Float64) => true,
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        (Dictionary(_, v), t) if v.as_ref() == t => true,
        (Binary | LargeBinary | BinaryView, Binary | LargeBinary | BinaryView) => true,
        (Timestamp(..), Timestamp(..)) => true,
        (Date32 | Date64, Date32 | Date64) => true,
        _ => false,
    }
}

/// The schema files are written with: the table's, with DataFusion's view
/// types (how it reads strings) as the plain types Parquet stores.
fn stored_schema(schema: &Schema) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                DataType::Utf8View => DataType::Utf8,
                DataType::BinaryView => DataType::Binary,
                t => t.clone(),
            };
            Field::new(f.name(), t, f.is_nullable())
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The schema of a dataset's first upload: the batch's columns with plain
/// types (strings as Utf8, dictionaries decoded), the privacy unit as
/// non-NULL Utf8 hex, and the manifest's roles checked against the types.
fn first_schema(sent: &SchemaRef, dataset: &Dataset) -> Result<SchemaRef, Refusal> {
    let invalid = |message: String| Refusal::invalid("upload_schema", message);
    let fields: Vec<Field> = sent
        .fields()
        .iter()
        .map(|f| {
            let plain = match f.data_type() {
                DataType::Dictionary(_, v) => v.as_ref().clone(),
                t => t.clone(),
            };
            let plain = match plain {
                DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
                t => t,
            };
            if Some(f.name().as_str()) == dataset.privacy_unit.as_deref() {
                Field::new(f.name(), DataType::Utf8, false)
            } else {
                Field::new(f.name(), plain, f.is_nullable())
            }
        })
        .collect();
    let schema = Schema::new(fields);
    if let Some(unit) = &dataset.privacy_unit {
        if schema.field_with_name(unit).is_err() {
            return Err(invalid(format!("the upload has no column `{unit}`, the dataset's privacy unit")));
        }
    }
    crate::catalog::check_columns(dataset, &schema).map_err(|e| invalid(e.to_string()))?;
    Ok(Arc::new(schema))
}

/// The privacy-unit column as 64 lower-case hex characters per value:
/// already so, or 32 raw bytes turned into hex.
fn unit_column(column: &ArrayRef, name: &str, first_row: u64) -> Result<ArrayRef, String> {
    let format = "the collaboration's hashed identifier: 64 lower-case hex characters (HMAC-SHA256, as `cleanroom prepare` writes) or 32 bytes";
    let row = |i: usize| first_row + i as u64 + 1;
    if column.null_count() > 0 {
        let i = (0..column.len()).find(|&i| column.is_null(i)).unwrap_or(0);
        return Err(format!("column `{name}` (the privacy unit) is NULL at row {}: every row must belong to a person", row(i)));
    }
    let strings = match column.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            arrow::compute::cast(column, &DataType::Utf8).map_err(|e| e.to_string())?
        }
        DataType::FixedSizeBinary(_) | DataType::Binary | DataType::LargeBinary => {
            let bytes: Vec<Option<&[u8]>> = match column.data_type() {
                DataType::FixedSizeBinary(_) => column.as_any().downcast_ref::<FixedSizeBinaryArray>().expect("type checked").iter().collect(),
                DataType::Binary => column.as_any().downcast_ref::<BinaryArray>().expect("type checked").iter().collect(),
                _ => column.as_any().downcast_ref::<LargeBinaryArray>().expect("type checked").iter().collect(),
            };
            if let Some(i) = bytes.iter().position(|b| b.is_some_and(|b| b.len() != 32)) {
                return Err(format!("column `{name}` at row {} has {} bytes, not {format}", row(i), bytes[i].map_or(0, <[u8]>::len)));
            }
            Arc::new(StringArray::from_iter_values(bytes.iter().map(|b| hex::encode(b.unwrap_or_default()))))
        }
        other => return Err(format!("column `{name}` has type {other}, not {format}")),
    };
    let values = strings.as_any().downcast_ref::<StringArray>().expect("cast to Utf8");
    let well_formed = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if let Some(i) = (0..values.len()).find(|&i| !well_formed(values.value(i))) {
        return Err(format!("column `{name}` at row {} is not {format}", row(i)));
    }
    Ok(strings)
}

/// What an accepted upload did.
pub struct Ingested {
    pub version: Version,
    pub rows: u64,
}

/// How an accepted upload failed without committing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The uploader's stream was cancelled or broke off.
    Aborted,
    /// Storage could not be read or written.
    Unavailable,
    /// A version was committed but could not be opened.
    Internal,
}

/// Why an accepted upload did not commit.
#[derive(Debug)]
pub enum IngestError {
    /// The data broke a rule (audited as a refusal).
    Refused(Refusal),
    /// The stream broke off or storage failed; nothing was committed.
    Failed { kind: FailureKind, message: String },
    /// The upload's audit record could not be written; nothing was committed.
    Audit(DpError),
}

impl IngestError {
    fn failed(kind: FailureKind, message: String) -> Self {
        IngestError::Failed { kind, message }
    }
}

/// Read the upload's batches, check each, write them, and commit the next
/// version. The caller holds the dataset's upload lock and audits the
/// outcome; `batches` yields the decoded batches (or the transport's error,
/// which aborts); `before_commit(rows, version, files)` runs after the last
/// batch is stored and before the version is committed (the audit record),
/// and its error aborts.
pub async fn ingest<S, F, Fut>(
    catalog: &Catalog,
    dataset: &Dataset,
    mode: Mode,
    party: &str,
    upload_id: &str,
    mut batches: S,
    before_commit: F,
) -> Result<Ingested, IngestError>
where
    S: Stream<Item = Result<RecordBatch, IngestError>> + Send + Unpin,
    F: FnOnce(u64, u64, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), DpError>>,
{
    let unavailable = |e: &dyn std::fmt::Display| {
        IngestError::failed(FailureKind::Unavailable, format!("the upload could not be stored ({e}); nothing was committed"))
    };
    let store = catalog
        .store(&dataset.name)
        .ok_or_else(|| IngestError::failed(FailureKind::Internal, format!("dataset `{}` has no storage; nothing was committed", dataset.name)))?;
    // The dataset's schema, or for a dataset without data yet the first
    // batch's (checked against the manifest).
    let current = catalog.table(&dataset.name);
    let mut schema: Option<SchemaRef> = current.as_ref().map(|t| stored_schema(&t.schema));
    let mut upload: Option<Upload> = None;
    let outcome: Result<(), IngestError> = async {
        while let Some(batch) = batches.try_next().await? {
            let target = match &schema {
                Some(s) => s.clone(),
                None => {
                    let s = first_schema(batch.schema_ref(), dataset).map_err(IngestError::Refused)?;
                    schema = Some(s.clone());
                    s
                }
            };
            let upload = upload.get_or_insert_with(|| store.begin_upload(upload_id, target.clone()));
            let batch = conform(&batch, &target, dataset.privacy_unit.as_deref(), upload.rows).map_err(IngestError::Refused)?;
            upload.write(&batch).await.map_err(|e| {
                tracing::warn!(dataset = %dataset.name, upload = %upload_id, error = %e, "cannot store an upload");
                unavailable(&e)
            })?;
        }
        match upload.as_mut() {
            Some(u) if u.rows > 0 => u.finish().await.map_err(|e| unavailable(&e)),
            _ => Err(IngestError::Refused(Refusal::invalid("upload_empty", "the upload has no rows; nothing was committed"))),
        }
    }
    .await;
    if let Err(e) = outcome {
        if let Some(u) = upload {
            u.abort().await;
        }
        return Err(e);
    }
    let upload = upload.expect("an upload with rows");
    let base = match &current {
        Some(t) => t.version.clone(),
        None => match store.current().await {
            Ok(v) => v,
            Err(e) => {
                upload.abort().await;
                return Err(IngestError::failed(FailureKind::Unavailable, format!("cannot read the dataset's versions ({e}); nothing was committed")));
            }
        },
    };
    if let Err(e) = before_commit(upload.rows, base.number + 1, upload.files.len()).await {
        upload.abort().await;
        return Err(IngestError::Audit(e));
    }
    let summary = upload.summary();
    let version = match store.commit(&base, summary, mode, party).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(dataset = %dataset.name, upload = %upload_id, error = %e, "cannot commit an upload");
            upload.abort().await;
            return Err(IngestError::failed(FailureKind::Unavailable, format!("the upload could not be committed ({e}); the previous version stays")));
        }
    };
    let rows = upload.rows;
    catalog.install(&dataset.name, version.clone()).await.map_err(|e| {
        IngestError::failed(FailureKind::Internal, format!("version {} was committed but cannot be opened: {e}", version.number))
    })?;
    Ok(Ingested { version, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array};

    fn dataset_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("uid", DataType::Utf8, false), Field::new("n", DataType::Int64, true)]))
    }

    fn batch(uid: ArrayRef, n: ArrayRef) -> RecordBatch {
        RecordBatch::try_from_iter([("n", n), ("uid", uid)]).unwrap()
    }

    #[test]
    fn a_batch_is_fitted_to_the_dataset_or_refused_with_the_row_that_broke_it() {
        let hex = "ab".repeat(32);
        let ok = conform(
            &batch(Arc::new(StringArray::from(vec![hex.as_str()])), Arc::new(Int32Array::from(vec![7]))),
            &dataset_schema(),
            Some("uid"),
            0,
        )
        .unwrap();
        assert_eq!(ok.schema(), dataset_schema(), "columns reordered, Int32 widened to Int64");

        let raw = Arc::new(FixedSizeBinaryArray::try_from_iter([[0xabu8; 32]].into_iter()).unwrap());
        let from_bytes = conform(&batch(raw, Arc::new(Int64Array::from(vec![1]))), &dataset_schema(), Some("uid"), 0).unwrap();
        assert_eq!(from_bytes.column(0).as_any().downcast_ref::<StringArray>().unwrap().value(0), hex);

        let refused = |b: RecordBatch, first_row: u64| conform(&b, &dataset_schema(), Some("uid"), first_row).unwrap_err();
        let not_hex = refused(batch(Arc::new(StringArray::from(vec![hex.as_str(), "x"])), Arc::new(Int64Array::from(vec![1, 2]))), 10);
        assert_eq!((not_hex.rule, not_hex.reason), ("upload_schema", Reason::Invalid));
        assert!(not_hex.message.starts_with("column `uid` at row 12 is not"), "{}", not_hex.message);
        let null = refused(batch(Arc::new(StringArray::from(vec![None::<&str>])), Arc::new(Int64Array::from(vec![1]))), 0);
        assert!(null.message.contains("is NULL at row 1"), "{}", null.message);
        let narrowing = RecordBatch::try_from_iter([
            ("uid", Arc::new(StringArray::from(vec![hex.as_str()])) as ArrayRef),
            ("n", Arc::new(arrow::array::Float64Array::from(vec![1.5])) as ArrayRef),
        ])
        .unwrap();
        assert_eq!(refused(narrowing, 0).message, "column `n` has type Float64, the dataset's is Int64");
        let missing = RecordBatch::try_from_iter([("uid", Arc::new(StringArray::from(vec![hex.as_str()])) as ArrayRef)]).unwrap();
        assert!(refused(missing, 0).message.starts_with("the upload's columns do not match the dataset's: missing [n], unknown []"));
    }

    #[test]
    fn only_value_preserving_conversions_are_made() {
        use DataType::*;
        for (from, to) in [(Int32, Int64), (UInt32, Int64), (Float32, Float64), (Utf8View, Utf8), (Date64, Date32)] {
            assert!(castable(&from, &to), "{from} → {to}");
        }
        for (from, to) in [(Int64, Int32), (UInt64, Int64), (Int64, Float64), (Float64, Int64), (Utf8, Int64)] {
            assert!(!castable(&from, &to), "{from} → {to}");
        }
    }
}
