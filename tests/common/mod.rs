//! Helpers shared by the integration tests: a temp-dir guard, a child-process kill
//! guard, a relay on loopback with its PKI and token, TLS clients that set the tunnel
//! hostname as SNI, loopback services, and bounded waits.
//!
//! Every helper that waits on the network takes (or carries, in [`Fixture::step`]) an
//! upper bound, so that a hang fails the test instead of the CI job.

// Each file under tests/ is its own crate and uses only a subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel};
use portferry::relay::{Relay, RelayConfig, RelayHandle, RelayStats, LOCAL_DOMAIN};
use portferry::tls::LocalPki;
use portferry::token::Token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

// ───────────────────────────── guards ─────────────────────────────

/// A fresh directory path under the system's temp dir (not created), removed when
/// dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, unique path `portferry-<label>-<pid>-<n>-<nonce>`.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nonce: u64 = rand::random();
        TempDir(std::env::temp_dir().join(format!(
            "portferry-{label}-{}-{n}-{nonce:016x}",
            std::process::id()
        )))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed (and reaped) when dropped, however the test ends.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    /// Waits, at most `limit`, for the process to exit; panics otherwise.
    pub async fn exit_status(&mut self, limit: Duration) -> ExitStatus {
        timeout(limit, async {
            loop {
                if let Some(status) = self.0.try_wait().unwrap() {
                    return status;
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the process did not exit")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// The `portferry` binary with `args`, with every `PORTFERRY_*` variable (and
/// `RUST_LOG`) removed from its environment, so that the machine's settings cannot
/// leak into a test, and stdin closed.
pub fn portferry<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_portferry"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTFERRY_") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG").stdin(Stdio::null());
    command
}

// ───────────────────────────── relay fixture ─────────────────────────────

/// ALPN offering `http/1.1` only.
pub const HTTP1: &[&[u8]] = &[b"http/1.1"];

/// A relay bound on loopback (served until dropped, once [`serve`](Self::serve)d),
/// its PKI, its one token, and a way to reach it.
pub struct Fixture {
    pub pki: LocalPki,
    pub token: Token,
    pub relay: RelayHandle,
    pub agent_port: u16,
    pub public: SocketAddr,
    /// Upper bound for each wait of the fixture's own helpers.
    pub step: Duration,
    serving: Option<JoinHandle<()>>,
    _state: TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(serving) = &self.serving {
            serving.abort();
        }
    }
}

impl Fixture {
    /// Binds a relay with `tweak` applied to the local defaults, without serving it.
    pub async fn bind(step: Duration, tweak: impl FnOnce(&mut RelayConfig)) -> (Fixture, Relay) {
        let state = TempDir::new("relay");
        let pki = portferry::tls::local_pki(state.path(), LOCAL_DOMAIN).unwrap();
        let token = Token::generate();
        let mut config = RelayConfig::local(pki.identity.clone(), vec![token.clone()], 0, 0);
        tweak(&mut config);
        let relay = timeout(step, Relay::bind(config))
            .await
            .expect("Relay::bind hung")
            .unwrap();
        let fixture = Fixture {
            pki,
            token,
            relay: relay.handle(),
            agent_port: relay.agent_addr().port(),
            public: relay.public_tls_addr(),
            step,
            serving: None,
            _state: state,
        };
        (fixture, relay)
    }

    /// A relay with the local defaults, served until the fixture is dropped.
    pub async fn start(step: Duration) -> Fixture {
        Fixture::start_with(step, |_| {}).await
    }

    /// A relay with `tweak` applied to the local defaults, served until dropped.
    pub async fn start_with(step: Duration, tweak: impl FnOnce(&mut RelayConfig)) -> Fixture {
        let (mut fixture, relay) = Fixture::bind(step, tweak).await;
        fixture.serve(relay);
        fixture
    }

    /// Serves `relay` (bound by [`bind`](Self::bind)) until the fixture is dropped.
    pub fn serve(&mut self, relay: Relay) {
        self.serving = Some(tokio::spawn(relay.run()));
    }

    /// How an agent with this relay's token reaches it, trusting its CA.
    pub fn agent_config(&self) -> AgentConfig {
        self.agent_config_with(self.token.clone())
    }

    /// How an agent with `token` reaches this relay, trusting its CA.
    pub fn agent_config_with(&self, token: Token) -> AgentConfig {
        let mut config = AgentConfig::new(format!("localhost:{}", self.agent_port), token);
        config.relay_ca = Some(self.pki.ca_cert_path.clone());
        config
    }

    /// A connected agent; its link is up as soon as `Agent::connect` returns.
    pub async fn agent(&self) -> Agent {
        let agent = timeout(self.step, Agent::connect(self.agent_config()))
            .await
            .expect("Agent::connect hung")
            .expect("Agent::connect failed");
        assert!(
            agent.is_connected(),
            "Agent::connect returned before its link was up"
        );
        agent
    }

    /// A TLS client trusting this relay's CA, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        TlsConnector::from(portferry::tls::client_config(self.pki.roots(), alpn))
    }

    /// TLS to the public port with `sni` as the server name, offering `alpn`. Not
    /// bounded: callers put it under a timeout (or use [`tls`](Self::tls)).
    pub async fn connect_tls(&self, sni: &str, alpn: &[&[u8]]) -> io::Result<TlsStream<TcpStream>> {
        tls_connect(&self.connector(alpn), self.public, sni).await
    }

    /// [`connect_tls`](Self::connect_tls) within [`step`](Self::step); a hang is an
    /// `io::ErrorKind::TimedOut` error.
    pub async fn tls(&self, sni: &str, alpn: &[&[u8]]) -> io::Result<TlsStream<TcpStream>> {
        timeout(self.step, self.connect_tls(sni, alpn))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake hung"))?
    }

    /// TLS to a tunnel, offering `http/1.1` only.
    pub async fn tls_to(&self, tunnel: &Tunnel) -> io::Result<TlsStream<TcpStream>> {
        self.tls(tunnel.tls_socket().0, HTTP1).await
    }

    /// `GET /` over TLS with `sni`, naming `host` in the `Host` header; the body.
    pub async fn get_as(&self, sni: &str, host: &str) -> io::Result<String> {
        let stream = self.tls(sni, HTTP1).await?;
        http_get(stream, host).await
    }

    /// `GET /` from a tunnel's URL, within [`step`](Self::step); the body.
    pub async fn get(&self, tunnel: &Tunnel) -> io::Result<String> {
        let host = tunnel.tls_socket().0;
        timeout(self.step, self.get_as(host, host))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
    }

    /// The relay's counters now.
    pub fn stats(&self) -> RelayStats {
        self.relay.stats()
    }

    /// Waits, at most [`step`](Self::step), until `done` holds for the relay's stats.
    pub async fn until_stats(&self, what: &str, done: impl Fn(&RelayStats) -> bool) {
        let waited = timeout(self.step, async {
            while !done(&self.stats()) {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{what}: {:?}", self.stats());
    }
}

/// Forwarding options for a tunnel that also serves raw TCP.
pub fn unencrypted() -> ForwardOptions {
    ForwardOptions {
        unencrypted: true,
        ..ForwardOptions::default()
    }
}

// ───────────────────────────── clients ─────────────────────────────

/// TLS over TCP to `addr` (with `TCP_NODELAY`) with `sni` as the server name. Not
/// bounded: callers put it under a timeout.
pub async fn tls_connect(
    connector: &TlsConnector,
    addr: impl ToSocketAddrs,
    sni: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    connector.connect(name, tcp).await
}

/// Echoes `message` through a tunnel's URL: TLS to the relay's public port on loopback
/// with the tunnel's hostname as SNI, then [`exchange`]; all within `limit`.
pub async fn echo_via_url(
    connector: &TlsConnector,
    tunnel: &Tunnel,
    message: &[u8],
    limit: Duration,
) -> io::Result<Vec<u8>> {
    let (host, port) = tunnel.tls_socket();
    let tls = timeout(limit, tls_connect(connector, ("127.0.0.1", port), host))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake hung"))??;
    exchange(limit, tls, message).await
}

/// Sends `GET <path>` (with `Connection: close`) on `stream`; the whole response,
/// head and body, read to EOF. Not bounded: callers put it under a timeout.
pub async fn http_get_raw<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
) -> io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Sends `GET /` on `stream`; the body of a `200` response, an error otherwise. Not
/// bounded: callers put it under a timeout.
pub async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    host: &str,
) -> io::Result<String> {
    let response = http_get_raw(stream, host, "/").await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(io::Error::other(format!("bad response {response:?}"))),
    }
}

/// Writes `data` on `stream`, closes the write side, and returns everything read back
/// until EOF (writing and reading at once, so an echo cannot dead-lock on full
/// buffers); a hang past `limit` is an `io::ErrorKind::TimedOut` error.
pub async fn exchange<S>(limit: Duration, stream: S, data: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(data).await?;
        writer.shutdown().await
    };
    let read = async {
        let mut back = Vec::with_capacity(data.len());
        reader.read_to_end(&mut back).await?;
        Ok(back)
    };
    let run = async { tokio::try_join!(write, read).map(|((), back)| back) };
    timeout(limit, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "exchange hung"))?
}

// ───────────────────────────── local services ─────────────────────────────

/// A listener on an ephemeral loopback port, and its address.
pub async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A loopback port that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Echoes `stream` until EOF, then closes its write side.
pub async fn echo<S: AsyncRead + AsyncWrite>(stream: S) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// Serves [`echo`] on every connection `listener` accepts; the listener's address.
pub fn serve_echo(listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    addr
}

/// A loopback TCP echo service: echoes until EOF, then closes its write side.
pub async fn echo_service() -> SocketAddr {
    serve_echo(loopback_listener().await.0)
}

/// A loopback HTTP/1.1 service that answers every request with `body` and closes; a
/// request cut short by EOF gets the same answer.
pub async fn http_service(body: &'static str) -> SocketAddr {
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

// ───────────────────────────── data and waiting ─────────────────────────────

/// Deterministic pseudo-random bytes (xorshift64*), distinct per seed.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `check` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let polled = timeout(limit, async {
        while !check().await {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "never happened within {limit:?}: {what}");
}
