//! The metrics endpoint's server: a small HTTP/1.1 server on tokio that answers one
//! request per connection from a [`Site`], hard to abuse.
//!
//! Bounds: a request head of at most [`MAX_HEAD`] bytes, read within
//! [`READ_TIMEOUT`] (else 431 or 408); at most [`MAX_SCRAPES`] connections served at
//! once (beyond that a new one is closed at once); the response written within
//! [`WRITE_TIMEOUT`], always with `Connection: close`; then at most [`MAX_DRAIN`] bytes
//! more are read for at most [`LINGER`], so that the close does not reset a client
//! still sending before it has read the response.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::request::{parse_head, BadRequest, Request, MAX_HEAD};
use super::response::{Response, Site};

/// Connections served at once.
pub(crate) const MAX_SCRAPES: usize = 16;
/// How long a client has to send its whole request head.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the response may take to write.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long what a client sends after its head is read (and dropped) before the close.
pub(crate) const LINGER: Duration = Duration::from_secs(1);
/// The most bytes read (and dropped) after a response.
pub(crate) const MAX_DRAIN: usize = 64 * 1024;
/// How long the accept loop rests after a failed accept (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `site` on `listener` until the future is dropped, which also ends the
/// connections being served.
pub(crate) async fn serve(listener: TcpListener, site: Arc<dyn Site>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "the metrics endpoint cannot accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if connections.len() >= MAX_SCRAPES {
            // Closed at once: a scraper tries again at its next interval.
            continue;
        }
        connections.spawn(answer(stream, site.clone()));
    }
}

/// Reads one request head from `stream`, answers it and closes.
async fn answer(mut stream: TcpStream, site: Arc<dyn Site>) {
    let response = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(request)) => Response::to(request, &*site),
        // The client left (or the socket failed): nobody to answer.
        Ok(Err(_)) => return,
        Err(_) => Response::timed_out(),
    };
    let bytes = response.to_bytes();
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    if !matches!(timeout(WRITE_TIMEOUT, write).await, Ok(Ok(()))) {
        return;
    }
    let _ = timeout(LINGER, drain(&mut stream)).await;
}

/// Reads until a request head is complete (or cannot be one); an error if the client
/// closes before.
async fn read_head(stream: &mut TcpStream) -> io::Result<Result<Request, BadRequest>> {
    let mut head = vec![0; MAX_HEAD];
    let mut filled = 0;
    loop {
        let read = stream.read(&mut head[filled..]).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += read;
        // `parse_head` waits for more only while the head may still fit, so the
        // buffer is never full here.
        if let Some(parsed) = parse_head(&head[..filled]).transpose() {
            return Ok(parsed);
        }
    }
}

/// Reads and drops what the client still sends, up to [`MAX_DRAIN`] bytes, until it
/// closes.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0; 4096];
    let mut left = MAX_DRAIN;
    while left > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(read) => left = left.saturating_sub(read),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A site that is always ready and has one metric.
    struct Fixed;

    impl Site for Fixed {
        fn metrics(&self) -> String {
            "up 1\n# EOF\n".into()
        }
        fn ready(&self) -> bool {
            true
        }
    }

    /// A server of [`Fixed`] on a loopback port, and a client connected to it.
    async fn connected() -> TcpStream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Fixed)));
        TcpStream::connect(addr).await.unwrap()
    }

    /// Everything the server sends until it closes.
    async fn response(client: &mut TcpStream) -> String {
        let mut text = String::new();
        client.read_to_string(&mut text).await.unwrap();
        text
    }

    // Paused time: the read timeout passes as soon as the server only waits for it.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_whole_head_gets_408_and_the_close() {
        let mut client = connected().await;
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let text = response(&mut client).await;
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_head_in_pieces_is_answered_once_whole() {
        let mut client = connected().await;
        for piece in [&b"GET /met"[..], b"rics HTTP/1.1\r\nHost: x\r", b"\n\r\n"] {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let text = response(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nup 1\n# EOF\n"), "{text}");
    }
}
