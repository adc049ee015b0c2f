//! Why bytes are not a valid frame, or a frame cannot be encoded.

use std::fmt;

use super::FrameKind;

/// Why bytes are not a valid frame, or why a frame value cannot be encoded.
///
/// [`Frame::parse`](super::Frame::parse) and [`Frame::check`](super::Frame::check) return
/// it when the peer sent something malformed; the link should then be closed.
/// [`Frame::validate`](super::Frame::validate) returns it for a frame value that does not
/// fit the wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The `kind` byte names no known frame.
    UnknownKind(u8),
    /// The payload is longer than `max` ([`MAX_PAYLOAD_LEN`](super::MAX_PAYLOAD_LEN)):
    /// from a header, or from a frame value being validated.
    TooLong {
        /// Payload length, in bytes.
        len: usize,
        /// Largest payload length allowed, in bytes.
        max: usize,
    },
    /// The payload ends in the middle of `field`.
    Truncated {
        /// Kind of the frame.
        kind: FrameKind,
        /// Name of the field that was cut short.
        field: &'static str,
    },
    /// Bytes are left in the payload after the last field of a control frame.
    TrailingBytes {
        /// Kind of the frame.
        kind: FrameKind,
        /// Number of bytes left over.
        extra: usize,
    },
    /// A string field is not valid UTF-8.
    InvalidUtf8 {
        /// Kind of the frame.
        kind: FrameKind,
        /// Name of the string field.
        field: &'static str,
    },
    /// A [`ForwardRequest`](super::ForwardRequest) has flag bits set beyond `unencrypted`
    /// and `h2`; holds the whole flags byte.
    UnknownFlags(u8),
    /// A packet frame carries no bytes.
    EmptyPacket,
    /// A string or byte field is longer than its length prefix can count (being
    /// validated), or than the frame allows (being validated or parsed).
    FieldTooLong {
        /// Kind of the frame.
        kind: FrameKind,
        /// Name of the field.
        field: &'static str,
        /// Length of the field, in bytes.
        len: usize,
        /// Longest the field may be, in bytes.
        max: usize,
    },
    /// A field being validated holds a value the wire format reserves for another
    /// meaning: a [`Forwarded::tcp_port`](super::Forwarded::tcp_port) of `Some(0)`, since
    /// 0 on the wire means "none".
    ReservedValue {
        /// Kind of the frame.
        kind: FrameKind,
        /// Name of the field.
        field: &'static str,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind(kind) => write!(f, "unknown frame kind {kind:#04x}"),
            Self::TooLong { len, max } => {
                write!(
                    f,
                    "frame payload of {len} bytes exceeds the maximum of {max}"
                )
            }
            Self::Truncated { kind, field } => {
                write!(f, "{kind} frame cut short in field `{field}`")
            }
            Self::TrailingBytes { kind, extra } => {
                write!(
                    f,
                    "{extra} unexpected bytes after the end of a {kind} frame"
                )
            }
            Self::InvalidUtf8 { kind, field } => {
                write!(f, "field `{field}` of a {kind} frame is not valid UTF-8")
            }
            Self::UnknownFlags(flags) => write!(f, "unknown forward flags {flags:#010b}"),
            Self::EmptyPacket => f.write_str("empty packet frame"),
            Self::FieldTooLong {
                kind,
                field,
                len,
                max,
            } => write!(
                f,
                "field `{field}` of a {kind} frame is {len} bytes, more than the {max} allowed"
            ),
            Self::ReservedValue { kind, field } => {
                write!(
                    f,
                    "field `{field}` of a {kind} frame holds a reserved value"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}
