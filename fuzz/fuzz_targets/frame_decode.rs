//! Feeds arbitrary bytes to `Frame::parse` in arbitrary chunks, as reads off a socket
//! would arrive.
//!
//! Input: two bytes that seed the chunk sizes, then the byte stream. Asserts that parsing
//! never panics, never buffers more than one frame plus the latest chunk, agrees with
//! `Frame::check`, and that every frame re-encodes to exactly the bytes it came from.
//! Stops at the first error, as the link would be closed.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portferry::wire::{Frame, HEADER_LEN, MAX_PAYLOAD_LEN};

/// Largest chunk: enough to hold a few of the largest frames at once.
const MAX_CHUNK: usize = 4 * (HEADER_LEN + MAX_PAYLOAD_LEN);

/// Chunk sizes from a xorshift generator, so that the fuzzer controls how the stream is
/// split without spending input bytes on every split.
struct ChunkSizes(u32);

impl ChunkSizes {
    fn new(seed: [u8; 2]) -> Self {
        // Never zero, which would make xorshift stick at zero.
        Self(u32::from(u16::from_le_bytes(seed)) | 1 << 16)
    }

    fn next(&mut self) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        let roll = (x >> 2) as usize;
        match x % 4 {
            0 => 1,
            1 => 1 + roll % 16,
            2 => 1 + roll % 1024,
            _ => MAX_CHUNK,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut chunks = ChunkSizes::new(*seed);
    let mut buf = BytesMut::new();
    // `stream[..fed]` has been copied into `buf`, and `stream[..consumed]` parsed off it.
    let (mut fed, mut consumed) = (0, 0);
    while fed < stream.len() {
        let chunk = chunks.next().min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + chunk]);
        fed += chunk;
        assert!(buf.len() < HEADER_LEN + MAX_PAYLOAD_LEN + chunk);
        loop {
            let checked = Frame::check(&buf);
            let before = buf.len();
            match Frame::parse(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    assert_eq!(checked, Ok(Some(used)));
                    assert_eq!(frame.encoded_len(), used);
                    let mut encoded = Vec::with_capacity(used);
                    frame.encode(&mut encoded);
                    assert_eq!(encoded, &stream[consumed..consumed + used]);
                    consumed += used;
                }
                Ok(None) => {
                    assert_eq!(checked, Ok(None));
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(err) => {
                    if let Err(header_err) = checked {
                        assert_eq!(header_err, err);
                    }
                    return;
                }
            }
        }
        assert!(buf.len() < HEADER_LEN + MAX_PAYLOAD_LEN);
    }
});
