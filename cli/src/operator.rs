//! Operator commands on the ledger: `budget show|grant` and `audit verify|list`.
//! They read the ledger where `serve` keeps it (`--state-dir` or `--etcd`);
//! the embedded ledger is one process's at a time, so with it they run while
//! the server is stopped, while on etcd they run beside a serving clean room.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cleanroom_ledger::audit::{self, Event};
use cleanroom_ledger::{round_for_display, Grant, Ledger, Totals};
use cleanroom_manifest::Manifest;
use cleanroom_scheduler::serve::LedgerLocation;
use serde_json::json;

use crate::{AuditCommand, BudgetCommand, OperatorLedgerArgs};

impl OperatorLedgerArgs {
    fn manifest(&self) -> anyhow::Result<Option<Manifest>> {
        self.manifest
            .as_ref()
            .map(|path| Manifest::load(path).with_context(|| format!("cannot load the manifest {}", path.display())))
            .transpose()
    }

    fn open(&self, manifest: Option<&Manifest>) -> anyhow::Result<Arc<dyn Ledger>> {
        let location = match (&self.ledger.etcd, &self.ledger.state_dir, manifest) {
            (Some(endpoints), _, _) => LedgerLocation::Etcd { endpoints: endpoints.clone(), prefix: self.ledger.etcd_prefix.clone() },
            (None, Some(dir), _) => LedgerLocation::StateDir(dir.clone()),
            (None, None, Some(m)) => LedgerLocation::StateDir(m.base_dir.join("state")),
            (None, None, None) => anyhow::bail!("say where the ledger is: --state-dir DIR, --etcd URLS, or --manifest FILE (its state/ directory)"),
        };
        location.open()
    }
}

fn operator_name() -> String {
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "operator".into())
}

