//! Input helpers shared by the fuzz targets (each target uses a part of them).
#![allow(dead_code)]

/// The unread rest of the input; reads past its end give zeros.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut bytes = [0; N];
        let taken = self.take(N);
        bytes[..taken.len()].copy_from_slice(taken);
        bytes
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Chunk sizes from a xorshift generator, so that the fuzzer controls how a byte stream
/// is split without spending input bytes on every split: 1 byte, up to 16, up to 1024,
/// or `max`, a quarter of the time each.
pub struct ChunkSizes {
    state: u32,
    max: usize,
}

impl ChunkSizes {
    pub fn new(seed: u16, max: usize) -> Self {
        // Never zero, which would make xorshift stick at zero.
        let state = u32::from(seed) | 1 << 16;
        ChunkSizes { state, max }
    }

    pub fn next(&mut self) -> usize {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        let roll = (x >> 2) as usize;
        match x % 4 {
            0 => 1,
            1 => 1 + roll % 16,
            2 => 1 + roll % 1024,
            _ => self.max,
        }
    }
}
