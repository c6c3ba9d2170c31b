//! Interrupt and notification lines handed to devices.

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A [`Trigger`] that signals an eventfd. The VMM decides what the eventfd
/// means: an irqfd to inject a guest interrupt, or an event its own loop waits
/// for (reset, exit).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A trigger over a new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
    }

    /// A trigger over `fd`.
    pub fn from_eventfd(fd: EventFd) -> Self {
        Self(fd)
    }

    /// Another trigger signalling the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The underlying eventfd (to register it as an irqfd, or to wait on it).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_signals_every_clone_of_the_eventfd() {
        let t = EventFdTrigger::new().unwrap();
        let c = t.try_clone().unwrap();
        c.trigger().unwrap();
        c.trigger().unwrap();
        assert_eq!(t.eventfd().read().unwrap(), 2);
        assert!(t.eventfd().read().is_err(), "non-blocking and drained");
    }
}
