//! A program that uses portferry the way its README tells a user to: it serves one
//! page on 127.0.0.1, opens a tunnel to it with `portferry::forward` (the relay comes
//! from `PORTFERRY_RELAY`, `PORTFERRY_TOKEN` and `PORTFERRY_RELAY_CA`), prints the
//! tunnel's URL as `url: <url>`, and keeps serving until its standard input closes;
//! then it closes the tunnel and exits. `.ci/consumer.sh` fetches the page through
//! the URL in between.

use std::error::Error;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The page the service answers every request with.
const PAGE: &str = "served by a crate that depends on portferry\n";

/// The longest request head the service reads.
const MAX_REQUEST: usize = 8192;

/// How long the service waits for a request, and the program for its input to close.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(serve(listener));

    let tunnel = portferry::forward(port).await?;
    println!("url: {}", tunnel.url());

    // A plain thread, not a blocking task: the runtime never waits for it to end.
    let (closed, input_closed) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed.send(());
    });
    tokio::time::timeout(RUN_TIMEOUT, input_closed)
        .await
        .map_err(|_| "standard input stayed open too long")??;

    tunnel.close().await?;
    println!("closed");
    Ok(())
}

/// Answers each connection's request with [`PAGE`].
async fn serve(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Err(error) = answer(stream).await {
                eprintln!("service: {error}");
            }
        });
    }
}

/// Reads one request head (up to [`MAX_REQUEST`] bytes) and writes the page.
async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await??;
        if read == 0 || head.len() + read > MAX_REQUEST {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..read]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PAGE}",
        PAGE.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
