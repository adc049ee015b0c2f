//! The lease file: what a relay keeps across restarts so that reconnecting agents get
//! their hostnames and TCP ports back. One line per lease; a damaged line is skipped.

use std::path::Path;

use super::registry::AgentKey;
use crate::state_dir::StateDir;

/// One lease as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRecord {
    /// The agent it is leased to.
    pub(crate) agent: AgentKey,
    /// The agent's (inner) port.
    pub(crate) port: u16,
    /// The tunnel's hostname.
    pub(crate) hostname: String,
    /// Its raw TCP port, if unencrypted.
    pub(crate) tcp_port: Option<u16>,
    pub(crate) h2: bool,
    pub(crate) unencrypted: bool,
}

impl LeaseRecord {
    /// One line of the lease file: identity (hex), token index, port, hostname, TCP port
    /// (`-` if none), h2 (0/1), unencrypted (0/1).
    pub(crate) fn to_line(&self) -> String {
        let (identity, token) = &self.agent;
        let identity: String = identity.iter().map(|b| format!("{b:02x}")).collect();
        let tcp_port = self
            .tcp_port
            .map_or("-".to_string(), |port| port.to_string());
        format!(
            "{identity} {token} {} {} {tcp_port} {} {}\n",
            self.port,
            self.hostname,
            u8::from(self.h2),
            u8::from(self.unencrypted)
        )
    }

    /// Reads a line written by [`to_line`](Self::to_line); `None` if it is damaged.
    pub(crate) fn from_line(line: &str) -> Option<LeaseRecord> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [identity, token, port, hostname, tcp_port, h2, unencrypted] = fields[..] else {
            return None;
        };
        if identity.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(identity.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
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
            agent: (id, token.parse().ok()?),
            port: port.parse().ok()?,
            hostname: hostname.to_ascii_lowercase(),
            tcp_port,
            h2: flag(h2)?,
            unencrypted: flag(unencrypted)?,
        })
    }
}

/// Writes `records` to the lease file at `path` through the [`StateDir`] that holds it
/// (created or tightened to 0700, the file 0600, replaced atomically and durably); a
/// failure is logged.
pub(crate) fn save(path: &Path, records: &[LeaseRecord]) {
    let text: String = records.iter().map(LeaseRecord::to_line).collect();
    let written =
        StateDir::open_parent_of(path).and_then(|(dir, name)| dir.write(name, text.as_bytes()));
    if let Err(error) = written {
        tracing::warn!(%error, "could not save the tunnel leases");
    }
}

/// The leases in the file at `path`; none if there is no such file.
pub(crate) fn load(path: &Path) -> Vec<LeaseRecord> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines().filter_map(LeaseRecord::from_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_saved_and_read_back_exactly() {
        let lease = LeaseRecord {
            agent: ([0xa5; 16], 2),
            port: 8000,
            hostname: "abc.portferry.localhost".into(),
            tcp_port: Some(20_001),
            h2: false,
            unencrypted: true,
        };
        let line = lease.to_line();
        let read = LeaseRecord::from_line(line.trim_end()).unwrap();
        assert_eq!((read.agent, read.port), (([0xa5; 16], 2), 8000));
        assert_eq!(
            (read.hostname.as_str(), read.tcp_port),
            ("abc.portferry.localhost", Some(20_001))
        );
        assert_eq!((read.h2, read.unencrypted), (false, true));
        assert_eq!(read, lease);
        for damaged in [
            "",
            "zz 0 1 a - 0 0",
            &line[..line.len() - 3],
            &line.replace(" 1\n", " 2"),
        ] {
            assert!(LeaseRecord::from_line(damaged).is_none(), "{damaged:?}");
        }
    }
}
