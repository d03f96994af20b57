//! The Flight SQL gateway: the only door a party has into the clean room.
//!
//! Each Flight SQL command has one handler here. A party authenticates with
//! HTTP Basic credentials in the handshake and gets a Bearer token back; every
//! other call must carry that token and acts as that party. Statements are
//! planned (and refused) in `GetFlightInfo` and in prepared-statement
//! creation, which cost nothing; they are charged and executed only in
//! `DoGet`, where the DP planner's release path produces the answer. A ticket
//! names a statement planned in one session and is resolved only in that
//! session, once.
//!
//! Nothing a party receives comes from protected data except through
//! [`cleanroom_dp::release::Released`]: refusals are planning errors that
//! depend on the SQL and the manifest only, and a failure during execution is
//! reported without its cause (which could depend on data) and logged here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetCrossReference, CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementIngest, CommandStatementQuery, CommandStatementUpdate,
    DoPutPreparedStatementResult, Nullable, ProstMessageExt, Searchable, SqlInfo,
    TicketStatementQuery, XdbcDataType,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine as _;
use cleanroom_ledger::audit::{Event, UploadEvent};
use cleanroom_ledger::{Ledger, Limits};
use cleanroom_dp::options::{QueryOptions, OPTION_NAMES};
use cleanroom_dp::policy::Policy;
use cleanroom_dp::release::{self, Released};
use cleanroom_dp::rewrite::{PlannedQuery, SYSTEM_SCHEMA};
use cleanroom_dp::DpError;
use cleanroom_proto::v1::statement_handle::Kind;
use cleanroom_proto::StatementHandle;
use datafusion::prelude::SessionContext;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use cleanroom_storage::catalog::{Catalog, CATALOG};
use crate::engine::Engine;
use crate::ingest;
use cleanroom_storage::upload::{self, IngestError, Refusal};
use crate::metrics::{Metrics, Outcome};
use crate::pipeline::{Ask, Failure, Pipeline, QueryError, Served};
use crate::system_tables::SystemSchema;

type DoGetStream = <FlightSqlGateway as FlightService>::DoGetStream;

/// Response headers of an answer: its receipt id, and its audit record.
pub const RECEIPT_HEADER: &str = "x-cleanroom-receipt";
pub const AUDIT_RECORD_HEADER: &str = "x-cleanroom-audit-record";

/// One authenticated connection of a party.
pub(crate) struct Session {
    party: String,
    /// When the session was last used; idle sessions expire.
    last_used: Mutex<Instant>,
    policy: Policy,
    /// A Ballista client session with only this party's datasets registered.
    ctx: SessionContext,
    /// Options set with `SET cleanroom.<name> = <value>`.
    options: Mutex<QueryOptions>,
    /// Statements planned by GetFlightInfo (with their SQL text), waiting
    /// for their DoGet.
    /// The data versions the statement was planned on go with it.
    pending: Mutex<HashMap<String, (Instant, (String, Arc<PlannedQuery>, String))>>,
    /// Prepared statements: handle → SQL.
    prepared: Mutex<HashMap<String, (Instant, String)>>,
}

impl Session {
    /// Unused for longer than the idle timeout.
    fn expired(&self) -> bool {
        self.last_used.lock().expect("session clock").elapsed() > SESSION_IDLE_TIMEOUT
    }

    /// The session's options with `name` set to `value`, checked.
    #[allow(clippy::result_large_err)]
    fn with_option(&self, name: &str, value: &str) -> Result<QueryOptions, DpError> {
        let mut options = self.options.lock().expect("options lock").clone();
        options.set(name, value)?;
        options.resolve(&self.policy.defaults)?;
        Ok(options)
    }

    #[allow(clippy::result_large_err)]
    pub(crate) fn set_option(&self, name: &str, value: &str) -> Result<(), Status> {
        let options = self.with_option(name, value).map_err(dp_status)?;
        *self.options.lock().expect("options lock") = options;
        Ok(())
    }

    /// Reset one option to its default.
    #[allow(clippy::result_large_err)]
    pub(crate) fn unset_option(&self, name: &str) -> Result<(), Status> {
        self.options.lock().expect("options lock").unset(name).map_err(dp_status)
    }

    /// The options set in this session.
    pub(crate) fn options(&self) -> QueryOptions {
        self.options.lock().expect("options lock").clone()
    }

    /// The SQL of this session's prepared statement `handle`.
    #[allow(clippy::result_large_err)]
    fn prepared_sql(&self, handle: &[u8]) -> Result<String, Status> {
        let id = decode_handle(handle, Kind::Prepared)?;
        self.prepared
            .lock()
            .expect("prepared lock")
            .get(&id)
            .map(|(_, sql)| sql.clone())
            .ok_or_else(|| Status::not_found("no such prepared statement in this session"))
    }

    /// Forget the planned statement of a ticket's `handle`, if it is still
    /// waiting for its DoGet; whether it was.
    pub(crate) fn forget_pending(&self, handle: &[u8]) -> bool {
        let Ok(id) = decode_handle(handle, Kind::Query) else { return false };
        self.pending.lock().expect("pending lock").remove(&id).is_some()
    }
}

/// Request headers that carry privacy options, one per option:
/// `x-cleanroom-epsilon: 0.5`, `x-cleanroom-max-groups-contributed: 3`
/// (dashes or underscores). BI tools send a connection string's extra
/// properties as such headers on every call, so a connection can fix its
/// options; a `SET`, session options and a query's own options override them.
pub const OPTION_HEADER_PREFIX: &str = "x-cleanroom-";

/// The options the request's headers give.
#[allow(clippy::result_large_err)]
fn header_options(headers: &tonic::metadata::MetadataMap) -> Result<QueryOptions, DpError> {
    let mut options = QueryOptions::default();
    for key in headers.keys() {
        let tonic::metadata::KeyRef::Ascii(key) = key else { continue };
        let Some(name) = key.as_str().strip_prefix(OPTION_HEADER_PREFIX) else { continue };
        // The answer's own headers, if a client echoes them.
        if key.as_str() == RECEIPT_HEADER || key.as_str() == AUDIT_RECORD_HEADER {
            continue;
        }
        if headers.get_all(key.as_str()).iter().count() > 1 {
            return Err(DpError::InvalidOption { option: name.to_string(), detail: format!("the header {key} is given more than once") });
        }
        let value = headers.get(key.as_str()).and_then(|v| v.to_str().ok()).ok_or_else(|| DpError::InvalidOption {
            option: name.to_string(),
            detail: format!("the header {key} is not text"),
        })?;
        options.set(&name.replace('-', "_"), value)?;
    }
    Ok(options)
}

