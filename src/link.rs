//! The agent link: one connection (TLS in production) carrying control frames and the
//! raw IP packets of a [`Stack`] between agent and relay.
//!
//! [`FrameReader`] and [`FrameWriter`] move [`Frame`]s over any tokio byte stream;
//! [`run`] drives an established link: inbound packets go to the stack's ingress,
//! outbound packets are drained from the stack's queue and written in batches (one
//! flush, so one TLS record run and one syscall, per batch), control frames pass
//! through bounded channels, and heartbeats detect a dead peer.
//!
//! # Small queues below the scheduler
//! The stack's queue decides which flow sends next (see [`crate::netstack::queue`]);
//! every byte that has left it waits in first-come order behind everything written
//! before it. So the link keeps that part small: a batch is
//! [`LinkConfig::write_batch_bytes`] (16 KiB) plus at most one packet, taken from the
//! queue only once the previous one is written, and [`configure_socket`] bounds the
//! bytes the kernel holds unsent (`TCP_NOTSENT_LOWAT`, [`LinkConfig::unsent_limit`],
//! 32 KiB). Control frames and pongs go ahead of packets in every batch. What waits
//! below the queue is then about 150 KiB (a batch, rustls' buffer of encrypted records,
//! the unsent bytes): a few milliseconds at the rates a WAN link carries, while one
//! flow still fills the path, as the kernel's send buffer keeps growing for the bytes
//! in flight. Measured across a delay line of 10 and 40 ms, larger values (64 KiB
//! batches, 128 KiB unsent) added latency under load and no throughput.
//!
//! # A send buffer for the bytes in flight
//! The bytes in flight count in the socket's send buffer. With its unsent bytes kept
//! small, the link's TCP was measured keeping only two thirds of autotuning's ceiling
//! (`net.ipv4.tcp_wmem`, 4 MiB by default) in flight, app-limited, while the queue above
//! it was full: 0.55 Gbit/s across 40 ms. Linux wakes a writer waiting for room only
//! once a third of the buffer is free (`sk_stream_write_space`), also when it waits for
//! the unsent bytes to drain; a plain writer that retries on a timer instead gets past
//! that, but the same retry under the link's TLS did not (see the README's
//! *Performance*). A larger buffer removes the limit, so [`configure_socket`] asks for
//! the largest send buffer the host allows (`net.core.wmem_max`, which Linux doubles)
//! when that is above autotuning's ceiling: measured across a 40 ms delay line with
//! `wmem_max` at 4 MiB, single-flow throughput went from 0.48 to 0.95 Gbit/s, latency
//! under load unchanged. Memory follows use: the buffer holds what is in flight plus the
//! unsent limit.
//!
//! # Bounds and timeouts
//! The reader buffers at most one frame (`HEADER_LEN + MAX_PAYLOAD_LEN` bytes) beyond
//! what it has parsed; the writer's batch is at most [`LinkConfig::write_batch_bytes`]
//! plus one frame. A link on which nothing arrives for [`LinkConfig::idle_timeout`], or
//! whose writes make no progress for as long, is closed; each side sends a ping every
//! [`LinkConfig::ping_interval`], so a live but quiet link is never idle that long.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::netstack::Stack;
use crate::task::AbortOnDrop;
use crate::wire::{packet_header, Frame, FrameError, HEADER_LEN, MAX_PAYLOAD_LEN};

/// Timing and batching of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// How often each side sends a ping.
    pub ping_interval: Duration,
    /// A link with no inbound frame, or no write progress, for this long is dead.
    pub idle_timeout: Duration,
    /// Most bytes of packets taken from the stack's queue for one write; what is not
    /// taken yet stays where the queue can still put other flows first.
    pub write_batch_bytes: usize,
    /// Most bytes the kernel holds written but not yet sent on the link's socket
    /// (`TCP_NOTSENT_LOWAT`; Linux and Android only): a write waits beyond it.
    pub unsent_limit: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            write_batch_bytes: 16 * 1024,
            unsent_limit: 32 * 1024,
        }
    }
}

/// Sets up the TCP socket under a link: no Nagle delay, at most
/// [`LinkConfig::unsent_limit`] bytes waiting unsent in the kernel, and a send buffer
/// that can hold a fast path's bytes in flight (both where supported; see the module's
/// docs).
pub fn configure_socket(tcp: &TcpStream, config: &LinkConfig) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let socket = socket2::SockRef::from(tcp);
        socket.set_tcp_notsent_lowat(config.unsent_limit)?;
        if let Some(size) = host_send_buffer() {
            socket.set_send_buffer_size(size)?;
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = config;
    Ok(())
}

