//! The `portferry` binary: argument and environment errors, help, and the real
//! `relay`, `forward` and `demo` commands on loopback, read through their output.
//!
//! Every child runs under a deadline and is killed when its test ends, even on a
//! panic ([`Running`] kills it on drop).

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

mod common;

use common::{http_get_raw, http_service, portferry, tls_connect, Child, TempDir, HTTP1};

/// Upper bound for any single step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(10);
/// What "quickly" means for an error that needs no network.
const QUICK: Duration = Duration::from_secs(5);

/// A finished run.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Reads all of `from` on a thread; the text once it reaches EOF.
fn collect(mut from: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to the end within [`STEP`]; kills it and panics otherwise.
fn run(mut command: Command) -> Finished {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > STEP {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {STEP:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        elapsed: started.elapsed(),
    }
}

/// Runs `portferry <args>`, which must fail quickly; its stderr.
fn fails_quickly(args: &[&str]) -> String {
    let finished = run(portferry(args));
    assert!(
        !finished.status.success(),
        "portferry {args:?} succeeded: {}",
        finished.stdout
    );
    assert!(
        finished.elapsed < QUICK,
        "portferry {args:?} took {:?}",
        finished.elapsed
    );
    finished.stderr
}

/// A long-running child, killed (and reaped) when dropped (by [`Child`]). Its stdout is read line by
/// line on a thread; its stderr is kept for failure messages.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the command");
        let (send, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut line = String::new();
            while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Running {
            child: Child(child),
            lines,
            stderr,
        }
    }

    /// Reads stdout lines until `want` has matched each of its prefixes once; the
    /// matching lines in the order of `want`. Panics after [`STEP`].
    fn lines_starting_with(&mut self, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + STEP;
        let mut found: Vec<Option<String>> = vec![None; want.len()];
        let mut seen = Vec::new();
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let trimmed = line.trim_start();
                    for (slot, prefix) in found.iter_mut().zip(want) {
                        if slot.is_none() && trimmed.starts_with(prefix) {
                            *slot = Some(trimmed.to_owned());
                        }
                    }
                    seen.push(line);
                }
                Err(e) => {
                    let status = self.child.0.try_wait().ok().flatten();
                    panic!(
                        "waiting for lines {want:?} ({e:?}; exited: {status:?})\nstdout so far:\n{}\nstderr:\n{}",
                        seen.join("\n"),
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
        found.into_iter().map(Option::unwrap).collect()
    }
}

/// Splits `https://host:port/path` into host, port (443 by default) and path.
fn split_url(url: &str) -> (String, u16, String) {
    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not an https URL: {url}"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().expect("a port in the URL")),
        None => (authority, 443),
    };
    (host.to_owned(), port, path)
}

/// `GET <path>` over TLS to 127.0.0.1:`port` with SNI `host`, trusting the PEM CA at
/// `ca`; the whole response (head and body).
async fn https_get(ca: &Path, host: &str, port: u16, path: &str) -> String {
    let roots = portferry::tls::load_ca_roots(ca).expect("the printed CA file loads");
    let connector = TlsConnector::from(portferry::tls::client_config(roots, HTTP1));
    let fetch = async {
        let tls = tls_connect(&connector, (Ipv4Addr::LOCALHOST, port), host)
            .await
            .unwrap();
        http_get_raw(tls, host, path).await.unwrap()
    };
    tokio::time::timeout(STEP, fetch)
        .await
        .expect("the HTTPS request hung")
}

/// Whether a program is on the PATH.
fn have(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

// ───────────────────────────── argument and environment errors ─────────────────────────────

#[test]
fn forward_refuses_ports_outside_the_range() {
    for port in ["0", "70000", "65536", "abc", ""] {
        let stderr = fails_quickly(&["forward", port]);
        assert!(
            stderr.contains("1 to 65535"),
            "forward {port:?}: stderr does not name the range:\n{stderr}"
        );
    }
}

#[test]
fn relay_refuses_a_trusted_balancer_block_that_is_not_one() {
    for (value, reason) in [
        ("10.0.0.1/8", "the block is 10.0.0.0/8"),
        ("127.0.0.1,balancer", "\"balancer\" is not an IP address"),
        ("::1/129", "not a prefix length of 0 to 128"),
    ] {
        let stderr = fails_quickly(&["relay", "--accept-proxy-protocol-from", value]);
        assert!(
            stderr.contains("--accept-proxy-protocol-from") && stderr.contains(reason),
            "{value:?}: stderr does not name the flag and {reason:?}:\n{stderr}"
        );
    }
}

#[test]
fn forward_without_relay_environment_names_both_variables() {
    let stderr = fails_quickly(&["forward", "8000"]);
    assert!(
        stderr.contains("PORTFERRY_RELAY") && stderr.contains("PORTFERRY_TOKEN"),
        "{stderr}"
    );

    // With only the relay set, only the token is missing.
    let mut command = portferry(["forward", "8000"]);
    command.env("PORTFERRY_RELAY", "localhost:9");
    let finished = run(command);
    assert!(!finished.status.success());
    assert!(finished.elapsed < QUICK, "{:?}", finished.elapsed);
    let missing = finished.stderr.replace("PORTFERRY_RELAY_CA", "");
    assert!(
        missing.contains("PORTFERRY_TOKEN") && !missing.contains("PORTFERRY_RELAY"),
        "{}",
        finished.stderr
    );
}

#[test]
fn forward_h2_with_unencrypted_is_an_error() {
    for args in [
        ["forward", "8000", "--h2", "--unencrypted"],
        ["forward", "8000", "--unencrypted", "--h2"],
    ] {
        let stderr = fails_quickly(&args);
        assert!(
            stderr.contains("--h2") && stderr.contains("--unencrypted"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn help_mentions_the_commands_and_flags() {
    let cases: [(&[&str], &[&str]); 3] = [
        (&["--help"], &["relay", "forward", "demo", "--verbose"]),
        (
            &["relay", "--help"],
            &[
                "--agent-addr",
                "--public-addr",
                "--public-port",
                "--domain",
                "--state-dir",
                "--tcp-ports",
                "--cert",
                "--key",
                "--tokens-file",
                "--accept-proxy-protocol-from",
                "--metrics-addr",
                "--no-access-log",
            ],
        ),
        (
            &["forward", "--help"],
            &[
                "--unencrypted",
                "--h2",
                "--to",
                "--proxy-protocol",
                "--metrics-addr",
                "1 to 65535",
            ],
        ),
    ];
    for (args, mentions) in cases {
        let finished = run(portferry(args));
        assert!(finished.status.success(), "{args:?}: {}", finished.stderr);
        for flag in mentions {
            assert!(
                finished.stdout.contains(flag),
                "{args:?} does not mention {flag}:\n{}",
                finished.stdout
            );
        }
    }
}

// ───────────────────────────── relay, forward and demo ─────────────────────────────

/// A `portferry relay` on ephemeral loopback ports, and the environment it printed.
struct CliRelay {
    process: Running,
    relay: String,
    agent_port: u16,
    token: String,
    ca: PathBuf,
    state: TempDir,
    /// The environment lines, exactly as printed.
    printed: Vec<String>,
}

fn start_cli_relay() -> CliRelay {
    start_cli_relay_with(&[])
}

/// A `portferry relay` on loopback ports of its own, with `more` flags.
fn start_cli_relay_with(more: &[&str]) -> CliRelay {
    start_cli_relay_in(TempDir::new("cli"), &common::on_free_ports(more))
}

/// A `portferry relay` with `args`, keeping its state in `state`.
fn start_cli_relay_in(state: TempDir, args: &[&str]) -> CliRelay {
    let mut command = portferry([
        "relay".as_ref(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
    ]);
    command.args(args);
    start_cli_relay_as(command, state)
}

/// The relay `command` runs, keeping its state in `state`.
fn start_cli_relay_as(command: Command, state: TempDir) -> CliRelay {
    let mut process = Running::spawn(command);
    let lines = process.lines_starting_with(&[
        "PORTFERRY_RELAY=",
        "PORTFERRY_TOKEN=",
        "PORTFERRY_RELAY_CA=",
        "export PORTFERRY_",
    ]);
    let value = |line: &str| line.split_once('=').unwrap().1.trim().to_owned();
    let relay = value(&lines[0]);
    let (host, port) = relay
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("PORTFERRY_RELAY is not host:port: {relay}"));
    assert_eq!(host, "localhost", "{relay}");
    let agent_port: u16 = port.parse().unwrap();
    assert_ne!(
        agent_port, 0,
        "the relay printed the requested port 0, not the bound one"
    );
    CliRelay {
        process,
        relay: relay.clone(),
        agent_port,
        token: value(&lines[1]),
        ca: PathBuf::from(value(&lines[2])),
        state,
        printed: lines.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_prints_a_working_agent_environment() {
    let relay = start_cli_relay();
    assert!(!relay.token.is_empty() && !relay.token.contains(' '));
    assert!(relay.ca.is_file(), "{} is not a file", relay.ca.display());
    assert!(
        relay.ca.starts_with(relay.state.path()),
        "the CA is not in the state directory"
    );
    let connect = TcpStream::connect((Ipv4Addr::LOCALHOST, relay.agent_port));
    tokio::time::timeout(STEP, connect)
        .await
        .unwrap()
        .expect("nothing listens on the printed agent port");

    // The printed values are exactly what an agent needs.
    let mut config = portferry::AgentConfig::new(
        relay.relay.clone(),
        portferry::token::Token::new(relay.token.clone()),
    );
    config.relay_ca = Some(relay.ca.clone());
    let agent = tokio::time::timeout(STEP, portferry::Agent::connect(config))
        .await
        .unwrap()
        .expect("an agent connects with the printed environment");
    let service = http_service("through the CLI relay").await;
    let tunnel = tokio::time::timeout(STEP, agent.forward(service.port()))
        .await
        .unwrap()
        .unwrap();
    let (host, port, _) = split_url(&tunnel.url());
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("through the CLI relay"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_command_exposes_a_local_port() {
    let relay = start_cli_relay();
    let service = http_service("through portferry forward").await;
    let mut command = portferry(["forward".to_owned(), service.port().to_string()]);
    command
        .env("PORTFERRY_RELAY", &relay.relay)
        .env("PORTFERRY_TOKEN", &relay.token)
        .env("PORTFERRY_RELAY_CA", &relay.ca);
    let mut forward = Running::spawn(command);
    let lines = forward.lines_starting_with(&["url:", "tls socket:"]);
    let url = lines[0].trim_start_matches("url:").trim().to_owned();
    let (host, port, _) = split_url(&url);
    let tls_socket = lines[1].trim_start_matches("tls socket:").trim();
    assert_eq!(tls_socket, format!("{host}:{port}"));
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("through portferry forward"),
        "{response}"
    );
}

/// A local service that answers every request with the first line it received (for a
/// tunnel with `proxy=v1`: the PROXY header).
async fn first_line_service() -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                let Ok(Ok(Some(first))) = tokio::time::timeout(STEP, lines.next_line()).await
                else {
                    return;
                };
                // The rest of the request head, up to its empty line.
                while let Ok(Ok(Some(line))) = tokio::time::timeout(STEP, lines.next_line()).await {
                    if line.is_empty() {
                        break;
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
                    first.len()
                );
                let _ = write.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_names_the_client_to_the_service_and_the_relay_logs_each_connection() {
    let relay = start_cli_relay();
    let service = first_line_service().await;
    let mut forward = relay.forward(None, &[&format!("{service},proxy=v1")]);
    let (_, url) = next_tunnel(&mut forward);
    let (host, port, _) = split_url(&url);
    let response = https_get(&relay.ca, &host, port, "/").await;
    let header = response.rsplit("\r\n\r\n").next().unwrap();
    let fields: Vec<&str> = header.split(' ').collect();
    assert_eq!(
        &fields[..4],
        ["PROXY", "TCP4", "127.0.0.1", "127.0.0.1"],
        "{response}"
    );
    assert_eq!(fields[5], port.to_string(), "{response}");

    // The relay's access log has the connection: the client's port as the service saw
    // it, the tunnel's label cut short, the bytes, and a clean end.
    let label = host.split('.').next().unwrap();
    let client = format!("client=127.0.0.1:{}", fields[4]);
    let log = relay.process.stderr_when(|log| log.contains(&client));
    let line = log
        .lines()
        .find(|line| line.contains(&client))
        .unwrap_or_else(|| panic!("no access-log line with {client}:\n{log}"));
    assert!(line.contains("portferry::access"), "{line}");
    assert!(line.contains(&format!("tunnel={}", &label[..8])), "{line}");
    assert!(
        !line.contains(label),
        "the whole label is in the log: {line}"
    );
    assert!(
        line.contains("edge=\"tls\"") || line.contains("edge=tls"),
        "{line}"
    );
    assert!(
        line.contains(&format!("to_client={} ", response.len())),
        "{line}"
    );
    assert!(!line.contains("from_client=0 "), "{line}");
    // The client read its response and dropped the connection without close_notify.
    assert!(line.contains("ended=client_closed"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_access_log_means_no_access_log() {
    let relay = start_cli_relay_with(&["--no-access-log"]);
    let service = http_service("unlogged").await;
    let mut forward = relay.forward(None, &[&service.port().to_string()]);
    let (_, url) = next_tunnel(&mut forward);
    let (host, port, _) = split_url(&url);
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("unlogged"), "{response}");
    // Given as long to appear as the line of the test above.
    let log = relay
        .process
        .stderr_when(|log| log.contains("portferry::access"));
    assert!(!log.contains("portferry::access"), "{log}");
}

/// The next tunnel `portferry forward` prints: its local port and its URL.
fn next_tunnel(forward: &mut Running) -> (u16, String) {
    let lines = forward.lines_starting_with(&["port:", "url:"]);
    let port = lines[0].trim_start_matches("port:").trim().parse().unwrap();
    (port, lines[1].trim_start_matches("url:").trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_command_exposes_several_ports_over_one_link() {
    let relay = start_cli_relay();
    let (first, second) = (http_service("first").await, http_service("second").await);
    let mut forward = relay.forward(
        None,
        &[&first.port().to_string(), &format!("{},h2", second.port())],
    );
    let tunnels = [next_tunnel(&mut forward), next_tunnel(&mut forward)];
    forward.lines_starting_with(&["forwarding"]);
    assert_eq!(
        tunnels.each_ref().map(|(port, _)| *port),
        [first.port(), second.port()]
    );
    assert_ne!(tunnels[0].1, tunnels[1].1);
    // The first is served over HTTP/1.1 as before; the second offers h2 (and still
    // http/1.1, which this client asks for).
    for ((_, url), body) in tunnels.iter().zip(["first", "second"]) {
        let (host, port, _) = split_url(url);
        let response = https_get(&relay.ca, &host, port, "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with(body), "{url}: {response}");
    }
    let h2_host = split_url(&tunnels[1].1).0;
    let roots = portferry::tls::load_ca_roots(&relay.ca).unwrap();
    let connector = TlsConnector::from(portferry::tls::client_config(roots, &[&b"h2"[..]]));
    let port = split_url(&tunnels[1].1).1;
    let tls = tokio::time::timeout(
        STEP,
        tls_connect(&connector, (Ipv4Addr::LOCALHOST, port), &h2_host),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_fails_fails_forward_naming_it_and_closes_the_others() {
    // One lease per token: the second port is refused while the first holds it.
    let relay = start_cli_relay_with(&["--max-leases-per-token", "1"]);
    let (first, second) = (http_service("first").await, http_service("second").await);
    let mut forward = relay.forward(
        None,
        &[&first.port().to_string(), &second.port().to_string()],
    );
    assert_eq!(next_tunnel(&mut forward).0, first.port());
    let status = forward.exits_within(STEP).await;
    assert_eq!(status.code(), Some(1), "{}", forward.stderr());
    let stderr = forward.stderr_when(|text| text.contains("caused by"));
    assert!(
        stderr.contains(&format!("cannot forward port {}", second.port()))
            && stderr.contains("limit"),
        "{stderr}"
    );
    // The first tunnel was closed, not left to a lease kept for a reconnect: its lease
    // is free for the next agent of the token at once.
    let mut again = relay.forward(None, &[&second.port().to_string()]);
    let (port, url) = next_tunnel(&mut again);
    assert_eq!(port, second.port());
    let (host, port, _) = split_url(&url);
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("second"), "{response}");
}

#[test]
fn forward_checks_each_ports_options_before_connecting() {
    for (args, says) in [
        (
            &["forward", "8000", "8001", "--to", "localhost:9000"][..],
            "PORT,to=HOST:PORT",
        ),
        (&["forward", "8000,h2,unencrypted"][..], "port 8000"),
        (
            &["forward", "8000", "8001,h2", "--unencrypted"][..],
            "port 8001",
        ),
        (
            &["forward", "8000,http3"][..],
            "h2, unencrypted, to=HOST:PORT or proxy=v1|v2",
        ),
        (&["forward", "8000,to=nowhere"][..], "HOST:PORT"),
        (&["forward", "8000,proxy=v3"][..], "v1 or v2"),
        (
            &["forward", "8000", "--proxy-protocol", "v0"][..],
            "v1 or v2",
        ),
        (&["forward", "8000", "70000"][..], "1 to 65535"),
    ] {
        let mut command = portferry(args);
        // A relay that would answer nothing: the options fail first.
        command
            .env("PORTFERRY_RELAY", "127.0.0.1:9")
            .env("PORTFERRY_TOKEN", "unused");
        let finished = run(command);
        assert!(!finished.status.success(), "{args:?}");
        assert!(
            finished.stderr.contains(says),
            "{args:?}: {}",
            finished.stderr
        );
        assert!(
            !finished.stderr.contains("127.0.0.1:9"),
            "{args:?} tried the relay: {}",
            finished.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_printed_url() {
    let state = TempDir::new("cli");
    let mut demo = Running::spawn(portferry([
        "demo".as_ref(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
    ]));
    let curl_line = demo.lines_starting_with(&["curl --cacert"]).remove(0);
    let args: Vec<&str> = curl_line.split_whitespace().collect();
    assert_eq!(args.len(), 4, "unexpected curl line: {curl_line}");
    assert_eq!(&args[..2], ["curl", "--cacert"]);
    let (ca, url) = (PathBuf::from(args[2]), args[3]);
    assert!(ca.is_file(), "{} is not a file", ca.display());

    let (host, port, path) = split_url(url);
    assert!(
        host.ends_with(&format!(".{}", portferry::relay::LOCAL_DOMAIN)),
        "{host}"
    );
    let response = https_get(&ca, &host, port, &path).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("Hello from portferry"), "{response}");

    // The printed command itself, where curl is installed.
    if have("curl") {
        let mut curl = Command::new(args[0]);
        curl.args(&args[1..]).stdin(Stdio::null());
        let finished = tokio::task::spawn_blocking(move || run(curl))
            .await
            .unwrap();
        assert!(
            finished.status.success(),
            "{curl_line}\nfailed: {}",
            finished.stderr
        );
        assert!(
            finished.stdout.contains("Hello from portferry"),
            "{}",
            finished.stdout
        );
    } else {
        eprintln!("curl is not installed: skipping the printed curl command");
    }
}

// ───────────────────────────── forward's life: signals, giving up ─────────────────────────────

impl CliRelay {
    /// `portferry forward <args>` with this relay's environment (its agent endpoint
    /// replaced by `relay`, if given).
    fn forward(&self, relay: Option<&str>, args: &[&str]) -> Running {
        let mut command = portferry(["forward"]);
        command
            .args(args)
            .env("PORTFERRY_RELAY", relay.unwrap_or(&self.relay))
            .env("PORTFERRY_TOKEN", &self.token)
            .env("PORTFERRY_RELAY_CA", &self.ca);
        Running::spawn(command)
    }
}

impl Running {
    /// Sends `signal` (`INT`, `TERM`) to the process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.0.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits, at most `limit`, for the process to exit; its status.
    async fn exits_within(&mut self, limit: Duration) -> ExitStatus {
        self.child.exit_status(limit).await
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The stderr read so far, once `ready` holds for it or [`STEP`] has passed (it is
    /// read on a thread of its own, so it can lag behind stdout).
    fn stderr_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let stderr = self.stderr();
            if ready(&stderr) || Instant::now() >= deadline {
                return stderr;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A TCP proxy to `target` that can be frozen: it then stops moving bytes but keeps
/// both sockets open, like a relay that stopped answering.
struct FreezingProxy {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    async fn start(target: u16) -> FreezingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = frozen.clone();
        let port = common::proxy(target, move |mut from, mut to| {
            let frozen = flag.clone();
            async move {
                let mut buf = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = from.read(&mut buf).await {
                    if frozen.load(Ordering::SeqCst) {
                        // Hold both sockets open, move nothing.
                        return std::future::pending::<()>().await;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        })
        .await
        .port;
        FreezingProxy { port, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A `portferry forward` of an HTTP service through a proxy that is then frozen.
async fn forward_through_a_frozen_relay(relay: &CliRelay) -> (Running, FreezingProxy) {
    let proxy = FreezingProxy::start(relay.agent_port).await;
    let service = http_service("frozen").await;
    let mut forward = relay.forward(
        Some(&format!("localhost:{}", proxy.port)),
        &[&service.port().to_string()],
    );
    forward.lines_starting_with(&["url:"]);
    proxy.freeze();
    (forward, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_with_an_unresponsive_relay_exits_promptly() {
    let relay = start_cli_relay();
    let (mut forward, _proxy) = forward_through_a_frozen_relay(&relay).await;
    forward.signal("INT");
    // The relay never confirms the close: the wait for it is bounded (2 s), well
    // below the request timeout (10 s) it used to take.
    let status = forward.exits_within(Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0), "{}", forward.stderr());
    assert!(
        forward.stderr().contains("did not confirm the close"),
        "{}",
        forward.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_exits_at_once() {
    let relay = start_cli_relay();
    let (mut forward, _proxy) = forward_through_a_frozen_relay(&relay).await;
    forward.signal("INT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    forward.signal("INT");
    // 130 is the exit at once; waiting out the close would exit with 0.
    let status = forward.exits_within(STEP).await;
    assert_eq!(status.code(), Some(130), "{}", forward.stderr());
    assert!(
        forward.stderr().contains("exiting at once"),
        "{}",
        forward.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_tunnel_and_exits_zero() {
    let relay = start_cli_relay();
    let service = http_service("term").await;
    let mut forward = relay.forward(None, &[&service.port().to_string()]);
    forward.lines_starting_with(&["url:"]);
    forward.signal("TERM");
    let status = forward.exits_within(STEP).await;
    assert_eq!(status.code(), Some(0), "killed by the signal? {status:?}");
    let stderr = forward.stderr();
    assert!(stderr.contains("closing the tunnel"), "{stderr}");
    assert!(
        !stderr.contains("did not confirm") && !stderr.contains("could not close"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_refused_at_a_relay_limit_waits_and_gets_its_tunnel_later() {
    let relay = start_cli_relay_with(&["--max-agent-sessions", "1"]);
    let service = http_service("patient").await;
    let port = service.port().to_string();
    let mut first = relay.forward(None, &[&port]);
    first.lines_starting_with(&["url:"]);
    // The relay serves its one session: the second is refused, says so, and waits.
    let mut second = relay.forward(None, &[&port]);
    let stderr = second.stderr_when(|e| e.contains("trying again"));
    assert!(stderr.contains("max_agent_sessions"), "{stderr}");
    assert!(second.child.0.try_wait().unwrap().is_none(), "{stderr}");
    // Once the first leaves, the second gets its tunnel.
    first.signal("TERM");
    assert_eq!(first.exits_within(STEP).await.code(), Some(0));
    let url = second.lines_starting_with(&["url:"]).remove(0);
    let (host, port, _) = split_url(url.trim_start_matches("url:").trim());
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("patient"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_short_of_file_descriptors_still_serves_agents_and_clients() {
    // 256 open files, and a flood of 300 silent connections to the public port: its
    // pools fit the limit, so the flood holds a few and the rest are closed at once.
    let state = TempDir::new("cli");
    let public = common::free_port();
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(portferry::<[&str; 0], &str>([]).get_program())
        .args(["relay", "--state-dir"])
        .arg(state.path())
        .args(["--agent-addr", "127.0.0.1:0", "--handshake-timeout", "60"])
        .arg("--public-addr")
        .arg(format!("127.0.0.1:{public}"))
        .env_remove("RUST_LOG")
        .env_remove("PORTFERRY_TOKENS");
    let relay = start_cli_relay_as(command, state);
    let stderr = relay.process.stderr_when(|e| e.contains("open-file limit"));
    assert!(stderr.contains("open_files=256"), "{stderr}");
    let flooder: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut silent = Vec::new();
    for _ in 0..300 {
        let to = std::net::SocketAddr::new(Ipv4Addr::LOCALHOST.into(), public);
        let tcp = tokio::time::timeout(STEP, common::connect_from(flooder, to));
        silent.push(tcp.await.unwrap().unwrap());
    }
    // An agent still connects and gets a URL, and a client still gets the page.
    let service = http_service("enough files").await;
    let mut forward = relay.forward(None, &[&service.port().to_string()]);
    let url = forward.lines_starting_with(&["url:"]).remove(0);
    let (host, port, _) = split_url(url.trim_start_matches("url:").trim());
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("enough files"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_exits_non_zero_when_the_relay_refuses_it_on_reconnect() {
    let CliRelay {
        process,
        relay,
        agent_port,
        token,
        ca,
        state,
        ..
    } = start_cli_relay();
    let service = http_service("refused later").await;
    let mut command = portferry(["forward".to_owned(), service.port().to_string()]);
    command
        .env("PORTFERRY_RELAY", &relay)
        .env("PORTFERRY_TOKEN", &token)
        .env("PORTFERRY_RELAY_CA", &ca);
    let mut forward = Running::spawn(command);
    forward.lines_starting_with(&["url:"]);

    // The relay restarts on the same port and CA, but no longer accepts the token.
    drop(process);
    let mut again = portferry([
        "relay".as_ref(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
    ]);
    again
        .arg("--agent-addr")
        .arg(format!("127.0.0.1:{agent_port}"))
        .args(["--public-addr", "127.0.0.1:0", "--tokens", "another-token"]);
    let mut _again = Running::spawn(again);
    _again.lines_starting_with(&["PORTFERRY_RELAY="]);

    let status = forward.exits_within(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", forward.stderr());
    assert!(
        forward.stderr().contains("PORTFERRY_TOKEN"),
        "{}",
        forward.stderr()
    );
}

// ───────────────────────────── what the relay prints, and what it means ─────────────────────────────

/// The relay's environment lines, pasted into a shell as they are, configure the
/// `portferry forward` run after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_environment_pasted_into_a_shell_configures_forward() {
    let relay = start_cli_relay();
    let service = http_service("pasted").await;
    let script = format!(
        "{}\nexec \"$0\" forward {}\n",
        relay.printed.join("\n"),
        service.port()
    );
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_portferry"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTFERRY_") {
            shell.env_remove(name);
        }
    }
    shell.stdin(Stdio::null());
    let mut forward = Running::spawn(shell);
    let url = forward.lines_starting_with(&["url:"]).remove(0);
    let (host, port, _) = split_url(url.trim_start_matches("url:").trim());
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("pasted"), "{response}");
}

/// The printed raw TCP host resolves with the system resolver (getaddrinfo, as nc, ssh
/// and Python use), and the socket echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_tcp_socket_resolves_with_getaddrinfo() {
    use std::io::Write;
    use std::net::ToSocketAddrs;
    let relay = start_cli_relay();
    let echo = common::echo_service().await;
    let mut forward = relay.forward(None, &[&echo.port().to_string(), "--unencrypted"]);
    let line = forward.lines_starting_with(&["tcp socket:"]).remove(0);
    let socket = line.trim_start_matches("tcp socket:").trim().to_owned();
    let echoed = tokio::task::spawn_blocking(move || {
        let addrs: Vec<_> = socket
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("{socket} does not resolve: {e}"))
            .collect();
        let mut stream = addrs
            .iter()
            .find_map(|addr| std::net::TcpStream::connect_timeout(addr, STEP).ok())
            .unwrap_or_else(|| panic!("nothing answers at {socket} ({addrs:?})"));
        stream.set_read_timeout(Some(STEP)).unwrap();
        stream.write_all(b"ping\n").unwrap();
        let mut echoed = [0; 5];
        std::io::Read::read_exact(&mut stream, &mut echoed).unwrap();
        echoed
    })
    .await
    .unwrap();
    assert_eq!(&echoed, b"ping\n");
}

// ───────────────────────────── messages ─────────────────────────────

#[test]
fn errors_carry_no_backtrace_and_no_repeated_causes() {
    let mut command = portferry(["forward", "8000"]);
    command
        .env("RUST_BACKTRACE", "1")
        .env("PORTFERRY_RELAY", "localhost:9")
        .env("PORTFERRY_TOKEN", "t")
        .env("PORTFERRY_RELAY_CA", "/nonexistent/ca.pem");
    let finished = run(command);
    assert!(!finished.status.success());
    let stderr = finished.stderr;
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(stderr.matches("/nonexistent/ca.pem").count(), 1, "{stderr}");

    let mut usage = portferry(["forward", "80x"]);
    usage.env("RUST_BACKTRACE", "1");
    let usage = run(usage);
    assert!(!usage.status.success());
    assert!(
        !usage.stderr.to_lowercase().contains("backtrace"),
        "{}",
        usage.stderr
    );

    let mut missing = portferry(["forward", "8000"]);
    missing.env("RUST_BACKTRACE", "1");
    let missing = run(missing);
    assert!(
        !missing.stderr.to_lowercase().contains("backtrace"),
        "{}",
        missing.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_have_no_colour_codes() {
    let relay = start_cli_relay();
    let service = http_service("plain").await;
    let mut forward = relay.forward(None, &[&service.port().to_string(), "-v"]);
    forward.lines_starting_with(&["url:"]);
    let relay_log = relay
        .process
        .stderr_when(|log| log.contains("relay listening"));
    assert!(relay_log.contains("relay listening"), "{relay_log}");
    assert!(!relay_log.contains('\u{1b}'), "{relay_log:?}");
    let forward_log = forward.stderr_when(|log| log.ends_with('\n'));
    assert!(!forward_log.is_empty());
    assert!(!forward_log.contains('\u{1b}'), "{forward_log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_to_a_host_name_is_accepted() {
    let relay = start_cli_relay();
    let service = http_service("by name").await;
    let to = format!("localhost:{}", service.port());
    let mut forward = relay.forward(None, &["8000", "--to", &to]);
    let url = forward.lines_starting_with(&["url:"]).remove(0);
    let (host, port, _) = split_url(url.trim_start_matches("url:").trim());
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("by name"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_the_public_port_is_told_so() {
    let public = common::free_port();
    let relay = start_cli_relay_in(
        TempDir::new("cli"),
        &[
            "--agent-addr",
            "127.0.0.1:0",
            "--public-addr",
            &format!("127.0.0.1:{public}"),
        ],
    );
    let mut forward = relay.forward(Some(&format!("localhost:{public}")), &["8000"]);
    let status = forward.exits_within(STEP).await;
    assert!(!status.success());
    let stderr = forward.stderr();
    assert!(stderr.contains("agent endpoint"), "{stderr}");
    assert!(!stderr.contains("PORTFERRY_RELAY_CA"), "{stderr}");
}

/// A service that is not running: the client's connections are refused, and the agent
/// says so at warn, naming the addresses it tried, once for several attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_local_service_is_logged_once_with_its_address() {
    let relay = start_cli_relay();
    let port = common::free_port();
    let mut forward = relay.forward(None, &[&port.to_string()]);
    let url = forward.lines_starting_with(&["url:"]).remove(0);
    let (host, public_port, _) = split_url(url.trim_start_matches("url:").trim());
    let roots = portferry::tls::load_ca_roots(&relay.ca).unwrap();
    let connector = TlsConnector::from(portferry::tls::client_config(roots, HTTP1));
    for _ in 0..3 {
        let attempt = async {
            let tls = tls_connect(&connector, (Ipv4Addr::LOCALHOST, public_port), &host).await?;
            http_get_raw(tls, &host, "/").await
        };
        let got = tokio::time::timeout(STEP, attempt).await.expect("hung");
        assert!(got.as_ref().map_or(true, String::is_empty), "{got:?}");
    }
    let deadline = Instant::now() + STEP;
    let warnings = loop {
        let stderr = forward.stderr();
        let warnings: Vec<String> = stderr
            .lines()
            .filter(|line| line.contains("WARN") && line.contains("cannot reach the local service"))
            .map(str::to_owned)
            .collect();
        if !warnings.is_empty() || Instant::now() > deadline {
            break warnings;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!("127.0.0.1:{port}")),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].contains(&format!("[::1]:{port}")),
        "{}",
        warnings[0]
    );
}

#[test]
fn a_relay_port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = TempDir::new("cli");
    let finished = run(portferry([
        "relay".as_ref(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
        "--agent-addr".as_ref(),
        addr.as_ref(),
        "--public-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]));
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains(&addr) && finished.stderr.contains("in use"),
        "{}",
        finished.stderr
    );
    assert_eq!(
        finished.stderr.matches("in use").count(),
        1,
        "{}",
        finished.stderr
    );
}

// ───────────────────── stopping mid-transfer across a delayed link ─────────────────────

/// A `portferry forward --unencrypted` of an endless download, its link through a
/// 40 ms round trip, with two clients downloading through its raw TCP socket.
async fn downloads_across_a_delayed_link(relay: &CliRelay) -> Running {
    use tokio::io::AsyncReadExt;
    let service = common::stream_service(u64::MAX).await;
    let line = common::delay_line(relay.agent_port, Duration::from_millis(20))
        .await
        .port;
    let mut forward = relay.forward(
        Some(&format!("localhost:{line}")),
        &[&service.addr.port().to_string(), "--unencrypted"],
    );
    let socket = forward.lines_starting_with(&["tcp socket:"]).remove(0);
    let port: u16 = socket.rsplit_once(':').unwrap().1.parse().unwrap();
    for _ in 0..2 {
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(1..) = client.read(&mut buf).await {}
        });
    }
    // Until data flows and the queues along the link have filled.
    common::eventually(STEP, "the downloads to start", || {
        let service = &service;
        async move {
            service.accepted() == 2
                && (0..2).all(|i| {
                    service
                        .connection(i)
                        .written
                        .load(std::sync::atomic::Ordering::Relaxed)
                        > 4 << 20
                })
        }
    })
    .await;
    forward
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_forward_mid_transfer_across_a_delayed_link_exits() {
    let relay = start_cli_relay();
    let mut forward = downloads_across_a_delayed_link(&relay).await;
    forward.signal("TERM");
    // Its grace is 2 s; a spinning stop never exits at all.
    let status = forward.exits_within(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", forward.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_relay_mid_transfer_across_a_delayed_link_exits() {
    let mut relay = start_cli_relay_with(&["--shutdown-grace", "2"]);
    let _forward = downloads_across_a_delayed_link(&relay).await;
    relay.process.signal("TERM");
    let status = relay.process.exits_within(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}: {}", relay.process.stderr());
}

// ───────────────────────────── metrics ─────────────────────────────

/// `curl -s` of `url`; its output (empty if nothing answered).
fn curl(url: &str) -> String {
    let mut command = Command::new("curl");
    command
        .args(["-s", "--max-time", "5", url])
        .stdin(Stdio::null());
    run(command).stdout
}

/// The value of the sample `name` (as written, labels included) in a `/metrics` body.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (sample, value) = line.rsplit_once(' ')?;
        (sample == name).then(|| value.parse().ok())?
    })
}

#[test]
fn relay_refuses_a_metrics_address_that_is_its_public_port() {
    let state = TempDir::new("cli-metrics");
    let public = format!("127.0.0.1:{}", common::free_port());
    let args = [
        "relay",
        "--state-dir",
        state.path().to_str().unwrap(),
        "--agent-addr",
        "127.0.0.1:0",
        "--public-addr",
        &public,
        "--metrics-addr",
        &public,
    ];
    let stderr = fails_quickly(&args);
    assert!(
        stderr.contains("--metrics-addr") && stderr.contains("--public-addr"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_forward_serve_their_metrics_to_curl() {
    let relay_metrics = format!("127.0.0.1:{}", common::free_port());
    let relay = start_cli_relay_with(&["--metrics-addr", &relay_metrics]);
    let service = http_service("scraped").await;
    let forward_metrics = format!("127.0.0.1:{}", common::free_port());
    let mut command = portferry([
        "forward".to_owned(),
        service.port().to_string(),
        "--metrics-addr".to_owned(),
        forward_metrics.clone(),
    ]);
    command
        .env("PORTFERRY_RELAY", &relay.relay)
        .env("PORTFERRY_TOKEN", &relay.token)
        .env("PORTFERRY_RELAY_CA", &relay.ca);
    let mut forward = Running::spawn(command);
    let (_, url) = next_tunnel(&mut forward);
    let (host, port, _) = split_url(&url);
    let response = https_get(&relay.ca, &host, port, "/").await;
    assert!(response.ends_with("scraped"), "{response}");

    let agent =
        tokio::task::spawn_blocking(move || curl(&format!("http://{forward_metrics}/metrics")))
            .await
            .unwrap();
    for name in [
        "portferry_agent_link_up",
        "portferry_agent_tunnels",
        "portferry_agent_inner_connections_opened_total",
    ] {
        assert_eq!(sample(&agent, name), Some(1.0), "{name} in:\n{agent}");
    }
    let url = format!("http://{relay_metrics}/metrics");
    let scraped = tokio::task::spawn_blocking(move || curl(&url))
        .await
        .unwrap();
    for name in [
        "portferry_agent_sessions",
        r#"portferry_tunnels{kind="tls"}"#,
    ] {
        assert_eq!(sample(&scraped, name), Some(1.0), "{name} in:\n{scraped}");
    }
    assert!(
        !scraped.contains(&host),
        "the metrics name the tunnel's host"
    );
    assert!(
        !scraped.contains(&relay.token),
        "the metrics show the token"
    );
}
