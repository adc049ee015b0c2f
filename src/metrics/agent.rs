//! The agent's figures: a collector reading [`AgentStats`](crate::agent::AgentStats) at
//! scrape time, and its readiness (the link is up).

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::write::single;
use super::{build_info, stack, Site};
use crate::agent::Agent;
use crate::netstack::StackStats;

/// The metrics site of `agent`: ready while its link is up.
pub(crate) fn site(agent: Agent) -> Arc<dyn Site> {
    let ready = agent.clone();
    super::site(AgentCollector(agent), move || ready.is_connected())
}

/// Reads an agent's figures at each scrape.
#[derive(Debug)]
struct AgentCollector(Agent);

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = self.0.stats();
        let e = &mut encoder;
        let size = |n: usize| n as u64;
        build_info(e, "agent")?;
        single(
            e,
            MetricType::Gauge,
            "agent_link_up",
            "Whether the agent's link to the relay is up (1) or not (0).",
            None,
            u64::from(stats.link_up),
        )?;
        single(
            e,
            MetricType::Counter,
            "agent_reconnects",
            "Links to the relay made again after one was lost.",
            None,
            stats.reconnects,
        )?;
        single(
            e,
            MetricType::Gauge,
            "agent_tunnels",
            "Tunnels the agent has open.",
            None,
            size(stats.tunnels),
        )?;
        single(
            e,
            MetricType::Gauge,
            "agent_inner_connections",
            "Inner connections from the relay open now, closing ones included.",
            None,
            size(stats.inner_connections_open),
        )?;
        single(
            e,
            MetricType::Counter,
            "agent_inner_connections_opened",
            "Inner connections from the relay accepted.",
            None,
            stats.inner_connections_opened,
        )?;
        single(
            e,
            MetricType::Counter,
            "agent_inner_connections_refused",
            "Inner connections from the relay refused: the local service did not answer, or nothing listened.",
            None,
            stats.inner_connections_refused,
        )?;
        if let Some(rtt) = stats.relay_rtt {
            let metric = e.encode_descriptor(
                "agent_relay_rtt",
                "Round trip to the relay in use, hello to welcome, as last measured.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(rtt.as_secs_f64()).encode(metric)?;
        }
        stack::encode(e, &stats.stack, &StackStats::default())
    }
}
