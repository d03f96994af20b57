//! One test suite for both ledger backends: the embedded redb ledger and the
//! etcd ledger (a real etcd, one member and three), plus what only one of
//! them can be put through (reopening redb; losing etcd members).

#[path = "../../tests/support/etcd.rs"]
mod etcd;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_ledger::audit::{self, AuditEvent};
use cleanroom_ledger::{Charge, EtcdLedger, Grant, Ledger, Limits, RedbLedger};
use cleanroom_ledger::LedgerError;
use redb::ReadableTable;
use serde_json::json;

fn charge(party: &str, epsilon: f64) -> Charge {
    Charge { party: party.into(), query_id: "q".into(), epsilon, sql: "SELECT 1".into(), columns: vec!["n".into()], ..Default::default() }
}

fn verified(ledger: &dyn Ledger) -> audit::Verification {
    let (records, head) = ledger.audit_log().unwrap();
    assert_eq!(records, ledger.audit_records(0).unwrap());
    assert_eq!(head, ledger.audit_head().unwrap());
    let v = audit::verify(&records, head.as_ref(), &[]);
    assert!(v.problems.is_empty(), "audit log of {}: {:?}", ledger.describe(), v.problems);
    v
}

/// Everything a backend must do, on a fresh ledger.
fn suite(l: &dyn Ledger) {
    // Charges add up; a charge over budget is refused with what is left.
    for _ in 0..10 {
        l.charge(&charge("a", 0.1), &Limits::epsilon(1.0)).unwrap();
    }
    assert!((l.spent("a").unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(l.spent("b").unwrap(), 0.0);
    let err = l.charge(&charge("a", 0.1), &Limits::epsilon(1.0)).unwrap_err();
    assert!(err.to_string().contains("has only epsilon = 0 left of its budget of 1"), "{err}");
    let history = l.history("a").unwrap();
    assert_eq!(history.len(), 10);
    assert!(l.history("b").unwrap().is_empty());

    // A receipt names its charge and its audit record.
    let receipt = l.charge(&charge("b", 0.75), &Limits::epsilon(1.0)).unwrap();
    assert_eq!((receipt.party(), receipt.epsilon(), receipt.remaining()), ("b", 0.75, 0.25));
    let err = l.charge(&charge("b", 0.5), &Limits::epsilon(1.0)).unwrap_err();
    assert!(err.to_string().contains("0.25 left"), "{err}");
    let (seq, hash) = receipt.audit_record().split_once(':').map(|(s, h)| (s.parse::<u64>().unwrap(), h.to_string())).unwrap();
    let records = l.audit_records(seq).unwrap();
    assert_eq!(records[0].0, seq);
    let record = audit::parse(&records[0].1).unwrap();
    assert_eq!((record.kind.as_str(), record.party.as_deref()), ("query", Some("b")));
    assert_eq!(record.detail["receipt"], receipt.id());
    assert_eq!(record.detail["columns"], json!(["n"]));
    assert!(audit::verify(&l.audit_records(0).unwrap(), l.audit_head().unwrap().as_ref(), &[(seq, hash)]).problems.is_empty());
    assert_eq!(l.history("b").unwrap()[0].receipt_id, receipt.id());

    // The collaboration's cap bounds all parties together.
    let capped = Limits { epsilon_cap: Some(2.5), ..Limits::epsilon(5.0) };
    let err = l.charge(&charge("c", 1.0), &capped).unwrap_err();
    assert!(err.to_string().contains("collaboration has only epsilon = 0.75 left of its cap of 2.5"), "{err}");
    assert_eq!(l.spent("c").unwrap(), 0.0);
    assert!((l.collaboration_totals().unwrap().epsilon - 1.75).abs() < 1e-9);

    // δ has its own budget and cap.
    let limits = Limits { delta_budget: 1e-6, delta_cap: Some(1.5e-6), ..Limits::epsilon(10.0) };
    let with_delta = |party: &str, delta: f64| Charge { delta, ..charge(party, 0.5) };
    let err = l.charge(&with_delta("d", 1e-7), &Limits::epsilon(10.0)).unwrap_err();
    assert!(err.to_string().contains("needs delta = 0.0000001"), "{err}");
    for _ in 0..10 {
        l.charge(&with_delta("d", 1e-7), &limits).unwrap();
    }
    let err = l.charge(&with_delta("d", 1e-7), &limits).unwrap_err();
    assert!(err.to_string().contains("has only delta = 0 left"), "{err}");
    assert!((l.spent_delta("d").unwrap() - 1e-6).abs() < 1e-15);
    assert!((l.spent("d").unwrap() - 5.0).abs() < 1e-9, "the refused charge took no epsilon");
    let err = l.charge(&with_delta("e", 6e-7), &limits).unwrap_err();
    assert!(err.to_string().contains("collaboration has only delta = 0.0000005 left"), "{err}");

    // A grant raises a party's budget (not the collaboration's cap), audited.
    let grant = Grant { party: "a".into(), epsilon: 0.5, delta: 0.0, reason: "renewal for Q4".into(), by: "ops".into() };
    let after = l.grant(&grant).unwrap();
    assert_eq!(after.granted_epsilon, 0.5);
    let r = l.charge(&charge("a", 0.5), &Limits::epsilon(1.0)).unwrap();
    assert_eq!(r.budget(), 1.5);
    assert!(r.remaining() < 1e-9, "{}", r.remaining());
    assert!(l.charge(&charge("a", 0.1), &Limits::epsilon(1.0)).is_err());
    let bad = Grant { epsilon: -1.0, ..grant.clone() };
    assert!(l.grant(&bad).unwrap_err().to_string().contains("positive epsilon"));
    let unexplained = Grant { reason: " ".into(), ..grant };
    assert!(l.grant(&unexplained).unwrap_err().to_string().contains("needs a reason"));

    // The manifest is recorded once per change.
    assert!(l.record_manifest("aa", "m.toml").unwrap());
    assert!(!l.record_manifest("aa", "m.toml").unwrap());
    assert!(l.record_manifest("bb", "m.toml").unwrap());

    // Other events; the whole log verifies and holds every kind once as expected.
    l.append_audit(&AuditEvent::new(Some("z"), audit::Event::AuthFailure { user: "z".into(), peer: String::new() })).unwrap();
    let v = verified(l);
    let kinds: Vec<String> = l.audit_records(0).unwrap().iter().map(|(_, b)| audit::parse(b).unwrap().kind).collect();
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!((count("query"), count("budget_grant"), count("manifest"), count("auth_failure")), (22, 1, 2, 1));
    assert_eq!(v.records as usize, kinds.len());

    // Released answers round-trip.
    assert_eq!(l.released_answer("k").unwrap(), None);
    l.keep_released_answer("k", b"bytes").unwrap();
    assert_eq!(l.released_answer("k").unwrap().as_deref(), Some(&b"bytes"[..]));
}

/// 200 charges from 4 parties at once, on budgets that admit exactly 10 per
/// party: exactly 40 are admitted, and no total exceeds its budget.
fn concurrent_charges(l: Arc<dyn Ledger>) {
    let admitted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let (l, admitted) = (l.clone(), admitted.clone());
            std::thread::spawn(move || {
                let party = format!("p{}", i % 4);
                match l.charge(&charge(&party, 0.1), &Limits::epsilon(1.0)) {
                    Ok(_) => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(LedgerError::Budget(cleanroom_ledger::BudgetRefusal::Party { .. })) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 40);
    for p in 0..4 {
        let party = format!("p{p}");
        assert!((l.spent(&party).unwrap() - 1.0).abs() < 1e-9, "{party}: {}", l.spent(&party).unwrap());
        assert_eq!(l.history(&party).unwrap().len(), 10);
    }
    verified(l.as_ref());
}

#[test]
fn redb_backend() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = RedbLedger::open(dir.path()).unwrap();
        suite(&l);
        // A second process cannot open it while it is in use.
        let err = RedbLedger::open(dir.path()).err().expect("the ledger is locked");
        assert!(err.to_string().contains("in use by another process"), "{err}");
    }
    let l = RedbLedger::open(dir.path()).unwrap();
    assert!((l.spent("a").unwrap() - 1.5).abs() < 1e-9, "survives reopening");
    verified(&l);
    let other = tempfile::tempdir().unwrap();
    concurrent_charges(Arc::new(RedbLedger::open(other.path()).unwrap()));
}

#[test]
fn etcd_backend_single_member() {
    let etcd = etcd::Etcd::start(1);
    suite(&EtcdLedger::connect(&etcd.endpoints(), "/suite").unwrap());
    // Keys are namespaced: another prefix starts empty.
    let other = EtcdLedger::connect(&etcd.endpoints(), "/other/").unwrap();
    assert_eq!(other.spent("a").unwrap(), 0.0);
    assert!(other.audit_head().unwrap().is_none());
    concurrent_charges(Arc::new(other));
}

#[test]
fn etcd_backend_three_members() {
    let etcd = etcd::Etcd::start(3);
    suite(&EtcdLedger::connect(&etcd.endpoints(), "/cleanroom/").unwrap());
    // Two gateways on the same etcd: their compare-and-swap keeps the totals exact.
    let a: Arc<dyn Ledger> = Arc::new(EtcdLedger::connect(&etcd.endpoints(), "/shared/").unwrap());
    let b: Arc<dyn Ledger> = Arc::new(EtcdLedger::connect(&etcd.endpoints(), "/shared/").unwrap());
    let threads: Vec<_> = (0..60)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || l.charge(&charge("p", 0.1), &Limits::epsilon(3.0)).is_ok())
        })
        .collect();
    let admitted = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(admitted, 30);
    assert!((a.spent("p").unwrap() - 3.0).abs() < 1e-9);
    verified(b.as_ref());
}

