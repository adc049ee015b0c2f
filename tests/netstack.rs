//! Two userspace stacks back to back in memory: the relay side opens inner
//! connections, the agent side accepts them and splices them to real loopback TCP
//! services.

use std::net::SocketAddr;
use std::time::Duration;

use portferry::netstack::{ConnectError, InnerStream, Stack, StackConfig};
use portferry::splice::forward_to;
use smoltcp::wire::{Ipv4Packet, TcpPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

mod common;

use common::{exchange, loopback_listener, pseudo_random, serve_echo};

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(60);

/// A relay-side and an agent-side stack joined by an in-memory link.
fn linked_stacks() -> (Stack, Stack) {
    linked_stacks_with(StackConfig::relay(), StackConfig::agent())
}

fn linked_stacks_with(relay: StackConfig, agent: StackConfig) -> (Stack, Stack) {
    let relay = Stack::new(relay);
    let agent = Stack::new(agent);
    tokio::spawn(portferry::netstack::connect_in_memory(
        relay.clone(),
        agent.clone(),
    ));
    (relay, agent)
}

/// A loopback listener whose accept queue takes a burst of 1,000 connections (the
/// default of 1024 can overflow under load, and the kernel then drops or resets).
fn roomy_listener() -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(4096).unwrap()
}

/// A loopback TCP echo service on a [`roomy_listener`]: echoes until EOF, then closes
/// its write side.
fn echo_service() -> SocketAddr {
    serve_echo(roomy_listener())
}

/// Agent side forwards inner `port` to `target`, as a tunnel would.
fn forward(agent: &Stack, port: u16, target: SocketAddr) {
    let listener = agent.listen(port).unwrap();
    tokio::spawn(forward_to(listener, target, Duration::from_secs(5)));
}

/// An inner connection to the agent's `port`, within [`STEP`].
async fn connect(relay: &Stack, port: u16) -> InnerStream {
    timeout(STEP, relay.connect(port)).await.unwrap().unwrap()
}

/// A loopback service that accepts one connection and hands it to `serve`.
async fn serve_one<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(stream).await;
    });
    addr
}

