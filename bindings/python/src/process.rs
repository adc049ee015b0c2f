//! What belongs to one process. After `os.fork()` only the forking thread lives on in
//! the child: the parent's runtime has no threads there, and a lock one of them held
//! stays locked forever. So the child never uses (nor frees) what the parent made: it
//! leaks it, and makes its own on first use.

use std::sync::atomic::{AtomicPtr, Ordering};

/// The id of this process, which changes across `fork()`.
pub(crate) fn current_pid() -> u32 {
    std::process::id()
}

/// A value that belongs to the process that made it: dropped there as usual, leaked
/// in a forked child (whose drop would touch the parent's link and runtime).
pub(crate) struct ProcessBound<T> {
    pid: u32,
    value: Option<T>,
}

impl<T> ProcessBound<T> {
    /// Binds `value` to this process.
    pub(crate) fn new(value: T) -> Self {
        ProcessBound {
            pid: current_pid(),
            value: Some(value),
        }
    }

    /// The value, unless this is a forked child of the process that made it.
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.as_ref().filter(|_| self.pid == current_pid())
    }

    /// The value to change, unless this is a forked child of the process that made it.
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        self.value.as_mut().filter(|_| self.pid == current_pid())
    }
}

impl<T> Drop for ProcessBound<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            if self.pid != current_pid() {
                std::mem::forget(value);
            }
        }
    }
}

/// A global made on first use in each process (the runtime, the log queue). Lock-free,
/// so that no lock held by a thread that did not survive `fork()` can block the child.
pub(crate) struct PerProcess<T: 'static> {
    current: AtomicPtr<Owned<T>>,
}

struct Owned<T> {
    pid: u32,
    value: T,
}

impl<T: 'static> PerProcess<T> {
    /// Empty until first use.
    pub(crate) const fn new() -> Self {
        PerProcess {
            current: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// This process's value, made by `make` if there is none yet (also after a fork:
    /// the parent's is then leaked, never dropped).
    pub(crate) fn get_or_try_init<E>(
        &'static self,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<&'static T, E> {
        let pid = current_pid();
        let seen = self.current.load(Ordering::Acquire);
        // SAFETY: every non-null pointer stored here came from `Box::into_raw` and is
        // never freed (values are leaked on purpose), so it stays valid for 'static.
        if let Some(owned) = unsafe { seen.as_ref() } {
            if owned.pid == pid {
                return Ok(&owned.value);
            }
        }
        let made = Box::into_raw(Box::new(Owned {
            pid,
            value: make()?,
        }));
        match self
            .current
            .compare_exchange(seen, made, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: as above; `made` is now published and never freed.
            Ok(_) => Ok(unsafe { &(*made).value }),
            Err(winner) => {
                // Another thread of this process was first: ours was never published.
                // SAFETY: `made` came from `Box::into_raw` above and no one else saw it.
                drop(unsafe { Box::from_raw(made) });
                // SAFETY: as above; `winner` is non-null (it replaced `seen`).
                Ok(unsafe { &(*winner).value })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_global_is_made_once_per_process() {
        static VALUE: PerProcess<u32> = PerProcess::new();
        let first = VALUE.get_or_try_init(|| Ok::<_, ()>(1)).unwrap();
        let again = VALUE.get_or_try_init(|| Ok::<_, ()>(2)).unwrap();
        assert_eq!((*first, *again), (1, 1));
        assert!(std::ptr::eq(first, again));
    }

    #[test]
    fn a_failed_init_leaves_the_global_empty() {
        static VALUE: PerProcess<u32> = PerProcess::new();
        assert_eq!(VALUE.get_or_try_init(|| Err("no")), Err("no"));
        assert_eq!(VALUE.get_or_try_init(|| Ok::<_, &str>(3)), Ok(&3));
    }

    #[test]
    fn a_bound_value_is_given_in_its_own_process() {
        let mut bound = ProcessBound::new(String::from("here"));
        assert_eq!(bound.get().map(String::as_str), Some("here"));
        bound.get_mut().unwrap().push('!');
        assert_eq!(bound.get().map(String::as_str), Some("here!"));
    }
}