/// A session unused this long expires; its client must authenticate again.
const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(8 * 3600);
/// Statements planned but not yet fetched, per session: past this, the oldest
/// is forgotten (it was never charged), so a client cannot grow the server's
/// memory without bound.
const MAX_PENDING_PER_SESSION: usize = 1024;
/// Prepared statements per session, likewise.
const MAX_PREPARED_PER_SESSION: usize = 1024;

/// Insert into a bounded map of statements, forgetting the oldest when full.
fn insert_bounded<V>(map: &mut HashMap<String, (Instant, V)>, limit: usize, key: String, value: V) {
    if map.len() >= limit {
        if let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
    map.insert(key, (Instant::now(), value));
}

/// What a statement turned out to be.
enum Statement {
    /// `SET cleanroom.<option> = <value>`, checked; applied to the session
    /// when executed, with no result.
    Set { name: String, value: String },
    Query(PlannedQuery),
}

#[derive(Clone)]
pub struct FlightSqlGateway {
    catalog: Arc<Catalog>,
    pipeline: Pipeline,
    sessions: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    target_partitions: usize,
    metrics: Arc<Metrics>,
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    hex::encode(bytes)
}

fn encode_handle(id: &str, kind: Kind) -> Vec<u8> {
    StatementHandle { id: id.to_string(), kind: kind as i32 }.encode_to_vec()
}

fn decode_handle(bytes: &[u8], kind: Kind) -> Result<String, Status> {
    let handle = StatementHandle::decode(bytes)
        .map_err(|_| Status::invalid_argument("malformed statement handle"))?;
    if handle.kind != kind as i32 {
        return Err(Status::invalid_argument("statement handle of the wrong kind"));
    }
    Ok(handle.id)
}

/// The request's Bearer token (from the handshake).
#[allow(clippy::result_large_err)]
fn bearer_token<T>(request: &Request<T>) -> Result<&str, Status> {
    request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no credentials: authenticate with the Flight SQL handshake first"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?
        .strip_prefix("Bearer ")
        .ok_or_else(|| Status::unauthenticated("expected a Bearer token from the handshake"))
}

/// Map a planner or ledger error to a gRPC status a party may see.
fn dp_status(e: impl Into<DpError>) -> Status {
    let e = e.into();
    match e {
        DpError::Refused { .. } | DpError::InvalidOption { .. } | DpError::Plan(_) | DpError::Sql(_) => {
            Status::invalid_argument(e.to_string())
        }
        DpError::Budget(_) => {
            Status::resource_exhausted(e.to_string())
        }
        DpError::LedgerUnavailable(_) => {
            warn!(error = %e, "ledger unreachable");
            Status::unavailable(format!(
                "{e}: the request was not carried out and nothing was answered; try again when the ledger is back (a charge that may have reached it is kept)"
            ))
        }
        DpError::Mechanism(_) => {
            // Not the text: a mechanism error may quote the exact result.
            warn!("release failed in a noise mechanism");
            Status::internal("the answer could not be released; any charge made for it is kept")
        }
        DpError::Ledger(_) => {
            warn!(error = %e, "release failed");
            Status::internal("the answer could not be released; any charge made for it is kept")
        }
    }
}

/// Run blocking work (ledger I/O, argon2, OpenDP sampling) off the async
/// runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("background task failed: {e}")))
}

fn schema_only_info(schema: &Schema, ticket: Vec<u8>, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor))
}

fn batches_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> DoGetStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Box::pin(stream)
}

/// Record a refusal by `rule` on the audit log (for `sql`, or an upload of
/// `upload`) and in the metrics, then return its status — or the ledger's
/// error: a refusal that could not be recorded is not returned as one.
async fn refuse(pipeline: &Pipeline, metrics: &Metrics, party: &str, rule: &str, sql: Option<&str>, upload: Option<&str>, status: Status) -> Status {
    metrics.refusal(rule);
    match pipeline.refused(party, rule, status.message(), sql, upload).await {
        Ok(()) => status,
        Err(e) => dp_status(e),
    }
}

/// Audit a refused upload, then return its status (or the ledger's error).
async fn upload_refused(pipeline: &Pipeline, metrics: &Metrics, party: &str, dataset: &str, refusal: Refusal) -> Status {
    // Bounded: the name is what the client sent.
    let dataset: String = dataset.chars().take(128).collect();
    refuse(pipeline, metrics, party, refusal.rule, None, Some(&dataset), ingest::refusal_status(&refusal)).await
}

impl FlightSqlGateway {
    /// Durably append `event` to the audit log. An action whose record cannot
    /// be written does not happen: the caller returns this error instead.
    async fn audit(&self, party: Option<&str>, event: Event) -> Result<(), Status> {
        self.pipeline.audit(party, event).await.map_err(dp_status)
    }

    /// Audit a refusal of `sql`, then return it (or the ledger's error).
    async fn refused(&self, session: &Session, sql: &str, rule: &str, status: Status) -> Status {
        self.metrics.query(Outcome::Refused);
        refuse(&self.pipeline, &self.metrics, &session.party, rule, Some(sql), None, status).await
    }

