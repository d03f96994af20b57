//! The Flight service a party connects to: the Flight SQL gateway, plus the
//! plain Flight calls BI drivers make around it.
//!
//! - `GetSchema` of a statement: planned (and refused) as `GetFlightInfo`
//!   plans it, but nothing is registered, applied or charged.
//! - Session options (`SetSessionOptions`, `GetSessionOptions`,
//!   `CloseSession`): the same privacy options as `SET cleanroom.<option>`,
//!   named with or without the `cleanroom.` prefix.
//! - `CancelFlightInfo`: forgets a planned statement that was not fetched yet
//!   (it was never charged).
//! - `ListActions` lists what is implemented: no transactions, savepoints,
//!   Substrait plans or `CancelQuery`.

use std::collections::HashMap;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{Any, Command, TicketStatementQuery};
use arrow_flight::{
    Action, ActionType, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, Criteria, Empty, FlightData,
    FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo, SchemaResult, Ticket,
};
use cleanroom_dp::options::{OptionValue, OPTION_NAMES};
use cleanroom_proto::v1::session_option_value::OptionValue as Value;
use cleanroom_proto::v1::set_session_options_result::{Error as OptionError, ErrorValue};
use cleanroom_proto::v1::{
    close_session_result, CloseSessionResult, GetSessionOptionsResult, SessionOptionValue, SetSessionOptionsRequest,
    SetSessionOptionsResult,
};
use futures::stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::gateway::FlightSqlGateway;

type Inner = FlightSqlGateway;

/// Actions of Flight SQL that are implemented, and Flight's session and
/// cancel actions.
const ACTIONS: &[(&str, &str)] = &[
    ("CreatePreparedStatement", "Plans a statement (refusals are reported here) and returns its result schema; nothing runs."),
    ("ClosePreparedStatement", "Forgets a prepared statement."),
    ("CancelFlightInfo", "Forgets a planned statement that was not fetched yet; it is never charged."),
    ("SetSessionOptions", "Sets privacy options for the session's statements (as SET cleanroom.<option>)."),
    ("GetSessionOptions", "The privacy options set in this session."),
    ("CloseSession", "Ends the session: its token, statements and options are forgotten."),
];

/// The gateway with Flight's session calls; what [`crate::serve`] serves.
#[derive(Clone)]
pub struct Door(pub FlightSqlGateway);

fn decode<M: Message + Default>(body: &[u8], what: &str) -> Result<M, Status> {
    M::decode(body).map_err(|_| Status::invalid_argument(format!("malformed {what} request")))
}

fn one_result(body: Vec<u8>) -> <Inner as FlightService>::DoActionStream {
    Box::pin(stream::iter([Ok(arrow_flight::Result { body: body.into() })]))
}

/// A session option's value as the text `SET` takes.
fn option_text(value: &SessionOptionValue) -> Option<String> {
    Some(match value.option_value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::Int64Value(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::StringListValue(_) => return None,
    })
}

impl Door {
    /// `SetSessionOptions`: each option is checked on its own; those that
    /// pass are set, the others are reported by name. A value-less option is
    /// reset to its default.
    async fn set_session_options(&self, request: Request<Action>) -> Result<Response<<Inner as FlightService>::DoActionStream>, Status> {
        let session = self.0.session(&request)?;
        let asked: SetSessionOptionsRequest = decode(&request.get_ref().body, "SetSessionOptions")?;
        let mut errors = HashMap::new();
        let mut names: Vec<&String> = asked.session_options.keys().collect();
        names.sort();
        for name in names {
            let value = &asked.session_options[name];
            let option = name.strip_prefix("cleanroom.").unwrap_or(name);
            let outcome = match (value.option_value.as_ref(), option_text(value)) {
                _ if !OPTION_NAMES.contains(&option.to_ascii_lowercase().as_str()) => Err(ErrorValue::InvalidName),
                (None, _) => session.unset_option(option).map_err(|_| ErrorValue::InvalidName),
                (Some(_), None) => Err(ErrorValue::InvalidValue),
                (Some(_), Some(text)) => session.set_option(option, &text).map_err(|_| ErrorValue::InvalidValue),
            };
            if let Err(kind) = outcome {
                errors.insert(name.clone(), OptionError { value: kind as i32 });
            }
        }
        Ok(Response::new(one_result(SetSessionOptionsResult { errors }.encode_to_vec())))
    }

