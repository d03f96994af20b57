//! Retention: rows older than their dataset's retention period are deleted.
//!
//! A pass skips the files whose Parquet statistics show no expired row, and
//! reads each other file of the dataset's current version, keeps the rows
//! whose event time (the manifest's `retention.column`) is within the period
//! or unknown (NULL), writes the kept rows of a file that lost some to a new
//! file, and commits the result as the next data version (mode `retention`);
//! then the files that held expired rows are deleted from storage, so the
//! expired rows are gone, not only hidden. Every pass, whether or not it
//! deletes something, is on the audit log before it commits its version, so
//! neither the data versions nor the audit sequence show whether old rows
//! existed. Passes run at start and then on a schedule, one at a time with
//! uploads to the same dataset.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arrow::array::{Array, BooleanArray, Scalar, TimestampMicrosecondArray};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::datatypes::{DataType, TimeUnit};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaDataReader;

use crate::catalog::Catalog;
use cleanroom_manifest::Dataset;
use crate::storage::{DataFile, DatasetStore, Mode};

/// What one pass over a dataset deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub rows: u64,
    pub files_rewritten: usize,
    pub files_dropped: usize,
    pub version: u64,
}

/// The oldest event time kept at `now`, in microseconds since the epoch.
fn cutoff_micros(days: u32, now: SystemTime) -> i64 {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let cutoff = now.saturating_sub(Duration::from_secs(u64::from(days) * 86_400));
    cutoff.as_micros() as i64
}

/// Rows to keep: event time at or after the cutoff, or NULL.
fn keep_mask(column: &dyn Array, cutoff: i64) -> anyhow::Result<BooleanArray> {
    let as_micros = DataType::Timestamp(TimeUnit::Microsecond, None);
    let column = match column.data_type() {
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => arrow::compute::cast(column, &as_micros)?,
        other => anyhow::bail!("the retention column has type {other}, not a date or timestamp"),
    };
    let cutoff = Scalar::new(TimestampMicrosecondArray::from(vec![cutoff]));
    let keep = gt_eq(&column, &cutoff)?;
    // NULL event times are not known to be old: kept.
    Ok(keep.iter().map(|k| Some(k.unwrap_or(true))).collect())
}

