//! Splices over real loopback sockets and real rustls, with the inner side on two
//! userspace stacks linked in memory: idle timeout (on tokio's paused clock), a client's
//! reset of a stalled connection, and how a TLS client sees the inner side's end.

use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::netstack::{connect_in_memory, Stack, StackConfig};
use crate::tls::{client_config, server_config, ServerIdentity};

/// Bound of every wait that is not itself under test.
const STEP: Duration = Duration::from_secs(20);
/// The inner port the agent side listens on.
const PORT: u16 = 8000;

/// An inner connection from a relay-side stack to an agent-side stack linked in memory:
/// `(relay end, agent end)`.
async fn inner_pair() -> (InnerStream, InnerStream) {
    let relay = Stack::new(StackConfig::relay());
    let agent = Stack::new(StackConfig::agent());
    tokio::spawn(connect_in_memory(relay.clone(), agent.clone()));
    let mut listener = agent.listen(PORT).unwrap();
    let (relay_end, agent_end) = tokio::join!(relay.connect(PORT), listener.accept());
    (relay_end.unwrap(), agent_end.unwrap())
}

/// A connected loopback pair: `(client, the relay's accepted end)`.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, accepted) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    (client.unwrap(), accepted.unwrap().0)
}

/// Waits until the agent end of an inner connection ends, and tells whether it was reset.
async fn inner_was_reset(mut agent_end: InnerStream) -> bool {
    let mut sink = Vec::new();
    timeout(STEP, agent_end.read_to_end(&mut sink))
        .await
        .expect("the inner connection never ended")
        .is_err()
}

#[tokio::test(start_paused = true)]
async fn a_connection_idle_past_the_timeout_is_reset_on_both_sides() {
    let idle = Duration::from_secs(600);
    let (inner, mut agent_end) = inner_pair().await;
    let (mut client, accepted) = tcp_pair().await;
    let splice = tokio::spawn(async move {
        let result =
            splice_tcp_with(&inner, accepted, SpliceOptions::idle_timeout(Some(idle))).await;
        (result, inner)
    });

    // Traffic more often than the timeout keeps the connection for much longer than it.
    for round in 0..12u8 {
        tokio::time::sleep(idle / 2).await;
        client.write_all(&[round]).await.unwrap();
        let mut byte = [0];
        agent_end.read_exact(&mut byte).await.unwrap();
        agent_end.write_all(&byte).await.unwrap();
        client.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte, [round]);
    }

    // The client sends and leaves; the service neither reads nor answers nor closes.
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let (result, _inner) = timeout(idle * 6, splice)
        .await
        .expect("an idle connection was never ended")
        .unwrap();
    assert!(matches!(result, Err(SpliceError::Idle)), "{result:?}");
    // Both sides are told by a reset, not a clean end.
    let mut rest = Vec::new();
    let read = timeout(STEP, client.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(
        read.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset,
        "the client saw a clean end"
    );
    assert!(inner_was_reset(agent_end).await);
}

#[tokio::test(start_paused = true)]
async fn without_an_idle_timeout_a_quiet_connection_stays() {
    let (inner, mut agent_end) = inner_pair().await;
    let (mut client, accepted) = tcp_pair().await;
    let splice = tokio::spawn(async move { splice_tcp(&inner, accepted).await });
    tokio::time::sleep(Duration::from_secs(24 * 60 * 60)).await;
    assert!(!splice.is_finished());
    client.write_all(b"late").await.unwrap();
    let mut late = [0; 4];
    agent_end.read_exact(&mut late).await.unwrap();
    assert_eq!(&late, b"late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_ends_a_stalled_connection_at_once() {
    // The service never reads: the inner send buffer fills, then the kernel's buffers,
    // and the splice stops reading the client.
    let (inner, agent_end) = inner_pair().await;
    let (client, accepted) = tcp_pair().await;
    let splice = tokio::spawn(async move { splice_tcp(&inner, accepted).await });
    let chunk = vec![0x5a; 64 * 1024];
    let mut sent = 0usize;
    loop {
        match client.try_write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // No room for half a second: everything on the way is full.
                if timeout(Duration::from_millis(500), client.writable())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => panic!("write failed after {sent} bytes: {e}"),
        }
        assert!(sent < 1 << 30, "the service's side never filled up");
    }

    client.set_zero_linger().unwrap();
    drop(client);
    let result = timeout(STEP, splice)
        .await
        .expect("a client's reset did not end its stalled connection")
        .unwrap();
    match result {
        Err(SpliceError::Outer(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        other => panic!("{other:?}"),
    }
    assert!(inner_was_reset(agent_end).await);
}

/// A server configuration for `localhost` and a client configuration trusting it.
fn tls_configs() -> (TlsAcceptor, TlsConnector) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let identity = ServerIdentity {
        cert_chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    };
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    (
        TlsAcceptor::from(server_config(&identity, &[]).unwrap()),
        TlsConnector::from(client_config(roots, &[])),
    )
}

/// How the service's side of a [`tls_download`] ends.
#[derive(Clone, Copy)]
enum End {
    /// Aborted (reset) while the client still has data to read.
    Cut,
    /// Closed after the last byte.
    Close,
}

/// The agent side sends up to `len` bytes and ends as `end` says; returns what a TLS client of
/// the splice read and how its read ended.
async fn tls_download(len: usize, end: End) -> (usize, io::Result<usize>) {
    let (acceptor, connector) = tls_configs();
    let (inner, mut agent_end) = inner_pair().await;
    let (client, accepted) = tcp_pair().await;
    tokio::spawn(async move {
        let tls = acceptor.accept(SharedTcp::new(accepted)).await.unwrap();
        let _ = splice_tls(&inner, tls, SpliceOptions::default()).await;
    });
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        match end {
            End::Close => {
                agent_end.write_all(&vec![7; len]).await.unwrap();
                drop(agent_end);
            }
            End::Cut => {
                // The client reads nothing yet, so the writes stop once every buffer on
                // the way is full; the cut then drops data still unsent.
                let data = vec![7; len];
                let _ = timeout(Duration::from_millis(500), agent_end.write_all(&data)).await;
                agent_end.abort();
            }
        }
        let _ = ended_tx.send(());
    });
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, client).await.unwrap();
    if matches!(end, End::Cut) {
        timeout(STEP, ended_rx).await.unwrap().unwrap();
    }
    let mut read = 0;
    let mut buf = vec![0; 64 * 1024];
    let ended = timeout(STEP, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(n) => read += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the TLS download never ended");
    (read, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_inner_connection_is_an_error_for_the_tls_client_never_a_clean_end() {
    // The service's side is cut with data still unsent (an agent that died does the same).
    let len = 64 << 20;
    let (read, ended) = tls_download(len, End::Cut).await;
    assert!(read < len, "nothing was cut");
    assert!(
        ended.is_err(),
        "a transfer cut after {read} of {len} bytes ended cleanly"
    );
    // A clean end is still a clean end: every byte, then close_notify.
    let len = 4 << 20;
    let (read, ended) = tls_download(len, End::Close).await;
    assert_eq!(read, len);
    assert_eq!(ended.unwrap(), 0);
}
