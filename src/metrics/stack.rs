//! The figures of a userspace stack ([`StackStats`]), relay or agent side.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::write::{family, single};
use crate::netstack::StackStats;

/// Writes the `portferry_stack_*` metrics: gauges from `live` (the stacks running now),
/// counters from `live` and `ended` (those of stacks gone) together, so that they never
/// go down.
pub(crate) fn encode(
    encoder: &mut DescriptorEncoder,
    live: &StackStats,
    ended: &StackStats,
) -> fmt::Result {
    let mut total = *ended;
    total.add_counters(live);
    let bytes = Some(&Unit::Bytes);
    let size = |n: usize| n as u64;
    single(
        encoder,
        MetricType::Gauge,
        "stack_flows",
        "Inner TCP connections the userspace stacks hold, closing ones included.",
        None,
        size(live.flows),
    )?;
    single(
        encoder,
        MetricType::Gauge,
        "stack_buffer",
        "Bytes of socket buffers the userspace stacks hold.",
        bytes,
        size(live.buffer_bytes),
    )?;
    single(
        encoder,
        MetricType::Gauge,
        "stack_buffer_peak",
        "The most bytes of socket buffers one userspace stack has held at once.",
        bytes,
        size(live.buffer_bytes_peak),
    )?;
    single(
        encoder,
        MetricType::Gauge,
        "stack_queued",
        "Bytes of packets waiting to go out on the link.",
        bytes,
        size(live.queued_bytes),
    )?;
    single(
        encoder,
        MetricType::Counter,
        "stack_buffer_budget_refusals",
        "Window growths refused or cut short because a buffer budget was reached.",
        None,
        total.buffer_budget_refusals,
    )?;
    single(
        encoder,
        MetricType::Counter,
        "stack_packets_in",
        "Packets from the link delivered to a connection or answered.",
        None,
        total.packets_in,
    )?;
    family(
        encoder,
        "stack_packets_dropped",
        "Packets from the link dropped, by reason.",
        MetricType::Counter,
        "reason",
        &[
            ("malformed", total.dropped_malformed),
            ("wrong_address", total.dropped_wrong_address),
            ("unknown_flow", total.dropped_unknown_flow),
        ],
    )?;
    single(
        encoder,
        MetricType::Counter,
        "stack_refused_syns",
        "Connection attempts from the link answered with a reset.",
        None,
        total.refused_syns,
    )
}
