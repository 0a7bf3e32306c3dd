//! When a failed attempt is tried again: capped exponential backoff with full
//! jitter. A failure that only needs time (the vault or the provider
//! unreachable, a 5xx, a timeout) is retried for a window of time, so an
//! outage of minutes or hours does not use up a handful of attempts; a failure
//! that may be permanent has a small budget of its own; a permanent one
//! retains the job at once. It only computes delays; the worker classifies
//! the errors.

use std::time::Duration;

use time::OffsetDateTime;

/// How a failed attempt is retried (the worker classifies its error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Retrying cannot help until someone changes something: RETAINED now.
    Permanent,
    /// May be permanent (an unexpected 4xx, a delivered copy that did not
    /// verify): retried within [`RetryPolicy::max_doubtful`].
    Doubtful,
    /// Passes with time (unreachable, 5xx, throttled, timed out): retried
    /// within [`RetryPolicy::window`].
    Transient,
}

/// Retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed attempts whose error may be permanent before the job is RETAINED.
    pub max_doubtful: u32,
    /// How long transient failures are retried, from the first failed
    /// attempt since creation or the last resend.
    pub window: Duration,
    /// Backoff ceiling after the first failed attempt; doubles per attempt.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_doubtful: 5,
            window: Duration::from_secs(6 * 3600),
            base: Duration::from_secs(1),
            max: Duration::from_secs(5 * 60),
        }
    }
}

/// The job's retry history, as the job store counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    /// Attempts made so far (the failed one included).
    pub attempts: u32,
    /// Failed attempts before this one whose error may be permanent.
    pub doubtful_failures: u32,
    /// The first failed attempt since creation or the last resend, if an
    /// earlier one failed.
    pub retrying_since: Option<OffsetDateTime>,
}

/// Why no further attempt is scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// The error is permanent.
    Permanent,
    /// Transient failures went on for the whole window.
    WindowOver {
        /// Since when the job had been failing.
        since: OffsetDateTime,
        /// The window.
        window: Duration,
    },
    /// The budget for failures that may be permanent is used up.
    DoubtfulBudget(u32),
}

impl RetryPolicy {
    /// When to try again after a failure of `class`, or why not.
    pub fn decide(
        &self,
        class: FailureClass,
        state: RetryState,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime, GiveUp> {
        match class {
            FailureClass::Permanent => return Err(GiveUp::Permanent),
            FailureClass::Doubtful => {
                if state.doubtful_failures.saturating_add(1) >= self.max_doubtful {
                    return Err(GiveUp::DoubtfulBudget(self.max_doubtful));
                }
            }
            FailureClass::Transient => {
                let since = state.retrying_since.unwrap_or(now);
                let window = time::Duration::try_from(self.window).unwrap_or(time::Duration::MAX);
                if now - since >= window {
                    return Err(GiveUp::WindowOver {
                        since,
                        window: self.window,
                    });
                }
            }
        }
        let delay = self.next_delay(state.attempts);
        Ok(now.saturating_add(time::Duration::try_from(delay).unwrap_or(time::Duration::MAX)))
    }

    /// The ceiling for the wait after `attempts` attempts have failed:
    /// `min(max, base × 2^(attempts − 1))`.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1);
        let factor = 2u32.saturating_pow(doublings);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// How long to wait before the next attempt after `attempts` attempts.
    ///
    /// Full jitter (uniform in `[0, ceiling]`, "Exponential Backoff And
    /// Jitter", AWS Architecture Blog, 2015) spreads retries of many jobs that
    /// failed together, e.g. when the vault or the destination was down.
    pub fn next_delay(&self, attempts: u32) -> Duration {
        let ceiling = self.ceiling(attempts);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Without OS randomness, waiting the full ceiling is the safe choice.
        let jittered = match getrandom::u64() {
            Ok(r) if nanos < u64::MAX => r % (nanos + 1),
            _ => nanos,
        };
        Duration::from_nanos(jittered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(attempts: u32, doubtful: u32, since: Option<OffsetDateTime>) -> RetryState {
        RetryState {
            attempts,
            doubtful_failures: doubtful,
            retrying_since: since,
        }
    }

    #[test]
    fn ceilings_double_and_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(5), Duration::from_secs(16));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn delays_stay_within_bounds_and_vary() {
        let p = RetryPolicy::default();
        for attempts in 1..40 {
            let ceiling = p.ceiling(attempts);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                let d = p.next_delay(attempts);
                assert!(d <= ceiling, "attempt {attempts}: {d:?} > {ceiling:?}");
                assert!(d <= p.max);
                seen.insert(d);
            }
            assert!(seen.len() > 1, "attempt {attempts}: no jitter");
        }
    }

    /// Transient failures are not counted: hundreds of attempts are fine as
    /// long as the window is not over, and the window starts at the first failure.
    #[test]
    fn transient_failures_retry_for_the_window_not_a_count() {
        let p = RetryPolicy::default();
        let now = OffsetDateTime::now_utc();
        let at = p
            .decide(
                FailureClass::Transient,
                state(500, 0, Some(now - time::Duration::hours(5))),
                now,
            )
            .expect("inside the window");
        assert!(at >= now && at <= now + time::Duration::seconds(300));
        // The first failure starts the window.
        assert!(
            p.decide(FailureClass::Transient, state(1, 0, None), now)
                .is_ok()
        );
        let since = now - time::Duration::hours(6);
        assert_eq!(
            p.decide(FailureClass::Transient, state(3, 0, Some(since)), now),
            Err(GiveUp::WindowOver {
                since,
                window: p.window
            })
        );
    }

    #[test]
    fn doubtful_failures_have_a_small_budget_and_permanent_none() {
        let p = RetryPolicy::default();
        let now = OffsetDateTime::now_utc();
        // Failures 1..=4 are retried; the 5th retains.
        for before in 0..4 {
            assert!(
                p.decide(
                    FailureClass::Doubtful,
                    state(before + 1, before, Some(now)),
                    now
                )
                .is_ok()
            );
        }
        assert_eq!(
            p.decide(FailureClass::Doubtful, state(5, 4, Some(now)), now),
            Err(GiveUp::DoubtfulBudget(5))
        );
        // Transient failures in between do not spend the doubtful budget.
        assert!(
            p.decide(FailureClass::Doubtful, state(40, 3, Some(now)), now)
                .is_ok()
        );
        assert_eq!(
            p.decide(FailureClass::Permanent, state(1, 0, None), now),
            Err(GiveUp::Permanent)
        );
    }
}
