//! The lease file: what a relay keeps across restarts so that reconnecting agents get
//! their hostnames and TCP ports back. A log of changes, one line each: a lease's line
//! puts it (replacing one with its key), a line `- <selector> <token> <port>` removes
//! it; read in order, they give the leases. A damaged line is skipped, and so is a last
//! line without its newline (an append cut by a crash).
//!
//! The file is written by a thread of its own ([`Writer`]), never on the runtime's
//! threads and never under the registry's lock. The registry reports each change of a
//! lease as a [`LeaseChange`]; the relay applies them, in order, to the writer's [`Book`]
//! (the leases as the file should hold them, as many as the relay's lease limits
//! allow) and to its log of lines to append. The thread appends the log through the
//! [`StateDir`] (fsynced, mode 0600), so a write costs what changed, not the whole
//! table; once the file holds more than twice the leases' lines (and
//! [`COMPACT_SLACK`] more), and at the first write after a start, it compacts instead:
//! it replaces the file with the book's lines, atomically. Changes made while a write
//! is under way are coalesced into the next write, and the thread waits [`BATCH`] after
//! a change for more, so a burst of changes costs a write or two.

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

/// The line of the lease file that removes the lease `key`.
fn removal_line(key: LeaseKey) -> String {
    let ((selector, token), port) = key;
    let selector: String = selector.iter().map(|b| format!("{b:02x}")).collect();
    format!("- {selector} {token} {port}\n")
}

/// Reads a line written by [`removal_line`]; `None` if it is not one.
fn parse_removal(line: &str) -> Option<LeaseKey> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let ["-", selector, token, port] = fields[..] else {
        return None;
    };
    Some((
        (from_hex(selector)?, token.parse().ok()?),
        port.parse().ok()?,
    ))
}

/// The leases as the file should hold them: the registry's changes applied in order,
/// each with its line made once (so that the writer only joins lines).
#[derive(Debug, Default)]
pub(crate) struct Book {
    records: BTreeMap<LeaseKey, (LeaseRecord, String)>,
}

impl Book {
    /// Applies one change; the line that logs it.
    pub(crate) fn apply(&mut self, change: LeaseChange) -> String {
        match change {
            LeaseChange::Put(record) => {
                let line = record.to_line();
                self.records.insert(record.key(), (record, line.clone()));
                line
            }
            LeaseChange::Remove(key) => {
                self.records.remove(&key);
                removal_line(key)
            }
        }
    }

