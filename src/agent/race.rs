//! The rule that picks the nearest of several relays probed at once, as a sans-IO table:
//! probes report their progress with the time it happened, and [`Race::poll`] says
//! whether a relay is chosen, or until when to wait. No I/O, and the clock is a
//! parameter.
//!
//! A relay's figure is its round trip as the agent sees it: from the hello sent to the
//! welcome received, once TCP and TLS are up (one round trip plus the relay's work).
//! The first relay to be welcomed wins unless another could still beat its figure,
//! and the race never waits for that longer than [`WINDOW`] (or half the first
//! figure, if larger) after the first welcome. A probe could still beat figure `f`
//! while nothing it has shown so far is already slower than `f`: its TCP connect (a
//! round trip of the kernel's, which the hello's round trip does not beat) and, once
//! its hello is out, the wait for the welcome. So a relay that is far away is given
//! up as soon as it is slower than the winner, without waiting for its answer; a relay
//! that accepts TCP but never answers is waited for only until the window ends.

use std::time::{Duration, Instant};

/// Least time the race waits for a better relay after the first one is welcomed.
pub(crate) const WINDOW: Duration = Duration::from_millis(10);

/// How far one probe has got.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Connecting TCP, since the race started.
    Connecting,
    /// TCP is up after `tcp_rtt`; TLS under way.
    Handshaking { tcp_rtt: Duration },
    /// The hello went out at `hello_at`; waiting for the welcome.
    Welcoming {
        tcp_rtt: Duration,
        hello_at: Instant,
    },
    /// Welcomed, `rtt` after its hello.
    Answered { rtt: Duration },
    /// The relay could not be reached, or refused.
    Failed,
}

/// What to do now ([`Race::poll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// This relay (an index into the probed list) is the nearest that answered.
    Chosen(usize),
    /// Every probe failed.
    AllFailed,
    /// Wait for the next report, or until this time if given, and poll again.
    Wait(Option<Instant>),
}

/// Probes of several relays started together (see the module docs).
#[derive(Debug)]
pub(crate) struct Race {
    started: Instant,
    probes: Vec<Stage>,
    /// When the first relay was welcomed, and its figure.
    first: Option<(Instant, Duration)>,
}

impl Race {
    /// A race of `count` probes starting at `now`.
    pub(crate) fn new(count: usize, now: Instant) -> Race {
        Race {
            started: now,
            probes: vec![Stage::Connecting; count],
            first: None,
        }
    }

    /// Probe `index` has its TCP connection, at `now`.
    pub(crate) fn connected(&mut self, index: usize, now: Instant) {
        if let Some(stage @ Stage::Connecting) = self.probes.get_mut(index) {
            *stage = Stage::Handshaking {
                tcp_rtt: now.saturating_duration_since(self.started),
            };
        }
    }

    /// Probe `index` sent its hello at `now`.
    pub(crate) fn hello_sent(&mut self, index: usize, now: Instant) {
        if let Some(stage) = self.probes.get_mut(index) {
            if let Stage::Handshaking { tcp_rtt } = *stage {
                *stage = Stage::Welcoming {
                    tcp_rtt,
                    hello_at: now,
                };
            }
        }
    }

    /// Probe `index` was welcomed, `rtt` after its hello; `now` is when.
    pub(crate) fn answered(&mut self, index: usize, rtt: Duration, now: Instant) {
        if let Some(stage) = self.probes.get_mut(index) {
            *stage = Stage::Answered { rtt };
            self.first.get_or_insert((now, rtt));
        }
    }

    /// Probe `index` failed.
    pub(crate) fn failed(&mut self, index: usize) {
        if let Some(stage) = self.probes.get_mut(index) {
            *stage = Stage::Failed;
        }
    }

