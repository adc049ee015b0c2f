//! The agent's link to the relay: one attempt to connect, authenticate and be welcomed
//! ([`open_link`]), and the task that keeps a link up for the agent's whole life
//! ([`maintain`]), reconnecting with capped, jittered exponential backoff, and with
//! several relays moving to the next-nearest when the one in use stays away past its
//! grace period.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use super::config::{connect_addr, server_name};
use super::control::{refusal_error, Event};
use super::nearest::ProbeOutcome;
use super::{AgentConfig, LinkState, Shared, ENV_TOKEN};
use crate::error::Error;
use crate::link::{self, ControlSender, FrameReader, FrameWriter, CONTROL_QUEUE};
use crate::netstack::lock;
use crate::wire::{handshake, NEW_AGENT};
use std::io;

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

/// What the agent resumes its leases with: the ticket of its last welcome from each
/// relay (at most one per relay it was given), kept in memory only (a restarted agent
/// is a new agent), never logged. A relay is never shown another relay's ticket.
#[derive(Default)]
pub(crate) struct Resume(std::sync::Mutex<HashMap<String, Bytes>>);

impl Resume {
    /// What the hello to `relay` carries: its ticket, or [`NEW_AGENT`] before the first
    /// welcome from it.
    pub(crate) fn hello_field(&self, relay: &str) -> Bytes {
        let ticket = crate::netstack::lock(&self.0).get(relay).cloned();
        ticket.unwrap_or(Bytes::from_static(NEW_AGENT))
    }

    /// Keeps `ticket`, the one `relay`'s welcome carried.
    pub(crate) fn welcomed(&self, relay: &str, ticket: &Bytes) {
        if !ticket.is_empty() {
            crate::netstack::lock(&self.0).insert(relay.to_owned(), ticket.clone());
        }
    }
}

/// A step of [`open_link`], reported as it happens.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    /// The TCP connection is up.
    Connected,
    /// TLS is up and the hello went out.
    HelloSent,
}

/// A link that the relay welcomed.
pub(crate) struct Opened {
    pub(crate) halves: LinkHalves,
    /// From the hello sent to the welcome received: the relay's round trip.
    pub(crate) rtt: Duration,
    /// The welcome's resume ticket (empty for a hello that leases nothing).
    pub(crate) ticket: Bytes,
}

/// One attempt to connect to `relay`, authenticate and be welcomed, with `resume` as the
/// hello's resume field; `progress` hears of each [`Step`]. Every wait is bounded by the
/// configuration's `connect_timeout`. `tls` is `None` for the TLS settings `config`
/// names, or those settings made once for several links.
pub(crate) async fn open_link(
    config: &AgentConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    relay: &str,
    resume: Bytes,
    mut progress: impl FnMut(Step),
) -> Result<Opened, Error> {
    let hello =
        handshake::hello(config.token.expose(), &resume).map_err(|_| Error::InvalidConfig {
            name: ENV_TOKEN,
            reason: "the token is longer than a hello frame can carry".into(),
        })?;
    let server_name = server_name(relay)?;
    let tls = match tls {
        Some(tls) => tls,
        None => crate::tls::client_config_from(config.relay_ca.as_deref())?,
    };
    let limit = config.connect_timeout;
    let unreachable = |reason: String| Error::RelayUnreachable {
        relay: relay.to_owned(),
        reason,
    };
    let tcp = match timeout(limit, connect_relay(relay)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {limit:?}"))),
    };
    progress(Step::Connected);
    link::configure_socket(&tcp, &config.link())?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut stream = match timeout(limit, connector.connect(server_name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(Error::RelayTls {
                relay: relay.to_owned(),
                source,
            })
        }
        Err(_) => {
            return Err(Error::Timeout {
                waiting_for: "the TLS handshake with the relay",
            })
        }
    };
    let hello_at = tokio::time::Instant::now();
    match timeout(limit, handshake::send(&mut stream, &hello)).await {
        Ok(Ok(())) => progress(Step::HelloSent),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("the hello not sent within {limit:?}"))),
    }
    let ticket = match timeout(limit, handshake::read_answer(&mut stream)).await {
        Ok(Ok(Ok(welcome))) => welcome.ticket,
        Ok(Ok(Err(refusal))) => return Err(refusal_error(refusal)),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(Error::Timeout {
                waiting_for: "the relay's welcome",
            })
        }
    };
    let rtt = hello_at.elapsed();
    let (read_half, write_half) = tokio::io::split(stream);
    Ok(Opened {
        halves: (FrameReader::new(read_half), FrameWriter::new(write_half)),
        rtt,
        ticket,
    })
}

