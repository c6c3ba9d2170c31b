//! Typed VM events: what happened to a running VM, said by whoever saw it.
//!
//! Devices, vCPU threads, signal handlers and [`VmHandle`](crate::VmHandle)s
//! send [`VmEvent`]s on one channel; the thread waiting for the VM
//! ([`RunningVm::wait`](crate::RunningVm::wait)) receives them in order and
//! decides with [`VmEvent::outcome`] whether the run is over. Nobody polls a
//! device to guess what happened.

use std::sync::mpsc::Sender;

use crate::vcpu::{StopReason, VcpuError};

/// Why a stop was asked for from outside the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// [`VmHandle::stop`](crate::VmHandle::stop).
    Requested,
    /// A signal the VMM was told to stop on (its number).
    Signal(i32),
}

/// Something that happened to a VM.
#[derive(Debug)]
#[non_exhaustive]
pub enum VmEvent {
    /// The guest wrote this status to the debug-exit port.
    GuestStatus(u8),
    /// The guest asked for a reset (i8042 command 0xFE).
    ResetRequested,
    /// A vCPU thread ended: the guest stopped it (triple fault, shutdown,
    /// ...), it was told to, or it failed.
    VcpuStopped {
        /// The vCPU index.
        id: u8,
        /// Why, or its error.
        result: Result<StopReason, VcpuError>,
    },
    /// Someone outside the guest asked the VM to stop.
    StopRequested(StopCause),
    /// All vCPUs and the device event loop are paused.
    Paused,
    /// The VM runs again after a pause.
    Resumed,
}

/// How a VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the debug-exit port.
    GuestStatus(u8),
    /// The guest asked for a reset (i8042 command 0xFE or a reset event).
    Reset,
    /// The guest triple-faulted (the x86 CPU reset).
    TripleFault,
    /// The guest powered off.
    PowerOff,
    /// The vCPU halted with nothing to wake it.
    Halted,
    /// The guest reported a crash.
    Crash,
    /// The VMM was told to stop ([`VmHandle::stop`](crate::VmHandle::stop)
    /// or a signal).
    Interrupted,
}

impl VmExit {
    /// The process exit code a VMM should end with: the guest's status when
    /// it gave one, 0 for a reset, triple fault, power-off or halt, 1 for a
    /// crash and 130 for an interruption (as a shell reports Ctrl-C).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestStatus(s) => *s,
            VmExit::Reset | VmExit::TripleFault | VmExit::PowerOff | VmExit::Halted => 0,
            VmExit::Crash => 1,
            VmExit::Interrupted => 130,
        }
    }
}

impl VmEvent {
    /// What this event means for the run: `None` while it goes on,
    /// `Some(Ok(exit))` when it ends the VM, `Some(Err(e))` when a vCPU
    /// failed. A vCPU that stopped because it was told to does not end the
    /// run by itself: whoever told it has its own reason.
    pub fn outcome(self) -> Option<Result<VmExit, VcpuError>> {
        let exit = match self {
            VmEvent::GuestStatus(s) => VmExit::GuestStatus(s),
            VmEvent::ResetRequested => VmExit::Reset,
            VmEvent::StopRequested(_) => VmExit::Interrupted,
            VmEvent::VcpuStopped { result: Err(e), .. } => return Some(Err(e)),
            VmEvent::VcpuStopped { result: Ok(r), .. } => match r {
                StopReason::TripleFault => VmExit::TripleFault,
                StopReason::Reset => VmExit::Reset,
                StopReason::PowerOff => VmExit::PowerOff,
                StopReason::Crash => VmExit::Crash,
                StopReason::Halted => VmExit::Halted,
                StopReason::Requested => return None,
            },
            VmEvent::Paused | VmEvent::Resumed => return None,
        };
        Some(Ok(exit))
    }
}

/// The sending end of a VM's event channel: cheap to clone, usable from any
/// thread. A device of your own raises [`VmEvent::GuestStatus`] or
/// [`VmEvent::ResetRequested`] through it, as the built-in ones do.
///
/// ```
/// use vmm_core::{VmEvent, VmEventSender, VmExit};
///
/// let (events, rx) = VmEventSender::channel();
/// events.send(VmEvent::GuestStatus(3));
/// let exit = rx.recv().unwrap().outcome();
/// assert_eq!(exit.unwrap().unwrap(), VmExit::GuestStatus(3));
/// ```
#[derive(Clone, Debug)]
pub struct VmEventSender(Sender<VmEvent>);

impl VmEventSender {
    /// A new channel.
    pub fn channel() -> (Self, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (Self(tx), rx)
    }

    /// Sends `event`. An event for a VM that is gone is dropped.
    pub fn send(&self, event: VmEvent) {
        let _ = self.0.send(event);
    }

    /// A vm-superio [`Trigger`](vm_superio::Trigger) that sends the event
    /// `make` builds each time it fires (for vm-superio devices such as the
    /// i8042, whose reset line is a trigger).
    pub fn trigger(&self, make: fn() -> VmEvent) -> EventTrigger {
        EventTrigger {
            events: self.clone(),
            make,
        }
    }
}

/// A [`Trigger`](vm_superio::Trigger) that raises a [`VmEvent`].
pub struct EventTrigger {
    events: VmEventSender,
    make: fn() -> VmEvent,
}

impl vm_superio::Trigger for EventTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.events.send((self.make)());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    #[test]
    fn exit_codes_follow_the_documented_table() {
        assert_eq!(VmExit::GuestStatus(42).exit_code(), 42);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::TripleFault.exit_code(), 0);
        assert_eq!(VmExit::Crash.exit_code(), 1);
        assert_eq!(VmExit::Interrupted.exit_code(), 130);
    }

    #[test]
    fn events_that_end_the_run_map_to_their_exit() {
        let ends = |e: VmEvent| e.outcome().map(|r| r.ok());
        assert_eq!(
            ends(VmEvent::GuestStatus(9)),
            Some(Some(VmExit::GuestStatus(9)))
        );
        assert_eq!(ends(VmEvent::ResetRequested), Some(Some(VmExit::Reset)));
        assert_eq!(
            ends(VmEvent::StopRequested(StopCause::Signal(2))),
            Some(Some(VmExit::Interrupted))
        );
        let stopped = |r| VmEvent::VcpuStopped {
            id: 0,
            result: Ok(r),
        };
        assert_eq!(
            ends(stopped(StopReason::TripleFault)),
            Some(Some(VmExit::TripleFault))
        );
        assert_eq!(ends(stopped(StopReason::Requested)), None);
        assert_eq!(ends(VmEvent::Paused), None);
        assert_eq!(ends(VmEvent::Resumed), None);
        let failed = VmEvent::VcpuStopped {
            id: 1,
            result: Err(VcpuError::UnexpectedExit("x".into())),
        };
        assert!(matches!(failed.outcome(), Some(Err(_))));
    }

    #[test]
    fn a_trigger_raises_its_event_every_time() {
        let (events, rx) = VmEventSender::channel();
        let t = events.trigger(|| VmEvent::ResetRequested);
        t.trigger().unwrap();
        t.trigger().unwrap();
        assert_eq!(rx.try_iter().count(), 2);
        drop(rx);
        t.trigger().unwrap();
    }
}
