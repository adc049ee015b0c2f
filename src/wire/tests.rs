//! Test vectors for every frame kind, malformed input, and a randomized round trip.

use std::collections::HashSet;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

static HELLO_BYTES: [u8; 16] = [
    0x01, 0x00, 0x00, 0x00, 0x0b, // header
    0x00, 0x01, // version
    0x00, 0x03, b't', b'o', b'k', // token
    0x00, 0x02, 0xaa, 0xbb, // resume
];

fn hello_repr() -> Frame {
    Frame::Hello(Hello {
        version: 1,
        token: "tok".into(),
        resume: Bytes::from_static(&[0xaa, 0xbb]),
    })
}

static WELCOME_BYTES: [u8; 12] = [
    0x02, 0x00, 0x00, 0x00, 0x07, // header
    0x00, 0x01, // version
    0x00, 0x03, 0x01, 0x02, 0x03, // ticket
];

fn welcome_repr() -> Frame {
    Frame::Welcome(Welcome {
        version: 1,
        ticket: Bytes::from_static(&[0x01, 0x02, 0x03]),
    })
}

static FORWARD_BYTES: [u8; 12] = [
    0x03, 0x00, 0x00, 0x00, 0x07, // header
    0x01, 0x02, 0x03, 0x04, // request_id
    0x1f, 0x90, // port
    0x03, // flags: unencrypted | h2
];

fn forward_repr() -> Frame {
    Frame::Forward(ForwardRequest {
        request_id: 0x0102_0304,
        port: 8080,
        unencrypted: true,
        h2: true,
    })
}

static FORWARDED_BYTES: [u8; 26] = [
    0x04, 0x00, 0x00, 0x00, 0x15, // header
    0x00, 0x00, 0x00, 0x07, // request_id
    0x1f, 0x90, // port
    0x00, 0x09, b'a', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', // hostname
    0x01, 0xbb, // tls_port
    0x9c, 0x40, // tcp_port
];

fn forwarded_repr() -> Frame {
    Frame::Forwarded(Forwarded {
        request_id: 7,
        port: 8080,
        hostname: "a.example".into(),
        tls_port: 443,
        tcp_port: Some(40_000),
    })
}

static FORWARDED_NO_TCP_BYTES: [u8; 18] = [
    0x04, 0x00, 0x00, 0x00, 0x0d, // header
    0x00, 0x00, 0x00, 0x08, // request_id
    0x00, 0x50, // port
    0x00, 0x01, b'b', // hostname
    0x01, 0xbb, // tls_port
    0x00, 0x00, // tcp_port: none
];

fn forwarded_no_tcp_repr() -> Frame {
    Frame::Forwarded(Forwarded {
        request_id: 8,
        port: 80,
        hostname: "b".into(),
        tls_port: 443,
        tcp_port: None,
    })
}

static CLOSE_BYTES: [u8; 7] = [
    0x05, 0x00, 0x00, 0x00, 0x02, // header
    0x00, 0x16, // port
];

fn close_repr() -> Frame {
    Frame::Close { port: 22 }
}

static ERROR_BYTES: [u8; 17] = [
    0x06, 0x00, 0x00, 0x00, 0x0c, // header
    0x00, 0x00, 0x00, 0x00, // request_id: the whole link
    0x00, 0x03, // code
    0x00, 0x04, b'b', b'u', b's', b'y', // message
];

fn error_repr() -> Frame {
    Frame::Error(ErrorFrame {
        request_id: 0,
        code: ErrorCode::PORT_IN_USE,
        message: "busy".into(),
    })
}

static PING_BYTES: [u8; 13] = [
    0x07, 0x00, 0x00, 0x00, 0x08, // header
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // nonce
];

fn ping_repr() -> Frame {
    Frame::Ping(0x0102_0304_0506_0708)
}

static PONG_BYTES: [u8; 13] = [
    0x08, 0x00, 0x00, 0x00, 0x08, // header
    0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88, // nonce
];

fn pong_repr() -> Frame {
    Frame::Pong(0xffee_ddcc_bbaa_9988)
}

static PACKET_BYTES: [u8; 25] = [
    0x10, 0x00, 0x00, 0x00, 0x14, // header
    // An IPv4 header with no payload: 10.0.0.1 -> 10.0.0.2, protocol TCP.
    0x45, 0x00, 0x00, 0x14, 0x00, 0x01, 0x00, 0x00, 0x40, 0x06, 0x66, 0xe1, 0x0a, 0x00, 0x00, 0x01,
    0x0a, 0x00, 0x00, 0x02,
];

fn packet_repr() -> Frame {
    Frame::Packet(Bytes::copy_from_slice(&PACKET_BYTES[HEADER_LEN..]))
}

