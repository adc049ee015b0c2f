//! Several relays, nearest first: every relay probed at once ([`connect_nearest`]),
//! the figures the probes measured ([`RelayChoice`], [`RelayProbe`]), and the order a
//! failover tries the others in ([`Fleet::failover_order`]).
//!
//! A probe is the link itself: TCP, TLS, hello and welcome, each wait bounded by
//! [`AgentConfig::connect_timeout`]. The winner's link becomes the agent's, so the
//! choice costs no round trip of its own; the others are closed cleanly, also those
//! that answer after the choice, whose figures are still recorded. Which probe wins
//! and when is the sans-IO rule of [`super::race`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::time::timeout_at;

use super::race::{Race, Verdict};
use super::reconnect::{open_link, LinkHalves, Opened, Resume, Step};
use super::AgentConfig;
use crate::error::Error;
use crate::netstack::lock;

/// Which relay an agent's link goes to, and how near each relay it was given is
/// ([`Agent::relay`](super::Agent::relay)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayChoice {
    /// `host:port` of the relay the agent uses now.
    pub address: String,
    /// Its round trip as last measured (hello to welcome).
    pub rtt: Option<Duration>,
    /// Every relay the agent was given, nearest first: those that answered by round
    /// trip, then those not measured yet, then those that failed.
    pub candidates: Vec<RelayProbe>,
}

/// One relay's figure.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayProbe {
    /// `host:port` of the relay.
    pub address: String,
    /// What its last probe or link measured.
    pub outcome: ProbeOutcome,
}

/// What probing a relay found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProbeOutcome {
    /// It welcomed the agent; the round trip from hello to welcome.
    Answered(Duration),
    /// No answer yet: the probe is still under way, or was never made.
    Pending,
    /// It could not be reached, or refused.
    Failed(Arc<Error>),
}

impl ProbeOutcome {
    /// The round trip, if the relay answered.
    pub fn rtt(&self) -> Option<Duration> {
        match self {
            ProbeOutcome::Answered(rtt) => Some(*rtt),
            _ => None,
        }
    }

    /// Sorts relays nearest first: answered by round trip, then pending, then failed.
    fn rank(&self) -> (u8, Duration) {
        match self {
            ProbeOutcome::Answered(rtt) => (0, *rtt),
            ProbeOutcome::Pending => (1, Duration::ZERO),
            ProbeOutcome::Failed(_) => (2, Duration::ZERO),
        }
    }
}

impl std::fmt::Display for RelayProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            ProbeOutcome::Answered(rtt) => write!(f, "{} {:.2} ms", self.address, millis(*rtt)),
            ProbeOutcome::Pending => write!(f, "{} (no answer yet)", self.address),
            ProbeOutcome::Failed(e) => write!(f, "{} (failed: {e})", self.address),
        }
    }
}

/// A duration in milliseconds, for figures.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl std::fmt::Display for RelayChoice {
    /// `a:7835 (0.41 ms; also b:7835 40.52 ms, c:7835 (failed: …))`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.address)?;
        if let Some(rtt) = self.rtt {
            write!(f, " ({:.2} ms round trip", millis(rtt))?;
        } else {
            f.write_str(" (round trip not measured")?;
        }
        let others: Vec<String> = self
            .candidates
            .iter()
            .filter(|c| c.address != self.address)
            .map(ToString::to_string)
            .collect();
        if !others.is_empty() {
            write!(f, "; also {}", others.join(", "))?;
        }
        f.write_str(")")
    }
}

/// The relays an agent was given, their figures and which one it uses: shared by the
/// agent and the probes that finish after the choice. At most
/// [`MAX_RELAYS`](super::config::MAX_RELAYS) entries, made from the configuration only.
#[derive(Debug)]
pub(crate) struct Fleet {
    relays: Vec<RelayProbe>,
    current: usize,
}

