//! Uploads: Flight SQL bulk ingest (`CommandStatementIngest`, what ADBC's
//! `adbc_ingest` sends) into a dataset, by its owner only.
//!
//! Each batch is checked against the dataset's schema as it arrives (names,
//! types, and the privacy-unit column's format: 64 lower-case hex characters,
//! or 32 bytes which are stored as such hex) and written to the upload's own
//! files; the new data version is committed only after the last batch, so a
//! refused, interrupted or failed upload leaves the previous version intact
//! and nothing half-visible to queries ([`cleanroom_storage::storage`]).
//!
//! The uploader is the owner of the rows it sends, so its errors may name a
//! row and a value: they describe its own data, never anyone else's.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, FixedSizeBinaryArray, LargeBinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::TableExistsOption;
use arrow_flight::sql::CommandStatementIngest;
use futures::{Stream, TryStreamExt};
use tonic::Status;

use cleanroom_storage::catalog::{Catalog, CATALOG, SCHEMA};
use cleanroom_manifest::Dataset;
use cleanroom_storage::storage::{Mode, Upload, Version};
use crate::stream_end::BodyBroke;

/// A refused upload: the rule it broke (for the audit log) and the status.
pub struct Refusal {
    pub rule: &'static str,
    pub status: Status,
}

fn refuse(rule: &'static str, status: Status) -> Refusal {
    Refusal { rule, status }
}

/// Which dataset, and how: checked before any data is read.
pub fn resolve<'a>(catalog: &'a Catalog, party: &str, command: &CommandStatementIngest) -> Result<(&'a Dataset, Mode), Refusal> {
    let bad_name = |what: &str, got: &str, want: &str| {
        refuse("upload_target", Status::invalid_argument(format!("{what} `{got}` does not exist: datasets are in {what} `{want}`")))
    };
    if let Some(c) = command.catalog.as_deref().filter(|c| !c.is_empty() && *c != CATALOG) {
        return Err(bad_name("catalog", c, CATALOG));
    }
    if let Some(s) = command.schema.as_deref().filter(|s| !s.is_empty() && *s != SCHEMA) {
        return Err(bad_name("schema", s, SCHEMA));
    }
    let dataset = catalog.manifest.dataset(&command.table);
    let dataset = match dataset {
        Some(d) if d.owner == party => d,
        // A party learns that a dataset exists only if it may read it.
        Some(d) if d.readable_by(party) => {
            return Err(refuse(
                "upload_owner",
                Status::permission_denied(format!(
                    "party `{party}` may not upload to dataset `{}`: only its owner, `{}`, may",
                    d.name, d.owner
                )),
            ))
        }
        _ => {
            return Err(refuse(
                "upload_owner",
                Status::permission_denied(format!("no dataset `{}` that party `{party}` owns: a party uploads only to its own datasets", command.table)),
            ))
        }
    };
    if command.temporary {
        return Err(refuse("upload_mode", Status::invalid_argument("temporary tables are not supported: upload into a dataset of the manifest")));
    }
    if command.transaction_id.is_some() {
        return Err(refuse("upload_mode", Status::invalid_argument("transactions are not supported: each upload commits on its own, all or nothing")));
    }
    let options = command.table_definition_options.unwrap_or_default();
    let mode = match TableExistsOption::try_from(options.if_exists).unwrap_or(TableExistsOption::Unspecified) {
        TableExistsOption::Append => Mode::Append,
        TableExistsOption::Replace => Mode::Replace,
        TableExistsOption::Fail | TableExistsOption::Unspecified => {
            return Err(refuse(
                "upload_mode",
                Status::already_exists(format!(
                    "dataset `{}` exists (it is declared in the manifest): upload with mode 'append' to add rows or 'replace' to replace them",
                    dataset.name
                )),
            ))
        }
    };
    // `if_not_exist` does not matter: every dataset of the manifest exists.
    Ok((dataset, mode))
}

