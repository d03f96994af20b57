//! Prometheus metrics for operators, on an internal HTTP port
//! (`--metrics-listen`): queries by outcome, refusals by rule, privacy budget
//! spent per party, Ballista job durations and live executors.
//!
//! Why this is safe to expose to the operator: every figure is a count of
//! requests, ε/δ spent (both already in the ledger and audit log), or a job
//! duration, which grows with the size of the data read, like the upload
//! and retention records the operator already sees. No query text, answer
//! or value is ever a label or a sample. The port belongs on the internal
//! network all the same (it names the parties).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cleanroom_ledger::Ledger;
use prometheus::{Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::engine::Engine;
use cleanroom_manifest::Manifest;

/// The metrics of one gateway.
pub struct Metrics {
    registry: Registry,
    manifest: Arc<Manifest>,
    engine: Arc<dyn Engine>,
    ledger: Arc<dyn Ledger>,
    queries: IntCounterVec,
    refusals: IntCounterVec,
    job_seconds: Histogram,
    executors: IntGauge,
    epsilon_spent: GaugeVec,
    epsilon_budget: GaugeVec,
    delta_spent: GaugeVec,
}

/// How a statement ended, for `cleanroom_queries_total{outcome}`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// A DP answer released after a new charge.
    Answered,
    /// The answer already released to the party for the same question and data.
    Cached,
    /// Reads no protected data (catalog queries, `EXPLAIN`, constants).
    Free,
    Refused,
    /// Turned away uncharged: no executor to run it.
    Unavailable,
    /// Charged, then failed while running (the charge is kept).
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Cached => "cached",
            Outcome::Free => "free",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
            Outcome::Failed => "failed",
        }
    }
}

impl Metrics {
    pub fn new(manifest: Arc<Manifest>, engine: Arc<dyn Engine>, ledger: Arc<dyn Ledger>) -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let queries = IntCounterVec::new(
            Opts::new("cleanroom_queries_total", "Statements executed, by outcome (answered, cached, free, refused, unavailable, failed)"),
            &["outcome"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new("cleanroom_refusals_total", "Refused statements and uploads, by the rule that refused them"),
            &["rule"],
        )?;
        let job_seconds = Histogram::with_opts(
            HistogramOpts::new("cleanroom_job_duration_seconds", "Wall time of DP queries' runs on the engine, start to result")
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
        )?;
        let executors = IntGauge::new("cleanroom_executors", "Executors heard from within the executor timeout (1 for the in-process engine: the server)")?;
        let epsilon_spent = GaugeVec::new(Opts::new("cleanroom_budget_epsilon_spent", "Privacy budget ε spent, per party"), &["party"])?;
        let epsilon_budget = GaugeVec::new(Opts::new("cleanroom_budget_epsilon", "Privacy budget ε per party: the manifest's plus operator grants"), &["party"])?;
        let delta_spent = GaugeVec::new(Opts::new("cleanroom_budget_delta_spent", "Privacy budget δ spent, per party"), &["party"])?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(job_seconds.clone()))?;
        registry.register(Box::new(executors.clone()))?;
        registry.register(Box::new(epsilon_spent.clone()))?;
        registry.register(Box::new(epsilon_budget.clone()))?;
        registry.register(Box::new(delta_spent.clone()))?;
        Ok(Metrics { registry, manifest, engine, ledger, queries, refusals, job_seconds, executors, epsilon_spent, epsilon_budget, delta_spent })
    }

    pub fn query(&self, outcome: Outcome) {
        self.queries.with_label_values(&[outcome.label()]).inc();
    }

    /// A refusal by `rule` (a rule name from the planner or the gateway, never request text).
    pub fn refusal(&self, rule: &str) {
        self.refusals.with_label_values(&[rule]).inc();
    }

    pub fn job(&self, took: Duration) {
        self.job_seconds.observe(took.as_secs_f64());
    }

    /// The text exposition, with gauges read now.
    pub async fn render(&self) -> String {
        self.executors.set(self.engine.workers().await as i64);
        let (ledger, manifest) = (self.ledger.clone(), self.manifest.clone());
        let totals = tokio::task::spawn_blocking(move || {
            manifest.parties.iter().map(|p| (p.name.clone(), p.epsilon_budget, ledger.totals(&p.name).ok())).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (party, budget, spent) in totals {
            // A ledger that cannot be read leaves the last value scraped.
            if let Some(t) = spent {
                self.epsilon_budget.with_label_values(&[&party]).set(budget + t.granted_epsilon);
                self.epsilon_spent.with_label_values(&[&party]).set(t.epsilon);
                self.delta_spent.with_label_values(&[&party]).set(t.delta);
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serve `/metrics` (and `/healthz`, `/readyz` for probes) on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let ready = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], metrics.render().await) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let metrics = ready.clone();
                async move {
                    let live = metrics.engine.workers().await;
                    if live > 0 {
                        (axum::http::StatusCode::OK, format!("ready: {live} executors\n"))
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready: no executors\n".to_string())
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}
