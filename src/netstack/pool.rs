//! Recycled buffers for large outbound packets.
//!
//! A bulk flow emits packets of up to the MTU (64 KiB by default) as fast as the link
//! carries them, and each is dropped once the link writer has sent it. Allocating every
//! one afresh costs a zeroing pass over it and, whenever the allocator has mapped or
//! trimmed that memory, a page fault per 4 KiB: 10–15 % of the relay's CPU in a
//! loopback profile (issue 9). So a packet of [`POOLED_FROM`] bytes or more is built in
//! a buffer taken from a small process-wide pool, and the buffer goes back to the pool
//! when the last reference to the packet is dropped. Smaller packets (ACKs, window
//! updates, handshakes) are allocated to their size.
//!
//! The pool keeps at most [`POOL_BUFFERS`] idle buffers (2 MiB); beyond that, returned
//! buffers are freed.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::lock;

/// Size of a pooled buffer: every IP packet fits.
const BUFFER_LEN: usize = 64 * 1024;
/// Packets this large or larger are built in a pooled buffer.
const POOLED_FROM: usize = 4 * 1024;
/// Idle buffers the pool keeps.
const POOL_BUFFERS: usize = 32;
/// Zeroed at the start of a reused buffer: room for the largest IPv4 and TCP headers.
/// smoltcp writes every byte of the packets it builds; zeroing this area first means no
/// header field could carry another connection's byte even if one were skipped.
const HEADERS_LEN: usize = 128;

/// Buffers ready for reuse.
pub(crate) struct Pool {
    idle: Mutex<Vec<Box<[u8]>>>,
}

/// The pool every stack of the process builds its packets from.
pub(crate) static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Builds a packet of `len` bytes that `fill` writes. `fill` must write the payload
    /// whole: past the first [`HEADERS_LEN`] bytes, a reused buffer still holds an
    /// earlier packet's bytes.
    pub(crate) fn build_packet<R>(
        &'static self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> (Bytes, R) {
        if !(POOLED_FROM..=BUFFER_LEN).contains(&len) {
            let mut packet = BytesMut::zeroed(len);
            let result = fill(&mut packet);
            return (packet.freeze(), result);
        }
        let mut buffer = lock(&self.idle)
            .pop()
            .unwrap_or_else(|| vec![0; BUFFER_LEN].into_boxed_slice());
        buffer[..HEADERS_LEN].fill(0);
        let result = fill(&mut buffer[..len]);
        let packet = Bytes::from_owner(PooledPacket {
            buffer: Some(buffer),
            len,
            pool: self,
        });
        (packet, result)
    }

    /// Takes a buffer back, or frees it if the pool is full.
    fn give_back(&self, buffer: Box<[u8]>) {
        let mut idle = lock(&self.idle);
        if idle.len() < POOL_BUFFERS {
            idle.push(buffer);
        }
    }
}

/// A packet in a pooled buffer; gives the buffer back when dropped.
struct PooledPacket {
    /// Always `Some` until dropped.
    buffer: Option<Box<[u8]>>,
    len: usize,
    pool: &'static Pool,
}

impl AsRef<[u8]> for PooledPacket {
    fn as_ref(&self) -> &[u8] {
        self.buffer
            .as_deref()
            .map_or(&[], |buffer| &buffer[..self.len])
    }
}

impl Drop for PooledPacket {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_reused_and_a_packet_shows_only_its_own_bytes() {
        static POOL: Pool = Pool::new();
        let (first, ()) = POOL.build_packet(10_000, |bytes| bytes.fill(1));
        let address = first.as_ptr();
        drop(first);
        let (second, ()) = POOL.build_packet(5_000, |bytes| bytes[HEADERS_LEN..].fill(2));
        assert_eq!(second.as_ptr(), address, "the buffer was not reused");
        assert_eq!(second.len(), 5_000);
        assert!(second[..HEADERS_LEN].iter().all(|&b| b == 0), "stale headers");
        assert!(second[HEADERS_LEN..].iter().all(|&b| b == 2));
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_idle_buffers() {
        static POOL: Pool = Pool::new();
        let packets: Vec<Bytes> = (0..2 * POOL_BUFFERS)
            .map(|_| POOL.build_packet(BUFFER_LEN, |bytes| bytes.fill(5)).0)
            .collect();
        drop(packets);
        assert_eq!(lock(&POOL.idle).len(), POOL_BUFFERS);
    }

    #[test]
    fn small_and_oversized_packets_are_allocated_to_their_size() {
        static POOL: Pool = Pool::new();
        let (small, ()) = POOL.build_packet(40, |bytes| bytes.fill(3));
        assert_eq!(&small[..], &[3; 40][..]);
        let (large, ()) = POOL.build_packet(BUFFER_LEN + 1, |bytes| bytes.fill(4));
        assert_eq!(large.len(), BUFFER_LEN + 1);
        drop((small, large));
        assert!(lock(&POOL.idle).is_empty());
    }
}
