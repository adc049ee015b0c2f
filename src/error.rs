//! The error type of the public API.

use std::fmt;
use std::io;

/// Everything that can go wrong when forwarding a port. Each message says what to do.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The port is not a number from 1 to 65535.
    InvalidPort {
        /// What was given.
        given: String,
    },
    /// This agent already forwards the port; close that tunnel first.
    PortAlreadyForwarded(u16),
    /// HTTP/2 was asked for together with an unencrypted tunnel.
    H2RequiresTls,
    /// `tcp_socket()` of a tunnel opened without `unencrypted`.
    NotUnencrypted,
    /// No relay is configured: these environment variables are missing.
    NotConfigured {
        /// The missing variables.
        missing: Vec<&'static str>,
    },
    /// A setting has a value that cannot be used.
    InvalidConfig {
        /// The setting (usually an environment variable).
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The relay could not be reached (connection refused, no route, or timeout).
    RelayUnreachable {
        /// The relay address tried.
        relay: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake with the relay failed: its certificate is not trusted (set
    /// `PORTFERRY_RELAY_CA`), or the address is not the relay's agent endpoint (for
    /// example its public port); the message says which.
    RelayTls {
        /// The relay address.
        relay: String,
        /// The TLS error.
        source: io::Error,
    },
    /// The relay refused the agent token.
    Unauthorized,
    /// The relay speaks another protocol version.
    VersionMismatch {
        /// What the relay said.
        message: String,
    },
    /// The relay refused: a limit (tunnels per agent, agents at once) is reached.
    /// Close something, or retry later.
    LimitReached {
        /// Which limit; match on it to decide what to do.
        limit: crate::Limit,
        /// The relay's message, naming the limit.
        message: String,
    },
    /// The relay refused a request for another reason.
    Refused {
        /// The relay's message.
        message: String,
    },
    /// The relay did not answer in time.
    Timeout {
        /// What was being waited for.
        waiting_for: &'static str,
    },
    /// The link to the relay is closed.
    LinkClosed,
    /// A certificate or key could not be loaded or made.
    Tls(crate::tls::TlsError),
    /// A local I/O operation failed (binding a port, reading a file).
    Io(io::Error),
    /// A relay's settings cannot work, or its listeners could not be bound.
    #[cfg(feature = "relay")]
    RelayConfig(crate::relay::ConfigError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidPort { given } => {
                write!(
                    f,
                    "invalid port {given:?}: a port must be a number from 1 to 65535"
                )
            }
            Error::PortAlreadyForwarded(port) => {
                write!(
                    f,
                    "port {port} is already forwarded; close its tunnel before forwarding it again"
                )
            }
            Error::H2RequiresTls => {
                f.write_str("HTTP/2 needs TLS: h2 cannot be combined with unencrypted")
            }
            Error::NotUnencrypted => f.write_str(
                "this tunnel has no TCP socket: forward the port with unencrypted to get one",
            ),
            Error::NotConfigured { missing } => write!(
                f,
                "no relay configured: set {} (as printed by `portferry relay`)",
                missing.join(" and ")
            ),
            Error::InvalidConfig { name, reason } => write!(f, "invalid {name}: {reason}"),
            Error::RelayUnreachable { relay, reason } => {
                write!(f, "cannot reach the relay at {relay}: {reason}; check PORTFERRY_RELAY and that the relay runs")
            }
            Error::RelayTls { relay, source } => write!(
                f,
                "TLS with the relay at {relay} failed: {source}{}",
                tls_hint(source)
            ),
            Error::Unauthorized => {
                f.write_str("the relay refused the agent token: check PORTFERRY_TOKEN")
            }
            Error::VersionMismatch { message } => {
                write!(
                    f,
                    "the relay speaks another protocol version ({message}): upgrade the older side"
                )
            }
            Error::LimitReached { message, .. } => {
                write!(f, "the relay refused: a limit is reached ({message})")
            }
            Error::Refused { message } => write!(f, "the relay refused: {message}"),
            Error::Timeout { waiting_for } => write!(f, "timed out waiting for {waiting_for}"),
            Error::LinkClosed => f.write_str("the link to the relay is closed"),
            Error::Tls(e) => e.fmt(f),
            Error::Io(e) => e.fmt(f),
            #[cfg(feature = "relay")]
            Error::RelayConfig(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // These messages already include their source's: skip it, so that a
            // report of the chain does not repeat it.
            Error::RelayTls { source, .. } => source.source(),
            Error::Tls(e) => e.source(),
            Error::Io(e) => e.source(),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

#[cfg(feature = "relay")]
impl From<crate::relay::ConfigError> for Error {
    fn from(e: crate::relay::ConfigError) -> Self {
        Error::RelayConfig(e)
    }
}

impl From<crate::tls::TlsError> for Error {
    fn from(e: crate::tls::TlsError) -> Self {
        Error::Tls(e)
    }
}

/// What to do about a failed TLS handshake with the relay, as a clause to append.
fn tls_hint(source: &io::Error) -> &'static str {
    let rustls = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls {
        Some(rustls::Error::InvalidCertificate(_)) => {
            "; if the relay uses its own CA, set PORTFERRY_RELAY_CA to its CA file"
        }
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)) => {
            "; is PORTFERRY_RELAY the relay's agent endpoint? This looks like its public port"
        }
        _ if source.kind() == io::ErrorKind::UnexpectedEof => {
            "; the relay closed the handshake: is PORTFERRY_RELAY the relay's agent endpoint? \
             A relay's public port does this"
        }
        _ => "",
    }
}

/// Parses a port given as text (a CLI argument, an environment variable).
pub fn parse_port(text: &str) -> Result<u16, Error> {
    match text.trim().parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(Error::InvalidPort {
            given: text.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_range_are_refused_with_the_range_named() {
        assert_eq!(parse_port("8000").unwrap(), 8000);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["0", "70000", "abc", "-1", ""] {
            let message = parse_port(bad).unwrap_err().to_string();
            assert!(message.contains("1 to 65535"), "{bad}: {message}");
        }
    }
}
