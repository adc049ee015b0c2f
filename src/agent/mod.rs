//! The library used inside containers: connect to a relay and forward ports.
//!
//! [`forward`] uses an agent configured from the environment (`PORTFERRY_RELAY`,
//! `PORTFERRY_TOKEN`, optional `PORTFERRY_RELAY_CA`); [`Agent::connect`] takes an
//! explicit [`AgentConfig`]. One agent holds one link to the relay, whatever the
//! number of tunnels and connections; given several relays, it uses the nearest.
//!
//! Layout: `config` (settings), `control` (the sans-IO request/close table, and the
//! tunnels' states), `reconnect` (the link and its upkeep, failover included),
//! `nearest` (probing several relays at once, their figures), `race` (the sans-IO rule
//! that picks the nearest), `reprobe` (measuring them again while idle), `tunnel` (the
//! handles), `state` (what a handle reports), `stats` (what the agent reports), `local` (serving a tunnel from the local
//! service);
//! this file ties them together and drives the table: after every change to it,
//! whoever waits is woken, and its deadlines are kept by a task of their own.

mod config;
mod introduction;
mod local;
mod nearest;
mod proxy_header;
mod race;
// Public only for test harnesses and fuzz targets that drive the agent's control plane
// without sockets; not part of the supported API.
#[doc(hidden)]
pub mod control;
mod reconnect;
mod reprobe;
mod state;
mod stats;
mod tunnel;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{watch, Notify, OnceCell};

use crate::error::Error;
use crate::netstack::{lock, ListenError, Listener, Stack};

pub use config::{AgentConfig, ForwardOptions, ENV_RELAY, ENV_RELAY_CA, ENV_TOKEN, MAX_RELAYS};
use control::{BindError, Control};
use nearest::Fleet;
pub use nearest::{ProbeOutcome, RelayChoice, RelayProbe};
pub use proxy_header::ProxyProtocol;
pub use reconnect::retry_at_limits;
pub use state::{TunnelAddress, TunnelState};
pub use stats::AgentStats;
pub use tunnel::{Tunnel, TunnelListener, TunnelStream};

/// The state of an agent's link to the relay ([`Agent::link_state`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LinkState {
    /// The link is up.
    Connected,
    /// The link was lost; the agent is reconnecting.
    Reconnecting,
    /// The relay turned the last reconnect away at a limit (its sessions, or this
    /// token's or this address's share of them; the error names it): the agent keeps
    /// retrying with backoff.
    Refused(Arc<Error>),
    /// The relay refused this agent on a reconnect (token or version): the agent has
    /// stopped trying and its tunnels are dead.
    GaveUp(Arc<Error>),
}

/// A connection to a relay, shared by every tunnel made through it. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

/// What every handle of one agent shares.
///
/// Lock order: `control`, then the stack's own locks (`open` listens on the stack
/// while holding `control`).
pub(crate) struct Shared {
    config: AgentConfig,
    /// The resume tickets presented on every link after the first, one per relay, so
    /// that a relay gives a reconnecting agent back the hostnames and ports it leased.
    resume: Arc<reconnect::Resume>,
    /// The relays the agent was given, their figures, and the one it uses.
    fleet: Arc<Mutex<Fleet>>,
    /// One stack for the agent's whole life: listeners survive a lost link, connections
    /// do not.
    stack: Stack,
    /// Tunnels, requests and closes, each stored once; fed only through
    /// [`update`](Shared::update), its outputs taken through [`take`](Shared::take).
    control: Mutex<Control>,
    /// Signalled after every change to `control`: an answer, a frame to send, a lost
    /// link, a deadline passed.
    changed: Arc<Notify>,
    state: watch::Sender<LinkState>,
    /// Links made again after one was lost.
    reconnects: AtomicU64,
    /// The runtime the agent was connected in, which runs its tasks.
    runtime: tokio::runtime::Handle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stack.close();
        // Ends the link's pump, so the link flushes and closes.
        self.changed.notify_waiters();
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("relay", &self.shared.relay().address)
            .finish_non_exhaustive()
    }
}

