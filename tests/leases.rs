//! Tunnel leases on a real relay: bounded per token and per relay. (Saving them where
//! the README's production command keeps them is in `tests/restart.rs`.)

mod common;

use std::time::Duration;

use common::{echo_service, echo_via_url, eventually, Fixture, RawAgent, TempDir, HTTP1};

use portferry::wire::{ErrorCode, NEW_AGENT};
use portferry::{Error, Limit};

const STEP: Duration = Duration::from_secs(20);
/// The agent's port the hand-driven links forward.
const PORT: u16 = 8080;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_bounded_per_token_refused_with_a_code_and_counted() {
    let fx = Fixture::start_with(STEP, |config| {
        config.max_leases_per_token = 3;
    })
    .await;
    let (first, second) = (fx.agent().await, fx.agent().await);
    let _a = first.forward(1001).await.unwrap();
    let _b = first.forward(1002).await.unwrap();
    let _c = second.forward(1001).await.unwrap();
    let refused = second.forward(1002).await.unwrap_err();
    assert!(
        matches!(&refused, Error::LimitReached { limit: Limit::LeasesPerToken, message } if message.contains("max_leases_per_token")),
        "{refused:?}"
    );
    let stats = fx.stats();
    assert_eq!(
        (stats.leases, stats.tunnels, stats.refused_by_limit),
        (3, 3, 1)
    );
    // A lease given up makes room.
    drop(_a);
    eventually(STEP, "the closed tunnel's lease to end", || async {
        fx.stats().leases == 2
    })
    .await;
    second.forward(1002).await.unwrap();
}

/// The selector and the verifier the lease file holds for `hostname`'s agent, as bytes.
fn file_contents_for(path: &std::path::Path, hostname: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|line| line.contains(hostname))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let bytes = |hex: &str| -> Vec<u8> {
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    Some((bytes(fields[0]), bytes(fields[1])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_the_token_and_the_lease_file_never_gets_the_victims_url() {
    let state = TempDir::new("leases-hijack");
    let file = state.path().join("leases");
    let fx = Fixture::start_with(STEP, |config| config.lease_file = Some(file.clone())).await;
    let victim = fx.agent().await;
    let service = echo_service().await;
    let tunnel = victim.forward(service.port()).await.unwrap();
    let url = tunnel.tls_socket().0.to_owned();
    eventually(STEP, "the victim's lease saved", || async {
        file_contents_for(&file, &url).is_some()
    })
    .await;
    let (selector, verifier) = file_contents_for(&file, &url).unwrap();
    assert_eq!((selector.len(), verifier.len()), (16, 32));
    let tls = fx.connector(HTTP1);

    // The impostor has the token and everything the file says, and keeps trying: as
    // the old identity (the selector), and as a ticket-sized forgery.
    let forgeries = [selector.clone(), [&selector[..], &verifier[..]].concat()];
    let (mut served, mut rounds, mut impostors) = (0, 0, Vec::new());
    for round in 0..10 {
        let forged = &forgeries[round % 2];
        let mut impostor = RawAgent::connect(&fx, &fx.token, forged).await;
        let taken = impostor.forward(PORT, false).await;
        assert_ne!(
            taken.hostname, url,
            "round {round}: the impostor got the URL"
        );
        assert_ne!(&impostor.ticket[..], &forged[..]);
        impostors.push(impostor);
        rounds += 1;
        if echo_via_url(&tls, &tunnel, b"mine", STEP)
            .await
            .ok()
            .as_deref()
            == Some(b"mine")
        {
            served += 1;
        }
    }
    assert_eq!(
        served, rounds,
        "the victim's URL failed while the impostor tried"
    );
    assert!(victim.is_connected());
    // Each forgery is a new agent beside the victim, never a takeover.
    assert_eq!(fx.stats().agent_sessions, 1 + impostors.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_a_valid_ticket_is_refused_too_soon_and_counted() {
    let fx = Fixture::start_with(STEP, |config| {
        config.min_takeover_interval = Duration::from_secs(30);
    })
    .await;
    let mut holder = RawAgent::connect(&fx, &fx.token, NEW_AGENT).await;
    let url = holder.forward(PORT, false).await.hostname;
    let refused = RawAgent::try_connect(&fx, &fx.token, &holder.ticket)
        .await
        .err()
        .expect("a takeover within the interval was welcomed");
    assert_eq!(refused.code, ErrorCode::TOO_SOON);
    assert!(
        refused.message.contains("min_takeover_interval"),
        "{}",
        refused.message
    );
    assert_eq!(fx.stats().refused_by_limit, 1);
    // The holder keeps its session and its URL.
    holder.sync().await;
    assert_eq!(fx.stats().agent_sessions, 1);
    assert_eq!(holder.forward(PORT + 1, false).await.request_id, 2);
    // Once its link has ended, the ticket's agent is back at once, URL and all.
    let ticket = holder.ticket.clone();
    drop(holder);
    fx.until_stats("the holder's session ended", |s| s.agent_sessions == 0)
        .await;
    let mut back = RawAgent::connect(&fx, &fx.token, &ticket).await;
    assert_eq!(back.ticket, ticket);
    assert_eq!(back.forward(PORT, false).await.hostname, url);
}
