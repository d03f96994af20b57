//! The cluster ledger on etcd. Every write is one etcd transaction that
//! compares the `mod_revision` of each key it read (the party's totals, the
//! collaboration's totals, the audit head) and, only if none changed, writes
//! the new totals, the charge record and the audit record together. etcd
//! commits a transaction on a quorum of members before it answers, so a
//! returned charge survives the loss of any minority of members and a
//! `kill -9` of the gateway.
//!
//! Keys, under the prefix (default `/cleanroom/`):
//! `totals/<party>`, `collaboration` (JSON [`Totals`]),
//! `charges/<party>/<time>/<receipt>` (JSON [`ChargeRecord`]),
//! `audit/log/<seq>` and `audit/head` (see [`crate::audit`]),
//! `meta/manifest_sha256`, `answers/<key>` (released answers),
//! `ops/<id>` (the outcome of each grant and audit append, for retries).
//!
//! Retrying: a write whose outcome is unknown (a timeout, a member lost
//! mid-request) is retried until a deadline. The charge's receipt id is fixed
//! before the first attempt and every attempt requires that no charge with it
//! exists yet, so a retry after a write that did commit finds that charge and
//! returns its receipt instead of charging again. Grants and audit appends
//! do the same with an `ops/<id>` key.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::{admit, charge_event, charge_record, check_charge, manifest_event, new_receipt_id, now_secs, Charge, ChargeRecord, Grant, Ledger, Limits, Receipt, Totals};
use crate::audit::{self, AuditEvent, AuditHead};
use crate::error::{LedgerError, Result};

/// Each etcd request gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// An operation (with its retries) gives up after this long.
const DEADLINE: Duration = Duration::from_secs(6);
/// Released answers larger than this are not kept (etcd's request limit is
/// 1.5 MiB); asking again then pays again.
const MAX_KEPT_ANSWER: usize = 1 << 20;
/// Keys read per request when listing.
const PAGE: i64 = 1000;

/// The etcd ledger.
pub struct EtcdLedger {
    /// The ledger's own I/O runtime, so callers need not be async.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    endpoints: String,
    /// Writes from this process go one at a time (other processes are kept
    /// out by the compare-and-swap); without it, concurrent charges would
    /// mostly fail their compares and retry.
    writes: Mutex<()>,
}

/// Why one attempt did not finish.
enum Attempt {
    /// etcd did not answer: retry until the deadline.
    Etcd(etcd_client::Error),
    /// A final answer (a refusal, an unreadable value).
    Final(LedgerError),
}

impl From<etcd_client::Error> for Attempt {
    fn from(e: etcd_client::Error) -> Self {
        use tonic::Code;
        match &e {
            // etcd refused the request itself: retrying cannot help.
            etcd_client::Error::GRpcStatus(s)
                if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated) =>
            {
                Attempt::Final(LedgerError::Storage(format!("etcd refused the request: {}", s.message())))
            }
            _ => Attempt::Etcd(e),
        }
    }
}

impl From<LedgerError> for Attempt {
    fn from(e: LedgerError) -> Self {
        Attempt::Final(e)
    }
}

