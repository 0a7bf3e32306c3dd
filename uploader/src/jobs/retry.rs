//! When a failed attempt is tried again: capped exponential backoff with full
//! jitter, and a bound on attempts after which the job is RETAINED. It only
//! computes delays; the worker decides which errors are transient.

use std::time::Duration;

use time::OffsetDateTime;

/// Retry schedule for transient errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (the first one included) before the job is RETAINED.
    pub max_attempts: u32,
    /// Backoff ceiling after the first failed attempt; doubles per attempt.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base: Duration::from_secs(1),
            max: Duration::from_secs(5 * 60),
        }
    }
}

impl RetryPolicy {
    /// The ceiling for the wait after `attempts` attempts have failed:
    /// `min(max, base × 2^(attempts − 1))`.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1);
        let factor = 2u32.saturating_pow(doublings);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// How long to wait before the next attempt, or `None` when `attempts`
    /// (attempts made so far, as counted by the job store) used up the budget
    /// and the job should be RETAINED.
    ///
    /// Full jitter (uniform in `[0, ceiling]`, "Exponential Backoff And
    /// Jitter", AWS Architecture Blog, 2015) spreads retries of many jobs that
    /// failed together, e.g. when the vault or the destination was down.
    pub fn next_delay(&self, attempts: u32) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let ceiling = self.ceiling(attempts);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Without OS randomness, waiting the full ceiling is the safe choice.
        let jittered = match getrandom::u64() {
            Ok(r) if nanos < u64::MAX => r % (nanos + 1),
            _ => nanos,
        };
        Some(Duration::from_nanos(jittered))
    }

    /// [`RetryPolicy::next_delay`] as a point in time after `now`.
    pub fn next_attempt_at(&self, attempts: u32, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.next_delay(attempts)
            .map(|d| now.saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = RetryPolicy {
            max_attempts: 40,
            ..RetryPolicy::default()
        };
        for attempts in 1..40 {
            let ceiling = p.ceiling(attempts);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..50 {
                let d = p.next_delay(attempts).expect("budget left");
                assert!(d <= ceiling, "attempt {attempts}: {d:?} > {ceiling:?}");
                assert!(d <= p.max);
                seen.insert(d);
            }
            assert!(seen.len() > 1, "attempt {attempts}: no jitter");
        }
    }

    #[test]
    fn budget_is_bounded() {
        let p = RetryPolicy::default();
        assert!(p.next_delay(7).is_some());
        assert_eq!(p.next_delay(8), None);
        assert_eq!(p.next_attempt_at(8, OffsetDateTime::now_utc()), None);
        let now = OffsetDateTime::now_utc();
        let at = p.next_attempt_at(1, now).expect("budget left");
        assert!(at >= now && at <= now + time::Duration::seconds(1));
    }
}
