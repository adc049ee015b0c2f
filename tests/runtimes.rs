//! `portferry::forward` (the agent configured from the environment) in several tokio
//! runtimes, as three `#[tokio::test]`s each forwarding, and runtimes made and dropped
//! one after the other: each one's tunnels work, whichever runtime came first.
//!
//! The relay runs on a thread of its own, outliving every test's runtime; the agent's
//! environment points at it.

use std::sync::OnceLock;
use std::time::Duration;

use portferry::agent::{ENV_RELAY, ENV_RELAY_CA, ENV_TOKEN};

mod common;

use common::{http_service, Fixture};

const STEP: Duration = Duration::from_secs(20);

/// The relay, started once for the whole test binary.
fn relay() -> &'static Fixture {
    static RELAY: OnceLock<&'static Fixture> = OnceLock::new();
    RELAY.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let fixture: &'static Fixture = Box::leak(Box::new(Fixture::start(STEP).await));
                tx.send(fixture).unwrap();
                std::future::pending::<()>().await
            })
        });
        let fixture = rx.recv().unwrap();
        std::env::set_var(ENV_RELAY, format!("localhost:{}", fixture.agent_port));
        std::env::set_var(ENV_TOKEN, fixture.token.expose());
        std::env::set_var(ENV_RELAY_CA, &fixture.pki.ca_cert_path);
        fixture
    })
}

/// Forwards a fresh service with `portferry::forward` and fetches it through the URL.
async fn forward_and_fetch(body: &'static str) {
    let relay = relay();
    let service = http_service(body).await;
    let tunnel = tokio::time::timeout(STEP, portferry::forward(service.port()))
        .await
        .expect("forward hung")
        .expect("forward failed");
    let got = tokio::time::timeout(STEP, relay.get(&tunnel))
        .await
        .expect("fetch hung")
        .expect("fetch failed");
    assert!(got.contains(body), "{got}");
    tunnel.close().await.unwrap();
}

#[tokio::test]
async fn forward_works_in_the_first_test_runtime() {
    forward_and_fetch("first").await;
}

#[tokio::test]
async fn forward_works_in_the_second_test_runtime() {
    forward_and_fetch("second").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_works_in_the_third_test_runtime() {
    forward_and_fetch("third").await;
}

/// The deterministic case: each runtime is gone before the next one forwards.
#[test]
fn forward_works_in_runtimes_made_one_after_another() {
    for body in ["one", "two", "three"] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(forward_and_fetch(body));
    }
}