/// Retries `attempt` (None = a compare failed: another writer got in first)
/// until it finishes or the deadline passes.
async fn retry<T, F, Fut>(endpoints: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, Attempt>>,
{
    let deadline = Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(50);
    loop {
        let last = match attempt().await {
            Ok(Some(done)) => return Ok(done),
            Ok(None) => {
                // Another gateway wrote first: try again shortly, within the deadline.
                if Instant::now() > deadline {
                    return Err(LedgerError::Unavailable(format!(
                        "etcd at {endpoints}: other writers kept changing the ledger for {} s",
                        DEADLINE.as_secs()
                    )));
                }
                let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 1..20);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                continue;
            }
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Etcd(e)) => e,
        };
        if Instant::now() + pause > deadline {
            return Err(LedgerError::Unavailable(format!(
                "etcd at {endpoints} did not answer for {} s ({last})",
                DEADLINE.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(800));
    }
}

/// One value and its mod_revision (0 if the key does not exist).
type Read = Option<(Vec<u8>, i64)>;

fn revision(read: &Read) -> i64 {
    read.as_ref().map(|(_, r)| *r).unwrap_or(0)
}

fn value(read: &Read) -> Option<&[u8]> {
    read.as_ref().map(|(v, _)| v.as_slice())
}

/// Read `keys` at one revision.
async fn read(client: &mut Client, keys: &[&String]) -> std::result::Result<Vec<Read>, etcd_client::Error> {
    let txn = Txn::new().and_then(keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect::<Vec<_>>());
    let response = client.txn(txn).await?;
    Ok(response
        .op_responses()
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        })
        .collect())
}

fn unchanged(key: &str, read: &Read) -> Compare {
    Compare::mod_revision(key, CompareOp::Equal, revision(read))
}

fn head_of(read: &Read) -> Result<AuditHead> {
    value(read).map(AuditHead::from_bytes).transpose().map(Option::unwrap_or_default)
}

/// Puts that append `sealed` after the head it was sealed on.
fn append_ops(keys: &Keys, sealed: &audit::Sealed) -> [TxnOp; 2] {
    [
        TxnOp::put(keys.audit(sealed.seq), sealed.bytes.clone(), None),
        TxnOp::put(keys.head(), sealed.head.to_bytes(), None),
    ]
}

/// Key names under the prefix.
#[derive(Clone)]
struct Keys(String);

impl Keys {
    fn totals(&self, party: &str) -> String {
        format!("{}totals/{party}", self.0)
    }
    fn collaboration(&self) -> String {
        format!("{}collaboration", self.0)
    }
    fn charges(&self, party: &str) -> String {
        format!("{}charges/{party}/", self.0)
    }
    fn charge(&self, party: &str, at: u64, id: &str) -> String {
        format!("{}charges/{party}/{at:020}/{id}", self.0)
    }
    fn audit_prefix(&self) -> String {
        format!("{}audit/log/", self.0)
    }
    fn audit(&self, seq: u64) -> String {
        format!("{}audit/log/{seq:020}", self.0)
    }
    fn head(&self) -> String {
        format!("{}audit/head", self.0)
    }
    fn manifest(&self) -> String {
        format!("{}meta/manifest_sha256", self.0)
    }
    fn answer(&self, key: &str) -> String {
        format!("{}answers/{key}", self.0)
    }
    /// The outcome of a write that is not a charge (a grant, an audit
    /// record), under an id fixed before its first attempt.
    fn op(&self, id: &str) -> String {
        format!("{}ops/{id}", self.0)
    }
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The sequence number of an audit record's key.
fn seq_of(prefix: &str, key: &[u8]) -> std::result::Result<u64, LedgerError> {
    key.get(prefix.len()..)
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| unreadable("audit key", String::from_utf8_lossy(key)))
}

/// All (key, value) pairs from `from` (inclusive) up to `end`, in key order, a page at a time.
async fn scan(client: &mut Client, from: String, end: Vec<u8>) -> std::result::Result<Vec<(Vec<u8>, Vec<u8>)>, etcd_client::Error> {
    scan_at(client, from, end, 0).await
}

