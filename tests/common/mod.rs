//! Helpers shared by the integration tests: a temp-dir guard, a child-process kill
//! guard, a relay on loopback with its PKI and token, TLS clients that set the tunnel
//! hostname as SNI, loopback services (echo, HTTP, a long checkable byte stream), agent
//! links driven by hand ([`RawAgent`]), loopback proxies (one that delays every byte:
//! [`delay_line`]), and bounded waits.
//!
//! Every helper that waits on the network takes (or carries, in [`Fixture::step`]) an
//! upper bound, so that a hang fails the test instead of the CI job.

// Each file under tests/ is its own crate and uses only a subset of these helpers.
#![allow(dead_code)]

pub mod proxies;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel, TunnelAddress, TunnelState};
use portferry::link::{self, FrameReader, FrameWriter, LinkConfig, CONTROL_QUEUE};
use portferry::netstack::Stack;
use portferry::relay::{Relay, RelayConfig, RelayHandle, RelayStats, LOCAL_DOMAIN};
use portferry::tls::LocalPki;
use portferry::token::Token;
use portferry::wire::{handshake, ForwardRequest, Forwarded, Frame};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
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

/// A child whose stdout is read line by line as it comes (on a thread of its own); its
/// stderr is discarded. Killed when dropped.
pub struct StdoutLines {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl StdoutLines {
    /// Spawns `command`.
    pub fn spawn(mut command: Command) -> StdoutLines {
        command.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = Child(command.spawn().unwrap());
        let stdout = io::BufReader::new(child.0.stdout.take().unwrap());
        let (send, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in io::BufRead::lines(stdout).map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        StdoutLines { child, lines }
    }

    /// The rest of the next line that starts with `prefix`, trimmed; panics after
    /// `limit`, or if the child's stdout ends first.
    pub async fn next(&mut self, prefix: &str, limit: Duration) -> String {
        let found = async {
            loop {
                let line = self.lines.recv().await.expect("the child's stdout ended");
                if let Some(rest) = line.strip_prefix(prefix) {
                    return rest.trim().to_owned();
                }
            }
        };
        timeout(limit, found)
            .await
            .unwrap_or_else(|_| panic!("the child printed no {prefix:?} line"))
    }
}

/// `portferry relay` arguments: free loopback ports for both listeners, then `more`.
pub fn on_free_ports<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--agent-addr",
        "127.0.0.1:0",
        "--public-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(more);
    args
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
        self.tls(&tunnel.tls_socket().0, HTTP1).await
    }

    /// `GET /` over TLS with `sni`, naming `host` in the `Host` header; the body.
    pub async fn get_as(&self, sni: &str, host: &str) -> io::Result<String> {
        let stream = self.tls(sni, HTTP1).await?;
        http_get(stream, host).await
    }

