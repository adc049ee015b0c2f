//! [`Frame`]: the header, and parsing and encoding whole frames.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::connection::ConnectionInfo;

use super::field::Reader;
use super::{connection,
    ErrorFrame, ForwardRequest, Forwarded, FrameError, Hello, Welcome, HEADER_LEN, MAX_PAYLOAD_LEN,
};

/// The `kind` byte that opens every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// [`Frame::Hello`].
    Hello = 0x01,
    /// [`Frame::Welcome`].
    Welcome = 0x02,
    /// [`Frame::Forward`].
    Forward = 0x03,
    /// [`Frame::Forwarded`].
    Forwarded = 0x04,
    /// [`Frame::Close`].
    Close = 0x05,
    /// [`Frame::Error`].
    Error = 0x06,
    /// [`Frame::Ping`].
    Ping = 0x07,
    /// [`Frame::Pong`].
    Pong = 0x08,
    /// [`Frame::Connection`].
    Connection = 0x09,
    /// [`Frame::Packet`].
    Packet = 0x10,
}

impl TryFrom<u8> for FrameKind {
    type Error = FrameError;

    /// Reads a `kind` byte, failing with [`FrameError::UnknownKind`].
    fn try_from(byte: u8) -> Result<Self, FrameError> {
        Ok(match byte {
            0x01 => Self::Hello,
            0x02 => Self::Welcome,
            0x03 => Self::Forward,
            0x04 => Self::Forwarded,
            0x05 => Self::Close,
            0x06 => Self::Error,
            0x07 => Self::Ping,
            0x08 => Self::Pong,
            0x09 => Self::Connection,
            0x10 => Self::Packet,
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

impl From<FrameKind> for u8 {
    fn from(kind: FrameKind) -> Self {
        kind as u8
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One frame of the agent link; see the [module docs](super) for the byte layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent → relay, first on a link: who the agent is.
    Hello(Hello),
    /// Relay → agent: the link is accepted.
    Welcome(Welcome),
    /// Agent → relay: expose a container port.
    Forward(ForwardRequest),
    /// Relay → agent: a container port is exposed.
    Forwarded(Forwarded),
    /// Either way: stop exposing a container port.
    Close {
        /// The container port.
        port: u16,
    },
    /// Either way: a request failed, or the link is failing.
    Error(ErrorFrame),
    /// Either way: asks for a [`Frame::Pong`] carrying the same nonce.
    Ping(u64),
    /// The answer to a [`Frame::Ping`], echoing its nonce.
    Pong(u64),
    /// Relay → agent, as the first bytes of an inner connection (never on the link):
    /// who the public client is and how it reached the relay.
    Connection(ConnectionInfo),
    /// Either way: one raw IP packet of 1 to [`MAX_PAYLOAD_LEN`] bytes.
    Packet(Bytes),
}

impl Frame {
    /// Cheap check: `Ok(Some(total_len))` if a whole frame is buffered, `Ok(None)` if more
    /// bytes are needed, `Err` on a bad header (unknown kind or too long).
    ///
    /// Only the header is looked at, so `Ok(Some(_))` does not promise that
    /// [`Frame::parse`] will succeed. An unknown kind is reported as soon as its byte is
    /// in, and a length over [`MAX_PAYLOAD_LEN`] as soon as the header is.
    pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
        Ok(read_header(buf)?
            .map(|(_, len)| HEADER_LEN + len)
            .filter(|&total| buf.len() >= total))
    }

    /// Reads a whole header: the frame's kind and its payload length, which is at most
    /// [`MAX_PAYLOAD_LEN`]. For readers that take a frame in two exact reads, header
    /// then payload (as the [handshake](super::handshake) does), so that they never read
    /// past the frame.
    pub fn read_header(header: &[u8; HEADER_LEN]) -> Result<(FrameKind, usize), FrameError> {
        Ok(read_header(header)?.expect("a whole header is in"))
    }

    /// Parses one frame off the front of `buf` and advances past it; `Ok(None)` on partial
    /// input (buf untouched).
    ///
    /// `buf` is only advanced when a frame is returned, so it is untouched on error too.
    /// A packet payload is carved out of `buf` without copying; control frames copy their
    /// few bytes out.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<Self>, FrameError> {
        let Some((kind, len)) = read_header(buf)? else {
            return Ok(None);
        };
        let end = HEADER_LEN + len;
        let Some(payload) = buf.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let mut r = Reader::new(kind, payload);
        let frame = match kind {
            FrameKind::Hello => Self::Hello(Hello::parse(&mut r)?),
            FrameKind::Welcome => Self::Welcome(Welcome::parse(&mut r)?),
            FrameKind::Forward => Self::Forward(ForwardRequest::parse(&mut r)?),
            FrameKind::Forwarded => Self::Forwarded(Forwarded::parse(&mut r)?),
            FrameKind::Close => Self::Close {
                port: r.u16("port")?,
            },
            FrameKind::Error => Self::Error(ErrorFrame::parse(&mut r)?),
            FrameKind::Ping => Self::Ping(r.u64("nonce")?),
            FrameKind::Pong => Self::Pong(r.u64("nonce")?),
            FrameKind::Connection => Self::Connection(connection::parse(&mut r)?),
            FrameKind::Packet => {
                if len == 0 {
                    return Err(FrameError::EmptyPacket);
                }
                buf.advance(HEADER_LEN);
                return Ok(Some(Self::Packet(buf.split_to(len).freeze())));
            }
        };
        r.finish()?;
        buf.advance(end);
        Ok(Some(frame))
    }

    /// Size of the encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Writes the frame, header and payload, to `dst`.
    ///
    /// # Panics
    ///
    /// If the frame does not fit the wire format, that is if [`Frame::validate`] fails.
    /// A frame returned by [`Frame::parse`] always fits; a sender building frames from
    /// unchecked input (a long hostname, an oversized packet) validates them first.
    pub fn encode<B: BufMut>(&self, dst: &mut B) {
        if let Err(err) = self.validate() {
            panic!("cannot encode a {} frame: {err}", self.kind());
        }
        dst.put_slice(&header(self.kind(), self.payload_len()));
        match self {
            Self::Hello(hello) => hello.emit(dst),
            Self::Welcome(welcome) => welcome.emit(dst),
            Self::Forward(request) => request.emit(dst),
            Self::Forwarded(forwarded) => forwarded.emit(dst),
            Self::Close { port } => dst.put_u16(*port),
            Self::Error(error) => error.emit(dst),
            Self::Ping(nonce) | Self::Pong(nonce) => dst.put_u64(*nonce),
            Self::Connection(info) => connection::emit(info, dst),
            Self::Packet(packet) => dst.put_slice(packet),
        }
    }

    /// Checks that the frame fits the wire format, so that [`Frame::encode`] will not
    /// panic and the encoded bytes parse back to an equal frame.
    ///
    /// Fails with [`FrameError::FieldTooLong`] for a string or byte field over
    /// `u16::MAX` bytes, [`FrameError::ReservedValue`] for a [`Forwarded::tcp_port`] of
    /// `Some(0)`, [`FrameError::EmptyPacket`] for an empty packet, and
    /// [`FrameError::TooLong`] for a payload over [`MAX_PAYLOAD_LEN`] bytes.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            Self::Hello(hello) => hello.validate()?,
            Self::Welcome(welcome) => welcome.validate()?,
            Self::Forwarded(forwarded) => forwarded.validate()?,
            Self::Error(error) => error.validate()?,
            Self::Connection(info) => connection::validate(info)?,
            Self::Packet(packet) if packet.is_empty() => return Err(FrameError::EmptyPacket),
            Self::Forward(_)
            | Self::Close { .. }
            | Self::Ping(_)
            | Self::Pong(_)
            | Self::Packet(_) => {}
        }
        let len = self.payload_len();
        if len > MAX_PAYLOAD_LEN {
            return Err(FrameError::TooLong {
                len,
                max: MAX_PAYLOAD_LEN,
            });
        }
        Ok(())
    }

    /// The `kind` byte this frame is sent with.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello(_) => FrameKind::Hello,
            Self::Welcome(_) => FrameKind::Welcome,
            Self::Forward(_) => FrameKind::Forward,
            Self::Forwarded(_) => FrameKind::Forwarded,
            Self::Close { .. } => FrameKind::Close,
            Self::Error(_) => FrameKind::Error,
            Self::Ping(_) => FrameKind::Ping,
            Self::Pong(_) => FrameKind::Pong,
            Self::Connection(_) => FrameKind::Connection,
            Self::Packet(_) => FrameKind::Packet,
        }
    }

    /// Size of the encoded payload, header not included.
    fn payload_len(&self) -> usize {
        match self {
            Self::Hello(hello) => hello.payload_len(),
            Self::Welcome(welcome) => welcome.payload_len(),
            Self::Forward(_) => ForwardRequest::PAYLOAD_LEN,
            Self::Forwarded(forwarded) => forwarded.payload_len(),
            Self::Close { .. } => 2,
            Self::Error(error) => error.payload_len(),
            Self::Ping(_) | Self::Pong(_) => 8,
            Self::Connection(info) => connection::payload_len(info),
            Self::Packet(packet) => packet.len(),
        }
    }
}

