//! How an agent reaches its relay ([`AgentConfig`], read from the environment) and
//! what a tunnel is asked for ([`ForwardOptions`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::ProxyProtocol;
use crate::error::Error;
use crate::link::LinkConfig;
use crate::netstack::StackConfig;
use crate::token::Token;

/// Environment variable naming the relay's agent endpoint, `host:port`, or several
/// separated by commas (`a:7835,b:7835`): the agent then uses the nearest.
pub const ENV_RELAY: &str = "PORTFERRY_RELAY";
/// Environment variable holding the agent token.
pub const ENV_TOKEN: &str = "PORTFERRY_TOKEN";
/// Environment variable naming a PEM file of CA certificates to trust for the relay
/// instead of the system's roots.
pub const ENV_RELAY_CA: &str = "PORTFERRY_RELAY_CA";

/// Most relays one agent may be given: each is probed at every connect.
pub const MAX_RELAYS: usize = 16;

/// How to reach a relay. Made by [`new`](Self::new) or [`from_env`](Self::from_env);
/// every field can then be changed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The relay's agent endpoint, `host:port`; `host` is also the TLS server name.
    /// Several relays are separated by commas (`a:7835,b:7835`, at most [`MAX_RELAYS`];
    /// see [`with_relays`](Self::with_relays)): the agent probes them all and uses the
    /// nearest, and moves to the next-nearest if that one is lost for good.
    pub relay: String,
    /// The agent's secret.
    pub token: Token,
    /// CA certificates (PEM) to trust for the relay; the system's roots if `None`.
    pub relay_ca: Option<PathBuf>,
    /// Limit for connecting, the TLS handshake and the relay's welcome, each; also for
    /// connecting to the local service.
    pub connect_timeout: Duration,
    /// Limit for the relay's answer to a request.
    pub request_timeout: Duration,
    /// How often the agent pings the relay (default 5 s).
    pub ping_interval: Duration,
    /// A link on which nothing arrives for this long is dead and replaced (default 15 s).
    pub idle_timeout: Duration,
    /// Bytes of each connection's receive window on the agent's userspace stack
    /// (default 65,535; at most 4 MiB). Larger windows move more per round trip and
    /// cost that much memory per connection.
    pub socket_buffer: usize,
    /// With several relays: how long the agent keeps reconnecting to the relay it lost
    /// before it moves to the next-nearest one (default 60 s, the relay's default lease
    /// grace period, within which a relay that comes back gives the tunnels their
    /// addresses back). Set it to the relays' `RelayConfig::lease_grace`.
    pub failover_after: Duration,
    /// With several relays: how often, on average, an agent without tunnels measures
    /// them again and perhaps moves to one that has become nearer (default 5 min;
    /// each wait is jittered by ±25 %).
    pub reprobe_interval: Duration,
}

impl AgentConfig {
    /// Default of [`failover_after`](Self::failover_after): 60 s.
    pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(60);

    /// A configuration with default timeouts.
    pub fn new(relay: impl Into<String>, token: Token) -> Self {
        let link = LinkConfig::default();
        AgentConfig {
            relay: relay.into(),
            token,
            relay_ca: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            ping_interval: link.ping_interval,
            idle_timeout: link.idle_timeout,
            socket_buffer: StackConfig::agent().socket_buffer,
            failover_after: Self::DEFAULT_FAILOVER_AFTER,
            reprobe_interval: Duration::from_secs(300),
        }
    }

    /// The same, with `relays` (each `host:port`) in place of the relay: the agent
    /// uses the nearest of them.
    pub fn with_relays<S: AsRef<str>>(mut self, relays: impl IntoIterator<Item = S>) -> Self {
        let relays: Vec<String> = relays.into_iter().map(|r| r.as_ref().to_owned()).collect();
        self.relay = relays.join(",");
        self
    }

    /// The relays the agent was given, in the order given, each checked to be
    /// `host:port`; duplicates are dropped.
    pub fn relays(&self) -> Result<Vec<String>, Error> {
        let mut relays: Vec<String> = Vec::new();
        for relay in self.relay.split(',').map(str::trim) {
            server_name(relay)?;
            if !relays.iter().any(|known| known == relay) {
                relays.push(relay.to_owned());
            }
        }
        if relays.len() > MAX_RELAYS {
            return Err(Error::InvalidConfig {
                name: ENV_RELAY,
                reason: format!("{} relays given; at most {MAX_RELAYS}", relays.len()),
            });
        }
        Ok(relays)
    }

