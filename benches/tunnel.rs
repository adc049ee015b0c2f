//! End-to-end benchmark: a relay, an agent and loopback services in one process,
//! measured against direct loopback TCP in the same run. Prints one table.
//!
//! `cargo bench --bench tunnel` (set `PORTFERRY_BENCH_MIB` to change the bulk size, and
//! `PORTFERRY_BENCH_SOCKET_BUFFER` to give every inner connection another initial buffer
//! size).
//!
//! `PORTFERRY_BENCH_RTT_MS=40` puts the agent's link to the relay through an in-process
//! delay line of that round trip (a loopback TCP proxy that delivers every byte half the
//! round trip after it arrived, each way; no root needed) and measures single-stream
//! throughput of the raw TCP and HTTPS tunnels against what the same delay line carries
//! for one plain TCP stream in the same run.
//!
//! Both tables give latency under load: 64-byte round trips on one connection while
//! another connection of the same agent echoes bulk data both ways, beside the idle
//! round trips of the same run (and of direct TCP, or the plain delay line, under the
//! same load).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel};
use portferry::netstack::window::IDLE_SHRINK;
use portferry::relay::{Relay, RelayConfig, RelayHandle, LOCAL_DOMAIN};
use portferry::token::Token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// Round trips timed per latency figure.
const ROUND_TRIPS: usize = 2_000;
/// Round trips timed per latency figure across a delay line.
const DELAYED_ROUND_TRIPS: usize = 200;
/// New connections timed per setup figure.
const CONNECTIONS: usize = 300;
/// `forward()` calls timed.
const FORWARDS: usize = 50;

/// Bytes a delay line holds in flight per direction: 1 Gbit/s for half of 500 ms.
const DELAY_LINE_BYTES: usize = 32 << 20;

/// Idle connections held open for the scale measurement.
const IDLE_CONNECTIONS: usize = 10_000;
/// Set in the child process that holds the idle connections: the address to connect to.
const CLIENTS_ENV: &str = "PORTFERRY_BENCH_IDLE_CLIENTS_OF";

