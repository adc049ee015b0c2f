//! Tests of the frame codec. This file holds a test vector for every frame kind; the
//! tests are in one file per concern.

mod format;
mod malformed;
mod random;
mod vectors;

use bytes::Bytes;

use super::*;
use crate::connection::{ConnectionInfo, Edge};

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

static CONNECTION_TLS_BYTES: [u8; 37] = [
    0x09, 0x00, 0x00, 0x00, 0x20, // header
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, // id
    0x04, 0xc0, 0x00, 0x02, 0x07, 0x0f, 0xa0, // client 192.0.2.7:4000
    0x04, 0x7f, 0x00, 0x00, 0x01, 0x20, 0xfb, // relay_addr 127.0.0.1:8443
    0x01, // edge: TLS
    0x00, 0x03, b'a', b'.', b'x', // server_name
    0x00, 0x02, b'h', b'2', // alpn
];

fn connection_tls_repr() -> Frame {
    Frame::Connection(ConnectionInfo::new(
        7,
        "192.0.2.7:4000".parse().unwrap(),
        "127.0.0.1:8443".parse().unwrap(),
        Edge::Tls {
            server_name: "a.x".into(),
            alpn: Some(b"h2".to_vec()),
        },
    ))
}

static CONNECTION_TCP6_BYTES: [u8; 52] = [
    0x09, 0x00, 0x00, 0x00, 0x2f, // header
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, // id
    0x06, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // client 2001:db8::1
    0xc3, 0x50, // :50000
    0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // relay_addr ::1
    0x4e, 0x20, // :20000
    0x02, // edge: raw TCP
];

fn connection_tcp6_repr() -> Frame {
    Frame::Connection(ConnectionInfo::new(
        0xffff_ffff_ffff_fffe,
        "[2001:db8::1]:50000".parse().unwrap(),
        "[::1]:20000".parse().unwrap(),
        Edge::Tcp,
    ))
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
fn vectors() -> [(&'static str, &'static [u8], Frame); 12] {
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
        (
            "connection_tls",
            &CONNECTION_TLS_BYTES,
            connection_tls_repr(),
        ),
        (
            "connection_tcp6",
            &CONNECTION_TCP6_BYTES,
            connection_tcp6_repr(),
        ),
        ("packet", &PACKET_BYTES, packet_repr()),
    ]
}
