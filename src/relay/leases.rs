//! The lease file: what a relay keeps across restarts so that reconnecting agents get
//! their hostnames and TCP ports back. One line per lease; a damaged line is skipped.
//!
//! The file is written by a thread of its own ([`Writer`]), never on the runtime's
//! threads and never under the registry's lock. The registry reports each change of a
//! lease as a [`LeaseChange`]; the relay applies them, in order, to the writer's [`Book`]
//! (the leases as the file should hold them, as many as the relay's lease limits
//! allow); the thread writes the whole book through the [`StateDir`] (atomically,
//! fsynced, mode 0600) whenever it changed. Changes made while a write is under way are
//! coalesced into the next write, and the thread waits [`BATCH`] after a change for
//! more, so a burst of changes costs a write or two.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::registry::AgentKey;
use super::ticket::{from_hex, Verifier};
use crate::netstack::lock;
use crate::state_dir::{StateDir, StateError};

/// Which lease a line is: whose, and for which of its ports.
pub(crate) type LeaseKey = (AgentKey, u16);

/// One lease as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRecord {
    /// The agent it is leased to.
    pub(crate) agent: AgentKey,
    /// What verifies the agent's resume ticket (never the ticket itself).
    pub(crate) verifier: Verifier,
    /// The agent's (inner) port.
    pub(crate) port: u16,
    /// The tunnel's hostname.
    pub(crate) hostname: String,
    /// Its raw TCP port, if unencrypted.
    pub(crate) tcp_port: Option<u16>,
    pub(crate) h2: bool,
    pub(crate) unencrypted: bool,
}

/// A change of the leases, as the registry reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseChange {
    /// This lease is new (or replaces the one with its key).
    Put(LeaseRecord),
    /// The lease with this key has ended.
    Remove(LeaseKey),
}

impl LeaseRecord {
    /// Which lease this is.
    pub(crate) fn key(&self) -> LeaseKey {
        (self.agent, self.port)
    }

    /// One line of the lease file: the agent's ticket selector (32 hex digits), its
    /// ticket's SHA-256 (64 hex digits), token index, port, hostname, TCP port (`-` if
    /// none), h2 (0/1), unencrypted (0/1).
    pub(crate) fn to_line(&self) -> String {
        let (selector, token) = &self.agent;
        let selector: String = selector.iter().map(|b| format!("{b:02x}")).collect();
        let verifier = self.verifier.to_hex();
        let tcp_port = self
            .tcp_port
            .map_or("-".to_string(), |port| port.to_string());
        format!(
            "{selector} {verifier} {token} {} {} {tcp_port} {} {}\n",
            self.port,
            self.hostname,
            u8::from(self.h2),
            u8::from(self.unencrypted)
        )
    }

    /// Reads a line written by [`to_line`](Self::to_line); `None` if it is damaged.
    pub(crate) fn from_line(line: &str) -> Option<LeaseRecord> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [selector, verifier, token, port, hostname, tcp_port, h2, unencrypted] = fields[..]
        else {
            return None;
        };
        let flag = |text: &str| match text {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        let tcp_port = match tcp_port {
            "-" => None,
            port => Some(port.parse().ok()?),
        };
        Some(LeaseRecord {
            agent: (from_hex(selector)?, token.parse().ok()?),
            verifier: Verifier::from_hex(verifier)?,
            port: port.parse().ok()?,
            hostname: hostname.to_ascii_lowercase(),
            tcp_port,
            h2: flag(h2)?,
            unencrypted: flag(unencrypted)?,
        })
    }
}

/// The leases as the file should hold them: the registry's changes applied in order,
/// each with its line made once (so that the writer only joins lines).
#[derive(Debug, Default)]
pub(crate) struct Book {
    records: BTreeMap<LeaseKey, (LeaseRecord, String)>,
}

impl Book {
    /// Applies one change.
    pub(crate) fn apply(&mut self, change: LeaseChange) {
        match change {
            LeaseChange::Put(record) => {
                let line = record.to_line();
                self.records.insert(record.key(), (record, line));
            }
            LeaseChange::Remove(key) => {
                self.records.remove(&key);
            }
        }
    }

