//! Logging set-up: a `tracing` subscriber writing to stderr as text (default) or JSON, filtered
//! by `ZTUND_LOG`, else `RUST_LOG`, else the configured default level, with a handle
//! ([`LogControl`]) that changes the levels at run time for the admin server's `/logging`.
//!
//! Level specs are comma-separated directives: a bare level (`off`, `error`, `warn`, `info`,
//! `debug`, `trace`) sets the default, `target=level` sets one target (a module path such as
//! `ztund::proxy`). Changes merge into the levels in force; [`LogControl::reset`] goes back to
//! the levels at start.
//!
//! **Access logs** are events with target `access` at info level ("connection complete",
//! "connection refused", "connection closed by policy"; fields in README, "Access logs"), so
//! `access=off` turns them off independently of the rest.
//!
//! This module does not emit access logs itself; the proxies do.
//!
//! **Writing**: lines go to an in-memory batch that one thread writes to stderr at most
//! [`FLUSH_DELAY`] after the first line of the batch (and at exit), so a busy proxy pays one
//! `write` per batch instead of one per access-log line, and a slow stderr never blocks a
//! proxy thread until the batch reaches [`BATCH_LIMIT`].

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt};
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// What went wrong changing the log levels.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LogError {
    #[error(
        "log directive `{directive}`: unknown level `{level}` (use off, error, warn, info, debug or trace)"
    )]
    UnknownLevel { directive: String, level: String },
    #[error("log directive `{directive}`: target must be a module path like `ztund::proxy`")]
    BadTarget { directive: String },
    #[error("log spec `{spec}`: {reason}")]
    Filter { spec: String, reason: String },
    #[error("the log subscriber is gone: {reason}")]
    Reload { reason: String },
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn level(directive: &str, text: &str) -> Result<&'static str, LogError> {
    let lower = text.trim().to_ascii_lowercase();
    LEVELS
        .iter()
        .find(|l| **l == lower)
        .copied()
        .ok_or_else(|| LogError::UnknownLevel {
            directive: directive.to_string(),
            level: text.trim().to_string(),
        })
}

/// The levels in force: a default and per-target overrides.
#[derive(Debug, Clone, PartialEq)]
struct LevelSpec {
    default: &'static str,
    targets: BTreeMap<String, &'static str>,
}

impl LevelSpec {
    fn new(default: &'static str) -> LevelSpec {
        LevelSpec {
            default,
            targets: BTreeMap::new(),
        }
    }

    /// Applies `spec`'s directives on top of `self`.
    fn merged(&self, spec: &str) -> Result<LevelSpec, LogError> {
        let mut next = self.clone();
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match directive.split_once('=') {
                None => next.default = level(directive, directive)?,
                Some((target, lvl)) => {
                    let target = target.trim();
                    let valid = !target.is_empty()
                        && target
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_:-.".contains(c));
                    if !valid {
                        return Err(LogError::BadTarget {
                            directive: directive.to_string(),
                        });
                    }
                    next.targets
                        .insert(target.to_string(), level(directive, lvl)?);
                }
            }
        }
        Ok(next)
    }

    fn render(&self) -> String {
        let mut text = self.default.to_string();
        for (target, lvl) in &self.targets {
            text.push_str(&format!(",{target}={lvl}"));
        }
        text
    }

    fn filter(&self) -> Result<EnvFilter, LogError> {
        let spec = self.render();
        EnvFilter::try_new(&spec).map_err(|e| LogError::Filter {
            spec,
            reason: e.to_string(),
        })
    }
}

type FormatLayer = Box<dyn Layer<Registry> + Send + Sync>;
type FilterHandle = reload::Handle<EnvFilter, Layered<FormatLayer, Registry>>;

/// Changes the running subscriber's levels; cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    handle: FilterHandle,
    initial: LevelSpec,
    current: Arc<Mutex<LevelSpec>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    fn lock(&self) -> MutexGuard<'_, LevelSpec> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges `spec` (e.g. `debug` or `ztund::proxy=trace,access=off`) into the levels in
    /// force. On error nothing changes.
    pub fn set(&self, spec: &str) -> Result<(), LogError> {
        let mut current = self.lock();
        let next = current.merged(spec)?;
        self.apply(&next)?;
        *current = next;
        Ok(())
    }

    /// The levels in force, as a spec `set` accepts (e.g. `info,access=debug`).
    pub fn current(&self) -> String {
        self.lock().render()
    }

    /// Back to the levels at start.
    pub fn reset(&self) -> Result<(), LogError> {
        let mut current = self.lock();
        self.apply(&self.initial)?;
        *current = self.initial.clone();
        Ok(())
    }

    fn apply(&self, spec: &LevelSpec) -> Result<(), LogError> {
        self.handle
            .reload(spec.filter()?)
            .map_err(|e| LogError::Reload {
                reason: e.to_string(),
            })
    }
}

