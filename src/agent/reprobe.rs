//! Measuring the relays again: an agent given several relays probes them all now and
//! then (every [`AgentConfig::reprobe_interval`], jittered), which keeps the order a
//! failover follows up to date, and while it has no tunnels it moves to a relay that
//! has become clearly nearer than the one it uses. Clearly means
//! Tailscale's rule for its home DERP region: at least [`MIN_GAIN`] *and* a third
//! faster, so two relays at about the same distance never make it flap. An agent with
//! tunnels never moves this way: their addresses would change.
//!
//! [`AgentConfig::reprobe_interval`]: super::AgentConfig::reprobe_interval

use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::nearest::Fleet;
use super::nearest::{close_link, measure_all, millis};
use super::reconnect::{open_link, Opened};
use super::{AgentConfig, Shared};
use crate::netstack::lock;

/// Least improvement of the round trip worth moving for.
pub(crate) const MIN_GAIN: Duration = Duration::from_millis(10);

/// Whether a relay at `candidate` is clearly nearer than one at `current`: by
/// [`MIN_GAIN`] at least, and by a third.
pub(crate) fn clearly_nearer(candidate: Duration, current: Duration) -> bool {
    current.saturating_sub(candidate) >= MIN_GAIN && candidate * 3 <= current * 2
}

/// `interval` with ±25 % of jitter, so that agents started together probe apart.
fn jittered(interval: Duration) -> Duration {
    let quarter = interval.as_millis() as u64 / 4;
    interval - Duration::from_millis(quarter)
        + Duration::from_millis(rand::random_range(0..=2 * quarter))
}

/// Probes the relays every jittered interval until an idle agent finds one clearly
/// nearer than its own; then links to it, holds back the control table's frames (none
/// is in flight, and what is asked meanwhile goes out on the new link) and returns the
/// relay and its link. Pending for ever with one relay, or once the agent is gone.
pub(crate) async fn nearer_relay(agent: &Weak<Shared>) -> (usize, Opened) {
    // What probing needs, held apart from the agent so that dropping the agent while a
    // probe is under way is not delayed by it.
    let Some((config, fleet, resume)) = agent.upgrade().map(|shared| {
        (
            shared.config.clone(),
            shared.fleet.clone(),
            shared.resume.clone(),
        )
    }) else {
        return std::future::pending().await;
    };
    if lock(&fleet).len() < 2 {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(jittered(config.reprobe_interval)).await;
        // Measured with tunnels too: a failover goes to the nearest by the last figures.
        let Some(index) = nearer(&config, &fleet).await else {
            continue;
        };
        let idle = |agent: &Weak<Shared>| {
            agent
                .upgrade()
                .is_some_and(|shared| shared.read(|control| control.is_idle()))
        };
        if !idle(agent) {
            continue;
        }
        let relay = lock(&fleet).address(index).to_owned();
        let hello_field = resume.hello_field(&relay);
        let Ok(opened) = open_link(&config, None, &relay, hello_field, |_| {}).await else {
            continue;
        };
        resume.welcomed(&relay, &opened.ticket);
        let held = agent
            .upgrade()
            .is_some_and(|shared| shared.update(|control| control.hold_if_idle()));
        if held {
            return (index, opened);
        }
        // A tunnel was asked for meanwhile, or the agent is gone: stay.
        close_link(opened.halves, config.connect_timeout).await;
    }
}

/// Probes every relay (each wait bounded) and records the figures in `fleet`; the
/// relay clearly nearer than the one in use, if any.
async fn nearer(config: &AgentConfig, fleet: &Mutex<Fleet>) -> Option<usize> {
    let relays: Vec<String> = {
        let fleet = lock(fleet);
        (0..fleet.len())
            .map(|i| fleet.address(i).to_owned())
            .collect()
    };
    let outcomes = measure_all(config, &relays).await;
    let mut fleet = lock(fleet);
    for (index, outcome) in outcomes.iter().enumerate() {
        fleet.record(index, outcome.clone());
    }
    let current = fleet.current();
    let current_rtt = outcomes[current].rtt()?;
    let (best, best_rtt) = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, outcome)| Some((i, outcome.rtt()?)))
        .min_by_key(|&(i, rtt)| (rtt, i))?;
    let moving = best != current && clearly_nearer(best_rtt, current_rtt);
    tracing::debug!(
        relay = %fleet.address(current),
        "re-probed the relays: {}",
        fleet.choice()
    );
    if moving {
        tracing::info!(
            "relay {} is nearer now ({:.2} ms against {:.2} ms); moving there while the agent has no tunnels",
            fleet.address(best),
            millis(best_rtt),
            millis(current_rtt)
        );
    }
    moving.then_some(best)
}

/// The agent's link goes to relay `index` now, measured at `rtt`: records it and
/// releases the control table's frames onto the new link.
pub(crate) fn moved(shared: &Shared, index: usize, rtt: Duration) {
    lock(&shared.fleet).use_relay(index, rtt);
    shared.update(|control| control.release());
    tracing::info!(relay = %shared.relay().address, "moved to the nearer relay");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn only_a_clearly_nearer_relay_is_worth_moving_to() {
        // 10 ms and a third: both needed.
        assert!(clearly_nearer(ms(20), ms(30)));
        assert!(!clearly_nearer(ms(21), ms(30)));
        assert!(
            !clearly_nearer(ms(1), ms(9)),
            "a third faster, but under 10 ms"
        );
        assert!(!clearly_nearer(ms(100), ms(115)), "15 ms, but not a third");
        assert!(clearly_nearer(ms(1), ms(40)));
        assert!(!clearly_nearer(ms(40), ms(1)));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let waited = jittered(ms(1000));
            assert!(waited >= ms(750) && waited <= ms(1250), "{waited:?}");
        }
    }
}