/// As [`scan`], every page read at `revision` (0: the latest of each page).
async fn scan_at(client: &mut Client, from: String, end: Vec<u8>, revision: i64) -> std::result::Result<Vec<(Vec<u8>, Vec<u8>)>, etcd_client::Error> {
    let mut out = Vec::new();
    let mut start = from.into_bytes();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let response = client.get(start.clone(), Some(options)).await?;
        let kvs = response.kvs();
        for kv in kvs {
            out.push((kv.key().to_vec(), kv.value().to_vec()));
        }
        match kvs.last() {
            Some(last) if kvs.len() as i64 == PAGE => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

fn unreadable(what: &str, e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("unreadable {what} in etcd: {e}"))
}

impl EtcdLedger {
    /// Connect to etcd at `endpoints` (`http://host:port`, comma-separated or
    /// several) and check that it answers. `prefix` namespaces the keys.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(LedgerError::Storage("no etcd endpoints given (expected --etcd http://host:2379,…)".into()));
        }
        let prefix = if prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-ledger")
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Storage(format!("cannot start the ledger's I/O thread: {e}")))?;
        let shown = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        // Connected on the ledger's runtime and waited for on a channel (not
        // `block_on`), so this may be called from anywhere, async code included.
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(Client::connect(endpoints, Some(options)).await);
        });
        let client = match rx.recv() {
            Ok(Ok(client)) => client,
            failed => {
                // Not dropped in place: that would panic when called from async code.
                runtime.shutdown_background();
                return Err(match failed {
                    Ok(Err(e)) => LedgerError::Unavailable(format!("cannot connect to etcd at {shown}: {e}")),
                    _ => LedgerError::Storage("the ledger's I/O thread stopped".into()),
                });
            }
        };
        let ledger = EtcdLedger { runtime: Some(runtime), client, prefix, endpoints: shown, writes: Mutex::new(()) };
        // Fails (after the deadline) if no member answers.
        ledger.audit_head()?;
        Ok(ledger)
    }

    fn keys(&self) -> Keys {
        Keys(self.prefix.clone())
    }

    /// Run `work` (given a client and the key names) on the ledger's runtime,
    /// with retries, and wait for it.
    fn run<T, F, Fut>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(Client, Keys) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, Attempt>> + Send,
    {
        let (client, keys, endpoints) = (self.client.clone(), self.keys(), self.endpoints.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut work = work;
        self.runtime
            .as_ref()
            .expect("the ledger's runtime runs until it is dropped")
            .spawn(async move {
                let result = retry(&endpoints, || work(client.clone(), keys.clone())).await;
                let _ = tx.send(result);
            });
        rx.recv().map_err(|_| LedgerError::Storage("the ledger's I/O thread stopped".into()))?
    }

    fn write<T, F, Fut>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(Client, Keys) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, Attempt>> + Send,
    {
        let _one_at_a_time = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.run(work)
    }

    fn read_totals(&self, key: String) -> Result<Totals> {
        self.run(move |mut client, _| {
            let key = key.clone();
            async move {
                let r = read(&mut client, &[&key]).await?;
                Ok(Some(Totals::from_bytes(value(&r[0]))?))
            }
        })
    }
}

impl Drop for EtcdLedger {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Ledger for EtcdLedger {
    fn describe(&self) -> String {
        format!("the etcd ledger at {} (prefix {})", self.endpoints, self.prefix)
    }

