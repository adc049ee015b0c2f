//! Hostile load against a real `portferry relay` process (issue 12): while strangers
//! flood its public port, do legitimate clients and agents still get in, and what is
//! left behind?
//!
//! `cargo bench --bench hostile` starts the relay binary on loopback, an in-process
//! agent with three tunnels (an echo service, a service that never reads, a counting
//! service), then runs, each bounded in count and time:
//! - `baseline`: legitimate HTTPS-style clients (TLS to the tunnel's hostname, echo 64
//!   bytes, from 127.0.0.2 while every flood comes from 127.0.0.1), with nothing else
//!   going on;
//! - `silent`: the same while [`FLOOD`] TCP connections to the public port say nothing,
//!   plus new agents connecting (item 1);
//! - `hello`: the same while [`FLOOD`] clients send a real ClientHello for a tunnel and
//!   then nothing; also how many connections they opened to that tunnel's service
//!   (item 5: should be none);
//! - `idle`: [`IDLE_CLIENTS`] clients send to the service that never reads, half-close,
//!   and wait; how many of their connections the relay has ended after a while (item 4);
//! - `memory`: on a fresh relay, the relay's and a CLI agent's resident memory before, at
//!   the peak of and after a burst of downloads (item 10);
//! - `shares` (issue 21, in `hostile/shares.rs`): on a fresh relay, a two-address
//!   handshake flood, one address holding a tunnel's slots, clients that read then
//!   stall (with and without a trickle), and a session flood of the token, each beside
//!   that relay's baseline.
//!
//! Every line is a ratio or a count next to the same run's baseline. Environment:
//! `HOSTILE_BIN` (default: this build's `portferry`) to measure another build,
//! `HOSTILE_ONLY=memory` or `HOSTILE_ONLY=shares` to run only that phase, and
//! `HOSTILE_RELAY_ARGS` (space-separated relay flags, default [`RELAY_ARGS`]; set it
//! empty for a build without `--idle-timeout`).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portferry::agent::{Agent, AgentConfig, Tunnel};
use portferry::token::Token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// Relay flags unless `HOSTILE_RELAY_ARGS` says otherwise: an idle timeout well inside
/// [`IDLE_WAIT`], so that the `idle` phase shows it.
const RELAY_ARGS: &str = "--idle-timeout 5";
/// Connections in each flood.
const FLOOD: usize = 2_000;
/// Flood connections opened at once.
const FLOOD_CONCURRENCY: usize = 200;
/// Legitimate connects per phase, and how many run at once.
const LEGIT: usize = 40;
const LEGIT_CONCURRENCY: usize = 4;
/// Where legitimate clients connect from; floods and agents come from 127.0.0.1.
const LEGIT_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);
/// Limit for one legitimate connect-and-echo, and for one agent to connect and forward.
const LEGIT_LIMIT: Duration = Duration::from_secs(5);
const AGENT_LIMIT: Duration = Duration::from_secs(30);
/// New agents that connect during the silent flood.
const AGENTS: usize = 3;
/// Clients of the `idle` phase, what each sends, and how long they wait for their end.
const IDLE_CLIENTS: usize = 50;
const IDLE_SEND: usize = 256 << 10;
const IDLE_WAIT: Duration = Duration::from_secs(20);
/// Downloads in the memory burst, all at once, and the bytes of each.
const BURST: usize = 400;
const BURST_BYTES: usize = 4 << 20;

