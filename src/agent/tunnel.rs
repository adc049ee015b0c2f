//! Tunnel handles: [`Tunnel`] (URL, sockets, state; closes when dropped) and
//! [`TunnelListener`], whose connections the program accepts itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::introduction::introduced;
use super::{Agent, TunnelAddress, TunnelState};
use crate::connection::ConnectionInfo;
use crate::error::Error;
use crate::netstack::{InnerStream, Listener, ListenerStopper};

/// An open tunnel. Dropping it closes the tunnel; [`close`](Tunnel::close) does the
/// same and waits for the relay to confirm.
///
/// What it reports is what the agent's control table holds now: after a reconnect in
/// which the relay gave the tunnel a new address, [`url`](Tunnel::url) and the sockets
/// are the new ones, and [`state`](Tunnel::state) tells of the change.
#[derive(Debug)]
pub struct Tunnel {
    agent: Agent,
    /// The inner port: the tunnel's key in the control table.
    inner: u16,
    /// Its state, as the control table publishes it.
    state: watch::Receiver<TunnelState>,
    /// The forwarded local port; `None` for a [`TunnelListener`]'s tunnel.
    local_port: Option<u16>,
    /// Serves the forwarded connections, and stops its listener at once; `None` for a
    /// [`TunnelListener`]'s tunnel.
    forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    open: bool,
}

impl Tunnel {
    pub(crate) fn new(
        agent: Agent,
        inner: u16,
        state: watch::Receiver<TunnelState>,
        local_port: Option<u16>,
        forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    ) -> Self {
        Tunnel {
            agent,
            inner,
            state,
            local_port,
            forwarder,
            open: true,
        }
    }

    /// The tunnel's state, now and as it changes: `changed()` on the receiver returns
    /// when the relay gives the tunnel a new address ([`TunnelState::Moved`]) or stops
    /// routing it ([`TunnelState::Lost`]), and fails once the tunnel is closed.
    pub fn state(&self) -> watch::Receiver<TunnelState> {
        let mut state = self.state.clone();
        state.mark_unchanged();
        state
    }

    /// Where the public reaches the tunnel now (for a lost tunnel, where it did).
    pub fn address(&self) -> TunnelAddress {
        self.state.borrow().address().clone()
    }

    /// The public URL, `https://<label>.<domain>`, with `:<port>` unless it is 443.
    pub fn url(&self) -> String {
        self.state.borrow().address().url()
    }

    /// The TLS endpoint: the tunnel's hostname and the relay's public TLS port.
    pub fn tls_socket(&self) -> (String, u16) {
        let state = self.state.borrow();
        let (host, port) = state.address().tls_socket();
        (host.to_owned(), port)
    }

    /// The raw TCP endpoint; only for a tunnel forwarded with `unencrypted`.
    pub fn tcp_socket(&self) -> Result<(String, u16), Error> {
        let state = self.state.borrow();
        let (host, port) = state.address().tcp_socket()?;
        Ok((host.to_owned(), port))
    }

    /// The forwarded local port (for a [`TunnelListener`], the inner port it listens
    /// on).
    pub fn port(&self) -> u16 {
        self.local_port.unwrap_or(self.inner)
    }

    /// Closes the tunnel and waits until the relay has stopped routing to it, so the
    /// port can be forwarded again at once.
    pub async fn close(mut self) -> Result<(), Error> {
        let inner = self.inner;
        if !self.shutdown() {
            // Disconnected: the relay holds no route to the tunnel beyond its lease,
            // and will not renew it.
            return Ok(());
        }
        self.agent
            .shared
            .wait_for(
                |control| control.close_outcome(inner),
                |control| control.forget_close(inner),
            )
            .await
    }

    /// Stops serving and tells the relay; nothing waits. Returns whether the relay
    /// will confirm.
    fn shutdown(&mut self) -> bool {
        if !std::mem::replace(&mut self.open, false) {
            return false;
        }
        if let Some((forwarder, listening)) = self.forwarder.take() {
            // Stopped here rather than when the aborted task drops the listener, so the
            // port can be forwarded again right away.
            listening.stop();
            forwarder.abort();
        }
        let inner = self.inner;
        self.agent
            .shared
            .update(|control| control.close(inner, super::now()))
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A tunnel whose connections the program accepts itself ([`Agent::listen`]).
#[derive(Debug)]
pub struct TunnelListener {
    pub(crate) tunnel: Tunnel,
    pub(crate) listener: Listener,
}

/// A connection accepted from a [`TunnelListener`]: `AsyncRead + AsyncWrite`, served
/// straight from the userspace stack. Dropping it closes the connection (after what
/// was written is delivered); shutting down its write side sends a FIN.
///
/// It knows who is calling: [`peer_addr`](Self::peer_addr) is the public client's
/// address, and [`info`](Self::info) how the client reached the relay.
#[derive(Debug)]
pub struct TunnelStream(InnerStream, ConnectionInfo);

impl TunnelStream {
    /// The public client's address and port, as the relay saw it (or as a balancer
    /// the relay trusts reported it).
    pub fn peer_addr(&self) -> SocketAddr {
        self.1.client()
    }

    /// The relay's address the client connected to.
    pub fn local_addr(&self) -> SocketAddr {
        self.1.relay_addr()
    }

    /// How the client reached the relay: the edge (TLS with its server name and ALPN,
    /// or raw TCP) and the relay's id for the connection.
    pub fn info(&self) -> &ConnectionInfo {
        &self.1
    }

    /// Resets the connection instead of closing it.
    pub fn abort(self) {
        self.0.abort()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TunnelListener {
    /// The tunnel (URL, sockets).
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// Waits for the next connection; fails once the link to the relay is gone.
    pub async fn accept(&mut self) -> Result<TunnelStream, Error> {
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                // One client that stalls its handshake is no reason to stop serving.
                Err(crate::netstack::ConnectError::TimedOut) => continue,
                Err(_) => return Err(Error::LinkClosed),
            };
            if let Some((stream, info)) = introduced(stream).await {
                return Ok(TunnelStream(stream, info));
            }
        }
    }

    /// Closes the tunnel and waits for the relay to confirm.
    pub async fn close(self) -> Result<(), Error> {
        self.tunnel.close().await
    }
}
