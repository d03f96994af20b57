//! Where a dataset's data lives, and its **data versions**.
//!
//! A dataset is a location in an object store (a local directory or an S3
//! prefix) that holds Parquet files. What queries read is a *version*: an explicit list of
//! files. Version 0 is every Parquet file the location held when it was first
//! opened (outside the `_versions/` and `_uploads/` folders); each upload
//! commits the next version as one small JSON record, `_versions/<n>.json`,
//! listing the files of the new version (the previous version's files plus
//! the new ones for an append; the new ones only for a replace).
//!
//! An upload first writes its Parquet files under `_uploads/<id>/`, where no
//! version refers to them, so nothing is visible to queries until the version
//! record exists; that record is written in one atomic put that fails if the
//! version number is already taken. So an upload that is interrupted,
//! refused or fails part-way leaves the previous version exactly as it was,
//! and its files are deleted (or, after a crash, collected when the server
//! next starts).

use std::sync::Arc;

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Folder of version records, under the dataset's location.
const VERSIONS: &str = "_versions";
/// Folder of uploaded files, under the dataset's location.
const UPLOADS: &str = "_uploads";
/// Rows per Parquet file an upload writes.
const ROWS_PER_FILE: usize = 1_000_000;

/// One file of a version, relative to the dataset's location.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataFile {
    pub path: String,
    pub size: u64,
}

/// How an upload changes the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The new rows are added to the current version's.
    Append,
    /// The new rows are the whole dataset.
    Replace,
    /// Expired rows were removed (files rewritten or dropped).
    Retention,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Replace => "replace",
            Mode::Retention => "retention",
        }
    }
}

/// A version record, as stored in `_versions/<n>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub number: u64,
    pub files: Vec<DataFile>,
    /// Rows the upload added (0 for version 0, which was not uploaded).
    #[serde(default)]
    pub rows_added: u64,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub party: Option<String>,
    #[serde(default)]
    pub upload: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Files of the previous version this one no longer reads (a `replace`):
    /// deleted from storage once statements planned on the previous version
    /// have had [`SUPERSEDED_GRACE`] to finish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<DataFile>,
}

/// How long files replaced by a new version stay in storage.
pub const SUPERSEDED_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

impl Version {
    /// Names this version's content: its number and a hash of its file list.
    /// Cached answers are keyed by it, so a new version never gets an answer
    /// computed on an older one.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.path.as_bytes());
            h.update(b"\t");
            h.update(f.size.to_string().as_bytes());
            h.update(b"\n");
        }
        format!("v{}-{}", self.number, &hex::encode(h.finalize())[..16])
    }
}

/// A dataset's location: an object store and the prefix of its files.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside the store.
    pub root: StorePath,
    /// The location as a URL ending in `/` (`file:///srv/data/impressions/`),
    /// which file paths are joined to for DataFusion.
    pub url: url::Url,
}

impl DatasetStore {
    /// A local directory.
    pub fn local(dir: &std::path::Path) -> anyhow::Result<DatasetStore> {
        let dir = std::fs::canonicalize(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        let root = StorePath::from_filesystem_path(&dir).with_context(|| format!("bad path {}", dir.display()))?;
        let url = url::Url::from_directory_path(&dir).map_err(|()| anyhow::anyhow!("bad path {}", dir.display()))?;
        Ok(DatasetStore { store: Arc::new(LocalFileSystem::new()), root, url })
    }

    /// `s3://bucket/prefix/`, reached as `settings` and the environment say.
    pub fn s3(bucket: &str, prefix: &str, settings: Option<&cleanroom_manifest::S3Settings>) -> anyhow::Result<DatasetStore> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Commits are puts that must not replace an existing version record.
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(s) = settings {
            if let Some(endpoint) = &s.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(region) = &s.region {
                builder = builder.with_region(region);
            }
            if s.allow_http {
                builder = builder.with_allow_http(true);
            }
            if let (Some(key), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
                builder = builder.with_access_key_id(key).with_secret_access_key(secret);
            }
        }
        let store = builder.build().with_context(|| format!("cannot reach s3://{bucket}/"))?;
        let url = if prefix.is_empty() { format!("s3://{bucket}/") } else { format!("s3://{bucket}/{prefix}/") };
        Ok(DatasetStore { store: Arc::new(store), root: StorePath::from(prefix), url: url::Url::parse(&url)? })
    }

