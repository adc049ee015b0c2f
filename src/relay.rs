//! The relay server: agents connect to it, the public connects through it.
//!
//! - The **agent endpoint** takes TLS connections from agents, checks their token, and
//!   gives each session its own userspace [`Stack`]: a session can only ever reach its
//!   own agent.
//! - The **tunnel registry** maps hostnames (`<label>.<domain>`, with a label of 128
//!   random bits from the OS) to a session and an inner port.
//! - The **public TLS edge** reads the ClientHello, routes by SNI, offers ALPN `h2` only
//!   to tunnels that asked for HTTP/2, terminates TLS and splices the plaintext into an
//!   inner connection to the agent. An unknown or missing SNI is dropped the same way
//!   every time, before any certificate is shown.
//! - **Raw TCP** tunnels get a port of their own from a configured range.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::TryRngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::error::Error;
use crate::link::{self, ControlSender, FrameReader, FrameWriter, LinkConfig, CONTROL_QUEUE};
use crate::netstack::{lock, Stack, StackConfig};
use crate::tls::ServerIdentity;
use crate::token::Token;
use crate::wire::{
    ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame, Welcome, PROTOCOL_VERSION,
};

/// The domain of a relay for one machine. Not plain `localhost`: certificate checkers
/// refuse a wildcard directly under a single label (`*.localhost`), while
/// `*.portferry.localhost` is fine, and clients resolve every `*.localhost` to loopback.
pub const LOCAL_DOMAIN: &str = "portferry.localhost";

/// Settings of a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where agents connect (TLS).
    pub agent_addr: SocketAddr,
    /// Where the public connects with TLS (`https://…`).
    pub public_tls_addr: SocketAddr,
    /// The TLS port shown in URLs, if not the bound one (behind a load balancer).
    pub public_tls_port: Option<u16>,
    /// Address raw TCP tunnel ports are bound on.
    pub tcp_bind: IpAddr,
    /// Ports raw TCP tunnels are given from.
    pub tcp_ports: RangeInclusive<u16>,
    /// Domain tunnel hostnames are made under.
    pub domain: String,
    /// This relay node's name, if hostnames are sharded by node (`<label>.<node>.<domain>`).
    pub node: Option<String>,
    /// Tokens agents may present.
    pub tokens: Vec<Token>,
    /// Certificate (a wildcard for the tunnel hostnames) and key of the public edge and
    /// the agent endpoint.
    pub identity: ServerIdentity,
    /// Limit for a TLS handshake and an agent's hello.
    pub handshake_timeout: Duration,
    /// Heartbeats and batching of agent links.
    pub link: LinkConfig,
    /// Settings of each session's userspace stack.
    pub stack: StackConfig,
}

impl RelayConfig {
    /// Settings for one machine: everything on loopback, domain [`LOCAL_DOMAIN`], the given
    /// ports (0 picks a free one), raw TCP ports from 20000 to 29999.
    pub fn local(
        identity: ServerIdentity,
        tokens: Vec<Token>,
        agent_port: u16,
        public_tls_port: u16,
    ) -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        RelayConfig {
            agent_addr: SocketAddr::new(loopback, agent_port),
            public_tls_addr: SocketAddr::new(loopback, public_tls_port),
            public_tls_port: None,
            tcp_bind: loopback,
            tcp_ports: 20_000..=29_999,
            domain: LOCAL_DOMAIN.into(),
            node: None,
            tokens,
            identity,
            handshake_timeout: Duration::from_secs(10),
            link: LinkConfig::default(),
            stack: StackConfig::relay(),
        }
    }

    /// The domain under which this node's tunnels are named.
    fn node_domain(&self) -> String {
        match &self.node {
            Some(node) => format!("{node}.{}", self.domain),
            None => self.domain.clone(),
        }
    }
}

/// A bound relay; [`run`](Relay::run) serves it.
pub struct Relay {
    shared: Arc<Shared>,
    agents: TcpListener,
    public: TcpListener,
}

struct Shared {
    config: RelayConfig,
    public_tls_port: u16,
    agent_tls: TlsAcceptor,
    http1: Arc<rustls::ServerConfig>,
    http2: Arc<rustls::ServerConfig>,
    routes: Mutex<HashMap<String, Route>>,
}

/// Where connections to one tunnel hostname go.
#[derive(Clone)]
struct Route {
    stack: Stack,
    port: u16,
    h2: bool,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("agent_addr", &self.agent_addr())
            .field("public_tls_addr", &self.public_tls_addr())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the agent endpoint and the public TLS port.
    pub async fn bind(config: RelayConfig) -> Result<Relay, Error> {
        let agents = TcpListener::bind(config.agent_addr).await?;
        let public = TcpListener::bind(config.public_tls_addr).await?;
        let public_tls_port = config
            .public_tls_port
            .unwrap_or(public.local_addr()?.port());
        let server_config = |alpn: &[&[u8]]| crate::tls::server_config(&config.identity, alpn);
        let agent_tls = TlsAcceptor::from(server_config(&[])?);
        let http1 = server_config(&[b"http/1.1"])?;
        let http2 = server_config(&[b"h2", b"http/1.1"])?;
        Ok(Relay {
            shared: Arc::new(Shared {
                config,
                public_tls_port,
                agent_tls,
                http1,
                http2,
                routes: Mutex::new(HashMap::new()),
            }),
            agents,
            public,
        })
    }