fn main() {
    // `cargo bench` passes `--bench`; this program takes no other arguments.
    if let Ok(target) = std::env::var(CLIENTS_ENV) {
        return hold_idle_clients(target.parse().expect("client target"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

/// Everything the measurements need, set up once.
struct Setup {
    relay: RelayHandle,
    agent: Agent,
    tls: TlsConnector,
    echo: SocketAddr,
    sink: SocketAddr,
    hello: SocketAddr,
}

async fn run() {
    let state = std::env::temp_dir().join(format!("portferry-bench-{}", std::process::id()));
    let pki = portferry::tls::local_pki(&state, LOCAL_DOMAIN).expect("local PKI");
    let token = Token::generate();
    let mut relay_config = RelayConfig::local(pki.identity.clone(), vec![token.clone()], 0, 0);
    // The scale measurement holds 10,000 connections on one tunnel, beyond the defaults.
    relay_config.max_connections_per_tunnel = 2 * IDLE_CONNECTIONS;
    relay_config.max_connections_per_agent = 2 * IDLE_CONNECTIONS;
    let socket_buffer = std::env::var("PORTFERRY_BENCH_SOCKET_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(bytes) = socket_buffer {
        relay_config.stack.socket_buffer = bytes;
    }
    let relay = Relay::bind(relay_config).await.expect("relay");
    let rtt = std::env::var("PORTFERRY_BENCH_RTT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .filter(|rtt| !rtt.is_zero());
    let agent_link = match rtt {
        Some(rtt) => delay_line(relay.agent_addr(), rtt / 2).await,
        None => relay.agent_addr(),
    };
    let mut config = AgentConfig::new(format!("localhost:{}", agent_link.port()), token);
    config.relay_ca = Some(pki.ca_cert_path.clone());
    if let Some(bytes) = socket_buffer {
        config.socket_buffer = bytes;
    }
    let relay_handle = relay.handle();
    tokio::spawn(relay.run());
    let setup = Setup {
        relay: relay_handle,
        agent: Agent::connect(config).await.expect("agent"),
        tls: TlsConnector::from(portferry::tls::client_config(pki.roots(), &[b"http/1.1"])),
        echo: start_service(echo).await,
        sink: start_service(sink).await,
        hello: portferry::demo::start_hello_service()
            .await
            .expect("hello service"),
    };
    let mib: usize = std::env::var("PORTFERRY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let bulk = mib << 20;

    let options = ForwardOptions::new().unencrypted(true);
    let echo_tunnel = setup
        .agent
        .forward_with(setup.echo.port(), options.clone())
        .await
        .unwrap();
    let sink_tunnel = setup
        .agent
        .forward_with(setup.sink.port(), options)
        .await
        .unwrap();
    let echo_raw = raw_addr(&echo_tunnel);
    let sink_raw = raw_addr(&sink_tunnel);
    if let Some(rtt) = rtt {
        return across_delay_line(&setup, &sink_tunnel, &echo_tunnel, bulk, rtt).await;
    }

    println!(
        "portferry end-to-end benchmark ({mib} MiB bulk, {ROUND_TRIPS} round trips, {CONNECTIONS} connections, {} socket buffers)",
        socket_buffer.map_or("default".to_string(), |bytes: usize| format!("{bytes}-byte"))
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "measure", "direct TCP", "tunnel", "ratio"
    );

    let direct = throughput(bulk, &[], || TcpStream::connect(setup.sink)).await;
    let raw = throughput(bulk, &[], || TcpStream::connect(sink_raw)).await;
    let https = throughput(bulk, &[], || tls_connect(&setup, &sink_tunnel)).await;
    row_rate("single-stream throughput, raw TCP tunnel", &direct, &raw);
    row_rate("single-stream throughput, HTTPS tunnel", &direct, &https);
    row_cpu("CPU time per GiB, raw TCP tunnel", &direct, &raw);
    row_cpu("CPU time per GiB, HTTPS tunnel", &direct, &https);
    memory_after_bulk(&setup, bulk, echo_raw).await;

    let direct = round_trips(TcpStream::connect(setup.echo).await.unwrap(), ROUND_TRIPS).await;
    let raw = round_trips(TcpStream::connect(echo_raw).await.unwrap(), ROUND_TRIPS).await;
    let https = round_trips(
        tls_connect(&setup, &echo_tunnel).await.unwrap(),
        ROUND_TRIPS,
    )
    .await;
    row_time(
        "64-byte round trip p50, raw TCP tunnel",
        direct.p(50),
        raw.p(50),
    );
    row_time(
        "64-byte round trip p99, raw TCP tunnel",
        direct.p(99),
        raw.p(99),
    );
    row_time(
        "64-byte round trip p50, HTTPS tunnel",
        direct.p(50),
        https.p(50),
    );
    let direct = round_trips_under_load(ROUND_TRIPS, || TcpStream::connect(setup.echo)).await;
    let raw = round_trips_under_load(ROUND_TRIPS, || TcpStream::connect(echo_raw)).await;
    row_time(
        "round trip p50 under load, raw TCP",
        direct.p(50),
        raw.p(50),
    );
    row_time(
        "round trip p99 under load, raw TCP",
        direct.p(99),
        raw.p(99),
    );

    let direct = connection_setup(|| TcpStream::connect(setup.echo)).await;
    let raw = connection_setup(|| TcpStream::connect(echo_raw)).await;
    let https = connection_setup(|| tls_connect(&setup, &echo_tunnel)).await;
    row_time(
        "connect + first echo p50, raw TCP tunnel",
        direct.p(50),
        raw.p(50),
    );
    row_time(
        "connect + first echo p99, raw TCP tunnel",
        direct.p(99),
        raw.p(99),
    );
    row_time(
        "connect + TLS + first echo p50, HTTPS",
        direct.p(50),
        https.p(50),
    );

    if let Some(bore) = Bore::start(setup.sink, setup.echo).await {
        let through_bore = throughput(bulk, &bore.pids(), || TcpStream::connect(bore.sink)).await;
        let tunnel = throughput(bulk, &[], || TcpStream::connect(sink_raw)).await;
        row_rate(
            "raw TCP tunnel vs bore, same run (bore | us)",
            &through_bore,
            &tunnel,
        );
        row_cpu(
            "CPU time per GiB vs bore (bore | us)",
            &through_bore,
            &tunnel,
        );
        let through_bore =
            round_trips(TcpStream::connect(bore.echo).await.unwrap(), ROUND_TRIPS).await;
        let tunnel = round_trips(TcpStream::connect(echo_raw).await.unwrap(), ROUND_TRIPS).await;
        row_time(
            "round trip p50 vs bore (bore | us)",
            through_bore.p(50),
            tunnel.p(50),
        );
    } else {
        println!("(install bore-cli to compare with bore in the same run: cargo install bore-cli)");
    }

    let forwards = forward_until_answer(&setup).await;
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "forward() until the URL answers, p50",
        "-",
        format_duration(forwards.p(50)),
        "-"
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "forward() until the URL answers, p99",
        "-",
        format_duration(forwards.p(99)),
        "-"
    );
    scale(&setup, bulk, sink_raw).await;
    let _ = std::fs::remove_dir_all(state);
}

/// The relay stack's socket buffers for one connection (from the stack's own
/// accounting): just opened, and idle again after echoing `bulk` bytes.
async fn memory_after_bulk(setup: &Setup, bulk: usize, echo: SocketAddr) {
    let buffers = || setup.relay.stats().stacks.buffer_bytes;
    // Earlier connections finish lingering and shrink first.
    tokio::time::sleep(IDLE_SHRINK * 2).await;
    let before = buffers();
    let mut stream = TcpStream::connect(echo).await.unwrap();
    let mut byte = [1u8];
    stream.write_all(&byte).await.unwrap();
    stream.read_exact(&mut byte).await.unwrap();
    let fresh = buffers().saturating_sub(before);
    let (mut reader, mut writer) = stream.split();
    let chunk = vec![0x33u8; 256 * 1024];
    let write = async {
        let mut sent = 0;
        while sent < bulk {
            writer.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
    };
    let read = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut echoed = 0;
        while echoed < bulk {
            echoed += reader.read(&mut buf).await.unwrap();
        }
    };
    tokio::join!(write, read);
    let busy = buffers().saturating_sub(before);
    tokio::time::sleep(IDLE_SHRINK * 2).await;
    let idle = buffers().saturating_sub(before);
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        format!("relay buffers of 1 conn.: new | {} MiB echoed", bulk >> 20),
        format!("{:.1} KiB", fresh as f64 / 1024.0),
        format!("{:.1} KiB", busy as f64 / 1024.0),
        "-"
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "relay buffers of that conn. idle again",
        "-",
        format!("{:.1} KiB", idle as f64 / 1024.0),
        "-"
    );
}

/// Single-stream throughput of the raw TCP and HTTPS tunnels, whose agent link crosses
/// a delay line of `rtt`, and round trips idle and under load, against plain TCP across
/// the same kind of line.
async fn across_delay_line(
    setup: &Setup,
    sink_tunnel: &Tunnel,
    echo_tunnel: &Tunnel,
    bulk: usize,
    rtt: Duration,
) {
    let sink_raw = raw_addr(sink_tunnel);
    let echo_raw = raw_addr(echo_tunnel);
    let sink_delayed = delay_line(setup.sink, rtt / 2).await;
    let echo_delayed = delay_line(setup.echo, rtt / 2).await;
    println!(
        "portferry across an in-process delay line of {} ms round trip ({} MiB bulk)",
        rtt.as_millis(),
        bulk >> 20
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "measure", "delay line", "tunnel", "ratio"
    );
    let line = throughput(bulk, &[], || TcpStream::connect(sink_delayed)).await;
    let raw = throughput(bulk, &[], || TcpStream::connect(sink_raw)).await;
    let https = throughput(bulk, &[], || tls_connect(setup, sink_tunnel)).await;
    row_rate("single-stream throughput, raw TCP tunnel", &line, &raw);
    row_rate("single-stream throughput, HTTPS tunnel", &line, &https);
    let count = DELAYED_ROUND_TRIPS;
    let line = round_trips(TcpStream::connect(echo_delayed).await.unwrap(), count).await;
    let raw = round_trips(TcpStream::connect(echo_raw).await.unwrap(), count).await;
    row_time(
        "64-byte round trip p50, raw TCP tunnel",
        line.p(50),
        raw.p(50),
    );
    row_time(
        "64-byte round trip p99, raw TCP tunnel",
        line.p(99),
        raw.p(99),
    );
    let line = round_trips_under_load(count, || TcpStream::connect(echo_delayed)).await;
    let raw = round_trips_under_load(count, || TcpStream::connect(echo_raw)).await;
    row_time("round trip p50 under load, raw TCP", line.p(50), raw.p(50));
    row_time("round trip p99 under load, raw TCP", line.p(99), raw.p(99));
}

/// A loopback TCP proxy to `target` that delivers every byte `one_way` after it
/// arrived, in both directions: a link with a round trip, without root or a network.
/// Each direction holds at most [`DELAY_LINE_BYTES`] in flight.
async fn delay_line(target: SocketAddr, one_way: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((near, _)) = listener.accept().await {
            let Ok(far) = TcpStream::connect(target).await else {
                continue;
            };
            let _ = near.set_nodelay(true);
            let _ = far.set_nodelay(true);
            let (near_read, near_write) = near.into_split();
            let (far_read, far_write) = far.into_split();
            tokio::spawn(delayed_copy(near_read, far_write, one_way));
            tokio::spawn(delayed_copy(far_read, near_write, one_way));
        }
    });
    addr
}

/// Copies `from` to `to`, each read written `one_way` after it was read.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
) {
    let (line_in, mut line_out) = tokio::sync::mpsc::unbounded_channel();
    // The bytes in flight are bounded here rather than by the channel.
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(DELAY_LINE_BYTES));
    let read = async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let Ok(permit) = room.clone().acquire_many_owned(n as u32).await else {
                break;
            };
            let due = tokio::time::Instant::now() + one_way;
            if line_in.send((due, buf[..n].to_vec(), permit)).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk, permit)) = line_out.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            drop(permit);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Throughput of one stream with and without 10,000 idle connections through the same
