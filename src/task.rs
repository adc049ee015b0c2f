//! Tasks tied to their owner's life.

use tokio::task::JoinHandle;

/// Aborts a task when dropped, so that it never outlives its owner.
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
