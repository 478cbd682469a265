//! The one log throttle: one line per kind and period at info, the rest
//! counted (or sent to debug), so that nothing a peer or an application does
//! can flood the log.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one log line per kind and period through; counts the rest.
#[derive(Debug)]
pub(crate) struct Throttle<K> {
    period: Duration,
    /// How many kinds it remembers at most (kinds that come from outside,
    /// such as addresses, must not grow the map without bound).
    capacity: usize,
    /// When each kind was last let through, and how many were held back since.
    last: Mutex<BTreeMap<K, (Instant, u64)>>,
}

impl<K: Ord> Throttle<K> {
    /// For a fixed set of kinds (reasons, limits).
    pub(crate) fn new(period: Duration) -> Self {
        Self::bounded(period, usize::MAX)
    }

    /// For kinds from outside: past `capacity` remembered kinds, those not
    /// seen for a period are forgotten; a new kind that still finds no room
    /// is let through without being remembered.
    pub(crate) fn bounded(period: Duration, capacity: usize) -> Self {
        Self {
            period,
            capacity,
            last: Mutex::new(BTreeMap::new()),
        }
    }

    /// `Some(n)` if an event of `kind` should be logged at info now, `n`
    /// being how many like it were held back since the last one; `None`
    /// if it should go to debug.
    pub(crate) fn admit(&self, kind: K) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    /// As [`admit`](Self::admit), at `now`.
    pub(crate) fn admit_at(&self, kind: K, now: Instant) -> Option<u64> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match last.get_mut(&kind) {
            Some((at, quiet)) if now.duration_since(*at) < self.period => {
                *quiet += 1;
                None
            }
            Some((at, quiet)) => {
                *at = now;
                Some(std::mem::take(quiet))
            }
            None => {
                if last.len() >= self.capacity {
                    let period = self.period;
                    last.retain(|_, (at, _)| now.duration_since(*at) < period);
                }
                if last.len() < self.capacity {
                    last.insert(kind, (now, 0));
                }
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_reports_how_many_it_held_back() {
        let throttle = Throttle::new(Duration::ZERO);
        assert_eq!(throttle.admit("a"), Some(0));
        // A zero period lets every one through, each reporting none held.
        assert_eq!(throttle.admit("a"), Some(0));
        let slow = Throttle::new(Duration::from_secs(3600));
        assert_eq!(slow.admit(1), Some(0));
        assert_eq!(slow.admit(1), None);
        assert_eq!(slow.admit(1), None);
        assert_eq!(slow.admit(2), Some(0));
    }

    #[test]
    fn a_bounded_throttle_forgets_stale_kinds_and_never_grows_past_its_capacity() {
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        let throttle = Throttle::bounded(minute, 2);
        assert_eq!(throttle.admit_at(1, start), Some(0));
        assert_eq!(throttle.admit_at(2, start), Some(0));
        // Full: a third kind is let through but not remembered.
        assert_eq!(throttle.admit_at(3, start), Some(0));
        assert_eq!(throttle.admit_at(3, start), Some(0));
        assert_eq!(throttle.admit_at(1, start), None);
        // A period later the stale kinds make room.
        assert_eq!(throttle.admit_at(3, start + minute), Some(0));
        assert_eq!(throttle.admit_at(3, start + minute), None);
        assert!(throttle.last.lock().unwrap().len() <= 2);
    }
}