    /// `GetSessionOptions`: the options set in this session, by name.
    async fn get_session_options(&self, request: Request<Action>) -> Result<Response<<Inner as FlightService>::DoActionStream>, Status> {
        let session = self.0.session(&request)?;
        let session_options = session
            .options()
            .entries()
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    OptionValue::Number(n) => Value::DoubleValue(n),
                    OptionValue::Count(c) => Value::Int64Value(c as i64),
                    OptionValue::Flag(b) => Value::BoolValue(b),
                    OptionValue::Text(t) => Value::StringValue(t),
                };
                (name.to_string(), SessionOptionValue { option_value: Some(value) })
            })
            .collect();
        Ok(Response::new(one_result(GetSessionOptionsResult { session_options }.encode_to_vec())))
    }

    /// `CloseSession`: the token stops working at once.
    async fn close_session(&self, request: Request<Action>) -> Result<Response<<Inner as FlightService>::DoActionStream>, Status> {
        self.0.close_session(&request)?;
        let result = CloseSessionResult { status: close_session_result::Status::Closed as i32 };
        Ok(Response::new(one_result(result.encode_to_vec())))
    }

    /// `CancelFlightInfo`: a statement planned by this session and not yet
    /// fetched is forgotten (cancelled); one already fetched, or unknown, is
    /// not cancellable (a fetch is answered at once).
    async fn cancel_flight_info(&self, request: Request<Action>) -> Result<Response<<Inner as FlightService>::DoActionStream>, Status> {
        let session = self.0.session(&request)?;
        let asked: CancelFlightInfoRequest = decode(&request.get_ref().body, "CancelFlightInfo")?;
        let info = asked.info.unwrap_or_default();
        let mut cancelled = false;
        for endpoint in &info.endpoint {
            let Some(ticket) = &endpoint.ticket else { continue };
            let Ok(any) = Any::decode(ticket.ticket.as_ref()) else { continue };
            let Ok(Some(statement)) = any.unpack::<TicketStatementQuery>() else { continue };
            cancelled |= session.forget_pending(&statement.statement_handle);
        }
        let status = if cancelled { CancelStatus::Cancelled } else { CancelStatus::NotCancellable };
        Ok(Response::new(one_result(CancelFlightInfoResult { status: status as i32 }.encode_to_vec())))
    }
}

#[tonic::async_trait]
impl FlightService for Door {
    type HandshakeStream = <Inner as FlightService>::HandshakeStream;
    type ListFlightsStream = <Inner as FlightService>::ListFlightsStream;
    type DoGetStream = <Inner as FlightService>::DoGetStream;
    type DoPutStream = <Inner as FlightService>::DoPutStream;
    type DoExchangeStream = <Inner as FlightService>::DoExchangeStream;
    type DoActionStream = <Inner as FlightService>::DoActionStream;
    type ListActionsStream = <Inner as FlightService>::ListActionsStream;

    async fn handshake(&self, request: Request<Streaming<HandshakeRequest>>) -> Result<Response<Self::HandshakeStream>, Status> {
        self.0.handshake(request).await
    }

    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.0.list_flights(request).await
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.0.get_flight_info(request).await
    }

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        self.0.poll_flight_info(request).await
    }

    /// The schema a statement's (or a metadata call's) answer will have.
    /// A statement is planned as for `GetFlightInfo` — refused the same way
    /// — but not registered; a `SET` is not applied.
    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        let command = Any::decode(request.get_ref().cmd.as_ref())
            .ok()
            .and_then(|any| Command::try_from(any).ok())
            .ok_or_else(|| Status::invalid_argument("GetSchema takes a Flight SQL command"))?;
        let schema = match command {
            Command::CommandStatementQuery(query) => self.0.statement_schema_of(&request, &query.query).await?,
            Command::CommandPreparedStatementQuery(query) => {
                self.0.prepared_schema_of(&request, &query.prepared_statement_handle).await?
            }
            _ => {
                let info = self.0.get_flight_info(request).await?.into_inner();
                return Ok(Response::new(SchemaResult { schema: info.schema }));
            }
        };
        let options = arrow::ipc::writer::IpcWriteOptions::default();
        let encoded = arrow_flight::SchemaAsIpc::new(&schema, &options);
        let result = SchemaResult::try_from(encoded).map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?;
        Ok(Response::new(result))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        self.0.do_get(request).await
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        self.0.do_put(request).await
    }

    async fn do_exchange(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.0.do_exchange(request).await
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        match request.get_ref().r#type.as_str() {
            "SetSessionOptions" => self.set_session_options(request).await,
            "GetSessionOptions" => self.get_session_options(request).await,
            "CloseSession" => self.close_session(request).await,
            "CancelFlightInfo" => self.cancel_flight_info(request).await,
            "CreatePreparedStatement" | "ClosePreparedStatement" => self.0.do_action(request).await,
            other => {
                self.0.session(&request)?;
                Err(Status::unimplemented(format!(
                    "the action {other:?} is not supported; ListActions lists those that are"
                )))
            }
        }
    }

    async fn list_actions(&self, _request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        let actions = ACTIONS
            .iter()
            .map(|(name, description)| Ok(ActionType { r#type: name.to_string(), description: description.to_string() }))
            .collect::<Vec<_>>();
        Ok(Response::new(Box::pin(stream::iter(actions))))
    }
}
