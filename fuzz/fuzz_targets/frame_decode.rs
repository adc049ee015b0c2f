//! Feeds arbitrary bytes to `Frame::parse` in arbitrary chunks, as reads off a socket
//! would arrive.
//!
//! Input: two bytes that seed the chunk sizes, then the byte stream. Asserts that parsing
//! never panics, never buffers more than one frame plus the latest chunk, agrees with
//! `Frame::check`, and that every frame re-encodes to exactly the bytes it came from.
//! Stops at the first error, as the link would be closed.

#![no_main]

mod shared;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portferry::wire::{Frame, HEADER_LEN, MAX_PAYLOAD_LEN};
use shared::ChunkSizes;

/// Largest chunk: enough to hold a few of the largest frames at once.
const MAX_CHUNK: usize = 4 * (HEADER_LEN + MAX_PAYLOAD_LEN);

fuzz_target!(|data: &[u8]| {
    let Some((seed, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut chunks = ChunkSizes::new(u16::from_le_bytes(*seed), MAX_CHUNK);
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