    /// `GET /` from a tunnel's URL, within [`step`](Self::step); the body.
    pub async fn get(&self, tunnel: &Tunnel) -> io::Result<String> {
        let host = tunnel.tls_socket().0;
        timeout(self.step, self.get_as(&host, &host))
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

/// Waits, at most `limit`, for the next change of a tunnel's `state`, which must be a
/// move: the address it moved to.
pub async fn until_moved(
    state: &mut tokio::sync::watch::Receiver<TunnelState>,
    limit: Duration,
) -> TunnelAddress {
    timeout(limit, state.changed())
        .await
        .expect("the move was never reported")
        .unwrap();
    match &*state.borrow_and_update() {
        TunnelState::Moved(address) => address.clone(),
        other => panic!("expected the tunnel to have moved, got {other:?}"),
    }
}

/// Forwarding options for a tunnel that also serves raw TCP.
pub fn unencrypted() -> ForwardOptions {
    ForwardOptions::new().unencrypted(true)
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

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// [`tls_connect`] from the loopback address `from`.
pub async fn tls_connect_from(
    connector: &TlsConnector,
    from: IpAddr,
    to: SocketAddr,
    sni: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
    connector.connect(name, connect_from(from, to).await?).await
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
    let tls = timeout(limit, tls_connect(connector, ("127.0.0.1", port), &host))
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

// ───────────────────────────── a long deterministic stream ─────────────────────────────

/// Size of the pieces a [`stream_service`] writes and [`read_stream`] checks.
pub const STREAM_CHUNK: usize = 64 * 1024;

/// Piece `index` of the byte stream every [`stream_service`] connection carries:
/// pseudo-random and different for every piece, so a lost, repeated or reordered piece
/// shows.
pub fn stream_chunk(index: u64) -> Vec<u8> {
    pseudo_random(index + 1, STREAM_CHUNK)
}

/// What a [`stream_service`] has done on one connection.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Bytes written to the connection so far.
    pub written: AtomicU64,
    /// The connection is over: the whole stream was written, or a write failed.
    pub ended: AtomicBool,
}

/// A loopback service that writes the first `len` bytes of the [`stream_chunk`] stream
/// on every connection (reading nothing), then closes it.
pub struct StreamService {
    pub addr: SocketAddr,
    /// One entry per accepted connection, in the order they were accepted.
    pub connections: Arc<Mutex<Vec<Arc<StreamProgress>>>>,
}

impl StreamService {
    /// The progress of the `index`th connection accepted.
    pub fn connection(&self, index: usize) -> Arc<StreamProgress> {
        self.connections.lock().unwrap()[index].clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

/// Starts a [`StreamService`] whose connections carry `len` bytes each.
pub async fn stream_service(len: u64) -> StreamService {
    let (listener, addr) = loopback_listener().await;
    let connections: Arc<Mutex<Vec<Arc<StreamProgress>>>> = Arc::default();
    let registry = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let progress = Arc::new(StreamProgress::default());
            registry.lock().unwrap().push(progress.clone());
            tokio::spawn(async move {
                let mut index = 0;
                while progress.written.load(Ordering::Relaxed) < len {
                    let left = len - progress.written.load(Ordering::Relaxed);
                    let chunk = stream_chunk(index);
                    let piece = &chunk[..chunk.len().min(left as usize)];
                    if stream.write_all(piece).await.is_err() {
                        break;
                    }
                    progress
                        .written
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    index += 1;
                }
                let _ = stream.shutdown().await;
                progress.ended.store(true, Ordering::Relaxed);
            });
        }
    });
    StreamService { addr, connections }
}

/// Reads the first `len` bytes of a [`stream_service`] connection and checks every one;
/// `io::ErrorKind::InvalidData` names the first byte that differs. Not bounded: callers
/// put it under a timeout.
pub async fn read_stream<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    len: usize,
) -> io::Result<()> {
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut index = 0u64;
    let mut left = len;
    while left > 0 {
        let n = left.min(STREAM_CHUNK);
        reader.read_exact(&mut buf[..n]).await?;
        let expected = stream_chunk(index);
        if let Some(at) = (0..n).find(|&i| buf[i] != expected[i]) {
            let offset = index as usize * STREAM_CHUNK + at;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("byte {offset} of the stream differs"),
            ));
        }
        index += 1;
        left -= n;
    }
    Ok(())
}