fn main() {
    // `cargo bench` passes `--bench`; this program takes no other arguments.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

#[path = "hostile/shares.rs"]
mod shares;

async fn run() {
    let only = std::env::var("HOSTILE_ONLY").ok();
    if only.as_deref() == Some("shares") {
        shares::shares().await;
        shares::tenants().await;
        return;
    }
    if only.as_deref() != Some("memory") {
        attacks().await;
        shares::shares().await;
        shares::tenants().await;
    }
    // Item 10: memory after a load burst, on a fresh relay so that only the burst counts.
    let relay = RelayProcess::start().await;
    let roots = portferry::tls::load_ca_roots(&relay.ca).expect("ca");
    let tls = TlsConnector::from(portferry::tls::client_config(roots, &[b"http/1.1"]));
    memory(&relay, &tls).await;
}

/// The phases of items 1, 5 and 4 against one relay.
async fn attacks() {
    let relay = RelayProcess::start().await;
    let mut config = AgentConfig::new(relay.addr.clone(), Token::new(relay.token.clone()));
    config.relay_ca = Some(relay.ca.clone());
    let agent = Agent::connect(config.clone()).await.expect("agent");
    let echo = agent.forward(serve(echo).await).await.expect("echo tunnel");
    let opened = Arc::new(AtomicUsize::new(0));
    let counted = agent
        .forward(serve_counting(opened.clone()).await)
        .await
        .expect("counting tunnel");
    let hole = agent
        .forward(serve(never_read).await)
        .await
        .expect("hole tunnel");
    let roots = portferry::tls::load_ca_roots(&relay.ca).expect("ca");
    let tls = TlsConnector::from(portferry::tls::client_config(roots, &[b"http/1.1"]));
    let public = echo.tls_socket().1;
    println!(
        "relay {} (pid {}), public port {public}",
        relay.bin,
        relay.pid()
    );

    let baseline = legit(&tls, &echo).await;
    baseline.print("baseline", None);

    // Item 1: silent connections hold the handshake pool.
    let flood = silent_flood(public).await;
    let during = tokio::join!(legit(&tls, &echo), agents(&config));
    during.0.print("silent", Some(&baseline));
    println!(
        "silent: {} of {FLOOD} flood connections established; agents: {}",
        flood.len(),
        during.1
    );
    drop(flood);

    // Item 5: a ClientHello alone must not open a connection to the service.
    let before = opened.load(Ordering::Relaxed);
    let flood = hello_flood(public, &tls, &counted.tls_socket().0).await;
    let during = legit(&tls, &echo).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    during.print("hello", Some(&baseline));
    println!(
        "hello: {} of {FLOOD} hello-only clients connected; they opened {} connections to the service",
        flood.len(),
        opened.load(Ordering::Relaxed) - before
    );
    drop(flood);

    // Item 4: a client that sends to a service that never reads, then half-closes.
    idle(&tls, &hole).await;
    drop((echo, counted, hole, agent));
}

/// The `portferry relay` process under test, on loopback ports, killed when dropped.
struct RelayProcess {
    child: Child,
    bin: String,
    addr: String,
    token: String,
    ca: std::path::PathBuf,
    _state: tempdir::TempDir,
}

/// How a relay of a phase is started, beyond [`RELAY_ARGS`].
#[derive(Default)]
struct RelaySetup {
    /// More flags.
    args: Vec<String>,
    /// Tokens it takes (`--tokens`); the first is the one agents use. `None`: the one it
    /// makes.
    tokens: Option<Vec<String>>,
    /// The `ulimit` flags it runs under (like `-Sn 1024`), if not the bench's.
    ulimit: Option<&'static str>,
}

impl RelayProcess {
    async fn start() -> RelayProcess {
        RelayProcess::start_with(RelaySetup::default()).await
    }

    async fn start_with(setup: RelaySetup) -> RelayProcess {
        let bin = std::env::var("HOSTILE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_portferry").to_owned());
        let state = tempdir::TempDir::new();
        let extra = std::env::var("HOSTILE_RELAY_ARGS").unwrap_or_else(|_| RELAY_ARGS.into());
        let mut command = match setup.ulimit {
            None => Command::new(&bin),
            Some(ulimit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
                    .arg(&bin);
                shell
            }
        };
        command
            .args([
                "relay",
                "--agent-addr",
                "127.0.0.1:0",
                "--public-addr",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(state.path())
            .args(extra.split_whitespace())
            .args(&setup.args)
            .args(
                setup
                    .tokens
                    .iter()
                    .map(|tokens| format!("--tokens={}", tokens.join(","))),
            );
        let (child, mut lines) = spawn_with_lines(command);
        let (mut addr, mut token, mut ca) = (None, None, None);
        let read = async {
            while let Some(line) = lines.recv().await {
                let line = line.trim();
                let Some((name, value)) = line.split_once('=') else {
                    continue;
                };
                match name {
                    "PORTFERRY_RELAY" => addr = Some(value.to_owned()),
                    "PORTFERRY_TOKEN" => token = Some(value.to_owned()),
                    "PORTFERRY_RELAY_CA" => {
                        ca = Some(value.into());
                        break;
                    }
                    _ => {}
                }
            }
        };
        timeout(Duration::from_secs(30), read)
            .await
            .expect("the relay never said it was ready");
        let token = match setup.tokens {
            Some(tokens) => tokens[0].clone(),
            None => token.expect("PORTFERRY_TOKEN"),
        };
        RelayProcess {
            child,
            bin,
            addr: addr.expect("PORTFERRY_RELAY"),
            token,
            ca: ca.expect("PORTFERRY_RELAY_CA"),
            _state: state,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` with its stdout read line by line on a thread (so that it never
/// blocks on a full pipe); the first 64 lines are handed out, the rest dropped.
fn spawn_with_lines(mut command: Command) -> (Child, tokio::sync::mpsc::Receiver<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start portferry");
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = tokio::sync::mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            let _ = lines.try_send(line);
        }
    });
    (child, received)
}

/// A scratch state directory, removed on drop.
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            TempDir(
                std::env::temp_dir()
                    .join(format!("portferry-hostile-{:016x}", rand::random::<u64>())),
            )
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Resident memory of a process in MiB, from `/proc`.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// A loopback service on an ephemeral port, serving each connection with `serve`.
async fn serve<F, Fut>(serve: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    port
}

/// Echoes until EOF.
async fn echo(mut stream: TcpStream) {
    let (mut read, mut write) = stream.split();
    let _ = tokio::io::copy(&mut read, &mut write).await;
}

/// Holds the connection and never reads from it (until the tunnel ends it).
async fn never_read(stream: TcpStream) {
    let _ = stream.ready(tokio::io::Interest::ERROR).await;
}

/// Writes [`BURST_BYTES`], then closes.
async fn download(mut stream: TcpStream) {
    let chunk = vec![0x42; 64 << 10];
    for _ in 0..BURST_BYTES / chunk.len() {
        if stream.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

/// Counts the connections it gets and holds each until its peer ends it.
async fn serve_counting(opened: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            opened.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut sink = [0; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// Outcome of a batch of legitimate connects.
struct Legit {
    ok: usize,
    times: Vec<Duration>,
}

impl Legit {
    fn print(&self, phase: &str, baseline: Option<&Legit>) {
        let p50 = p_of(&self.times, 0.5);
        let ratio = baseline.map_or(String::new(), |b| {
            format!(" (p50 {:.1}x the baseline's)", p50 / p_of(&b.times, 0.5))
        });
        println!(
            "{phase}: legitimate connects {}/{LEGIT} succeeded, p50 {p50:.1} ms, p99 {:.1} ms{ratio}",
            self.ok,
            p_of(&self.times, 0.99)
        );
    }
}

/// The `q` quantile of `times` in milliseconds (NaN if there are none).
fn p_of(times: &[Duration], q: f64) -> f64 {
    let mut times = times.to_vec();
    times.sort();
    times
        .get(((times.len() as f64 - 1.0) * q).round() as usize)
        .map_or(f64::NAN, |t| t.as_secs_f64() * 1e3)
}

/// [`LEGIT`] clients, [`LEGIT_CONCURRENCY`] at a time: TLS to the tunnel, echo 64 bytes.
async fn legit(tls: &TlsConnector, tunnel: &Tunnel) -> Legit {
    let (host, port) = tunnel.tls_socket();
    let next = AtomicUsize::new(0);
    let worker = || async {
        let mut results = Vec::new();
        while next.fetch_add(1, Ordering::Relaxed) < LEGIT {
            let start = Instant::now();
            let ok = timeout(LEGIT_LIMIT, echo_once(tls, port, &host)).await;
            results.push(matches!(ok, Ok(Ok(()))).then(|| start.elapsed()));
        }
        results
    };
    let workers: Vec<_> = (0..LEGIT_CONCURRENCY).map(|_| worker()).collect();
    let results: Vec<_> = futures_join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let times: Vec<Duration> = results.iter().flatten().copied().collect();
    Legit {
        ok: times.len(),
        times,
    }
}

async fn echo_once(tls: &TlsConnector, port: u16, host: &str) -> std::io::Result<()> {
    // From another address than the floods (all of 127/8 is loopback on Linux).
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((LEGIT_SOURCE, 0).into())?;
    let tcp = socket
        .connect((std::net::Ipv4Addr::LOCALHOST, port).into())
        .await?;
    let name = ServerName::try_from(host.to_owned()).map_err(std::io::Error::other)?;
    let mut stream = tls.connect(name, tcp).await?;
    stream.write_all(&[7; 64]).await?;
    let mut back = [0; 64];
    stream.read_exact(&mut back).await?;
    Ok(())
}

/// Runs the futures to completion concurrently, in order of the results.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

/// Opens up to [`FLOOD`] connections, `open` for each, [`FLOOD_CONCURRENCY`] at a time;
/// returns those that were established (each connect is given 3 s).
async fn flood<T, F, Fut>(open: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let mut held = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD / FLOOD_CONCURRENCY {
        let batch = (0..FLOOD_CONCURRENCY)
            .map(|_| timeout(Duration::from_secs(3), open()))
            .collect();
        held.extend(
            futures_join_all(batch)
                .await
                .into_iter()
                .flatten()
                .flatten(),
        );
    }
    held
}

/// [`FLOOD`] TCP connections to the public port that never send a byte.
async fn silent_flood(port: u16) -> Vec<TcpStream> {
    flood(|| TcpStream::connect(("127.0.0.1", port))).await
}

/// [`FLOOD`] clients that send one real ClientHello for `host`, then nothing.
async fn hello_flood(port: u16, tls: &TlsConnector, host: &str) -> Vec<TcpStream> {
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let mut client = rustls::ClientConnection::new(tls.config().clone(), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let hello = &hello;
    flood(|| async move {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.write_all(hello).await?;
        Ok(tcp)
    })
    .await
}

/// [`AGENTS`] new agents, one after the other: connect and forward; how many made it
/// and how long each took.
async fn agents(config: &AgentConfig) -> String {
    let mut report = Vec::new();
    for _ in 0..AGENTS {
        let start = Instant::now();
        let attempt = async {
            let agent = Agent::connect(config.clone()).await?;
            agent.forward(9).await.map(|_| agent)
        };
        report.push(match timeout(AGENT_LIMIT, attempt).await {
            Ok(Ok(_)) => format!("ok in {:.1} s", start.elapsed().as_secs_f64()),
            Ok(Err(e)) => format!("failed after {:.1} s ({e})", start.elapsed().as_secs_f64()),
            Err(_) => format!("no answer in {} s", AGENT_LIMIT.as_secs()),
        });
    }
    report.join(", ")
}

/// [`IDLE_CLIENTS`] clients send [`IDLE_SEND`] bytes to a service that never reads,
/// half-close and wait for their connection to end; prints how many ended within
/// [`IDLE_WAIT`].
async fn idle(tls: &TlsConnector, hole: &Tunnel) {
    let (host, port) = hole.tls_socket();
    let ended = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..IDLE_CLIENTS)
        .map(|_| {
            let (tls, host, ended) = (tls.clone(), host.to_owned(), ended.clone());
            tokio::spawn(async move {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
                let mut stream = tls.connect(name, tcp).await?;
                let data = vec![1; IDLE_SEND];
                // Whatever fits before the service's side is full.
                let _ = timeout(Duration::from_secs(2), stream.write_all(&data)).await;
                let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
                let mut sink = [0; 1024];
                if timeout(IDLE_WAIT, async {
                    while stream.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await
                .is_ok()
                {
                    ended.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            })
        })
        .collect();
    for client in clients {
        let _ = client.await;
    }
    println!(
        "idle: {} of {IDLE_CLIENTS} send-then-half-close connections to a service that never reads were ended by the relay within {} s (phase took {:.1} s)",
        ended.load(Ordering::Relaxed),
        IDLE_WAIT.as_secs(),
        start.elapsed().as_secs_f64()
    );
}

/// A CLI agent forwards a download service; [`BURST`] clients download at once; prints
/// the relay's and the agent's resident memory before, at the peak and after.
async fn memory(relay: &RelayProcess, tls: &TlsConnector) {
    let service = serve(download).await;
    let mut command = Command::new(&relay.bin);
    command
        .args(["forward", &service.to_string()])
        .env("PORTFERRY_RELAY", &relay.addr)
        .env("PORTFERRY_TOKEN", &relay.token)
        .env("PORTFERRY_RELAY_CA", &relay.ca);
    let (mut agent, mut lines) = spawn_with_lines(command);
    let mut socket = None;
    while let Ok(Some(line)) = timeout(Duration::from_secs(30), lines.recv()).await {
        if let Some(value) = line.strip_prefix("tls socket:") {
            socket = value
                .trim()
                .rsplit_once(':')
                .map(|(host, port)| (host.to_owned(), port.parse::<u16>().unwrap()));
            break;
        }
    }
    let (host, port) = socket.expect("the agent never printed its tls socket");
    let agent_pid = agent.id();
    let rss = || (rss_mib(relay.pid()), rss_mib(agent_pid));
    let before = rss();
    let peak = Arc::new(std::sync::Mutex::new(before));
    let sampler = {
        let (peak, relay_pid) = (peak.clone(), relay.pid());
        tokio::spawn(async move {
            loop {
                let now = (rss_mib(relay_pid), rss_mib(agent_pid));
                {
                    let mut peak = peak.lock().unwrap();
                    *peak = (peak.0.max(now.0), peak.1.max(now.1));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let start = Instant::now();
    let downloads: Vec<_> = (0..BURST)
        .map(|_| {
            let (tls, host) = (tls.clone(), host.clone());
            tokio::spawn(async move {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
                let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
                let mut stream = tls.connect(name, tcp).await?;
                let mut sink = vec![0; 64 << 10];
                let mut got = 0;
                loop {
                    match stream.read(&mut sink).await {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(e),
                    }
                }
                Ok::<_, std::io::Error>(got)
            })
        })
        .collect();
    let (mut complete, mut first_error) = (0, None);
    for download in downloads {
        let failure = match timeout(Duration::from_secs(120), download).await {
            Ok(Ok(Ok(got))) if got == BURST_BYTES => {
                complete += 1;
                continue;
            }
            Ok(Ok(Ok(got))) => format!("ended after {got} bytes"),
            Ok(Ok(Err(e))) => e.to_string(),
            _ => "no end in 120 s".into(),
        };
        first_error.get_or_insert(failure);
    }
    let took = start.elapsed();
    sampler.abort();
    let peak = *peak.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_2s = rss();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after_10s = rss();
    println!(
        "memory: {complete}/{BURST} downloads of {} MiB in {:.1} s{}",
        BURST_BYTES >> 20,
        took.as_secs_f64(),
        first_error.map_or(String::new(), |e| format!(" (first failure: {e})"))
    );
    for (who, pick) in [("relay", 0), ("agent", 1)] {
        let get = |m: (f64, f64)| if pick == 0 { m.0 } else { m.1 };
        println!(
            "memory: {who} RSS MiB: before {:.1}, peak {:.1}, 2 s after {:.1}, 10 s after {:.1} ({:.0}% of the peak kept)",
            get(before),
            get(peak),
            get(after_2s),
            get(after_10s),
            100.0 * get(after_10s) / get(peak)
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