/// The send buffer to ask for: the host's largest, if it is above autotuning's ceiling;
/// `None` leaves autotuning in charge.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn host_send_buffer() -> Option<usize> {
    let read = |path| std::fs::read_to_string(path).ok();
    larger_send_buffer(
        &read("/proc/sys/net/core/wmem_max")?,
        &read("/proc/sys/net/ipv4/tcp_wmem")?,
    )
}

/// `wmem_max` (the most `SO_SNDBUF` may ask for) if the buffer Linux makes of it, twice
/// that, is larger than the largest autotuned one (the third value of `tcp_wmem`).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn larger_send_buffer(wmem_max: &str, tcp_wmem: &str) -> Option<usize> {
    let wmem_max: usize = wmem_max.trim().parse().ok()?;
    let autotuned: usize = tcp_wmem.split_whitespace().nth(2)?.parse().ok()?;
    (wmem_max.saturating_mul(2) > autotuned).then_some(wmem_max)
}

/// Why a link ended other than by an orderly close.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkError {
    /// Reading or writing the connection failed.
    Io(io::Error),
    /// The peer sent a malformed frame.
    Frame(FrameError),
    /// The connection ended in the middle of a frame.
    Truncated,
    /// Nothing arrived from the peer (or no write went through) within the idle
    /// timeout: the peer or the network is gone.
    Idle(Duration),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "link I/O failed: {e}"),
            LinkError::Frame(e) => write!(f, "peer sent a malformed frame: {e}"),
            LinkError::Truncated => f.write_str("link closed in the middle of a frame"),
            LinkError::Idle(d) => write!(f, "link idle for {d:?}: peer unreachable"),
        }
    }
}

impl std::error::Error for LinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkError::Io(e) => Some(e),
            LinkError::Frame(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

impl From<FrameError> for LinkError {
    fn from(e: FrameError) -> Self {
        LinkError::Frame(e)
    }
}

/// Reads frames off a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(2 * (HEADER_LEN + MAX_PAYLOAD_LEN)),
        }
    }

    /// Reads the next frame; `Ok(None)` when the stream ends cleanly between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(frame) = Frame::parse(&mut self.buf)? {
                return Ok(Some(frame));
            }
            // `parse` has checked the header, so this reserve is bounded by one frame.
            self.buf.reserve(HEADER_LEN + MAX_PAYLOAD_LEN);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(LinkError::Truncated)
                };
            }
        }
    }

    /// Like [`read_frame`](Self::read_frame), failing with [`LinkError::Idle`] after `limit`.
    pub async fn read_frame_within(&mut self, limit: Duration) -> Result<Option<Frame>, LinkError> {
        timeout(limit, self.read_frame())
            .await
            .map_err(|_| LinkError::Idle(limit))?
    }
}

/// Collects frames into a batch and writes it to a byte stream.
///
/// Packets are never copied into the batch: each is queued as the [`Bytes`] the stack
/// built, next to its 5-byte header, and the batch goes out in vectored writes (with
/// TLS, rustls copies each byte once, into the record it encrypts).
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    /// Encoded control frames and packet headers not yet queued in `segments`.
    pending: BytesMut,
    /// The batch, in order.
    segments: VecDeque<Bytes>,
    /// Bytes in `pending` and `segments`.
    batched: usize,
}

