//! Randomized frames round-trip through a stream cut into random chunks.

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;
use crate::connection::{ConnectionInfo, Edge};

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

fn random_address(rng: &mut StdRng) -> SocketAddr {
    let ip: IpAddr = if rng.random() {
        Ipv4Addr::from(rng.random::<u32>()).into()
    } else {
        // Not an IPv4-mapped one: those are taken as IPv4.
        Ipv6Addr::from(rng.random::<u128>() | 1 << 127).into()
    };
    SocketAddr::new(ip, rng.random())
}

fn random_connection(rng: &mut StdRng) -> ConnectionInfo {
    let edge = if rng.random() {
        let alpn = random_bytes(rng, 16);
        Edge::Tls {
            server_name: format!("x{}", random_string(rng)).chars().take(60).collect(),
            alpn: (!alpn.is_empty()).then(|| alpn.to_vec()),
        }
    } else {
        Edge::Tcp
    };
    let (client, relay) = (random_address(rng), random_address(rng));
    ConnectionInfo::new(rng.random(), client, relay, edge)
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
        8 => Frame::Connection(random_connection(rng)),
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
