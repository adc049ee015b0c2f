//! Payloads of the control frames that have more than one field.
//!
//! Each type reads itself from a [`Reader`] and writes itself to a [`BufMut`];
//! [`Frame`](super::Frame) adds the header, checks that nothing is left over, and
//! validates before encoding.

use std::fmt;

use bytes::{BufMut, Bytes};

use super::field::{check16, len16, put_bytes16, Reader};
use crate::limit::Limit;
use super::{FrameError, FrameKind};

/// Length of a resume ticket ([`Welcome::ticket`]), in bytes: a 16-byte selector and a
/// 32-byte secret, all from the relay's CSPRNG.
pub const TICKET_LEN: usize = 48;

/// What an agent that wants its tunnels leased sends as [`Hello::resume`] before it has
/// a ticket: one zero byte (any `resume` that is neither empty nor a ticket the relay
/// holds means the same).
pub const NEW_AGENT: &[u8] = &[0];

/// First frame on a link: the agent introduces and authenticates itself.
///
/// `Debug` prints the token and the resume ticket as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    /// Frame format version the agent speaks, normally
    /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
    pub version: u16,
    /// Secret that authorizes the agent at the relay.
    pub token: String,
    /// Whether and how the agent's tunnels are leased (kept for it across links):
    /// - empty: not leased; they end with the link, and the welcome carries no ticket;
    /// - the [`Welcome::ticket`] of one of the agent's earlier links to this relay (with
    ///   the same token): the agent gets its leases back, and the welcome carries the
    ///   same ticket;
    /// - anything else ([`NEW_AGENT`] by convention), or a ticket the relay does not hold
    ///   (forged, expired, or for another token): a new agent, whose welcome carries a
    ///   fresh ticket.
    pub resume: Bytes,
}

impl Hello {
    pub(super) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Ok(Self {
            version: r.u16("version")?,
            token: r.str16("token")?,
            // Copied rather than sliced from the read buffer: the ticket is small and may
            // be kept for the whole session, and a slice would pin the buffer.
            resume: Bytes::copy_from_slice(r.bytes16("resume")?),
        })
    }

    pub(super) fn payload_len(&self) -> usize {
        2 + len16(self.token.len()) + len16(self.resume.len())
    }

    pub(super) fn validate(&self) -> Result<(), FrameError> {
        check16(FrameKind::Hello, "token", self.token.len())?;
        check16(FrameKind::Hello, "resume", self.resume.len())
    }

    pub(super) fn emit(&self, dst: &mut impl BufMut) {
        dst.put_u16(self.version);
        put_bytes16(dst, self.token.as_bytes());
        put_bytes16(dst, &self.resume);
    }
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &format_args!("<redacted>"))
            .field(
                "resume",
                &format_args!("<redacted {} bytes>", self.resume.len()),
            )
            .finish()
    }
}

/// The relay's answer to a [`Hello`] it accepts.
///
/// `Debug` prints the ticket as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Frame format version the relay speaks on this link.
    pub version: u16,
    /// The agent's resume ticket ([`TICKET_LEN`] bytes) if its tunnels are leased, else
    /// empty. A secret: the agent keeps it (in memory) and sends it as [`Hello::resume`]
    /// on its next links to get its leases back; anyone who has it can take them over.
    pub ticket: Bytes,
}

impl fmt::Debug for Welcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Welcome")
            .field("version", &self.version)
            .field(
                "ticket",
                &format_args!("<redacted {} bytes>", self.ticket.len()),
            )
            .finish()
    }
}

impl Welcome {
    pub(super) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Ok(Self {
            version: r.u16("version")?,
            // Copied for the same reason as `Hello::resume`.
            ticket: Bytes::copy_from_slice(r.bytes16("ticket")?),
        })
    }

    pub(super) fn payload_len(&self) -> usize {
        2 + len16(self.ticket.len())
    }

    pub(super) fn validate(&self) -> Result<(), FrameError> {
        check16(FrameKind::Welcome, "ticket", self.ticket.len())
    }

    pub(super) fn emit(&self, dst: &mut impl BufMut) {
        dst.put_u16(self.version);
        put_bytes16(dst, &self.ticket);
    }
}

