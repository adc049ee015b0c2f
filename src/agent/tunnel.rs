//! Tunnel handles: [`Tunnel`] (URL, sockets; closes when dropped) and
//! [`TunnelListener`], whose connections the program accepts itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

use super::Agent;
use crate::error::Error;
use crate::netstack::{InnerStream, Listener, ListenerStopper};
use crate::wire::Forwarded;

/// An open tunnel. Dropping it closes the tunnel; [`close`](Tunnel::close) does the
/// same and waits for the relay to confirm.
#[derive(Debug)]
pub struct Tunnel {
    agent: Agent,
    forwarded: Forwarded,
    /// The forwarded local port; `None` for a [`TunnelListener`]'s tunnel.
    local_port: Option<u16>,
    url: String,
    tcp_host: String,
    /// Serves the forwarded connections, and stops its listener at once; `None` for a
    /// [`TunnelListener`]'s tunnel.
    forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    open: bool,
}

impl Tunnel {
    pub(crate) fn new(
        agent: Agent,
        forwarded: Forwarded,
        local_port: Option<u16>,
        forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    ) -> Self {
        let url = if forwarded.tls_port == 443 {
            format!("https://{}", forwarded.hostname)
        } else {
            format!("https://{}:{}", forwarded.hostname, forwarded.tls_port)
        };
        // The raw TCP socket is on the relay node: the hostname without the tunnel
        // label. Every `*.localhost` name is this machine (RFC 6761), but only curl and
        // browsers resolve them: `localhost` itself resolves everywhere.
        let node = forwarded
            .hostname
            .split_once('.')
            .map_or(forwarded.hostname.as_str(), |(_, node)| node);
        let tcp_host = if node.ends_with(".localhost") {
            "localhost".to_owned()
        } else {
            node.to_owned()
        };
        Tunnel {
            agent,
            forwarded,
            local_port,
            url,
            tcp_host,
            forwarder,
            open: true,
        }
    }

    /// The public URL, `https://<label>.<domain>`, with `:<port>` unless it is 443.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TLS endpoint: the tunnel's hostname and the relay's public TLS port.
    pub fn tls_socket(&self) -> (&str, u16) {
        (&self.forwarded.hostname, self.forwarded.tls_port)
    }

    /// The raw TCP endpoint; only for a tunnel forwarded with `unencrypted`.
    pub fn tcp_socket(&self) -> Result<(&str, u16), Error> {
        match self.forwarded.tcp_port {
            Some(port) => Ok((&self.tcp_host, port)),
            None => Err(Error::NotUnencrypted),
        }
    }

    /// The forwarded local port (for a [`TunnelListener`], the inner port it listens
    /// on).
    pub fn port(&self) -> u16 {
        self.local_port.unwrap_or(self.forwarded.port)
    }

    /// Closes the tunnel and waits until the relay has stopped routing to it, so the
    /// port can be forwarded again at once.
    pub async fn close(mut self) -> Result<(), Error> {
        let inner = self.forwarded.port;
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
        let inner = self.forwarded.port;
        let shared = &self.agent.shared;
        let confirms = shared.update(|control| control.close(inner, super::now()));
        shared.changed.notify_waiters();
        confirms
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
#[derive(Debug)]
pub struct TunnelStream(InnerStream);

impl TunnelStream {
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
            match self.listener.accept().await {
                Ok(stream) => return Ok(TunnelStream(stream)),
                // One client that stalls its handshake is no reason to stop serving.
                Err(crate::netstack::ConnectError::TimedOut) => continue,
                Err(_) => return Err(Error::LinkClosed),
            }
        }
    }

    /// Closes the tunnel and waits for the relay to confirm.
    pub async fn close(self) -> Result<(), Error> {
        self.tunnel.close().await
    }
}
