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
    /// Work for the thread that waits for the VM (it runs the task and
    /// goes on waiting): what only that thread's filter allows, such as
    /// opening a new disk image.
    Run(OwnerTask),
}

/// A task for the thread that waits for the VM ([`VmEvent::Run`]).
pub struct OwnerTask(pub Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for OwnerTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerTask")
    }
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
    Stopped(StopCause),
}

/// Process exit statuses of a VMM, chosen so that the guest's and the
/// VMM's own never overlap: a status the guest wrote is reported even
/// (`2 × N`), the VMM's own outcomes odd.
pub mod exit_status {
    /// The guest ended without a status (reset, power-off, halt).
    pub const GUEST_ENDED: u8 = 0;
    /// The VMM could not build or run the VM.
    pub const VMM_ERROR: u8 = 1;
    /// The command line was wrong.
    pub const USAGE: u8 = 3;
    /// The guest crashed (triple fault, or a crash it reported).
    pub const GUEST_CRASHED: u8 = 5;
    /// The VM was stopped on request (an API call, the console's escape
    /// key).
    pub const STOPPED: u8 = 7;
    /// A VMM thread made a system call its seccomp filter forbids.
    pub const SECCOMP: u8 = 159;
    /// Highest guest status reported as `2 × N`; a larger one is reported
    /// as [`GUEST_STATUS_CLAMPED`].
    pub const MAX_GUEST_STATUS: u8 = 127;
    /// What a guest status above [`MAX_GUEST_STATUS`] is reported as.
    pub const GUEST_STATUS_CLAMPED: u8 = 254;

    /// The process status for guest status `n`.
    pub fn guest(n: u8) -> u8 {
        if n > MAX_GUEST_STATUS {
            GUEST_STATUS_CLAMPED
        } else {
            n * 2
        }
    }
}

impl VmExit {
    /// The process exit status a VMM should end with (see [`exit_status`]):
    /// `2 × N` for guest status N (at most 127), 0 when the guest reset,
    /// powered off or halted, 5 when it crashed (a triple fault is not
    /// success), 7 when stopped on request, and `128 + signal` when stopped
    /// by a signal (a VMM should rather end by re-raising it, as the
    /// reference VMM does, so that its parent sees the signal).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestStatus(s) => exit_status::guest(*s),
            VmExit::Reset | VmExit::PowerOff | VmExit::Halted => exit_status::GUEST_ENDED,
            VmExit::TripleFault | VmExit::Crash => exit_status::GUEST_CRASHED,
            VmExit::Stopped(StopCause::Requested) => exit_status::STOPPED,
            VmExit::Stopped(StopCause::Signal(n)) => 128u8.saturating_add(*n as u8),
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
            VmEvent::StopRequested(cause) => VmExit::Stopped(cause),
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
            VmEvent::Run(_) => return None,
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
        assert_eq!(VmExit::GuestStatus(42).exit_code(), 84);
        assert_eq!(VmExit::GuestStatus(0).exit_code(), 0);
        assert_eq!(VmExit::GuestStatus(127).exit_code(), 254);
        assert_eq!(VmExit::GuestStatus(200).exit_code(), 254);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::TripleFault.exit_code(), 5);
        assert_eq!(VmExit::Crash.exit_code(), 5);
        assert_eq!(
            VmExit::Stopped(StopCause::Requested).exit_code(),
            exit_status::STOPPED
        );
        assert_eq!(VmExit::Stopped(StopCause::Signal(15)).exit_code(), 143);
    }

    #[test]
    fn guest_statuses_never_collide_with_the_vmms_own() {
        let own = [
            exit_status::VMM_ERROR,
            exit_status::USAGE,
            exit_status::GUEST_CRASHED,
            exit_status::STOPPED,
            exit_status::SECCOMP,
        ];
        for n in 0..=255u8 {
            assert!(!own.contains(&exit_status::guest(n)), "guest {n}");
        }
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
            Some(Some(VmExit::Stopped(StopCause::Signal(2))))
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
