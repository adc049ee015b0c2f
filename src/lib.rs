//! portferry: expose a port from inside a container through a relay.
//!
//! A program calls [`forward`] and gets a random, unguessable `https://` URL whose TLS
//! is terminated at the relay; optionally also a raw TCP socket, and HTTP/2. Dropping
//! the [`Tunnel`] closes it.
//!
//! ```rust,no_run
//! # async fn run() -> Result<(), portferry::Error> {
//! // Start your server on 127.0.0.1:8000, then:
//! let tunnel = portferry::forward(8000).await?;
//! println!("listening at {}", tunnel.url());          // https://<random>.<domain>[:port]
//! println!("TLS socket: {:?}", tunnel.tls_socket());  // (hostname, port)
//! // ... serve ...
//! tunnel.close().await?;                               // or just drop it
//! # Ok(()) }
//! ```
//!
//! # Configuration: the environment
//!
//! [`forward`] and [`AgentConfig::from_env`] read:
//!
//! | variable | meaning |
//! |---|---|
//! | `PORTFERRY_RELAY` | `host:port` of the relay's agent endpoint; or several, comma-separated, and the agent uses the nearest ([`Agent::relay`] says which) |
//! | `PORTFERRY_TOKEN` | the agent's secret |
//! | `PORTFERRY_RELAY_CA` | optional: PEM file of CA certificates to trust for the relay instead of the built-in web roots |
//!
//! `portferry relay` prints them, ready to paste. Without them, [`forward`] fails with
//! [`Error::NotConfigured`] naming what is missing. For an explicit configuration, use
//! [`Agent::connect`] with an [`AgentConfig`]; an [`Agent`] is one link to the relay,
//! shared by all its tunnels, and reports the link's state ([`Agent::link_state`],
//! [`Agent::gave_up`]).
//!
//! Options ([`ForwardOptions`]): `unencrypted` (also a raw TCP socket), `h2` (offer
//! HTTP/2 on the TLS side), `local_addr` (forward somewhere other than
//! `127.0.0.1:<port>`, then `[::1]:<port>`).
//!
//! **Tunnels on demand.** The API is cheap to call, so a web handler can start a tunnel
//! per request — say, one notebook server per user — and redirect the user to its URL:
//!
//! ```rust,no_run
//! # use std::collections::HashMap;
//! # async fn handler(agent: &portferry::Agent, tunnels: &mut HashMap<String, portferry::Tunnel>,
//! #                  user: String, port: u16) -> Result<String, portferry::Error> {
//! let tunnel = agent.forward(port).await?;   // the URL answers within milliseconds
//! let url = tunnel.url();
//! tunnels.insert(user, tunnel);              // lives as long as the user's session; dropping closes it
//! Ok(url)                                    // answer with a 303 redirect to `url`
//! # }
//! ```
//!
//! **A tunnel that moves.** While the agent is away, the relay keeps each tunnel's
//! address for a grace period. An agent back later gets a new one: the handle's
//! [`Tunnel::url`] and sockets then say the new address, and [`Tunnel::state`] (a
//! `tokio::sync::watch` of [`TunnelState`]) tells of the move, or that the relay no
//! longer routes the tunnel at all:
//!
//! ```rust,no_run
//! # async fn watch(tunnel: portferry::Tunnel) {
//! let mut state = tunnel.state();
//! while state.changed().await.is_ok() {
//!     match &*state.borrow_and_update() {
//!         portferry::TunnelState::Moved(address) => println!("now at {}", address.url()),
//!         portferry::TunnelState::Lost { error, .. } => eprintln!("tunnel lost: {error}"),
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! **No local port at all.** [`Agent::listen`] returns a [`TunnelListener`] whose
//! `accept()` yields `AsyncRead + AsyncWrite` streams straight from the userspace stack
//! (`examples/listen_hyper.rs` serves them with hyper):
//!
//! ```rust,no_run
//! # async fn run() -> Result<(), portferry::Error> {
//! use portferry::{Agent, AgentConfig, ForwardOptions};
//! let agent = Agent::connect(AgentConfig::from_env()?).await?;
//! let mut listener = agent.listen(ForwardOptions::new()).await?;
//! println!("serving on {}", listener.tunnel().url());
//! let stream = listener.accept().await?;     // serve it like a socket
//! # drop(stream); Ok(()) }
//! ```
//!
//! **Who is calling.** Each accepted stream knows its public client ([`TunnelStream::peer_addr`],
//! [`TunnelStream::info`]); a forwarded service can get it as a PROXY protocol header
//! ([`ForwardOptions::proxy_protocol`]):
//!
//! ```rust,no_run
//! # async fn run(agent: portferry::Agent) -> Result<(), portferry::Error> {
//! let mut listener = agent.listen(portferry::ForwardOptions::new()).await?;
//! let stream = listener.accept().await?;
//! println!("connection {} from {}", stream.info().id(), stream.peer_addr());
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! The agent (this library, linked into a program in the container) keeps ONE TLS
//! connection to the relay and carries raw IP packets over it. Both ends run a
//! userspace TCP/IP stack ([smoltcp](https://docs.rs/smoltcp)), so no per-connection
//! kernel socket is opened between relay and container and the agent needs no
//! privileges.
//!
//! ```text
//!  public client                relay                                    container (agent)
//!  ─────────────                ─────                                    ─────────────────
//!  https://<id>.<domain> ─TLS─► edge: TLS termination, SNI → tunnel
//!  <host>:<tcp port> ───TCP──►  edge: raw TCP port → tunnel
//!                                    │ plaintext bytes
//!                                    ▼
//!                               netstack (smoltcp), one   ══ one TLS link ══► netstack (smoltcp)
//!                               per agent session             wire frames:      │ accepted inner TCP
//!                               opens inner TCP flows         control + IP      ▼
//!                                                             packets        splice ─► 127.0.0.1:<port>
//! ```
//!
//! Public modules: [`agent`] (the library above), [`relay`] (the relay server, as
//! `portferry relay` runs it), [`tls`] (certificates for a relay), [`token`] (agent
//! tokens). Internal ones, bottom up: `wire` (the frame format of the agent link),
//! `netstack` (the userspace stack, one small smoltcp interface per flow), `link`
//! (frames over TLS, heartbeats), `splice` (bytes between an inner flow and a kernel
//! socket).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The internal modules keep a few helpers for this crate's own tests and benches
// (`internals` feature); without it they are unused. Dead code is still caught by
// `cargo clippy --all-targets`, which builds with `internals`.
// A lean build (`agent` or `relay` alone) leaves unused what only the other side
// needs of the shared modules.
#![cfg_attr(
    not(all(feature = "internals", feature = "agent", feature = "relay")),
    allow(dead_code, unused_imports)
)]