/// Runs the agent's links for as long as the agent exists: when a link is lost, its
/// connections are reset, the agent reconnects ([`reconnect`]) and asks again for every
/// open tunnel (the relay's lease gives back the same hostname and port; another relay
/// gives new ones). Holds only a weak reference, so dropping every `Agent` ends it.
pub(crate) async fn maintain(agent: Weak<Shared>, changed: Arc<Notify>, mut halves: LinkHalves) {
    loop {
        let result = match run_link(&agent, &changed, halves).await {
            LinkEnd::Moved(moved) => {
                halves = moved;
                continue;
            }
            LinkEnd::Lost(result) => result,
        };
        {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            shared.stack.reset_connections();
            shared.update(|control| control.link_lost());
            shared.state.send_replace(LinkState::Reconnecting);
            let relay = shared.relay().address;
            match result {
                Ok(()) => tracing::warn!(%relay, "relay closed the link; reconnecting"),
                Err(e) => tracing::warn!(%relay, error = %e, "link lost; reconnecting"),
            }
        }
        halves = match reconnect(&agent).await {
            Some(halves) => halves,
            None => return,
        };
    }
}

/// A TCP connection to `relay` (`host:port`) as the system resolves it. A name under
/// `.localhost` that the resolver does not know is this machine (RFC 6761), reached at
/// `localhost` ([`connect_addr`]); one it knows (an `/etc/hosts` line, say) goes where
/// it says.
async fn connect_relay(relay: &str) -> io::Result<TcpStream> {
    match tokio::net::lookup_host(relay).await {
        Ok(addrs) => TcpStream::connect(&*addrs.collect::<Vec<_>>()).await,
        Err(_) if connect_addr(relay) != relay => TcpStream::connect(connect_addr(relay)).await,
        Err(e) => Err(e),
    }
}

/// How a link of [`run_link`] ended.
enum LinkEnd {
    /// Lost, or closed by the relay (`Ok`).
    Lost(Result<(), link::LinkError>),
    /// Closed by the agent, which moved to a nearer relay over this new link while it
    /// had no tunnels.
    Moved(LinkHalves),
}

/// Runs one link until it is lost, the agent is gone, or the agent moves to a nearer
/// relay ([`super::reprobe`]).
async fn run_link(agent: &Weak<Shared>, changed: &Arc<Notify>, halves: LinkHalves) -> LinkEnd {
    let (reader, writer) = halves;
    let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
    let (outbound_tx, outbound) = mpsc::channel(CONTROL_QUEUE);
    let Some((stack, link_config)) = agent
        .upgrade()
        .map(|shared| (shared.stack.clone(), shared.config.link()))
    else {
        return LinkEnd::Lost(Ok(()));
    };
    let dispatch = async {
        while let Some(frame) = inbound.recv().await {
            let Some(shared) = agent.upgrade() else { break };
            shared.handle_frame(frame);
        }
    };
    let link = async {
        let link = link::run(reader, writer, stack, inbound_tx, outbound, link_config);
        // Boxed, so that dropping it (and its sender) closes the link when moving.
        let mut pump = Box::pin(pump(agent, changed, outbound_tx));
        let nearer = super::reprobe::nearer_relay(agent);
        tokio::pin!(link, nearer);
        tokio::select! {
            result = &mut link => LinkEnd::Lost(result),
            // The agent is gone and the pump with its sender: the link flushes what is
            // queued and closes.
            () = &mut pump => LinkEnd::Lost(link.await),
            (index, opened) = &mut nearer => {
                drop(pump);
                let _ = link.await;
                let Some(shared) = agent.upgrade() else {
                    return LinkEnd::Lost(Ok(()));
                };
                super::reprobe::moved(&shared, index, opened.rtt);
                LinkEnd::Moved(opened.halves)
            }
        }
    };
    let (end, ()) = tokio::join!(link, dispatch);
    end
}

/// A failover in progress: the relays to try, in turn, and how many refused the agent
/// in a row.
struct Failover {
    order: Vec<usize>,
    next: usize,
    refused_in_a_row: usize,
}