    /// Make the store reachable by DataFusion (and so by the executors,
    /// which share `state`'s runtime) under its URL's scheme and bucket.
    pub fn register(&self, state: &datafusion::execution::SessionState) {
        if self.url.scheme() != "file" {
            let mut base = self.url.clone();
            base.set_path("/");
            state.runtime_env().register_object_store(&base, self.store.clone());
        }
    }

    fn child(&self, relative: &str) -> StorePath {
        relative.split('/').filter(|p| !p.is_empty()).fold(self.root.clone(), |p, part| p.join(part))
    }

    /// The URL of a file of a version.
    pub fn file_url(&self, file: &DataFile) -> anyhow::Result<url::Url> {
        self.url.join(&file.path).with_context(|| format!("bad file path {}", file.path))
    }

    fn version_path(&self, number: u64) -> StorePath {
        self.child(VERSIONS).join(format!("{number:020}.json").as_str())
    }

    fn relative(&self, path: &StorePath) -> Option<String> {
        path.prefix_match(&self.root).map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"))
    }

    /// The numbers of every committed version, ascending.
    async fn version_numbers(&self) -> anyhow::Result<Vec<u64>> {
        let prefix = self.child(VERSIONS);
        let mut numbers: Vec<u64> = self
            .store
            .list(Some(&prefix))
            .try_filter_map(|meta| async move {
                Ok(meta.location.filename().and_then(|f| f.strip_suffix(".json")).and_then(|n| n.parse::<u64>().ok()))
            })
            .try_collect()
            .await
            .with_context(|| format!("cannot list the versions under {}", self.url))?;
        numbers.sort_unstable();
        Ok(numbers)
    }

