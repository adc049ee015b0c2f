//! Windows that follow the connection: two userspace stacks joined by an in-memory
//! link with a round trip, on tokio's paused clock (smoltcp runs on it too), so that a
//! round trip is real to both stacks and the test waits on no wall-clock time.
//!
//! Every check reads the stacks' own accounting of their socket buffers.

use std::time::Duration;

use portferry::netstack::window::IDLE_SHRINK;
use portferry::netstack::{connect_in_memory_delayed, InnerStream, Stack, StackConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

mod common;

use common::pseudo_random;

/// Bound of every test, in virtual time: far above what any of them needs.
const STEP: Duration = Duration::from_secs(600);

/// One way of the link: a 20 ms round trip.
const ONE_WAY: Duration = Duration::from_millis(10);

/// The buffers of one idle flow under the default configuration.
fn idle_flow_bytes() -> usize {
    let config = StackConfig::relay();
    config.socket_buffer + config.socket_buffer.div_ceil(2)
}

/// A relay-side and an agent-side stack joined by a link of a 20 ms round trip.
fn linked(relay: StackConfig, agent: StackConfig) -> (Stack, Stack) {
    let relay = Stack::new(relay);
    let agent = Stack::new(agent);
    tokio::spawn(connect_in_memory_delayed(
        relay.clone(),
        agent.clone(),
        ONE_WAY,
    ));
    (relay, agent)
}

/// `count` connections from the relay side to the agent side, both ends of each.
async fn connections(
    relay: &Stack,
    agent: &Stack,
    count: usize,
) -> Vec<(InnerStream, InnerStream)> {
    let mut listener = agent.listen(8000).unwrap();
    let mut pairs = Vec::new();
    for _ in 0..count {
        let (client, server) = tokio::join!(relay.connect(8000), listener.accept());
        pairs.push((client.unwrap(), server.unwrap()));
    }
    pairs
}

/// Reads exactly `len` bytes; with `slow`, in 4 KiB reads with a 2 ms pause after
/// every 64 KiB, so that the window fills, closes and reopens.
async fn read_exactly<R: AsyncRead + Unpin>(reader: &mut R, len: usize, slow: bool) -> Vec<u8> {
    let mut out = vec![0; len];
    let mut at = 0;
    while at < len {
        let end = if slow { (at + 4096).min(len) } else { len };
        let n = reader.read(&mut out[at..end]).await.unwrap();
        assert!(n > 0, "EOF after {at} of {len} bytes");
        if slow && (at + n) / 65536 != at / 65536 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        at += n;
    }
    out
}

/// Sends `data` one way and `back` the other at once over one connection, each reader
/// `slow` or not; returns what each side received.
async fn both_ways<S>(
    a: &mut S,
    b: &mut S,
    data: &[u8],
    back: &[u8],
    slow: bool,
) -> (Vec<u8>, Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let ((), (), at_b, at_a) = tokio::join!(
        async { a_write.write_all(data).await.unwrap() },
        async { b_write.write_all(back).await.unwrap() },
        read_exactly(&mut b_read, data.len(), slow),
        read_exactly(&mut a_read, back.len(), slow),
    );
    (at_b, at_a)
}

/// Waits twice [`IDLE_SHRINK`] with a read pending on both ends, as a tunnel waits on
/// an idle connection.
async fn stay_idle(a: &mut InnerStream, b: &mut InnerStream) {
    let (mut byte_a, mut byte_b) = ([0; 1], [0; 1]);
    tokio::select! {
        _ = a.read(&mut byte_a) => panic!("an idle connection delivered data"),
        _ = b.read(&mut byte_b) => panic!("an idle connection delivered data"),
        () = tokio::time::sleep(IDLE_SHRINK * 2) => {}
    }
}

/// Windows grow in both directions under a bulk transfer, shrink back to the idle
/// size once nothing moves, grow again, and a slow reader that lets the window close
/// and reopen still gets every byte in order.
#[tokio::test(start_paused = true)]
async fn windows_grow_shrink_and_regrow_with_every_byte_in_order() {
    let (relay, agent) = linked(StackConfig::relay(), StackConfig::agent());
    let mut pairs = connections(&relay, &agent, 1).await;
    let (client, server) = &mut pairs[0];
    let idle = idle_flow_bytes();
    assert_eq!(relay.stats().buffer_bytes, idle);
    assert_eq!(agent.stats().buffer_bytes, idle);

    let run = async {
        let up = pseudo_random(1, 16 << 20);
        let down = pseudo_random(2, 16 << 20);
        let (at_server, at_client) = both_ways(client, server, &up, &down, false).await;
        assert!(at_server == up, "bytes to the agent differ");
        assert!(at_client == down, "bytes to the relay differ");
        for stack in [&relay, &agent] {
            let stats = stack.stats();
            assert!(
                stats.buffer_bytes_peak >= 16 * idle,
                "windows did not grow: {stats:?}"
            );
        }

        // Nothing moves: both ends shrink to the idle size with the connection open.
        stay_idle(client, server).await;
        assert_eq!(relay.stats().buffer_bytes, idle);
        assert_eq!(agent.stats().buffer_bytes, idle);

        let up = pseudo_random(3, 8 << 20);
        let down = pseudo_random(4, 8 << 20);
        let (at_server, at_client) = both_ways(client, server, &up, &down, true).await;
        assert!(at_server == up, "bytes to the agent differ after regrowth");
        assert!(
            at_client == down,
            "bytes to the relay differ after regrowth"
        );
        stay_idle(client, server).await;
        assert_eq!(relay.stats().buffer_bytes, idle);
        assert_eq!(agent.stats().buffer_bytes, idle);
    };
    timeout(STEP, run).await.expect("transfer hung");
    drop(pairs);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(relay.stats().buffer_bytes, 0, "{:?}", relay.stats());
    assert_eq!(agent.stats().buffer_bytes, 0, "{:?}", agent.stats());
}

/// A reader that stops reading keeps what it holds, not the window it grew to: its
/// buffer shrinks to the power of two that holds the unread bytes, and those bytes
/// are all delivered once it reads again.
#[tokio::test(start_paused = true)]
async fn a_stalled_reader_keeps_what_it_holds_not_its_grown_window() {
    let (relay, agent) = linked(StackConfig::relay(), StackConfig::agent());
    let mut pairs = connections(&relay, &agent, 1).await;
    let (client, server) = &mut pairs[0];
    let idle = idle_flow_bytes();
    let run = async {
        let up = pseudo_random(5, 16 << 20);
        let (at_server, _) = both_ways(client, server, &up, &[], false).await;
        assert!(at_server == up, "bytes to the agent differ");
        let grown = agent.stats().buffer_bytes;
        assert!(grown >= 16 * idle, "the window did not grow: {grown}");

        // The server is spliced, as a tunnel is, to a client that stops reading after
        // 4 KiB; 100 KiB more arrive for it.
        let (mut stalled, outer) = tokio::io::duplex(4 << 10);
        let mut outer = outer;
        let spliced = async {
            let _ = portferry::splice::splice(server, &mut outer).await;
        };
        let unread = pseudo_random(6, 100 << 10);
        let held = async {
            client.write_all(&unread).await.unwrap();
            tokio::time::sleep(IDLE_SHRINK * 3).await;
            let held = agent.stats().buffer_bytes;
            assert!(
                held <= (128 << 10) + idle,
                "{held} bytes held for 100 KiB unread"
            );
            assert_eq!(relay.stats().buffer_bytes, idle);
            // It reads again: every byte arrives.
            let read = read_exactly(&mut stalled, unread.len(), false).await;
            assert!(read == unread, "the unread bytes differ");
        };
        tokio::select! {
            () = spliced => panic!("the splice ended"),
            () = held => {}
        }
    };
    timeout(STEP, run).await.expect("transfer hung");
}

/// With a budget far below what the flows' windows want, the stacks never hold more
/// than the budget and every flow still delivers every byte.
#[tokio::test(start_paused = true)]
async fn the_buffer_budget_holds_with_many_concurrent_bulk_flows() {
    const FLOWS: usize = 16;
    const BUDGET: usize = 2 << 20;
    let mut relay_config = StackConfig::relay();
    let mut agent_config = StackConfig::agent();
    relay_config.buffer_budget = BUDGET;
    agent_config.buffer_budget = BUDGET;
    let (relay, agent) = linked(relay_config, agent_config);
    let pairs = connections(&relay, &agent, FLOWS).await;
    let run = async {
        let transfers: Vec<_> = pairs
            .into_iter()
            .enumerate()
            .map(|(i, (mut client, mut server))| {
                tokio::spawn(async move {
                    let data = pseudo_random(i as u64, 2 << 20);
                    let back = pseudo_random(i as u64 + 100, 2 << 20);
                    let (at_server, at_client) =
                        both_ways(&mut client, &mut server, &data, &back, false).await;
                    assert!(at_server == data, "flow {i}: bytes to the agent differ");
                    assert!(at_client == back, "flow {i}: bytes to the relay differ");
                })
            })
            .collect();
        for transfer in transfers {
            transfer.await.unwrap();
        }
    };
    timeout(STEP, run).await.expect("transfers hung");
    for stack in [&relay, &agent] {
        let stats = stack.stats();
        assert!(
            stats.buffer_bytes_peak <= BUDGET,
            "budget exceeded: {stats:?}"
        );
        assert!(
            stats.buffer_budget_refusals > 0,
            "the budget was never reached, so this tested nothing: {stats:?}"
        );
    }
}
