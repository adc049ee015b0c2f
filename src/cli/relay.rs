//! `portferry relay`: a relay from flags, until a signal stops it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use portferry::relay::{Relay, RelayConfig};
use portferry::token::Token;

use super::args::RelayArgs;
use super::signals::ShutdownSignals;
use crate::{os, say, state_dir};

pub(crate) async fn relay(args: RelayArgs) -> Result<()> {
    let state = state_dir(&args.state);
    let (identity, ca_path) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (portferry::tls::load_identity(cert, key)?, None),
        _ => {
            let pki = portferry::tls::local_pki(&state, &node_domain(&args))?;
            (pki.identity, Some(pki.ca_cert_path))
        }
    };
    let mut tokens: Vec<Token> = args.tokens.iter().map(Token::new).collect();
    if let Some(file) = &args.tokens_file {
        tokens.extend(portferry::token::read_tokens_file(file)?);
    }
    if tokens.is_empty() {
        if args.tokens_file.is_some() {
            bail!("no tokens in the tokens file");
        }
        tokens.push(portferry::token::local_token(&state)?);
    }
    let mut config = RelayConfig::local(
        identity,
        tokens.clone(),
        args.agent_addr.port(),
        args.public_addr.port(),
    );
    config.agent_addr = args.agent_addr;
    config.public_tls_addr = args.public_addr;
    config.public_tls_port = args.public_port;
    config.domain = args.domain.to_ascii_lowercase();
    config.node = args.node.map(|node| node.to_ascii_lowercase());
    config.tcp_bind = args.tcp_bind;
    config.tcp_ports = args.tcp_ports.0..=args.tcp_ports.1;
    // Leases survive a restart, so agents that reconnect keep their URLs.
    config.lease_file = Some(state.join("leases"));
    config.max_tunnels_per_agent = args.max_tunnels_per_agent;
    // The limits whose pools hold file descriptors fit what the process may open; a
    // limit set by a flag is taken as given.
    let open_files = os::raise_open_files_limit();
    tracing::info!(open_files, "open-file limit");
    config.fit_open_files(open_files);
    let set = |limit: &mut usize, flag: Option<usize>| *limit = flag.unwrap_or(*limit);
    set(
        &mut config.max_connections_per_tunnel,
        args.max_connections_per_tunnel,
    );
    set(
        &mut config.max_connections_per_agent,
        args.max_connections_per_agent,
    );
    set(&mut config.max_connections, args.max_connections);
    set(
        &mut config.max_pending_handshakes,
        args.max_pending_handshakes,
    );
    set(
        &mut config.max_pending_agent_handshakes,
        args.max_pending_handshakes,
    );
    set(&mut config.max_agent_sessions, args.max_agent_sessions);
    if let Some(mib) = args.buffer_budget {
        config.buffer_budget = mib.saturating_mul(1024 * 1024);
    }
    config.max_leases_per_token = args.max_leases_per_token;
    config.max_leases = args.max_leases;
    config.handshake_timeout = Duration::from_secs_f64(args.handshake_timeout);
    config.shutdown_grace = Duration::from_secs_f64(args.shutdown_grace);
    config.idle_timeout = Some(Duration::from_secs_f64(args.idle_timeout)).filter(|t| !t.is_zero());
    config.access_log = !args.no_access_log;
    config.accept_proxy_protocol_from = args.accept_proxy_protocol_from;
    let relay = Relay::bind(config)
        .await
        .context("cannot start the relay")?;
    // Installed before the relay says it is ready, so a signal sent on that news is
    // handled (not the default: death).
    let mut signals = ShutdownSignals::new()?;
    tracing::info!(agents = %relay.agent_addr(), public = %relay.public_tls_addr(), "relay listening");
    let agent_host = if args.agent_addr.ip().is_loopback() {
        "localhost".to_string()
    } else {
        args.domain.clone()
    };
    // Plain `NAME=value` lines (what scripts grep for) and one `export` line after
    // them, so that the block pasted into a shell exports all of them.
    let mut ready = "relay ready. In the container, run:\n".to_string();
    ready += &format!(
        "PORTFERRY_RELAY={agent_host}:{}\n",
        relay.agent_addr().port()
    );
    if args.tokens_file.is_none() && args.tokens.is_empty() {
        ready += &format!("PORTFERRY_TOKEN={}\n", tokens[0].expose());
    } else {
        ready += "# and PORTFERRY_TOKEN=<one of the configured tokens>\n";
    }
    let mut exported = "export PORTFERRY_RELAY PORTFERRY_TOKEN".to_string();
    if let Some(ca) = ca_path {
        ready += &format!("PORTFERRY_RELAY_CA={}\n", ca.display());
        exported += " PORTFERRY_RELAY_CA";
    }
    ready += &exported;
    ready += "\n";
    say(&ready);
    let handle = relay.handle();
    let serve = relay.run();
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => return Ok(()),
        () = signals.next() => {}
    }
    tracing::info!(
        grace = ?Duration::from_secs_f64(args.shutdown_grace),
        "shutting down: no new connections, open ones may finish; Ctrl-C again to exit at once"
    );
    handle.shutdown();
    tokio::select! {
        () = serve => {}
        () = signals.next() => tracing::warn!("exiting at once"),
    }
    Ok(())
}

/// The domain this node's tunnels are named under, which its certificate must cover.
fn node_domain(args: &RelayArgs) -> String {
    match &args.node {
        Some(node) => format!("{node}.{}", args.domain),
        None => args.domain.clone(),
    }
}
