//! Why a stack refused a packet, a connection or a listener.

use std::fmt;

/// Why [`Stack::ingress`] did not deliver a packet. Every case is also counted in
/// [`StackStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// Not a well-formed IPv4 packet with a TCP header.
    Malformed,
    /// An IPv4 packet of another protocol than TCP.
    NotTcp,
    /// Source or destination is not this link's pair of addresses.
    WrongAddress,
    /// Not part of any open connection.
    UnknownFlow,
    /// A SYN to a port nobody listens on: answered with a RST.
    NoListener,
    /// A SYN to a listener whose backlog is full: answered with a RST.
    BacklogFull,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dropped::Malformed => "malformed IPv4/TCP packet",
            Dropped::NotTcp => "not a TCP packet",
            Dropped::WrongAddress => "packet addressed outside this link",
            Dropped::UnknownFlow => "packet for no open connection",
            Dropped::NoListener => "connection to a port nobody listens on",
            Dropped::BacklogFull => "connection refused: accept backlog full",
            Dropped::Closed => "stack is closed",
        })
    }
}

impl std::error::Error for Dropped {}

/// Why [`Stack::connect`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer answered with a RST: nothing accepts connections on that port.
    Refused,
    /// The handshake did not complete within the configured timeout.
    TimedOut,
    /// Every local port towards that remote port is in use.
    NoFreePort,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectError::Refused => "connection refused by the peer",
            ConnectError::TimedOut => "connection handshake timed out",
            ConnectError::NoFreePort => "no free local port for another connection",
            ConnectError::Closed => "the userspace stack is closed",
        })
    }
}

impl std::error::Error for ConnectError {}

/// Why [`Stack::listen`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenError {
    /// Another listener holds this port.
    PortInUse(u16),
    /// Port 0 cannot be listened on.
    InvalidPort,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::PortInUse(port) => write!(f, "inner port {port} already has a listener"),
            ListenError::InvalidPort => f.write_str("inner port 0 cannot be listened on"),
            ListenError::Closed => f.write_str("the userspace stack is closed"),
        }
    }
}

impl std::error::Error for ListenError {}
