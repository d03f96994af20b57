//! The collaboration catalog: one DataFusion table per dataset of the
//! manifest, and the per-party view of it.
//!
//! Tables are Parquet listing tables, which Ballista can serialise into plans
//! and scan on its executors. Their schemas are read once at start-up; a
//! party's session registers only the datasets the manifest lets it query,
//! so a dataset it may not read cannot even be named.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::SessionState;
use datafusion::prelude::SessionContext;

use crate::manifest::Manifest;

pub use cleanroom_executor::{CATALOG, SCHEMA};

/// The manifest's column roles must fit the data's types: a measure is
/// numeric, an integer-range domain is on an integer column, a list of
/// string keys on a string column, a date range on a date or timestamp column. Checked once at start-up so that no query
/// can hit a value that does not convert.
fn check_columns(dataset: &crate::manifest::Dataset, schema: &Schema) -> anyhow::Result<()> {
    use cleanroom_dp::policy::Domain;
    use datafusion::arrow::datatypes::DataType;
    let is_string = |t: &DataType| match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        _ => false,
    };
    for (name, column) in &dataset.columns {
        let field = schema.field_with_name(name).map_err(|_| {
            anyhow::anyhow!("dataset `{}`: column `{name}` is declared in the manifest but not in the data", dataset.name)
        })?;
        let t = field.data_type();
        let fits = match (column.role, &column.domain) {
            (crate::manifest::Role::Measure, _) => t.is_numeric(),
            (_, Some(Domain::IntRange { .. })) => t.is_integer(),
            (_, Some(Domain::Strings(_))) => is_string(t),
            (_, Some(Domain::DateRange { .. })) => matches!(t, DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)),
            _ => true,
        };
        if !fits {
            anyhow::bail!(
                "dataset `{}`: column `{name}` has type {t} in the data, which does not fit its role {} in the manifest",
                dataset.name,
                column.role
            );
        }
    }
    Ok(())
}

/// One dataset, ready to scan.
pub struct Table {
    pub name: String,
    pub provider: Arc<ListingTable>,
    /// Columns a party may see in metadata (hidden ones left out).
    pub visible_schema: SchemaRef,
    /// Identifies the data as it was when the server started: a hash of the
    /// Parquet files' paths, sizes and modification times.
    pub version: String,
}

/// A hash of every Parquet file under `dir` (path, size, modification time).
fn data_version(dir: &std::path::Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if entry.path().extension().is_some_and(|e| e == "parquet") {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                files.push(format!("{}\t{}\t{modified}", entry.path().display(), meta.len()));
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        h.update(f.as_bytes());
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

pub struct Catalog {
    pub manifest: Arc<Manifest>,
    tables: BTreeMap<String, Table>,
}

impl Catalog {
    /// Open every dataset of the manifest.
    pub async fn open(manifest: Arc<Manifest>, state: &SessionState) -> anyhow::Result<Self> {
        let mut tables = BTreeMap::new();
        for dataset in &manifest.datasets {
            let dir = dataset.local_path(&manifest.base_dir)?;
            let mut location = dir.to_string_lossy().to_string();
            if !location.ends_with('/') {
                location.push('/');
            }
            let url = ListingTableUrl::parse(&location)
                .with_context(|| format!("dataset `{}`: bad location {location}", dataset.name))?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let schema = options
                .infer_schema(state, &url)
                .await
                .with_context(|| format!("dataset `{}`: cannot read the Parquet files under {location}", dataset.name))?;
            check_columns(dataset, &schema)?;
            let config = ListingTableConfig::new(url)
                .with_listing_options(options)
                .with_schema(schema.clone());
            let provider = Arc::new(ListingTable::try_new(config)?);
            let visible = schema
                .fields()
                .iter()
                .filter(|f| {
                    !matches!(
                        dataset.columns.get(f.name()).map(|c| c.role),
                        None | Some(crate::manifest::Role::Hidden)
                    )
                })
                .cloned()
                .collect::<Vec<_>>();
            tables.insert(
                dataset.name.clone(),
                Table {
                    name: dataset.name.clone(),
                    provider,
                    visible_schema: Arc::new(Schema::new(visible)),
                    version: data_version(&dir)?,
                },
            );
        }
        Ok(Catalog { manifest, tables })
    }

    /// The data version of a dataset.
    pub fn version(&self, dataset: &str) -> Option<&str> {
        self.tables.get(dataset).map(|t| t.version.as_str())
    }

    /// The tables `party` may query, by name.
    pub fn readable(&self, party: &str) -> Vec<&Table> {
        self.manifest
            .readable_datasets(party)
            .into_iter()
            .filter_map(|d| self.tables.get(&d.name))
            .collect()
    }

    /// Register the tables `party` may query in `ctx`.
    pub fn register_for(&self, party: &str, ctx: &SessionContext) -> anyhow::Result<()> {
        for table in self.readable(party) {
            ctx.register_table(table.name.as_str(), table.provider.clone() as Arc<dyn TableProvider>)?;
        }
        Ok(())
    }
}