/// Header of a Packet frame, so a writer can send the header and then the packet's Bytes
/// without building a frame value.
///
/// # Panics
///
/// If `len` is 0 or over [`MAX_PAYLOAD_LEN`]: no frame can carry such a packet.
pub fn packet_header(len: usize) -> [u8; HEADER_LEN] {
    assert!(
        (1..=MAX_PAYLOAD_LEN).contains(&len),
        "cannot frame a packet of {len} bytes"
    );
    header(FrameKind::Packet, len)
}

/// Encodes a header for a payload of `len` bytes, which the caller has checked is at most
/// [`MAX_PAYLOAD_LEN`].
fn header(kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_PAYLOAD_LEN);
    // Lossless: `len` is at most `MAX_PAYLOAD_LEN`.
    let [a, b, c, d] = (len as u32).to_be_bytes();
    [kind.into(), a, b, c, d]
}

/// Reads the header at the front of `buf`: `Ok(None)` until all of it is in, then the
/// kind and the payload length. Fails on an unknown kind as soon as the first byte is in.
fn read_header(buf: &[u8]) -> Result<Option<(FrameKind, usize)>, FrameError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let kind = FrameKind::try_from(kind)?;
    let Some(&[_, a, b, c, d]) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    // Saturating only matters on targets where `usize` is narrower than `u32`, and then
    // the length is over the maximum either way.
    let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    Ok(Some((kind, len)))
}
