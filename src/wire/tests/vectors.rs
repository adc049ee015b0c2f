//! The test vectors both ways, in pieces, and as the `frame_decode` fuzz seeds.

use std::collections::HashSet;
use std::path::Path;

use bytes::BytesMut;

use super::*;

#[test]
fn test_deconstruct() {
    for (name, bytes, repr) in vectors() {
        assert_eq!(Frame::check(bytes), Ok(Some(bytes.len())), "{name}");
        let mut buf = BytesMut::from(bytes);
        assert_eq!(Frame::parse(&mut buf), Ok(Some(repr)), "{name}");
        assert!(buf.is_empty(), "{name}");
    }
}

#[test]
fn test_construct() {
    for (name, bytes, repr) in vectors() {
        assert_eq!(repr.validate(), Ok(()), "{name}");
        assert_eq!(repr.encoded_len(), bytes.len(), "{name}");
        assert_eq!(u8::from(repr.kind()), bytes[0], "{name}");
        let mut buf = Vec::new();
        repr.encode(&mut buf);
        assert_eq!(buf, bytes, "{name}");
    }
}

#[test]
fn vectors_cover_every_kind() {
    let known: HashSet<FrameKind> = (0..=u8::MAX)
        .filter_map(|byte| FrameKind::try_from(byte).ok())
        .collect();
    let covered: HashSet<FrameKind> = vectors().iter().map(|(_, _, repr)| repr.kind()).collect();
    assert_eq!(known.len(), 10);
    assert_eq!(covered, known);
}

#[test]
fn kind_byte_round_trips() {
    for byte in 0..=u8::MAX {
        match FrameKind::try_from(byte) {
            Ok(kind) => assert_eq!(u8::from(kind), byte),
            Err(err) => assert_eq!(err, FrameError::UnknownKind(byte)),
        }
    }
}

#[test]
fn packet_payload_is_not_copied() {
    let mut buf = BytesMut::from(&PACKET_BYTES[..]);
    let start = buf.as_ptr();
    let Ok(Some(Frame::Packet(packet))) = Frame::parse(&mut buf) else {
        panic!("no packet parsed");
    };
    assert_eq!(packet.as_ptr(), start.wrapping_add(HEADER_LEN));
}

#[test]
fn packet_header_matches_encoded_packet() {
    assert_eq!(packet_header(20), PACKET_BYTES[..HEADER_LEN]);
    assert_eq!(
        packet_header(MAX_PAYLOAD_LEN),
        [0x10, 0x00, 0x00, 0xff, 0xff]
    );
}

#[test]
#[should_panic(expected = "cannot frame a packet of 0 bytes")]
fn packet_header_rejects_empty() {
    packet_header(0);
}

#[test]
#[should_panic(expected = "cannot frame a packet of 65536 bytes")]
fn packet_header_rejects_too_long() {
    packet_header(MAX_PAYLOAD_LEN + 1);
}

#[test]
fn partial_input_needs_more() {
    for (name, bytes, _) in vectors() {
        for end in 0..bytes.len() {
            let prefix = &bytes[..end];
            assert_eq!(Frame::check(prefix), Ok(None), "{name}[..{end}]");
            let mut buf = BytesMut::from(prefix);
            assert_eq!(Frame::parse(&mut buf), Ok(None), "{name}[..{end}]");
            assert_eq!(buf, prefix, "{name}[..{end}]");
        }
    }
}

/// Two bytes that seed the chunk sizes of the `frame_decode` fuzz target.
const FUZZ_CHUNK_SEED: [u8; 2] = [0x2a, 0x00];

/// The `frame_decode` fuzz target's seed corpus holds one file per test vector, and a
/// `stream` file with all of them in a row, each behind [`FUZZ_CHUNK_SEED`]. To rewrite
/// the files after changing the vectors, run this test with `PORTFERRY_BLESS_CORPUS=1`.
#[test]
fn fuzz_seed_corpus_matches_vectors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decode");
    let bless = std::env::var_os("PORTFERRY_BLESS_CORPUS").is_some();
    let mut stream = FUZZ_CHUNK_SEED.to_vec();
    let mut seeds = Vec::new();
    for (name, bytes, _) in vectors() {
        seeds.push((name, [&FUZZ_CHUNK_SEED[..], bytes].concat()));
        stream.extend_from_slice(bytes);
    }
    seeds.push(("stream", stream));
    for (name, seed) in seeds {
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &seed).unwrap();
        }
        let committed =
            std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert_eq!(committed, seed, "{} is stale", path.display());
    }
}