/// Every test vector: a name (also its fuzz seed file's), its bytes, and its frame.
fn vectors() -> [(&'static str, &'static [u8], Frame); 10] {
    [
        ("hello", &HELLO_BYTES, hello_repr()),
        ("welcome", &WELCOME_BYTES, welcome_repr()),
        ("forward", &FORWARD_BYTES, forward_repr()),
        ("forwarded", &FORWARDED_BYTES, forwarded_repr()),
        (
            "forwarded_no_tcp",
            &FORWARDED_NO_TCP_BYTES,
            forwarded_no_tcp_repr(),
        ),
        ("close", &CLOSE_BYTES, close_repr()),
        ("error", &ERROR_BYTES, error_repr()),
        ("ping", &PING_BYTES, ping_repr()),
        ("pong", &PONG_BYTES, pong_repr()),
        ("packet", &PACKET_BYTES, packet_repr()),
    ]
}

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
    assert_eq!(known.len(), 9);
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

/// Parses malformed `bytes`, checks that `buf` was left as it was, and returns the error.
fn parse_error(bytes: &[u8]) -> FrameError {
    let mut buf = BytesMut::from(bytes);
    let err = Frame::parse(&mut buf).expect_err("malformed input parsed");
    assert_eq!(buf, bytes, "buf changed on error");
    err
}

#[test]
fn unknown_kind_from_first_byte() {
    for kind in [0x00, 0x09, 0x0f, 0x11, 0xff] {
        assert_eq!(Frame::check(&[kind]), Err(FrameError::UnknownKind(kind)));
        assert_eq!(parse_error(&[kind]), FrameError::UnknownKind(kind));
        assert_eq!(
            parse_error(&[kind, 0x00, 0x00, 0x00, 0x00]),
            FrameError::UnknownKind(kind)
        );
    }
}

#[test]
fn too_long_from_header_alone() {
    let header = [0x10, 0x00, 0x01, 0x00, 0x00];
    let err = FrameError::TooLong {
        len: MAX_PAYLOAD_LEN + 1,
        max: MAX_PAYLOAD_LEN,
    };
    assert_eq!(Frame::check(&header), Err(err.clone()));
    assert_eq!(parse_error(&header), err);

    // Control frames are bounded the same way.
    let header = [0x07, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        parse_error(&header),
        FrameError::TooLong {
            len: u32::MAX as usize,
            max: MAX_PAYLOAD_LEN,
        }
    );

    // The largest payload is fine: wait for it.
    let header = packet_header(MAX_PAYLOAD_LEN);
    assert_eq!(Frame::check(&header), Ok(None));
    assert_eq!(Frame::parse(&mut BytesMut::from(&header[..])), Ok(None));
}

#[test]
fn truncated_field() {
    // A nonce of 7 bytes.
    assert_eq!(
        parse_error(&[0x07, 0x00, 0x00, 0x00, 0x07, 1, 2, 3, 4, 5, 6, 7]),
        FrameError::Truncated {
            kind: FrameKind::Ping,
            field: "nonce",
        }
    );
    // A token announcing 5 bytes when none follow.
    assert_eq!(
        parse_error(&[0x01, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x00, 0x05]),
        FrameError::Truncated {
            kind: FrameKind::Hello,
            field: "token",
        }
    );
    // A Hello that stops after its token.
    assert_eq!(
        parse_error(&[
            0x01, 0x00, 0x00, 0x00, 0x07, // header
            0x00, 0x01, // version
            0x00, 0x03, b't', b'o', b'k', // token
        ]),
        FrameError::Truncated {
            kind: FrameKind::Hello,
            field: "resume",
        }
    );
    // A Close with no port.
    assert_eq!(
        parse_error(&[0x05, 0x00, 0x00, 0x00, 0x00]),
        FrameError::Truncated {
            kind: FrameKind::Close,
            field: "port",
        }
    );
}

#[test]
fn trailing_bytes() {
    assert_eq!(
        parse_error(&[0x05, 0x00, 0x00, 0x00, 0x03, 0x00, 0x16, 0x00]),
        FrameError::TrailingBytes {
            kind: FrameKind::Close,
            extra: 1,
        }
    );
    let mut forwarded = FORWARDED_BYTES.to_vec();
    forwarded.extend_from_slice(&[0xde, 0xad]);
    forwarded[4] += 2;
    assert_eq!(
        parse_error(&forwarded),
        FrameError::TrailingBytes {
            kind: FrameKind::Forwarded,
            extra: 2,
        }
    );
}