/// Reads and discards until EOF or an error, within `limit`; the bytes read, and how
/// the stream ended (`Ok` for a clean EOF). Panics if it has not ended by then.
pub async fn drain<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    limit: Duration,
) -> (u64, io::Result<()>) {
    let mut read = 0u64;
    let mut buf = vec![0u8; STREAM_CHUNK];
    let ended = timeout(limit, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => read += n as u64,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match ended {
        Ok(how) => (read, how),
        Err(_) => panic!("the stream was still open after {limit:?} ({read} bytes read)"),
    }
}

// ───────────────────────────── agent links driven by hand ─────────────────────────────

type RawHalves = (
    FrameReader<ReadHalf<TlsStream<TcpStream>>>,
    FrameWriter<WriteHalf<TlsStream<TcpStream>>>,
);

/// An agent link driven by the test itself: TLS to the relay's agent port, then frames
/// written and read one by one, so a test can present any identity and token, and see
/// (and answer) the raw IP packets the relay sends.
pub struct RawAgent {
    /// The resume ticket the relay's welcome carried (empty: tunnels not leased).
    pub ticket: bytes::Bytes,
    reader: FrameReader<ReadHalf<TlsStream<TcpStream>>>,
    writer: FrameWriter<WriteHalf<TlsStream<TcpStream>>>,
    step: Duration,
    next_request: u32,
    next_nonce: u64,
}

impl RawAgent {
    /// Opens a link to `fx`'s relay with a hello carrying `token` and `resume` (a resume
    /// ticket, by which the relay knows an agent across its links, or `NEW_AGENT`, or
    /// anything a test presents); panics unless the relay welcomes it within
    /// [`Fixture::step`].
    pub async fn connect(fx: &Fixture, token: &Token, resume: &[u8]) -> RawAgent {
        match RawAgent::try_connect(fx, token, resume).await {
            Ok(agent) => agent,
            Err(refusal) => panic!("expected a welcome, got {refusal:?}"),
        }
    }

    /// [`connect`](Self::connect), or the relay's refusal of the hello.
    pub async fn try_connect(
        fx: &Fixture,
        token: &Token,
        resume: &[u8],
    ) -> Result<RawAgent, portferry::wire::ErrorFrame> {
        RawAgent::try_connect_from(fx, IpAddr::V4(Ipv4Addr::LOCALHOST), token, resume).await
    }

    /// [`try_connect`](Self::try_connect) from the loopback address `from`.
    pub async fn try_connect_from(
        fx: &Fixture,
        from: IpAddr,
        token: &Token,
        resume: &[u8],
    ) -> Result<RawAgent, portferry::wire::ErrorFrame> {
        let version = portferry::wire::PROTOCOL_VERSION;
        RawAgent::try_connect_speaking(fx, from, token, resume, version).await
    }

    /// [`connect`](Self::connect) with a hello saying frame format `version`.
    pub async fn connect_speaking(
        fx: &Fixture,
        token: &Token,
        resume: &[u8],
        version: u16,
    ) -> RawAgent {
        let from = IpAddr::V4(Ipv4Addr::LOCALHOST);
        match RawAgent::try_connect_speaking(fx, from, token, resume, version).await {
            Ok(agent) => agent,
            Err(refusal) => panic!("expected a welcome, got {refusal:?}"),
        }
    }

    /// [`try_connect_from`](Self::try_connect_from) with a hello saying frame format
    /// `version`.
    pub async fn try_connect_speaking(
        fx: &Fixture,
        from: IpAddr,
        token: &Token,
        resume: &[u8],
        version: u16,
    ) -> Result<RawAgent, portferry::wire::ErrorFrame> {
        let connector = fx.connector(&[]);
        let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), fx.agent_port);
        let mut tls = timeout(fx.step, tls_connect_from(&connector, from, to, "localhost"))
            .await
            .expect("TLS to the agent port hung")
            .expect("TLS to the agent port failed");
        let mut hello = handshake::hello(token.expose(), resume).unwrap();
        if let Frame::Hello(hello) = &mut hello {
            hello.version = version;
        }
        let answer = timeout(fx.step, async {
            handshake::send(&mut tls, &hello).await.unwrap();
            handshake::read_answer(&mut tls).await
        })
        .await
        .expect("the relay did not answer the hello");
        let ticket = answer.expect("the relay's answer is unreadable")?.ticket;
        let (reader, writer) = tokio::io::split(tls);
        Ok(RawAgent {
            ticket,
            reader: FrameReader::new(reader),
            writer: FrameWriter::new(writer),
            step: fx.step,
            next_request: 1,
            next_nonce: 1,
        })
    }

    /// Sends one frame; panics if the link is closed or the write hangs.
    pub async fn send(&mut self, frame: &Frame) {
        timeout(self.step, self.writer.send(frame))
            .await
            .expect("writing to the link hung")
            .expect("writing to the link failed");
    }

    /// Sends one frame, whether or not the relay still reads the link.
    pub async fn try_send(&mut self, frame: &Frame) {
        let _ = timeout(self.step, self.writer.send(frame)).await;
    }

    /// Sends raw bytes as one `Packet` frame.
    pub async fn send_packet(&mut self, packet: &[u8]) {
        self.send(&Frame::Packet(bytes::Bytes::copy_from_slice(packet)))
            .await;
    }

    /// The next frame other than a heartbeat (pings are answered); `None` once the
    /// relay has closed the link. Panics if nothing comes within [`Fixture::step`].
    pub async fn next(&mut self) -> Option<Frame> {
        timeout(self.step, self.next_frame())
            .await
            .expect("the relay sent nothing")
    }

    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            match self.reader.read_frame().await {
                Ok(Some(Frame::Ping(nonce))) => {
                    let _ = self.writer.send(&Frame::Pong(nonce)).await;
                }
                Ok(Some(Frame::Pong(_))) => {}
                Ok(Some(frame)) => return Some(frame),
                // A TLS link cut without a close_notify is an error: closed all the same.
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Asks for a tunnel to `port`; the relay's grant. Packets that arrive meanwhile
    /// are skipped. Panics on a refusal.
    pub async fn forward(&mut self, port: u16, unencrypted: bool) -> Forwarded {
        let request_id = self.next_request;
        self.next_request += 1;
        self.send(&Frame::Forward(ForwardRequest {
            request_id,
            port,
            unencrypted,
            h2: false,
        }))
        .await;
        loop {
            match self.next().await {
                Some(Frame::Forwarded(granted)) if granted.request_id == request_id => {
                    return granted
                }
                Some(Frame::Packet(_)) => continue,
                other => panic!("expected the tunnel to port {port}, got {other:?}"),
            }
        }
    }

    /// Waits for the next `Packet` frame; control frames meanwhile are a failure.
    pub async fn next_packet(&mut self) -> bytes::Bytes {
        match self.next().await {
            Some(Frame::Packet(packet)) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// A round trip through the relay's reader: sends a ping and waits for its pong.
    /// The relay handles a link's frames in order, so everything sent before has been
    /// handled once this returns. The frames other than heartbeats that arrived
    /// meanwhile.
    pub async fn sync(&mut self) -> Vec<Frame> {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.send(&Frame::Ping(nonce)).await;
        let mut seen = Vec::new();
        let waited = timeout(self.step, async {
            loop {
                match self.reader.read_frame().await {
                    Ok(Some(Frame::Pong(n))) if n == nonce => return,
                    Ok(Some(Frame::Ping(n))) => {
                        let _ = self.writer.send(&Frame::Pong(n)).await;
                    }
                    Ok(Some(Frame::Pong(_))) => {}
                    Ok(Some(frame)) => seen.push(frame),
                    Ok(None) | Err(_) => panic!("the relay closed the link"),
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "no pong within {:?}", self.step);
        seen
    }

    /// Waits, at most `limit`, for the relay to close the link; panics if it sends
    /// anything but heartbeats first, or keeps the link open.
    pub async fn until_closed(&mut self, limit: Duration) {
        match timeout(limit, self.next_frame()).await {
            Ok(None) => {}
            Ok(Some(frame)) => panic!("expected the link to close, got {frame:?}"),
            Err(_) => panic!("the relay kept the link open for {limit:?}"),
        }
    }

    /// The link's two halves, to drive it with [`drive_link`].
    pub fn into_halves(self) -> RawHalves {
        (self.reader, self.writer)
    }
}

/// Runs a hand-driven agent link over `stack`, as an agent would: packets flow both
/// ways, control frames from the relay are kept but not answered. Ends with the link.
pub fn drive_link<R, W>(
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
    stack: Stack,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (control, outbound) = mpsc::channel(CONTROL_QUEUE);
    let (inbound, control_frames) = mpsc::channel(CONTROL_QUEUE);
    tokio::spawn(async move {
        // Both channel ends live as long as the link: dropping either would end it.
        let _ = link::run(
            reader,
            writer,
            stack,
            inbound,
            outbound,
            LinkConfig::default(),
        )
        .await;
        drop((control, control_frames));
    })
}

// ───────────────────────────── proxies ─────────────────────────────

/// A loopback proxy started by [`proxy`].
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Connections it has accepted, also those it could not join to the target.
    pub accepted: Arc<AtomicUsize>,
}

/// A loopback TCP proxy to `target`: every connection accepted is joined to a new one
/// to `target`, each direction moved by a task running `pipe`; one the target refuses
/// is closed.
pub async fn proxy<P, Fut>(target: u16, pipe: P) -> Proxy
where
    P: Fn(OwnedReadHalf, OwnedWriteHalf) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await else {
                continue;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pipe(client_read, server_write));
            tokio::spawn(pipe(server_read, client_write));
        }
    });
    Proxy { port, accepted }
}