    pub fn new(catalog: Arc<Catalog>, engine: Arc<dyn Engine>, ledger: Arc<dyn Ledger>, target_partitions: usize) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new(catalog.manifest.clone(), engine.clone(), ledger.clone())?);
        let pipeline = Pipeline::new(ledger, engine);
        Ok(FlightSqlGateway {
            catalog,
            pipeline,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            target_partitions,
            metrics,
        })
    }

    /// The gateway's metrics, for the metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The session of the request's Bearer token.
    #[allow(clippy::result_large_err)]
    pub(crate) fn session<T>(&self, request: &Request<T>) -> Result<Arc<Session>, Status> {
        let token = bearer_token(request)?;
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown or expired token: authenticate again"))?;
        if session.expired() {
            sessions.remove(token);
            return Err(Status::unauthenticated("unknown or expired token: authenticate again"));
        }
        *session.last_used.lock().expect("session clock") = Instant::now();
        Ok(session)
    }

    /// End the request's session: its token, statements and options are
    /// forgotten.
    #[allow(clippy::result_large_err)]
    pub(crate) fn close_session<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let session = self.session(request)?;
        self.sessions.lock().expect("sessions lock").remove(bearer_token(request)?);
        info!(party = %session.party, "session closed");
        Ok(())
    }

    /// The schema `sql` would answer with in the request's session, planned
    /// (and refused) as GetFlightInfo plans it; nothing is registered and a
    /// SET is not applied.
    pub(crate) async fn statement_schema_of<T>(&self, request: &Request<T>, sql: &str) -> Result<Schema, Status> {
        let session = self.session(request)?;
        statement_schema(&self.plan(&session, sql, request.metadata()).await?)
    }

    /// Likewise for a prepared statement of the session.
    pub(crate) async fn prepared_schema_of<T>(&self, request: &Request<T>, handle: &[u8]) -> Result<Schema, Status> {
        let session = self.session(request)?;
        let sql = session.prepared_sql(handle)?;
        statement_schema(&self.plan(&session, &sql, request.metadata()).await?)
    }

    async fn open_session(&self, party: &str) -> Result<Session, Status> {
        let state = cleanroom_executor::session_state(self.target_partitions);
        let ctx = self
            .pipeline
            .engine
            .context(state)
            .await
            .map_err(|e| Status::internal(format!("cannot open a session: {e}")))?;
        for udf in cleanroom_dp::udf::all() {
            ctx.register_udf(udf.as_ref().clone());
        }
        self.catalog
            .register_for(party, &ctx)
            .map_err(|e| Status::internal(format!("cannot open a session: {e}")))?;
        let (budget, delta_budget) =
            self.catalog.manifest.party(party).map(|p| (p.epsilon_budget, p.delta_budget)).unwrap_or((0.0, 0.0));
        ctx.catalog(CATALOG)
            .ok_or_else(|| Status::internal("the session has no catalog"))?
            .register_schema(SYSTEM_SCHEMA, Arc::new(SystemSchema::new(party, budget, delta_budget, self.pipeline.ledger.clone())))
            .map_err(|e| Status::internal(format!("cannot open a session: {e}")))?;
        Ok(Session {
            party: party.to_string(),
            policy: self.catalog.manifest.policy_for(party),
            ctx,
            options: Mutex::new(QueryOptions::default()),
            pending: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Plan `sql` for `session` with the options of the request's `headers`:
    /// parse, check and rewrite. Charges nothing; a refusal is audited.
    async fn plan(&self, session: &Session, sql: &str, headers: &tonic::metadata::MetadataMap) -> Result<Statement, Status> {
        match self.plan_unaudited(session, sql, headers).await {
            Ok(statement) => Ok(statement),
            Err((rule, status)) => Err(self.refused(session, sql, rule, status).await),
        }
    }

    /// The statement, or the rule its refusal is audited under and the
    /// status the party gets.
    async fn plan_unaudited(&self, session: &Session, sql: &str, headers: &tonic::metadata::MetadataMap) -> Result<Statement, (&'static str, Status)> {
        let refusal = |e: DpError| (e.audit_rule(), dp_status(e));
        let connection = header_options(headers).map_err(refusal)?;
        if let Some(assignment) = parse_set(sql) {
            let (name, value) = assignment.map_err(|status| ("sql", status))?;
            // Checked now, so a bad value fails at prepare time too.
            session.with_option(&name, &value).map_err(refusal)?;
            return Ok(Statement::Set { name, value });
        }
        let session_options = session.options.lock().expect("options lock").over(&connection);
        let planned = cleanroom_dp::plan_sql(&session.ctx.state(), sql, &session.policy, &session_options).await.map_err(refusal)?;
        Ok(Statement::Query(planned))
    }

    /// Execute a SET, or register a planned query in the session, and
    /// describe it. A SET has nothing to fetch: its one endpoint's ticket
    /// gives an empty stream (clients fetch every endpoint they are given).
    fn flight_info(&self, session: &Session, sql: &str, statement: Statement, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let schema = statement_schema(&statement)?;
        let planned = match statement {
            Statement::Set { name, value } => {
                session.set_option(&name, &value)?;
                let ticket = TicketStatementQuery { statement_handle: encode_handle(&random_id(), Kind::Empty).into() };
                return schema_only_info(&schema, ticket.as_any().encode_to_vec(), descriptor);
            }
            Statement::Query(planned) => planned,
        };
        // The versions the plan reads (it holds their tables): the answer is
        // remembered under them, even if an upload lands before the DoGet.
        let versions = match &planned {
            PlannedQuery::Dp(q) => self.data_versions(&q.datasets),
            _ => String::new(),
        };
        let id = random_id();
        insert_bounded(
            &mut session.pending.lock().expect("pending lock"),
            MAX_PENDING_PER_SESSION,
            id.clone(),
            (sql.to_string(), Arc::new(planned), versions),
        );
        let ticket = TicketStatementQuery { statement_handle: encode_handle(&id, Kind::Query).into() };
        schema_only_info(&schema, ticket.as_any().encode_to_vec(), descriptor)
    }

    /// Charge, execute and release a planned statement.
    /// The current data versions of `datasets`, as one key.
    fn data_versions(&self, datasets: &[String]) -> String {
        datasets.iter().map(|d| self.catalog.version(d).unwrap_or_default()).collect::<Vec<_>>().join("+")
    }

    async fn execute(&self, session: &Session, sql: &str, planned: Arc<PlannedQuery>, versions: &str) -> Result<Released, Status> {
        let party = self
            .catalog
            .manifest
            .party(&session.party)
            .ok_or_else(|| Status::permission_denied("this party is no longer in the collaboration"))?;
        let collaboration = &self.catalog.manifest.collaboration;
        let ask = Ask {
            party: &session.party,
            sql,
            ctx: &session.ctx,
            policy: &session.policy,
            versions,
            limits: Limits {
                epsilon_budget: party.epsilon_budget,
                delta_budget: party.delta_budget,
                epsilon_cap: collaboration.epsilon_cap,
                delta_cap: collaboration.delta_cap,
            },
            deadline: collaboration.query_deadline,
            min_response: collaboration.min_response,
        };
        match self.pipeline.answer(&ask, planned).await {
            Ok(answer) => {
                if let Some(ran) = answer.ran {
                    self.metrics.job(ran);
                }
                self.metrics.query(match answer.served {
                    Served::Free => Outcome::Free,
                    Served::Cached => Outcome::Cached,
                    Served::Answered => Outcome::Answered,
                });
                Ok(answer.released)
            }
            Err(e) => Err(self.query_status(e)),
        }
    }

    /// The status a party gets for a statement that gave no answer (counted
    /// in the metrics).
    fn query_status(&self, e: QueryError) -> Status {
        let message = e.message().unwrap_or_default();
        match e {
            QueryError::Refused { rule, error } => {
                self.metrics.query(Outcome::Refused);
                self.metrics.refusal(rule);
                dp_status(error)
            }
            QueryError::NoEngine { .. } => {
                self.metrics.query(Outcome::Unavailable);
                self.metrics.refusal("no_executor");
                Status::unavailable(message)
            }
            QueryError::Failed { failure, .. } => {
                self.metrics.query(Outcome::Failed);
                match failure {
                    Failure::Deadline(_) => Status::deadline_exceeded(message),
                    Failure::Run { engine_lost: true } => Status::unavailable(message),
                    Failure::Run { engine_lost: false } => Status::internal(message),
                    Failure::Release(e) => dp_status(e),
                }
            }
            QueryError::Dp(e) => dp_status(e),
        }
    }

    /// What GetSqlInfo answers: every id Flight SQL defines, so JDBC's
    /// `DatabaseMetaData` and ODBC's `SQLGetInfo` find a value for each.
    fn sql_info() -> &'static SqlInfoData {
        static INFO: std::sync::OnceLock<SqlInfoData> = std::sync::OnceLock::new();
        INFO.get_or_init(|| {
            let functions = function_lists();
            let mut keywords: Vec<&str> = datafusion::sql::sqlparser::keywords::ALL_KEYWORDS.to_vec();
            keywords.extend(["DIFFERENTIAL_PRIVACY", "OPTIONS"]);
            keywords.sort_unstable();
            keywords.dedup();
            let mut b = SqlInfoDataBuilder::new();
            // The server.
            b.append(SqlInfo::FlightSqlServerName, "cleanroom");
            b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
            b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
            b.append(SqlInfo::FlightSqlServerReadOnly, true);
            b.append(SqlInfo::FlightSqlServerSql, true);
            b.append(SqlInfo::FlightSqlServerSubstrait, false);
            b.append(SqlInfo::FlightSqlServerSubstraitMinVersion, "");
            b.append(SqlInfo::FlightSqlServerSubstraitMaxVersion, "");
            // SqlSupportedTransaction: none.
            b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
            b.append(SqlInfo::FlightSqlServerCancel, false);
            // Datasets are uploaded with CommandStatementIngest.
            b.append(SqlInfo::FlightSqlServerBulkIngestion, true);
            b.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
            // No timeout of the client's: the collaboration's query deadline.
            b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
            b.append(SqlInfo::FlightSqlServerTransactionTimeout, 0i32);
            // SQL: a read-only dialect with no DDL.
            b.append(SqlInfo::SqlDdlCatalog, false);
            b.append(SqlInfo::SqlDdlSchema, false);
            b.append(SqlInfo::SqlDdlTable, false);
            // SqlSupportedCaseSensitivity: lowercase (3), as DataFusion
            // folds unquoted identifiers; quoted ones are kept as written.
            b.append(SqlInfo::SqlIdentifierCase, 3i32);
            b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
            b.append(SqlInfo::SqlQuotedIdentifierCase, 1i32);
            b.append(SqlInfo::SqlAllTablesAreSelectable, true);
            // SqlNullOrdering: NULLs sort high (last ascending, first
            // descending), DataFusion's default.
            b.append(SqlInfo::SqlNullOrdering, 0i32);
            b.append(SqlInfo::SqlKeywords, keywords.as_slice());
            b.append(SqlInfo::SqlNumericFunctions, functions.numeric);
            b.append(SqlInfo::SqlStringFunctions, functions.string);
            b.append(SqlInfo::SqlSystemFunctions, functions.system);
            b.append(SqlInfo::SqlDatetimeFunctions, functions.datetime);
            b.append(SqlInfo::SqlSearchStringEscape, "\\");
            b.append(SqlInfo::SqlExtraNameCharacters, "");
            b.append(SqlInfo::SqlSupportsColumnAliasing, true);
            b.append(SqlInfo::SqlNullPlusNullIsNull, true);
            b.append(SqlInfo::SqlSupportsConvert, std::collections::BTreeMap::<i32, Vec<i32>>::new());
            b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
            b.append(SqlInfo::SqlSupportsDifferentTableCorrelationNames, false);
            b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
            b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
            // SqlSupportedGroupBy: unrelated | beyond select.
            b.append(SqlInfo::SqlSupportedGroupBy, 0b11i32);
            b.append(SqlInfo::SqlSupportsLikeEscapeClause, true);
            b.append(SqlInfo::SqlSupportsNonNullableColumns, true);
            // SupportedSqlGrammar: minimum | core.
            b.append(SqlInfo::SqlSupportedGrammar, 0b011i32);
            // SupportedAnsi92SqlGrammarLevel: entry.
            b.append(SqlInfo::SqlAnsi92SupportedLevel, 0b001i32);
            b.append(SqlInfo::SqlSupportsIntegrityEnhancementFacility, false);
            // SqlOuterJoinsSupportLevel: full outer joins.
            b.append(SqlInfo::SqlOuterJoinsSupportLevel, 2i32);
            b.append(SqlInfo::SqlSchemaTerm, "schema");
            b.append(SqlInfo::SqlProcedureTerm, "procedure");
            b.append(SqlInfo::SqlCatalogTerm, "catalog");
            b.append(SqlInfo::SqlCatalogAtStart, true);
            // Schema and catalog names may qualify names in queries only.
            b.append(SqlInfo::SqlSchemasSupportedActions, 0b001i32);
            b.append(SqlInfo::SqlCatalogsSupportedActions, 0b001i32);
            b.append(SqlInfo::SqlSupportedPositionedCommands, 0i32);
            b.append(SqlInfo::SqlSelectForUpdateSupported, false);
            b.append(SqlInfo::SqlStoredProceduresSupported, false);
            // SqlSupportedSubqueries: comparisons, EXISTS, IN, quantified.
            b.append(SqlInfo::SqlSupportedSubqueries, 0b1111i32);
            b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
            // SqlSupportedUnions: UNION and UNION ALL.
            b.append(SqlInfo::SqlSupportedUnions, 0b11i32);
            // Limits: 0 is "no limit or unknown"; statements are bounded by
            // the gateway's own checks (1 MiB of text).
            for id in [
                SqlInfo::SqlMaxBinaryLiteralLength,
                SqlInfo::SqlMaxCharLiteralLength,
                SqlInfo::SqlMaxColumnNameLength,
                SqlInfo::SqlMaxColumnsInGroupBy,
                SqlInfo::SqlMaxColumnsInIndex,
                SqlInfo::SqlMaxColumnsInOrderBy,
                SqlInfo::SqlMaxColumnsInSelect,
                SqlInfo::SqlMaxColumnsInTable,
                SqlInfo::SqlMaxConnections,
                SqlInfo::SqlMaxCursorNameLength,
                SqlInfo::SqlMaxIndexLength,
                SqlInfo::SqlDbSchemaNameLength,
                SqlInfo::SqlMaxProcedureNameLength,
                SqlInfo::SqlMaxCatalogNameLength,
                SqlInfo::SqlMaxRowSize,
                SqlInfo::SqlMaxStatements,
                SqlInfo::SqlMaxTableNameLength,
                SqlInfo::SqlMaxTablesInSelect,
                SqlInfo::SqlMaxUsernameLength,
            ] {
                b.append(id, 0i64);
            }
            b.append(SqlInfo::SqlMaxStatementLength, cleanroom_dp::limits::MAX_STATEMENT_BYTES as i64);
            b.append(SqlInfo::SqlMaxRowSizeIncludesBlobs, true);
            // Transactions: none (SqlTransactionIsolationLevel NONE).
            b.append(SqlInfo::SqlDefaultTransactionIsolation, 0i32);
            b.append(SqlInfo::SqlTransactionsSupported, false);
            b.append(SqlInfo::SqlSupportedTransactionsIsolationLevels, 0i32);
            b.append(SqlInfo::SqlDataDefinitionCausesTransactionCommit, false);
            b.append(SqlInfo::SqlDataDefinitionsInTransactionsIgnored, true);
            // Results: forward-only, read-only.
            b.append(SqlInfo::SqlSupportedResultSetTypes, 0b10i32);
            b.append(SqlInfo::SqlSupportedConcurrenciesForResultSetUnspecified, 0i32);
            b.append(SqlInfo::SqlSupportedConcurrenciesForResultSetForwardOnly, 0b10i32);
            b.append(SqlInfo::SqlSupportedConcurrenciesForResultSetScrollSensitive, 0i32);
            b.append(SqlInfo::SqlSupportedConcurrenciesForResultSetScrollInsensitive, 0i32);
            b.append(SqlInfo::SqlBatchUpdatesSupported, false);
            b.append(SqlInfo::SqlSavepointsSupported, false);
            b.append(SqlInfo::SqlNamedParametersSupported, false);
            b.append(SqlInfo::SqlLocatorsUpdateCopy, false);
            b.append(SqlInfo::SqlStoredFunctionsUsingCallSyntaxSupported, false);
            b.build().expect("static SQL info")
        })
    }

    fn xdbc_info() -> &'static XdbcTypeInfoData {
        static INFO: std::sync::OnceLock<XdbcTypeInfoData> = std::sync::OnceLock::new();
        INFO.get_or_init(|| {
            let mut b = XdbcTypeInfoDataBuilder::new();
            let types = [
                ("BOOLEAN", XdbcDataType::XdbcBit, Some(1)),
                ("BIGINT", XdbcDataType::XdbcBigint, Some(64)),
                ("INTEGER", XdbcDataType::XdbcInteger, Some(32)),
                ("DOUBLE", XdbcDataType::XdbcDouble, Some(53)),
                ("VARCHAR", XdbcDataType::XdbcVarchar, None),
                ("DATE", XdbcDataType::XdbcDate, None),
                ("TIMESTAMP", XdbcDataType::XdbcTimestamp, None),
            ];
            for (name, data_type, size) in types {
                b.append(XdbcTypeInfo {
                    type_name: name.into(),
                    data_type,
                    column_size: size,
                    literal_prefix: (name == "VARCHAR").then(|| "'".into()),
                    literal_suffix: (name == "VARCHAR").then(|| "'".into()),
                    create_params: None,
                    nullable: Nullable::NullabilityNullable,
                    case_sensitive: name == "VARCHAR",
                    searchable: Searchable::Full,
                    unsigned_attribute: size.map(|_| false),
                    fixed_prec_scale: false,
                    auto_increment: Some(false),
                    local_type_name: Some(name.into()),
                    minimum_scale: None,
                    maximum_scale: None,
                    sql_data_type: data_type,
                    datetime_subcode: None,
                    num_prec_radix: size.map(|_| 2),
                    interval_precision: None,
                });
            }
            b.build().expect("static type info")
        })
    }

    /// A metadata call's FlightInfo whose answer has `schema` and no rows.
    #[allow(clippy::result_large_err)]
    fn no_rows_info(&self, schema: Schema, ticket: Vec<u8>, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        Ok(Response::new(schema_only_info(&schema, ticket, request.into_inner())?))
    }

    /// Its answer.
    #[allow(clippy::result_large_err)]
    fn no_rows(&self, schema: Schema, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        Ok(Response::new(batches_stream(Arc::new(schema), Vec::new())))
    }

    fn table_types_batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("table_type", DataType::Utf8, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["SYSTEM TABLE", "TABLE"]))]).expect("static batch")
    }
}

