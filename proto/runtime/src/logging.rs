//! Structured logs for both services: text by default, JSON on request,
//! filtered by `RUST_LOG`. Secrets never reach here: secret types have
//! redacted `Debug` and no `Display`.

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber (once; later calls are ignored). Logs go to stderr.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The `x-request-id` metadata key carried from the uploader into the vault's audit events.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of a call, or a new one when the caller sent none or sent
/// something unusable (over 128 bytes or not visible ASCII). New ids are
/// UUIDv7: time-ordered, so the audit log's request-id index grows at its end
/// instead of dirtying a random page per event.
pub fn request_id<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(new_request_id, str::to_owned)
}

/// Whether a caller's request id is kept: 1 to 128 visible ASCII characters.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A new request id (UUIDv7).
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
