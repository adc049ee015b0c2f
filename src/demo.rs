//! The sample service `portferry demo` forwards: a tiny HTTP/1.1 server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The body every request gets.
pub const GREETING: &str = "Hello from portferry: this came through the tunnel.\n";

/// Starts the sample HTTP service on a free loopback port and returns its address.
/// Every request gets [`GREETING`]; each connection serves one request.
pub async fn start_hello_service() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the request head (bounded in size and time), then answer.
                let mut head = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                let read_head = async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    true
                };
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(10), read_head).await,
                    Ok(true)
                ) {
                    return;
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{GREETING}",
                    GREETING.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(addr)
}
