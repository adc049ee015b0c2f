//! The agent's link to the relay: one attempt to connect, authenticate and be welcomed
//! ([`open_link`]), and the task that keeps a link up for the agent's whole life,
//! reconnecting with capped, jittered exponential backoff ([`maintain`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use super::control::{refusal_error, Event};
use super::{AgentConfig, LinkState, Shared, ENV_TOKEN};
use crate::error::Error;
use crate::link::{self, ControlSender, FrameReader, FrameWriter, CONTROL_QUEUE};
use crate::wire::{handshake, Welcome, NEW_AGENT};

/// First delay before reconnecting; doubles per failed attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Capped, jittered exponential backoff between attempts: from [`FIRST_BACKOFF`],
/// doubling up to [`MAX_BACKOFF`].
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(FIRST_BACKOFF)
    }

    /// The delay before the next attempt, with full jitter in `[b/2, b)` so that agents
    /// that lost the same relay spread out; the next one doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let backoff = self.0;
        self.0 = (backoff * 2).min(MAX_BACKOFF);
        let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
        backoff / 2 + Duration::from_millis(jitter)
    }
}

/// Runs `attempt` until it succeeds, or fails for another reason than a relay limit
/// ([`Error::LimitReached`]: the relay's sessions, tunnels, leases or ports are taken
/// for now). After each refusal at a limit it calls `refused` with the error and the
/// delay, waits with capped, jittered exponential backoff (100 ms to 10 s), and tries
/// again: a limit is temporary, a wrong token or version is not.
pub async fn retry_at_limits<T, Fut>(
    mut attempt: impl FnMut() -> Fut,
    mut refused: impl FnMut(&Error, Duration),
) -> Result<T, Error>
where
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut backoff = Backoff::new();
    loop {
        match attempt().await {
            Err(e @ Error::LimitReached { .. }) => {
                let delay = backoff.next_delay();
                refused(&e, delay);
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
}

/// The two halves of an established, welcomed link.
pub(crate) type LinkHalves = (
    FrameReader<ReadHalf<TlsStream<TcpStream>>>,
    FrameWriter<WriteHalf<TlsStream<TcpStream>>>,
);

/// What the agent resumes its leases with: the ticket of its last welcome, kept in
/// memory only (a restarted agent is a new agent), never logged.
#[derive(Default)]
pub(crate) struct Resume(std::sync::Mutex<Option<bytes::Bytes>>);

impl Resume {
    /// What the hello carries: the ticket, or [`NEW_AGENT`] before the first welcome.
    fn hello_field(&self) -> bytes::Bytes {
        let ticket = crate::netstack::lock(&self.0).clone();
        ticket.unwrap_or(bytes::Bytes::from_static(NEW_AGENT))
    }

    /// Keeps the ticket of `welcome`.
    fn welcomed(&self, welcome: &Welcome) {
        if !welcome.ticket.is_empty() {
            *crate::netstack::lock(&self.0) = Some(welcome.ticket.clone());
        }
    }
}

/// One attempt to connect, authenticate and be welcomed, resuming with `resume`.
pub(crate) async fn open_link(config: &AgentConfig, resume: &Resume) -> Result<LinkHalves, Error> {
    let resume_field = resume.hello_field();
    let hello = handshake::hello(config.token.expose(), &resume_field).map_err(|_| {
        Error::InvalidConfig {
            name: ENV_TOKEN,
            reason: "the token is longer than a hello frame can carry".into(),
        }
    })?;
    let server_name = config.server_name()?;
    let tls = crate::tls::client_config_from(config.relay_ca.as_deref())?;
    let limit = config.connect_timeout;
    let unreachable = |reason: String| Error::RelayUnreachable {
        relay: config.relay.clone(),
        reason,
    };
    let tcp = match timeout(limit, TcpStream::connect(config.connect_addr())).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {limit:?}"))),
    };
    link::configure_socket(&tcp, &config.link())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut stream = match timeout(limit, connector.connect(server_name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(Error::RelayTls {
                relay: config.relay.clone(),
                source,
            })
        }
        Err(_) => {
            return Err(Error::Timeout {
                waiting_for: "the TLS handshake with the relay",
            })
        }
    };
    handshake::send(&mut stream, &hello)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match timeout(limit, handshake::read_answer(&mut stream)).await {
        Ok(Ok(Ok(welcome))) => resume.welcomed(&welcome),
        Ok(Ok(Err(refusal))) => return Err(refusal_error(refusal)),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(Error::Timeout {
                waiting_for: "the relay's welcome",
            })
        }
    }
    let (read_half, write_half) = tokio::io::split(stream);
    Ok((FrameReader::new(read_half), FrameWriter::new(write_half)))
}