    async fn read_version(&self, number: u64) -> anyhow::Result<Version> {
        let path = self.version_path(number);
        let bytes = self.store.get(&path).await?.bytes().await.with_context(|| format!("cannot read {path}"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("version record {path} is damaged"))
    }

    /// The version queries read now: the newest committed one, or version 0
    /// (the location's Parquet files) when nothing was ever uploaded.
    pub async fn current(&self) -> anyhow::Result<Version> {
        match self.version_numbers().await?.last() {
            Some(&n) => self.read_version(n).await,
            None => self.base_version().await,
        }
    }

    /// Every Parquet file under the location, outside the version and upload folders.
    async fn base_version(&self) -> anyhow::Result<Version> {
        let mut files: Vec<DataFile> = self
            .store
            .list(Some(&self.root))
            .try_collect::<Vec<_>>()
            .await
            .with_context(|| format!("cannot list {}", self.url))?
            .into_iter()
            .filter_map(|meta| {
                let relative = self.relative(&meta.location)?;
                let first = relative.split('/').next().unwrap_or_default();
                let hidden = relative.split('/').any(|p| p.starts_with('.'));
                (relative.ends_with(".parquet") && first != VERSIONS && first != UPLOADS && !hidden)
                    .then_some(DataFile { path: relative, size: meta.size })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Version { number: 0, files, rows_added: 0, mode: None, party: None, upload: None, created: 0, superseded: Vec::new() })
    }

    /// Start an upload: its files go under `_uploads/<id>/`.
    pub fn begin_upload(&self, id: &str, schema: SchemaRef) -> Upload {
        Upload { store: self.clone(), id: id.to_string(), schema, writer: None, files: Vec::new(), rows: 0, rows_in_file: 0 }
    }

    /// Commit `upload` as the version after `base`: one atomic put that fails
    /// if another commit took the number first.
    pub async fn commit(&self, base: &Version, upload: UploadSummary, mode: Mode, party: &str) -> anyhow::Result<Version> {
        let mut files = match mode {
            Mode::Append => base.files.clone(),
            Mode::Replace | Mode::Retention => Vec::new(),
        };
        files.extend(upload.files);
        let superseded = if mode == Mode::Replace { base.files.clone() } else { Vec::new() };
        self.commit_files(base, files, upload.rows, mode, Some(party), Some(upload.id), superseded).await
    }

    /// Commit the version after `base` with exactly `files` (and the files
    /// of earlier versions it `superseded`, to delete after the grace period).
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_files(
        &self,
        base: &Version,
        files: Vec<DataFile>,
        rows_added: u64,
        mode: Mode,
        party: Option<&str>,
        upload: Option<String>,
        superseded: Vec<DataFile>,
    ) -> anyhow::Result<Version> {
        let version = Version {
            superseded,
            number: base.number + 1,
            files,
            rows_added,
            mode: Some(mode),
            party: party.map(str::to_string),
            upload,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        let bytes = serde_json::to_vec_pretty(&version)?;
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.store
            .put_opts(&self.version_path(version.number), PutPayload::from(bytes), options)
            .await
            .with_context(|| format!("cannot commit version {} of {}", version.number, self.url))?;
        Ok(version)
    }

    /// Where a file of a version is in the store.
    pub fn object(&self, file: &DataFile) -> StorePath {
        self.child(&file.path)
    }

    /// Delete files no version will read again (after retention).
    pub async fn delete(&self, files: &[DataFile]) -> anyhow::Result<()> {
        for f in files {
            self.store.delete(&self.child(&f.path)).await.with_context(|| format!("cannot delete {}", f.path))?;
        }
        Ok(())
    }

    /// Every committed version record, oldest first.
    async fn committed_versions(&self) -> anyhow::Result<Vec<Version>> {
        let mut versions = Vec::new();
        for n in self.version_numbers().await? {
            versions.push(self.read_version(n).await?);
        }
        Ok(versions)
    }

    /// Delete the files that versions committed at least `grace` ago
    /// superseded, unless the current version reads them. Idempotent: files
    /// already gone are skipped. Returns how many files were deleted.
    pub async fn purge_superseded(&self, grace: std::time::Duration) -> anyhow::Result<usize> {
        let versions = self.committed_versions().await?;
        let Some(newest) = versions.last() else { return Ok(0) };
        let current: std::collections::HashSet<&str> = newest.files.iter().map(|f| f.path.as_str()).collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut deleted = 0;
        for version in &versions {
            if version.superseded.is_empty() || now.saturating_sub(version.created) < grace.as_secs() {
                continue;
            }
            for f in version.superseded.iter().filter(|f| !current.contains(f.path.as_str())) {
                match self.store.delete(&self.child(&f.path)).await {
                    Ok(()) => deleted += 1,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e).with_context(|| format!("cannot delete {}", f.path)),
                }
            }
        }
        Ok(deleted)
    }

    /// Delete upload folders no version refers to: what an upload left
    /// behind when the server was killed before it committed or cleaned up.
    /// Returns how many files were deleted.
    pub async fn collect_orphans(&self) -> anyhow::Result<usize> {
        let referenced: std::collections::HashSet<String> =
            self.committed_versions().await?.into_iter().flat_map(|v| v.files).map(|f| f.path).collect();
        let uploads = self.child(UPLOADS);
        let orphans: Vec<StorePath> = self
            .store
            .list(Some(&uploads))
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .filter(|meta| self.relative(&meta.location).is_some_and(|r| !referenced.contains(&r)))
            .map(|meta| meta.location)
            .collect();
        for path in &orphans {
            self.store.delete(path).await.with_context(|| format!("cannot delete {path}"))?;
        }
        Ok(orphans.len())
    }
}

/// What a finished upload wrote, to commit.
pub struct UploadSummary {
    pub id: String,
    pub files: Vec<DataFile>,
    pub rows: u64,
}

/// An upload in progress: Parquet files written under `_uploads/<id>/`.
pub struct Upload {
    store: DatasetStore,
    pub id: String,
    schema: SchemaRef,
    writer: Option<(AsyncArrowWriter<BufWriter>, String)>,
    pub files: Vec<DataFile>,
    pub rows: u64,
    rows_in_file: usize,
}

impl Upload {
    /// Append a batch (already checked against the dataset's schema).
    pub async fn write(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.writer.is_none() {
            let relative = format!("{UPLOADS}/{}/part-{:05}.parquet", self.id, self.files.len());
            let object = BufWriter::new(self.store.store.clone(), self.store.child(&relative));
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")))
                .build();
            let writer = AsyncArrowWriter::try_new(object, self.schema.clone(), Some(props))?;
            self.writer = Some((writer, relative));
            self.rows_in_file = 0;
        }
        let (writer, _) = self.writer.as_mut().expect("opened above");
        writer.write(batch).await?;
        self.rows += batch.num_rows() as u64;
        self.rows_in_file += batch.num_rows();
        if self.rows_in_file >= ROWS_PER_FILE {
            self.finish_file().await?;
        }
        Ok(())
    }

    async fn finish_file(&mut self) -> anyhow::Result<()> {
        if let Some((writer, relative)) = self.writer.take() {
            writer.close().await?;
            let size = self.store.store.head(&self.store.child(&relative)).await?.size;
            self.files.push(DataFile { path: relative, size });
        }
        Ok(())
    }

    /// Close the last file; the upload is ready to commit.
    pub async fn finish(&mut self) -> anyhow::Result<()> {
        self.finish_file().await
    }

    pub fn summary(&self) -> UploadSummary {
        UploadSummary { id: self.id.clone(), files: self.files.clone(), rows: self.rows }
    }

    /// Delete everything this upload wrote.
    pub async fn abort(mut self) {
        if let Some((writer, relative)) = self.writer.take() {
            drop(writer);
            let _ = self.store.store.delete(&self.store.child(&relative)).await;
        }
        for f in &self.files {
            if let Err(e) = self.store.store.delete(&self.store.child(&f.path)).await {
                tracing::warn!(upload = %self.id, file = %f.path, error = %e, "could not delete a file of an aborted upload; it is collected at the next start");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    /// An upload whose files reached disk but that was never committed (the
    /// process died between) is deleted at the next start; committed files stay.
    #[tokio::test]
    async fn orphaned_upload_files_are_collected_and_committed_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::local(dir.path()).unwrap();
        let base = store.current().await.unwrap();

        let mut committed = store.begin_upload("kept", batch(1).schema());
        committed.write(&batch(10)).await.unwrap();
        committed.finish().await.unwrap();
        let version = store.commit(&base, committed.summary(), Mode::Append, "owner").await.unwrap();

        let mut orphan = store.begin_upload("lost", batch(1).schema());
        orphan.write(&batch(20)).await.unwrap();
        orphan.finish().await.unwrap();
        let orphan_file = dir.path().join(&orphan.files[0].path);
        assert!(orphan_file.exists(), "the uncommitted upload reached disk");

        assert_eq!(store.collect_orphans().await.unwrap(), 1);
        assert!(!orphan_file.exists());
        for f in &version.files {
            assert!(dir.path().join(&f.path).exists(), "{} was committed and stays", f.path);
        }
        assert_eq!(store.current().await.unwrap().files, version.files);
        assert_eq!(store.collect_orphans().await.unwrap(), 0, "nothing left to collect");
    }

    /// After a `replace`, the previous version's files are deleted once the
    /// grace period has passed, never before, and never a file still read.
    #[tokio::test]
    async fn replaced_files_are_deleted_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("original.parquet"), b"not read here").unwrap();
        let store = DatasetStore::local(dir.path()).unwrap();
        let base = store.current().await.unwrap();
        assert_eq!(base.files.len(), 1);

        let mut first = store.begin_upload("first", batch(1).schema());
        first.write(&batch(10)).await.unwrap();
        first.finish().await.unwrap();
        let appended = store.commit(&base, first.summary(), Mode::Append, "owner").await.unwrap();
        let mut second = store.begin_upload("second", batch(1).schema());
        second.write(&batch(5)).await.unwrap();
        second.finish().await.unwrap();
        let replaced = store.commit(&appended, second.summary(), Mode::Replace, "owner").await.unwrap();
        assert_eq!(replaced.superseded, appended.files);

        assert_eq!(store.purge_superseded(std::time::Duration::from_secs(3600)).await.unwrap(), 0, "within the grace period");
        for f in &appended.files {
            assert!(dir.path().join(&f.path).exists());
        }
        assert_eq!(store.purge_superseded(std::time::Duration::ZERO).await.unwrap(), 2);
        assert!(!dir.path().join("original.parquet").exists(), "the replaced rows are gone from storage");
        for f in &appended.files {
            assert!(!dir.path().join(&f.path).exists(), "{}", f.path);
        }
        for f in &replaced.files {
            assert!(dir.path().join(&f.path).exists(), "the current version's {} stays", f.path);
        }
        assert_eq!(store.purge_superseded(std::time::Duration::ZERO).await.unwrap(), 0, "idempotent");
        assert_eq!(store.current().await.unwrap().files, replaced.files);
    }
}
