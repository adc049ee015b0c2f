//! The opening of a link, used by both ends: the agent's [`Hello`], then the relay's
//! [`Welcome`] or [`ErrorFrame`].
//!
//! Until the relay has answered, neither end trusts the other to bound what it sends,
//! so each handshake frame is read with a bound of its own ([`MAX_HELLO_LEN`],
//! [`MAX_ANSWER_LEN`]) checked from the header before any of the payload is read or room
//! is made for it. The frames are read exactly (header, then payload) and never past
//! their end, so the link's own [`FrameReader`](crate::link::FrameReader) takes over the
//! stream afterwards without losing a byte. These readers are the one place `wire`
//! touches I/O; they carry no timeout, so callers put them under their deadline.

use std::fmt;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    ErrorFrame, Frame, FrameError, FrameKind, Hello, Welcome, HEADER_LEN, PROTOCOL_VERSION,
};

/// Largest payload of an agent's hello, in bytes. A hello whose header claims more is
/// refused before any of it is read, so an unauthenticated peer cannot make the relay
/// buffer a whole maximal frame.
pub const MAX_HELLO_LEN: usize = 4096;

/// Largest payload of the relay's answer to a hello (a welcome or an error), in bytes.
pub const MAX_ANSWER_LEN: usize = 4096;

/// Why a handshake frame could not be read.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The stream ended (or failed) before a whole header was in.
    Closed(io::Error),
    /// The stream ended (or failed) inside the frame's payload.
    Truncated(io::Error),
    /// The header or the payload is not a valid frame.
    Frame(FrameError),
    /// The header announces a frame longer than the handshake allows.
    TooLong {
        /// What the first frame was.
        kind: FrameKind,
        /// Payload length in the header, in bytes.
        len: usize,
        /// The bound, in bytes.
        max: usize,
    },
    /// A frame of a kind the handshake does not expect at this point.
    Unexpected(FrameKind),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed(e) => write!(f, "the link closed before the handshake: {e}"),
            Self::Truncated(e) => write!(f, "the link closed inside a handshake frame: {e}"),
            Self::Frame(e) => write!(f, "malformed handshake frame: {e}"),
            Self::TooLong { kind, len, max } => {
                write!(
                    f,
                    "a {kind} in the handshake is at most {max} bytes, this one says {len}"
                )
            }
            Self::Unexpected(kind) => write!(f, "unexpected {kind} frame in the handshake"),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Closed(e) | Self::Truncated(e) => Some(e),
            Self::Frame(e) => Some(e),
            _ => None,
        }
    }
}

/// The hello an agent opens its link with: its `token`, and `resume` (its resume
/// ticket, [`NEW_AGENT`](super::NEW_AGENT) before it has one, or empty for no leases;
/// see [`Hello::resume`]). Fails if a field is too long for a frame.
pub fn hello(token: &str, resume: &[u8]) -> Result<Frame, FrameError> {
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: token.to_owned(),
        resume: bytes::Bytes::copy_from_slice(resume),
    });
    hello.validate()?;
    Ok(hello)
}

/// Reads one frame of one of `kinds` with at most `max_len` payload bytes, exactly: the
/// header first, checked, then the payload. Not bounded in time.
pub async fn read_frame(
    io: &mut (impl AsyncRead + Unpin),
    kinds: &[FrameKind],
    max_len: usize,
) -> Result<Frame, HandshakeError> {
    let mut header = [0u8; HEADER_LEN];
    io.read_exact(&mut header)
        .await
        .map_err(HandshakeError::Closed)?;
    let kind = FrameKind::try_from(header[0]).map_err(HandshakeError::Frame)?;
    if !kinds.contains(&kind) {
        return Err(HandshakeError::Unexpected(kind));
    }
    let len = match Frame::read_header(&header) {
        Ok((_, len)) => len,
        // Over any frame's bound is over the handshake's too: say the tighter one.
        Err(FrameError::TooLong { len, .. }) => len,
        Err(e) => return Err(HandshakeError::Frame(e)),
    };
    if len > max_len {
        return Err(HandshakeError::TooLong {
            kind,
            len,
            max: max_len,
        });
    }
    let mut frame = BytesMut::zeroed(HEADER_LEN + len);
    frame[..HEADER_LEN].copy_from_slice(&header);
    io.read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(HandshakeError::Truncated)?;
    match Frame::parse(&mut frame) {
        Ok(Some(frame)) => Ok(frame),
        // The whole frame is in, so `parse` cannot ask for more.
        Ok(None) => Err(HandshakeError::Frame(FrameError::Truncated {
            kind,
            field: "payload",
        })),
        Err(e) => Err(HandshakeError::Frame(e)),
    }
}

/// The relay's side: reads the agent's first frame, which must be a hello of at most
/// [`MAX_HELLO_LEN`] bytes.
pub async fn read_hello(io: &mut (impl AsyncRead + Unpin)) -> Result<Hello, HandshakeError> {
    match read_frame(io, &[FrameKind::Hello], MAX_HELLO_LEN).await? {
        Frame::Hello(hello) => Ok(hello),
        other => Err(HandshakeError::Unexpected(other.kind())),
    }
}

/// The agent's side: reads the relay's answer to its hello, a welcome or a refusal, of
/// at most [`MAX_ANSWER_LEN`] bytes.
pub async fn read_answer(
    io: &mut (impl AsyncRead + Unpin),
) -> Result<Result<Welcome, ErrorFrame>, HandshakeError> {
    let kinds = [FrameKind::Welcome, FrameKind::Error];
    match read_frame(io, &kinds, MAX_ANSWER_LEN).await? {
        Frame::Welcome(welcome) => Ok(Ok(welcome)),
        Frame::Error(refusal) => Ok(Err(refusal)),
        other => Err(HandshakeError::Unexpected(other.kind())),
    }
}

/// Writes one handshake frame and flushes.
pub async fn send(io: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> io::Result<()> {
    let mut bytes = BytesMut::with_capacity(frame.encoded_len());
    frame.encode(&mut bytes);
    io.write_all(&bytes).await?;
    io.flush().await
}