/// The one clock of the agent, as the control table takes it (tokio's, so that tests
/// with paused time move it).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Agent {
    /// Connects to the relay, authenticates, and starts the link. The agent keeps the
    /// link up from then on, reconnecting when it is lost.
    ///
    /// Given several relays, it probes them all at once and links to the one with the
    /// lowest round trip, over the winning probe's own connection: once the first
    /// relay has answered it waits at most 10 ms (or half that relay's round trip, if
    /// more) for a nearer one, and not at all for relays that are already slower. If
    /// that relay is lost and stays away for [`AgentConfig::failover_after`], the agent
    /// moves to the next-nearest; see [`relay`](Self::relay).
    pub async fn connect(config: AgentConfig) -> Result<Agent, Error> {
        let resume = Arc::new(reconnect::Resume::default());
        let fleet = Arc::new(Mutex::new(Fleet::new(config.relays()?)));
        let halves = nearest::connect_nearest(&config, &fleet, &resume).await?;
        let changed = Arc::new(Notify::new());
        let agent = Agent {
            shared: Arc::new(Shared {
                stack: Stack::new(config.stack()),
                resume,
                fleet,
                control: Mutex::new(Control::new(config.request_timeout)),
                changed: changed.clone(),
                state: watch::Sender::new(LinkState::Connected),
                reconnects: AtomicU64::new(0),
                runtime: tokio::runtime::Handle::current(),
                config,
            }),
        };
        let shared = Arc::downgrade(&agent.shared);
        let runtime = &agent.shared.runtime;
        runtime.spawn(keep_deadlines(shared.clone(), changed.clone()));
        runtime.spawn(reconnect::maintain(shared, changed, halves));
        Ok(agent)
    }

    /// Forwards `port` with default options; see [`forward_with`](Self::forward_with).
    pub async fn forward(&self, port: u16) -> Result<Tunnel, Error> {
        self.forward_with(port, ForwardOptions::default()).await
    }

    /// Asks the relay for a tunnel to the local service on `port`: connections to the
    /// tunnel's URL (and TCP socket, if `unencrypted`) reach `127.0.0.1:<port>`, else
    /// `[::1]:<port>` (as `localhost` means), or `options`' local addresses. A client of a
    /// service that is not listening sees its connection refused, and the agent logs a
    /// warning naming the addresses it tried (at most one per tunnel per 10 s).
    pub async fn forward_with(&self, port: u16, options: ForwardOptions) -> Result<Tunnel, Error> {
        if port == 0 {
            return Err(Error::InvalidPort { given: "0".into() });
        }
        let (inner, state, listener) = self.open(Some(port), &options).await?;
        let targets = if options.local_addrs.is_empty() {
            local::default_targets(port)
        } else {
            options.local_addrs
        };
        let connect_timeout = self.shared.config.connect_timeout;
        let stopper = listener.stopper();
        let task = self.shared.runtime.spawn(local::serve(
            listener,
            targets,
            connect_timeout,
            options.proxy_protocol,
        ));
        Ok(Tunnel::new(
            self.clone(),
            inner,
            state,
            Some(port),
            Some((task, stopper)),
        ))
    }

    /// Opens a tunnel whose connections are handed to the program itself, straight
    /// from the userspace stack: no local port is bound.
    pub async fn listen(&self, options: ForwardOptions) -> Result<TunnelListener, Error> {
        let (inner, state, listener) = self.open(None, &options).await?;
        Ok(TunnelListener {
            tunnel: Tunnel::new(self.clone(), inner, state, None, None),
            listener,
        })
    }

    /// Listens on an inner port and asks the relay for a tunnel to it.
    async fn open(
        &self,
        local: Option<u16>,
        options: &ForwardOptions,
    ) -> Result<(u16, watch::Receiver<TunnelState>, Listener), Error> {
        if options.h2 && options.unencrypted {
            return Err(Error::H2RequiresTls);
        }
        let shared = &self.shared;
        let opened = shared.update(|control| {
            control.open(local, options, now(), |port| {
                shared.stack.listen(port).map_err(|e| match e {
                    ListenError::PortInUse(_) => BindError::Taken,
                    _ => BindError::Failed(Error::LinkClosed),
                })
            })
        });
        let (id, inner, listener) = match opened {
            // An agent that gave up says why, rather than that its link is closed.
            Err(Error::LinkClosed) => return Err(self.link_closed()),
            opened => opened?,
        };
        // The tunnel's state is recorded with the answer, before it is taken.
        let state = shared
            .wait_for(
                |control| {
                    let answer = control.answer(id)?;
                    Some(answer.and_then(|_| control.tunnel_state(inner).ok_or(Error::LinkClosed)))
                },
                |control| control.cancel(id),
            )
            .await?;
        Ok((inner, state, listener))
    }

    /// The error for a request made while the link is down: why the agent gave up, if
    /// it did.
    fn link_closed(&self) -> Error {
        match &*self.shared.state.borrow() {
            LinkState::GaveUp(reason) => match &**reason {
                Error::Unauthorized => Error::Unauthorized,
                Error::VersionMismatch { message } => Error::VersionMismatch {
                    message: message.clone(),
                },
                _ => Error::LinkClosed,
            },
            _ => Error::LinkClosed,
        }
    }

    /// Whether the link to the relay is up.
    pub fn is_connected(&self) -> bool {
        self.shared.read(|control| control.is_link_up())
    }

    /// The relay the agent's link goes to, its round trip, and the figures of every
    /// relay the agent was given (nearest first). The agent logs its choice at `info`.
    pub fn relay(&self) -> RelayChoice {
        self.shared.relay()
    }

    /// The link's state, now and as it changes.
    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }

    /// Waits until the agent gives up (the relay refused it on a reconnect) and
    /// returns why; pending forever while the agent keeps its link.
    pub async fn gave_up(&self) -> Arc<Error> {
        let mut state = self.link_state();
        loop {
            if let LinkState::GaveUp(reason) = &*state.borrow_and_update() {
                return reason.clone();
            }
            if state.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Shared {
    /// See [`Agent::relay`].
    pub(crate) fn relay(&self) -> RelayChoice {
        lock(&self.fleet).choice()
    }

    /// Feeds the control table an input (`f` calls one of its `open`, `close`,
    /// `handle_*`, `link_*` methods), then reports what the table has to tell and wakes
    /// whoever waits on it (the link's pump, callers awaiting an answer, the deadline
    /// keeper), so that no change goes unnoticed.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut Control) -> T) -> T {
        let (result, events) = {
            let mut control = lock(&self.control);
            let result = f(&mut control);
            let events: Vec<_> = std::iter::from_fn(|| control.poll_event()).collect();
            (result, events)
        };
        self.changed.notify_waiters();
        events.into_iter().for_each(reconnect::report);
        result
    }

    /// Takes an output of the control table for its caller (a frame to send, an
    /// answer): nothing anyone else waits for, so no one is woken. (Waking here would
    /// have every waiter wake every other, for ever.)
    pub(crate) fn take<T>(&self, f: impl FnOnce(&mut Control) -> T) -> T {
        f(&mut lock(&self.control))
    }

    /// Reads the control table, changing nothing.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Control) -> T) -> T {
        f(&lock(&self.control))
    }

    /// Handles a control frame from the relay.
    fn handle_frame(&self, frame: crate::wire::Frame) {
        self.update(|control| control.handle_frame(frame));
    }

    /// Waits until `poll` takes what it is looking for from the control table,
    /// checking after every change to it. Runs `cancel` if dropped before.
    pub(crate) async fn wait_for<T>(
        &self,
        mut poll: impl FnMut(&mut Control) -> Option<T>,
        cancel: impl FnOnce(&mut Control),
    ) -> T {
        struct Cancel<'a, F: FnOnce(&mut Control)>(&'a Shared, Option<F>);
        impl<F: FnOnce(&mut Control)> Drop for Cancel<'_, F> {
            fn drop(&mut self) {
                if let Some(cancel) = self.1.take() {
                    self.0.update(cancel);
                }
            }
        }
        let mut guard = Cancel(self, Some(cancel));
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self.take(&mut poll) {
                guard.1 = None;
                return found;
            }
            notified.await;
        }
    }
}

