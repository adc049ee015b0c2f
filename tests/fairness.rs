//! One link, many flows: while a bulk transfer fills the link both ways, another flow's
//! request and response, and a new connection, get through within a few link batches.
//!
//! Two stacks are joined by a stepped link on tokio's paused clock: every millisecond of
//! virtual time it moves one batch of about [`BATCH`] bytes each way (half a millisecond
//! apart), as the link writer does. Latency is counted in batches, so the test is deterministic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use portferry::netstack::{InnerStream, Stack, StackConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

mod common;

use common::{read_stream, stream_chunk, STREAM_CHUNK};

/// Bytes a batch moves in each direction: about one 64 KiB packet.
const BATCH: usize = 64 * 1024;
/// The inner port of the echo service.
const ECHO: u16 = 7;
/// The inner port of the discard service.
const DISCARD: u16 = 9;
/// Bytes of the bulk echo: long enough to outlast every measurement below.
const BULK: usize = 48 * 1024 * 1024;
/// Bound on any one step of the test, in virtual time.
const STEP: Duration = Duration::from_secs(600);

/// Batches moved so far, and how many of them were full, per direction.
#[derive(Default)]
struct LinkCounters {
    batches: AtomicU64,
    full_up: AtomicU64,
    full_down: AtomicU64,
    /// Set to stop moving packets: the link is stuck, as behind a full TCP connection.
    frozen: AtomicBool,
}

impl LinkCounters {
    fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }
}

/// Moves one batch from `from`'s queue into `to`; whether it was full.
fn move_batch(from: &Stack, to: &Stack) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut packets = Vec::new();
    let _ = from.outbound().poll_drain(&mut cx, &mut packets, BATCH);
    let bytes: usize = packets.iter().map(|p| p.len()).sum();
    for packet in packets {
        let _ = to.ingress(packet);
    }
    bytes >= BATCH
}

