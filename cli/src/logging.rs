//! Logs on stderr that never carry protected values.
//!
//! cleanroom's own events are written in full: they are designed to hold only
//! identifiers, counts of requests, ε and rule names, never a value or a
//! data-dependent error. The engine's events (Ballista, DataFusion, arrow,
//! through `tracing` or `log`) may quote the data in their error details —
//! a failed cast names the value, a logged plan holds literals — so they are
//! written only up to the first character where such details begin (`:`,
//! a quote, a bracket or `=`): "Job 3F1 failed: …" keeps what failed and
//! withholds why. `RUST_LOG` picks the levels as usual.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, Format, FormatEvent, FormatFields, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

const DEFAULT_FILTER: &str = "info,ballista=warn,ballista_scheduler=warn,ballista_executor=warn,ballista_core=warn,datafusion=warn";

pub fn init() {
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into()))
        .event_format(Redacting { full: format::format().with_ansi(ansi) })
        .init();
}

struct Redacting {
    full: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for Redacting
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        if meta.target().starts_with("cleanroom") {
            return self.full.format_event(ctx, writer, event);
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        SystemTime.format_time(&mut writer)?;
        let target = fields.log_target.as_deref().unwrap_or(meta.target());
        writeln!(writer, " {:>5} {target}: {}", meta.level(), withhold_details(&fields.message))
    }
}

/// `message` up to where details could begin, marking what was left out.
fn withhold_details(message: &str) -> String {
    match message.find([':', '(', '"', '\'', '[', '{', '=', '`']) {
        Some(at) => format!("{} [details withheld]", message[..at].trim_end()),
        None => message.to_string(),
    }
}

/// The message, and the real target of an event bridged from `log`.
#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "log.target" => self.log_target = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::withhold_details;

    #[test]
    fn engine_messages_lose_their_details() {
        assert_eq!(
            withhold_details("Job 038HMB27KM000 failed: Cast error: Cannot cast string 'jane@example.com' to value of Int64 type"),
            "Job 038HMB27KM000 failed [details withheld]"
        );
        assert_eq!(withhold_details("ArrowError(CastError(\"'jane@example.com'\"), None)"), "ArrowError [details withheld]");
        assert_eq!(withhold_details("Submitting plan ProjectionExec: expr=[hash(uid, 'salt')]"), "Submitting plan ProjectionExec [details withheld]");
        assert_eq!(withhold_details("Reset 2 tasks for running job/stage 038/0 on lost Executor 454e"), "Reset 2 tasks for running job/stage 038/0 on lost Executor 454e");
    }
}