    /// Where agents connect.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agents
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the public connects with TLS.
    pub fn public_tls_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Number of tunnels currently routed.
    pub fn tunnel_count(&self) -> usize {
        lock(&self.shared.routes).len()
    }

    /// Serves agents and the public until the returned future is dropped.
    pub async fn run(self) {
        let Relay {
            shared,
            agents,
            public,
        } = self;
        tokio::join!(
            accept_loop(agents, shared.clone(), serve_agent),
            accept_loop(public, shared, serve_public)
        );
    }
}

/// Accepts connections forever, each served by its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, shared: Arc<Shared>, serve: F)
where
    F: Fn(Arc<Shared>, TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(shared.clone(), stream));
            }
            // Out of file descriptors and the like: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One agent session: handshake, then tunnel requests until the link ends.
async fn serve_agent(shared: Arc<Shared>, tcp: TcpStream) {
    let limit = shared.config.handshake_timeout;
    let Ok(Ok(tls)) = timeout(limit, shared.agent_tls.accept(tcp)).await else {
        return;
    };
    let (read_half, write_half) = tokio::io::split(tls);
    let (mut reader, mut writer) = (FrameReader::new(read_half), FrameWriter::new(write_half));
    let refusal = |code, message: &str| {
        Frame::Error(ErrorFrame {
            request_id: 0,
            code,
            message: message.into(),
        })
    };
    let hello = match reader.read_frame_within(limit).await {
        Ok(Some(Frame::Hello(hello))) => hello,
        _ => {
            let _ = writer
                .send(&refusal(ErrorCode::PROTOCOL, "expected a hello"))
                .await;
            return;
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let message = format!(
            "relay speaks version {PROTOCOL_VERSION}, agent {}",
            hello.version
        );
        let _ = writer
            .send(&refusal(ErrorCode::BAD_VERSION, &message))
            .await;
        return;
    }
    if !shared
        .config
        .tokens
        .iter()
        .any(|token| token.matches(&hello.token))
    {
        let _ = writer
            .send(&refusal(ErrorCode::UNAUTHORIZED, "unknown agent token"))
            .await;
        let _ = writer.shutdown().await;
        return;
    }
    let welcome = Frame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        ticket: bytes::Bytes::new(),
    });
    if writer.send(&welcome).await.is_err() {
        return;
    }

    let stack = Stack::new(shared.config.stack.clone());
    let (control, outbound) = mpsc::channel(CONTROL_QUEUE);
    let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
    let link = tokio::spawn(link::run(
        reader,
        writer,
        stack.clone(),
        inbound_tx,
        outbound,
        shared.config.link.clone(),
    ));
    let mut session = Session {
        shared: shared.clone(),
        stack,
        control,
        tunnels: HashMap::new(),
    };
    while let Some(frame) = inbound.recv().await {
        if session.handle(frame).await.is_err() {
            break;
        }
    }
    drop(session);
    let _ = link.await;
}

/// The relay's side of one agent link.
struct Session {
    shared: Arc<Shared>,
    stack: Stack,
    control: ControlSender,
    /// This session's tunnels by port.
    tunnels: HashMap<u16, SessionTunnel>,
}

struct SessionTunnel {
    hostname: String,
    /// Accepts raw TCP connections, for unencrypted tunnels.
    tcp_acceptor: Option<JoinHandle<()>>,
}

impl Session {
    /// Handles one control frame; `Err` when the link is gone.
    async fn handle(&mut self, frame: Frame) -> Result<(), ()> {
        let reply = match frame {
            Frame::Forward(request) => match self.open(&request).await {
                Ok(forwarded) => Frame::Forwarded(forwarded),
                Err((code, message)) => Frame::Error(ErrorFrame {
                    request_id: request.request_id,
                    code,
                    message,
                }),
            },
            Frame::Close { port } => {
                self.close(port);
                Frame::Close { port }
            }
            _ => Frame::Error(ErrorFrame {
                request_id: 0,
                code: ErrorCode::PROTOCOL,
                message: "unexpected frame".into(),
            }),
        };
        self.control.send(reply).await.map_err(|_| ())
    }