/// Expires the control table's deadlines as they come, whether or not anyone waits for
/// the request concerned (a tunnel's restore after a reconnect has no caller); ends
/// with the agent.
async fn keep_deadlines(agent: std::sync::Weak<Shared>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(deadline) = agent
            .upgrade()
            .map(|shared| shared.read(Control::poll_timeout))
        else {
            return;
        };
        let Some(deadline) = deadline else {
            notified.await;
            continue;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            shared.update(|control| control.handle_timeout(now()));
        }
    }
}

/// The agent used by [`forward`], connected on first use.
static GLOBAL_AGENT: OnceCell<Agent> = OnceCell::const_new();

/// The runtime of [`GLOBAL_AGENT`]: its own, so that the agent outlives whichever
/// runtime first called [`forward`] (each `#[tokio::test]` has one, for example).
fn global_runtime() -> Result<&'static tokio::runtime::Runtime, Error> {
    static RUNTIME: Mutex<Option<&'static tokio::runtime::Runtime>> = Mutex::new(None);
    let mut runtime = lock(&RUNTIME);
    if let Some(runtime) = *runtime {
        return Ok(runtime);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("portferry-agent")
        .enable_all()
        .build()?;
    Ok(*runtime.insert(Box::leak(Box::new(built))))
}

/// Forwards `port` through the relay named by the environment (`PORTFERRY_RELAY`,
/// `PORTFERRY_TOKEN`, optional `PORTFERRY_RELAY_CA`); every call shares one agent,
/// whose tasks run on a small runtime of its own, so calls from any tokio runtime work.
pub async fn forward(port: u16) -> Result<Tunnel, Error> {
    forward_with(port, ForwardOptions::default()).await
}

/// [`forward`] with options.
pub async fn forward_with(port: u16, options: ForwardOptions) -> Result<Tunnel, Error> {
    let agent = GLOBAL_AGENT
        .get_or_try_init(|| async {
            let config = AgentConfig::from_env()?;
            global_runtime()?
                .spawn(Agent::connect(config))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))?
        })
        .await?;
    agent.forward_with(port, options).await
}
