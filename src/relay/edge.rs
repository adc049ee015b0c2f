//! The public edge: TLS connections routed by SNI and raw TCP ports, each admitted
//! within its tunnel's and its agent's limits and spliced into an inner connection to
//! the agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::accept::{admit_client, AcceptErrors, Handshakes};
use super::access::{AccessRecord, Ended};
use super::counters::{Endpoint, Failure};
use super::pool::AddressPlace;
use super::proxied::{self, ClientAddr};
use super::registry::{Acceptor, Route, TcpPort};
use super::session::Unbound;
use super::{Phase, Shared};
use crate::connection::{ConnectionInfo, Edge};
use crate::limit::Limit;
use crate::netstack::InnerStream;
use crate::splice::{splice_tcp_with, splice_tls, SharedTcp, SpliceError};
use crate::wire::Frame;

/// A public connection admitted within its tunnel's and its agent's limits.
pub(super) struct ConnectionPermit {
    /// Counts it in [`RelayStats::public_connections`](super::RelayStats::public_connections)
    /// while the public side lives.
    counted: Counted,
    /// Its places in the limits, handed to the inner connection's flow.
    places: Places,
}

/// A connection's places in its tunnel's and its agent's limits, shared by source
/// address. The relay's stack holds them with the inner flow
/// ([`Stack::connect_holding`]), so a connection counts until its flow is gone,
/// lingering close included: closing connections fast cannot make a session hold more
/// flows than the limits allow. A place taken back for a newcomer from an address that
/// holds fewer ends the connection at once (both sides reset).
///
/// [`Stack::connect_holding`]: crate::netstack::Stack::connect_holding
struct Places {
    relay: AddressPlace,
    tunnel: AddressPlace,
    agent: AddressPlace,
}

impl Places {
    /// Completes once any of the places is taken back.
    fn taken_back(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let relay = self.relay.taken_back();
        let (tunnel, agent) = (self.tunnel.taken_back(), self.agent.taken_back());
        async move {
            tokio::select! {
                () = relay => {}
                () = tunnel => {}
                () = agent => {}
            }
        }
    }
}

/// One public connection in the relay's count.
struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.public_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The access record of a new public connection to the tunnel `hostname` from
    /// `from` to the relay's `reached`, through `edge`, with the next connection id.
    fn access_record(
        &self,
        hostname: &str,
        from: SocketAddr,
        reached: SocketAddr,
        edge: Edge,
    ) -> AccessRecord {
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let info = ConnectionInfo::new(id, from, reached, edge);
        AccessRecord::new(info, hostname)
    }
}

impl Route {
    /// Admits one more public connection from `from`, taking places back from the
    /// address holding the most if it must, or counts a refusal if its address holds
    /// as many as anyone.
    fn admit(&self, shared: &Arc<Shared>, from: IpAddr) -> Option<ConnectionPermit> {
        let from = Some(from);
        let pools = [
            (&shared.connections, Limit::Connections),
            (&self.tunnel_connections, Limit::ConnectionsPerTunnel),
            (&self.agent_connections, Limit::ConnectionsPerAgent),
        ];
        // Checked in all three first, so that no place is taken back from anyone for
        // a connection that another pool then refuses.
        let refused = pools.iter().find(|(pool, _)| !pool.would_admit_from(from));
        let admitted = match refused {
            Some((_, limit)) => Err(*limit),
            None => shared
                .connections
                .admit_from(from)
                .ok_or(Limit::Connections)
                .and_then(|relay| {
                    let tunnel = self.tunnel_connections.admit_from(from);
                    Ok((relay, tunnel.ok_or(Limit::ConnectionsPerTunnel)?))
                })
                .and_then(|(relay, tunnel)| {
                    let agent = self.agent_connections.admit_from(from);
                    Ok((relay, tunnel, agent.ok_or(Limit::ConnectionsPerAgent)?))
                }),
        };
        match admitted {
            Ok((relay, tunnel, agent)) => {
                shared.count_opened();
                Some(ConnectionPermit {
                    counted: Counted(shared.clone()),
                    places: Places {
                        relay,
                        tunnel,
                        agent,
                    },
                })
            }
            Err(limit) => {
                shared.count_refusal(limit);
                None
            }
        }
    }
}

/// How long a public connection may take to send its whole ClientHello before its
/// handshake place is the first to be taken back when the pool is full (it may still
/// finish within [`handshake_timeout`](super::RelayConfig::handshake_timeout) while the
/// pool has room).
pub(super) const CLIENT_HELLO_DEADLINE: Duration = Duration::from_millis(2500);

