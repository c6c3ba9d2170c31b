//! Token-bucket rate limiters for devices, in Firecracker's configuration
//! shape: a bandwidth bucket (bytes) and an operations bucket, each with a
//! size, an optional one-time burst and a refill time.
//!
//! A bucket refills continuously: `size` tokens every `refill_time`, computed
//! in nanoseconds with the remainder carried over, so that short refill
//! times (1 ms) stay accurate instead of rounding to a coarse tick. A device
//! that finds its limiter blocked stops taking requests; the limiter's timer
//! (a timerfd, for the device's event loop) fires when enough tokens are
//! back, and the device resumes then: a throttled queue is never polled.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use vmm_devices::rate_limiter::{TokenBucket, TokenBucketConfig};
//!
//! // 1000 bytes every 100 ms.
//! let config = TokenBucketConfig { size: 1000, one_time_burst: None, refill_time: 100 };
//! let start = Instant::now();
//! let mut bucket = TokenBucket::new(&config, start).unwrap();
//! assert!(bucket.try_take(1000, start).is_ok());
//! // Empty now: 400 bytes come back in 40 ms.
//! assert_eq!(bucket.try_take(400, start), Err(Duration::from_millis(40)));
//! assert!(bucket.try_take(400, start + Duration::from_millis(40)).is_ok());
//! ```

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket, as configured (Firecracker's `TokenBucket`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full, and refills every `refill_time`.
    pub size: u64,
    /// Tokens available once, at the start, on top of `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// A device's limits (Firecracker's `RateLimiter`): bytes and operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// Why a limiter configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket of size 0 or with a refill time of 0 limits nothing
    /// meaningful.
    #[error("a token bucket needs a size and a refill time above 0 (size {size}, refill_time {refill_time} ms)")]
    EmptyBucket {
        /// The size given.
        size: u64,
        /// The refill time given.
        refill_time: u64,
    },
    /// The limiter's timer could not be created or armed.
    #[error("cannot use the rate limiter's timer")]
    Timer(#[source] std::io::Error),
}

/// A token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    budget: u64,
    burst: u64,
    /// Tokens taken beyond the budget (by [`TokenBucket::take_forced`]),
    /// repaid by the next refills before the budget grows.
    debt: u64,
    /// Up to when refills have been counted.
    refilled_to: Instant,
}

