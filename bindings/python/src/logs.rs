//! The crate's `tracing` events as Python `logging` records, under the `portferry`
//! logger (a module's events under its child: `portferry.agent.reconnect`).
//!
//! Events happen on the runtime's threads, which never take the GIL: a thread waiting
//! for the GIL while holding one of the agent's locks could deadlock with a Python
//! thread closing a tunnel, and hangs at interpreter exit. So a layer queues each event
//! (bounded; what does not fit is counted and reported), and a Python thread
//! (`portferry/_logging.py`) takes them off the queue and logs them. Levels are
//! filtered before formatting, at the level Python last reported for the `portferry`
//! logger.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

use crate::process::PerProcess;

/// Records kept for the Python side at most; more are dropped and counted.
const QUEUE_BOUND: usize = 1024;

/// Python's `logging.WARNING`: the level until Python says otherwise.
const DEFAULT_LEVEL: u8 = 30;

/// The lowest Python level the `portferry` logger handles.
static MIN_LEVEL: AtomicU8 = AtomicU8::new(DEFAULT_LEVEL);

static QUEUE: PerProcess<LogQueue> = PerProcess::new();

/// A record on its way to Python: `(logger, level, message, file, line)`.
type Record = (String, u8, String, String, u32);

struct LogQueue {
    records: Mutex<VecDeque<Record>>,
    arrived: Condvar,
    dropped: AtomicU64,
}

fn queue() -> &'static LogQueue {
    let made = QUEUE.get_or_try_init(|| {
        Ok::<_, std::convert::Infallible>(LogQueue {
            records: Mutex::new(VecDeque::with_capacity(QUEUE_BOUND)),
            arrived: Condvar::new(),
            dropped: AtomicU64::new(0),
        })
    });
    match made {
        Ok(queue) => queue,
        Err(never) => match never {},
    }
}

/// Python's number for a `tracing` level (`TRACE` is 5, below `logging.DEBUG`).
fn python_level(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// The logger of a `tracing` target: `portferry::agent::reconnect` is
/// `portferry.agent.reconnect`; another crate's target goes under `portferry.`.
fn logger_name(target: &str) -> String {
    let dotted = target.replace("::", ".");
    if dotted == "portferry" || dotted.starts_with("portferry.") {
        dotted
    } else {
        format!("portferry.{dotted}")
    }
}

/// Installs the layer as this process's `tracing` subscriber (once; a second call, or
/// another subscriber already there, leaves things as they are).
pub(crate) fn install() {
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(PythonLogLayer),
    );
}

/// The `tracing` layer that queues events for Python.
struct PythonLogLayer;

impl<S: Subscriber> Layer<S> for PythonLogLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // Python's level can change at any time: ask `enabled` each time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        python_level(metadata.level()) >= MIN_LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let mut message = Message::default();
        event.record(&mut message);
        let record = (
            logger_name(metadata.target()),
            python_level(metadata.level()),
            message.text,
            metadata.file().unwrap_or_default().to_owned(),
            metadata.line().unwrap_or_default(),
        );
        let queue = queue();
        let mut records = queue.records.lock().unwrap_or_else(PoisonError::into_inner);
        if records.len() >= QUEUE_BOUND {
            queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        records.push_back(record);
        queue.arrived.notify_one();
    }
}

/// An event's message, then its other fields as `name=value`.
#[derive(Default)]
struct Message {
    text: String,
}

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let separator = if self.text.is_empty() { "" } else { " " };
        let _ = if field.name() == "message" {
            write!(self.text, "{separator}{value:?}")
        } else {
            write!(self.text, "{separator}{}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

/// Sets the lowest level (Python's numbers) worth queueing.
#[pyfunction]
pub(crate) fn set_log_level(level: u8) {
    MIN_LEVEL.store(level, Ordering::Relaxed);
}

/// Waits, without the GIL, up to `timeout` seconds for records and takes them all:
/// `(logger, level, message, file, line)` tuples, with one warning more if some were
/// dropped.
#[pyfunction]
pub(crate) fn take_log_records(py: Python<'_>, timeout: f64) -> Vec<Record> {
    let timeout = Duration::try_from_secs_f64(timeout).unwrap_or_default();
    py.detach(|| {
        let queue = queue();
        let records = queue.records.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut records, _) = queue
            .arrived
            .wait_timeout_while(records, timeout, |records| records.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        let mut taken: Vec<Record> = records.drain(..).collect();
        let dropped = queue.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            taken.push((
                "portferry".into(),
                DEFAULT_LEVEL,
                format!("{dropped} log records dropped: they came faster than Python logged them"),
                file!().into(),
                line!(),
            ));
        }
        taken
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_become_loggers_under_portferry() {
        assert_eq!(logger_name("portferry"), "portferry");
        assert_eq!(
            logger_name("portferry::agent::reconnect"),
            "portferry.agent.reconnect"
        );
        assert_eq!(logger_name("rustls::client"), "portferry.rustls.client");
        assert_eq!(logger_name("portferryx"), "portferry.portferryx");
    }

    #[test]
    fn levels_are_pythons_numbers() {
        let levels = [
            Level::TRACE,
            Level::DEBUG,
            Level::INFO,
            Level::WARN,
            Level::ERROR,
        ];
        let numbers: Vec<u8> = levels.iter().map(python_level).collect();
        assert_eq!(numbers, [5, 10, 20, 30, 40]);
    }
}
