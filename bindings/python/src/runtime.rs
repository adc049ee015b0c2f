//! The one background tokio runtime every call and thread of a process shares, and
//! the blocking wait for what it computes.
//!
//! The runtime is never shut down: its worker threads are not Python threads, hold no
//! Python state and never take the GIL, so the interpreter exits without waiting for
//! them. A forked child builds a runtime of its own (see `process`).

use std::future::Future;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

use crate::errors::Failure;
use crate::process::{PerProcess, ProcessBound};

/// Worker threads of the runtime: the agent's link and the forwarded connections are
/// light work, mostly waiting.
const WORKER_THREADS: usize = 2;

/// The longest [`Task::cancel`] waits for the future to be dropped: a worker of the
/// runtime drops it as soon as it is free.
const CANCEL_WAIT: Duration = Duration::from_secs(1);

static RUNTIME: PerProcess<Runtime> = PerProcess::new();

/// This process's runtime, built on first use.
pub(crate) fn runtime() -> PyResult<&'static Runtime> {
    RUNTIME
        .get_or_try_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKER_THREADS)
                .thread_name("portferry")
                .enable_all()
                .build()
        })
        .map_err(|e| Failure::from(portferry::Error::Io(e)).into())
}

/// A future running on the runtime whose outcome a Python thread waits for, in slices
/// so that it can be interrupted (Ctrl-C) between them.
pub(crate) struct Task<T> {
    /// Aborting drops the future, which cancels what it was doing.
    abort: ProcessBound<AbortHandle>,
    /// Where the outcome arrives; `None` once taken.
    outcome: Mutex<ProcessBound<Option<Outcome<T>>>>,
}

/// The receiving end of a task's outcome.
type Outcome<T> = Receiver<Result<T, Failure>>;

/// What waiting on a [`Task`] gave.
pub(crate) enum Waited<T> {
    /// The future finished with this.
    Done(T),
    /// Not yet.
    Pending,
}

impl<T: Send + 'static> Task<T> {
    /// Runs `future` on the runtime.
    pub(crate) fn spawn(
        future: impl Future<Output = Result<T, portferry::Error>> + Send + 'static,
    ) -> PyResult<Self> {
        let (sender, receiver) = mpsc::sync_channel(1);
        let handle = runtime()?.spawn(async move {
            let _ = sender.send(future.await.map_err(Failure::from));
        });
        Ok(Task {
            abort: ProcessBound::new(handle.abort_handle()),
            outcome: Mutex::new(ProcessBound::new(Some(receiver))),
        })
    }

    /// Waits (without the GIL) up to `timeout`, or until done if `None`. Raises the
    /// future's error, and an error if the task was cancelled, its outcome already taken,
    /// or it belongs to the parent of this forked process.
    pub(crate) fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Waited<T>> {
        let timeout = timeout.map(Duration::try_from_secs_f64).transpose();
        let timeout =
            timeout.map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        // Checked before the lock, which a thread of the parent may have held at the fork.
        if self.abort.get().is_none() {
            return Err(Failure::forked().into());
        }
        let received = py.detach(|| {
            let mut outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(slot) = outcome.get_mut() else {
                return Err(Failure::forked());
            };
            let received = match (slot.as_ref(), timeout) {
                (None, _) => return Err(Failure::gone()),
                (Some(receiver), Some(timeout)) => receiver.recv_timeout(timeout),
                (Some(receiver), None) => {
                    receiver.recv().map_err(|_| RecvTimeoutError::Disconnected)
                }
            };
            match received {
                Ok(result) => {
                    *slot = None;
                    result.map(Waited::Done)
                }
                Err(RecvTimeoutError::Timeout) => Ok(Waited::Pending),
                Err(RecvTimeoutError::Disconnected) => {
                    *slot = None;
                    Err(Failure::cancelled())
                }
            }
        });
        Ok(received?)
    }

    /// Cancels the future (from any thread, also while another waits) and waits,
    /// without the GIL and at most [`CANCEL_WAIT`], until it has been dropped: what it
    /// held (a request for a port, say) is let go when this returns, so that the same
    /// port can be forwarded again at once.
    pub(crate) fn cancel(&self, py: Python<'_>) {
        let Some(abort) = self.abort.get() else {
            return;
        };
        abort.abort();
        py.detach(|| {
            let deadline = std::time::Instant::now() + CANCEL_WAIT;
            while !abort.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        // Nobody waits any more: stop the work. What it made (a tunnel) is dropped with
        // the channel, which closes it.
        if let Some(abort) = self.abort.get() {
            abort.abort();
        }
    }
}
