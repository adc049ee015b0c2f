//! Who an agent is across its links: each agent's ticket verifier, newest session, the
//! moment its session was last claimed, and how many leases it holds; and the decision
//! on a hello's `resume` ([`Agents::claim`]), with takeovers rate-limited.
//!
//! An agent is known while it has a live session or a lease, and is forgotten after: a
//! later ticket of it is then a stranger's, and makes a new agent. No I/O and no clock.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::registry::SessionId;
use super::ticket::{Selector, Ticket, Verifier};

/// Who an agent is across its links: its ticket's selector and the index of the token
/// it used.
pub(crate) type AgentKey = (Selector, usize);

/// A hello's claim to be an agent whose tunnels are leased: a known agent whose ticket
/// it presented, or a new one with a fresh ticket.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub(crate) agent: AgentKey,
    ticket: Ticket,
    verifier: Verifier,
    /// Whether the ticket was a known agent's: its link came back.
    pub(crate) resumed: bool,
}

impl Claim {
    /// The ticket the welcome carries.
    pub(crate) fn ticket(&self) -> Bytes {
        self.ticket.to_bytes()
    }

    /// What verifies the ticket.
    pub(crate) fn verifier(&self) -> Verifier {
        self.verifier
    }
}

/// A takeover refused: the agent's session was claimed too recently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooSoon {
    /// The least time between takeovers.
    pub(crate) interval: Duration,
}

/// One known agent.
#[derive(Debug)]
struct Entry {
    verifier: Verifier,
    /// Its newest session, while that lives.
    session: Option<SessionId>,
    /// When its newest session's link was claimed, while that session (or the claim)
    /// may still hold it: a takeover comes no sooner than the interval after.
    claimed: Option<Instant>,
    /// Leases it holds, here or away.
    leases: usize,
}

/// The known agents.
#[derive(Debug)]
pub(crate) struct Agents {
    entries: HashMap<AgentKey, Entry>,
    min_takeover_interval: Duration,
}

impl Agents {
    /// No agent yet; takeovers at most once per `min_takeover_interval`.
    pub(crate) fn new(min_takeover_interval: Duration) -> Agents {
        Agents {
            entries: HashMap::new(),
            min_takeover_interval,
        }
    }

    /// Decides who a hello with token `token` and a non-empty `resume` is, at `now`: the
    /// known agent whose ticket `resume` is (the ticket matching in constant time), or a
    /// new agent with a fresh ticket. A known agent whose session was claimed less than
    /// the interval ago, and may still be held, is refused.
    pub(crate) fn claim(
        &mut self,
        token: usize,
        resume: &[u8],
        now: Instant,
    ) -> Result<Claim, TooSoon> {
        if let Some(ticket) = Ticket::parse(resume) {
            let agent = (ticket.selector(), token);
            if let Some(entry) = self.entries.get_mut(&agent) {
                if entry.verifier.matches(&ticket) {
                    let interval = self.min_takeover_interval;
                    if entry.claimed.is_some_and(|at| now < at + interval) {
                        return Err(TooSoon { interval });
                    }
                    entry.claimed = Some(now);
                    let verifier = entry.verifier;
                    return Ok(Claim {
                        agent,
                        ticket,
                        verifier,
                        resumed: true,
                    });
                }
            }
        }
        loop {
            let ticket = Ticket::generate();
            let agent = (ticket.selector(), token);
            if !self.entries.contains_key(&agent) {
                let verifier = ticket.verifier();
                return Ok(Claim {
                    agent,
                    ticket,
                    verifier,
                    resumed: false,
                });
            }
        }
    }

    /// Session `id` of `claim`'s agent starts at `now`; the agent's older session, if
    /// one is still live (to be closed: the newest wins).
    pub(crate) fn start(
        &mut self,
        claim: &Claim,
        id: SessionId,
        now: Instant,
    ) -> Option<SessionId> {
        let entry = self.entries.entry(claim.agent).or_insert(Entry {
            verifier: claim.verifier,
            session: None,
            claimed: None,
            leases: 0,
        });
        entry.claimed = Some(now);
        entry.session.replace(id)
    }

    /// Session `id` of `agent` has ended: if it was the newest, the agent is away, and
    /// a link of it that comes back is no takeover.
    pub(crate) fn end(&mut self, agent: AgentKey, id: SessionId) {
        if let Some(entry) = self.entries.get_mut(&agent) {
            if entry.session == Some(id) {
                entry.session = None;
                entry.claimed = None;
            }
        }
        self.forget_if_idle(agent);
    }

    /// Whether `id` is `agent`'s newest session.
    pub(crate) fn is_newest(&self, agent: AgentKey, id: SessionId) -> bool {
        self.entries
            .get(&agent)
            .is_some_and(|entry| entry.session == Some(id))
    }

    /// The verifier of a known agent's ticket.
    pub(crate) fn verifier(&self, agent: AgentKey) -> Option<Verifier> {
        Some(self.entries.get(&agent)?.verifier)
    }

    /// `agent` (known, or restored with `verifier`) has one lease more. Refused if the
    /// agent is known by another verifier.
    pub(crate) fn add_lease(&mut self, agent: AgentKey, verifier: Verifier) -> bool {
        let entry = self.entries.entry(agent).or_insert(Entry {
            verifier,
            session: None,
            claimed: None,
            leases: 0,
        });
        if entry.verifier != verifier {
            return false;
        }
        entry.leases += 1;
        true
    }

    /// `agent` has one lease less.
    pub(crate) fn remove_lease(&mut self, agent: AgentKey) {
        if let Some(entry) = self.entries.get_mut(&agent) {
            entry.leases = entry.leases.saturating_sub(1);
        }
        self.forget_if_idle(agent);
    }

    /// Every lease has ended (the relay stops).
    pub(crate) fn clear_leases(&mut self) {
        self.entries.retain(|_, entry| {
            entry.leases = 0;
            entry.session.is_some()
        });
    }

    fn forget_if_idle(&mut self, agent: AgentKey) {
        if self
            .entries
            .get(&agent)
            .is_some_and(|entry| entry.session.is_none() && entry.leases == 0)
        {
            self.entries.remove(&agent);
        }
    }

    /// Each known agent's newest session and lease count.
    #[cfg(any(test, feature = "harness"))]
    pub(crate) fn summary(
        &self,
    ) -> impl Iterator<Item = (AgentKey, Option<SessionId>, usize)> + '_ {
        self.entries
            .iter()
            .map(|(agent, entry)| (*agent, entry.session, entry.leases))
    }
}