/// The agent asks the relay to expose a container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRequest {
    /// Chosen by the agent; the answer ([`Forwarded`] or [`ErrorFrame`]) carries it back.
    pub request_id: u32,
    /// Container port to expose.
    pub port: u16,
    /// Whether the service behind the port speaks plaintext rather than TLS (flag bit 0).
    pub unencrypted: bool,
    /// Whether the service behind the port speaks HTTP/2 (flag bit 1).
    pub h2: bool,
}

impl ForwardRequest {
    /// Flag bit for [`ForwardRequest::unencrypted`].
    const UNENCRYPTED: u8 = 1 << 0;
    /// Flag bit for [`ForwardRequest::h2`].
    const H2: u8 = 1 << 1;
    /// Encoded size of the payload.
    pub(super) const PAYLOAD_LEN: usize = 4 + 2 + 1;

    pub(super) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        let request_id = r.u32("request_id")?;
        let port = r.u16("port")?;
        let flags = r.u8("flags")?;
        if flags & !(Self::UNENCRYPTED | Self::H2) != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        Ok(Self {
            request_id,
            port,
            unencrypted: flags & Self::UNENCRYPTED != 0,
            h2: flags & Self::H2 != 0,
        })
    }

    pub(super) fn emit(&self, dst: &mut impl BufMut) {
        let mut flags = 0;
        if self.unencrypted {
            flags |= Self::UNENCRYPTED;
        }
        if self.h2 {
            flags |= Self::H2;
        }
        dst.put_u32(self.request_id);
        dst.put_u16(self.port);
        dst.put_u8(flags);
    }
}

/// The relay grants a [`ForwardRequest`] and says where the port is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The [`ForwardRequest::request_id`] this answers.
    pub request_id: u32,
    /// Container port now exposed.
    pub port: u16,
    /// Public hostname the relay serves the port under.
    pub hostname: String,
    /// Public port at `hostname` for TLS clients.
    pub tls_port: u16,
    /// Public raw TCP port, if the relay opened one.
    ///
    /// Sent as 0 for `None`, so `Some(0)` cannot be encoded
    /// ([`FrameError::ReservedValue`]) and is never parsed.
    pub tcp_port: Option<u16>,
}

impl Forwarded {
    pub(super) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Ok(Self {
            request_id: r.u32("request_id")?,
            port: r.u16("port")?,
            hostname: r.str16("hostname")?,
            tls_port: r.u16("tls_port")?,
            tcp_port: Some(r.u16("tcp_port")?).filter(|&port| port != 0),
        })
    }

    pub(super) fn payload_len(&self) -> usize {
        4 + 2 + len16(self.hostname.len()) + 2 + 2
    }

    pub(super) fn validate(&self) -> Result<(), FrameError> {
        check16(FrameKind::Forwarded, "hostname", self.hostname.len())?;
        if self.tcp_port == Some(0) {
            return Err(FrameError::ReservedValue {
                kind: FrameKind::Forwarded,
                field: "tcp_port",
            });
        }
        Ok(())
    }

    pub(super) fn emit(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.request_id);
        dst.put_u16(self.port);
        put_bytes16(dst, self.hostname.as_bytes());
        dst.put_u16(self.tls_port);
        dst.put_u16(self.tcp_port.unwrap_or(0));
    }
}

