//! Uploads over Flight SQL bulk ingest (`CommandStatementIngest`, what ADBC's
//! `adbc_ingest` sends): the command becomes an upload [`Target`], the
//! FlightData stream a stream of decoded batches, and the outcome a status.
//! What an upload may do and how it is checked and committed is
//! [`cleanroom_storage::upload`]'s.

use arrow::array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::{CommandStatementIngest, TableExistsOption};
use cleanroom_storage::storage::Mode;
use cleanroom_storage::upload::{FailureKind, IngestError, Reason, Refusal, Target};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::Status;

use crate::stream_end::BodyBroke;

/// The upload a bulk-ingest command asks for.
pub fn target(command: &CommandStatementIngest) -> Target<'_> {
    let options = command.table_definition_options.unwrap_or_default();
    Target {
        catalog: command.catalog.as_deref(),
        schema: command.schema.as_deref(),
        table: &command.table,
        temporary: command.temporary,
        in_transaction: command.transaction_id.is_some(),
        // `if_not_exist` does not matter: every dataset of the manifest exists.
        if_exists: match TableExistsOption::try_from(options.if_exists).unwrap_or(TableExistsOption::Unspecified) {
            TableExistsOption::Append => Some(Mode::Append),
            TableExistsOption::Replace => Some(Mode::Replace),
            TableExistsOption::Fail | TableExistsOption::Unspecified => None,
        },
    }
}

/// The status of a refused upload.
pub fn refusal_status(refusal: &Refusal) -> Status {
    match refusal.reason {
        Reason::Invalid => Status::invalid_argument(&refusal.message),
        Reason::Forbidden => Status::permission_denied(&refusal.message),
        Reason::Exists => Status::already_exists(&refusal.message),
    }
}

/// The status of an upload that failed without committing.
pub fn failure_status(kind: FailureKind, message: &str) -> Status {
    match kind {
        FailureKind::Aborted => Status::aborted(message),
        FailureKind::Unavailable => Status::unavailable(message),
        FailureKind::Internal => Status::internal(message),
    }
}

/// The upload's batches, decoded from its FlightData stream. A stream that
/// broke off or was cancelled ends in an error, so nothing is committed.
pub fn batches<S>(stream: S, broke: BodyBroke) -> impl Stream<Item = Result<RecordBatch, IngestError>> + Send + Unpin
where
    S: Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + Unpin + 'static,
{
    let decoded = FlightRecordBatchStream::new_from_flight_data(stream.map_err(|s| FlightError::Tonic(Box::new(s)))).map_err(|e| match e {
        FlightError::Tonic(status) => IngestError::Failed {
            kind: FailureKind::Aborted,
            message: format!("the upload stream broke off: {}; nothing was committed", status.message()),
        },
        e => IngestError::Refused(Refusal::invalid("upload_format", format!("cannot decode the upload: {e}"))),
    });
    // A cancelled stream ends like a finished one in tonic: the flag tells
    // them apart (see `stream_end`).
    let cancelled = futures::stream::once(async move { broke.is_set() }).filter_map(|broke| async move {
        broke.then(|| {
            Err(IngestError::Failed {
                kind: FailureKind::Aborted,
                message: "the upload stream was cancelled by the client; nothing was committed".into(),
            })
        })
    });
    Box::pin(decoded.chain(cancelled))
}
