//! Retention: rows older than their dataset's retention period are deleted.
//!
//! A pass reads each file of the dataset's current version, keeps the rows
//! whose event time (the manifest's `retention.column`) is within the period
//! or unknown (NULL), writes the kept rows of a file that lost some to a new
//! file, and commits the result as the next data version (mode `retention`);
//! then the files that held expired rows are deleted from storage, so the
//! expired rows are gone, not only hidden. Each pass that deletes something
//! is on the audit log before it commits. Passes run at start and then on a
//! schedule, one at a time with uploads to the same dataset.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arrow::array::{Array, BooleanArray, Scalar, TimestampMicrosecondArray};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::datatypes::{DataType, TimeUnit};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::catalog::Catalog;
use crate::manifest::Dataset;
use crate::storage::{DataFile, Mode};

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

/// One pass over `dataset` at `now`: `None` when nothing expired. The caller
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
    if rows_deleted == 0 {
        return Ok(None);
    }
    let next = table.version.number + 1;
    if let Err(e) = before_commit(rows_deleted, rewritten, dropped, next).await {
        for u in uploads {
            u.abort().await;
        }
        return Err(e);
    }
    let version = match store.commit_files(&table.version, kept_files, 0, Mode::Retention, None, Some(pass)).await {
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
pub async fn enforce_all(catalog: &Arc<Catalog>, ledger: &Arc<dyn cleanroom_dp::ledger::Ledger>) {
    for dataset in catalog.manifest.datasets.iter().filter(|d| d.retention.is_some()) {
        let retention = dataset.retention.as_ref().expect("filtered");
        let record = |rows: u64, rewritten: usize, dropped: usize, version: u64| {
            let event = cleanroom_dp::audit::AuditEvent::new(
                cleanroom_dp::audit::kind::RETENTION,
                None,
                serde_json::json!({
                    "dataset": dataset.name, "column": retention.column, "days": retention.days,
                    "rows_deleted": rows, "files_rewritten": rewritten, "files_dropped": dropped, "version": version,
                }),
            );
            let ledger = ledger.clone();
            async move {
                tokio::task::spawn_blocking(move || ledger.append_audit(&event)).await??;
                Ok(())
            }
        };
        match enforce(catalog, dataset, SystemTime::now(), record).await {
            Ok(Some(d)) => tracing::info!(dataset = %dataset.name, rows = d.rows, files_rewritten = d.files_rewritten, files_dropped = d.files_dropped, version = d.version, "expired rows deleted"),
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
}
