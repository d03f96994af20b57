//! The system tables a party can query without charge: `system.budget`, its
//! own spent and remaining budget, and `system.queries`, its own history of
//! charged queries (statement, time, charge).
//!
//! Each session gets its own `system` schema built for its party alone, and
//! the tables are read from the ledger when a statement is planned, so a
//! party can never see another party's figures through them.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampSecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use cleanroom_ledger::{round_for_display, Ledger};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};

pub const BUDGET: &str = "budget";
pub const QUERIES: &str = "queries";

pub struct SystemSchema {
    party: String,
    budget: f64,
    delta_budget: f64,
    ledger: Arc<dyn Ledger>,
}

impl std::fmt::Debug for SystemSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemSchema").field("party", &self.party).finish()
    }
}

impl SystemSchema {
    pub fn new(party: &str, budget: f64, delta_budget: f64, ledger: Arc<dyn Ledger>) -> Self {
        SystemSchema { party: party.to_string(), budget, delta_budget, ledger }
    }

    pub fn budget_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("party", DataType::Utf8, false),
            Field::new("budget_epsilon", DataType::Float64, false),
            Field::new("spent_epsilon", DataType::Float64, false),
            Field::new("remaining_epsilon", DataType::Float64, false),
            Field::new("budget_delta", DataType::Float64, false),
            Field::new("spent_delta", DataType::Float64, false),
            Field::new("remaining_delta", DataType::Float64, false),
        ]))
    }

    pub fn queries_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("receipt_id", DataType::Utf8, false),
            Field::new("charged_at", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
            Field::new("sql", DataType::Utf8, false),
            Field::new("epsilon", DataType::Float64, false),
            Field::new("delta", DataType::Float64, false),
        ]))
    }

    fn budget_batch(&self) -> Result<RecordBatch> {
        // The manifest's budgets plus what operators granted since.
        let totals = self.ledger.totals(&self.party).map_err(|e| DataFusionError::External(Box::new(e)))?;
        let (spent, spent_delta) = (totals.epsilon, totals.delta);
        let (budget, delta_budget) = (self.budget + totals.granted_epsilon, self.delta_budget + totals.granted_delta);
        Ok(RecordBatch::try_new(
            Self::budget_schema(),
            vec![
                Arc::new(StringArray::from(vec![self.party.clone()])),
                Arc::new(Float64Array::from(vec![round_for_display(budget)])),
                Arc::new(Float64Array::from(vec![round_for_display(spent)])),
                Arc::new(Float64Array::from(vec![round_for_display((budget - spent).max(0.0))])),
                Arc::new(Float64Array::from(vec![delta_budget])),
                Arc::new(Float64Array::from(vec![spent_delta])),
                Arc::new(Float64Array::from(vec![(delta_budget - spent_delta).max(0.0)])),
            ],
        )?)
    }

    fn queries_batch(&self) -> Result<RecordBatch> {
        let history = self.ledger.history(&self.party).map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(RecordBatch::try_new(
            Self::queries_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(history.iter().map(|r| r.receipt_id.as_str()))),
                Arc::new(TimestampSecondArray::from_iter_values(history.iter().map(|r| r.at as i64)).with_timezone("UTC")),
                Arc::new(StringArray::from_iter_values(history.iter().map(|r| r.sql.as_str()))),
                Arc::new(Float64Array::from_iter_values(history.iter().map(|r| r.epsilon))),
                Arc::new(Float64Array::from_iter_values(history.iter().map(|r| r.delta))),
            ],
        )?)
    }
}

#[tonic::async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        vec![BUDGET.to_string(), QUERIES.to_string()]
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let batch = match name {
            BUDGET => self.budget_batch()?,
            QUERIES => self.queries_batch()?,
            _ => return Ok(None),
        };
        Ok(Some(Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?)))
    }

    fn table_exist(&self, name: &str) -> bool {
        name == BUDGET || name == QUERIES
    }
}
