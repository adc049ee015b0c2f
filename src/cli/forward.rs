//! `portferry forward`: tunnels for local ports, followed until a signal or a loss.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use portferry::agent::{
    retry_at_limits, Agent, AgentConfig, ForwardOptions, Tunnel, TunnelAddress, TunnelState,
};

use super::args::ForwardArgs;
use super::signals::ShutdownSignals;
use crate::say;

/// The lines describing a tunnel's address.
pub(crate) fn describe(address: &TunnelAddress) -> String {
    let (host, port) = address.tls_socket();
    let mut text = format!("url:        {}\ntls socket: {host}:{port}\n", address.url());
    if let Ok((host, port)) = address.tcp_socket() {
        text += &format!("tcp socket: {host}:{port}\n");
    }
    text
}

/// The addresses `--to HOST:PORT` stands for, IPv4 first (so `localhost` is
/// 127.0.0.1, then ::1).
async fn resolve_target(to: &str) -> Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(to)
        .await
        .with_context(|| format!("cannot resolve --to {to}"))?
        .collect();
    addrs.sort_by_key(SocketAddr::is_ipv6);
    addrs.dedup();
    if addrs.is_empty() {
        bail!("--to {to} resolves to no address");
    }
    Ok(addrs)
}

pub(crate) async fn forward(args: ForwardArgs) -> Result<()> {
    let mut signals = ShutdownSignals::new()?;
    let mut config = AgentConfig::from_env()?;
    config.failover_after = Duration::from_secs_f64(args.failover_after);
    let several_relays = config.relays()?.len() > 1;
    // Bound first, so that a taken address fails the command before any tunnel opens.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?,
        ),
        None => None,
    };
    let mut requests = Vec::new();
    for spec in args.specs()? {
        let local_addrs = match &spec.to {
            Some(to) => resolve_target(to).await?,
            None => Vec::new(),
        };
        let options = ForwardOptions::new()
            .unencrypted(spec.unencrypted)
            .h2(spec.h2)
            .local_addrs(local_addrs)
            .proxy_protocol(spec.proxy_protocol);
        requests.push((spec.port, options));
    }
    // A relay at its sessions' limit (or this token's or address's share of them)
    // refuses the link for now: wait and try again; only a refused token or version ends
    // the command. A port refused at a limit fails it (the agent's own tunnels may be
    // what holds that limit), naming the port and the limit.
    let connect = retry_at_limits(|| Agent::connect(config.clone()), say_retrying);
    let Some(agent) = signals.unless(connect).await else {
        return Ok(());
    };
    let agent = agent?;
    // Serves until the command returns and its runtime ends.
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("metrics at http://{addr}/metrics (health: /healthz, /readyz)");
        }
        tokio::spawn(agent.serve_metrics(listener));
    }
    let relay = agent.relay();
    if several_relays {
        say(&format!("relay:      {relay}\n"));
    }
    let mut tunnels = Vec::new();
    for (port, options) in requests {
        match signals.unless(agent.forward_with(port, options)).await {
            Some(Ok(tunnel)) => {
                say(&format!(
                    "port:       {port}\n{}\n",
                    describe(&tunnel.address())
                ));
                tunnels.push(tunnel);
            }
            Some(Err(e)) => {
                if !tunnels.is_empty() {
                    signals.closing(close_all(tunnels)).await;
                }
                return Err(e).with_context(|| format!("cannot forward port {port}"));
            }
            None => {
                signals.closing(close_all(tunnels)).await;
                return Ok(());
            }
        }
    }
    say("forwarding; Ctrl-C to stop\n");
    if let Some(stop) = signals
        .unless(follow(&agent, relay.address, &tunnels))
        .await
    {
        signals.closing(close_all(tunnels)).await;
        return Err(stop);
    }
    signals.closing(close_all(tunnels)).await;
    Ok(())
}

/// Tells the user that the relay refused at a limit and when the next try is.
fn say_retrying(refusal: &portferry::Error, delay: Duration) {
    tracing::warn!("{refusal}; trying again in {delay:.1?}");
}

/// Prints the new address of each tunnel that moves (and the relay, when the agent
/// moved from `relay` to another), until forwarding cannot go on: a tunnel is lost, or
/// the relay refuses the agent. Says why.
async fn follow(agent: &Agent, mut relay: String, tunnels: &[Tunnel]) -> anyhow::Error {
    let (changed, mut changes) = tokio::sync::mpsc::channel(tunnels.len().max(1));
    // Dropped on return, which ends the watchers.
    let mut watchers = tokio::task::JoinSet::new();
    for tunnel in tunnels {
        let (port, mut state, changed) = (tunnel.port(), tunnel.state(), changed.clone());
        watchers.spawn(async move {
            while state.changed().await.is_ok() {
                let now = state.borrow_and_update().clone();
                if changed.send((port, now)).await.is_err() {
                    return;
                }
            }
        });
    }
    loop {
        tokio::select! {
            reason = agent.gave_up() => {
                return anyhow::anyhow!("{reason}; the relay refuses this agent, so the tunnels are gone");
            }
            Some((port, state)) = changes.recv() => match state {
                TunnelState::Lost { error, .. } => {
                    return anyhow::anyhow!("the tunnel of port {port} is gone: {error}");
                }
                moved => {
                    let now = agent.relay();
                    let why = if now.address == relay {
                        "the relay no longer held its old address".to_owned()
                    } else {
                        say(&format!("relay:      {now}\n"));
                        let why = format!("relay {relay} was lost; now through relay {}", now.address);
                        relay = now.address;
                        why
                    };
                    say(&format!(
                        "moved:      port {port}; {why}\nport:       {port}\n{}\n",
                        describe(moved.address())
                    ));
                }
            }
        }
    }
}

/// Closes every tunnel at once and waits for the relay to confirm each; the last error,
/// if any.
async fn close_all(tunnels: Vec<Tunnel>) -> Result<(), portferry::Error> {
    let mut closing = tokio::task::JoinSet::new();
    for tunnel in tunnels {
        closing.spawn(tunnel.close());
    }
    let mut outcome = Ok(());
    while let Some(closed) = closing.join_next().await {
        if let Ok(Err(e)) = closed {
            outcome = Err(e);
        }
    }
    outcome
}