/// agent, and the memory those connections cost this process (relay and agent).
async fn scale(setup: &Setup, bulk: usize, sink_port: SocketAddr) {
    // Served straight from the agent's userspace stack: no local socket per connection,
    // so this process holds only the relay's side of each (the fd limit is 20,000).
    let options = ForwardOptions::new().unencrypted(true);
    let mut listener = setup.agent.listen(options).await.expect("listen");
    let target = raw_addr(listener.tunnel());
    tokio::spawn(async move {
        while let Ok(stream) = listener.accept().await {
            // An echo service with a small buffer: in a deployment the service is
            // another program, so its memory should not count as the tunnel's.
            tokio::spawn(async move {
                let mut stream = stream;
                let mut buf = [0u8; 512];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let without = throughput(bulk, &[], || TcpStream::connect(sink_port)).await;

    let rss_before = resident_bytes();
    let started = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .env(CLIENTS_ENV, target.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client process");
    let stdout = child.stdout.take().expect("piped stdout");
    let report = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    });
    let opened: usize = report
        .await
        .unwrap()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_connection = resident_bytes().saturating_sub(rss_before) as f64 / opened.max(1) as f64;
    let with = throughput(bulk, &[], || TcpStream::connect(sink_port)).await;
    drop(child.stdin.take());
    let _ = child.wait();

    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "idle connections: asked, opened, time",
        IDLE_CONNECTIONS,
        opened,
        format!("{:.1}s", open_time.as_secs_f64())
    );
    row_rate("throughput with 10k idle vs with none", &without, &with);
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "resident memory per idle connection",
        "-",
        format!("{:.1} KiB", per_connection / 1024.0),
        "-"
    );
}

/// A bore server and two bore clients (sink and echo) on loopback, killed on drop: a
/// kernel-proxy tunnel to compare with, when `bore` is installed. Its ports lie below
/// Linux's ephemeral range, so no earlier connection of this run holds them.
struct Bore {
    processes: Vec<std::process::Child>,
    sink: SocketAddr,
    echo: SocketAddr,
}

impl Bore {
    async fn start(sink: SocketAddr, echo: SocketAddr) -> Option<Bore> {
        let spawn = |args: &[&str]| {
            std::process::Command::new("bore")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        };
        let mut bore = Bore {
            processes: vec![spawn(&[
                "server",
                "--bind-addr",
                "127.0.0.1",
                "--min-port",
                "21000",
                "--max-port",
                "21100",
            ])?],
            sink: SocketAddr::from(([127, 0, 0, 1], 21001)),
            echo: SocketAddr::from(([127, 0, 0, 1], 21002)),
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (local, remote) in [(sink, bore.sink), (echo, bore.echo)] {
            let (local_port, remote_port) = (local.port().to_string(), remote.port().to_string());
            let args = [
                "local",
                &local_port,
                "--local-host",
                "127.0.0.1",
                "--to",
                "127.0.0.1",
                "--port",
                &remote_port,
            ];
            bore.processes.push(spawn(&args)?);
        }
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if TcpStream::connect(bore.sink).await.is_ok()
                && TcpStream::connect(bore.echo).await.is_ok()
            {
                return Some(bore);
            }
        }
        None
    }
}

impl Bore {
    fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.id()).collect()
    }
}

