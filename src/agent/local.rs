//! Serves a forwarded tunnel from the local service: each inner connection first
//! connects to the service (the first of its addresses that answers), and only then
//! is the inner handshake completed, so a client of a service that is not running sees
//! its connection refused. The relay's introduction of the connection is read off
//! first (and becomes a PROXY protocol header if the tunnel asks for one). Failed local
//! connects are logged at warn, rate-limited.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::introduction::introduced;
use super::ProxyProtocol;
use crate::netstack::{lock, Listener};
use crate::splice::splice_tcp;

/// At most one warning about an unreachable service per tunnel per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where `forward(port)` connects when no address is given: `localhost` as it is
/// meant, IPv4 loopback first, then IPv6 loopback.
pub(crate) fn default_targets(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
    ]
}

/// Serves every connection to `listener` from the service at `targets` (tried in
/// order, each within `connect_timeout`), until the listener's stack closes.
pub(crate) async fn serve(
    mut listener: Listener,
    targets: Vec<SocketAddr>,
    connect_timeout: Duration,
    proxy_protocol: Option<ProxyProtocol>,
) {
    let targets: Arc<[SocketAddr]> = targets.into();
    let warnings = Arc::new(Mutex::new(Warnings::default()));
    while let Some(pending) = listener.next().await {
        let (targets, warnings) = (targets.clone(), warnings.clone());
        tokio::spawn(async move {
            let mut stream = match connect_any(&targets, connect_timeout).await {
                Ok(stream) => stream,
                Err(failures) => {
                    lock(&warnings).failed(Instant::now(), &failures);
                    return pending.refuse();
                }
            };
            // Small writes (requests, keystrokes) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let Ok(inner) = pending.accept().await else {
                return;
            };
            let Some((inner, info)) = introduced(inner).await else {
                return;
            };
            if let Some(version) = proxy_protocol {
                // One write, before any byte of the client's.
                if stream.write_all(&version.header(&info)).await.is_err() {
                    return inner.abort();
                }
            }
            let _ = splice_tcp(&inner, stream).await;
        });
    }
}

/// Connects to the first of `targets` that accepts; every failure otherwise.
async fn connect_any(
    targets: &[SocketAddr],
    limit: Duration,
) -> Result<TcpStream, Vec<(SocketAddr, io::Error)>> {
    let mut failures = Vec::new();
    for &target in targets {
        match timeout(limit, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failures.push((target, e)),
            Err(_) => failures.push((
                target,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {limit:?}"),
                ),
            )),
        }
    }
    Err(failures)
}

/// Rate limit of the "service unreachable" warnings of one tunnel.
#[derive(Debug, Default)]
struct Warnings {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warnings {
    fn failed(&mut self, now: Instant, failures: &[(SocketAddr, io::Error)]) {
        if self.last.is_some_and(|last| now < last + WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let tried: Vec<String> = failures
            .iter()
            .map(|(addr, e)| format!("{addr}: {e}"))
            .collect();
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(
            tried = %tried.join(", "),
            suppressed,
            "cannot reach the local service (is it running?); its client's connection was refused"
        );
    }
}
