//! What the harness and the fuzz target see of a [`Registry`] beyond what the relay
//! uses: the invariants its tables keep at every step, and views for checking them.

use std::collections::HashMap;

use super::{AgentKey, Owner, Registry};
use crate::relay::leases::LeaseRecord;

impl Registry {
    /// Panics unless the tables agree: every index points at the tunnel it names, every
    /// tunnel a session serves is in that session's ports, and a tunnel nobody serves is
    /// leased.
    pub(crate) fn check(&self) {
        for (hostname, tunnel) in &self.tunnels {
            match tunnel.owner {
                Owner::Session(id) => {
                    let entry = self.sessions.get(&id).expect("a tunnel's session is live");
                    assert_eq!(entry.ports.get(&tunnel.port), Some(hostname), "{id:?}");
                }
                Owner::Away { .. } => assert!(tunnel.lease.is_some(), "{hostname} unleased"),
            }
            if let Some(key) = tunnel.lease {
                assert_eq!(self.leases.get(&(key, tunnel.port)), Some(hostname));
            }
        }
        for ((key, port), hostname) in &self.leases {
            let tunnel = self.tunnels.get(hostname).expect("a lease's tunnel exists");
            assert_eq!(
                (tunnel.lease, tunnel.port),
                (Some(*key), *port),
                "{hostname}"
            );
        }
        let mut per_token: HashMap<usize, usize> = HashMap::new();
        for (agent, _) in self.leases.keys() {
            *per_token.entry(agent.1).or_default() += 1;
        }
        for (token, count) in &per_token {
            assert_eq!(
                self.leases_of_token(*token),
                *count,
                "leases of token {token}"
            );
        }
        assert_eq!(
            self.lease_places.len(),
            self.leases.len(),
            "a place per lease"
        );
        assert!(
            self.leases.len() <= self.max_leases,
            "more leases than allowed"
        );
        assert!(
            per_token.values().all(|&n| n <= self.max_leases_per_token),
            "a token holds more leases than allowed"
        );
        let mut per_agent: HashMap<AgentKey, usize> = HashMap::new();
        for (agent, _) in self.leases.keys() {
            *per_agent.entry(*agent).or_default() += 1;
        }
        for (agent, session, leases) in self.agents.summary() {
            if let Some(id) = session {
                assert!(
                    self.sessions.contains_key(&id),
                    "an agent's session is live"
                );
            }
            assert!(session.is_some() || leases > 0, "an idle agent is kept");
            assert_eq!(per_agent.remove(&agent).unwrap_or(0), leases, "{agent:?}");
        }
        assert!(per_agent.is_empty(), "leases of unknown agents");
    }

    /// Who serves `hostname` (any case) now.
    pub(crate) fn owner(&self, hostname: &str) -> Option<Owner> {
        Some(self.tunnels.get(&hostname.to_ascii_lowercase())?.owner)
    }

    /// Live sessions.
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Every lease, as records for the lease file.
    pub(crate) fn lease_records(&self) -> Vec<LeaseRecord> {
        self.leases
            .iter()
            .filter_map(|(&(agent, port), hostname)| {
                let tunnel = self.tunnels.get(hostname)?;
                Some(LeaseRecord {
                    agent,
                    verifier: self.agents.verifier(agent)?,
                    port,
                    hostname: hostname.clone(),
                    tcp_port: tunnel.tcp.as_ref().map(|tcp| tcp.port),
                    h2: tunnel.h2,
                    unencrypted: tunnel.unencrypted,
                })
            })
            .collect()
    }
}