/// Slices handed to one vectored write.
const MAX_IO_SLICES: usize = 64;

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a stream.
    pub fn new(io: W) -> Self {
        FrameWriter {
            io,
            pending: BytesMut::with_capacity(4 * 1024),
            segments: VecDeque::new(),
            batched: 0,
        }
    }

    /// Adds a frame to the batch.
    pub fn push(&mut self, frame: &Frame) {
        let before = self.pending.len();
        frame.encode(&mut self.pending);
        self.batched += self.pending.len() - before;
    }

    /// Adds an IP packet to the batch as a `Packet` frame (1 to 65535 bytes).
    pub fn push_packet(&mut self, packet: &Bytes) {
        self.pending.extend_from_slice(&packet_header(packet.len()));
        self.segments.push_back(self.pending.split().freeze());
        self.segments.push_back(packet.clone());
        self.batched += HEADER_LEN + packet.len();
    }

    /// Bytes waiting in the batch.
    pub fn batched(&self) -> usize {
        self.batched
    }

    /// Writes the batch out and flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.segments.push_back(self.pending.split().freeze());
        }
        while !self.segments.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
            let count = slices.len().min(self.segments.len());
            for (slice, segment) in slices.iter_mut().zip(&self.segments) {
                *slice = IoSlice::new(segment);
            }
            let mut written = self.io.write_vectored(&slices[..count]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.batched -= written;
            while let Some(front) = self.segments.front_mut() {
                if written < front.len() {
                    front.advance(written);
                    break;
                }
                written -= front.len();
                self.segments.pop_front();
            }
        }
        self.io.flush().await
    }

    /// Writes one frame and flushes.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.push(frame);
        self.flush().await
    }

    /// Like [`flush`](Self::flush), failing with [`LinkError::Idle`] after `limit`.
    pub async fn flush_within(&mut self, limit: Duration) -> Result<(), LinkError> {
        timeout(limit, self.flush())
            .await
            .map_err(|_| LinkError::Idle(limit))?
            .map_err(LinkError::Io)
    }

    /// Shuts the stream down after writing what is batched.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// Control frames received on a link, for the session that owns it.
pub type ControlReceiver = mpsc::Receiver<Frame>;
/// Sends control frames on a link; dropping every sender closes the link.
pub type ControlSender = mpsc::Sender<Frame>;

/// Capacity of the control channels in each direction.
pub const CONTROL_QUEUE: usize = 64;