/// A member lost mid-stream changes nothing; all lost: every charge fails
/// with `LedgerUnavailable` within the deadline and none is recorded; back
/// up: charges go on without reconnecting by hand.
#[test]
fn etcd_members_lost_and_back() {
    let mut etcd = etcd::Etcd::start(3);
    let l = EtcdLedger::connect(&etcd.endpoints(), "/faults/").unwrap();
    let limits = Limits::epsilon(1000.0);
    for i in 0..40 {
        if i == 20 {
            etcd.kill(1);
        }
        l.charge(&charge("a", 1.0), &limits).unwrap_or_else(|e| panic!("charge {i} with a member down: {e}"));
    }
    for i in 0..3 {
        etcd.kill(i);
    }
    let started = Instant::now();
    for _ in 0..3 {
        match l.charge(&charge("a", 1.0), &limits) {
            Err(LedgerError::Unavailable(m)) => assert!(m.contains("did not answer"), "{m}"),
            other => panic!("expected the ledger to be unreachable, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    for i in 0..3 {
        etcd.restart(i);
    }
    etcd.wait_all_healthy();
    l.charge(&charge("a", 1.0), &limits).expect("charges resume once etcd is back");
    assert_eq!(l.spent("a").unwrap(), 41.0, "no charge was recorded while etcd was down");
    assert_eq!(l.history("a").unwrap().len(), 41);
    verified(&l);
}

/// Tampering with the stored log, through each backend's own storage, is caught.
#[test]
fn tampering_is_detected_in_both_stores() {
    // redb: edit record 2's body in place.
    let dir = tempfile::tempdir().unwrap();
    {
        let l = RedbLedger::open(dir.path()).unwrap();
        for i in 0..4 {
            l.append_audit(&AuditEvent::new(Some("a"), audit::Event::Auth { peer: format!("10.0.0.{i}") })).unwrap();
        }
    }
    {
        let db = redb::Database::open(dir.path().join("ledger.redb")).unwrap();
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit_log");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            let edited = String::from_utf8(t.get(2).unwrap().unwrap().value().to_vec()).unwrap().replace("10.0.0.1", "10.0.0.5");
            t.insert(2, edited.as_bytes()).unwrap();
            t.remove(4).unwrap();
        }
        txn.commit().unwrap();
    }
    let l = RedbLedger::open(dir.path()).unwrap();
    let v = audit::verify(&l.audit_records(0).unwrap(), l.audit_head().unwrap().as_ref(), &[]);
    assert_eq!(v.problems.len(), 2, "{:?}", v.problems);
    assert!(v.problems[0].starts_with("record 2 was edited"), "{:?}", v.problems);
    assert!(v.problems[1].starts_with("record 4 was removed from the end"), "{:?}", v.problems);

    // etcd: swap two records.
    let etcd = etcd::Etcd::start(1);
    let l = EtcdLedger::connect(&etcd.endpoints(), "/t/").unwrap();
    for i in 0..4 {
        l.append_audit(&AuditEvent::new(Some("a"), audit::Event::Auth { peer: format!("10.0.0.{i}") })).unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
        let key = |s: u64| format!("/t/audit/log/{s:020}");
        let one = c.get(key(1), None).await.unwrap().kvs()[0].value().to_vec();
        let three = c.get(key(3), None).await.unwrap().kvs()[0].value().to_vec();
        c.put(key(1), three, None).await.unwrap();
        c.put(key(3), one, None).await.unwrap();
    });
    let v = audit::verify(&l.audit_records(0).unwrap(), l.audit_head().unwrap().as_ref(), &[]);
    assert!(v.problems.iter().any(|p| p.starts_with("record 1 holds the record numbered 3")), "{:?}", v.problems);
    assert!(v.problems.iter().any(|p| p.starts_with("record 3 holds the record numbered 1")), "{:?}", v.problems);
}
