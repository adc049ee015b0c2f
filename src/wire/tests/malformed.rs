//! Malformed input and invalid frames: typed errors, the input left as it was.

use bytes::{Bytes, BytesMut};

use super::*;

/// Parses malformed `bytes`, checks that `buf` was left as it was, and returns the error.
fn parse_error(bytes: &[u8]) -> FrameError {
    let mut buf = BytesMut::from(bytes);
    let err = Frame::parse(&mut buf).expect_err("malformed input parsed");
    assert_eq!(buf, bytes, "buf changed on error");
    err
}

#[test]
fn unknown_kind_from_first_byte() {
    for kind in [0x00, 0x0a, 0x0f, 0x11, 0xff] {
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
                max: usize::from(u16::MAX),
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

/// `CONNECTION_TLS_BYTES` with `edit` applied to its payload and the length fixed up.
fn connection_edited(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut payload = CONNECTION_TLS_BYTES[HEADER_LEN..].to_vec();
    edit(&mut payload);
    let mut frame = vec![0x09];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

#[test]
fn connection_frames_with_reserved_or_oversized_values() {
    let reserved = |field| FrameError::ReservedValue {
        kind: FrameKind::Connection,
        field,
    };
    // Byte 8 is the client's family, byte 22 the edge.
    let cases = [
        (connection_edited(|p| p[8] = 5), reserved("client")),
        (connection_edited(|p| p[22] = 3), reserved("edge")),
        // An empty server name.
        (
            connection_edited(|p| p.splice(23..28, [0, 0]).for_each(drop)),
            reserved("server_name"),
        ),
        // An IPv4-mapped IPv6 client: only its IPv4 form is canonical.
        (
            connection_edited(|p| {
                let mapped = [[6].as_slice(), &[0; 10], &[0xff, 0xff, 192, 0, 2, 7]].concat();
                p.splice(8..13, mapped).for_each(drop);
            }),
            reserved("address"),
        ),
        (
            connection_edited(|p| {
                let long = [[0x01, 0x00].as_slice(), &[b'a'; 256]].concat();
                p.splice(23..28, long).for_each(drop);
            }),
            FrameError::FieldTooLong {
                kind: FrameKind::Connection,
                field: "server_name",
                len: 256,
                max: 255,
            },
        ),
        (
            connection_edited(|p| p.push(0)),
            FrameError::TrailingBytes {
                kind: FrameKind::Connection,
                extra: 1,
            },
        ),
        (
            connection_edited(|p| p.truncate(20)),
            FrameError::Truncated {
                kind: FrameKind::Connection,
                field: "relay_addr",
            },
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(parse_error(&bytes), expected, "{bytes:02x?}");
    }
}