#[test]
fn invalid_utf8() {
    let hostname = [
        0x04, 0x00, 0x00, 0x00, 0x0d, // header
        0x00, 0x00, 0x00, 0x01, // request_id
        0x00, 0x50, // port
        0x00, 0x01, 0xff, // hostname: not UTF-8
        0x01, 0xbb, // tls_port
        0x00, 0x00, // tcp_port
    ];
    assert_eq!(
        parse_error(&hostname),
        FrameError::InvalidUtf8 {
            kind: FrameKind::Forwarded,
            field: "hostname",
        }
    );
    let message = [
        0x06, 0x00, 0x00, 0x00, 0x09, // header
        0x00, 0x00, 0x00, 0x00, // request_id
        0x00, 0x07, // code
        0x00, 0x01, 0xc3, // message: half of a two-byte character
    ];
    assert_eq!(
        parse_error(&message),
        FrameError::InvalidUtf8 {
            kind: FrameKind::Error,
            field: "message",
        }
    );
}

#[test]
fn unknown_flags() {
    for flags in [0x04, 0x80, 0x83] {
        let mut forward = FORWARD_BYTES;
        forward[11] = flags;
        assert_eq!(parse_error(&forward), FrameError::UnknownFlags(flags));
    }
}

#[test]
fn empty_packet() {
    assert_eq!(
        parse_error(&[0x10, 0x00, 0x00, 0x00, 0x00]),
        FrameError::EmptyPacket
    );
    assert_eq!(
        Frame::Packet(Bytes::new()).validate(),
        Err(FrameError::EmptyPacket)
    );
}

#[test]
fn validate_rejects_fields_too_long() {
    let long = "x".repeat(usize::from(u16::MAX) + 1);
    let cases = [
        (
            Frame::Hello(Hello {
                version: 1,
                token: long.clone(),
                resume: Bytes::new(),
            }),
            FrameKind::Hello,
            "token",
        ),
        (
            Frame::Welcome(Welcome {
                version: 1,
                ticket: Bytes::from(long.clone()),
            }),
            FrameKind::Welcome,
            "ticket",
        ),
        (
            Frame::Forwarded(Forwarded {
                hostname: long.clone(),
                ..forwarded_fields()
            }),
            FrameKind::Forwarded,
            "hostname",
        ),
        (
            Frame::Error(ErrorFrame {
                request_id: 0,
                code: ErrorCode::INTERNAL,
                message: long.clone(),
            }),
            FrameKind::Error,
            "message",
        ),
    ];
    for (frame, kind, field) in cases {
        assert_eq!(
            frame.validate(),
            Err(FrameError::FieldTooLong {
                kind,
                field,
                len: long.len(),
            })
        );
    }
}

#[test]
fn validate_rejects_payload_too_long() {
    let packet = Frame::Packet(Bytes::from(vec![0; MAX_PAYLOAD_LEN + 1]));
    assert_eq!(
        packet.validate(),
        Err(FrameError::TooLong {
            len: MAX_PAYLOAD_LEN + 1,
            max: MAX_PAYLOAD_LEN,
        })
    );

    // Each field fits its length prefix, but together they are one byte too many.
    let hello = |token_len: usize| {
        Frame::Hello(Hello {
            version: 1,
            token: "x".repeat(token_len),
            resume: Bytes::new(),
        })
    };
    let fits = hello(MAX_PAYLOAD_LEN - 6);
    assert_eq!(fits.validate(), Ok(()));
    assert_eq!(fits.encoded_len(), HEADER_LEN + MAX_PAYLOAD_LEN);
    let mut buf = BytesMut::new();
    fits.encode(&mut buf);
    assert_eq!(Frame::parse(&mut buf), Ok(Some(fits)));
    assert_eq!(
        hello(MAX_PAYLOAD_LEN - 5).validate(),
        Err(FrameError::TooLong {
            len: MAX_PAYLOAD_LEN + 1,
            max: MAX_PAYLOAD_LEN,
        })
    );
}

#[test]
fn validate_rejects_tcp_port_zero() {
    let frame = Frame::Forwarded(Forwarded {
        tcp_port: Some(0),
        ..forwarded_fields()
    });
    assert_eq!(
        frame.validate(),
        Err(FrameError::ReservedValue {
            kind: FrameKind::Forwarded,
            field: "tcp_port",
        })
    );
}

#[test]
#[should_panic(expected = "cannot encode a Packet frame: empty packet frame")]
fn encode_panics_on_invalid_frame() {
    Frame::Packet(Bytes::new()).encode(&mut BytesMut::new());
}

#[test]
fn debug_redacts_token() {
    let hello = Hello {
        version: 1,
        token: "hunter2".into(),
        resume: Bytes::new(),
    };
    let debug = format!("{:?}", Frame::Hello(hello));
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
}

