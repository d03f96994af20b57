//! The collaboration catalog: one DataFusion table per dataset of the
//! manifest, and the per-party view of it.
//!
//! Tables are Parquet listing tables over the files of a dataset's current
//! data version ([`crate::storage`]), which Ballista can serialise into plans
//! and scan on its executors. Their schemas are read once at start-up; an
//! upload installs a new version, which the next statement planned sees. A
//! party's session resolves only the datasets the manifest lets it query, so
//! a dataset it may not read cannot even be named.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::SessionState;
use datafusion::prelude::SessionContext;

use cleanroom_manifest::{Location, Manifest};
use crate::storage::{DatasetStore, Version, SUPERSEDED_GRACE};

pub use crate::{CATALOG, SCHEMA};

/// The manifest's column roles must fit the data's types: a measure is
/// numeric, an integer-range domain is on an integer column, a list of
/// string keys on a string column, a date range on a date or timestamp column. Checked once at start-up so that no query
/// can hit a value that does not convert.
pub fn check_columns(dataset: &cleanroom_manifest::Dataset, schema: &Schema) -> anyhow::Result<()> {
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
            (cleanroom_manifest::Role::Measure, _) => t.is_numeric(),
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

/// The columns of `schema` a party may see in metadata: those the manifest
/// declares and does not hide.
fn visible_schema(dataset: &cleanroom_manifest::Dataset, schema: &Schema) -> SchemaRef {
    let visible = schema
        .fields()
        .iter()
        .filter(|f| !matches!(dataset.columns.get(f.name()).map(|c| c.role), None | Some(cleanroom_manifest::Role::Hidden)))
        .cloned()
        .collect::<Vec<_>>();
    Arc::new(Schema::new(visible))
}

/// One dataset at one data version, ready to scan.
pub struct Table {
    pub name: String,
    pub provider: Arc<ListingTable>,
    /// The same files with only the columns a party may use: what a party's
    /// statements are planned against, so no planning error (an unknown
    /// column, a type mismatch) can name or describe a hidden or undeclared
    /// column.
    pub party_provider: Arc<ListingTable>,
    /// Every column of the data, as uploads must match it.
    pub schema: SchemaRef,
    /// Columns a party may see in metadata (hidden ones left out).
    pub visible_schema: SchemaRef,
    /// The data version queries read now.
    pub version: Version,
}

/// A listing table over exactly the files of `version`.
async fn listing_table(
    store: &DatasetStore,
    version: &Version,
    schema: Option<SchemaRef>,
    state: &SessionState,
) -> anyhow::Result<(Arc<ListingTable>, SchemaRef)> {
    let urls = version
        .files
        .iter()
        .map(|f| {
            let url = store.file_url(f)?;
            ListingTableUrl::parse(url.as_str()).with_context(|| format!("bad file location {url}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if urls.is_empty() {
        anyhow::bail!("no Parquet files under {}", store.url);
    }
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let schema = match schema {
        Some(schema) => schema,
        None => options
            .infer_schema(state, &urls[0])
            .await
            .with_context(|| format!("cannot read the Parquet file {}", urls[0]))?,
    };
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema.clone());
    Ok((Arc::new(ListingTable::try_new(config)?), schema))
}

pub struct Catalog {
    pub manifest: Arc<Manifest>,
    stores: BTreeMap<String, DatasetStore>,
    tables: RwLock<BTreeMap<String, Arc<Table>>>,
    /// One upload at a time per dataset.
    commits: BTreeMap<String, tokio::sync::Mutex<()>>,
    state: SessionState,
}

impl Catalog {
    /// Open every dataset of the manifest at its current version, after
    /// deleting what interrupted uploads left behind.
    pub async fn open(manifest: Arc<Manifest>, state: &SessionState) -> anyhow::Result<Self> {
        let mut tables = BTreeMap::new();
        let mut stores = BTreeMap::new();
        for dataset in &manifest.datasets {
            let store = match dataset.location(&manifest.base_dir)? {
                Location::Local(dir) => {
                    // A dataset may start empty: its first upload brings its data.
                    std::fs::create_dir_all(&dir).with_context(|| format!("dataset `{}`: cannot create {}", dataset.name, dir.display()))?;
                    DatasetStore::local(&dir)
                }
                Location::S3 { bucket, prefix } => DatasetStore::s3(&bucket, &prefix, manifest.s3.as_ref()),
            }
            .with_context(|| format!("dataset `{}`", dataset.name))?;
            store.register(state);
            let orphans = store.collect_orphans().await.with_context(|| format!("dataset `{}`", dataset.name))?;
            if orphans > 0 {
                tracing::info!(dataset = %dataset.name, files = orphans, "deleted the files of uploads that never committed");
            }
            let version = store.current().await.with_context(|| format!("dataset `{}`", dataset.name))?;
            if version.files.is_empty() {
                tracing::info!(dataset = %dataset.name, location = %store.url, "dataset has no data yet: its owner's first upload brings it");
            } else {
                let (provider, schema) = listing_table(&store, &version, None, state)
                    .await
                    .with_context(|| format!("dataset `{}`", dataset.name))?;
                check_columns(dataset, &schema)?;
                tracing::info!(dataset = %dataset.name, version = %version.id(), files = version.files.len(), "dataset opened");
                let visible = visible_schema(dataset, &schema);
                let (party_provider, _) = listing_table(&store, &version, Some(visible.clone()), state).await?;
                let table = Table { name: dataset.name.clone(), provider, party_provider, visible_schema: visible, schema, version };
                tables.insert(dataset.name.clone(), Arc::new(table));
            }
            stores.insert(dataset.name.clone(), store);
        }
        let commits = stores.keys().map(|k| (k.clone(), tokio::sync::Mutex::new(()))).collect();
        Ok(Catalog { manifest, stores, tables: RwLock::new(tables), commits, state: state.clone() })
    }

    /// A dataset as queries see it now.
    pub fn table(&self, dataset: &str) -> Option<Arc<Table>> {
        self.tables.read().expect("catalog lock").get(dataset).cloned()
    }

    /// The data version id of a dataset.
    pub fn version(&self, dataset: &str) -> Option<String> {
        self.table(dataset).map(|t| t.version.id())
    }

    /// Where a dataset's files are.
    pub fn store(&self, dataset: &str) -> Option<&DatasetStore> {
        self.stores.get(dataset)
    }

    /// Delete the files `replace` uploads superseded more than
    /// [`SUPERSEDED_GRACE`] ago, in every dataset.
    pub async fn purge_superseded(&self) {
        for (name, store) in &self.stores {
            match store.purge_superseded(SUPERSEDED_GRACE).await {
                Ok(0) => {}
                Ok(files) => tracing::info!(dataset = %name, files, "files of replaced versions deleted"),
                Err(e) => tracing::warn!(dataset = %name, error = %format!("{e:#}"), "cannot delete files of replaced versions; the next pass tries again"),
            }
        }
    }

    /// Held while a dataset's next version is written and committed.
    pub async fn lock_for_upload(&self, dataset: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        Some(self.commits.get(dataset)?.lock().await)
    }

    /// Make `version` (just committed) the one queries read.
    pub async fn install(&self, dataset: &str, version: Version) -> anyhow::Result<()> {
        let declared = self.manifest.dataset(dataset).with_context(|| format!("no dataset `{dataset}`"))?;
        if version.files.is_empty() {
            // Retention removed every row: the dataset has no data until its next upload.
            self.tables.write().expect("catalog lock").remove(dataset);
            return Ok(());
        }
        let store = self.store(dataset).with_context(|| format!("no dataset `{dataset}`"))?;
        let schema = self.table(dataset).map(|t| t.schema.clone());
        let (provider, schema) = listing_table(store, &version, schema, &self.state).await?;
        let visible = visible_schema(declared, &schema);
        let (party_provider, _) = listing_table(store, &version, Some(visible.clone()), &self.state).await?;
        let table = Table { name: dataset.to_string(), provider, party_provider, visible_schema: visible, schema, version };
        self.tables.write().expect("catalog lock").insert(dataset.to_string(), Arc::new(table));
        Ok(())
    }

    /// The tables `party` may query, by name.
    pub fn readable(&self, party: &str) -> Vec<Arc<Table>> {
        self.manifest
            .readable_datasets(party)
            .into_iter()
            .filter_map(|d| self.table(&d.name))
            .collect()
    }

    /// Give `ctx` the tables `party` may query, each at its current version
    /// whenever a statement is planned.
    pub fn register_for(self: &Arc<Self>, party: &str, ctx: &SessionContext) -> anyhow::Result<()> {
        let catalog = ctx.catalog(CATALOG).context("the session has no catalog")?;
        catalog.register_schema(SCHEMA, Arc::new(PartyTables { catalog: self.clone(), party: party.to_string() }))?;
        Ok(())
    }
}

/// The datasets one party may query, resolved to their current versions.
struct PartyTables {
    catalog: Arc<Catalog>,
    party: String,
}

impl std::fmt::Debug for PartyTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartyTables").field("party", &self.party).finish()
    }
}

#[async_trait::async_trait]
impl SchemaProvider for PartyTables {
    fn table_names(&self) -> Vec<String> {
        self.catalog.readable(&self.party).iter().map(|t| t.name.clone()).collect()
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let readable = self.catalog.manifest.dataset(name).is_some_and(|d| d.readable_by(&self.party));
        Ok(readable.then(|| self.catalog.table(name)).flatten().map(|t| t.party_provider.clone() as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.manifest.dataset(name).is_some_and(|d| d.readable_by(&self.party)) && self.catalog.table(name).is_some()
    }
}
