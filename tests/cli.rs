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
            ],
        ),
        (
            &["forward", "--help"],
            &["--unencrypted", "--h2", "--to", "1 to 65535"],
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
    _process: Running,
    relay: String,
    agent_port: u16,
    token: String,
    ca: PathBuf,
    state: TempDir,
}

fn start_cli_relay() -> CliRelay {
    let state = TempDir::new("cli");
    let mut process = Running::spawn(portferry([
        "relay".as_ref(),
        "--state-dir".as_ref(),
        state.path().as_os_str(),
        "--agent-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--public-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
    ]));
    let lines = process.lines_starting_with(&[
        "PORTFERRY_RELAY=",
        "PORTFERRY_TOKEN=",
        "PORTFERRY_RELAY_CA=",
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
        _process: process,
        relay: relay.clone(),
        agent_port,
        token: value(&lines[1]),
        ca: PathBuf::from(value(&lines[2])),
        state,
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
    let (host, port, _) = split_url(tunnel.url());
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