/// GetPrimaryKeys' answer schema (Flight SQL's `CommandGetPrimaryKeys`).
fn primary_keys_schema() -> Schema {
    Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ])
}

/// The answer schema of GetExportedKeys, GetImportedKeys and
/// GetCrossReference.
fn foreign_keys_schema() -> Schema {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ])
}

/// The scalar functions a party's SQL can call, by the kind JDBC lists them
/// under (DataFusion's documentation sections), without the internal forms
/// the planner substitutes.
struct FunctionLists {
    numeric: Vec<String>,
    string: Vec<String>,
    datetime: Vec<String>,
    system: Vec<String>,
}

fn function_lists() -> FunctionLists {
    let state = cleanroom_executor::session_state(1);
    let mut lists = FunctionLists { numeric: Vec::new(), string: Vec::new(), datetime: Vec::new(), system: Vec::new() };
    let mut names: Vec<(&String, &Arc<datafusion::logical_expr::ScalarUDF>)> = state.scalar_functions().iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    for (name, udf) in names {
        if name.starts_with("total_") || name.starts_with("cleanroom_") || name.starts_with("__") {
            continue;
        }
        let section = udf.documentation().map(|d| d.doc_section.label).unwrap_or("");
        let list = match section {
            "Math Functions" => &mut lists.numeric,
            "String Functions" | "Binary String Functions" | "Regular Expression Functions" => &mut lists.string,
            "Time and Date Functions" => &mut lists.datetime,
            _ => &mut lists.system,
        };
        list.push(name.to_uppercase());
    }
    lists
}