    /// Opens a tunnel to `request.port` of the agent.
    async fn open(&mut self, request: &ForwardRequest) -> Result<Forwarded, (ErrorCode, String)> {
        let port = request.port;
        if port == 0 {
            return Err((
                ErrorCode::INVALID_REQUEST,
                "port 0 is not a valid port (1 to 65535)".into(),
            ));
        }
        if request.h2 && request.unencrypted {
            return Err((
                ErrorCode::INVALID_REQUEST,
                "HTTP/2 needs TLS: h2 cannot be unencrypted".into(),
            ));
        }
        if self.tunnels.contains_key(&port) {
            return Err((
                ErrorCode::PORT_IN_USE,
                format!("port {port} is already forwarded"),
            ));
        }
        let route = Route {
            stack: self.stack.clone(),
            port,
            h2: request.h2,
        };
        let tcp_acceptor = if request.unencrypted {
            let (listener, tcp_port) = self.bind_tcp_port().await.ok_or((
                ErrorCode::LIMIT_REACHED,
                "no free raw TCP port on the relay".to_string(),
            ))?;
            Some((
                tokio::spawn(serve_raw_tcp(listener, route.clone())),
                tcp_port,
            ))
        } else {
            None
        };
        let hostname = self.shared.register(route);
        let forwarded = Forwarded {
            request_id: request.request_id,
            port,
            hostname: hostname.clone(),
            tls_port: self.shared.public_tls_port,
            tcp_port: tcp_acceptor.as_ref().map(|(_, port)| *port),
        };
        self.tunnels.insert(
            port,
            SessionTunnel {
                hostname,
                tcp_acceptor: tcp_acceptor.map(|(task, _)| task),
            },
        );
        Ok(forwarded)
    }

    /// Binds a random free port of the configured range.
    async fn bind_tcp_port(&self) -> Option<(TcpListener, u16)> {
        let range = self.shared.config.tcp_ports.clone();
        let span = u32::from(range.end() - range.start()) + 1;
        for _ in 0..64 {
            let port = range.start() + (rand::random::<u32>() % span) as u16;
            if let Ok(listener) = TcpListener::bind((self.shared.config.tcp_bind, port)).await {
                return Some((listener, port));
            }
        }
        None
    }

    /// Stops routing to the tunnel of `port`.
    fn close(&mut self, port: u16) {
        if let Some(tunnel) = self.tunnels.remove(&port) {
            lock(&self.shared.routes).remove(&tunnel.hostname);
            if let Some(acceptor) = tunnel.tcp_acceptor {
                acceptor.abort();
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let ports: Vec<u16> = self.tunnels.keys().copied().collect();
        for port in ports {
            self.close(port);
        }
        self.stack.close();
    }
}

impl Shared {
    /// Registers a route under a fresh random hostname and returns the hostname.
    fn register(&self, route: Route) -> String {
        let mut routes = lock(&self.routes);
        loop {
            let hostname = format!("{}.{}", random_label(), self.config.node_domain());
            if let std::collections::hash_map::Entry::Vacant(slot) = routes.entry(hostname.clone())
            {
                slot.insert(route);
                return hostname;
            }
        }
    }

    fn route(&self, hostname: &str) -> Option<Route> {
        lock(&self.routes)
            .get(&hostname.to_ascii_lowercase())
            .cloned()
    }
}

/// A DNS label of 26 characters from `a-z2-7` carrying 128 bits from the OS CSPRNG.
fn random_label() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random number generator failed");
    let bits = u128::from_be_bytes(bytes);
    (0..26)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// One public TLS connection: route by SNI, terminate TLS, splice to the agent.
async fn serve_public(shared: Arc<Shared>, tcp: TcpStream) {
    let limit = shared.config.handshake_timeout;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(Ok(start)) = timeout(limit, acceptor).await else {
        return;
    };
    let Some(route) = start
        .client_hello()
        .server_name()
        .and_then(|sni| shared.route(sni))
    else {
        // Unknown or missing SNI: close without an answer, the same way every time.
        return;
    };
    let tls_config = if route.h2 {
        &shared.http2
    } else {
        &shared.http1
    };
    let (tls, inner) = tokio::join!(
        timeout(limit, start.into_stream(tls_config.clone())),
        route.stack.connect(route.port)
    );
    let (Ok(Ok(mut tls)), Ok(inner)) = (tls, inner) else {
        return;
    };
    let _ = crate::splice::splice(&inner, &mut tls).await;
    let _ = tls.shutdown().await;
}

/// Accepts raw TCP connections to an unencrypted tunnel until aborted.
async fn serve_raw_tcp(listener: TcpListener, route: Route) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let route = route.clone();
        tokio::spawn(async move {
            match route.stack.connect(route.port).await {
                Ok(inner) => {
                    let _ = crate::splice::splice_tcp(&inner, stream).await;
                }
                // Refused by the agent: the client sees a reset, as from a closed port.
                Err(_) => drop(stream.set_zero_linger()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_random_dns_labels() {
        let a = random_label();
        let b = random_label();
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
    }
}
