//! Bounded logging of guest-caused events: a guest that keeps misbehaving
//! must not be able to flood the host's logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages allowed per window.
pub const BURST: u64 = 10;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

/// A per-call-site limiter: at most [`BURST`] messages every [`WINDOW_SECS`]
/// seconds.
pub struct RateLimit {
    /// Window start (seconds since the epoch) in the high 44 bits, count in
    /// the low 20.
    state: AtomicU64,
}

impl RateLimit {
    /// A limiter with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
        }
    }

    /// Whether one more message may be logged now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> bool {
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (start, count) = (cur >> 20, cur & 0xf_ffff);
            let (next, ok) = if now >= start + WINDOW_SECS || now < start {
                ((now << 20) | 1, true)
            } else if count < BURST {
                (cur + 1, true)
            } else {
                return false;
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ok,
                Err(actual) => cur = actual,
            }
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` for something a guest caused, at most [`BURST`] times every
/// [`WINDOW_SECS`] seconds per call site (the rest go to `debug`). Usable
/// from a crate that does not depend on `log` itself.
///
/// ```
/// use vmm_devices::guest_warn;
///
/// fn on_bad_descriptor(index: u16) {
///     guest_warn!("my-device: descriptor {index} points outside guest memory");
/// }
/// on_bad_descriptor(3);
/// ```
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if LIMIT.allow() {
            $crate::ratelimit::__log::warn!($($arg)*);
        } else {
            $crate::ratelimit::__log::debug!($($arg)*);
        }
    }};
}

/// `log::warn!` for a host-side failure (a disk write refused, console
/// output lost), at most [`BURST`] times every [`WINDOW_SECS`] seconds per
/// call site (the rest go to `debug`): a failing disk must not flood the
/// logs either.
#[macro_export]
macro_rules! host_warn {
    ($($arg:tt)*) => {
        $crate::guest_warn!($($arg)*)
    };
}

/// The `log` crate, for [`guest_warn!`] in crates that do not name it.
#[doc(hidden)]
pub use log as __log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_until_the_window_ends() {
        let l = RateLimit::new();
        let allowed = (0..100).filter(|_| l.allow_at(1000)).count() as u64;
        assert_eq!(allowed, BURST);
        assert!(!l.allow_at(1000 + WINDOW_SECS - 1));
        assert!(l.allow_at(1000 + WINDOW_SECS));
    }
}