    fn charge(&self, charge: &Charge, limits: &Limits) -> Result<Receipt> {
        check_charge(charge)?;
        let (id, at) = (new_receipt_id(), now_secs());
        let (charge, limits) = (charge.clone(), *limits);
        self.write(move |mut client, keys| {
            let (charge, id) = (charge.clone(), id.clone());
            async move {
                let (party_key, all_key, head_key) = (keys.totals(&charge.party), keys.collaboration(), keys.head());
                let charge_key = keys.charge(&charge.party, at, &id);
                let snapshot = read(&mut client, &[&party_key, &all_key, &head_key, &charge_key]).await?;
                if let Some(bytes) = value(&snapshot[3]) {
                    // An earlier attempt committed but its reply was lost.
                    let record: ChargeRecord = serde_json::from_slice(bytes).map_err(|e| unreadable("charge record", e))?;
                    return Ok(Some(Receipt::from_record(&charge.party, &record)));
                }
                let party = Totals::from_bytes(value(&snapshot[0]))?;
                let all = Totals::from_bytes(value(&snapshot[1]))?;
                // Parties may collude, so the collaboration's totals are
                // checked too (see the module documentation of `ledger`).
                let (party_after, all_after) = admit(&charge, &limits, party, all)?;
                let sealed = audit::seal(&head_of(&snapshot[2])?, &charge_event(&charge, &id), audit::now_ms());
                let record = charge_record(&charge, &limits, &party_after, &id, at, &sealed.head);
                let record_json = serde_json::to_vec(&record).map_err(|e| unreadable("charge record", e))?;
                let [audit_put, head_put] = append_ops(&keys, &sealed);
                let txn = Txn::new()
                    .when(vec![
                        unchanged(&party_key, &snapshot[0]),
                        unchanged(&all_key, &snapshot[1]),
                        unchanged(&head_key, &snapshot[2]),
                        Compare::version(charge_key.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then(vec![
                        TxnOp::put(party_key, party_after.to_bytes(), None),
                        TxnOp::put(all_key, all_after.to_bytes(), None),
                        TxnOp::put(charge_key, record_json, None),
                        audit_put,
                        head_put,
                    ]);
                let committed = client.txn(txn).await?.succeeded();
                Ok(committed.then(|| Receipt::from_record(&charge.party, &record)))
            }
        })
    }

    fn totals(&self, party: &str) -> Result<Totals> {
        self.read_totals(self.keys().totals(party))
    }

    fn collaboration_totals(&self) -> Result<Totals> {
        self.read_totals(self.keys().collaboration())
    }

    fn grant(&self, grant: &Grant) -> Result<Totals> {
        grant.check()?;
        let (grant, id) = (grant.clone(), new_receipt_id());
        self.write(move |mut client, keys| {
            let (grant, op_key) = (grant.clone(), keys.op(&id));
            async move {
                let (party_key, head_key) = (keys.totals(&grant.party), keys.head());
                let snapshot = read(&mut client, &[&party_key, &head_key, &op_key]).await?;
                if let Some(done) = value(&snapshot[2]) {
                    // An earlier attempt committed but its reply was lost.
                    return Ok(Some(Totals::from_bytes(Some(done))?));
                }
                let after = grant.apply(Totals::from_bytes(value(&snapshot[0]))?);
                let sealed = audit::seal(&head_of(&snapshot[1])?, &grant.event(&after), audit::now_ms());
                let [audit_put, head_put] = append_ops(&keys, &sealed);
                let txn = Txn::new()
                    .when(vec![
                        unchanged(&party_key, &snapshot[0]),
                        unchanged(&head_key, &snapshot[1]),
                        Compare::version(op_key.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then(vec![
                        TxnOp::put(party_key, after.to_bytes(), None),
                        audit_put,
                        head_put,
                        TxnOp::put(op_key, after.to_bytes(), None),
                    ]);
                Ok(client.txn(txn).await?.succeeded().then_some(after))
            }
        })
    }

    fn history(&self, party: &str) -> Result<Vec<ChargeRecord>> {
        let party = party.to_string();
        self.run(move |mut client, keys| {
            let prefix = keys.charges(&party);
            async move {
                let end = prefix_end(&prefix);
                let mut records = Vec::new();
                for (_, v) in scan(&mut client, prefix, end).await? {
                    records.push(serde_json::from_slice(&v).map_err(|e| unreadable("charge record", e))?);
                }
                Ok(Some(records))
            }
        })
    }

    fn released_answer(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.run(move |mut client, keys| {
            let key = keys.answer(&key);
            async move { Ok(Some(read(&mut client, &[&key]).await?.remove(0).map(|(v, _)| v))) }
        })
    }

    fn keep_released_answer(&self, key: &str, answer: &[u8]) -> Result<()> {
        if answer.len() > MAX_KEPT_ANSWER {
            return Err(LedgerError::Storage(format!("a released answer of {} bytes is too large to keep in etcd", answer.len())));
        }
        let (key, answer) = (key.to_string(), answer.to_vec());
        self.run(move |mut client, keys| {
            let (key, answer) = (keys.answer(&key), answer.clone());
            async move {
                client.put(key, answer, None).await?;
                Ok(Some(()))
            }
        })
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<AuditHead> {
        let (event, id) = (event.clone(), new_receipt_id());
        self.write(move |mut client, keys| {
            let (event, op_key) = (event.clone(), keys.op(&id));
            async move {
                let head_key = keys.head();
                let snapshot = read(&mut client, &[&head_key, &op_key]).await?;
                if let Some(done) = value(&snapshot[1]) {
                    // An earlier attempt committed but its reply was lost.
                    return Ok(Some(AuditHead::from_bytes(done)?));
                }
                let sealed = audit::seal(&head_of(&snapshot[0])?, &event, audit::now_ms());
                let mut ops = append_ops(&keys, &sealed).to_vec();
                ops.push(TxnOp::put(op_key.clone(), sealed.head.to_bytes(), None));
                let txn = Txn::new()
                    .when(vec![unchanged(&head_key, &snapshot[0]), Compare::version(op_key.as_str(), CompareOp::Equal, 0)])
                    .and_then(ops);
                Ok(client.txn(txn).await?.succeeded().then_some(sealed.head))
            }
        })
    }

    fn record_manifest(&self, sha256: &str, path: &str) -> Result<bool> {
        let (sha256, path) = (sha256.to_string(), path.to_string());
        self.write(move |mut client, keys| {
            let (sha256, path) = (sha256.clone(), path.clone());
            async move {
                let (head_key, manifest_key) = (keys.head(), keys.manifest());
                let snapshot = read(&mut client, &[&head_key, &manifest_key]).await?;
                let previous = value(&snapshot[1]).map(|v| String::from_utf8_lossy(v).into_owned());
                if previous.as_deref() == Some(sha256.as_str()) {
                    return Ok(Some(false));
                }
                let event = manifest_event(&sha256, previous.as_deref(), &path);
                let sealed = audit::seal(&head_of(&snapshot[0])?, &event, audit::now_ms());
                let mut ops = append_ops(&keys, &sealed).to_vec();
                ops.push(TxnOp::put(manifest_key.clone(), sha256.clone(), None));
                let txn = Txn::new()
                    .when(vec![unchanged(&head_key, &snapshot[0]), unchanged(&manifest_key, &snapshot[1])])
                    .and_then(ops);
                Ok(client.txn(txn).await?.succeeded().then_some(true))
            }
        })
    }

    fn audit_records(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.run(move |mut client, keys| async move {
            let prefix = keys.audit_prefix();
            let mut out = Vec::new();
            for (k, v) in scan(&mut client, keys.audit(from), prefix_end(&prefix)).await? {
                out.push((seq_of(&prefix, &k)?, v));
            }
            Ok(Some(out))
        })
    }

    fn audit_log(&self) -> Result<(Vec<(u64, Vec<u8>)>, Option<AuditHead>)> {
        self.run(move |mut client, keys| async move {
            // The head and every record as of one revision.
            let response = client.get(keys.head(), None).await?;
            let revision = response.header().map(|h| h.revision()).unwrap_or(0);
            let head = response.kvs().first().map(|kv| AuditHead::from_bytes(kv.value())).transpose()?;
            let prefix = keys.audit_prefix();
            let mut out = Vec::new();
            for (k, v) in scan_at(&mut client, keys.audit(0), prefix_end(&prefix), revision).await? {
                out.push((seq_of(&prefix, &k)?, v));
            }
            Ok(Some((out, head)))
        })
    }

    fn audit_head(&self) -> Result<Option<AuditHead>> {
        self.run(move |mut client, keys| async move {
            let r = read(&mut client, &[&keys.head()]).await?;
            Ok(Some(value(&r[0]).map(AuditHead::from_bytes).transpose()?))
        })
    }
}
