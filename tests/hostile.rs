//! Clients the relay must not be held by: one that sends to a service that never reads
//! and then goes quiet is ended by the idle timeout, over TLS and raw TCP alike.

mod common;

use std::time::Duration;

use common::{loopback_listener, unencrypted, Fixture};
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
