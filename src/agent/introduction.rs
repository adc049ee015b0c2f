//! The relay's introduction of each public connection: the [`Frame::Connection`] it
//! writes first on every inner connection, read off before the connection is served.

use std::time::Duration;

use crate::connection::ConnectionInfo;
use crate::netstack::InnerStream;
use crate::wire::handshake::{read_frame, HandshakeError};
use crate::wire::{Frame, FrameKind, MAX_CONNECTION_LEN};

/// How long an accepted inner connection may take to deliver its connection frame. The
/// relay writes it at once, so only a link in trouble takes long.
pub(crate) const INTRODUCTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an inner connection came without its introduction.
#[derive(Debug)]
pub(crate) enum IntroductionError {
    /// The frame did not come within [`INTRODUCTION_TIMEOUT`].
    TimedOut,
    /// The connection ended first, or sent something else.
    Malformed(HandshakeError),
}

impl std::fmt::Display for IntroductionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TimedOut => write!(
                f,
                "no connection frame from the relay within {INTRODUCTION_TIMEOUT:?}"
            ),
            Self::Malformed(e) => write!(f, "no valid connection frame from the relay: {e}"),
        }
    }
}

/// `inner` with what its connection frame says, read off its front; `None` (logged,
/// and the connection reset) if the frame is missing or malformed.
pub(crate) async fn introduced(mut inner: InnerStream) -> Option<(InnerStream, ConnectionInfo)> {
    match read_introduction(&mut inner).await {
        Ok(info) => {
            tracing::debug!(id = info.id(), client = %info.client(), "connection");
            Some((inner, info))
        }
        Err(e) => {
            tracing::warn!("{e}; the connection is reset");
            inner.abort();
            None
        }
    }
}

/// Reads the connection frame at the front of `inner`, and nothing after it.
async fn read_introduction(inner: &mut InnerStream) -> Result<ConnectionInfo, IntroductionError> {
    let read = read_frame(inner, &[FrameKind::Connection], MAX_CONNECTION_LEN);
    match tokio::time::timeout(INTRODUCTION_TIMEOUT, read).await {
        Ok(Ok(Frame::Connection(info))) => Ok(info),
        Ok(Ok(other)) => Err(IntroductionError::Malformed(HandshakeError::Unexpected(
            other.kind(),
        ))),
        Ok(Err(e)) => Err(IntroductionError::Malformed(e)),
        Err(_) => Err(IntroductionError::TimedOut),
    }
}
