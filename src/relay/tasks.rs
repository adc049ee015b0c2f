//! Supervision of the relay's tasks: every task serving a session, a connection, a raw
//! TCP port or the lease expiry is registered, so that a stop can end them all and wait
//! for them to unwind.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::netstack::lock;

/// The live tasks of one relay.
#[derive(Clone, Default)]
pub(crate) struct TaskSet(Arc<Mutex<Tasks>>);

#[derive(Default)]
struct Tasks {
    next: u64,
    /// Live tasks by id; `None` while one is being spawned.
    live: HashMap<u64, Option<AbortHandle>>,
    stopped: bool,
}

impl TaskSet {
    /// Spawns a task that [`stop`](Self::stop) can end; `None` (and nothing runs) once
    /// stopped.
    pub(crate) fn spawn(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Option<AbortHandle> {
        let id = {
            let mut tasks = lock(&self.0);
            if tasks.stopped {
                return None;
            }
            let id = tasks.next;
            tasks.next += 1;
            tasks.live.insert(id, None);
            id
        };
        let tracked = Tracked {
            task: Box::pin(task),
            _guard: TaskGuard {
                tasks: self.clone(),
                id,
            },
        };
        // Not under the lock: a runtime that is shutting down drops the task (and so
        // its guard, which takes the lock) right here.
        let abort = tokio::spawn(tracked).abort_handle();
        let mut tasks = lock(&self.0);
        if let Some(slot) = tasks.live.get_mut(&id) {
            *slot = Some(abort.clone());
        }
        if tasks.stopped {
            // `stop` ran while the task was being spawned.
            abort.abort();
        }
        Some(abort)
    }

    /// Ends every task and spawns no more.
    pub(crate) fn stop(&self) {
        let live: Vec<AbortHandle> = {
            let mut tasks = lock(&self.0);
            tasks.stopped = true;
            // Each task unregisters itself once it is gone, so `stopped` can wait for it.
            tasks.live.values().flatten().cloned().collect()
        };
        for task in live {
            task.abort();
        }
    }

    /// Waits until the tasks ended by [`stop`](Self::stop) have finished unwinding.
    pub(crate) async fn stopped(&self) {
        while !lock(&self.0).live.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A task and its registration. Fields drop in order: the task (a session, say, with
/// everything it owns) is gone before the registration is.
struct Tracked {
    task: Pin<Box<dyn Future<Output = ()> + Send>>,
    _guard: TaskGuard,
}

impl Future for Tracked {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.task.as_mut().poll(cx)
    }
}

/// Unregisters a task when it ends (or is aborted).
struct TaskGuard {
    tasks: TaskSet,
    id: u64,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        lock(&self.tasks.0).live.remove(&self.id);
    }
}
