//! The frame format of the agent link.
//!
//! Agent and relay talk over one TLS connection carrying a stream of frames: control
//! messages and raw IP packets. This module turns bytes into [`Frame`]s and back and,
//! but for the [`handshake`]'s exact reads, does no I/O: a driver reads into a
//! [`BytesMut`](bytes::BytesMut), calls [`Frame::parse`] until it returns `Ok(None)`,
//! and writes what [`Frame::encode`] (or [`packet_header`] followed by the packet
//! itself) produces.
//!
//! # Frame layout
//!
//! Every frame is a 5-byte header followed by its payload:
//!
//! | offset | size     | field    | meaning                                                        |
//! |--------|----------|----------|----------------------------------------------------------------|
//! | 0      | 1        | `kind`   | which frame this is, see below                                 |
//! | 1      | 4        | `length` | payload length in bytes, big-endian, header not included       |
//! | 5      | `length` | payload  | the fields of the frame kind, in order                         |
//!
//! Integers are big-endian. `str16` is a `u16` byte length followed by that many bytes
//! of UTF-8; `bytes16` is a `u16` length followed by that many raw bytes.
//!
//! | kind   | frame              | direction     | payload fields                                                                                 |
//! |--------|--------------------|---------------|------------------------------------------------------------------------------------------------|
//! | `0x01` | [`Hello`]          | agent → relay | `version: u16`, `token: str16`, `resume: bytes16` (empty, a resume ticket, or `NEW_AGENT`)     |
//! | `0x02` | [`Welcome`]        | relay → agent | `version: u16`, `ticket: bytes16` (the agent's resume ticket, or empty)                        |
//! | `0x03` | [`ForwardRequest`] | agent → relay | `request_id: u32`, `port: u16`, `flags: u8` (bit 0 unencrypted, bit 1 h2, others 0)            |
//! | `0x04` | [`Forwarded`]      | relay → agent | `request_id: u32`, `port: u16`, `hostname: str16`, `tls_port: u16`, `tcp_port: u16` (0 = none) |
//! | `0x05` | [`Frame::Close`]   | both          | `port: u16`                                                                                    |
//! | `0x06` | [`ErrorFrame`]     | both          | `request_id: u32` (0 = the whole link), `code: u16`, `message: str16`                          |
//! | `0x07` | [`Frame::Ping`]    | both          | `nonce: u64`                                                                                   |
//! | `0x08` | [`Frame::Pong`]    | both          | `nonce: u64`                                                                                   |
//! | `0x09` | [`Frame::Connection`] | relay → agent, first on each inner connection, never on the link | a [`ConnectionInfo`](crate::connection::ConnectionInfo): see `connection.rs` |
//! | `0x10` | [`Frame::Packet`]  | both          | the whole payload is one raw IP packet, 1 to 65 535 bytes                                      |
//!
//! An [`ErrorFrame`]'s `code` is one of [`ErrorCode`]'s; a refusal at a limit names the
//! limit in it ([`ErrorCode::limit_reached`]: `0x0100` plus the limit's number).
//!
//! A control frame (every kind but `Packet`) must end exactly after its last field. The
//! encoding is canonical: every frame that parses re-encodes to exactly the same bytes.
//! The link speaks [`PROTOCOL_VERSION`], sent in [`Hello`] and [`Welcome`].
//!
//! # Handshake
//!
//! A link opens with the agent's [`Hello`], answered by a [`Welcome`] or by an
//! [`ErrorFrame`] after which the relay closes the link. Both ends read these frames
//! with [`handshake`], under a bound of their own ([`MAX_HELLO_LEN`],
//! [`handshake::MAX_ANSWER_LEN`]).
//!
//! Leases are resumed with a ticket the relay issued, never with anything the agent
//! makes up or the relay's files hold:
//! - An agent whose tunnels should be kept for it across links sends [`NEW_AGENT`] (one
//!   zero byte) as `Hello::resume` on its first link. The relay answers with a fresh
//!   `Welcome::ticket` of [`TICKET_LEN`] (48) random bytes: a 16-byte selector naming
//!   the agent, and a 32-byte secret. The relay keeps only the selector and the ticket's
//!   SHA-256 (in memory and in its lease file).
//! - On every later link the agent sends that ticket as `Hello::resume`. If the relay
//!   holds the selector for the hello's token and the ticket's SHA-256 matches (compared
//!   in constant time), the link is that agent: its leased hostnames and ports come back,
//!   and the welcome carries the same ticket. Any other `resume` that is not empty (a
//!   forged, expired or foreign ticket) makes a new agent with a fresh ticket: it never
//!   gets another agent's leases.
//! - A valid ticket while another link holds the agent's session takes the session over
//!   (the older link is closed), but not sooner than `min_takeover_interval` after the
//!   session's link was admitted: earlier, the hello is refused with
//!   [`ErrorCode::TOO_SOON`].
//! - An empty `resume`: the agent's tunnels are not leased (they end with the link), and
//!   the welcome's ticket is empty.
//!
//! The ticket is a secret: the agent keeps it in memory only, and `Debug` of [`Hello`]
//! and [`Welcome`] does not show it.
//!
//! # Bounds
//!
//! A payload is at most [`MAX_PAYLOAD_LEN`] bytes, so a reader never buffers more than
//! `HEADER_LEN + MAX_PAYLOAD_LEN` bytes of one frame. A longer `length` is
//! rejected with [`FrameError::TooLong`] as soon as the header is in, before any of the
//! payload is awaited, and an unknown `kind` as soon as its byte is in. Nothing is
//! allocated from a length field until the bytes it counts are present. Parsing never
//! panics; on any error the link should be closed.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use portferry::wire::Frame;
//!
//! let mut buf = BytesMut::new();
//! Frame::Ping(7).encode(&mut buf);
//! Frame::Close { port: 8080 }.encode(&mut buf);
//!
//! assert_eq!(Frame::parse(&mut buf), Ok(Some(Frame::Ping(7))));
//! assert_eq!(Frame::parse(&mut buf), Ok(Some(Frame::Close { port: 8080 })));
//! assert_eq!(Frame::parse(&mut buf), Ok(None));
//! ```

mod connection;
mod control;
mod error;
mod field;
mod frame;
pub mod handshake;

#[cfg(test)]
mod tests;

pub use control::{
    ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Hello, Welcome, NEW_AGENT, TICKET_LEN,
};
pub use connection::MAX_CONNECTION_LEN;
pub use error::FrameError;
pub use frame::{packet_header, Frame, FrameKind};
pub use handshake::MAX_HELLO_LEN;

/// Size of the frame header: one `kind` byte and a big-endian `u32` payload length.
pub const HEADER_LEN: usize = 5;

/// Largest payload a frame may carry: the largest IP packet.
pub const MAX_PAYLOAD_LEN: usize = 65_535;

/// Version of this frame format, exchanged in [`Hello`] and [`Welcome`]: the newest
/// one this end speaks. Version 2 added [`Frame::Connection`] at the start of each inner
/// connection.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest version a relay still speaks: an agent from before [`Frame::Connection`]
/// gets inner connections without it.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
