//! Logs to stderr at the level `RUST_LOG` sets (default `info`): human-readable, or with
//! `LOG_FORMAT=json` one JSON object a line, for Loki. A JSON line carries, at its top
//! level, the fields of every span it was written in (a job attempt's `job_id`, `user`,
//! `backend`, `attempt`; a request's `request_id`, `route`, `user`) beside its own, so a log
//! shipper can take `user` and `backend` as labels without digging into nested objects.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber.
pub fn init(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init();
    } else {
        builder.init();
    }
}

/// The JSON line format (see the module docs). Keys: `timestamp` (RFC 3339, UTC), `level`,
/// `target`, `span` (the innermost span's name, if any), `message`, then the spans' fields
/// from the outermost in, then the event's own (a later one wins on a repeated name).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records of the `log` crate (dependencies) keep their own level and target.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Map::new();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let ext = span.extensions();
                // With `JsonFields`, a span's recorded fields are one JSON object.
                if let Some(f) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&f.fields)
                {
                    fields.extend(o);
                }
            }
            if let Some(name) = innermost {
                line.insert("span".into(), name.into());
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        if let Some(m) = own.message {
            line.insert("message".into(), m.into());
        }
        fields.extend(own.fields);
        for (k, v) in fields {
            // The fixed keys above are never overwritten by a field of the same name.
            line.entry(k).or_insert(v);
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields as JSON values, the message apart.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: Value) {
        // The `log` bridge's bookkeeping (`log.target`, `log.file`, ...): already in the
        // normalized metadata, or noise.
        if field.name().starts_with("log.") {
            return;
        }
        if field.name() == "message" {
            self.message = Some(match v {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(field.name().to_owned(), v);
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing::Instrument;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Buf) -> Vec<Value> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[tokio::test]
    async fn lines_carry_the_fields_of_their_spans_at_the_top_level() {
        let buf = Buf::default();
        let b = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || b.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let request = tracing::info_span!(
            "request",
            request_id = "00ff",
            route = "/api/prompt",
            user = tracing::field::Empty
        );
        async {
            tracing::Span::current().record("user", "user007");
            tracing::info!(status = 200u16, ms = 1.5, "request");
        }
        .instrument(request)
        .await;
        let job = tracing::info_span!(
            "job",
            job_id = "j-1",
            user = "user007",
            backend = "gpu-2",
            attempt = 2u32
        );
        async {
            // A nested span (the backend client's) and an event field of the same name.
            let inner = tracing::info_span!("comfyui_job", backend = "gpu-2", attempt = 2u32);
            let _e = inner.enter();
            let e = std::io::Error::other("boom");
            tracing::warn!(error = %e, level = "not the level", "backend failed the job");
        }
        .instrument(job)
        .await;
        tracing::info!(quoted = "a \"b\"\nc", "no span");

        let l = lines(&buf);
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0]["message"], "request");
        assert_eq!(l[0]["level"], "INFO");
        assert_eq!(l[0]["span"], "request");
        assert_eq!(l[0]["request_id"], "00ff");
        assert_eq!(l[0]["route"], "/api/prompt");
        assert_eq!(l[0]["user"], "user007", "recorded after the span began");
        assert_eq!(l[0]["status"], 200);
        assert_eq!(l[0]["ms"], 1.5);
        assert!(l[0]["timestamp"].as_str().unwrap().ends_with('Z'));

        assert_eq!(l[1]["span"], "comfyui_job");
        assert_eq!(l[1]["job_id"], "j-1");
        assert_eq!(l[1]["user"], "user007");
        assert_eq!(l[1]["backend"], "gpu-2");
        assert_eq!(l[1]["attempt"], 2);
        assert_eq!(l[1]["error"], "boom");
        assert_eq!(l[1]["level"], "WARN", "a field never replaces the level");

        assert!(l[2].get("span").is_none());
        assert_eq!(l[2]["quoted"], "a \"b\"\nc");
    }
}
