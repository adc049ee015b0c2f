//! How an agent reaches its relay ([`AgentConfig`], read from the environment) and
//! what a tunnel is asked for ([`ForwardOptions`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::error::Error;
use crate::link::LinkConfig;
use crate::netstack::StackConfig;
use crate::token::Token;

/// Environment variable naming the relay's agent endpoint, `host:port`.
pub const ENV_RELAY: &str = "PORTFERRY_RELAY";
/// Environment variable holding the agent token.
pub const ENV_TOKEN: &str = "PORTFERRY_TOKEN";
/// Environment variable naming a PEM file of CA certificates to trust for the relay
/// instead of the system's roots.
pub const ENV_RELAY_CA: &str = "PORTFERRY_RELAY_CA";

/// How to reach a relay.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's agent endpoint, `host:port`; `host` is also the TLS server name.
    pub relay: String,
    /// The agent's secret.
    pub token: Token,
    /// CA certificates (PEM) to trust for the relay; the system's roots if `None`.
    pub relay_ca: Option<PathBuf>,
    /// Limit for connecting, the TLS handshake and the relay's welcome, each.
    pub connect_timeout: Duration,
    /// Limit for the relay's answer to a request.
    pub request_timeout: Duration,
    /// Heartbeats and batching of the link.
    pub link: LinkConfig,
    /// Settings of the agent's userspace stack.
    pub stack: StackConfig,
}

impl AgentConfig {
    /// A configuration with default timeouts.
    pub fn new(relay: impl Into<String>, token: Token) -> Self {
        AgentConfig {
            relay: relay.into(),
            token,
            relay_ca: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            link: LinkConfig::default(),
            stack: StackConfig::agent(),
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
        config.server_name()?;
        Ok(config)
    }

    /// The relay's host, as the name its certificate must carry.
    pub(crate) fn server_name(&self) -> Result<ServerName<'static>, Error> {
        let host = match self.relay.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                host.trim_start_matches('[').trim_end_matches(']')
            }
            _ => {
                return Err(Error::InvalidConfig {
                    name: ENV_RELAY,
                    reason: format!("{:?} is not host:port", self.relay),
                })
            }
        };
        ServerName::try_from(host.to_owned()).map_err(|_| Error::InvalidConfig {
            name: ENV_RELAY,
            reason: format!("{host:?} is not a valid host name or address"),
        })
    }
}

/// What to forward and how.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Also expose the port as raw TCP on a relay port ([`Tunnel::tcp_socket`]).
    pub unencrypted: bool,
    /// Offer HTTP/2 (ALPN `h2`) on the TLS side; needs TLS, so not with `unencrypted`.
    pub h2: bool,
    /// Where the service listens; `127.0.0.1:<port>` if `None`.
    pub local_addr: Option<SocketAddr>,
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
}
