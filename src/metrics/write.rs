//! Writing one metric (a counter, a gauge, a family of either by one label) into a
//! prometheus-client [`DescriptorEncoder`], for the collectors.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Writes a counter (without the `_total` the encoder appends to its name) or a gauge
/// (`kind`) `name`.
pub(crate) fn single(
    encoder: &mut DescriptorEncoder,
    kind: MetricType,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, unit, kind)?;
    sample(metric, kind, value)
}

/// Writes one sample of a counter or a gauge (`kind`).
fn sample(metric: MetricEncoder, kind: MetricType, value: u64) -> fmt::Result {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(value).encode(metric),
    }
}

/// Writes a family `name` of counters or gauges (`kind`) with one sample per
/// `(label value, value)`.
pub(crate) fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (label_value, value) in values {
        let labels = [(label, *label_value)];
        sample(metric.encode_family(&labels)?, kind, *value)?;
    }
    Ok(())
}