#[test]
fn debug_redacts_resume_tickets() {
    let ticket = Bytes::from_static(&[0xab; crate::wire::TICKET_LEN]);
    let frames = [
        Frame::Hello(Hello {
            version: 1,
            token: String::new(),
            resume: ticket.clone(),
        }),
        Frame::Welcome(Welcome {
            version: 1,
            ticket: ticket.clone(),
        }),
    ];
    for frame in frames {
        let debug = format!("{frame:?}");
        assert!(!debug.contains("171") && !debug.contains("ab"), "{debug}");
        assert!(debug.contains("<redacted 48 bytes>"), "{debug}");
    }
}

#[test]
fn error_code_names() {
    assert_eq!(format!("{:?}", ErrorCode::PROTOCOL), "ErrorCode::PROTOCOL");
    assert_eq!(format!("{:?}", ErrorCode(42)), "ErrorCode(42)");
    assert_eq!(ErrorCode::PORT_IN_USE.to_string(), "PORT_IN_USE (3)");
    assert_eq!(ErrorCode(42).to_string(), "42");
}

#[test]
fn error_display() {
    let err = FrameError::Truncated {
        kind: FrameKind::Ping,
        field: "nonce",
    };
    assert_eq!(err.to_string(), "Ping frame cut short in field `nonce`");
    assert_eq!(
        FrameError::UnknownKind(0x09).to_string(),
        "unknown frame kind 0x09"
    );
}

/// A valid [`Forwarded`] for tests to override fields of.
fn forwarded_fields() -> Forwarded {
    Forwarded {
        request_id: 1,
        port: 80,
        hostname: "h".into(),
        tls_port: 443,
        tcp_port: None,
    }
}

fn random_string(rng: &mut StdRng) -> String {
    let len = rng.random_range(0..=16);
    (0..len).map(|_| rng.random::<char>()).collect()
}

fn random_bytes(rng: &mut StdRng, max_len: usize) -> Bytes {
    let mut bytes = vec![0; rng.random_range(0..=max_len)];
    rng.fill(&mut bytes[..]);
    bytes.into()
}

fn random_packet(rng: &mut StdRng) -> Bytes {
    let len = match rng.random_range(0..20) {
        0 => 1,
        1 => MAX_PAYLOAD_LEN,
        2 => rng.random_range(1..=MAX_PAYLOAD_LEN),
        _ => rng.random_range(1..=1500),
    };
    let mut packet = vec![0; len];
    rng.fill(&mut packet[..]);
    packet.into()
}

fn random_frame(rng: &mut StdRng) -> Frame {
    match rng.random_range(0..16) {
        0 => Frame::Hello(Hello {
            version: rng.random(),
            token: random_string(rng),
            resume: random_bytes(rng, 64),
        }),
        1 => Frame::Welcome(Welcome {
            version: rng.random(),
            ticket: random_bytes(rng, 64),
        }),
        2 => Frame::Forward(ForwardRequest {
            request_id: rng.random(),
            port: rng.random(),
            unencrypted: rng.random(),
            h2: rng.random(),
        }),
        3 => Frame::Forwarded(Forwarded {
            request_id: rng.random(),
            port: rng.random(),
            hostname: random_string(rng),
            tls_port: rng.random(),
            tcp_port: rng.random_bool(0.5).then(|| rng.random_range(1..=u16::MAX)),
        }),
        4 => Frame::Close { port: rng.random() },
        5 => Frame::Error(ErrorFrame {
            request_id: rng.random(),
            code: ErrorCode(rng.random_range(0..10)),
            message: random_string(rng),
        }),
        6 => Frame::Ping(rng.random()),
        7 => Frame::Pong(rng.random()),
        _ => Frame::Packet(random_packet(rng)),
    }
}

#[test]
fn random_frames_round_trip_through_chunks() {
    let mut rng = StdRng::seed_from_u64(0x706f_7274_6665_7272);
    let frames: Vec<Frame> = (0..2000).map(|_| random_frame(&mut rng)).collect();
    let mut wire = BytesMut::new();
    for frame in &frames {
        assert_eq!(frame.validate(), Ok(()), "{frame:?}");
        frame.encode(&mut wire);
    }
    let expected_len: usize = frames.iter().map(Frame::encoded_len).sum();
    assert_eq!(wire.len(), expected_len);

    let mut parsed = Vec::with_capacity(frames.len());
    let mut buf = BytesMut::new();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let max_chunk = match rng.random_range(0..4) {
            0 => 1,
            1 => 64,
            2 => 4096,
            _ => 3 * MAX_PAYLOAD_LEN,
        };
        let (chunk, tail) = rest.split_at(rng.random_range(1..=max_chunk).min(rest.len()));
        rest = tail;
        buf.extend_from_slice(chunk);
        while let Some(frame) = Frame::parse(&mut buf).expect("valid stream") {
            parsed.push(frame);
        }
        assert!(buf.len() < HEADER_LEN + MAX_PAYLOAD_LEN);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    assert_eq!(parsed.len(), frames.len());
    assert!(parsed == frames, "frames differ after the round trip");
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