impl Drop for Bore {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Resident set size of this process.
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| {
            kb.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Child process: opens the idle connections, echoes one byte on each, prints how many
/// succeeded, and holds them until its stdin closes.
fn hold_idle_clients(target: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut streams = Vec::with_capacity(IDLE_CONNECTIONS);
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..IDLE_CONNECTIONS {
            pending.spawn(async move {
                let mut stream = TcpStream::connect(target).await.ok()?;
                stream.write_all(&[i as u8]).await.ok()?;
                let mut echo = [0u8; 1];
                stream.read_exact(&mut echo).await.ok()?;
                (echo[0] == i as u8).then_some(stream)
            });
            // Keep the number of handshakes in flight bounded.
            while pending.len() >= 256 {
                if let Some(Ok(Some(stream))) = pending.join_next().await {
                    streams.push(stream);
                }
            }
        }
        while let Some(done) = pending.join_next().await {
            if let Ok(Some(stream)) = done {
                streams.push(stream);
            }
        }
        println!("{}", streams.len());
        // The kernel keeps the idle connections open; nothing here needs polling.
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
    });
}

fn raw_addr(tunnel: &Tunnel) -> SocketAddr {
    let (_, port) = tunnel.tcp_socket().expect("unencrypted tunnel");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TLS connection to a tunnel's hostname through the relay's public port.
async fn tls_connect(
    setup: &Setup,
    tunnel: &Tunnel,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (host, port) = tunnel.tls_socket();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_owned()).expect("tunnel hostname");
    setup.tls.connect(name, tcp).await
}