impl TokenBucket {
    /// A full bucket as `config` says, its clock starting at `now`.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Result<Self, RateLimiterError> {
        if config.size == 0 || config.refill_time == 0 {
            return Err(RateLimiterError::EmptyBucket {
                size: config.size,
                refill_time: config.refill_time,
            });
        }
        Ok(Self {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * 1_000_000,
            budget: config.size,
            burst: config.one_time_burst.unwrap_or(0),
            debt: 0,
            refilled_to: now,
        })
    }

    /// Counts the tokens earned up to `now`, carrying the fraction of a
    /// token over (time is advanced only by whole tokens' worth).
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_to).as_nanos();
        if self.budget >= self.size && self.debt == 0 {
            self.refilled_to = now;
            return;
        }
        let earned = elapsed * u128::from(self.size) / self.refill_ns;
        if earned == 0 {
            return;
        }
        let repaid = earned.min(u128::from(self.debt));
        self.debt -= repaid as u64;
        let left = earned - repaid;
        let room = u128::from(self.size - self.budget);
        if left >= room {
            self.budget = self.size;
            self.refilled_to = now;
        } else {
            self.budget += left as u64;
            let spent = earned * self.refill_ns / u128::from(self.size);
            self.refilled_to += Duration::from_nanos(spent as u64);
        }
    }

    /// How long until `missing` more tokens are earned, counting what is
    /// already earned towards the next one.
    fn wait_for(&self, missing: u64, now: Instant) -> Duration {
        let wait_ns = (u128::from(missing) * self.refill_ns).div_ceil(u128::from(self.size));
        let earned_ns = now.saturating_duration_since(self.refilled_to).as_nanos();
        let wait = wait_ns.saturating_sub(earned_ns).max(1);
        Duration::from_nanos(wait.min(u128::from(u64::MAX)) as u64)
    }

    /// Takes `tokens` if they are there (the one-time burst first), or
    /// says how long until they will be. A request larger than the whole
    /// bucket is let through once the bucket is full, leaving it empty.
    pub fn try_take(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        if self.debt == 0 && rest <= self.budget {
            self.burst -= from_burst;
            self.budget -= rest;
            return Ok(());
        }
        if rest > self.size && self.budget == self.size && self.debt == 0 {
            self.burst -= from_burst;
            self.budget = 0;
            return Ok(());
        }
        let missing = self.debt + rest.min(self.size) - self.budget;
        Err(self.wait_for(missing, now))
    }

    /// Takes `tokens` whether or not they are there (for work already
    /// done, such as a frame already received): what the budget lacks
    /// becomes a debt that the next refills repay. Returns how long until
    /// the debt is repaid, if there is one.
    pub fn take_forced(&mut self, tokens: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = tokens - from_burst;
        let from_budget = rest.min(self.budget);
        self.budget -= from_budget;
        self.debt = self.debt.saturating_add(rest - from_budget);
        (self.debt > 0).then(|| self.wait_for(self.debt, now))
    }

    /// How long until the bucket holds a token (`None`: it does now).
    pub fn until_any(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.debt == 0 && (self.budget > 0 || self.burst > 0) {
            return None;
        }
        Some(self.wait_for(self.debt + 1, now))
    }

    /// Gives back `tokens` taken for a request that did not go ahead.
    pub fn give_back(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    /// Tokens available now (without the one-time burst).
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// A device's rate limiter: both buckets and the timer that says when a
/// blocked device may go on.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter as `config` says (no bucket: no limit of that kind).
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let now = Instant::now();
        let bucket = |c: &Option<TokenBucketConfig>| c.as_ref().map(|c| TokenBucket::new(c, now));
        Ok(Self {
            bandwidth: bucket(&config.bandwidth).transpose()?,
            ops: bucket(&config.ops).transpose()?,
            timer: TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?,
            blocked: false,
        })
    }

    /// Checks a configuration without making a limiter (no timer).
    pub fn check(config: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        let now = Instant::now();
        for c in [&config.bandwidth, &config.ops].into_iter().flatten() {
            TokenBucket::new(c, now)?;
        }
        Ok(())
    }

    /// Takes one operation and `bytes` bytes, both or neither. When they
    /// are not there, the limiter is blocked and its timer armed for when
    /// they will be; the caller stops and waits for
    /// [`timer_fired`](RateLimiter::timer_fired).
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let ops = match self.ops.as_mut().map(|b| b.try_take(1, now)) {
            Some(Err(wait)) => return self.block(wait),
            Some(Ok(())) => true,
            None => false,
        };
        if let Some(Err(wait)) = self.bandwidth.as_mut().map(|b| b.try_take(bytes, now)) {
            if ops {
                if let Some(b) = self.ops.as_mut() {
                    b.give_back(1);
                }
            }
            return self.block(wait);
        }
        true
    }

    /// Takes one operation and `bytes` bytes for work already done (a
    /// frame already read): what the buckets lack becomes a debt, and the
    /// limiter stays blocked until it is repaid. Returns whether the
    /// device may go on now.
    pub fn consume_forced(&mut self, bytes: u64) -> bool {
        let now = Instant::now();
        let ops = self.ops.as_mut().and_then(|b| b.take_forced(1, now));
        let bw = self
            .bandwidth
            .as_mut()
            .and_then(|b| b.take_forced(bytes, now));
        match ops.max(bw) {
            Some(wait) => self.block(wait),
            None => true,
        }
    }

    /// Whether both buckets hold a token now (for work whose size is
    /// known only once done, taken with
    /// [`consume_forced`](RateLimiter::consume_forced)); if not, the
    /// limiter blocks until they will.
    pub fn ready(&mut self) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let ops = self.ops.as_mut().and_then(|b| b.until_any(now));
        let bw = self.bandwidth.as_mut().and_then(|b| b.until_any(now));
        match ops.max(bw) {
            Some(wait) => self.block(wait),
            None => true,
        }
    }

    fn block(&mut self, wait: Duration) -> bool {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait, None) {
            // Without a timer the device would stall: let it through.
            log::error!("rate limiter: cannot arm its timer ({e}); not limiting");
            self.blocked = false;
            return true;
        }
        false
    }

    /// Whether the device must wait for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer the device's event loop watches.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired: the device may try again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.clear();
        self.blocked = false;
    }

    /// New limits, taking effect at once (full buckets).
    pub fn update(&mut self, config: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        let now = Instant::now();
        let bucket = |c: &Option<TokenBucketConfig>| c.as_ref().map(|c| TokenBucket::new(c, now));
        let (bandwidth, ops) = (
            bucket(&config.bandwidth).transpose()?,
            bucket(&config.ops).transpose()?,
        );
        self.bandwidth = bandwidth;
        self.ops = ops;
        if self.blocked {
            self.timer_fired();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_ms: u64, t: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time: refill_ms,
            },
            t,
        )
        .unwrap()
    }

    #[test]
    fn empty_buckets_are_refused() {
        let t = Instant::now();
        let c = TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 10,
        };
        assert!(TokenBucket::new(&c, t).is_err());
        let c = TokenBucketConfig {
            size: 10,
            one_time_burst: None,
            refill_time: 0,
        };
        assert!(TokenBucket::new(&c, t).is_err());
    }

    /// Over a simulated second of 4 KiB requests taken as fast as the
    /// bucket allows, the rate is the configured one within 0.1 %, for
    /// refill times from 1 ms up: no rounding to a coarse tick.
    #[test]
    fn the_rate_is_exact_for_short_refill_times() {
        for refill_ms in [1u64, 3, 10, 100] {
            let size = 1 << 20; // bytes per refill
            let start = Instant::now();
            let mut b = bucket(size, None, refill_ms, start);
            let mut now = start;
            let end = start + Duration::from_secs(1);
            let mut taken = 0u64;
            while now < end {
                match b.try_take(4096, now) {
                    Ok(()) => taken += 4096,
                    Err(wait) => now += wait,
                }
            }
            // The full bucket at the start, then size per refill_time.
            let expected = size + size * 1000 / refill_ms;
            let error = (taken as f64 - expected as f64).abs() / expected as f64;
            assert!(
                error < 0.001,
                "refill {refill_ms} ms: {taken} vs {expected}"
            );
        }
    }

    #[test]
    fn the_one_time_burst_goes_first_and_once() {
        let t = Instant::now();
        let mut b = bucket(100, Some(1000), 1000, t);
        assert!(b.try_take(1000, t).is_ok(), "the burst");
        assert!(b.try_take(100, t).is_ok(), "then the bucket");
        assert!(b.try_take(1, t).is_err(), "then nothing until refilled");
        assert!(b.try_take(50, t + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_only_when_it_is_full() {
        let t = Instant::now();
        let mut b = bucket(100, None, 100, t);
        assert!(b.try_take(10, t).is_ok());
        let wait = b.try_take(500, t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10), "until full again");
        assert!(b.try_take(500, t + wait).is_ok());
        assert_eq!(b.budget(), 0);
    }

    /// Work taken on credit is paid back before anything else passes,
    /// so the long-run rate stays the configured one.
    #[test]
    fn forced_takes_run_into_debt_that_refills_repay() {
        let t = Instant::now();
        let mut b = bucket(1000, None, 100, t);
        assert_eq!(b.take_forced(600, t), None, "within the budget");
        let wait = b.take_forced(1400, t).expect("1000 tokens of debt");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.try_take(1, t + Duration::from_millis(99)).is_err());
        assert!(b.try_take(1, t + Duration::from_millis(101)).is_ok());
        let mut frames = 0u64;
        let mut now = t;
        let mut l_wait = Duration::ZERO;
        // 64 KiB frames forced through a 1 MB/s bucket for a second.
        let mut b = bucket(1_000_000, None, 1000, t);
        while now < t + Duration::from_secs(1) {
            now += l_wait;
            if b.try_take(0, now).is_ok() {
                l_wait = b.take_forced(65536, now).unwrap_or(Duration::ZERO);
                frames += 1;
            }
        }
        let bytes = frames * 65536;
        assert!(
            (1_900_000..=2_100_000).contains(&bytes),
            "full bucket + one refill: {bytes}"
        );
    }

    #[test]
    fn work_done_on_credit_blocks_the_limiter_until_repaid() {
        let config = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 40,
            }),
            ops: None,
        };
        let mut l = RateLimiter::new(&config).unwrap();
        assert!(l.ready());
        assert!(!l.consume_forced(1500), "500 bytes of debt");
        assert!(l.is_blocked());
        assert!(!l.ready());
        let start = Instant::now();
        let mut fds = [libc::pollfd {
            fd: l.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
        assert!(
            start.elapsed() >= Duration::from_millis(19),
            "the debt takes 20 ms to repay"
        );
        l.timer_fired();
        assert!(l.ready());
        assert!(l.consume_forced(1));
    }

    #[test]
    fn a_limiter_takes_both_or_neither_and_unblocks_on_its_timer() {
        let config = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 8192,
                one_time_burst: None,
                refill_time: 20,
            }),
            ops: Some(TokenBucketConfig {
                size: 100,
                one_time_burst: None,
                refill_time: 1000,
            }),
        };
        let mut l = RateLimiter::new(&config).unwrap();
        assert!(l.consume(8192));
        assert!(!l.consume(4096), "no bytes left");
        assert!(l.is_blocked());
        assert_eq!(
            l.ops.as_ref().unwrap().budget(),
            99,
            "the op was given back"
        );
        let mut fds = [libc::pollfd {
            fd: l.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
        assert_eq!(n, 1, "the timer fires");
        l.timer_fired();
        assert!(l.consume(4096));
        l.update(&RateLimiterConfig::default()).unwrap();
        for _ in 0..1000 {
            assert!(l.consume(1 << 20), "no limits any more");
        }
    }
}
