//! The relay's limits, named by type: which limit refused something
//! ([`Error::LimitReached`](crate::Error::LimitReached)), the setting and the
//! `portferry relay` flag that set it, and its number on the wire.

use std::fmt;

/// One of the relay's limits. A refusal names it on the wire, so that an agent can
/// match it; [`Limit::Unknown`] stands for one this build has no name for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Public TLS handshakes in progress (`max_pending_handshakes`).
    PendingHandshakes,
    /// Agents' handshakes in progress (`max_pending_agent_handshakes`).
    PendingAgentHandshakes,
    /// Authenticated agent sessions (`max_agent_sessions`); one token holds at most its
    /// share while others wait.
    AgentSessions,
    /// Tunnels one agent session has open (`max_tunnels_per_agent`).
    TunnelsPerAgent,
    /// Public connections of one tunnel (`max_connections_per_tunnel`).
    ConnectionsPerTunnel,
    /// Public connections of all tunnels of one agent (`max_connections_per_agent`).
    ConnectionsPerAgent,
    /// Tunnel leases of the whole relay (`max_leases`).
    Leases,
    /// Tunnel leases of one token's agents (`max_leases_per_token`).
    LeasesPerToken,
    /// Raw TCP ports of the relay's range (`tcp_ports`): none free, or this token holds
    /// its share.
    TcpPorts,
    /// Time between two takeovers of one agent's session (`min_takeover_interval`).
    TakeoverInterval,
    /// Public connections of the whole relay (`max_connections`).
    Connections,
    /// A limit this build does not know, by its number on the wire; 0 from a relay too
    /// old to name its limits.
    Unknown(u8),
}

impl Limit {
    /// Every named limit, in the order of their numbers.
    pub const ALL: [Limit; 11] = [
        Limit::PendingHandshakes,
        Limit::PendingAgentHandshakes,
        Limit::AgentSessions,
        Limit::TunnelsPerAgent,
        Limit::ConnectionsPerTunnel,
        Limit::ConnectionsPerAgent,
        Limit::Leases,
        Limit::LeasesPerToken,
        Limit::TcpPorts,
        Limit::TakeoverInterval,
        Limit::Connections,
    ];

    /// The name of its setting in [`RelayConfig`](crate::relay::RelayConfig), like
    /// `max_leases_per_token`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::PendingHandshakes => "max_pending_handshakes",
            Limit::PendingAgentHandshakes => "max_pending_agent_handshakes",
            Limit::AgentSessions => "max_agent_sessions",
            Limit::TunnelsPerAgent => "max_tunnels_per_agent",
            Limit::ConnectionsPerTunnel => "max_connections_per_tunnel",
            Limit::ConnectionsPerAgent => "max_connections_per_agent",
            Limit::Leases => "max_leases",
            Limit::LeasesPerToken => "max_leases_per_token",
            Limit::TcpPorts => "tcp_ports",
            Limit::TakeoverInterval => "min_takeover_interval",
            Limit::Connections => "max_connections",
            Limit::Unknown(_) => "an unknown limit",
        }
    }

    /// The `portferry relay` flag that sets it, if there is one.
    pub fn flag(self) -> Option<&'static str> {
        Some(match self {
            Limit::PendingHandshakes | Limit::PendingAgentHandshakes => "--max-pending-handshakes",
            Limit::AgentSessions => "--max-agent-sessions",
            Limit::TunnelsPerAgent => "--max-tunnels-per-agent",
            Limit::ConnectionsPerTunnel => "--max-connections-per-tunnel",
            Limit::ConnectionsPerAgent => "--max-connections-per-agent",
            Limit::Leases => "--max-leases",
            Limit::LeasesPerToken => "--max-leases-per-token",
            Limit::TcpPorts => "--tcp-ports",
            Limit::Connections => "--max-connections",
            Limit::TakeoverInterval | Limit::Unknown(_) => return None,
        })
    }

    /// Its number on the wire (never 0, which stands for "not named").
    pub fn code(self) -> u8 {
        match self {
            Limit::Unknown(code) => code,
            named => {
                let index = Limit::ALL
                    .iter()
                    .position(|limit| *limit == named)
                    .expect("every named limit is in ALL");
                index as u8 + 1
            }
        }
    }

    /// The limit numbered `code` on the wire.
    pub fn from_code(code: u8) -> Limit {
        match usize::from(code).checked_sub(1) {
            Some(index) if index < Limit::ALL.len() => Limit::ALL[index],
            _ => Limit::Unknown(code),
        }
    }
}

impl fmt::Display for Limit {
    /// The setting's name, like `max_leases_per_token`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Unknown(0) => f.write_str("a limit the relay did not name"),
            Limit::Unknown(code) => write!(f, "limit number {code}"),
            named => f.write_str(named.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_go_there_and_back_and_unknown_ones_are_kept() {
        for limit in Limit::ALL {
            assert_ne!(limit.code(), 0);
            assert_eq!(Limit::from_code(limit.code()), limit);
        }
        assert_eq!(Limit::LeasesPerToken.code(), 8, "numbers never change");
        for code in [0, 12, 255] {
            assert_eq!(Limit::from_code(code), Limit::Unknown(code));
            assert_eq!(Limit::Unknown(code).code(), code);
        }
        assert_eq!(Limit::LeasesPerToken.to_string(), "max_leases_per_token");
    }
}