/// Runs the agent's links for as long as the agent exists: when a link is lost, its
/// connections are reset, the agent reconnects with capped, jittered exponential
/// backoff, and asks again for every open tunnel (the relay's lease gives back the same
/// hostname and port). Holds only a weak reference, so dropping every `Agent` ends it.
pub(crate) async fn maintain(agent: Weak<Shared>, changed: Arc<Notify>, mut halves: LinkHalves) {
    loop {
        let (reader, writer) = halves;
        let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
        let (outbound_tx, outbound) = mpsc::channel(CONTROL_QUEUE);
        let (stack, link_config) = {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            (shared.stack.clone(), shared.config.link())
        };
        let dispatch = async {
            while let Some(frame) = inbound.recv().await {
                let Some(shared) = agent.upgrade() else { break };
                shared.handle_frame(frame);
            }
        };
        let link = async {
            let link = link::run(reader, writer, stack, inbound_tx, outbound, link_config);
            let pump = pump(&agent, &changed, outbound_tx);
            tokio::pin!(link, pump);
            tokio::select! {
                result = &mut link => result,
                // The agent is gone and the pump with its sender: the link flushes
                // what is queued and closes.
                () = &mut pump => link.await,
            }
        };
        let (result, ()) = tokio::join!(link, dispatch);
        {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            shared.stack.reset_connections();
            shared.update(|control| control.link_lost());
            shared.state.send_replace(LinkState::Reconnecting);
            match result {
                Ok(()) => {
                    tracing::warn!(relay = %shared.config.relay, "relay closed the link; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(relay = %shared.config.relay, error = %e, "link lost; reconnecting")
                }
            }
        }
        let mut backoff = Backoff::new();
        halves = loop {
            tokio::time::sleep(backoff.next_delay()).await;
            let Some(shared) = agent.upgrade() else {
                return;
            };
            match open_link(&shared.config, &shared.resume).await {
                Ok(halves) => {
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    shared.update(|control| control.link_up(super::now()));
                    shared.state.send_replace(LinkState::Connected);
                    break halves;
                }
                Err(e @ (Error::Unauthorized | Error::VersionMismatch { .. })) => {
                    tracing::error!(error = %e, "the relay refuses this agent; giving up");
                    let reason = Arc::new(e);
                    shared.update(|control| control.give_up(&reason));
                    shared.state.send_replace(LinkState::GaveUp(reason));
                    return;
                }
                // Temporary, and visible: the link's state says why.
                Err(e @ Error::LimitReached { .. }) => {
                    tracing::warn!(error = %e, "the relay refused the link for now; retrying");
                    shared.state.send_replace(LinkState::Refused(Arc::new(e)));
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        };
        tracing::info!("reconnected to the relay");
    }
}

/// Moves the control table's frames onto the link, until the link or the agent ends.
async fn pump(agent: &Weak<Shared>, changed: &Notify, link: ControlSender) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let frame = match agent.upgrade() {
            Some(shared) => shared.take(|control| control.poll_transmit()),
            None => return,
        };
        match frame {
            Some(frame) => {
                if link.send(frame).await.is_err() {
                    return;
                }
            }
            None => notified.await,
        }
    }
}

/// Logs what the control table reports.
pub(crate) fn report(event: Event) {
    match event {
        Event::Restored { port } => tracing::debug!(port, "tunnel restored"),
        Event::Moved { port, old, new } => tracing::error!(
            port,
            %old,
            %new,
            "the relay no longer held this tunnel's lease: it has a new address"
        ),
        Event::RestoreFailed { port, error } => {
            tracing::error!(port, %error, "could not restore a tunnel")
        }
    }
}
