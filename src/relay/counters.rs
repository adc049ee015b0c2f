//! The relay's event counters and timing histograms (kept with atomics as events
//! happen), and the public shapes they take in [`RelayStats`](super::RelayStats):
//! refusals by limit, handshake failures by endpoint and reason, tunnels by kind.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::splice::SpliceStats;

use super::access::Ended;
use crate::limit::Limit;

/// Refusals at each of the relay's limits ([`RelayStats::refusals`](super::RelayStats::refusals)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals([u64; Limit::ALL.len()]);

impl Refusals {
    /// Refusals at `limit` (0 for a limit this relay does not know).
    pub fn at(&self, limit: Limit) -> u64 {
        index_of(limit).map_or(0, |index| self.0[index])
    }

    /// Every limit with its refusals, in the order of [`Limit::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Limit, u64)> + '_ {
        Limit::ALL.into_iter().zip(self.0)
    }

    /// Refusals at all limits together.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Where `limit` is in [`Limit::ALL`].
fn index_of(limit: Limit) -> Option<usize> {
    Limit::ALL.iter().position(|known| *known == limit)
}

/// Why connections ended in their handshake, on one endpoint (public TLS, or the agent
/// endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureReasons {
    /// The handshake deadline ([`handshake_timeout`](super::RelayConfig::handshake_timeout)) passed.
    pub timeout: u64,
    /// A TLS error, or bytes that are not TLS.
    pub tls: u64,
    /// An agent's hello that is missing, malformed, oversized or of another protocol
    /// version (agent endpoint only).
    pub hello: u64,
    /// Its handshake place was taken back for a newcomer from an address holding fewer.
    pub displaced: u64,
    /// From a trusted balancer
    /// ([`accept_proxy_protocol_from`](super::RelayConfig::accept_proxy_protocol_from)):
    /// no valid PROXY protocol header in time.
    pub proxy_header: u64,
}

impl FailureReasons {
    /// All reasons together.
    pub fn total(&self) -> u64 {
        self.timeout + self.tls + self.hello + self.displaced + self.proxy_header
    }
}

/// Connections closed during their handshake ([`RelayStats::handshake_failures`](super::RelayStats::handshake_failures)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandshakeFailures {
    /// On the public TLS port.
    pub public: FailureReasons,
    /// On the agent endpoint (and agent streams given to the relay).
    pub agent: FailureReasons,
}

/// Tunnels routed now, by kind ([`RelayStats::tunnels_by_kind`](super::RelayStats::tunnels_by_kind)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TunnelKinds {
    /// HTTPS only, HTTP/1.1.
    pub tls: usize,
    /// HTTPS and a raw TCP port (`unencrypted`).
    pub tls_tcp: usize,
    /// HTTPS offering HTTP/2.
    pub h2: usize,
}

/// Public connections that have ended, by how ([`RelayStats::endings`](super::RelayStats::endings)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endings {
    /// Both sides closed cleanly.
    pub closed: u64,
    /// The client closed or reset its connection without a clean end (no TLS
    /// `close_notify`, or a reset): what most HTTP clients do once they have their
    /// response, and what a client that went away looks like too.
    pub client_closed: u64,
    /// The client's side failed otherwise: a TLS error, a timeout.
    pub client_failed: u64,
    /// The inner connection was reset: by the service, its agent, or a lost link.
    pub inner_reset: u64,
    /// No byte moved for the [idle timeout](super::RelayConfig::idle_timeout).
    pub idle_timeout: u64,
    /// Its place in a limit was taken back for a newcomer from an address holding fewer.
    pub taken_back: u64,
    /// The agent refused its inner connection (nothing listens, or the link is gone).
    pub refused_by_agent: u64,
}

/// The endpoint a handshake failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Public,
    Agent,
}

/// Why a handshake failed (the fields of [`FailureReasons`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    Tls,
    Hello,
    Displaced,
    ProxyHeader,
}

/// Counters of one endpoint's handshake failures, by [`Failure`].
#[derive(Debug, Default)]
struct FailureCounters([AtomicU64; 5]);