    /// The leases, in the order of their keys.
    #[cfg(any(test, feature = "harness"))]
    pub(crate) fn records(&self) -> impl Iterator<Item = &LeaseRecord> {
        self.records.values().map(|(record, _)| record)
    }

    /// The file's text.
    pub(crate) fn text(&self) -> String {
        self.records
            .values()
            .map(|(_, line)| line.as_str())
            .collect()
    }
}

/// Opens the lease file at `path`: its directory as a [`StateDir`] (created if
/// missing), the leases it holds, and a [`Writer`] for it whose book starts empty.
pub(crate) fn open(path: &Path) -> std::io::Result<(Writer, Vec<LeaseRecord>)> {
    let (dir, name) = StateDir::open_parent_of(path)?;
    let saved = load(&dir, name)?;
    let name = name.to_owned();
    Ok((Writer::start(dir, name)?, saved))
}

/// The leases in the file `name` of `dir`; none if there is no such file.
pub(crate) fn load(dir: &StateDir, name: &OsStr) -> Result<Vec<LeaseRecord>, StateError> {
    let Some(bytes) = dir.read(name)? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&bytes);
    Ok(text.lines().filter_map(LeaseRecord::from_line).collect())
}

/// How long the writing thread waits after a change for more, before it writes.
const BATCH: Duration = Duration::from_millis(10);

/// What the writing thread and the relay share.
struct Pending {
    book: Book,
    /// The book changed since the thread last took it.
    dirty: bool,
    /// No more writes after the pending one: the thread ends.
    closing: bool,
}

/// The thread that keeps the lease file up to date; see the module's docs.
pub(crate) struct Writer {
    pending: Arc<(Mutex<Pending>, Condvar)>,
    /// Becomes `true` when the thread has ended.
    done: watch::Receiver<bool>,
}

impl Writer {
    /// Starts the thread writing the file `name` of `dir`, whose book starts empty.
    pub(crate) fn start(dir: StateDir, name: OsString) -> std::io::Result<Writer> {
        let pending = Arc::new((
            Mutex::new(Pending {
                book: Book::default(),
                dirty: false,
                closing: false,
            }),
            Condvar::new(),
        ));
        let (done_tx, done) = watch::channel(false);
        let shared = pending.clone();
        std::thread::Builder::new()
            .name("portferry-leases".into())
            .spawn(move || {
                write_while_open(&shared, &dir, &name);
                done_tx.send_replace(true);
            })?;
        Ok(Writer { pending, done })
    }

    /// Applies `changes` to the book and wakes the thread if there were any. Cheap: no
    /// I/O, and the thread holds the book's lock only to take a copy of its text.
    pub(crate) fn apply(&self, changes: impl IntoIterator<Item = LeaseChange>) {
        let (pending, wake) = &*self.pending;
        let mut pending = lock(pending);
        let mut changed = false;
        for change in changes {
            pending.book.apply(change);
            changed = true;
        }
        if changed && !pending.closing {
            pending.dirty = true;
            wake.notify_one();
        }
    }

    /// Writes what is pending, then ends the thread; waits at most `limit` for it. Later
    /// changes are not saved.
    pub(crate) async fn finish(&self, limit: Duration) {
        self.close();
        let mut done = self.done.clone();
        if tokio::time::timeout(limit, done.wait_for(|done| *done))
            .await
            .is_err()
        {
            tracing::warn!(?limit, "the lease file is still being written; not waiting");
        }
    }

    fn close(&self) {
        let (pending, wake) = &*self.pending;
        lock(pending).closing = true;
        wake.notify_one();
    }
}

impl Drop for Writer {
    /// The thread finishes the pending write on its own.
    fn drop(&mut self) {
        self.close();
    }
}