pub fn budget(command: BudgetCommand) -> anyhow::Result<ExitCode> {
    match command {
        BudgetCommand::Show { at, party, json } => {
            let manifest = at.manifest()?.context("budget show needs --manifest: the parties and their budgets are there")?;
            if let Some(p) = &party {
                manifest.party(p).with_context(|| format!("no party {p:?} in the manifest"))?;
            }
            let ledger = at.open(Some(&manifest))?;
            let row = |name: &str, t: &Totals, budget: Option<f64>, delta_budget: Option<f64>, queries: Option<usize>| {
                let remaining = budget.map(|b| round_for_display((b - t.epsilon).max(0.0)));
                let remaining_delta = delta_budget.map(|b| (b - t.delta).max(0.0));
                json!({
                    "party": name,
                    "epsilon_spent": round_for_display(t.epsilon),
                    "epsilon_budget": budget.map(round_for_display),
                    "epsilon_remaining": remaining,
                    "epsilon_granted": round_for_display(t.granted_epsilon),
                    "delta_spent": t.delta,
                    "delta_budget": delta_budget,
                    "delta_remaining": remaining_delta,
                    "delta_granted": t.granted_delta,
                    "queries": queries,
                })
            };
            let mut rows = Vec::new();
            for p in manifest.parties.iter().filter(|p| party.as_ref().is_none_or(|q| *q == p.name)) {
                let t = ledger.totals(&p.name)?;
                let queries = ledger.history(&p.name)?.len();
                rows.push(row(&p.name, &t, Some(p.epsilon_budget + t.granted_epsilon), Some(p.delta_budget + t.granted_delta), Some(queries)));
            }
            if party.is_none() {
                let all = ledger.collaboration_totals()?;
                let c = &manifest.collaboration;
                rows.push(row("(collaboration)", &all, c.epsilon_cap, c.delta_cap, None));
            }
            if json {
                for r in rows {
                    println!("{r}");
                }
            } else {
                let show = |v: &serde_json::Value| match v {
                    serde_json::Value::Null => "-".to_string(),
                    v => v.to_string(),
                };
                println!(
                    "{:<18} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12} {:>12} {:>8}",
                    "party", "eps spent", "eps budget", "eps left", "granted", "delta spent", "delta budget", "delta left", "queries"
                );
                for r in &rows {
                    println!(
                        "{:<18} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12} {:>12} {:>8}",
                        r["party"].as_str().unwrap_or_default(),
                        show(&r["epsilon_spent"]),
                        show(&r["epsilon_budget"]),
                        show(&r["epsilon_remaining"]),
                        show(&r["epsilon_granted"]),
                        show(&r["delta_spent"]),
                        show(&r["delta_budget"]),
                        show(&r["delta_remaining"]),
                        show(&r["queries"]),
                    );
                }
                println!("(the collaboration row is what all parties spent together, against the manifest's caps)");
            }
            Ok(ExitCode::SUCCESS)
        }
        BudgetCommand::Grant { at, party, epsilon, delta, reason } => {
            let manifest = at.manifest()?.context("budget grant needs --manifest: the party must be in it")?;
            let p = manifest.party(&party).with_context(|| format!("no party {party:?} in the manifest"))?;
            let ledger = at.open(Some(&manifest))?;
            let grant = Grant { party: party.clone(), epsilon, delta, reason, by: operator_name() };
            let after = ledger.grant(&grant)?;
            println!(
                "granted {party} epsilon = {epsilon}, delta = {delta}: its budget is now epsilon = {} (delta = {}), {} spent",
                round_for_display(p.epsilon_budget + after.granted_epsilon),
                p.delta_budget + after.granted_delta,
                round_for_display(after.epsilon)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify { at, expect } => {
            let expect = expect
                .iter()
                .map(|e| {
                    let (seq, hash) = e.split_once(':').context("--expect takes SEQ:HASH")?;
                    Ok((seq.parse::<u64>().context("--expect takes SEQ:HASH")?, hash.to_string()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let manifest = at.manifest()?;
            let ledger = at.open(manifest.as_ref())?;
            let (records, head) = ledger.audit_log()?;
            let v = audit::verify(&records, head.as_ref(), &expect);
            if v.problems.is_empty() {
                println!(
                    "audit log intact: {} records, head {}:{} ({})",
                    v.records,
                    v.head.seq,
                    v.head.hash,
                    ledger.describe()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &v.problems {
                    println!("{p}");
                }
                eprintln!("audit log TAMPERED: {} problem(s) in {} records ({})", v.problems.len(), v.records, ledger.describe());
                Ok(ExitCode::FAILURE)
            }
        }
        AuditCommand::List { at, party, since, kind: wanted, json } => {
            if let Some(k) = &wanted {
                if !Event::KINDS.contains(&k.as_str()) {
                    anyhow::bail!("unknown --kind {k:?}: one of {}", Event::KINDS.join(", "));
                }
            }
            let since = since.as_deref().map(audit::parse_time).transpose().map_err(anyhow::Error::msg)?;
            let manifest = at.manifest()?;
            let ledger = at.open(manifest.as_ref())?;
            if !json {
                println!("{:>6}  {:<24}  {:<13}  {:<14}  detail", "seq", "time (UTC)", "kind", "party");
            }
            for (seq, bytes) in ledger.audit_records(0)? {
                let Ok(r) = audit::parse(&bytes) else {
                    println!("{seq:>6}  (unreadable record: run `cleanroom audit verify`)");
                    continue;
                };
                if party.as_ref().is_some_and(|p| r.party.as_ref() != Some(p))
                    || wanted.as_ref().is_some_and(|k| *k != r.kind)
                    || since.is_some_and(|s| r.at_ms < s)
                {
                    continue;
                }
                if json {
                    let mut line = serde_json::to_value(&r)?;
                    line["time"] = json!(audit::format_time(r.at_ms));
                    line["hash"] = json!(String::from_utf8_lossy(&bytes[..64.min(bytes.len())]));
                    println!("{line}");
                } else {
                    println!(
                        "{seq:>6}  {:<24}  {:<13}  {:<14}  {}",
                        audit::format_time(r.at_ms),
                        r.kind,
                        r.party.as_deref().unwrap_or("-"),
                        r.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