    /// Leases in the book.
    fn len(&self) -> usize {
        self.records.len()
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

/// The leases in the file `name` of `dir`, its lines replayed in order; none if there
/// is no such file.
pub(crate) fn load(dir: &StateDir, name: &OsStr) -> Result<Vec<LeaseRecord>, StateError> {
    let Some(bytes) = dir.read(name)? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&bytes);
    // A last line without its newline is an append a crash cut short.
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    let mut leases = BTreeMap::new();
    for line in whole.lines() {
        if let Some(key) = parse_removal(line) {
            leases.remove(&key);
        } else if let Some(record) = LeaseRecord::from_line(line) {
            leases.insert(record.key(), record);
        }
    }
    Ok(leases.into_values().collect())
}

/// How long the writing thread waits after a change for more, before it writes.
const BATCH: Duration = Duration::from_millis(10);

/// Lines the file may hold beyond twice the leases' before it is compacted.
const COMPACT_SLACK: usize = 1024;

/// What the writing thread and the relay share.
struct Pending {
    book: Book,
    /// Lines logging the changes since the thread last took them, and how many.
    log: String,
    log_lines: usize,
    /// The book changed since the thread last took it.
    dirty: bool,
    /// No more writes after the pending one: the thread ends.
    closing: bool,
}

impl Pending {
    /// Takes what is to be written next into a file of `file_lines` lines (`None`: not
    /// compacted since the start, or a write failed): the log's lines to append, or the
    /// whole book once the file would hold too many lines.
    fn next_write(&mut self, file_lines: Option<usize>) -> Write {
        self.dirty = false;
        let log = std::mem::take(&mut self.log);
        let log_lines = std::mem::take(&mut self.log_lines);
        let leases = self.book.len();
        match file_lines {
            Some(lines) if lines + log_lines <= 2 * leases + COMPACT_SLACK => {
                Write::Append(log, lines + log_lines)
            }
            _ => Write::Compact(self.book.text(), leases),
        }
    }
}

/// What the thread writes next, and how many lines the file then holds.
#[derive(Debug, PartialEq, Eq)]
enum Write {
    /// These lines, appended.
    Append(String, usize),
    /// The whole book, replacing the file.
    Compact(String, usize),
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
                log: String::new(),
                log_lines: 0,
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
            let line = pending.book.apply(change);
            pending.log.push_str(&line);
            pending.log_lines += 1;
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

/// The writing thread: waits for a change, appends its lines or compacts the file,
/// again, until closed with nothing pending.
fn write_while_open(pending: &(Mutex<Pending>, Condvar), dir: &StateDir, name: &OsString) {
    let (pending, wake) = pending;
    // Lines in the file, once it has been compacted since the start.
    let mut file_lines: Option<usize> = None;
    loop {
        let write = {
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
            guard.next_write(file_lines)
        };
        let (written, lines) = match write {
            Write::Append(log, lines) => (dir.append(name, log.as_bytes()), lines),
            Write::Compact(text, lines) => (dir.write(name, text.as_bytes()), lines),
        };
        file_lines = match written {
            Ok(()) => Some(lines),
            Err(error) => {
                tracing::warn!(%error, "could not save the tunnel leases");
                // Lines may be lost: the next write replaces the file.
                None
            }
        };
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

    #[test]
    fn the_file_is_a_log_whose_writes_follow_the_changes_until_it_is_compacted() {
        let mut pending = Pending {
            book: Book::default(),
            log: String::new(),
            log_lines: 0,
            dirty: false,
            closing: false,
        };
        let log = |pending: &mut Pending, change: LeaseChange| {
            let line = pending.book.apply(change);
            pending.log.push_str(&line);
            pending.log_lines += 1;
        };
        for port in 0..2000 {
            log(&mut pending, LeaseChange::Put(record(1, port)));
        }
        // The first write after a start compacts.
        let Write::Compact(text, 2000) = pending.next_write(None) else {
            panic!("not compacted");
        };
        assert_eq!(text.lines().count(), 2000);
        // Then each write appends just its changes, however many leases there are.
        let new = record(2, 7);
        log(&mut pending, LeaseChange::Remove(record(1, 7).key()));
        log(&mut pending, LeaseChange::Put(new.clone()));
        let appended = pending.next_write(Some(2000));
        let expected = removal_line(record(1, 7).key()) + &new.to_line();
        assert_eq!(appended, Write::Append(expected, 2002));
        // Until the file would hold more than twice the leases' lines and the slack
        // (one lease more now, changed again and again).
        let most = 2 * 2001 + COMPACT_SLACK;
        for _ in 2002..most {
            log(&mut pending, LeaseChange::Put(record(3, 1)));
        }
        assert!(matches!(pending.next_write(Some(2002)), Write::Append(_, n) if n == most));
        log(&mut pending, LeaseChange::Put(record(3, 1)));
        assert!(matches!(
            pending.next_write(Some(most)),
            Write::Compact(_, 2001)
        ));
    }

    #[test]
    fn a_log_read_back_replays_removals_and_skips_a_cut_last_line() {
        let path =
            std::env::temp_dir().join(format!("portferry-leases-{:016x}", rand::random::<u64>()));
        let file = path.join("leases");
        let (dir, name) = StateDir::open_parent_of(&file).unwrap();
        let (a, b, c) = (record(1, 80), record(2, 80), record(3, 80));
        let mut moved = b.clone();
        moved.hostname = "moved.portferry.localhost".into();
        dir.write(name, (a.to_line() + &b.to_line()).as_bytes())
            .unwrap();
        let log = removal_line(a.key()) + &moved.to_line() + &c.to_line();
        // Killed in the middle of the last line.
        dir.append(name, &log.as_bytes()[..log.len() - 5]).unwrap();
        assert_eq!(load(&dir, name).unwrap(), [moved]);
        std::fs::remove_dir_all(&path).unwrap();
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