    /// The same, trusting the CA certificates in the PEM file at `path` for the relay.
    pub fn with_relay_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.relay_ca = Some(path.into());
        self
    }

    /// The link settings these fields stand for.
    pub(crate) fn link(&self) -> LinkConfig {
        LinkConfig {
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            ..LinkConfig::default()
        }
    }

    /// The settings of the agent's userspace stack.
    pub(crate) fn stack(&self) -> StackConfig {
        StackConfig {
            socket_buffer: self.socket_buffer,
            ..StackConfig::agent()
        }
    }

    /// Reads `PORTFERRY_RELAY`, `PORTFERRY_TOKEN` and `PORTFERRY_RELAY_CA`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let (relay, token) = (lookup(ENV_RELAY), lookup(ENV_TOKEN));
        let missing: Vec<_> = [(ENV_RELAY, relay.is_none()), (ENV_TOKEN, token.is_none())]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect();
        let (Some(relay), Some(token)) = (relay, token) else {
            return Err(Error::NotConfigured { missing });
        };
        let mut config = AgentConfig::new(relay, Token::new(token));
        config.relay_ca = lookup(ENV_RELAY_CA).map(PathBuf::from);
        config.relays()?;
        Ok(config)
    }
}

/// The host of `relay` (`host:port`), as the name its certificate must carry.
pub(crate) fn server_name(relay: &str) -> Result<ServerName<'static>, Error> {
    let host = match relay.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            host.trim_start_matches('[').trim_end_matches(']')
        }
        _ => {
            return Err(Error::InvalidConfig {
                name: ENV_RELAY,
                reason: format!("{relay:?} is not host:port"),
            })
        }
    };
    ServerName::try_from(host.to_owned()).map_err(|_| Error::InvalidConfig {
        name: ENV_RELAY,
        reason: format!("{host:?} is not a valid host name or address"),
    })
}

/// Where to connect for `relay` (`host:port`) when the system's resolver does not know
/// its name: the same, with a name under `.localhost` as `localhost`
/// ([`loopback_alias`]). The TLS server name stays the name given, so a balancer in
/// front of several relays on one machine can route by it (`r1.portferry.localhost`).
pub(crate) fn connect_addr(relay: &str) -> String {
    match relay.rsplit_once(':') {
        Some((host, port)) => format!("{}:{port}", loopback_alias(host)),
        None => relay.to_owned(),
    }
}

/// `host`, or `localhost` for a name under `.localhost`: every such name is this
/// machine (RFC 6761), but only curl and browsers resolve them, while `localhost`
/// itself resolves everywhere.
pub(crate) fn loopback_alias(host: &str) -> &str {
    if host.to_ascii_lowercase().ends_with(".localhost") {
        "localhost"
    } else {
        host
    }
}

/// What to forward and how: [`ForwardOptions::new`] (or `default()`), then the
/// builder methods.
///
/// ```
/// let options = portferry::ForwardOptions::new().unencrypted(true);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ForwardOptions {
    pub(crate) unencrypted: bool,
    pub(crate) h2: bool,
    /// Where the service listens, tried in order; empty for the default.
    pub(crate) local_addrs: Vec<SocketAddr>,
    /// The PROXY protocol header the service gets first, if any.
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
}

impl ForwardOptions {
    /// HTTPS only, HTTP/1.1, to `127.0.0.1:<port>` (then `[::1]:<port>`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Also expose the port as raw TCP on a relay port ([`Tunnel::tcp_socket`]).
    ///
    /// [`Tunnel::tcp_socket`]: crate::Tunnel::tcp_socket
    pub fn unencrypted(mut self, unencrypted: bool) -> Self {
        self.unencrypted = unencrypted;
        self
    }

    /// Offer HTTP/2 (ALPN `h2`) on the TLS side; needs TLS, so not with `unencrypted`.
    pub fn h2(mut self, h2: bool) -> Self {
        self.h2 = h2;
        self
    }

    /// Where the service listens, instead of `127.0.0.1:<port>` (then `[::1]:<port>`).
    pub fn local_addr(self, addr: SocketAddr) -> Self {
        self.local_addrs([addr])
    }