impl Fleet {
    /// `relays` (not empty), none measured; the first in use.
    pub(crate) fn new(relays: Vec<String>) -> Fleet {
        let relays = relays
            .into_iter()
            .map(|address| RelayProbe {
                address,
                outcome: ProbeOutcome::Pending,
            })
            .collect();
        Fleet { relays, current: 0 }
    }

    /// How many relays the agent was given.
    pub(crate) fn len(&self) -> usize {
        self.relays.len()
    }

    /// The address of relay `index`.
    pub(crate) fn address(&self, index: usize) -> &str {
        &self.relays[index].address
    }

    /// Which relay the agent uses.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Records what a probe or a link of relay `index` found.
    pub(crate) fn record(&mut self, index: usize, outcome: ProbeOutcome) {
        if let Some(relay) = self.relays.get_mut(index) {
            relay.outcome = outcome;
        }
    }

    /// The agent's link goes to relay `index` now, measured at `rtt`.
    pub(crate) fn use_relay(&mut self, index: usize, rtt: Duration) {
        self.record(index, ProbeOutcome::Answered(rtt));
        self.current = index.min(self.relays.len() - 1);
    }

    /// Indices nearest first.
    fn ranked(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.relays.len()).collect();
        order.sort_by_key(|&i| (self.relays[i].outcome.rank(), i));
        order
    }

    /// The order a failover tries relays in: the others nearest first, then the one
    /// that was lost (it may come back).
    pub(crate) fn failover_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = self
            .ranked()
            .into_iter()
            .filter(|&i| i != self.current)
            .collect();
        order.push(self.current);
        order
    }

    /// What [`Agent::relay`](super::Agent::relay) reports.
    pub(crate) fn choice(&self) -> RelayChoice {
        let current = &self.relays[self.current];
        RelayChoice {
            address: current.address.clone(),
            rtt: current.outcome.rtt(),
            candidates: self
                .ranked()
                .into_iter()
                .map(|i| self.relays[i].clone())
                .collect(),
        }
    }
}

/// A probe's report: a step of its progress and when, or its end.
enum Report {
    Step(usize, Step, Instant),
    Done(usize, Result<Opened, Error>),
}

/// Connects to the nearest of the fleet's relays (see the module docs), resuming each
/// with its ticket from `resume`: the link, to the relay the fleet then says is in use.
/// Records every figure in `fleet`, now and as late probes finish. With one relay, this
/// is one link opened.
pub(crate) async fn connect_nearest(
    config: &AgentConfig,
    fleet: &Arc<Mutex<Fleet>>,
    resume: &Arc<Resume>,
) -> Result<LinkHalves, Error> {
    let relays: Vec<String> = {
        let fleet = lock(fleet);
        (0..fleet.len())
            .map(|i| fleet.address(i).to_owned())
            .collect()
    };
    if let [relay] = relays.as_slice() {
        let opened = open_link(config, None, relay, resume.hello_field(relay), |_| {}).await?;
        resume.welcomed(relay, &opened.ticket);
        lock(fleet).use_relay(0, opened.rtt);
        return Ok(opened.halves);
    }
    let mut probes = Probes::start(config, &relays, |relay| resume.hello_field(relay))?;
    let mut race = Race::new(relays.len(), super::now());
    let mut links: Vec<Option<(LinkHalves, Duration)>> = relays.iter().map(|_| None).collect();
    let mut errors: Vec<Option<Error>> = relays.iter().map(|_| None).collect();
    let chosen = loop {
        let wait = match race.poll(super::now()) {
            Verdict::Chosen(index) => break index,
            Verdict::AllFailed => return Err(first_refusal(errors)),
            Verdict::Wait(until) => until,
        };
        let report = match wait {
            Some(until) => match timeout_at(until.into(), probes.next()).await {
                Ok(report) => report,
                Err(_) => continue,
            },
            None => probes.next().await,
        };
        // Every probe reports its end before there are no more reports.
        let Some(report) = report else {
            return Err(first_refusal(errors));
        };
        match report {
            Report::Step(index, Step::Connected, at) => race.connected(index, at),
            Report::Step(index, Step::HelloSent, at) => race.hello_sent(index, at),
            Report::Done(index, Ok(opened)) => {
                race.answered(index, opened.rtt, super::now());
                resume.welcomed(&relays[index], &opened.ticket);
                links[index] = Some((opened.halves, opened.rtt));
            }
            Report::Done(index, Err(e)) => {
                race.failed(index);
                errors[index] = Some(e);
            }
        }
    };
    let choice = {
        let mut fleet = lock(fleet);
        for (index, link) in links.iter().enumerate() {
            if let Some((_, rtt)) = link {
                fleet.record(index, ProbeOutcome::Answered(*rtt));
            }
        }
        for (index, error) in errors.into_iter().enumerate() {
            if let Some(e) = error {
                fleet.record(index, ProbeOutcome::Failed(Arc::new(e)));
            }
        }
        fleet.current = chosen;
        fleet.choice()
    };
    tracing::info!(relay = %choice.address, "chose the nearest relay: {choice}");
    // The race chooses only a relay that answered, whose link is kept.
    let Some((halves, _)) = links[chosen].take() else {
        return Err(Error::LinkClosed);
    };
    for (halves, _) in links.into_iter().flatten() {
        tokio::spawn(close_link(halves, config.connect_timeout));
    }
    let late = record_late(
        probes,
        Arc::clone(fleet),
        Arc::clone(resume),
        relays,
        config.connect_timeout,
    );
    tokio::spawn(late);
    Ok(halves)
}