/// Drives an established link until it closes or fails. The caller then decides what
/// becomes of `stack`: the relay closes a session's stack, the agent resets its
/// connections and keeps it for the next link.
///
/// Packets move between the link and `stack`; pings are answered here; every other
/// inbound frame is passed to `inbound`, and frames from `outbound` are sent. The link
/// closes cleanly when the peer closes it or when every [`ControlSender`] of
/// `outbound` is dropped.
pub async fn run<R, W>(
    mut reader: FrameReader<R>,
    writer: FrameWriter<W>,
    stack: Stack,
    inbound: mpsc::Sender<Frame>,
    outbound: ControlReceiver,
    config: LinkConfig,
) -> Result<(), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (pong_tx, pong_rx) = mpsc::channel::<u64>(8);
    // A task of its own: the writer answers the socket's readiness at once, also while
    // the reader is busy handing a burst of packets to the stack.
    let mut write_side = AbortOnDrop(tokio::spawn(write_frames(
        writer,
        stack.clone(),
        outbound,
        pong_rx,
        config.clone(),
    )));
    let read_side = async {
        loop {
            match reader.read_frame_within(config.idle_timeout).await? {
                None => return Ok(()),
                // Drops are counted by the stack.
                Some(Frame::Packet(packet)) => drop(stack.ingress(packet)),
                // A peer flooding pings gets only what fits; liveness is shown anyway.
                Some(Frame::Ping(nonce)) => drop(pong_tx.try_send(nonce)),
                Some(Frame::Pong(_)) => {}
                Some(control) => {
                    if inbound.send(control).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    };
    tokio::select! {
        result = read_side => result,
        result = &mut write_side.0 => result.unwrap_or_else(|joined| {
            Err(LinkError::Io(io::Error::other(format!("link writer: {joined}"))))
        }),
    }
}

/// The write side of [`run`]: control frames, pongs, a ping every
/// [`LinkConfig::ping_interval`] and the stack's packets, in small batches written as
/// the socket takes them. Ends once `outbound` or the stack's queue is closed.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    stack: Stack,
    mut outbound: ControlReceiver,
    mut pongs: mpsc::Receiver<u64>,
    config: LinkConfig,
) -> Result<(), LinkError> {
    let mut ping = tokio::time::interval(config.ping_interval);
    let mut nonce = 0u64;
    let mut packets = Vec::with_capacity(64);
    let batch = config.write_batch_bytes;
    loop {
        tokio::select! {
            biased;
            frame = outbound.recv() => match frame {
                Some(frame) => writer.push(&frame),
                None => {
                    writer.flush_within(config.idle_timeout).await?;
                    return Ok(());
                }
            },
            Some(nonce) = pongs.recv() => writer.push(&Frame::Pong(nonce)),
            _ = ping.tick() => {
                nonce += 1;
                writer.push(&Frame::Ping(nonce));
            }
            n = stack.outbound().drain(&mut packets, batch) => {
                if n == 0 {
                    writer.flush_within(config.idle_timeout).await?;
                    return Ok(());
                }
            }
        }
        // Control frames and pongs that are ready go first, then packets up to one
        // batch: one flush carries them all.
        while let Ok(frame) = outbound.try_recv() {
            writer.push(&frame);
        }
        while let Ok(nonce) = pongs.try_recv() {
            writer.push(&Frame::Pong(nonce));
        }
        if packets.is_empty() {
            let room = batch.saturating_sub(writer.batched());
            if room > 0 {
                let _ = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(stack.outbound().poll_drain(cx, &mut packets, room))
                })
                .await;
            }
        }
        for packet in packets.drain(..) {
            writer.push_packet(&packet);
        }
        writer.flush_within(config.idle_timeout).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let (a, b) = tokio::io::duplex(1024);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        writer.push(&Frame::Ping(1));
        writer.push_packet(&Bytes::from_static(&[0x45; 100]));
        writer.shutdown().await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap(), Some(Frame::Ping(1)));
        assert_eq!(
            reader.read_frame().await.unwrap(),
            Some(Frame::Packet(Bytes::from_static(&[0x45; 100])))
        );
        assert_eq!(reader.read_frame().await.unwrap(), None);
    }

    /// A pipe of 7 bytes forces the vectored writes to stop inside headers, packets
    /// and control frames alike; everything must still arrive whole and in order.
    #[tokio::test]
    async fn partial_vectored_writes_keep_every_frame_whole_and_in_order() {
        let (a, b) = tokio::io::duplex(7);
        let mut writer = FrameWriter::new(a);
        let mut sent = Vec::new();
        for i in 0..40u8 {
            let frame = if i % 3 == 0 {
                Frame::Ping(u64::from(i))
            } else {
                Frame::Packet(Bytes::from(vec![i; 1 + usize::from(i) * 37]))
            };
            match &frame {
                Frame::Packet(packet) => writer.push_packet(packet),
                control => writer.push(control),
            }
            sent.push(frame);
        }
        let write = async {
            writer.shutdown().await.unwrap();
            assert_eq!(writer.batched(), 0);
        };
        let read = async {
            let mut reader = FrameReader::new(b);
            let mut received = Vec::new();
            while let Some(frame) = reader.read_frame().await.unwrap() {
                received.push(frame);
            }
            received
        };
        let ((), received) = tokio::join!(write, read);
        assert_eq!(received, sent);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut encoded = BytesMut::new();
        Frame::Ping(1).encode(&mut encoded);
        a.write_all(&encoded[..encoded.len() - 1]).await.unwrap();
        drop(a);
        let mut reader = FrameReader::new(b);
        assert!(matches!(
            reader.read_frame().await,
            Err(LinkError::Truncated)
        ));
    }

    #[tokio::test]
    async fn an_oversized_frame_is_rejected_from_its_header() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        let mut reader = FrameReader::new(b);
        assert!(matches!(
            reader.read_frame().await,
            Err(LinkError::Frame(FrameError::TooLong { .. }))
        ));
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn the_send_buffer_is_raised_only_above_autotunings_ceiling() {
        let autotuning = "4096\t16384\t4194304\n";
        assert_eq!(larger_send_buffer("4194304\n", autotuning), Some(4194304));
        assert_eq!(larger_send_buffer("212992\n", autotuning), None);
        assert_eq!(larger_send_buffer("2097152\n", autotuning), None);
        assert_eq!(larger_send_buffer("16777216", "4096 87380 6291456"), Some(16777216));
        assert_eq!(larger_send_buffer("lots", autotuning), None);
        assert_eq!(larger_send_buffer("4194304", "4096 16384"), None);
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn a_link_socket_gets_the_host_send_buffer_when_it_is_larger() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let autotuned = socket2::SockRef::from(&tcp).send_buffer_size().unwrap();
        configure_socket(&tcp, &LinkConfig::default()).unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), 32 * 1024);
        let size = socket.send_buffer_size().unwrap();
        match host_send_buffer() {
            // Linux doubles what is asked for, for its bookkeeping.
            Some(asked) => assert_eq!(size, 2 * asked),
            None => assert_eq!(size, autotuned),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_detected() {
        let (_a, b) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(b);
        let limit = Duration::from_secs(15);
        assert!(matches!(
            reader.read_frame_within(limit).await,
            Err(LinkError::Idle(_))
        ));
    }
}
