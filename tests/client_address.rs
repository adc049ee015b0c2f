//! Who is calling: the public client's address reaches the agent with every
//! connection (`TunnelStream::peer_addr`, `info`), and, when a tunnel asks for it, the
//! local service as a PROXY protocol header (v1 or v2) before the client's bytes.
//! Real loopback sockets and TLS; clients from 127.0.0.2 and [::1], so that the address
//! seen is the client's own and not one the relay could have made up.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portferry::agent::{ForwardOptions, ProxyProtocol};
use portferry::{Edge, TunnelStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

mod common;

use common::{connect_from, tls_connect_from, Fixture, HTTP1};

/// Upper bound for any single step of a test.
const STEP: Duration = Duration::from_secs(10);

/// A loopback address other than 127.0.0.1, so that the client's address is its own.
const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// What a served connection tells its client about itself: one line.
fn describe(stream: &TunnelStream) -> String {
    let info = stream.info();
    let edge = match info.edge() {
        Edge::Tls { server_name, alpn } => format!(
            "tls {server_name} {}",
            String::from_utf8_lossy(alpn.as_deref().unwrap_or(b"-"))
        ),
        _ => "tcp".to_owned(),
    };
    format!(
        "{} {} {} {edge}\n",
        stream.peer_addr(),
        stream.local_addr(),
        info.id()
    )
}

/// Reads everything `stream` sends until it closes, within [`STEP`].
async fn read_all(mut stream: impl AsyncRead + Unpin) -> io::Result<String> {
    let mut text = String::new();
    timeout(STEP, stream.read_to_string(&mut text))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_stream_knows_its_client_over_tls_and_raw_tcp_ipv4_and_ipv6() {
    // The raw TCP ports on IPv6 loopback; the TLS port on IPv4.
    let fx = Fixture::start_with(STEP, |config| {
        config.tcp_bind = IpAddr::V6(Ipv6Addr::LOCALHOST);
    })
    .await;
    let agent = fx.agent().await;
    let options = ForwardOptions::new().unencrypted(true);
    let mut listener = timeout(STEP, agent.listen(options)).await.unwrap().unwrap();
    let (host, _) = listener.tunnel().tls_socket();
    let (_, tcp_port) = listener.tunnel().tcp_socket().unwrap();
    let server = tokio::spawn(async move {
        while let Ok(mut stream) = listener.accept().await {
            let line = describe(&stream);
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });

    let connector = fx.connector(HTTP1);
    let tls = tls_connect_from(&connector, CLIENT_V4, fx.public, &host);
    let tls = timeout(STEP, tls).await.unwrap().unwrap();
    let client_v4 = tls.get_ref().0.local_addr().unwrap();
    let seen_tls = read_all(tls).await.unwrap();

    let tcp = TcpStream::connect((Ipv6Addr::LOCALHOST, tcp_port))
        .await
        .unwrap();
    let client_v6 = tcp.local_addr().unwrap();
    let seen_tcp = read_all(tcp).await.unwrap();
    server.abort();

    let tls_fields: Vec<&str> = seen_tls.split_whitespace().collect();
    let tcp_fields: Vec<&str> = seen_tcp.split_whitespace().collect();
    assert_eq!(tls_fields[0], client_v4.to_string(), "{seen_tls}");
    assert_eq!(tls_fields[1], fx.public.to_string(), "{seen_tls}");
    assert_eq!(&tls_fields[3..], ["tls", host.as_str(), "http/1.1"]);
    assert_eq!(tcp_fields[0], client_v6.to_string(), "{seen_tcp}");
    assert_eq!(
        tcp_fields[1],
        SocketAddr::from((Ipv6Addr::LOCALHOST, tcp_port)).to_string()
    );
    assert_eq!(tcp_fields[3], "tcp");
    assert_ne!(tls_fields[2], tcp_fields[2], "connection ids repeat");
}

/// A local service that reads a PROXY protocol header off each connection, then
/// answers with the client address the header names and the bytes that came after it.
async fn proxy_reader() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_with_header(stream));
        }
    });
    addr
}

