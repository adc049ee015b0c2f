//! Real L4 balancers (nginx `stream`, HAProxy `mode tcp`) on loopback in front of
//! loopback services: the proxy harness of `tests/common/proxies.rs` itself.
//!
//! In CI (`CI=true`) a missing nginx or HAProxy fails these tests; elsewhere they are
//! skipped with the reason printed.

mod common;

use std::time::Duration;

use common::proxies::{haproxy, nginx, Binary, Kind, Proxy};
use common::{echo_service, exchange, pseudo_random};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(10);

/// Echoes a message through `proxy`'s first port; panics unless it comes back whole.
async fn echo_through(proxy: &Proxy, seed: u64) {
    let message = pseudo_random(seed, 100_000);
    let tcp = timeout(STEP, TcpStream::connect(proxy.addr(0)))
        .await
        .expect("connecting to the proxy hung")
        .expect("connecting to the proxy failed");
    let back = exchange(STEP, tcp, &message).await.unwrap();
    assert!(
        back == message,
        "{} bytes came back; the proxy logged:\n{}",
        back.len(),
        proxy.logs()
    );
}

#[tokio::test]
async fn nginx_stream_forwards_and_logs_each_session() {
    let Some(binary) = Binary::require(Kind::Nginx) else {
        return;
    };
    let service = echo_service().await;
    let proxy = Proxy::start(&binary, 1, STEP, |setup| {
        let server = format!(
            "  server {{ listen {}; proxy_pass {service}; }}",
            setup.listen(0)
        );
        nginx::stream(setup, &server)
    })
    .await;
    echo_through(&proxy, 1).await;
    echo_through(&proxy, 2).await;
    let log = proxy
        .until_logged(&format!("upstream={service}"), 2, STEP)
        .await;
    assert!(log.contains("received=100000"), "{log}");
}

#[tokio::test]
async fn haproxy_forwards_and_logs_each_session() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let service = echo_service().await;
    let proxy = Proxy::start(&binary, 1, STEP, |setup| {
        format!(
            "frontend echo\n  bind {}\n  default_backend service\n\n{}",
            setup.listen(0),
            haproxy::backend("service", service, "")
        )
    })
    .await;
    echo_through(&proxy, 3).await;
    echo_through(&proxy, 4).await;
    proxy.until_logged("echo service/service", 2, STEP).await;
}