/// A request failed, or the whole link is in trouble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The request this answers, or 0 when the error concerns the whole link.
    pub request_id: u32,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ErrorFrame {
    pub(super) fn parse(r: &mut Reader<'_>) -> Result<Self, FrameError> {
        Ok(Self {
            request_id: r.u32("request_id")?,
            code: ErrorCode(r.u16("code")?),
            message: r.str16("message")?,
        })
    }

    pub(super) fn payload_len(&self) -> usize {
        4 + 2 + len16(self.message.len())
    }

    pub(super) fn validate(&self) -> Result<(), FrameError> {
        check16(FrameKind::Error, "message", self.message.len())
    }

    pub(super) fn emit(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.request_id);
        dst.put_u16(self.code.0);
        put_bytes16(dst, self.message.as_bytes());
    }
}

/// The code of an [`ErrorFrame`]; values without a name here are kept as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The peer speaks a frame format version this end does not.
    pub const BAD_VERSION: Self = Self(1);
    /// The relay refused the agent's token.
    pub const UNAUTHORIZED: Self = Self(2);
    /// The port is already forwarded.
    pub const PORT_IN_USE: Self = Self(3);
    /// The request was malformed or asked for something not allowed.
    pub const INVALID_REQUEST: Self = Self(4);
    /// A limit was reached, without saying which: what a relay from before
    /// [`ErrorCode::limit_reached`] sends.
    pub const LIMIT_REACHED: Self = Self(5);
    /// The sender failed internally.
    pub const INTERNAL: Self = Self(6);
    /// The peer broke the protocol, for example sent a malformed frame.
    pub const PROTOCOL: Self = Self(7);
    /// A hello presented the ticket of an agent whose session another link took over
    /// too recently ([`min_takeover_interval`](crate::relay::RelayConfig::min_takeover_interval)):
    /// try again later.
    pub const TOO_SOON: Self = Self(8);

    /// Where the codes naming a limit start: `NAMED_LIMIT + n` says that the limit
    /// numbered `n` ([`Limit::code`], 1 to 255) was reached.
    const NAMED_LIMIT: u16 = 0x0100;

    /// The code saying that `limit` was reached. A code of its own per limit keeps the
    /// frame's layout: an agent that does not know the code still reads the refusal
    /// (and its message, which names the limit too).
    pub fn limit_reached(limit: Limit) -> Self {
        Self(Self::NAMED_LIMIT + u16::from(limit.code()))
    }

    /// The limit this code says was reached ([`Limit::Unknown`]`(0)` for
    /// [`LIMIT_REACHED`](Self::LIMIT_REACHED)); `None` for a code that is not about a
    /// limit.
    pub fn limit(self) -> Option<Limit> {
        if self == Self::LIMIT_REACHED {
            return Some(Limit::Unknown(0));
        }
        let number = self.0.checked_sub(Self::NAMED_LIMIT)?;
        u8::try_from(number)
            .ok()
            .filter(|&n| n != 0)
            .map(Limit::from_code)
    }

    /// Name of the constant for a known code.
    fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::BAD_VERSION => "BAD_VERSION",
            Self::UNAUTHORIZED => "UNAUTHORIZED",
            Self::PORT_IN_USE => "PORT_IN_USE",
            Self::INVALID_REQUEST => "INVALID_REQUEST",
            Self::LIMIT_REACHED => "LIMIT_REACHED",
            Self::INTERNAL => "INTERNAL",
            Self::PROTOCOL => "PROTOCOL",
            Self::TOO_SOON => "TOO_SOON",
            _ => return None,
        })
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self.limit()) {
            (Some(name), _) => write!(f, "ErrorCode::{name}"),
            (None, Some(limit)) => write!(f, "ErrorCode::limit_reached({limit:?})"),
            (None, None) => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    /// The constant's name and value, like `PORT_IN_USE (3)` or
    /// `LIMIT_REACHED max_leases (263)`, or the bare value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self.limit()) {
            (Some(name), _) => write!(f, "{name} ({})", self.0),
            (None, Some(limit)) => write!(f, "LIMIT_REACHED {limit} ({})", self.0),
            (None, None) => write!(f, "{}", self.0),
        }
    }
}