/// Probes of several relays under way, driven by whoever awaits [`next`](Self::next):
/// no task of their own, so a probe's steps reach the race without a thread's wake-up.
struct Probes {
    /// Each relay's probe, until it ends.
    running: Vec<Option<ProbeFuture>>,
    /// Steps the probes reported while polled, in order.
    steps: Arc<Mutex<VecDeque<Report>>>,
    /// Ends seen while polling, not yet returned.
    ended: VecDeque<Report>,
}

/// One relay's probe.
type ProbeFuture = Pin<Box<dyn Future<Output = Result<Opened, Error>> + Send>>;

impl Probes {
    /// Starts a probe of every relay in `relays`, each saying `hello_field(relay)` as
    /// its resume field. Fails if the TLS settings cannot be made.
    fn start(
        config: &AgentConfig,
        relays: &[String],
        hello_field: impl Fn(&str) -> Bytes,
    ) -> Result<Probes, Error> {
        let tls = crate::tls::client_config_from(config.relay_ca.as_deref())?;
        let steps: Arc<Mutex<VecDeque<Report>>> = Arc::default();
        let running = relays
            .iter()
            .enumerate()
            .map(|(index, relay)| {
                let (config, relay, tls) = (config.clone(), relay.clone(), tls.clone());
                let resume = hello_field(&relay);
                let steps = steps.clone();
                let probe: ProbeFuture = Box::pin(async move {
                    let progress = move |step| {
                        lock(&steps).push_back(Report::Step(index, step, super::now()));
                    };
                    open_link(&config, Some(tls), &relay, resume, progress).await
                });
                Some(probe)
            })
            .collect();
        Ok(Probes {
            running,
            steps,
            ended: VecDeque::new(),
        })
    }