type Service = fn(TcpStream) -> tokio::task::JoinHandle<()>;

async fn start_service(serve: Service) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            serve(stream);
        }
    });
    addr
}

/// Echoes until EOF.
fn echo(mut stream: TcpStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    })
}

/// Reads and discards until EOF, then answers one byte.
fn sink(mut stream: TcpStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = stream.write_all(b"k").await;
    })
}

/// Bytes per second of `bytes` written to a sink, until its acknowledgement.
/// One bulk transfer: its rate, and the CPU time it cost per GiB moved.
struct Transfer {
    bytes_per_second: f64,
    cpu_per_gib: Duration,
}

/// Sends `bytes` through a fresh connection to a sink and waits for its one-byte
/// acknowledgement. The CPU time counted is this process's (client, sink, relay and
/// agent alike) plus that of `helpers`, the processes of a tunnel compared with.
async fn throughput<S, F, Fut>(bytes: usize, helpers: &[u32], connect: F) -> Transfer
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let chunk = vec![0x5au8; 256 * 1024];
    let mut stream = connect().await.expect("connect");
    let cpu_before = cpu_time(helpers);
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    stream.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await.unwrap();
    let elapsed = start.elapsed();
    let cpu = cpu_time(helpers).saturating_sub(cpu_before);
    Transfer {
        bytes_per_second: sent as f64 / elapsed.as_secs_f64(),
        cpu_per_gib: cpu.mul_f64((1u64 << 30) as f64 / sent as f64),
    }
}