/// A table's schema as GetTables describes it: plain types (as answers
/// have them) and, on each column, the `ARROW:FLIGHT:SQL:*` metadata JDBC's
/// and ODBC's column calls read.
fn described_schema(catalog: &str, schema: &str, table: &str, columns: &Schema) -> Schema {
    let fields: Vec<Field> = columns
        .fields()
        .iter()
        .map(|f| {
            let t = release::plain_type(f.data_type());
            let flag = |b: bool| if b { "1" } else { "0" }.to_string();
            let mut m = HashMap::from([
                ("ARROW:FLIGHT:SQL:CATALOG_NAME".to_string(), catalog.to_string()),
                ("ARROW:FLIGHT:SQL:DB_SCHEMA_NAME".to_string(), schema.to_string()),
                ("ARROW:FLIGHT:SQL:TABLE_NAME".to_string(), table.to_string()),
                ("ARROW:FLIGHT:SQL:TYPE_NAME".to_string(), sql_type_name(&t).to_string()),
                ("ARROW:FLIGHT:SQL:IS_AUTO_INCREMENT".to_string(), flag(false)),
                ("ARROW:FLIGHT:SQL:IS_CASE_SENSITIVE".to_string(), flag(matches!(t, DataType::Utf8 | DataType::LargeUtf8))),
                ("ARROW:FLIGHT:SQL:IS_READ_ONLY".to_string(), flag(true)),
                ("ARROW:FLIGHT:SQL:IS_SEARCHABLE".to_string(), flag(true)),
            ]);
            let precision = match &t {
                DataType::Int8 => Some((3, 0)),
                DataType::Int16 => Some((5, 0)),
                DataType::Int32 => Some((10, 0)),
                DataType::Int64 => Some((19, 0)),
                DataType::Float32 => Some((7, 0)),
                DataType::Float64 => Some((15, 0)),
                DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => Some((*p as i32, *s as i32)),
                _ => None,
            };
            if let Some((p, s)) = precision {
                m.insert("ARROW:FLIGHT:SQL:PRECISION".to_string(), p.to_string());
                m.insert("ARROW:FLIGHT:SQL:SCALE".to_string(), s.to_string());
            }
            f.as_ref().clone().with_data_type(t).with_metadata(m)
        })
        .collect();
    Schema::new(fields)
}