/// One public TLS connection: route by SNI, finish the TLS handshake, and only then
/// open the inner connection and splice the two. Its handshake place ends it if taken
/// back before then; its connection places, while it is spliced.
pub(super) async fn serve_public(shared: Arc<Shared>, mut tcp: TcpStream, handshake: AddressPlace) {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let pool = Handshakes::Public;
    let Some((client, handshake)) =
        admit_client(&shared, &mut tcp, handshake, pool, deadline).await
    else {
        return;
    };
    let ClientAddr {
        client: from,
        reached,
    } = client;
    let tcp = SharedTcp::new(tcp);
    let transport = tcp.clone();
    let taken_back = handshake.taken_back();
    let started = Instant::now();
    let admitted = tokio::select! {
        admitted = handshake_public(&shared, tcp, &handshake, from.ip(), deadline) => admitted,
        () = taken_back => {
            shared.count_failed_handshake(Endpoint::Public, Failure::Displaced);
            None
        }
    };
    let Some((route, tls, permit)) = admitted else {
        return;
    };
    let seconds = started.elapsed().as_secs_f64();
    shared.counters.tls_handshake.observe(seconds);
    let ConnectionPermit {
        counted: _counted,
        places,
    } = permit;
    let connection = tls.get_ref().1;
    let server_name = connection.server_name().unwrap_or_default().to_owned();
    let hostname = server_name.clone();
    let edge = Edge::Tls {
        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
        server_name,
    };
    let record = shared.access_record(&hostname, from, reached, edge);
    let taken_back = places.taken_back();
    // Nothing reaches the agent before the client has finished its handshake.
    let Ok(mut inner) = shared.connect_inner(&route, places).await else {
        // Refused by the agent (nothing listens on the port).
        return shared.end_connection(record, Ended::Refused);
    };
    drop(handshake);
    let options = shared.config.splice_options().metered(record.meter());
    // Ends with close_notify only after the service's clean end; a reset or an idle
    // connection ends with a RST, so the client never takes a cut response as whole.
    let ended = tokio::select! {
        result = async {
            introduce(&mut inner, &route, record.info()).await?;
            splice_tls(&inner, tls, options).await
        } => Ended::from_splice(&result),
        () = taken_back => {
            inner.abort();
            let _ = transport.get_ref().set_zero_linger();
            Ended::TakenBack
        }
    };
    shared.end_connection(record, ended);
}

/// Tells the agent who `inner`'s client is and how it came, if the agent reads it (see
/// [`Route::describes_connections`]): a [`Frame::Connection`], the first bytes of the
/// inner connection, before any of the client's. It fits in the fresh connection's
/// send buffer, so it never waits for the agent.
async fn introduce(
    inner: &mut InnerStream,
    route: &Route,
    info: &ConnectionInfo,
) -> Result<(), SpliceError> {
    if !route.describes_connections {
        return Ok(());
    }
    let frame = Frame::Connection(info.clone());
    let mut bytes = Vec::with_capacity(frame.encoded_len());
    frame.encode(&mut bytes);
    inner
        .write_all(&bytes)
        .await
        .map_err(|_| SpliceError::InnerReset)
}

/// The handshake of a public TLS connection from `from`: its ClientHello (the place
/// yields after [`CLIENT_HELLO_DEADLINE`]), its route and admission, and the rest of the
/// TLS handshake, all by `deadline`. `None` (counted) if it fails.
async fn handshake_public(
    shared: &Arc<Shared>,
    tcp: SharedTcp,
    handshake: &AddressPlace,
    from: IpAddr,
    deadline: Instant,
) -> Option<(Route, TlsStream<SharedTcp>, ConnectionPermit)> {
    let counters = &shared.counters;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp.clone());
    tokio::pin!(acceptor);
    let early = Instant::now() + CLIENT_HELLO_DEADLINE;
    let hello = match timeout_at(early.min(deadline), &mut acceptor).await {
        Ok(hello) => Ok(hello),
        Err(_) => {
            handshake.set_yielding(true);
            let late = timeout_at(deadline, &mut acceptor).await;
            handshake.set_yielding(false);
            late
        }
    };
    let start = match hello {
        Ok(Ok(start)) => start,
        Ok(Err(_)) => return failed(shared, Failure::Tls),
        Err(_) => return failed(shared, Failure::Timeout),
    };
    let Some(route) = start
        .client_hello()
        .server_name()
        .and_then(|sni| shared.route(sni))
    else {
        // Unknown or missing SNI: the same alert every time, before any certificate.
        counters.unknown_sni.fetch_add(1, Ordering::Relaxed);
        drop(start);
        let _ = timeout_at(deadline, refuse_unknown_name(tcp)).await;
        return None;
    };
    // Counted by `admit`; the client sees the connection closed.
    let permit = route.admit(shared, from)?;
    let tls_config = if route.h2 {
        &shared.http2
    } else {
        &shared.http1
    };
    let tls = match timeout_at(deadline, start.into_stream(tls_config.clone())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(_)) => return failed(shared, Failure::Tls),
        Err(_) => return failed(shared, Failure::Timeout),
    };
    Some((route, tls, permit))
}

/// Counts a public handshake that failed for `why`; nothing to go on with.
fn failed<T>(shared: &Shared, why: Failure) -> Option<T> {
    shared.count_failed_handshake(Endpoint::Public, why);
    None
}