impl FailureCounters {
    fn snapshot(&self) -> FailureReasons {
        let [timeout, tls, hello, displaced, proxy_header] = self.0.each_ref().map(load);
        FailureReasons {
            timeout,
            tls,
            hello,
            displaced,
            proxy_header,
        }
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The relay's counters of events, each kept in one place.
#[derive(Debug)]
pub(crate) struct Counters {
    refusals: [AtomicU64; Limit::ALL.len()],
    public_failures: FailureCounters,
    agent_failures: FailureCounters,
    pub(crate) unknown_sni: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) public_opened: AtomicU64,
    pub(crate) sessions_resumed: AtomicU64,
    pub(crate) leases_restored: AtomicU64,
    pub(crate) bytes_from_clients: AtomicU64,
    pub(crate) bytes_to_clients: AtomicU64,
    /// Ended public connections, by the place of their [`Ended`] in [`Endings`].
    endings: [AtomicU64; 7],
    /// Seconds a public TLS handshake takes, from the accept (or a trusted balancer's
    /// PROXY header) to the finished handshake.
    pub(crate) tls_handshake: Histogram,
    /// Seconds an inner connection to the agent takes to open.
    pub(crate) inner_connect: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            refusals: Default::default(),
            public_failures: FailureCounters::default(),
            agent_failures: FailureCounters::default(),
            unknown_sni: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            public_opened: AtomicU64::new(0),
            sessions_resumed: AtomicU64::new(0),
            leases_restored: AtomicU64::new(0),
            bytes_from_clients: AtomicU64::new(0),
            bytes_to_clients: AtomicU64::new(0),
            endings: Default::default(),
            // 1 ms to about 16 s: loopback to a slow client across the world.
            tls_handshake: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 100 µs to about 3 s: the agent's accept includes its local connect.
            inner_connect: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl Counters {
    /// Counts a refusal at `limit`.
    pub(crate) fn refused(&self, limit: Limit) {
        if let Some(index) = index_of(limit) {
            add(&self.refusals[index], 1);
        }
    }

    /// Counts a connection closed during its handshake on `endpoint`, for `why`.
    pub(crate) fn failed(&self, endpoint: Endpoint, why: Failure) {
        let counters = match endpoint {
            Endpoint::Public => &self.public_failures,
            Endpoint::Agent => &self.agent_failures,
        };
        add(&counters.0[why as usize], 1);
    }

    /// Counts a public connection that ended as `how`, having moved `bytes`.
    pub(crate) fn ended(&self, how: Ended, bytes: SpliceStats) {
        add(&self.bytes_from_clients, bytes.outer_to_inner);
        add(&self.bytes_to_clients, bytes.inner_to_outer);
        let index = match how {
            Ended::Closed => 0,
            Ended::ClientFailed => 1,
            Ended::InnerReset => 2,
            Ended::Idle => 3,
            Ended::TakenBack => 4,
            Ended::Refused => 5,
            Ended::ClientClosed => 6,
        };
        add(&self.endings[index], 1);
    }

    /// The public connections ended so far, by how.
    pub(crate) fn endings(&self) -> Endings {
        let [closed, client_failed, inner_reset, idle_timeout, taken_back, refused_by_agent, client_closed] =
            self.endings.each_ref().map(load);
        Endings {
            closed,
            client_closed,
            client_failed,
            inner_reset,
            idle_timeout,
            taken_back,
            refused_by_agent,
        }
    }

    /// The refusals so far, by limit.
    pub(crate) fn refusals(&self) -> Refusals {
        Refusals(self.refusals.each_ref().map(load))
    }

    /// The handshake failures so far, by endpoint and reason.
    pub(crate) fn handshake_failures(&self) -> HandshakeFailures {
        HandshakeFailures {
            public: self.public_failures.snapshot(),
            agent: self.agent_failures.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_failures_land_under_their_own_names() {
        let counters = Counters::default();
        counters.refused(Limit::LeasesPerToken);
        counters.refused(Limit::LeasesPerToken);
        counters.refused(Limit::Connections);
        counters.refused(Limit::Unknown(200));
        let refusals = counters.refusals();
        assert_eq!(refusals.at(Limit::LeasesPerToken), 2);
        assert_eq!(refusals.at(Limit::Connections), 1);
        assert_eq!(refusals.at(Limit::Leases), 0);
        assert_eq!(refusals.total(), 3);
        assert_eq!(refusals.iter().count(), Limit::ALL.len());
        counters.failed(Endpoint::Agent, Failure::Hello);
        counters.failed(Endpoint::Public, Failure::Displaced);
        counters.failed(Endpoint::Public, Failure::Timeout);
        counters.failed(Endpoint::Public, Failure::ProxyHeader);
        let failures = counters.handshake_failures();
        assert_eq!((failures.agent.hello, failures.agent.total()), (1, 1));
        assert_eq!(failures.public.displaced, 1);
        assert_eq!(failures.public.timeout, 1);
        assert_eq!(failures.public.proxy_header, 1);
        assert_eq!(failures.public.total(), 3);
    }

    #[test]
    fn each_ending_lands_under_its_own_name_with_its_bytes() {
        let counters = Counters::default();
        let bytes = SpliceStats {
            inner_to_outer: 7,
            outer_to_inner: 3,
        };
        counters.ended(Ended::Idle, bytes);
        counters.ended(Ended::Refused, SpliceStats::default());
        counters.ended(Ended::Refused, bytes);
        let endings = counters.endings();
        assert_eq!((endings.idle_timeout, endings.refused_by_agent), (1, 2));
        assert_eq!(
            endings.closed + endings.client_failed + endings.inner_reset,
            0
        );
        assert_eq!(endings.taken_back, 0);
        assert_eq!(load(&counters.bytes_from_clients), 6);
        assert_eq!(load(&counters.bytes_to_clients), 14);
    }
}