/// A TCP proxy to `target` that hands every byte on `one_way` after it arrived, each
/// direction a FIFO of at most 16 reads of 64 KiB: a link through it gets a real round
/// trip, and a rate (1 MiB per `one_way`) that a bulk transfer fills, so the queues
/// behind it fill too.
pub async fn delay_line(target: u16, one_way: Duration) -> Proxy {
    let millis = u64::try_from(one_way.as_millis()).unwrap_or(u64::MAX);
    variable_delay_line(target, Arc::new(AtomicU64::new(millis))).await
}

/// A [`delay_line`] whose one-way delay, in milliseconds, is read from `one_way_ms`
/// for every read: a relay that moves away (or nearer) while the test runs.
pub async fn variable_delay_line(target: u16, one_way_ms: Arc<AtomicU64>) -> Proxy {
    proxy(target, move |mut from, mut to| {
        let one_way_ms = one_way_ms.clone();
        async move {
            let (line_in, mut line_out) = mpsc::channel(16);
            let carry = async move {
                let mut buf = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf).await {
                    let one_way = Duration::from_millis(one_way_ms.load(Ordering::SeqCst));
                    let due = tokio::time::Instant::now() + one_way;
                    if line_in.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            };
            let deliver = async move {
                while let Some((due, bytes)) = line_out.recv().await {
                    tokio::time::sleep_until(due).await;
                    if to.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                let _ = to.shutdown().await;
            };
            tokio::join!(carry, deliver);
        }
    })
    .await
}
