//! Clients the relay must not be held by: one that sends to a service that never reads
//! and then goes quiet is ended by the idle timeout, over TLS and raw TCP alike, and so
//! is one that stops reading a download and keeps the connection up with a trickle.

mod common;

use std::time::Duration;

use common::{loopback_listener, stream_service, unencrypted, Fixture};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(20);

/// A loopback service that accepts connections and never reads from them; its port.
async fn never_reading_service() -> u16 {
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            // Bounded by the test: a handful of connections.
            held.push(stream);
        }
    });
    addr.port()
}

/// Sends a request, half-closes, and waits for the end; how the stream ended.
async fn send_and_wait<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    stream.write_all(&[1; 64 * 1024]).await?;
    stream.shutdown().await?;
    let mut sink = [0; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_to_a_service_that_never_reads_is_reset_after_the_idle_timeout() {
    let relay = Fixture::start_with(STEP, |config| {
        config.idle_timeout = Some(Duration::from_millis(500));
    })
    .await;
    let agent = relay.agent().await;
    let tunnel = agent
        .forward_with(never_reading_service().await, unencrypted())
        .await
        .unwrap();

    let over_tls = relay.tls_to(&tunnel).await.unwrap();
    let ended = timeout(STEP, send_and_wait(over_tls))
        .await
        .expect("an idle TLS connection was never ended");
    assert!(ended.is_err(), "the TLS client saw a clean end");

    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    let raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let ended = timeout(STEP, send_and_wait(raw))
        .await
        .expect("an idle raw TCP connection was never ended");
    assert_eq!(
        ended.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    relay
        .until_stats("the relay let go of both", |stats| {
            stats.public_connections == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_cannot_hold_its_connection_with_a_trickle() {
    let relay = Fixture::start_with(STEP, |config| {
        config.idle_timeout = Some(Duration::from_millis(500));
    })
    .await;
    let agent = relay.agent().await;
    let service = stream_service(1 << 30).await;
    let tunnel = agent
        .forward_with(service.addr.port(), unencrypted())
        .await
        .unwrap();
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    let mut client = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    // It reads nothing of the download and sends a byte every 100 ms: bytes move, but
    // none of those waiting for it.
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(e) = client.write_all(b".").await {
                return e;
            }
        }
    };
    let ended = timeout(STEP, trickle)
        .await
        .expect("a stalled connection was kept by its trickle");
    assert!(
        matches!(
            ended.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{ended:?}"
    );
    relay
        .until_stats("the relay let go of it", |stats| {
            stats.public_connections == 0
        })
        .await;
}