/// Make `batch` fit `schema` exactly, or say why it cannot: same column
/// names (any order), types equal or safely castable, no NULL in a column
/// that has none, privacy-unit values in the collaboration's format.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, privacy_unit: Option<&str>, first_row: u64) -> Result<RecordBatch, Refusal> {
    let invalid = |message: String| refuse("upload_schema", Status::invalid_argument(message));
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
    let invalid = |message: String| refuse("upload_schema", Status::invalid_argument(message));
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
    cleanroom_storage::catalog::check_columns(dataset, &schema).map_err(|e| invalid(e.to_string()))?;
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

/// Why an accepted upload did not commit.
pub enum IngestError {
    /// The data broke a rule (audited as a refusal).
    Refused(Refusal),
    /// The stream broke off or storage failed; nothing was committed.
    Failed(Status),
}

/// Read the upload's batches, check each, write them, and commit the next
/// version. The caller holds the dataset's upload lock and audits the
/// outcome; `before_commit` runs after the last batch is stored and before
/// the version is committed (the audit record), and its error aborts.
pub async fn ingest<S, F, Fut>(
    catalog: &Catalog,
    dataset: &Dataset,
    mode: Mode,
    party: &str,
    upload_id: &str,
    stream: S,
    broke: BodyBroke,
    before_commit: F,
) -> Result<Ingested, IngestError>
where
    S: Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + Unpin + 'static,
    F: FnOnce(u64, u64, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    let store = catalog.store(&dataset.name).ok_or_else(|| IngestError::Failed(Status::not_found("no such dataset")))?;
    // The dataset's schema, or for a dataset without data yet the first
    // batch's (checked against the manifest).
    let current = catalog.table(&dataset.name);
    let mut schema: Option<SchemaRef> = current.as_ref().map(|t| stored_schema(&t.schema));
    let mut upload: Option<Upload> = None;
    let mut batches = FlightRecordBatchStream::new_from_flight_data(stream.map_err(|s| FlightError::Tonic(Box::new(s))));
    let outcome: Result<(), IngestError> = async {
        loop {
            let batch = match batches.try_next().await {
                Ok(Some(batch)) => batch,
                // A cancelled stream ends like a finished one in tonic: the
                // flag tells them apart (see `stream_end`).
                Ok(None) if broke.is_set() => {
                    return Err(IngestError::Failed(Status::aborted("the upload stream was cancelled by the client; nothing was committed")))
                }
                Ok(None) => break,
                Err(FlightError::Tonic(status)) => {
                    return Err(IngestError::Failed(Status::aborted(format!("the upload stream broke off: {}; nothing was committed", status.message()))))
                }
                Err(e) => return Err(IngestError::Refused(refuse("upload_format", Status::invalid_argument(format!("cannot decode the upload: {e}"))))),
            };
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
                IngestError::Failed(Status::unavailable(format!("the upload could not be stored ({e}); nothing was committed")))
            })?;
        }
        match upload.as_mut() {
            Some(u) if u.rows > 0 => u
                .finish()
                .await
                .map_err(|e| IngestError::Failed(Status::unavailable(format!("the upload could not be stored ({e}); nothing was committed")))),
            _ => Err(IngestError::Refused(refuse("upload_empty", Status::invalid_argument("the upload has no rows; nothing was committed")))),
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
                return Err(IngestError::Failed(Status::unavailable(format!("cannot read the dataset's versions ({e}); nothing was committed"))));
            }
        },
    };
    if let Err(status) = before_commit(upload.rows, base.number + 1, upload.files.len()).await {
        upload.abort().await;
        return Err(IngestError::Failed(status));
    }
    let summary = upload.summary();
    let version = match store.commit(&base, summary, mode, party).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(dataset = %dataset.name, upload = %upload_id, error = %e, "cannot commit an upload");
            upload.abort().await;
            return Err(IngestError::Failed(Status::unavailable(format!("the upload could not be committed ({e}); the previous version stays"))));
        }
    };
    let rows = upload.rows;
    catalog
        .install(&dataset.name, version.clone())
        .await
        .map_err(|e| IngestError::Failed(Status::internal(format!("version {} was committed but cannot be opened: {e}", version.number))))?;
    Ok(Ingested { version, rows })
}
