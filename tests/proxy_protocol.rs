//! PROXY protocol to real consumers: a tunnel with `proxy_protocol(V1 | V2)` in front of
//! nginx (`listen … proxy_protocol`) and HAProxy (`bind … accept-proxy`), both from apt
//! (`tests/common/proxies.rs`; in CI a missing one fails the test). Public clients
//! connect from 127.0.0.2, so the address the consumer logs can only have come from the
//! header. The configurations are the README's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use portferry::agent::{Agent, ForwardOptions, ProxyProtocol, Tunnel};
use tokio::time::timeout;

mod common;

use common::proxies::{haproxy, nginx, Binary, Kind, Proxy};
use common::{http_get, http_service, tls_connect_from, Fixture, HTTP1};

/// Upper bound for any single step of a test.
const STEP: Duration = Duration::from_secs(10);

/// The public client's own loopback address.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A tunnel to `service` whose connections start with a `version` header.
async fn tunnel_to(agent: &Agent, service: SocketAddr, version: ProxyProtocol) -> Tunnel {
    let options = ForwardOptions::new()
        .local_addr(service)
        .proxy_protocol(Some(version));
    timeout(STEP, agent.forward_with(service.port(), options))
        .await
        .expect("forward hung")
        .expect("forward failed")
}

/// `GET /` through `tunnel`'s URL from [`CLIENT`]: the client's address and the body.
async fn get_from_client(fx: &Fixture, tunnel: &Tunnel) -> (SocketAddr, String) {
    let host = tunnel.tls_socket().0;
    let connector = fx.connector(HTTP1);
    let tls = timeout(STEP, tls_connect_from(&connector, CLIENT, fx.public, &host))
        .await
        .expect("TLS to the relay hung")
        .expect("TLS to the relay failed");
    let client = tls.get_ref().0.local_addr().unwrap();
    let body = timeout(STEP, http_get(tls, &host)).await.unwrap().unwrap();
    (client, body)
}

/// The nginx `http` server of the README: PROXY protocol on, its client logged.
fn nginx_server(listen: SocketAddr, log: &str) -> String {
    format!(
        "  log_format proxied '$proxy_protocol_addr:$proxy_protocol_port \"$request\" $status';\n\
         \x20 server {{\n\
         \x20   listen {listen} proxy_protocol;\n\
         \x20   access_log {log} proxied;\n\
         \x20   location / {{ return 200 \"hello $proxy_protocol_addr\\n\"; }}\n\
         \x20 }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sees_and_logs_the_tunnels_client_through_v1_and_v2() {
    let Some(binary) = Binary::require(Kind::Nginx) else {
        return;
    };
    let nginx = Proxy::start(&binary, 1, STEP, |setup| {
        nginx::http(
            setup,
            &nginx_server(setup.listen(0), &setup.path("proxied.log")),
        )
    })
    .await;
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let tunnel = tunnel_to(&agent, nginx.addr(0), version).await;
        let (client, body) = get_from_client(&fx, &tunnel).await;
        assert_eq!(body, "hello 127.0.0.2\n", "{version}");
        let logged = format!("{client} \"GET / HTTP/1.1\" 200");
        let log = timeout(STEP, async {
            loop {
                let log = nginx.log("proxied.log");
                if log.contains(&logged) {
                    return log;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{version}: nginx did not log {logged:?}:\n{}", nginx.logs()));
        println!(
            "nginx, {version}: {}",
            log.lines().last().unwrap_or_default()
        );
        timeout(STEP, tunnel.close()).await.unwrap().unwrap();
    }
}

/// The HAProxy frontend of the README: `accept-proxy`, the client and (v2) the TLS
/// server name the header carried logged.
fn haproxy_frontend(listen: SocketAddr, service: SocketAddr) -> String {
    format!(
        "frontend tunnel\n\
         \x20 bind {listen} accept-proxy\n\
         \x20 log-format \"client=%ci:%cp authority=%[fc_pp_authority] %ft %b/%s %B\"\n\
         \x20 default_backend service\n\n{}",
        haproxy::backend("service", service, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_logs_the_tunnels_client_and_server_name_through_v1_and_v2() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let service = http_service("behind haproxy").await;
    let haproxy = Proxy::start(&binary, 1, STEP, |setup| {
        haproxy_frontend(setup.listen(0), service)
    })
    .await;
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let tunnel = tunnel_to(&agent, haproxy.addr(0), version).await;
        let (client, body) = get_from_client(&fx, &tunnel).await;
        assert_eq!(body, "behind haproxy", "{version}");
        // v1 carries addresses only; v2 also the server name the client asked for.
        let authority = match version {
            ProxyProtocol::V1 => "-".to_owned(),
            ProxyProtocol::V2 => tunnel.tls_socket().0,
        };
        let logged = format!("client={client} authority={authority} tunnel service/service");
        let log = haproxy.until_logged(&logged, 1, STEP).await;
        let line = log.lines().find(|line| line.contains(&logged)).unwrap();
        println!("haproxy, {version}: {line}");
        timeout(STEP, tunnel.close()).await.unwrap().unwrap();
    }
}