/// User + system CPU time of this process and of `others`, from `/proc` (zero where
/// it is not available).
fn cpu_time(others: &[u32]) -> Duration {
    let ticks = |pid: String| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        field(14).unwrap_or(0) + field(15).unwrap_or(0)
    };
    let total: u64 = std::iter::once("self".to_string())
        .chain(others.iter().map(|pid| pid.to_string()))
        .map(ticks)
        .sum();
    // Linux reports these in USER_HZ, which is 100 on every mainstream platform.
    Duration::from_millis(total * 10)
}

/// Sorted durations, for percentiles.
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Samples(samples)
    }

    fn p(&self, percentile: usize) -> Duration {
        self.0[(self.0.len() - 1) * percentile / 100]
    }
}

/// `count` 64-byte round trips on `stream`, after a tenth as many to warm up.
async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, count: usize) -> Samples {
    let ping = [7u8; 64];
    let mut pong = [0u8; 64];
    let warm_up = count / 10;
    let mut samples = Vec::with_capacity(count + warm_up);
    for _ in 0..count + warm_up {
        let start = Instant::now();
        stream.write_all(&ping).await.unwrap();
        stream.read_exact(&mut pong).await.unwrap();
        samples.push(start.elapsed());
    }
    Samples::new(samples.split_off(warm_up))
}

/// [`round_trips`] on one connection from `connect` while another one, to the same
/// echo service, moves bulk data both ways as fast as it goes: latency under load.
async fn round_trips_under_load<S, F, Fut>(count: usize, connect: F) -> Samples
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let (mut reader, mut writer) = tokio::io::split(connect().await.expect("connect"));
    let load = tokio::spawn(async move {
        let chunk = vec![0x33u8; 256 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    });
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    // Until the bulk echo runs at full speed and every queue on its way has filled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = round_trips(connect().await.expect("connect"), count).await;
    load.abort();
    drain.abort();
    samples
}

async fn connection_setup<S, F, Fut>(connect: F) -> Samples
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let mut samples = Vec::with_capacity(CONNECTIONS);
    let mut pong = [0u8; 64];
    for _ in 0..CONNECTIONS {
        let start = Instant::now();
        let mut stream = connect().await.expect("connect");
        stream.write_all(&[1u8; 64]).await.unwrap();
        stream.read_exact(&mut pong).await.unwrap();
        samples.push(start.elapsed());
    }
    Samples::new(samples)
}

/// From calling `forward()` to the first complete HTTPS response through its URL.
async fn forward_until_answer(setup: &Setup) -> Samples {
    let mut samples = Vec::with_capacity(FORWARDS);
    for _ in 0..FORWARDS {
        let start = Instant::now();
        let tunnel = setup
            .agent
            .forward(setup.hello.port())
            .await
            .expect("forward");
        let mut stream = tls_connect(setup, &tunnel)
            .await
            .expect("TLS through the new URL");
        let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", tunnel.tls_socket().0);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        samples.push(start.elapsed());
        assert!(response.ends_with(portferry::demo::GREETING.as_bytes()));
        tunnel.close().await.expect("close");
    }
    Samples::new(samples)
}

fn format_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn row_rate(name: &str, direct: &Transfer, tunnel: &Transfer) {
    let gbit = |t: &Transfer| format!("{:.2} Gbit/s", t.bytes_per_second * 8.0 / 1e9);
    println!(
        "{name:<44} {:>14} {:>14} {:>7.2}x",
        gbit(direct),
        gbit(tunnel),
        tunnel.bytes_per_second / direct.bytes_per_second
    );
}

/// CPU cost is steadier than rate on a shared machine: other load slows a transfer
/// but does not add to its CPU time.
fn row_cpu(name: &str, direct: &Transfer, tunnel: &Transfer) {
    let ratio = tunnel.cpu_per_gib.as_secs_f64() / direct.cpu_per_gib.as_secs_f64();
    println!(
        "{name:<44} {:>14} {:>14} {:>7.2}x",
        format_duration(direct.cpu_per_gib),
        format_duration(tunnel.cpu_per_gib),
        ratio
    );
}

fn row_time(name: &str, direct: Duration, tunnel: Duration) {
    let ratio = tunnel.as_secs_f64() / direct.as_secs_f64();
    println!(
        "{name:<44} {:>14} {:>14} {:>7.2}x",
        format_duration(direct),
        format_duration(tunnel),
        ratio
    );
}
