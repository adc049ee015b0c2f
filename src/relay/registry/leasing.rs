//! The leases of a [`Registry`]: counting them against the limits, restoring them from
//! the lease file, expiring them, and the changes the lease writer saves.

use tokio::time::Instant;

use super::{AgentKey, Owner, Registry, TcpPort, Tunnel};
use crate::limit::Limit;
use crate::relay::leases::{LeaseChange, LeaseKey, LeaseRecord};
use crate::relay::pool::AddressPool;
use crate::relay::share::Admission;
use crate::relay::ticket::Verifier;

impl Registry {
    /// Records the lease `key` of `hostname`, for the agent whose ticket `verifier`
    /// verifies, taking back an away agent's lease if it must (that tunnel ends); the
    /// hostname it replaces, if any.
    pub(super) fn add_lease(
        &mut self,
        key: LeaseKey,
        hostname: String,
        verifier: Verifier,
    ) -> Option<String> {
        let stale = self.leases.insert(key, hostname);
        if stale.is_none() {
            self.agents.add_lease(key.0, verifier);
            let (place, taken_back) = match self.lease_shares.admit(key.0 .1, key.0) {
                Admission::Taken(place) => (Some(place), None),
                Admission::TakenBack { place, from } => (Some(place), Some(from)),
                // Checked by `lease_limit` under the same lock; a restored lease is
                // checked the same way.
                Admission::Refused => (None, None),
            };
            if let Some(place) = place {
                self.lease_places.insert(key, place);
                self.lease_of_place.insert(place, key);
            }
            let victim = taken_back.and_then(|from| self.lease_of_place.get(&from).copied());
            if let Some(victim) = victim.and_then(|victim| self.leases.get(&victim).cloned()) {
                self.end_tunnel(&victim);
            }
        }
        stale
    }

    /// Forgets the lease `key`.
    pub(super) fn remove_lease(&mut self, key: LeaseKey) {
        if self.leases.remove(&key).is_none() {
            return;
        }
        self.agents.remove_lease(key.0);
        if let Some(place) = self.lease_places.remove(&key) {
            self.lease_of_place.remove(&place);
            self.lease_shares.release(place);
        }
    }

    /// Marks the lease `key` as one an agent that is away holds (it yields to a new
    /// lease at the limits), or no longer.
    pub(super) fn yield_lease(&mut self, key: LeaseKey, away: bool) {
        if let Some(&place) = self.lease_places.get(&key) {
            self.lease_shares.set_yielding(place, away);
        }
    }

    /// The lease limit a new lease of `agent` would go beyond, and its value; `None` if
    /// it may have one more (perhaps by taking back a lease of an agent that is away).
    pub(crate) fn lease_limit(&self, agent: AgentKey) -> Option<(Limit, usize)> {
        if self.lease_shares.would_admit(agent.1, agent) {
            None
        } else if self.lease_shares.at_cap(agent.1) {
            Some((Limit::LeasesPerToken, self.max_leases_per_token))
        } else {
            Some((Limit::Leases, self.max_leases))
        }
    }

    /// Leases the agents of `token` hold, here or away.
    #[cfg(any(test, feature = "harness"))]
    pub(crate) fn leases_of_token(&self, token: usize) -> usize {
        self.lease_shares.held_by(token)
    }

    /// Leases held now, by agents here or away.
    pub(crate) fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Ends the leases of agents that stayed away past their grace period.
    pub(crate) fn expire(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .tunnels
            .iter()
            .filter(|(_, t)| matches!(t.owner, Owner::Away { until } if until <= now))
            .map(|(hostname, _)| hostname.clone())
            .collect();
        for hostname in expired {
            self.end_tunnel(&hostname);
        }
    }

    /// When the next lease ends unless its agent is back: the moment to call
    /// [`expire`](Self::expire) at.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.tunnels
            .values()
            .filter_map(|t| match t.owner {
                Owner::Away { until } => Some(until),
                Owner::Session(_) => None,
            })
            .min()
    }

    /// Takes over a lease a previous run saved: its hostname routes to nobody and its
    /// TCP port stays held until its agent comes back, or until `until`. Refused (the
    /// limit's name) beyond the lease limits, or for a hostname or lease already here, or
    /// for an agent known here by another ticket.
    pub(crate) fn restore(
        &mut self,
        record: LeaseRecord,
        tcp: Option<TcpPort>,
        until: Instant,
    ) -> Result<(), &'static str> {
        if let Some((limit, _)) = self.lease_limit(record.agent) {
            return Err(limit.name());
        }
        if self.tunnels.contains_key(&record.hostname) || self.leases.contains_key(&record.key()) {
            return Err("a duplicate");
        }
        if self
            .agents
            .verifier(record.agent)
            .is_some_and(|known| known != record.verifier)
        {
            return Err("another ticket's agent");
        }
        self.lease_changes.push(LeaseChange::Put(record.clone()));
        let LeaseRecord {
            agent,
            verifier,
            port,
            hostname,
            h2,
            unencrypted,
            ..
        } = record;
        let tcp = tcp.map(|tcp| tcp.holding(self.tcp_port_place(agent.1)));
        let tunnel = Tunnel {
            port,
            h2,
            unencrypted,
            tcp,
            lease: Some(agent),
            owner: Owner::Away { until },
            connections: AddressPool::new(self.max_connections_per_tunnel),
        };
        self.tunnels.insert(hostname.clone(), tunnel);
        self.add_lease((agent, port), hostname, verifier);
        self.yield_lease((agent, port), true);
        Ok(())
    }

    /// Ends every lease (a stopped relay holds nothing for agents that may come back),
    /// without marking the leases changed: the lease file keeps them for the next run.
    pub(crate) fn drop_leases(&mut self) {
        self.tunnels.retain(|_, tunnel| tunnel.lease.is_none());
        self.leases.clear();
        for (_, place) in self.lease_places.drain() {
            self.lease_shares.release(place);
        }
        self.lease_of_place.clear();
        self.agents.clear_leases();
    }

    /// How the leases changed since the last call, in order.
    pub(crate) fn take_lease_changes(&mut self) -> Vec<LeaseChange> {
        std::mem::take(&mut self.lease_changes)
    }
}