/// Checks a level spec (`RUST_LOG`'s value, say) the way [`init`] will read it.
pub fn check_spec(spec: &str) -> Result<(), LogError> {
    let merged = LevelSpec::new("info").merged(spec)?;
    merged.filter().map(|_| ())
}

/// Builds the subscriber and its control without installing it. `spec` is the starting level
/// spec; an invalid one falls back to `info` and the error is returned alongside.
pub fn build<W>(
    format: LogFormat,
    spec: &str,
    writer: W,
    ansi: bool,
) -> (
    impl tracing::Subscriber + Send + Sync + 'static,
    LogControl,
    Option<LogError>,
)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (initial, problem) = match LevelSpec::new("info").merged(spec) {
        Ok(initial) => (initial, None),
        Err(e) => (LevelSpec::new("info"), Some(e)),
    };
    let filter = initial.filter().unwrap_or_else(|_| EnvFilter::new("info"));
    let format_layer: FormatLayer = match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(ansi),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(writer),
        ),
    };
    let (filter_layer, handle) = reload::Layer::new(filter);
    let subscriber = Registry::default().with(format_layer).with(filter_layer);
    let control = LogControl {
        handle,
        current: Arc::new(Mutex::new(initial.clone())),
        initial,
    };
    (subscriber, control, problem)
}

/// How long the first line of a batch may wait before it is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);
/// A batch this large is written by the thread that fills it, without waiting.
pub const BATCH_LIMIT: usize = 1 << 20;

type Output = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Lines not yet written, and the lock that keeps batches in order on their way out.
struct Batch {
    lines: Mutex<Vec<u8>>,
    filled: Condvar,
    output: Mutex<Output>,
}

impl Batch {
    fn new(output: Output) -> Self {
        Batch {
            lines: Mutex::default(),
            filled: Condvar::new(),
            output: Mutex::new(output),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut lines = self.lock();
        let was_empty = lines.is_empty();
        lines.extend_from_slice(bytes);
        let full = lines.len() >= BATCH_LIMIT;
        drop(lines);
        if full {
            self.write_out();
        } else if was_empty {
            self.filled.notify_one();
        }
    }

    /// Writes whatever is batched. Errors are dropped: there is nowhere left to report them.
    fn write_out(&self) {
        let output = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut *self.lock());
        if !pending.is_empty() {
            output(&pending);
        }
    }

    /// The writer thread: sleeps until a batch starts, lets it gather, writes it.
    fn run(&self) {
        loop {
            let lines = self.lock();
            let lines = self
                .filled
                .wait_while(lines, |l| l.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            drop(lines);
            std::thread::sleep(FLUSH_DELAY);
            self.write_out();
        }
    }
}

/// The batch of the process-wide subscriber, written out by its thread and at exit.
static STDERR_BATCH: OnceLock<Arc<Batch>> = OnceLock::new();

extern "C" fn write_out_at_exit() {
    if let Some(batch) = STDERR_BATCH.get() {
        batch.write_out();
    }
}

/// Stderr through the batch; what `init` hands the format layer.
#[derive(Clone)]
struct BatchedStderr(Arc<Batch>);

impl std::io::Write for BatchedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for BatchedStderr {
    type Writer = BatchedStderr;

    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

/// The batched stderr writer, its thread started and its exit hook registered once per
/// process; `None` (write directly) if the thread cannot be started.
fn batched_stderr() -> Option<BatchedStderr> {
    if let Some(batch) = STDERR_BATCH.get() {
        return Some(BatchedStderr(batch.clone()));
    }
    let batch = start_batch(Box::new(|bytes| {
        let _ = std::io::stderr().write_all(bytes);
    }))?;
    let batch = STDERR_BATCH.get_or_init(|| batch).clone();
    // SAFETY: registers a plain function with no arguments; it only locks and writes.
    unsafe { libc::atexit(write_out_at_exit) };
    Some(BatchedStderr(batch))
}

/// A batch and its writer thread.
fn start_batch(output: Output) -> Option<Arc<Batch>> {
    let batch = Arc::new(Batch::new(output));
    let runner = batch.clone();
    std::thread::Builder::new()
        .name("ztund-log".into())
        .spawn(move || runner.run())
        .ok()?;
    Some(batch)
}

/// Displays the value if there is one and nothing otherwise: an access-log field keeps its
/// shape without formatting into a `String` first.
pub struct Optional<T>(pub Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Optional<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => Ok(()),
        }
    }
}