    /// The next report: a step in the order it happened, then the ends; `None` once
    /// every probe has ended and been reported. At most two steps and an end per probe.
    async fn next(&mut self) -> Option<Report> {
        std::future::poll_fn(|cx| {
            for (index, slot) in self.running.iter_mut().enumerate() {
                if let Some(probe) = slot {
                    if let Poll::Ready(opened) = probe.as_mut().poll(cx) {
                        *slot = None;
                        self.ended.push_back(Report::Done(index, opened));
                    }
                }
            }
            if let Some(step) = lock(&self.steps).pop_front() {
                return Poll::Ready(Some(step));
            }
            if let Some(end) = self.ended.pop_front() {
                return Poll::Ready(Some(end));
            }
            if self.running.iter().all(Option::is_none) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Probes every relay with a hello that leases nothing, and waits for each (every wait
/// bounded): what each one measured. Their links are closed.
pub(crate) async fn measure_all(config: &AgentConfig, relays: &[String]) -> Vec<ProbeOutcome> {
    let mut outcomes = vec![ProbeOutcome::Pending; relays.len()];
    let Ok(mut probes) = Probes::start(config, relays, |_| Bytes::new()) else {
        return outcomes;
    };
    while let Some(report) = probes.next().await {
        match report {
            Report::Step(..) => {}
            Report::Done(index, Ok(opened)) => {
                outcomes[index] = ProbeOutcome::Answered(opened.rtt);
                close_link(opened.halves, config.connect_timeout).await;
            }
            Report::Done(index, Err(e)) => outcomes[index] = ProbeOutcome::Failed(Arc::new(e)),
        }
    }
    outcomes
}

/// Records the figures of probes that end after the choice, and closes their links.
async fn record_late(
    mut probes: Probes,
    fleet: Arc<Mutex<Fleet>>,
    resume: Arc<Resume>,
    relays: Vec<String>,
    limit: Duration,
) {
    while let Some(report) = probes.next().await {
        let (index, outcome) = match report {
            Report::Step(..) => continue,
            Report::Done(index, Ok(opened)) => {
                resume.welcomed(&relays[index], &opened.ticket);
                close_link(opened.halves, limit).await;
                (index, ProbeOutcome::Answered(opened.rtt))
            }
            Report::Done(index, Err(e)) => (index, ProbeOutcome::Failed(Arc::new(e))),
        };
        tracing::debug!(relay = %relays[index], ?outcome, "a relay answered after the choice");
        lock(&fleet).record(index, outcome);
    }
}

/// Closes a link that is not used: TLS `close_notify`, then FIN, within `limit`.
pub(crate) async fn close_link(halves: LinkHalves, limit: Duration) {
    let (_reader, mut writer) = halves;
    let _ = tokio::time::timeout(limit, writer.shutdown()).await;
}

/// The error to report when no relay answered: a refusal (token, version, limit) if
/// one said so, else the first relay's.
fn first_refusal(errors: Vec<Option<Error>>) -> Error {
    let refusal = |e: &Error| {
        matches!(
            e,
            Error::Unauthorized | Error::VersionMismatch { .. } | Error::LimitReached { .. }
        )
    };
    let mut errors: Vec<Error> = errors.into_iter().flatten().collect();
    match errors.iter().position(refusal) {
        Some(index) => errors.swap_remove(index),
        None if !errors.is_empty() => errors.swap_remove(0),
        None => Error::LinkClosed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        let mut fleet = Fleet::new(vec!["a:1".into(), "b:1".into(), "c:1".into(), "d:1".into()]);
        fleet.record(1, ProbeOutcome::Answered(Duration::from_millis(40)));
        fleet.record(2, ProbeOutcome::Failed(Arc::new(Error::LinkClosed)));
        fleet.use_relay(3, Duration::from_millis(1));
        fleet
    }

    #[test]
    fn the_choice_lists_relays_nearest_first() {
        let choice = fleet().choice();
        assert_eq!(choice.address, "d:1");
        assert_eq!(choice.rtt, Some(Duration::from_millis(1)));
        let order: Vec<&str> = choice
            .candidates
            .iter()
            .map(|c| c.address.as_str())
            .collect();
        assert_eq!(order, ["d:1", "b:1", "a:1", "c:1"]);
        let shown = choice.to_string();
        assert!(
            shown.starts_with(
                "d:1 (1.00 ms round trip; also b:1 40.00 ms, a:1 (no answer yet), c:1 (failed"
            ),
            "{shown}"
        );
    }

    #[test]
    fn failover_tries_the_others_nearest_first_and_the_lost_one_last() {
        assert_eq!(fleet().failover_order(), [1, 0, 2, 3]);
    }
}
