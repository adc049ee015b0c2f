//! The agent endpoint's driver: the TLS handshake and hello of each agent connection
//! under one deadline, then the link and its [`Session`] until the link ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use super::accept::{admit_client, Handshakes};
use super::edge::{bind_tunnel_port, CLIENT_HELLO_DEADLINE};
use super::pool::{AddressPlace, Place, Source};
use super::session::{admit, Admission, Counted, Session, Step};
use super::Shared;
use crate::limit::Limit;
use crate::link::{self, FrameReader, FrameWriter, CONTROL_QUEUE};
use crate::netstack::Stack;
use crate::task::AbortOnDrop;
use crate::wire::{handshake, ErrorCode, ErrorFrame, Frame, Welcome};

/// A session's place in [`RelayConfig::max_agent_sessions`](super::RelayConfig::max_agent_sessions):
/// shared by token, and within a token by source address.
type SessionPlace = Place<usize, Source>;

/// One connection to the agent endpoint: its TLS handshake, then its link as
/// [`serve_agent_link`] serves it, under one deadline for the TLS handshake and the hello.
pub(super) async fn serve_agent(shared: Arc<Shared>, mut tcp: TcpStream, handshake: AddressPlace) {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let pool = Handshakes::Agents;
    let Some((client, handshake)) =
        admit_client(&shared, &mut tcp, handshake, pool, deadline).await
    else {
        return;
    };
    let from = Some(client.client.ip());
    // Without it the link still works, with a longer queue below the scheduler.
    let _ = link::configure_socket(&tcp, &shared.config.link);
    let accept = timeout_at(deadline, shared.agent_tls.accept(tcp));
    let Some(Ok(Ok(tls))) = handshake.run(CLIENT_HELLO_DEADLINE, accept).await else {
        shared.count_failed_handshake();
        return;
    };
    serve_agent_link(shared, tls, from, handshake, deadline).await;
}

/// One agent session on a secured stream from `from`: the hello by `deadline`, then
/// tunnel requests until the link ends, or until its session place is taken back.
pub(super) async fn serve_agent_link<S>(
    shared: Arc<Shared>,
    stream: S,
    from: Option<std::net::IpAddr>,
    handshake: AddressPlace,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let hello = timeout_at(deadline, authenticate(&shared, stream, from));
    let (stream, slot, admission) = match handshake.run(CLIENT_HELLO_DEADLINE, hello).await {
        Some(Ok(Some(admitted))) => admitted,
        // Counted where it failed.
        Some(Ok(None)) => return,
        Some(Err(_)) | None => {
            shared.count_failed_handshake();
            return;
        }
    };
    drop(handshake);
    let taken_back = slot.taken_back();
    tokio::pin!(taken_back);

    let (read_half, write_half) = tokio::io::split(stream);
    let stack = Stack::new(shared.config.stack.clone());
    let (control, outbound) = mpsc::channel(CONTROL_QUEUE);
    let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
    let mut link = AbortOnDrop(tokio::spawn(link::run(
        FrameReader::new(read_half),
        FrameWriter::new(write_half),
        stack.clone(),
        inbound_tx,
        outbound,
        shared.config.link.clone(),
    )));
    let session = Live {
        session: shared
            .update(|registry| Session::start(registry, stack, &admission, Instant::now())),
        shared: shared.clone(),
        _slot: slot,
    };
    loop {
        let frame = tokio::select! {
            frame = inbound.recv() => frame,
            // A newcomer of a token or an address holding fewer sessions took the place.
            () = &mut taken_back => None,
        };
        let Some(frame) = frame else { break };
        let answer = match shared.update(|registry| session.session.handle(registry, frame)) {
            Step::Answer(answer) => answer,
            Step::BindTcp(pending) => {
                let tcp = bind_tunnel_port(&shared, &pending.hostname).await;
                shared.update(|registry| session.session.bound(registry, pending, tcp))
            }
        };
        if let Some(limit) = answer.refused {
            shared.count_refusal(limit);
        }
        if control.send(answer.frame).await.is_err() {
            break;
        }
    }
    drop(session);
    drop(control);
    let _ = (&mut link.0).await;
}

/// A session while its link lives; ended in the registry when dropped (also when its
/// task is aborted).
struct Live {
    session: Session,
    shared: Arc<Shared>,
    /// This session's place in [`RelayConfig::max_agent_sessions`](super::RelayConfig::max_agent_sessions).
    _slot: SessionPlace,
}

impl Drop for Live {
    fn drop(&mut self) {
        let now = Instant::now();
        self.shared
            .update(|registry| self.session.end(registry, now));
        self.shared.lease_expiry.notify_one();
    }
}

/// The unauthenticated phase of an agent after TLS: a hello of bounded size, its token,
/// a session slot, and the welcome. `None` (counted) if the agent is turned away.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    from: Option<std::net::IpAddr>,
) -> Option<(S, SessionPlace, Admission)> {
    let hello = match handshake::read_hello(&mut stream).await {
        Ok(hello) => hello,
        Err(error) => {
            shared.count_failed_handshake();
            refuse(&mut stream, ErrorCode::PROTOCOL, error.to_string()).await;
            return None;
        }
    };
    let (tokens, running) = (&shared.config.tokens, shared.is_running());
    let now = Instant::now();
    let admitted = shared.update(|registry| admit(&hello, tokens, running, registry, now));
    let admission = match admitted {
        Ok(admission) => admission,
        Err(refusal) => {
            match refusal.counted {
                Counted::FailedHandshake => shared.count_failed_handshake(),
                Counted::Unauthorized => {
                    shared.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
                }
                Counted::Limit(limit) => shared.count_refusal(limit),
                Counted::Uncounted => {}
            }
            refuse(&mut stream, refusal.code, refusal.message).await;
            return None;
        }
    };
    let Some(slot) = shared
        .session_slots
        .admit(admission.token, Source::of(from).0)
    else {
        let limit = Limit::AgentSessions;
        shared.count_refusal(limit);
        let message = format!(
            "the relay serves its maximum of {} agent sessions, and this token (or, within \
             it, this address) holds as many as it may ({limit}); try again later",
            shared.config.max_agent_sessions
        );
        refuse(&mut stream, ErrorCode::limit_reached(limit), message).await;
        return None;
    };
    let welcome = Frame::Welcome(Welcome {
        version: admission.version,
        ticket: admission.ticket(),
    });
    handshake::send(&mut stream, &welcome).await.ok()?;
    Some((stream, slot, admission))
}

/// Tells an agent why it is turned away, and closes the link.
async fn refuse(stream: &mut (impl AsyncWrite + Unpin), code: ErrorCode, message: String) {
    let refusal = Frame::Error(ErrorFrame {
        request_id: 0,
        code,
        message,
    });
    if handshake::send(stream, &refusal).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}