/// Declares internal modules: private, unless the `internals` feature is on. That
/// feature exists for this crate's own integration tests, benches and fuzz targets
/// (which reach the frame codec, the stack and the link directly); it is not part of
/// the supported API, and its modules are hidden from the docs and exempt from semver.
macro_rules! internal_modules {
    ($($(#[$attr:meta])* $name:ident;)*) => {$(
        $(#[$attr])*
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        $(#[$attr])*
        #[cfg(not(feature = "internals"))]
        mod $name;
    )*};
}

internal_modules! {
    link;
    netstack;
    splice;
    state_dir;
    wire;
}

#[cfg(feature = "agent")]
pub mod agent;
mod connection;
/// The sample service of `portferry demo` (for the binary and the benches).
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod demo;
mod error;
mod limit;
#[cfg(any(feature = "agent", feature = "relay"))]
mod metrics;
#[cfg(feature = "relay")]
pub mod relay;
mod task;
#[cfg(feature = "relay")]
pub mod tls;
#[cfg(not(feature = "relay"))]
mod tls;
pub mod token;

#[cfg(feature = "agent")]
pub use agent::{
    forward, forward_with, Agent, AgentConfig, AgentStats, ForwardOptions, LinkState,
    ProxyProtocol, Tunnel, TunnelAddress, TunnelListener, TunnelState, TunnelStream,
};
pub use connection::{ConnectionInfo, Edge};
pub use error::{parse_port, Error};
pub use limit::Limit;
pub use token::Token;
