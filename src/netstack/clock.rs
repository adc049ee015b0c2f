//! The one place where tokio's clock becomes smoltcp's.
//!
//! smoltcp's own `Instant::now()` reads the wall clock: a step of the system clock
//! would stall or fire every timer at once, and on tokio's paused clock (tests, fuzz
//! targets) smoltcp's timers would never move. Every stack instead measures time as
//! the tokio time elapsed since the stack was created.

use std::time::Duration;

use smoltcp::time::Instant;

/// A stack's clock: smoltcp instants are microseconds since `epoch` on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: tokio::time::Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub(crate) fn new() -> Self {
        Clock {
            epoch: tokio::time::Instant::now(),
        }
    }

    /// The current time, for smoltcp.
    pub(crate) fn now(&self) -> Instant {
        let elapsed = self.epoch.elapsed().as_micros();
        Instant::from_micros(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }

    /// The tokio instant of a smoltcp instant of this clock, for sleeping until it.
    pub(crate) fn deadline(&self, at: Instant) -> tokio::time::Instant {
        let micros = u64::try_from(at.total_micros()).unwrap_or(0);
        self.epoch + Duration::from_micros(micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_clock_both_ways() {
        let clock = Clock::new();
        assert_eq!(clock.now(), Instant::from_micros(0));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now(), Instant::from_millis(1500));
        assert_eq!(
            clock.deadline(Instant::from_millis(2000)),
            tokio::time::Instant::now() + Duration::from_millis(500)
        );
    }
}
