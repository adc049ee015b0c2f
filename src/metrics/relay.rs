//! The relay's figures: a collector reading [`RelayStats`] and the relay's timing
//! histograms at scrape time, and its readiness (running, not shutting down).

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::write::{family, single};
use super::{build_info, stack, Site};
use crate::limit::Limit;
use crate::relay::{FailureReasons, RelayHandle};

/// The metrics site of `relay`: ready while it runs and has not begun to shut down.
pub(crate) fn site(relay: RelayHandle) -> Arc<dyn Site> {
    let ready = relay.clone();
    super::site(RelayCollector(relay), move || ready.is_running())
}

/// Reads a relay's figures at each scrape.
#[derive(Debug)]
struct RelayCollector(RelayHandle);

/// A handshake failure count per reason, as label values.
fn by_reason(failures: &FailureReasons) -> [(&'static str, u64); 5] {
    [
        ("timeout", failures.timeout),
        ("tls", failures.tls),
        ("hello", failures.hello),
        ("displaced", failures.displaced),
        ("proxy_header", failures.proxy_header),
    ]
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = self.0.stats();
        let e = &mut encoder;
        let size = |n: usize| n as u64;
        build_info(e, "relay")?;
        single(
            e,
            MetricType::Gauge,
            "agent_sessions",
            "Authenticated agent sessions.",
            None,
            size(stats.agent_sessions),
        )?;
        let kinds = stats.tunnels_by_kind;
        family(
            e,
            "tunnels",
            "Tunnels a live agent session serves, by kind: HTTPS (tls), HTTPS and a raw TCP port (tls+tcp), HTTPS with HTTP/2 (h2).",
            MetricType::Gauge,
            "kind",
            &[
                ("tls", size(kinds.tls)),
                ("tls+tcp", size(kinds.tls_tcp)),
                ("h2", size(kinds.h2)),
            ],
        )?;
        single(
            e,
            MetricType::Gauge,
            "leases",
            "Tunnel leases held, for agents here or away.",
            None,
            size(stats.leases),
        )?;
        single(
            e,
            MetricType::Gauge,
            "public_connections",
            "Public connections (TLS and raw TCP) admitted to a tunnel and not yet ended.",
            None,
            size(stats.public_connections),
        )?;
        single(
            e,
            MetricType::Counter,
            "public_connections_opened",
            "Public connections admitted to a tunnel.",
            None,
            stats.public_connections_opened,
        )?;
        let refusals = stats.refusals;
        let limit = |limit: Limit| (limit.name(), refusals.at(limit));
        family(
            e,
            "public_connections_refused",
            "Public connections turned away before reaching a tunnel, by reason: a limit (by its setting's name), an unknown or missing TLS server name, or a failed handshake.",
            MetricType::Counter,
            "reason",
            &[
                limit(Limit::PendingHandshakes),
                limit(Limit::Connections),
                limit(Limit::ConnectionsPerTunnel),
                limit(Limit::ConnectionsPerAgent),
                ("unknown_sni", stats.unknown_sni),
                ("handshake_failed", stats.handshake_failures.public.total()),
            ],
        )?;
        let ended = stats.endings;
        family(
            e,
            "public_connections_ended",
            "Public connections admitted that have ended, by how: both sides closed, the client closed or reset without a clean end (as most HTTP clients do once they have their response), the client failed otherwise (TLS error, timeout), the inner connection was reset (service, agent or link), idle too long, the place taken back for a newcomer, or refused by the agent (nothing listening, service down).",
            MetricType::Counter,
            "how",
            &[
                ("closed", ended.closed),
                ("client_closed", ended.client_closed),
                ("client_failed", ended.client_failed),
                ("inner_reset", ended.inner_reset),
                ("idle_timeout", ended.idle_timeout),
                ("taken_back", ended.taken_back),
                ("refused_by_agent", ended.refused_by_agent),
            ],
        )?;
        family(
            e,
            "public_bytes",
            "Bytes through the public connections, counted as each ends, by direction.",
            MetricType::Counter,
            "direction",
            &[
                ("from_clients", stats.bytes_from_clients),
                ("to_clients", stats.bytes_to_clients),
            ],
        )?;
        single(
            e,
            MetricType::Gauge,
            "pending_handshakes",
            "TLS handshakes in progress (public, and agents' until their hello is answered).",
            None,
            size(stats.pending_handshakes),
        )?;
        family(
            e,
            "public_handshake_failures",
            "Public connections closed during their handshake (TLS, or a trusted balancer's PROXY header), by reason.",
            MetricType::Counter,
            "reason",
            &by_reason(&stats.handshake_failures.public),
        )?;
        family(
            e,
            "agent_handshake_failures",
            "Agent connections closed during their TLS handshake or hello, by reason.",
            MetricType::Counter,
            "reason",
            &by_reason(&stats.handshake_failures.agent),
        )?;
        single(
            e,
            MetricType::Counter,
            "agents_unauthorized",
            "Agents refused for a missing or wrong token.",
            None,
            stats.unauthorized,
        )?;
        let refusals: Vec<(&str, u64)> = refusals
            .iter()
            .map(|(limit, count)| (limit.name(), count))
            .collect();
        family(
            e,
            "limit_refusals",
            "Connections, sessions and tunnels refused at a limit, by the limit's setting.",
            MetricType::Counter,
            "limit",
            &refusals,
        )?;
        family(
            e,
            "lease_restores",
            "Tunnel leases restored: given back to a returning agent, or taken over from the lease file at start.",
            MetricType::Counter,
            "from",
            &[
                ("reconnect", stats.leases_reclaimed),
                ("lease_file", stats.leases_restored),
            ],
        )?;
        single(
            e,
            MetricType::Counter,
            "agent_sessions_resumed",
            "Agent sessions that resumed a known agent by its ticket: links that came back.",
            None,
            stats.sessions_resumed,
        )?;
        let [tls_handshake, inner_connect] = self.0.timings();
        let seconds = Some(&Unit::Seconds);
        tls_handshake.encode(e.encode_descriptor(
            "tls_handshake_duration",
            "Time a public TLS handshake takes, from the accept (or a trusted balancer's PROXY header) to the finished handshake, for admitted connections.",
            seconds,
            MetricType::Histogram,
        )?)?;
        inner_connect.encode(e.encode_descriptor(
            "inner_connect_duration",
            "Time an inner connection to the agent takes to open (the agent's local connect included), for those that open.",
            seconds,
            MetricType::Histogram,
        )?)?;
        stack::encode(e, &stats.stacks, &stats.ended_stacks)
    }
}