impl Failover {
    fn next_relay(&mut self) -> usize {
        let index = self.order[self.next % self.order.len()];
        self.next = self.next.wrapping_add(1);
        index
    }
}

/// Reconnects after a lost link, with capped, jittered exponential backoff: to the same
/// relay for [`AgentConfig::failover_after`] (within the relay's grace period it gives
/// the tunnels their addresses back), then, with several relays, to the others nearest
/// first and the lost one last, in turn. The new link, with the control table told;
/// `None` once the agent is gone or gives up.
async fn reconnect(agent: &Weak<Shared>) -> Option<LinkHalves> {
    let lost_at = tokio::time::Instant::now();
    let (lost, grace) = {
        let shared = agent.upgrade()?;
        let fleet = lock(&shared.fleet);
        let several = fleet.len() > 1;
        (
            fleet.current(),
            several.then_some(shared.config.failover_after),
        )
    };
    let mut backoff = Backoff::new();
    let mut failover: Option<Failover> = None;
    let mut tried_lost = false;
    loop {
        let mut delay = backoff.next_delay();
        if let (None, Some(grace)) = (&failover, grace) {
            // The move starts when the grace period ends, not a backoff later.
            delay =
                delay.min((lost_at + grace).saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::time::sleep(delay).await;
        let shared = agent.upgrade()?;
        if let (None, Some(grace)) = (&failover, grace) {
            // The lost relay is always tried again at least once, however late.
            if tried_lost && lost_at.elapsed() >= grace {
                let order = lock(&shared.fleet).failover_order();
                let relay = lock(&shared.fleet).address(lost).to_owned();
                tracing::warn!(%relay, "the relay did not come back within {grace:?}; moving to the next-nearest relay");
                failover = Some(Failover {
                    order,
                    next: 0,
                    refused_in_a_row: 0,
                });
                backoff = Backoff::new();
            }
        }
        let index = failover.as_mut().map_or(lost, Failover::next_relay);
        tried_lost = true;
        let relay = lock(&shared.fleet).address(index).to_owned();
        let resume = shared.resume.hello_field(&relay);
        match open_link(&shared.config, None, &relay, resume, |_| {}).await {
            Ok(opened) => {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.resume.welcomed(&relay, &opened.ticket);
                lock(&shared.fleet).use_relay(index, opened.rtt);
                if index == lost {
                    tracing::info!(%relay, "reconnected to the relay");
                } else {
                    let choice = shared.relay();
                    tracing::warn!(%relay, "moved to relay {choice}; the tunnels reopen there with new addresses");
                }
                shared.update(|control| control.link_up(super::now()));
                shared.state.send_replace(LinkState::Connected);
                return Some(opened.halves);
            }
            Err(e @ (Error::Unauthorized | Error::VersionMismatch { .. })) => {
                // Moving, one relay refusing is not the end while another may take it.
                if let Some(failover) = &mut failover {
                    failover.refused_in_a_row += 1;
                    if failover.refused_in_a_row < failover.order.len() {
                        tracing::warn!(%relay, error = %e, "this relay refuses the agent; trying the next");
                        continue;
                    }
                }
                tracing::error!(error = %e, "the relay refuses this agent; giving up");
                let reason = Arc::new(e);
                shared.update(|control| control.give_up(&reason));
                shared.state.send_replace(LinkState::GaveUp(reason));
                return None;
            }
            // Temporary, and visible: the link's state says why.
            Err(e @ Error::LimitReached { .. }) => {
                tracing::warn!(%relay, error = %e, "the relay refused the link for now; retrying");
                let e = Arc::new(e);
                lock(&shared.fleet).record(index, ProbeOutcome::Failed(e.clone()));
                shared.state.send_replace(LinkState::Refused(e));
            }
            Err(e) => {
                tracing::debug!(%relay, error = %e, "reconnect failed");
                lock(&shared.fleet).record(index, ProbeOutcome::Failed(Arc::new(e)));
            }
        }
        if let Some(failover) = &mut failover {
            failover.refused_in_a_row = 0;
        }
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
            "the tunnel has a new address (its relay no longer held the lease, or the agent moved to another relay)"
        ),
        Event::RestoreFailed { port, error } => {
            tracing::error!(port, %error, "could not restore a tunnel")
        }
    }
}
