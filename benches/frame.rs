//! Throughput of frame encoding and decoding, next to a plain memcpy of the same number of
//! bytes so that the ratio shows.
//!
//! For each case, in group `frame`:
//! - `encode/<case>`: one frame into a preallocated buffer; `memcpy-frame/<case>` copies
//!   as many bytes;
//! - `decode/<case>`: every frame out of a buffer of about 1 MiB of them;
//!   `memcpy-buffer/<case>` copies as many bytes.
//!
//! Warm-up and measurement times are short so that the whole run takes under a minute.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use portferry::wire::{Forwarded, Frame, MAX_PAYLOAD_LEN};

/// About how many bytes of frames each decode iteration parses.
const DECODE_BUF_LEN: usize = 1 << 20;

fn frame(c: &mut Criterion) {
    let cases = [
        ("packet-1400", Frame::Packet(Bytes::from(vec![0x45; 1400]))),
        (
            "packet-64k",
            Frame::Packet(Bytes::from(vec![0x45; MAX_PAYLOAD_LEN])),
        ),
        (
            "forwarded",
            Frame::Forwarded(Forwarded {
                request_id: 1,
                port: 8080,
                hostname: "abcdef12.tunnel.example.com".into(),
                tls_port: 443,
                tcp_port: Some(40_001),
            }),
        ),
    ];
    let mut group = c.benchmark_group("frame");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for (name, frame) in &cases {
        bench_encode(&mut group, name, frame);
        bench_decode(&mut group, name, frame);
    }
    group.finish();
}

fn bench_encode(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, frame: &Frame) {
    let len = frame.encoded_len();
    group.throughput(Throughput::Bytes(len as u64));

    let mut dst = BytesMut::with_capacity(len);
    group.bench_function(BenchmarkId::new("encode", name), |b| {
        b.iter(|| {
            dst.clear();
            black_box(frame).encode(&mut dst);
            black_box(&dst);
        })
    });
    bench_memcpy(group, "memcpy-frame", name, len);
}

fn bench_decode(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, frame: &Frame) {
    let mut wire = BytesMut::new();
    for _ in 0..(DECODE_BUF_LEN / frame.encoded_len()).max(1) {
        frame.encode(&mut wire);
    }
    group.throughput(Throughput::Bytes(wire.len() as u64));

    group.bench_function(BenchmarkId::new("decode", name), |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                while let Some(frame) = Frame::parse(&mut buf).expect("valid frames") {
                    black_box(frame);
                }
                buf
            },
            BatchSize::LargeInput,
        )
    });
    bench_memcpy(group, "memcpy-buffer", name, wire.len());
}

/// The baseline: `len` bytes copied into a preallocated buffer.
fn bench_memcpy(group: &mut BenchmarkGroup<'_, WallTime>, function: &str, name: &str, len: usize) {
    let src = vec![0x45_u8; len];
    let mut dst = vec![0_u8; len];
    group.bench_function(BenchmarkId::new(function, name), |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
}

criterion_group!(benches, frame);
criterion_main!(benches);