    /// Where the service listens, tried in order for each connection (for example what
    /// a host name resolves to).
    pub fn local_addrs(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.local_addrs = addrs.into_iter().collect();
        self
    }

    /// Start each connection to the local service with a PROXY protocol header naming
    /// the public client (and, in version 2, the TLS server name, ALPN and the relay's
    /// connection id), written before the client's first byte, as nginx
    /// (`listen … proxy_protocol`) and HAProxy (`accept-proxy`) read it. Off by default:
    /// the service gets exactly the client's bytes. Only for [`Agent::forward_with`]:
    /// a [`TunnelStream`] has the client's address as [`TunnelStream::peer_addr`].
    ///
    /// [`Agent::forward_with`]: crate::Agent::forward_with
    /// [`TunnelStream`]: crate::TunnelStream
    /// [`TunnelStream::peer_addr`]: crate::TunnelStream::peer_addr
    pub fn proxy_protocol(mut self, version: Option<ProxyProtocol>) -> Self {
        self.proxy_protocol = version;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn missing_environment_is_named() {
        let message = AgentConfig::from_lookup(lookup(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(ENV_RELAY) && message.contains(ENV_TOKEN),
            "{message}"
        );
        let message = AgentConfig::from_lookup(lookup(&[(ENV_RELAY, "relay:7000")]))
            .unwrap_err()
            .to_string();
        assert!(
            !message.contains(ENV_RELAY) && message.contains(ENV_TOKEN),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_token_too_long_for_a_frame_is_refused_before_connecting() {
        use crate::agent::Agent;
        // Port 1 on loopback: connecting would fail with RelayUnreachable instead.
        let config = AgentConfig::new("localhost:1", Token::new("t".repeat(70_000)));
        let refused = Agent::connect(config).await.unwrap_err();
        assert!(
            matches!(
                refused,
                Error::InvalidConfig {
                    name: ENV_TOKEN,
                    ..
                }
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn a_relay_under_localhost_is_reached_at_localhost_by_its_own_name() {
        assert_eq!(
            connect_addr("r1.portferry.localhost:7835"),
            "localhost:7835"
        );
        let name = server_name("r1.portferry.localhost:7835").unwrap();
        assert_eq!(name.to_str(), "r1.portferry.localhost");
        for relay in ["relay.example.com:7835", "[::1]:7835", "localhost:7835"] {
            assert_eq!(connect_addr(relay), relay);
        }
    }

    #[test]
    fn relay_must_be_host_and_port() {
        let config = AgentConfig::from_lookup(lookup(&[
            (ENV_RELAY, "relay.example:7000"),
            (ENV_TOKEN, "t"),
        ]));
        assert_eq!(config.unwrap().relay, "relay.example:7000");
        let bad =
            AgentConfig::from_lookup(lookup(&[(ENV_RELAY, "relay.example"), (ENV_TOKEN, "t")]));
        assert!(matches!(
            bad,
            Err(Error::InvalidConfig {
                name: ENV_RELAY,
                ..
            })
        ));
    }

    #[test]
    fn several_relays_are_separated_by_commas() {
        let config = AgentConfig::from_lookup(lookup(&[
            (
                ENV_RELAY,
                "a.example:7835, b.example:7835,a.example:7835,[::1]:9",
            ),
            (ENV_TOKEN, "t"),
        ]))
        .unwrap();
        assert_eq!(
            config.relays().unwrap(),
            ["a.example:7835", "b.example:7835", "[::1]:9"]
        );
        let one = AgentConfig::new("a.example:7835", Token::new("t"));
        assert_eq!(one.relays().unwrap(), ["a.example:7835"]);
        let listed = one.with_relays(["x:1", "y:2"]);
        assert_eq!(listed.relay, "x:1,y:2");
        assert_eq!(listed.relays().unwrap(), ["x:1", "y:2"]);
        for bad in ["a.example:7835,", "a.example:7835,b.example", ","] {
            let config = AgentConfig::new(bad, Token::new("t"));
            assert!(
                matches!(
                    config.relays(),
                    Err(Error::InvalidConfig {
                        name: ENV_RELAY,
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_RELAYS).map(|i| format!("r{i}:1")).collect();
        let config = AgentConfig::new("x:1", Token::new("t")).with_relays(&many);
        assert!(config.relays().is_err());
    }
}