/// Answers a ClientHello for no tunnel with a fatal TLS `unrecognized_name` alert, in
/// the clear as alerts before a ServerHello are, and closes.
async fn refuse_unknown_name(mut tcp: SharedTcp) -> std::io::Result<()> {
    /// The `fatal` alert level (RFC 8446, 6).
    const FATAL: u8 = 2;
    let [major, minor] = u16::from(rustls::ProtocolVersion::TLSv1_2).to_be_bytes();
    let alert = [
        u8::from(rustls::ContentType::Alert),
        major,
        minor,
        0,
        2,
        FATAL,
        u8::from(rustls::AlertDescription::UnrecognisedName),
    ];
    tcp.write_all(&alert).await?;
    tcp.shutdown().await
}

/// Binds a free port of the configured range for the tunnel `hostname`, trying every
/// port once from a random one on, and starts accepting its connections. A port is
/// found whenever one is free, however full the range is.
pub(super) async fn bind_tunnel_port(
    shared: &Arc<Shared>,
    hostname: &str,
) -> Result<TcpPort, Unbound> {
    let range = shared.config.tcp_ports.clone();
    let span = u32::from(range.end() - range.start()) + 1;
    let first = rand::random::<u32>() % span;
    for offset in 0..span {
        let port = range.start() + ((first + offset) % span) as u16;
        if let Ok(listener) = TcpListener::bind((shared.config.tcp_bind, port)).await {
            return serve_tunnel_port(shared, listener, port, hostname)
                .ok_or(Unbound::ShuttingDown);
        }
    }
    Err(Unbound::NoFreePort)
}

/// Starts accepting raw TCP connections for `hostname` on `listener`; `None` once the
/// relay has stopped.
pub(super) fn serve_tunnel_port(
    shared: &Arc<Shared>,
    listener: TcpListener,
    port: u16,
    hostname: &str,
) -> Option<TcpPort> {
    let acceptor =
        shared
            .tasks
            .spawn(serve_raw_tcp(shared.clone(), listener, hostname.to_owned()))?;
    Some(TcpPort::new(port, Some(Acceptor(acceptor))))
}

/// Accepts raw TCP connections to an unencrypted tunnel until aborted or the relay
/// drains.
async fn serve_raw_tcp(shared: Arc<Shared>, listener: TcpListener, hostname: String) {
    let mut phase = shared.phase.subscribe();
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|phase| *phase != Phase::Running) => return,
        };
        let (stream, from) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                errors.failed("a raw TCP port", error).await;
                continue;
            }
        };
        errors.accepted();
        if !proxied::trusts(&shared.config.accept_proxy_protocol_from, from.ip()) {
            match proxied::of_socket(&stream) {
                Some(client) => serve_raw_connection(&shared, stream, client, &hostname),
                None => drop(stream.set_zero_linger()),
            }
            continue;
        }
        // From a balancer: the client its PROXY header names is read on a task of its
        // own, which holds a public handshake place meanwhile.
        let Some(handshake) = shared.public_handshakes.admit_from(Some(from.ip())) else {
            shared.count_refusal(Limit::PendingHandshakes);
            let _ = stream.set_zero_linger();
            continue;
        };
        let (task_shared, hostname) = (shared.clone(), hostname.clone());
        shared.tasks.spawn(async move {
            let (shared, mut stream) = (task_shared, stream);
            let deadline = Instant::now() + shared.config.handshake_timeout;
            let pool = Handshakes::Public;
            match admit_client(&shared, &mut stream, handshake, pool, deadline).await {
                Some((client, _handshake)) => {
                    serve_raw_connection(&shared, stream, client, &hostname)
                }
                None => drop(stream.set_zero_linger()),
            }
        });
    }
}

/// Admits a raw TCP connection from `client` to the tunnel `hostname` and splices it
/// into an inner connection on a task of its own; a client beyond a limit or a tunnel
/// gone sees a reset, as from a closed port.
fn serve_raw_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    client: ClientAddr,
    hostname: &str,
) {
    // Looked up per connection: a reconnected agent's session takes the route over.
    let Some(route) = shared.route(hostname) else {
        let _ = stream.set_zero_linger();
        return;
    };
    let Some(permit) = route.admit(shared, client.client.ip()) else {
        // At a limit (counted).
        let _ = stream.set_zero_linger();
        return;
    };
    let _ = stream.set_nodelay(true);
    let record = shared.access_record(hostname, client.client, client.reached, Edge::Tcp);
    let options = shared.config.splice_options().metered(record.meter());
    let relay = shared.clone();
    shared.tasks.spawn(async move {
        let ConnectionPermit {
            counted: _counted,
            places,
        } = permit;
        let taken_back = places.taken_back();
        let ended = match relay.connect_inner(&route, places).await {
            Ok(mut inner) => tokio::select! {
                result = async {
                    introduce(&mut inner, &route, record.info()).await?;
                    splice_tcp_with(&inner, stream, options).await
                } => Ended::from_splice(&result),
                // The client sees the connection closed; the service, a reset.
                () = taken_back => {
                    inner.abort();
                    Ended::TakenBack
                }
            },
            // Refused by the agent: the client sees a reset, as from a closed port.
            Err(_) => {
                drop(stream.set_zero_linger());
                Ended::Refused
            }
        };
        relay.end_connection(record, ended);
    });
}