/// Waits until both stacks have forgotten every flow.
async fn until_no_flows(relay: &Stack, agent: &Stack) {
    timeout(STEP, async {
        while relay.stats().flows + agent.stats().flows > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "flows leaked: relay {:?}, agent {:?}",
            relay.stats(),
            agent.stats()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_256_mib_through_one_connection_intact() {
    let (relay, agent) = linked_stacks();
    forward(&agent, 8000, echo_service());
    let data = pseudo_random(1, 256 << 20);
    let stream = connect(&relay, 8000).await;
    let echoed = exchange(STEP * 4, stream, &data).await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ");
    until_no_flows(&relay, &agent).await;
}

/// With buffers beyond 64 KiB, windows are scaled; smoltcp's rounding of a scaled
/// window used to trim segments the peer was allowed to send, and every trim cost a
/// retransmission timeout of a second or more (this took minutes). It takes well under
/// a second now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_windows_move_64_mib_without_waiting_on_retransmissions() {
    let mut relay_config = StackConfig::relay();
    let mut agent_config = StackConfig::agent();
    relay_config.socket_buffer = 256 << 10;
    agent_config.socket_buffer = 256 << 10;
    let (relay, agent) = linked_stacks_with(relay_config, agent_config);
    forward(&agent, 8000, echo_service());
    let data = pseudo_random(2, 64 << 20);
    let stream = connect(&relay, 8000).await;
    let echoed = exchange(Duration::from_secs(30), stream, &data)
        .await
        .expect("64 MiB did not get through in 30 s: the transfer waited on timers");
    assert!(echoed == data, "echoed bytes differ");
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_1000_concurrent_connections() {
    let (relay, agent) = linked_stacks();
    forward(&agent, 8000, echo_service());
    let clients: Vec<_> = (0..1000u64)
        .map(|i| {
            let relay = relay.clone();
            tokio::spawn(async move {
                let data = pseudo_random(i, 16 * 1024 + i as usize);
                let stream = relay.connect(8000).await.unwrap();
                assert!(
                    exchange(STEP * 2, stream, &data).await.unwrap() == data,
                    "connection {i} got wrong bytes"
                );
            })
        })
        .collect();
    timeout(STEP * 2, async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(
        agent.stats().refused_syns,
        0,
        "a SYN of the burst was refused"
    );
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_delivers_the_whole_response() {
    let (relay, agent) = linked_stacks();
    // A service that answers only after the request's EOF.
    let addr = serve_one(|mut stream| async move {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        let mut response = request.clone();
        response.reverse();
        stream.write_all(&pseudo_random(7, 3 << 20)).await.unwrap();
        stream.write_all(&response).await.unwrap();
    })
    .await;
    forward(&agent, 8000, addr);

    let mut stream = connect(&relay, 8000).await;
    stream.write_all(b"request body").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    timeout(STEP, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let mut expected = pseudo_random(7, 3 << 20);
    expected.extend_from_slice(b"ydob tseuqer");
    assert!(response == expected, "response differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_is_refused_when_nothing_listens_locally() {
    let (relay, agent) = linked_stacks();
    // A loopback port with nothing listening on it.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    forward(&agent, 8000, closed);
    let result = timeout(STEP, relay.connect(8000))
        .await
        .expect("connect hung");
    assert_eq!(result.unwrap_err(), ConnectError::Refused);

    // And a port the agent does not forward at all.
    let result = timeout(STEP, relay.connect(8001))
        .await
        .expect("connect hung");
    assert_eq!(result.unwrap_err(), ConnectError::Refused);
    assert_eq!(agent.stats().refused_syns, 1);
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_by_the_local_service_reaches_the_inner_client() {
    let (relay, agent) = linked_stacks();
    let addr = serve_one(|mut stream| async move {
        let mut byte = [0; 1];
        stream.read_exact(&mut byte).await.unwrap();
        stream.set_zero_linger().unwrap();
    })
    .await;
    forward(&agent, 8000, addr);
    let mut stream = connect(&relay, 8000).await;
    stream.write_all(b"x").await.unwrap();
    let mut buf = [0; 16];
    let error = timeout(STEP, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    drop(stream);
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_by_the_inner_client_reaches_the_local_service() {
    let (relay, agent) = linked_stacks();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let addr = serve_one(|mut stream| async move {
        let mut buf = [0; 16];
        let first = stream.read(&mut buf).await.map(|n| buf[..n].to_vec());
        let second = stream.read(&mut buf).await;
        let _ = seen_tx.send((first.unwrap(), second));
    })
    .await;
    forward(&agent, 8000, addr);
    let mut stream = connect(&relay, 8000).await;
    stream.write_all(b"hi").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.abort();
    let (first, second) = timeout(STEP, seen_rx).await.unwrap().unwrap();
    assert_eq!(first, b"hi");
    assert_eq!(
        second.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_another_connection() {
    let (relay, agent) = linked_stacks();
    forward(&agent, 8000, echo_service());

    // This client writes until every buffer on the way is full and never reads.
    let mut stalled = connect(&relay, 8000).await;
    let junk = pseudo_random(3, 64 * 1024);
    let filled = timeout(Duration::from_secs(2), async {
        loop {
            stalled.write_all(&junk).await.unwrap();
        }
    })
    .await;
    assert!(filled.is_err(), "the stalled connection never filled up");

    let data = pseudo_random(4, 64 << 20);
    let stream = connect(&relay, 8000).await;
    let echoed = exchange(STEP * 2, stream, &data)
        .await
        .expect("stalled by the other connection");
    assert!(echoed == data, "echoed bytes differ");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_stack_resets_its_connections() {
    let (relay, agent) = linked_stacks();
    forward(&agent, 8000, echo_service());
    let mut stream = connect(&relay, 8000).await;
    relay.close();
    let mut buf = [0; 4];
    let error = timeout(STEP, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(relay.connect(8000).await.unwrap_err(), ConnectError::Closed);
    // The agent's end of the link sees the link close and resets its side too.
    until_no_flows(&relay, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_kernel_echo_baseline_sanity() {
    // The echo service itself behaves as the tests above assume.
    let addr = echo_service();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"ping");
}

/// Carries packets from `from` to `to` like [`portferry::netstack::connect_in_memory`],
/// but drops the first packet that carries TCP payload.
async fn pump_dropping_first_payload(from: Stack, to: Stack) {
    let mut batch = Vec::new();
    let mut dropped = false;
    while from.outbound().drain(&mut batch, 64 * 1024).await > 0 {
        for packet in batch.drain(..) {
            let ip = Ipv4Packet::new_checked(&packet[..]).expect("not an IPv4 packet");
            let tcp = TcpPacket::new_checked(ip.payload()).expect("not a TCP segment");
            if !dropped && !tcp.payload().is_empty() {
                dropped = true;
                continue;
            }
            let _ = to.ingress(packet);
        }
    }
    to.close();
}

/// smoltcp's timers run on tokio's clock: on a paused clock a lost segment is
/// retransmitted once the (virtual) retransmission timeout has passed. On the wall
/// clock smoltcp would still see the segment as fresh and the read would time out.
#[tokio::test(start_paused = true)]
async fn a_lost_segment_is_retransmitted_on_the_paused_clock() {
    let relay = Stack::new(StackConfig::relay());
    let agent = Stack::new(StackConfig::agent());
    tokio::spawn(pump_dropping_first_payload(relay.clone(), agent.clone()));
    tokio::spawn(pump_dropping_first_payload(agent.clone(), relay.clone()));
    let mut listener = agent.listen(8000).unwrap();
    let server = tokio::spawn(async move {
        let mut stream = listener.accept().await.unwrap();
        let mut request = [0; 5];
        stream.read_exact(&mut request).await.unwrap();
        stream.write_all(b"world").await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        request
    });
    let mut client = connect(&relay, 8000).await;
    client.write_all(b"hello").await.unwrap();
    let mut answer = [0; 5];
    timeout(Duration::from_secs(10), client.read_exact(&mut answer))
        .await
        .expect("the lost segments were never retransmitted")
        .unwrap();
    assert_eq!(&answer, b"world");
    client.shutdown().await.unwrap();
    assert_eq!(&server.await.unwrap(), b"hello");
}

/// What a connection holds (the relay's places in its connection limits) stays held
/// while its flow lingers after the stream is dropped, and is let go once the stack
/// is done with the flow: a caller cannot open and drop connections faster than its
/// limit allows flows. Here the agent forgets its flows, so the relay's FINs go
/// unanswered until the linger timeout (on the paused clock) resets them.
#[tokio::test(start_paused = true)]
async fn a_lingering_flow_keeps_what_it_holds_until_the_stack_lets_go_of_it() {
    const LIMIT: usize = 2;
    let (relay, agent) = linked_stacks();
    let mut listener = agent.listen(8000).unwrap();
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(LIMIT));
    let mut clients = Vec::new();
    let mut accepted = Vec::new();
    for _ in 0..LIMIT {
        let place = places.clone().try_acquire_owned().unwrap();
        let (client, server) = tokio::join!(relay.connect_holding(8000, place), listener.accept());
        clients.push(client.unwrap());
        accepted.push(server.unwrap());
    }
    // The agent's streams are kept but never polled again: nothing answers.
    agent.reset_connections();
    drop(clients);
    assert_eq!(relay.stats().flows, LIMIT);
    assert!(
        places.clone().try_acquire_owned().is_err(),
        "a lingering flow's place was free"
    );

    timeout(STEP, async {
        while relay.stats().flows > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the lingering flows were never reset");
    assert_eq!(places.available_permits(), LIMIT);
    drop(accepted);
}
