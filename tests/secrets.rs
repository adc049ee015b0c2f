//! Agent tokens never show up in what the programs print, at the most verbose level.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::{Child, TempDir};

/// Runs `portferry` with the most verbose logging, stdout and stderr into one file.
fn portferry(args: &[&str], envs: &[(&str, &str)], output: &Path) -> Child {
    let log = std::fs::File::create(output).unwrap();
    let mut command = common::portferry(["-vv"]);
    command
        .args(args)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    for (name, value) in envs {
        command.env(name, value);
    }
    Child(command.spawn().unwrap())
}

/// Waits (at most 30 s) until `file` has a line starting with `prefix`; returns it.
fn wait_for_line(file: &Path, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|line| line.trim_start().starts_with(prefix))
        {
            return line.trim().to_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {prefix:?} in {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tokens_never_appear_in_logs() {
    let dir = TempDir::new("secrets");
    std::fs::create_dir_all(dir.path()).unwrap();
    let state = dir.path().join("state");
    let token = format!("tok{:016x}", std::process::id() as u64 * 7919 + 12345);
    let wrong = format!("bad{:016x}", std::process::id() as u64 * 104_729 + 7);

    let relay_log = dir.path().join("relay.log");
    let state_arg = state.to_str().unwrap();
    let _relay = portferry(
        &[
            "relay",
            "--agent-addr",
            "127.0.0.1:0",
            "--public-addr",
            "127.0.0.1:0",
            "--state-dir",
            state_arg,
        ],
        &[("PORTFERRY_TOKENS", &token)],
        &relay_log,
    );
    let relay_env = wait_for_line(&relay_log, "PORTFERRY_RELAY=");
    let relay = relay_env.trim_start_matches("PORTFERRY_RELAY=").to_owned();
    let ca = state.join("ca.pem");
    let ca = ca.to_str().unwrap();

    // A local service for the agent to forward.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port().to_string();

    let agent_log = dir.path().join("agent.log");
    let _agent = portferry(
        &["forward", &port],
        &[
            ("PORTFERRY_RELAY", &relay),
            ("PORTFERRY_TOKEN", &token),
            ("PORTFERRY_RELAY_CA", ca),
        ],
        &agent_log,
    );
    wait_for_line(&agent_log, "url:");

    // An agent with a wrong token is refused; its token must not be echoed either.
    let refused_log = dir.path().join("refused.log");
    let mut refused = portferry(
        &["forward", &port],
        &[
            ("PORTFERRY_RELAY", &relay),
            ("PORTFERRY_TOKEN", &wrong),
            ("PORTFERRY_RELAY_CA", ca),
        ],
        &refused_log,
    );
    let start = Instant::now();
    while refused.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the refused agent never exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_line(&refused_log, "error:");

    for (log, secrets) in [
        (&relay_log, vec![&token, &wrong]),
        (&agent_log, vec![&token]),
        (&refused_log, vec![&wrong]),
    ] {
        let mut text = String::new();
        std::fs::File::open(log)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(
            !text.is_empty(),
            "{} is empty: the check would prove nothing",
            log.display()
        );
        for secret in secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a token appears in {}:\n{text}",
                log.display()
            );
        }
    }
}
