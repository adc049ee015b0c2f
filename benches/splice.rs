//! Cost of the tunnel's data path: two userspace stacks back to back in memory, the
//! agent side splicing each inner connection to a loopback TCP service, next to the
//! same work over a direct kernel loopback connection so that the ratio shows.
//!
//! In group `splice`:
//! - `bulk/tunnel`: 32 MiB per iteration written on one inner connection opened by the
//!   relay stack; the agent stack forwards it to a loopback *counting sink*, which
//!   discards what it reads and answers one byte per 32 MiB received, so an iteration
//!   ends only when every byte has reached the service. `bulk/direct` does the same over
//!   a kernel loopback connection to the same kind of sink.
//! - `rtt64/tunnel`: one 64-byte ping-pong (write 64 bytes, read the 64-byte echo)
//!   through the tunnel to a loopback echo service; `rtt64/direct` does it over a kernel
//!   loopback connection to the same echo service. Times many round trips in a row.
//!
//! Stacks, services and connections are set up once, outside the measured loops, and
//! every iteration reuses the same connection: the numbers are steady-state throughput
//! and latency, without handshakes. Everything, the client included, runs as tasks of
//! one two-worker tokio runtime (the machine has two cores). Warm-up and measurement
//! times are short so that the whole run takes about a minute.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use portferry::netstack::{Stack, StackConfig};
use portferry::splice::forward_to;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Bytes each `bulk` iteration moves, and after which the sink acknowledges.
const BULK_BYTES: usize = 32 << 20;
/// Size of each write of a `bulk` iteration.
const WRITE_CHUNK: usize = 256 << 10;
/// Size of a `rtt64` message.
const PING_BYTES: usize = 64;
/// Inner port the agent forwards to the counting sink.
const SINK_PORT: u16 = 8000;
/// Inner port the agent forwards to the echo service.
const ECHO_PORT: u16 = 8001;

fn splice(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sink = rt.block_on(serve(sink_connection));
    let echo = rt.block_on(serve(echo_connection));
    let relay = rt.block_on(tunnel(sink, echo));

    let mut group = c.benchmark_group("splice");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    group.throughput(Throughput::Bytes(BULK_BYTES as u64));
    let mut inner = Some(
        rt.block_on(relay.connect(SINK_PORT))
            .expect("inner connect"),
    );
    group.bench_function(BenchmarkId::new("bulk", "tunnel"), |b| {
        b.iter_custom(|iters| as_task(&rt, &mut inner, iters, bulk))
    });
    let mut direct = Some(rt.block_on(kernel_connect(sink)));
    group.bench_function(BenchmarkId::new("bulk", "direct"), |b| {
        b.iter_custom(|iters| as_task(&rt, &mut direct, iters, bulk))
    });

    group.throughput(Throughput::Elements(1));
    let mut inner = Some(
        rt.block_on(relay.connect(ECHO_PORT))
            .expect("inner connect"),
    );
    group.bench_function(BenchmarkId::new("rtt64", "tunnel"), |b| {
        b.iter_custom(|iters| as_task(&rt, &mut inner, iters, ping_pong))
    });
    let mut direct = Some(rt.block_on(kernel_connect(echo)));
    group.bench_function(BenchmarkId::new("rtt64", "direct"), |b| {
        b.iter_custom(|iters| as_task(&rt, &mut direct, iters, ping_pong))
    });
    group.finish();
}

/// Links a relay and an agent stack in memory; the agent forwards [`SINK_PORT`] to the
/// counting sink at `sink` and [`ECHO_PORT`] to the echo service at `echo`. Returns the
/// relay stack.
async fn tunnel(sink: SocketAddr, echo: SocketAddr) -> Stack {
    let relay = Stack::new(StackConfig::relay());
    let agent = Stack::new(StackConfig::agent());
    tokio::spawn(portferry::netstack::connect_in_memory(
        relay.clone(),
        agent.clone(),
    ));
    for (port, target) in [(SINK_PORT, sink), (ECHO_PORT, echo)] {
        let listener = agent.listen(port).expect("inner listen");
        tokio::spawn(forward_to(listener, target, Duration::from_secs(5)));
    }
    relay
}

/// A loopback TCP service that runs `handle` on each connection.
async fn serve<F>(handle: fn(TcpStream) -> F) -> SocketAddr
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream));
        }
    });
    addr
}

/// Discards what it reads and writes one byte back per [`BULK_BYTES`] received.
async fn sink_connection(mut stream: TcpStream) {
    let mut buf = vec![0_u8; WRITE_CHUNK];
    let mut received = 0;
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        received += n;
        while received >= BULK_BYTES {
            received -= BULK_BYTES;
            if stream.write_all(b"!").await.is_err() {
                return;
            }
        }
    }
}

/// Writes back what it reads.
async fn echo_connection(mut stream: TcpStream) {
    let (mut reader, mut writer) = stream.split();
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
}

/// A kernel loopback connection to `addr`, with Nagle off like the tunnel's.
async fn kernel_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Runs the client `routine` with the connection in `slot` as a task of `rt`, as a
/// relay would, and returns the time it measured. (In `block_on` on the benchmark
/// thread, every round trip would also pay for waking a parked thread: a third thread
/// on two cores, which slows the kernel baseline most.)
fn as_task<S, F, Fut>(rt: &Runtime, slot: &mut Option<S>, iters: u64, routine: F) -> Duration
where
    S: Send + 'static,
    F: FnOnce(S, u64) -> Fut,
    Fut: Future<Output = (S, Duration)> + Send + 'static,
{
    let stream = slot.take().expect("connection lost by an earlier failure");
    let (stream, elapsed) = rt
        .block_on(rt.spawn(routine(stream, iters)))
        .expect("benchmark task failed");
    *slot = Some(stream);
    elapsed
}

/// Moves `iters × BULK_BYTES` to a counting sink, each batch until it is acknowledged.
async fn bulk<S>(mut stream: S, iters: u64) -> (S, Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let data = vec![0x5a_u8; WRITE_CHUNK];
    let start = Instant::now();
    for _ in 0..iters {
        for _ in 0..BULK_BYTES / WRITE_CHUNK {
            stream.write_all(&data).await.expect("write");
        }
        let mut ack = [0_u8; 1];
        stream.read_exact(&mut ack).await.expect("sink ack");
    }
    (stream, start.elapsed())
}

/// Runs `iters` round trips of a [`PING_BYTES`] message through an echo service.
async fn ping_pong<S>(mut stream: S, iters: u64) -> (S, Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ping = [0x70_u8; PING_BYTES];
    let mut pong = [0_u8; PING_BYTES];
    let start = Instant::now();
    for _ in 0..iters {
        stream.write_all(&ping).await.expect("write");
        stream.read_exact(&mut pong).await.expect("echo");
    }
    (stream, start.elapsed())
}

criterion_group!(benches, splice);
criterion_main!(benches);
