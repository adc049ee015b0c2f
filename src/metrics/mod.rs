//! Prometheus metrics and health over plain HTTP, for the relay
//! ([`RelayConfig::metrics_addr`](crate::relay::RelayConfig::metrics_addr)) and the agent
//! ([`Agent::serve_metrics`](crate::Agent::serve_metrics)).
//!
//! Pages: `/metrics` (the OpenMetrics text format, which Prometheus reads), `/healthz`
//! (200 while the process serves at all) and `/readyz` (200 while ready for traffic,
//! else 503). Every figure is read at scrape time from the counters the relay and agent
//! keep anyway ([`RelayStats`](crate::relay::RelayStats),
//! [`AgentStats`](crate::agent::AgentStats)), by a prometheus-client collector; no
//! label value is ever a hostname, token or client address.
//!
//! Layout: `request` (parsing a request head), `response` (the pages), `http` (the
//! server), `write` (one metric into the encoder), `stack` (a userspace stack's
//! figures), `relay` and `agent` (each side's collector and readiness).

#[cfg(feature = "agent")]
pub(crate) mod agent;
mod http;
#[cfg(feature = "relay")]
pub(crate) mod relay;
mod request;
mod response;
mod stack;
mod write;

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub(crate) use http::serve;
pub(crate) use response::Site;

/// The prefix of every metric's name.
const PREFIX: &str = "portferry";

/// A site serving `collector`'s metrics, ready while `ready` says so.
struct Collected<R> {
    registry: Registry,
    ready: R,
}

impl<R: Fn() -> bool + Send + Sync + 'static> Site for Collected<R> {
    fn metrics(&self) -> String {
        let mut text = String::new();
        // Writing to a String fails only if a collector does, which ours never do.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "cannot encode the metrics");
        }
        text
    }

    fn ready(&self) -> bool {
        (self.ready)()
    }
}

/// The site of `collector`'s figures (under [`PREFIX`]), ready while `ready` says so.
fn site(
    collector: impl Collector,
    ready: impl Fn() -> bool + Send + Sync + 'static,
) -> std::sync::Arc<dyn Site> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(collector));
    std::sync::Arc::new(Collected { registry, ready })
}

/// Writes `portferry_build_info{version, role} 1`: which build serves, as what.
fn build_info(encoder: &mut DescriptorEncoder, role: &'static str) -> fmt::Result {
    let info = Info::new([("version", env!("CARGO_PKG_VERSION")), ("role", role)]);
    let metric = encoder.encode_descriptor(
        "build",
        "The build of portferry serving, and its role (relay or agent).",
        None,
        info.metric_type(),
    )?;
    info.encode(metric)
}
