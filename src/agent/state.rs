//! What a tunnel is now, as the relay last told the agent: its public address
//! ([`TunnelAddress`]) and whether the relay routes it ([`TunnelState`]).

use std::sync::Arc;

use super::config::loopback_alias;
use crate::error::Error;
use crate::wire::Forwarded;

/// Where the public reaches a tunnel: its URL, TLS socket and, for an `unencrypted`
/// tunnel, its raw TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelAddress {
    hostname: String,
    tls_port: u16,
    /// Host and port of the raw TCP socket, for an `unencrypted` tunnel.
    tcp: Option<(String, u16)>,
}

impl TunnelAddress {
    /// The address the relay's answer gives.
    pub(crate) fn new(forwarded: &Forwarded) -> Self {
        // The raw TCP socket is on the relay node: the hostname without the tunnel
        // label, one that resolves with a plain `getaddrinfo`.
        let tcp = forwarded.tcp_port.map(|port| {
            let node = forwarded
                .hostname
                .split_once('.')
                .map_or(forwarded.hostname.as_str(), |(_, node)| node);
            (loopback_alias(node).to_owned(), port)
        });
        TunnelAddress {
            hostname: forwarded.hostname.clone(),
            tls_port: forwarded.tls_port,
            tcp,
        }
    }

    /// The public URL, `https://<label>.<domain>`, with `:<port>` unless it is 443.
    pub fn url(&self) -> String {
        if self.tls_port == 443 {
            format!("https://{}", self.hostname)
        } else {
            format!("https://{}:{}", self.hostname, self.tls_port)
        }
    }

    /// The TLS endpoint: the tunnel's hostname and the relay's public TLS port.
    pub fn tls_socket(&self) -> (&str, u16) {
        (&self.hostname, self.tls_port)
    }

    /// The raw TCP endpoint; only for a tunnel forwarded with `unencrypted`.
    pub fn tcp_socket(&self) -> Result<(&str, u16), Error> {
        match &self.tcp {
            Some((host, port)) => Ok((host, *port)),
            None => Err(Error::NotUnencrypted),
        }
    }
}

/// A tunnel's state, now and as it changes ([`Tunnel::state`](super::Tunnel::state)).
///
/// While the agent's link is down the relay keeps the tunnel's lease for a grace
/// period, so the state stays what it was; it changes when the agent is back and the
/// relay answers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TunnelState {
    /// The relay routes the address to the tunnel.
    Open(TunnelAddress),
    /// The relay routes this address to the tunnel, a new one: the agent was away past
    /// the relay's grace period, the relay no longer held the lease of the old address,
    /// and the old address reaches nothing.
    Moved(TunnelAddress),
    /// The relay no longer routes the tunnel and the agent will not ask again: the
    /// relay refused it after a reconnect, did not answer in time, or refuses the agent
    /// itself. Close the handle and forward again to get a new tunnel.
    Lost {
        /// The address it had, which reaches nothing now.
        address: TunnelAddress,
        /// Why.
        error: Arc<Error>,
    },
}

impl TunnelState {
    /// The tunnel's address: where the relay routes it, or for a lost tunnel where it
    /// last did.
    pub fn address(&self) -> &TunnelAddress {
        match self {
            TunnelState::Open(address) | TunnelState::Moved(address) => address,
            TunnelState::Lost { address, .. } => address,
        }
    }

    /// Whether the tunnel is [`Lost`](TunnelState::Lost): the relay no longer keeps
    /// an address for it.
    pub fn is_lost(&self) -> bool {
        matches!(self, TunnelState::Lost { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(hostname: &str, tls_port: u16, tcp_port: Option<u16>) -> Forwarded {
        Forwarded {
            request_id: 1,
            port: 8000,
            hostname: hostname.into(),
            tls_port,
            tcp_port,
        }
    }

    #[test]
    fn the_url_names_the_tls_port_unless_it_is_443() {
        let local = TunnelAddress::new(&forwarded("abc.portferry.localhost", 8443, None));
        assert_eq!(local.url(), "https://abc.portferry.localhost:8443");
        assert_eq!(local.tls_socket(), ("abc.portferry.localhost", 8443));
        let public = TunnelAddress::new(&forwarded("abc.r5.example.com", 443, None));
        assert_eq!(public.url(), "https://abc.r5.example.com");
    }

    #[test]
    fn the_tcp_socket_is_on_the_node_and_only_for_unencrypted_tunnels() {
        let local = TunnelAddress::new(&forwarded("abc.portferry.localhost", 8443, Some(20001)));
        assert_eq!(local.tcp_socket().unwrap(), ("localhost", 20001));
        let public = TunnelAddress::new(&forwarded("abc.r5.example.com", 443, Some(20002)));
        assert_eq!(public.tcp_socket().unwrap(), ("r5.example.com", 20002));
        let tls_only = TunnelAddress::new(&forwarded("abc.r5.example.com", 443, None));
        assert!(matches!(tls_only.tcp_socket(), Err(Error::NotUnencrypted)));
    }
}