/// Reads the header (and the client's bytes after it, until the client's FIN) and
/// writes back `<source address> <tlvs> | <the client's bytes>`.
async fn answer_with_header(mut stream: TcpStream) {
    let mut bytes = Vec::new();
    if timeout(STEP, stream.read_to_end(&mut bytes)).await.is_err() {
        return;
    }
    let answer = match ppp::HeaderResult::parse(&bytes) {
        ppp::HeaderResult::V1(Ok(header)) => {
            let rest = &bytes[header.header.len()..];
            let source = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
                ppp::v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
                ppp::v1::Addresses::Unknown => return,
            };
            format!("{source} - | {}", String::from_utf8_lossy(rest))
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let rest = &bytes[header.len()..];
            let source = match header.addresses {
                ppp::v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
                ppp::v2::Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
                _ => return,
            };
            let tlvs: Vec<String> = header
                .tlvs()
                .filter_map(Result::ok)
                .map(|tlv| format!("{}={}", tlv.kind, String::from_utf8_lossy(&tlv.value)))
                .collect();
            format!(
                "{source} {} | {}",
                tlvs.join(","),
                String::from_utf8_lossy(rest)
            )
        }
        _ => format!("no header | {}", String::from_utf8_lossy(&bytes)),
    };
    let _ = stream.write_all(answer.as_bytes()).await;
}

/// Sends `message` on `stream`, ends its write side, and reads the answer.
async fn ask(mut stream: impl AsyncRead + AsyncWrite + Unpin, message: &[u8]) -> String {
    stream.write_all(message).await.unwrap();
    stream.shutdown().await.unwrap();
    read_all(stream).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_gets_a_proxy_header_first_in_v1_and_v2_and_nothing_by_default() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let service = proxy_reader().await;
    for version in [Some(ProxyProtocol::V1), Some(ProxyProtocol::V2), None] {
        let options = ForwardOptions::new()
            .unencrypted(true)
            .local_addr(service)
            .proxy_protocol(version);
        let tunnel = timeout(STEP, agent.forward_with(service.port(), options))
            .await
            .unwrap()
            .unwrap();
        let (host, _) = tunnel.tls_socket();

        let connector = fx.connector(HTTP1);
        let tls = tls_connect_from(&connector, CLIENT_V4, fx.public, &host);
        let tls = timeout(STEP, tls).await.unwrap().unwrap();
        let client = tls.get_ref().0.local_addr().unwrap();
        let answer = ask(tls, b"hello over tls").await;
        let expected = match version {
            Some(ProxyProtocol::V1) => format!("{client} - | hello over tls"),
            // ALPN (1), AUTHORITY (2) and UNIQUE_ID (5, 8 binary bytes).
            Some(_) => {
                let prefix = format!("{client} 1=http/1.1,2={host},5=");
                assert!(answer.starts_with(&prefix), "{answer:?}");
                assert!(answer.ends_with(" | hello over tls"), "{answer:?}");
                answer.clone()
            }
            None => "no header | hello over tls".to_owned(),
        };
        assert_eq!(answer, expected, "{version:?} over TLS");

        let (_, tcp_port) = tunnel.tcp_socket().unwrap();
        let tcp = connect_from(CLIENT_V4, SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_port)));
        let tcp = tcp.await.unwrap();
        let client = tcp.local_addr().unwrap();
        let answer = ask(tcp, b"raw bytes").await;
        let expected = match version {
            Some(ProxyProtocol::V1) => format!("{client} - | raw bytes"),
            Some(_) => {
                let prefix = format!("{client} 5=");
                assert!(answer.starts_with(&prefix), "{answer:?}");
                answer.clone()
            }
            None => "no header | raw bytes".to_owned(),
        };
        assert_eq!(answer, expected, "{version:?} over raw TCP");
        timeout(STEP, tunnel.close()).await.unwrap().unwrap();
    }
}
