//! What the relay knows of a public connection, handed to the agent with it: who the
//! client is and how it reached the relay.
//!
//! The relay writes it as the first bytes of every inner connection (a
//! `Connection` frame, protocol version 2 on), before any byte of the client's; the
//! agent reads it off before the connection is served. Only the relay writes inner
//! connections, and it learns the client's address from its own socket (or from a
//! PROXY protocol header of a balancer it was told to trust), never from an agent.

use std::net::{SocketAddr, SocketAddrV6};

/// Who a public connection comes from and how it reached the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    id: u64,
    client: SocketAddr,
    relay_addr: SocketAddr,
    edge: Edge,
}

/// How a public connection reached the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Edge {
    /// Through the relay's TLS port, which terminated TLS.
    Tls {
        /// The server name (SNI) the client asked for: the tunnel's hostname.
        server_name: String,
        /// The application protocol negotiated with the client (ALPN), such as `h2` or
        /// `http/1.1`, if any.
        alpn: Option<Vec<u8>>,
    },
    /// Through the tunnel's raw TCP port ([`ConnectionInfo::relay_addr`]'s port), bytes as
    /// the client sent them.
    Tcp,
}

impl ConnectionInfo {
    /// A connection numbered `id` from `client` to the relay's `relay_addr`, through
    /// `edge`. IPv4 addresses mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack
    /// socket reports) are taken as the IPv4 addresses they are; IPv6 flow labels and
    /// scope ids are not kept.
    pub fn new(id: u64, client: SocketAddr, relay_addr: SocketAddr, edge: Edge) -> Self {
        Self {
            id,
            client: canonical(client),
            relay_addr: canonical(relay_addr),
            edge,
        }
    }

    /// The connection's number at its relay: unique among the relay's connections since
    /// it started, and the `id` of its line in the relay's access log.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The public client's address and port, as the relay saw it (or as a trusted
    /// balancer in front of the relay reported it).
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The relay's address that the client connected to.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }

    /// How the client reached the relay: TLS (with its server name and ALPN) or the raw
    /// TCP port.
    pub fn edge(&self) -> &Edge {
        &self.edge
    }
}

/// `address` without what the wire does not carry, and an IPv4-mapped IPv6 address as
/// the IPv4 address it stands for.
fn canonical(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V4(_) => address,
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0).into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_is_ipv4_and_ipv6_loses_scope() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().unwrap();
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 443, 7, 3));
        let info = ConnectionInfo::new(1, mapped, scoped, Edge::Tcp);
        assert_eq!(info.client(), "192.0.2.7:4000".parse().unwrap());
        assert_eq!(info.relay_addr(), "[fe80::1]:443".parse().unwrap());
    }
}
