//! The enrollment server's memory of failed attempts: [`MAX_FAILURES`]
//! failures within [`FAILURE_WINDOW`] make it answer `rate_limited` to that
//! source for [`BLOCK_DURATION`], valid tokens included. IPv6 sources are
//! counted by /64. No I/O; the time is passed in.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use tokio::time::Instant;

/// Failed attempts from one address within [`FAILURE_WINDOW`] that make
/// the server refuse it.
pub(crate) const MAX_FAILURES: usize = 5;
/// The window in which failures are counted.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address is refused once it reached [`MAX_FAILURES`].
pub(crate) const BLOCK_DURATION: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at once; past that the oldest
/// quiet one is forgotten.
const MAX_TRACKED: usize = 4096;

/// Failed attempts per source address, with a time passed in.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    sources: HashMap<IpAddr, Failures>,
}

#[derive(Debug)]
struct Failures {
    /// When the failures within the window happened, oldest first.
    recent: VecDeque<Instant>,
    /// Refused until then.
    blocked_until: Option<Instant>,
    last: Instant,
}

impl RateLimiter {
    /// How much longer `ip` is refused, if it is.
    pub(crate) fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let key = source_key(ip);
        let failures = self.sources.get_mut(&key)?;
        match failures.blocked_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                // The refusal is over: start counting afresh.
                self.sources.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Counts a failure of `ip` at `now`; true when this one makes the
    /// address refused.
    pub(crate) fn record_failure(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_TRACKED {
            self.forget_quiet(now);
        }
        let failures = self.sources.entry(key).or_insert_with(|| Failures {
            recent: VecDeque::new(),
            blocked_until: None,
            last: now,
        });
        failures.last = now;
        if failures.blocked_until.is_some_and(|until| until > now) {
            return false;
        }
        failures.blocked_until = None;
        while failures
            .recent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= FAILURE_WINDOW)
        {
            failures.recent.pop_front();
        }
        failures.recent.push_back(now);
        if failures.recent.len() >= MAX_FAILURES {
            failures.recent.clear();
            failures.blocked_until = Some(now + BLOCK_DURATION);
            return true;
        }
        false
    }

    /// Forgets addresses with nothing in force; if all are in force, the
    /// one quiet for longest.
    fn forget_quiet(&mut self, now: Instant) {
        self.sources.retain(|_, failures| {
            failures.blocked_until.is_some_and(|until| until > now)
                || failures
                    .recent
                    .back()
                    .is_some_and(|at| now.saturating_duration_since(*at) < FAILURE_WINDOW)
        });
        if self.sources.len() >= MAX_TRACKED {
            if let Some(oldest) = self
                .sources
                .iter()
                .min_by_key(|(_, failures)| failures.last)
                .map(|(key, _)| *key)
            {
                self.sources.remove(&oldest);
            }
        }
    }
}

/// The address failures are counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64, which one host typically holds whole.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP address")
    }

    #[test]
    fn five_failures_in_a_minute_refuse_the_address_for_a_minute() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        let source = ip("198.18.0.7");
        for index in 0..MAX_FAILURES - 1 {
            let at = start + Duration::from_secs(index as u64);
            assert!(!limiter.record_failure(source, at));
            assert_eq!(limiter.blocked(source, at), None);
        }
        let fifth = start + Duration::from_secs(10);
        assert!(limiter.record_failure(source, fifth), "the fifth blocks");
        assert_eq!(
            limiter.blocked(source, fifth + Duration::from_secs(1)),
            Some(BLOCK_DURATION - Duration::from_secs(1))
        );
        // Other addresses are not affected.
        assert_eq!(limiter.blocked(ip("198.18.0.8"), fifth), None);
        // Failures while refused neither extend nor re-announce it.
        assert!(!limiter.record_failure(source, fifth + Duration::from_secs(2)));
        assert_eq!(limiter.blocked(source, fifth + BLOCK_DURATION), None);
        // Counting starts afresh.
        assert!(!limiter.record_failure(source, fifth + BLOCK_DURATION));
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        let source = ip("198.18.0.7");
        for index in 0..20u64 {
            // One failure every 16 s: never 5 within 60 s.
            let at = start + Duration::from_secs(index * 16);
            assert!(!limiter.record_failure(source, at), "failure {index}");
        }
    }

    #[test]
    fn ipv6_is_counted_by_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:198.18.0.1")), ip("198.18.0.1"));
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        for index in 0..(MAX_TRACKED as u32 + 100) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + index));
            limiter.record_failure(source, start);
        }
        assert!(limiter.sources.len() <= MAX_TRACKED);
    }
}