/// Whether the footer of `file` shows every row within the period: each row
/// group's smallest event time is at or after the cutoff (NULLs are kept
/// anyway). Then the file is kept without reading its rows. Missing
/// statistics, or an all-NULL row group, answer `false`: the file is read.
async fn all_recent(store: &DatasetStore, file: &DataFile, column: &str, cutoff: i64) -> anyhow::Result<bool> {
    // The footer only: its last 8 bytes give the metadata's length.
    let object = store.object(file);
    anyhow::ensure!(file.size >= 12, "{} is too short for Parquet", file.path);
    let tail = store.store.get_ranges(&object, &[file.size - 8..file.size]).await?.remove(0);
    let length = u64::from(u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")));
    anyhow::ensure!(&tail[4..] == b"PAR1" && length + 8 <= file.size, "{} has no Parquet footer", file.path);
    let footer = store.store.get_ranges(&object, &[file.size - 8 - length..file.size - 8]).await?.remove(0);
    let metadata = ParquetMetaDataReader::decode_metadata(&footer)?;
    let file_metadata = metadata.file_metadata();
    let schema = parquet::arrow::parquet_to_arrow_schema(file_metadata.schema_descr(), file_metadata.key_value_metadata())?;
    let converter = StatisticsConverter::try_new(column, &schema, file_metadata.schema_descr())?;
    let mins = converter.row_group_mins(metadata.row_groups())?;
    if mins.null_count() > 0 {
        return Ok(false);
    }
    Ok(keep_mask(mins.as_ref(), cutoff)?.true_count() == mins.len())
}

/// One pass over `dataset` at `now`: `None` when the dataset has no
/// retention period or no data. The caller
/// audits through `before_commit` (rows, files rewritten, files dropped,
/// version); its error stops the pass before anything is committed.
pub async fn enforce<F, Fut>(catalog: &Catalog, dataset: &Dataset, now: SystemTime, before_commit: F) -> anyhow::Result<Option<Deleted>>
where
    F: FnOnce(u64, usize, usize, u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let Some(retention) = &dataset.retention else { return Ok(None) };
    let _one_at_a_time = catalog.lock_for_upload(&dataset.name).await;
    let Some(table) = catalog.table(&dataset.name) else { return Ok(None) };
    let store = catalog.store(&dataset.name).context("the dataset is not open")?;
    let cutoff = cutoff_micros(retention.days, now);
    let pass = format!("retention-{}", uuid::Uuid::new_v4().simple());

    let (mut kept_files, mut replaced) = (Vec::new(), Vec::<DataFile>::new());
    let (mut rows_deleted, mut rewritten, mut dropped) = (0u64, 0usize, 0usize);
    let mut uploads = Vec::new();
    let outcome: anyhow::Result<()> = async {
        for file in &table.version.files {
            if all_recent(store, file, &retention.column, cutoff).await.unwrap_or(false) {
                kept_files.push(file.clone());
                continue;
            }
            // One file in memory at a time (uploads write at most a million rows per file).
            let bytes = store.store.get(&store.object(file)).await?.bytes().await.with_context(|| format!("cannot read {}", file.path))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).with_context(|| format!("cannot read {}", file.path))?;
            let schema = builder.schema().clone();
            let at = schema.index_of(&retention.column).with_context(|| format!("{} has no column `{}`", file.path, retention.column))?;
            let batches = builder.build()?;
            let mut upload = None;
            let mut expired = 0u64;
            let mut kept = 0u64;
            for batch in batches {
                let batch = batch?;
                let mask = keep_mask(batch.column(at).as_ref(), cutoff)?;
                let keep = mask.true_count();
                expired += (batch.num_rows() - keep) as u64;
                kept += keep as u64;
                if keep > 0 {
                    let filtered = arrow::compute::filter_record_batch(&batch, &mask)?;
                    upload
                        .get_or_insert_with(|| store.begin_upload(&format!("{pass}-{}", uploads.len() + 1), schema.clone()))
                        .write(&filtered)
                        .await?;
                }
            }
            if expired == 0 {
                kept_files.push(file.clone());
                if let Some(u) = upload {
                    // Everything kept: the original file stays; the copy goes.
                    u.abort().await;
                }
                continue;
            }
            rows_deleted += expired;
            replaced.push(file.clone());
            match upload {
                Some(mut u) if kept > 0 => {
                    u.finish().await?;
                    kept_files.extend(u.files.iter().cloned());
                    uploads.push(u);
                    rewritten += 1;
                }
                other => {
                    if let Some(u) = other {
                        u.abort().await;
                    }
                    dropped += 1;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        for u in uploads {
            u.abort().await;
        }
        return Err(e);
    }
    // Every pass commits a version and an audit record, whether or not a
    // row expired: a new version is a new question for the released-answer
    // cache, and each record moves the audit sequence that answers carry, so
    // neither may tell a party whether old rows existed.
    let next = table.version.number + 1;
    if let Err(e) = before_commit(rows_deleted, rewritten, dropped, next).await {
        for u in uploads {
            u.abort().await;
        }
        return Err(e);
    }
    let version = match store.commit_files(&table.version, kept_files, 0, Mode::Retention, None, Some(pass), Vec::new()).await {
        Ok(v) => v,
        Err(e) => {
            for u in uploads {
                u.abort().await;
            }
            return Err(e);
        }
    };
    let number = version.number;
    catalog.install(&dataset.name, version).await?;
    // The new version no longer reads them: the expired rows leave storage.
    store.delete(&replaced).await?;
    Ok(Some(Deleted { rows: rows_deleted, files_rewritten: rewritten, files_dropped: dropped, version: number }))
}

/// Run a pass over every dataset with a retention period, auditing each
/// deletion; errors are logged and the next pass tries again.
pub async fn enforce_all(catalog: &Arc<Catalog>, ledger: &Arc<dyn cleanroom_ledger::Ledger>) {
    for dataset in catalog.manifest.datasets.iter().filter(|d| d.retention.is_some()) {
        let retention = dataset.retention.as_ref().expect("filtered");
        let record = |rows: u64, rewritten: usize, dropped: usize, version: u64| {
            use cleanroom_ledger::audit::{AuditEvent, Event, RetentionEvent};
            let event = AuditEvent::new(
                None,
                Event::Retention(RetentionEvent {
                    dataset: dataset.name.clone(),
                    column: retention.column.clone(),
                    days: u64::from(retention.days),
                    rows_deleted: rows,
                    files_rewritten: rewritten,
                    files_dropped: dropped,
                    version,
                }),
            );
            let ledger = ledger.clone();
            async move {
                tokio::task::spawn_blocking(move || ledger.append_audit(&event)).await??;
                Ok(())
            }
        };
        match enforce(catalog, dataset, SystemTime::now(), record).await {
            Ok(Some(d)) => tracing::info!(dataset = %dataset.name, rows = d.rows, files_rewritten = d.files_rewritten, files_dropped = d.files_dropped, version = d.version, "retention pass committed"),
            Ok(None) => tracing::debug!(dataset = %dataset.name, "nothing expired"),
            Err(e) => tracing::warn!(dataset = %dataset.name, error = %format!("{e:#}"), "retention pass failed; the next pass tries again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Date32Array, TimestampSecondArray};

    #[test]
    fn rows_before_the_cutoff_are_dropped_and_null_times_kept() {
        let now = UNIX_EPOCH + Duration::from_secs(100 * 86_400);
        let cutoff = cutoff_micros(10, now); // day 90
        let days = Date32Array::from(vec![Some(89), Some(90), Some(95), None]);
        assert_eq!(keep_mask(&days, cutoff).unwrap(), BooleanArray::from(vec![false, true, true, true]));
        let secs = TimestampSecondArray::from(vec![90 * 86_400 - 1, 90 * 86_400]).with_timezone("UTC");
        assert_eq!(keep_mask(&secs, cutoff).unwrap(), BooleanArray::from(vec![false, true]));
        assert!(keep_mask(&arrow::array::Int64Array::from(vec![1]), cutoff).is_err());
    }

    mod statistics {
        use std::sync::Arc;
    
        use arrow::array::{Int64Array, RecordBatch, TimestampMicrosecondArray};
        use arrow::datatypes::{Field, Schema};
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
    
        use super::*;
    
        fn write(dir: &std::path::Path, name: &str, times: &[Option<i64>]) -> DataFile {
            let schema = Arc::new(Schema::new(vec![
                Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
                Field::new("n", DataType::Int64, false),
            ]));
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(TimestampMicrosecondArray::from(times.to_vec())), Arc::new(Int64Array::from_iter_values(0..times.len() as i64))],
            )
            .unwrap();
            let path = dir.join(name);
            // Two rows per row group: the statistics are per row group.
            let props = WriterProperties::builder().set_max_row_group_row_count(Some(2)).build();
            let mut writer = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, Some(props)).unwrap();
            writer.write(&batch).unwrap();
            writer.close().unwrap();
            DataFile { path: name.into(), size: std::fs::metadata(&path).unwrap().len() }
        }
    
        #[tokio::test]
        async fn statistics_decide_which_files_need_reading() {
            let dir = tempfile::tempdir().unwrap();
            let store = DatasetStore::local(dir.path()).unwrap();
            let cutoff = 1_000;
            let recent = write(dir.path(), "recent.parquet", &[Some(1_000), Some(5_000), Some(2_000)]);
            let old = write(dir.path(), "old.parquet", &[Some(5_000), Some(6_000), Some(999)]);
            let nulls = write(dir.path(), "nulls.parquet", &[Some(5_000), Some(6_000), None]);
            let recent_with_null = write(dir.path(), "mixed.parquet", &[Some(5_000), None, Some(2_000)]);
            assert!(all_recent(&store, &recent, "ts", cutoff).await.unwrap());
            assert!(!all_recent(&store, &old, "ts", cutoff).await.unwrap(), "one old row in the last row group");
            assert!(!all_recent(&store, &nulls, "ts", cutoff).await.unwrap(), "an all-NULL row group has no minimum: read");
            assert!(all_recent(&store, &recent_with_null, "ts", cutoff).await.unwrap(), "NULLs beside recent rows are kept anyway");
            assert!(all_recent(&store, &recent, "missing", cutoff).await.is_err());
        }
    
    }
}