/// Installs the process-wide subscriber writing to stderr. Levels come from `ZTUND_LOG`, else
/// `RUST_LOG`, else `default_level`. A second call leaves the first subscriber in place (its
/// returned control then changes nothing) and says so on stderr.
pub fn init(format: LogFormat, default_level: &str) -> LogControl {
    let (source, spec) = ["ZTUND_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*name, v))
        })
        .unwrap_or(("the configured default level", default_level.to_string()));
    let ansi = std::io::stderr().is_terminal() && format == LogFormat::Text;
    let (subscriber, control, problem) = match batched_stderr() {
        Some(batched) => {
            let (subscriber, control, problem) = build(format, &spec, batched, ansi);
            (
                Box::new(subscriber) as Box<dyn tracing::Subscriber + Send + Sync>,
                control,
                problem,
            )
        }
        None => {
            let (subscriber, control, problem) = build(format, &spec, std::io::stderr, ansi);
            (
                Box::new(subscriber) as Box<dyn tracing::Subscriber + Send + Sync>,
                control,
                problem,
            )
        }
    };
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        eprintln!("ztund: logging already initialised, keeping the first subscriber: {e}");
    }
    if let Some(problem) = problem {
        tracing::warn!("ignoring log levels from {source}: {problem}; using info");
    }
    control
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[test]
    fn set_changes_what_is_written_and_reset_restores_it() {
        let out = Captured::default();
        let writer = out.clone();
        let (subscriber, control, problem) =
            build(LogFormat::Text, "info", move || writer.clone(), false);
        assert_eq!(problem, None);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "ztund::proxy", "hidden at info");
            control.set("ztund::proxy=debug").unwrap();
            tracing::debug!(target: "ztund::proxy", "shown at debug");
            tracing::debug!(target: "ztund::mesh", "other target stays at info");
            assert_eq!(control.current(), "info,ztund::proxy=debug");
            control.reset().unwrap();
            assert_eq!(control.current(), "info");
            tracing::debug!(target: "ztund::proxy", "hidden again");
        });
        let text = out.text();
        assert!(text.contains("shown at debug"), "{text}");
        assert!(!text.contains("hidden"), "{text}");
        assert!(!text.contains("other target"), "{text}");
    }

    #[test]
    fn json_format_writes_one_object_per_event_with_the_access_target() {
        let out = Captured::default();
        let writer = out.clone();
        let (subscriber, _control, _) =
            build(LogFormat::Json, "info", move || writer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            let addr = "10.0.0.1:4000";
            tracing::event!(target: "access", tracing::Level::INFO, src.addr = %addr, "connection complete");
        });
        let text = out.text();
        let event: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(event["target"], "access");
        assert_eq!(event["message"], "connection complete");
        assert_eq!(event["src.addr"], "10.0.0.1:4000");
    }

    #[test]
    fn batched_lines_arrive_whole_and_in_order_soon_after_they_are_logged() {
        let out = Captured::default();
        let sink = out.clone();
        let batch = start_batch(Box::new(move |bytes| {
            let _ = std::io::Write::write_all(&mut sink.clone(), bytes);
        }))
        .expect("writer thread");
        let writer = BatchedStderr(batch.clone());
        let (subscriber, _control, _) = build(LogFormat::Json, "info", writer, false);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::info!(target: "access", seq = i, "connection complete");
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.text().lines().count() < 100 && std::time::Instant::now() < deadline {
            std::thread::sleep(FLUSH_DELAY);
        }
        let seqs: Vec<u64> = out
            .text()
            .lines()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("whole line");
                event["seq"].as_u64().expect("seq")
            })
            .collect();
        assert_eq!(seqs, (0..100).collect::<Vec<u64>>());

        // What is still batched at exit is written by the exit hook's call.
        batch.push(b"last words\n");
        batch.write_out();
        assert!(out.text().ends_with("last words\n"), "{}", out.text());
    }

    #[test]
    fn optional_displays_the_value_or_nothing() {
        assert_eq!(Optional(Some(7)).to_string(), "7");
        assert_eq!(Optional(None::<u8>).to_string(), "");
    }

    #[test]
    fn bad_specs_are_refused_and_change_nothing() {
        let (_subscriber, control, _) =
            build(LogFormat::Text, "warn,access=debug", std::io::sink, false);
        let before = control.current();
        assert_eq!(before, "warn,access=debug");
        assert!(matches!(
            control.set("loud"),
            Err(LogError::UnknownLevel { .. })
        ));
        assert!(matches!(
            control.set("ztund::proxy=debug,x y=info"),
            Err(LogError::BadTarget { .. })
        ));
        assert_eq!(control.current(), before);
        control.set("DEBUG, access=off").unwrap();
        assert_eq!(control.current(), "debug,access=off");
    }

    #[test]
    fn an_invalid_start_spec_falls_back_to_info() {
        let (_subscriber, control, problem) =
            build(LogFormat::Text, "chatty", std::io::sink, false);
        assert!(matches!(problem, Some(LogError::UnknownLevel { .. })));
        assert_eq!(control.current(), "info");
    }
}