/// Steps the link between `relay` and `agent`, one batch each way per millisecond, until
/// [`LinkCounters::frozen`] is set.
fn stepped_link(relay: Stack, agent: Stack) -> Arc<LinkCounters> {
    let counters = Arc::new(LinkCounters::default());
    let counting = counters.clone();
    tokio::spawn(async move {
        while !counting.frozen.load(Ordering::SeqCst) {
            // Half a millisecond each way: an answer never arrives in the instant its
            // request left, or a stack would measure a round trip of zero.
            tokio::time::sleep(Duration::from_micros(500)).await;
            if move_batch(&relay, &agent) {
                counting.full_up.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
            if move_batch(&agent, &relay) {
                counting.full_down.fetch_add(1, Ordering::SeqCst);
            }
            counting.batches.fetch_add(1, Ordering::SeqCst);
        }
    });
    counters
}

/// The agent echoes every connection to [`ECHO`].
fn serve_echo(agent: &Stack) {
    let mut listener = agent.listen(ECHO).unwrap();
    tokio::spawn(async move {
        while let Ok(stream) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = tokio::io::split(stream);
                let mut read = BufReader::with_capacity(64 * 1024, read);
                let _ = tokio::io::copy_buf(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
}

/// The agent reads and discards every connection to [`DISCARD`].
fn serve_discard(agent: &Stack) {
    let mut listener = agent.listen(DISCARD).unwrap();
    tokio::spawn(async move {
        while let Ok(mut stream) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(1..) = stream.read(&mut buf).await {}
            });
        }
    });
}

/// Batches a 64-byte request and its echo take on `stream`.
async fn ping(stream: &mut InnerStream, link: &LinkCounters) -> u64 {
    let start = link.batches();
    let request = [0x5a; 64];
    let mut response = [0; 64];
    timeout(STEP, async {
        stream.write_all(&request).await.unwrap();
        stream.read_exact(&mut response).await.unwrap();
    })
    .await
    .expect("no echo");
    assert_eq!(response, request);
    link.batches() - start
}

#[tokio::test(start_paused = true)]
async fn a_ping_and_a_new_connection_pass_a_bulk_echo_within_a_few_batches() {
    // Queues of 64 batches: a packet queued behind a full one would wait that long.
    let (mut relay, mut agent) = (StackConfig::relay(), StackConfig::agent());
    relay.outbound_queue_bytes = 64 * BATCH;
    agent.outbound_queue_bytes = 64 * BATCH;
    let (relay, agent) = (Stack::new(relay), Stack::new(agent));
    let link = stepped_link(relay.clone(), agent.clone());
    serve_echo(&agent);

    let mut interactive = timeout(STEP, relay.connect(ECHO)).await.unwrap().unwrap();
    let idle = ping(&mut interactive, &link).await;

    // The bulk echo: a stream in, the same stream back, checked byte for byte.
    let bulk = timeout(STEP, relay.connect(ECHO)).await.unwrap().unwrap();
    let (mut bulk_read, mut bulk_write) = tokio::io::split(bulk);
    let writer = tokio::spawn(async move {
        for index in 0..(BULK / STREAM_CHUNK) as u64 {
            bulk_write.write_all(&stream_chunk(index)).await.unwrap();
        }
        bulk_write
    });
    let reader = tokio::spawn(async move { read_stream(&mut bulk_read, BULK).await });
    // Until the windows have grown and the queues are full both ways.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (up, down) = (
        link.full_up.load(Ordering::SeqCst),
        link.full_down.load(Ordering::SeqCst),
    );
    let start = link.batches();
    let mut worst = 0;
    for _ in 0..20 {
        worst = worst.max(ping(&mut interactive, &link).await);
    }
    let opened_at = link.batches();
    let mut fresh = timeout(STEP, relay.connect(ECHO)).await.unwrap().unwrap();
    let to_open = link.batches() - opened_at;
    let fresh_ping = ping(&mut fresh, &link).await;
    let elapsed = link.batches() - start;
    let full = (
        link.full_up.load(Ordering::SeqCst) - up,
        link.full_down.load(Ordering::SeqCst) - down,
    );
    eprintln!(
        "batches: idle ping {idle}, worst loaded ping {worst} of 20, new connection \
         {to_open} + first echo {fresh_ping}; full batches {full:?} of {elapsed}"
    );
    assert!(
        !reader.is_finished(),
        "the bulk echo ended before the measurements"
    );
    // The link was saturated both ways the whole time: the measurement is under load.
    assert!(
        full.0 * 10 >= elapsed * 9 && full.1 * 10 >= elapsed * 9,
        "only {full:?} of {elapsed} batches were full"
    );
    assert!(idle <= 2, "an idle ping took {idle} batches");
    assert!(worst <= 3, "a ping under load took {worst} batches");
    assert!(to_open <= 3, "a new connection took {to_open} batches");
    assert!(fresh_ping <= 3, "its first echo took {fresh_ping} batches");

    let writer = timeout(STEP, writer).await.unwrap().unwrap();
    timeout(STEP, reader)
        .await
        .unwrap()
        .unwrap()
        .expect("the bulk echo came back intact");
    drop(writer);
}

#[test]
fn closing_a_stack_whose_queue_is_full_of_blocked_flows_ends() {
    // On a thread of its own, so that a close that never ends fails the test rather
    // than hanging it (a spinning close holds a flow's lock the runtime would wait on).
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(close_with_blocked_flows());
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("closing the stack did not end");
}

/// Fills a stack's queue with blocked flows behind a stuck link, then closes it.
async fn close_with_blocked_flows() {
    let mut config = StackConfig::relay();
    config.outbound_queue_bytes = 4 * BATCH;
    let relay = Stack::new(config);
    let agent = Stack::new(StackConfig::agent());
    let link = stepped_link(relay.clone(), agent.clone());
    serve_discard(&agent);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let mut stream = timeout(STEP, relay.connect(DISCARD))
            .await
            .unwrap()
            .unwrap();
        writers.push(tokio::spawn(async move {
            let chunk = vec![0x33; STREAM_CHUNK];
            while stream.write_all(&chunk).await.is_ok() {}
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The link stops moving: the queue fills and every flow waits for room.
    link.frozen.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let soft_limit = relay.config().outbound_queue_bytes;
    assert!(relay.outbound().queued_bytes() >= soft_limit);

    // Closing wakes every waiting flow, which must find the queue closed rather than
    // try again for ever.
    relay.close();
    // Every writer sees its connection reset, and nothing more is queued.
    for writer in writers {
        timeout(STEP, writer).await.unwrap().unwrap();
    }
    let queued = relay.outbound().queued_bytes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(relay.outbound().queued_bytes() <= queued);
}