/// The writing thread: waits for a change, writes the whole book, again, until closed
/// with nothing pending.
fn write_while_open(pending: &(Mutex<Pending>, Condvar), dir: &StateDir, name: &OsString) {
    let (pending, wake) = pending;
    loop {
        let text = {
            let mut guard = lock(pending);
            while !guard.dirty && !guard.closing {
                guard = wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
            }
            if !guard.dirty {
                return;
            }
            if !guard.closing {
                // Let the rest of a burst of changes in, so it costs one write.
                drop(guard);
                std::thread::sleep(BATCH);
                guard = lock(pending);
            }
            guard.dirty = false;
            guard.book.text()
        };
        if let Err(error) = dir.write(name, text.as_bytes()) {
            tracing::warn!(%error, "could not save the tunnel leases");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::ticket::Ticket;

    fn record(identity: u8, port: u16) -> LeaseRecord {
        LeaseRecord {
            agent: ([identity; 16], 2),
            verifier: Ticket::generate().verifier(),
            port,
            hostname: format!("h{identity}p{port}.portferry.localhost"),
            tcp_port: Some(20_001),
            h2: false,
            unencrypted: true,
        }
    }

    #[test]
    fn leases_are_saved_and_read_back_exactly() {
        let verifier = Ticket::generate().verifier();
        let lease = LeaseRecord {
            agent: ([0xa5; 16], 2),
            verifier,
            port: 8000,
            hostname: "abc.portferry.localhost".into(),
            tcp_port: Some(20_001),
            h2: false,
            unencrypted: true,
        };
        let line = lease.to_line();
        let read = LeaseRecord::from_line(line.trim_end()).unwrap();
        assert_eq!((read.agent, read.port), (([0xa5; 16], 2), 8000));
        assert_eq!(read.verifier, verifier);
        assert_eq!(
            (read.hostname.as_str(), read.tcp_port),
            ("abc.portferry.localhost", Some(20_001))
        );
        assert_eq!((read.h2, read.unencrypted), (false, true));
        assert_eq!(read, lease);
        for damaged in [
            "",
            "zz 0 1 a - 0 0",
            // A line of the format before tickets (an identity, no verifier).
            &line.replacen(&format!(" {}", verifier.to_hex()), "", 1),
            &line[..line.len() - 3],
            &line.replace(" 1\n", " 2"),
        ] {
            assert!(LeaseRecord::from_line(damaged).is_none(), "{damaged:?}");
        }
    }

    #[test]
    fn the_book_holds_the_latest_of_each_lease() {
        let mut book = Book::default();
        book.apply(LeaseChange::Put(record(1, 80)));
        book.apply(LeaseChange::Put(record(2, 80)));
        let mut moved = record(1, 80);
        moved.hostname = "other.portferry.localhost".into();
        book.apply(LeaseChange::Put(moved.clone()));
        book.apply(LeaseChange::Remove(record(2, 80).key()));
        book.apply(LeaseChange::Remove(record(3, 80).key()));
        assert_eq!(book.records().collect::<Vec<_>>(), [&moved]);
        assert_eq!(book.text(), moved.to_line());
    }

    #[tokio::test]
    async fn the_writer_saves_every_change_privately_and_finishes_what_is_pending() {
        let path =
            std::env::temp_dir().join(format!("portferry-leases-{:016x}", rand::random::<u64>()));
        let file = path.join("state/leases");
        let (dir, name) = StateDir::open_parent_of(&file).unwrap();
        let writer = Writer::start(dir.clone(), name.to_owned()).unwrap();
        let mut expected = Book::default();
        for i in 0..200u16 {
            let change = if i % 3 == 2 {
                LeaseChange::Remove(record(1, i - 1).key())
            } else {
                LeaseChange::Put(record(1, i))
            };
            expected.apply(change.clone());
            writer.apply([change]);
        }
        writer.finish(Duration::from_secs(10)).await;
        // Not saved: the writer has finished.
        writer.apply([LeaseChange::Put(record(9, 9))]);
        let read = load(&dir, name).unwrap();
        assert_eq!(
            read.iter().collect::<Vec<_>>(),
            expected.records().collect::<Vec<_>>()
        );
        // 134 put, 66 of them removed.
        assert_eq!(read.len(), 68);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!((mode(&file), mode(dir.path())), (0o600, 0o700));
        }
        std::fs::remove_dir_all(&path).unwrap();
    }
}