/// The SQL name of an Arrow type, as GetXdbcTypeInfo lists it.
fn sql_type_name(t: &DataType) -> &'static str {
    match t {
        DataType::Boolean => "BOOLEAN",
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::UInt8 | DataType::UInt16 => "INTEGER",
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "BIGINT",
        DataType::Float16 | DataType::Float32 | DataType::Float64 => "DOUBLE",
        DataType::Decimal128(..) | DataType::Decimal256(..) => "DECIMAL",
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR",
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => "VARBINARY",
        DataType::Date32 | DataType::Date64 => "DATE",
        DataType::Timestamp(..) => "TIMESTAMP",
        DataType::Time32(_) | DataType::Time64(_) => "TIME",
        _ => "OTHER",
    }
}

/// The result schema a statement announces before it runs.
fn statement_schema(statement: &Statement) -> Result<Schema, Status> {
    Ok(match statement {
        Statement::Set { .. } => Schema::empty(),
        Statement::Query(PlannedQuery::NoData(q)) => q.announced_schema(),
        Statement::Query(PlannedQuery::Dp(q)) => release::announced_dp_schema(q).map_err(dp_status)?,
        Statement::Query(PlannedQuery::Explain(_)) => release::explain_schema(),
    })
}

/// `SET cleanroom.<name> = <value>` (or `TO`): `None` if `sql` is not a SET.
fn parse_set(sql: &str) -> Option<Result<(String, String), Status>> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    let head = trimmed.get(..4)?;
    if !head.eq_ignore_ascii_case("set ") {
        return None;
    }
    let rest = trimmed[4..].trim();
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n.trim(), v.trim()),
        None => {
            let mut parts = rest.splitn(3, char::is_whitespace);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(n), Some(to), Some(v)) if to.eq_ignore_ascii_case("to") => (n, v.trim()),
                _ => return Some(Err(Status::invalid_argument("expected SET cleanroom.<option> = <value>"))),
            }
        }
    };
    let lower = name.to_ascii_lowercase();
    let Some(option) = lower.strip_prefix("cleanroom.") else {
        return Some(Err(Status::invalid_argument(format!(
            "SET {name}: only cleanroom.<option> settings ({}) can be set",
            OPTION_NAMES.join(", ")
        ))));
    };
    Some(Ok((option.to_string(), value.to_string())))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlGateway {
    type FlightService = FlightSqlGateway;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let refused = || Status::unauthenticated("invalid user name or password");
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("send HTTP Basic credentials (party name and password) in the handshake"))?
            .to_str()
            .map_err(|_| refused())?
            .to_string();
        let encoded = header
            .strip_prefix("Basic ")
            .ok_or_else(|| Status::unauthenticated("the handshake takes HTTP Basic credentials"))?;
        // Clients differ on padding (ADBC's Go driver sends none), so accept both.
        const BASIC: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let decoded = BASIC
            .decode(encoded.trim())
            .map_err(|_| refused())?;
        let decoded = String::from_utf8(decoded).map_err(|_| refused())?;
        let (party, password) = decoded.split_once(':').ok_or_else(refused)?;
        let (party, password) = (party.to_string(), password.to_string());
        let manifest = self.catalog.manifest.clone();
        let party_for_check = party.clone();
        let valid = blocking(move || manifest.verify_password(&party_for_check, &password)).await?;
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        if !valid {
            warn!(party = %party, "authentication failed");
            // The name is what the client sent, not a known party.
            // Bounded, so a client cannot write large records.
            let user: String = party.chars().take(64).collect();
            self.audit(None, Event::AuthFailure { user, peer }).await?;
            return Err(refused());
        }
        self.audit(Some(&party), Event::Auth { peer }).await?;
        let session = self.open_session(&party).await?;
        let token = random_id() + &random_id();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| !s.expired());
        sessions.insert(token.clone(), Arc::new(session));
        drop(sessions);
        info!(party = %party, "authenticated");
        let response = HandshakeResponse { protocol_version: 0, payload: token.clone().into() };
        let stream: Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>> =
            Box::pin(futures::stream::iter(vec![Ok(response)]));
        let mut response = Response::new(stream);
        response.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| Status::internal("bad token"))?,
        );
        Ok(response)
    }

    async fn do_get_fallback(&self, request: Request<Ticket>, _message: Any) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        Err(Status::invalid_argument("unknown ticket"))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let session = self.session(&request)?;
        let statement = self.plan(&session, &query.query, request.metadata()).await?;
        let info = self.flight_info(&session, &query.query, statement, request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let session = self.session(&request)?;
        let sql = session.prepared_sql(&cmd.prepared_statement_handle)?;
        let statement = self.plan(&session, &sql, request.metadata()).await?;
        let info = self.flight_info(&session, &sql, statement, request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn do_get_statement(&self, ticket: TicketStatementQuery, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let session = self.session(&request)?;
        if StatementHandle::decode(ticket.statement_handle.as_ref()).is_ok_and(|h| h.kind == Kind::Empty as i32) {
            return Ok(Response::new(batches_stream(Arc::new(Schema::empty()), Vec::new())));
        }
        let id = decode_handle(&ticket.statement_handle, Kind::Query)?;
        // Removed on use: a ticket executes (and is charged) once, and only in
        // the session that planned it.
        let (_, (sql, planned, versions)) = session
            .pending
            .lock()
            .expect("pending lock")
            .remove(&id)
            .ok_or_else(|| Status::not_found("no such statement in this session (tickets are valid once, in the session that planned them)"))?;
        let released = self.execute(&session, &sql, planned, &versions).await?;
        let metadata = released.schema().metadata().clone();
        let mut response = Response::new(batches_stream(released.schema(), released.batches().to_vec()));
        // The receipt also travels as response headers, for clients that do
        // not surface Arrow schema metadata.
        for (key, header) in [(release::META_RECEIPT, RECEIPT_HEADER), (release::META_AUDIT_RECORD, AUDIT_RECORD_HEADER)] {
            if let Some(value) = metadata.get(key).and_then(|v| MetadataValue::try_from(v.as_str()).ok()) {
                response.metadata_mut().insert(header, value);
            }
        }
        Ok(response)
    }

    async fn do_get_prepared_statement(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        Err(Status::invalid_argument("execute a prepared statement with GetFlightInfo, then DoGet its ticket"))
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let session = self.session(&request)?;
        match self.plan(&session, &command.query, request.metadata()).await? {
            Statement::Set { name, value } => {
                session.set_option(&name, &value)?;
                Ok(0)
            }
            Statement::Query(_) => Err(Status::invalid_argument(
                "only SET cleanroom.<option> = <value> runs as an update; run queries as queries",
            )),
        }
    }

    /// An upload by a dataset's owner (ADBC `adbc_ingest`): checked batch by
    /// batch and committed as the dataset's next data version, all or nothing.
    async fn do_put_statement_ingest(
        &self,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let session = self.session(&request)?;
        let (dataset, mode) = match upload::resolve(&self.catalog, &session.party, &ingest::target(&command)) {
            Ok(target) => target,
            Err(refusal) => return Err(upload_refused(&self.pipeline, &self.metrics, &session.party, &command.table, refusal).await),
        };
        // The upload runs in its own task, which owns the request's stream:
        // if the client goes away the stream fails there and the task cleans
        // up and audits (a refusal too), even though this handler is dropped.
        let (catalog, pipeline, metrics) = (self.catalog.clone(), self.pipeline.clone(), self.metrics.clone());
        let broke = request.extensions().get::<crate::stream_end::BodyBroke>().cloned().unwrap_or_default();
        let (name, party, stream) = (dataset.name.clone(), session.party.clone(), request.into_inner());
        let task = tokio::spawn(async move {
            let dataset = catalog.manifest.dataset(&name).expect("resolved above");
            let _one_at_a_time = catalog.lock_for_upload(&name).await;
            let upload_id = random_id();
            let record = |rows: u64, version: u64, files: usize| {
                let event = Event::Upload(UploadEvent {
                    dataset: name.clone(),
                    mode: mode.as_str().to_string(),
                    rows,
                    files,
                    version,
                    upload: upload_id.clone(),
                });
                let (pipeline, party) = (pipeline.clone(), party.clone());
                async move { pipeline.audit(Some(&party), event).await }
            };
            let batches = ingest::batches(stream, broke);
            let outcome = upload::ingest(&catalog, dataset, mode, &party, &upload_id, batches, record).await;
            match outcome {
                Ok(ingested) => {
                    info!(party = %party, dataset = %name, mode = mode.as_str(), rows = ingested.rows, version = %ingested.version.id(), "upload committed");
                    if !ingested.version.superseded.is_empty() {
                        // The replaced rows leave storage once statements planned
                        // on the previous version have had time to finish.
                        let catalog = catalog.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(cleanroom_storage::storage::SUPERSEDED_GRACE + Duration::from_secs(1)).await;
                            catalog.purge_superseded().await;
                        });
                    }
                    Ok(ingested.rows as i64)
                }
                Err(IngestError::Refused(refusal)) => Err(upload_refused(&pipeline, &metrics, &party, &name, refusal).await),
                Err(failed) => {
                    let status = match failed {
                        IngestError::Failed { kind, message } => ingest::failure_status(kind, &message),
                        IngestError::Audit(e) => dp_status(e),
                        IngestError::Refused(_) => unreachable!("matched above"),
                    };
                    warn!(party = %party, dataset = %name, upload = %upload_id, error = %status.message(), "upload not committed");
                    let event = Event::UploadFailure { dataset: name.clone(), upload: upload_id.clone(), message: status.message().to_string() };
                    if let Err(e) = pipeline.audit(Some(&party), event).await {
                        warn!(error = %e, "could not record the failed upload in the audit log");
                    }
                    Err(status)
                }
            }
        });
        task.await.map_err(|e| Status::internal(format!("the upload task failed: {e}")))?
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.session(&request)?;
        Err(Status::unimplemented("binding parameters to prepared statements is not supported yet"))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let session = self.session(&request)?;
        // Planned now so that a refused statement fails at prepare time and the
        // client learns the result schema; nothing runs and nothing is charged.
        let schema = statement_schema(&self.plan(&session, &query.query, request.metadata()).await?)?;
        let id = random_id();
        insert_bounded(
            &mut session.prepared.lock().expect("prepared lock"),
            MAX_PREPARED_PER_SESSION,
            id.clone(),
            query.query.clone(),
        );
        let IpcMessage(schema_bytes) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(format!("cannot encode schema: {e}")))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: encode_handle(&id, Kind::Prepared).into(),
            dataset_schema: schema_bytes,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let session = self.session(&request)?;
        let id = decode_handle(&query.prepared_statement_handle, Kind::Prepared)?;
        session.prepared.lock().expect("prepared lock").remove(&id);
        Ok(())
    }

    async fn get_flight_info_catalogs(&self, query: CommandGetCatalogs, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(schema_only_info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_catalogs(&self, query: CommandGetCatalogs, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let session = self.session(&request)?;
        let mut builder = query.into_builder();
        for catalog in session.ctx.catalog_names() {
            builder.append(catalog);
        }
        let schema = builder.schema();
        let batch = builder.build()?;
        Ok(Response::new(batches_stream(schema, vec![batch])))
    }

    async fn get_flight_info_schemas(&self, query: CommandGetDbSchemas, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(schema_only_info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_schemas(&self, query: CommandGetDbSchemas, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let session = self.session(&request)?;
        let mut builder = query.into_builder();
        for catalog_name in session.ctx.catalog_names() {
            if let Some(catalog) = session.ctx.catalog(&catalog_name) {
                for schema_name in catalog.schema_names() {
                    builder.append(&catalog_name, schema_name);
                }
            }
        }
        let schema = builder.schema();
        let batch = builder.build()?;
        Ok(Response::new(batches_stream(schema, vec![batch])))
    }

    async fn get_flight_info_tables(&self, query: CommandGetTables, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let schema = query.clone().into_builder().schema();
        Ok(Response::new(schema_only_info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_tables(&self, query: CommandGetTables, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let session = self.session(&request)?;
        let mut builder = query.into_builder();
        // What the party's session can query, as its own catalog resolves it
        // (a dataset without data yet is not a table; hidden columns are not
        // in any table's schema).
        for catalog_name in session.ctx.catalog_names() {
            let Some(catalog) = session.ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else { continue };
                for table_name in schema.table_names() {
                    let Ok(Some(table)) = schema.table(&table_name).await else { continue };
                    let kind = match table.table_type() {
                        _ if schema_name == SYSTEM_SCHEMA => "SYSTEM TABLE",
                        datafusion::datasource::TableType::View => "VIEW",
                        datafusion::datasource::TableType::Temporary => "LOCAL TEMPORARY",
                        datafusion::datasource::TableType::Base => "TABLE",
                    };
                    builder.append(&catalog_name, &schema_name, &table_name, kind, &described_schema(&catalog_name, &schema_name, &table_name, &table.schema()))?;
                }
            }
        }
        let schema = builder.schema();
        let batch = builder.build()?;
        Ok(Response::new(batches_stream(schema, vec![batch])))
    }

    // Datasets have no primary or foreign keys: the key calls answer with
    // no rows, in the schemas Flight SQL gives them.
    async fn get_flight_info_primary_keys(&self, query: CommandGetPrimaryKeys, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.no_rows_info(primary_keys_schema(), query.as_any().encode_to_vec(), request)
    }

    async fn do_get_primary_keys(&self, _query: CommandGetPrimaryKeys, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.no_rows(primary_keys_schema(), request)
    }

    async fn get_flight_info_exported_keys(&self, query: CommandGetExportedKeys, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.no_rows_info(foreign_keys_schema(), query.as_any().encode_to_vec(), request)
    }

    async fn do_get_exported_keys(&self, _query: CommandGetExportedKeys, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.no_rows(foreign_keys_schema(), request)
    }

    async fn get_flight_info_imported_keys(&self, query: CommandGetImportedKeys, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.no_rows_info(foreign_keys_schema(), query.as_any().encode_to_vec(), request)
    }

    async fn do_get_imported_keys(&self, _query: CommandGetImportedKeys, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.no_rows(foreign_keys_schema(), request)
    }

    async fn get_flight_info_cross_reference(&self, query: CommandGetCrossReference, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.no_rows_info(foreign_keys_schema(), query.as_any().encode_to_vec(), request)
    }

    async fn do_get_cross_reference(&self, _query: CommandGetCrossReference, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.no_rows(foreign_keys_schema(), request)
    }

    async fn get_flight_info_table_types(&self, query: CommandGetTableTypes, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let batch = Self::table_types_batch();
        Ok(Response::new(schema_only_info(&batch.schema(), query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_table_types(&self, _query: CommandGetTableTypes, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        let batch = Self::table_types_batch();
        Ok(Response::new(batches_stream(batch.schema(), vec![batch])))
    }

    async fn get_flight_info_sql_info(&self, query: CommandGetSqlInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let schema = query.clone().into_builder(Self::sql_info()).schema();
        Ok(Response::new(schema_only_info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_sql_info(&self, query: CommandGetSqlInfo, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        let builder = query.into_builder(Self::sql_info());
        let schema = builder.schema();
        let batch = builder.build()?;
        Ok(Response::new(batches_stream(schema, vec![batch])))
    }

    async fn get_flight_info_xdbc_type_info(&self, query: CommandGetXdbcTypeInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.session(&request)?;
        let schema = query.clone().into_builder(Self::xdbc_info()).schema();
        Ok(Response::new(schema_only_info(&schema, query.as_any().encode_to_vec(), request.into_inner())?))
    }

    async fn do_get_xdbc_type_info(&self, query: CommandGetXdbcTypeInfo, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        self.session(&request)?;
        let builder = query.into_builder(Self::xdbc_info());
        let schema = builder.schema();
        let batch = builder.build()?;
        Ok(Response::new(batches_stream(schema, vec![batch])))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
