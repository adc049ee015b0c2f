//! portferry: expose a port from inside a container through a relay.
//!
//! The agent (this library, linked into a program in the container) keeps ONE TLS
//! connection to the relay and carries raw IP packets over it. Both ends run a
//! userspace TCP/IP stack ([smoltcp]), so no per-connection kernel socket is opened
//! between relay and container and the agent needs no privileges.
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
//! Modules, bottom up:
//! - [`wire`]: the frame format of the agent link (sans-IO, zero-copy payloads);
//! - [`netstack`]: a userspace TCP/IP stack over queues of packets, one small smoltcp
//!   interface per flow so per-packet cost does not grow with the number of flows;
//! - [`splice`]: moves bytes between an inner TCP flow and any tokio byte stream
//!   (a kernel `TcpStream`, a TLS stream) straight through the flow's socket buffers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod demo;
mod error;
pub mod link;
pub mod netstack;
pub mod relay;
pub mod splice;
pub mod state_dir;
pub mod tls;
pub mod token;
pub mod wire;

pub use agent::{
    forward, forward_with, Agent, AgentConfig, ForwardOptions, Tunnel, TunnelListener, TunnelStream,
};
pub use error::{parse_port, Error};