    /// Whether a relay is chosen at `now` (see the module docs).
    pub(crate) fn poll(&self, now: Instant) -> Verdict {
        let answered = self
            .probes
            .iter()
            .enumerate()
            .filter_map(|(i, stage)| match stage {
                Stage::Answered { rtt } => Some((i, *rtt)),
                _ => None,
            });
        // The lowest figure; of equal ones, the relay given first.
        let Some((best, best_rtt)) = answered.min_by_key(|&(i, rtt)| (rtt, i)) else {
            let all_failed = self.probes.iter().all(|s| matches!(s, Stage::Failed));
            return if all_failed {
                Verdict::AllFailed
            } else {
                Verdict::Wait(None)
            };
        };
        let Some((first_at, first_rtt)) = self.first else {
            return Verdict::Chosen(best);
        };
        let deadline = first_at + WINDOW.max(first_rtt / 2);
        if now >= deadline {
            return Verdict::Chosen(best);
        }
        let mut contenders = 0;
        let mut wake = deadline;
        for stage in &self.probes {
            // Until when this probe could still beat the best figure, if it can.
            let beaten_at = match *stage {
                Stage::Connecting => Some(self.started + best_rtt),
                Stage::Handshaking { tcp_rtt } if tcp_rtt < best_rtt => None,
                Stage::Welcoming { tcp_rtt, hello_at } if tcp_rtt < best_rtt => {
                    Some(hello_at + best_rtt)
                }
                _ => continue,
            };
            match beaten_at {
                Some(at) if at <= now => {}
                Some(at) => {
                    contenders += 1;
                    wake = wake.min(at);
                }
                None => contenders += 1,
            }
        }
        if contenders == 0 {
            Verdict::Chosen(best)
        } else {
            Verdict::Wait(Some(wake))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_far_relay_still_connecting_is_given_up_once_slower_than_the_winner() {
        let t0 = Instant::now();
        let mut race = Race::new(2, t0);
        race.connected(0, t0 + ms(1));
        race.hello_sent(0, t0 + ms(3));
        assert_eq!(race.poll(t0 + ms(3)), Verdict::Wait(None));
        race.answered(0, ms(1), t0 + ms(4));
        // Relay 1 has not even connected after 4 ms: its round trip is over 1 ms.
        assert_eq!(race.poll(t0 + ms(4)), Verdict::Chosen(0));
    }

    #[test]
    fn a_relay_that_never_answers_tls_is_waited_for_only_until_the_window_ends() {
        let t0 = Instant::now();
        let mut race = Race::new(2, t0);
        // Relay 1 accepts TCP at once, then says nothing.
        race.connected(1, t0);
        race.connected(0, t0 + ms(1));
        race.hello_sent(0, t0 + ms(3));
        race.answered(0, ms(2), t0 + ms(5));
        let end = t0 + ms(5) + WINDOW;
        assert_eq!(race.poll(t0 + ms(5)), Verdict::Wait(Some(end)));
        assert_eq!(race.poll(end), Verdict::Chosen(0));
    }

    #[test]
    fn a_nearer_relay_answering_within_the_window_wins() {
        let t0 = Instant::now();
        let mut race = Race::new(2, t0);
        race.connected(0, t0 + ms(2));
        race.connected(1, t0 + ms(1));
        race.hello_sent(0, t0 + ms(4));
        race.hello_sent(1, t0 + ms(5));
        race.answered(0, ms(2), t0 + ms(6));
        // Relay 1's hello is 1 ms out, under relay 0's figure: it may still win, and is
        // given up at 2 ms after its hello.
        assert_eq!(race.poll(t0 + ms(6)), Verdict::Wait(Some(t0 + ms(7))));
        race.answered(1, ms(1), t0 + ms(6));
        assert_eq!(race.poll(t0 + ms(6)), Verdict::Chosen(1));
    }

    #[test]
    fn a_welcome_slower_than_the_winner_is_not_waited_for() {
        let t0 = Instant::now();
        let mut race = Race::new(2, t0);
        race.connected(1, t0 + ms(1));
        race.hello_sent(1, t0 + ms(2));
        race.connected(0, t0 + ms(1));
        race.hello_sent(0, t0 + ms(2));
        race.answered(0, ms(3), t0 + ms(5));
        // Relay 1 has waited 3 ms for its welcome: no better than relay 0.
        assert_eq!(race.poll(t0 + ms(5)), Verdict::Chosen(0));
    }

    #[test]
    fn the_window_grows_with_a_far_first_answer_and_failures_are_skipped() {
        let t0 = Instant::now();
        let mut race = Race::new(3, t0);
        race.failed(2);
        race.connected(1, t0 + ms(5));
        race.connected(0, t0 + ms(40));
        race.hello_sent(0, t0 + ms(120));
        race.answered(0, ms(40), t0 + ms(160));
        // Relay 1 connected in 5 ms but its TLS lags: it may still be nearer, for half
        // of relay 0's figure.
        assert_eq!(race.poll(t0 + ms(160)), Verdict::Wait(Some(t0 + ms(180))));
        assert_eq!(race.poll(t0 + ms(180)), Verdict::Chosen(0));
    }

    #[test]
    fn every_probe_failing_is_reported() {
        let t0 = Instant::now();
        let mut race = Race::new(2, t0);
        race.failed(0);
        assert_eq!(race.poll(t0), Verdict::Wait(None));
        race.failed(1);
        assert_eq!(race.poll(t0), Verdict::AllFailed);
    }
}
