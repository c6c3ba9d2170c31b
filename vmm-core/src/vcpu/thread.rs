//! The vCPU thread: a state machine (running, paused, exited) driven over a
//! channel, kicked out of `KVM_RUN` by a signal.

use std::cell::Cell;
use std::ptr;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use seccompiler::BpfProgram;
use vm_device::device_manager::IoManager;
use vmm_memory::GuestRam;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{StopReason, Vcpu, VcpuEmulation, VcpuError, VcpuState};
use crate::events::{VmEvent, VmEventSender};
use crate::seccomp::spawn_confined;

/// Orders for a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Stop running guest code and wait.
    Pause,
    /// Run guest code again.
    Resume,
    /// End the thread.
    Exit,
    /// While paused: capture the vCPU's state, for
    /// [`VcpuHandle::save_state`] to collect.
    SaveState,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Running guest code.
    Running,
    /// Waiting for `Resume` or `Exit`.
    Paused,
    /// Done; the thread ends.
    Exited,
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set
        // while the vCPU is alive on this thread and cleared before it goes.
        // Setting `immediate_exit` makes a KVM_RUN that has not yet entered
        // the guest return EINTR at once, closing the race with the check of
        // pending commands.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            log::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// A vCPU thread's state, shared with its handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<VcpuRunState>,
    changed: Condvar,
    saved: Mutex<Option<Result<VcpuState, VcpuError>>>,
}

impl Shared {
    fn set(&self, state: VcpuRunState) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
        self.changed.notify_all();
    }

    fn set_saved(&self, saved: Result<VcpuState, VcpuError>) {
        if let Ok(mut s) = self.saved.lock() {
            *s = Some(saved);
        }
        // Taking the state lock orders this with a waiter's check.
        drop(self.state.lock());
        self.changed.notify_all();
    }
}

/// The VMM's end of a vCPU thread. Usable from any thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Option<Vcpu>>>>,
}

/// How often a vCPU that has not yet obeyed is kicked again.
const REKICK: Duration = Duration::from_millis(20);

impl VcpuHandle {
    /// Starts `vcpu` on its own thread, confined by `filter` when given.
    /// Exits go to `bus`; when the thread ends it says why on `events`.
    pub fn spawn(
        vcpu: Vcpu,
        bus: Arc<IoManager>,
        memory: GuestRam,
        events: VmEventSender,
        filter: Option<BpfProgram>,
    ) -> Result<Self, VcpuError> {
        Self::spawn_in(vcpu, bus, memory, events, filter, false)
    }

    /// Like [`spawn`](VcpuHandle::spawn); with `start_paused`, the thread
    /// waits for [`VcpuCommand::Resume`] before it enters the guest.
    pub fn spawn_in(
        vcpu: Vcpu,
        bus: Arc<IoManager>,
        memory: GuestRam,
        events: VmEventSender,
        filter: Option<BpfProgram>,
        start_paused: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler();
        let id = vcpu.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(if start_paused {
                VcpuRunState::Paused
            } else {
                VcpuRunState::Running
            }),
            changed: Condvar::new(),
            saved: Mutex::new(None),
        });
        let thread_shared = shared.clone();
        let thread = spawn_confined(format!("vcpu{id}"), filter, move || {
            run_thread(
                vcpu,
                &bus,
                &memory,
                &rx,
                &events,
                &thread_shared,
                start_paused,
            )
        })?;
        Ok(Self {
            id,
            commands: tx,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Where the thread is now.
    pub fn state(&self) -> VcpuRunState {
        self.shared
            .state
            .lock()
            .map_or(VcpuRunState::Exited, |s| *s)
    }

    /// Sends `cmd` and kicks the thread out of the guest to read it.
    pub fn send(&self, cmd: VcpuCommand) {
        // A closed channel means the thread is gone already.
        let _ = self.commands.send(cmd);
        self.kick();
    }

    /// Interrupts `KVM_RUN` on the vCPU thread.
    pub fn kick(&self) {
        if let Ok(t) = self.thread.lock() {
            if let Some(t) = t.as_ref().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Waits until the thread is in a state `done` accepts, kicking it again
    /// now and then (a kick that raced with its entry into the guest is
    /// caught by `immediate_exit`, this is belt and braces). Returns the
    /// state reached, or `None` after `timeout`.
    pub fn wait_for(
        &self,
        done: fn(VcpuRunState) -> bool,
        timeout: Duration,
    ) -> Option<VcpuRunState> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().ok()?;
        while !done(*state) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = REKICK.min(deadline - now);
            let (s, timed_out) = self.shared.changed.wait_timeout(state, wait).ok()?;
            state = s;
            if timed_out.timed_out() && !done(*state) {
                drop(state);
                self.kick();
                state = self.shared.state.lock().ok()?;
            }
        }
        Some(*state)
    }

    /// Captures the state of the paused vCPU on its own thread. `None` if
    /// the thread did not answer within `timeout`.
    pub fn save_state(&self, timeout: Duration) -> Option<Result<VcpuState, VcpuError>> {
        if let Ok(mut s) = self.shared.saved.lock() {
            *s = None;
        }
        // No kick: a paused thread waits on its channel, not in the guest.
        let _ = self.commands.send(VcpuCommand::SaveState);
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().ok()?;
        loop {
            if let Some(saved) = self.shared.saved.lock().ok()?.take() {
                return Some(saved);
            }
            if *state == VcpuRunState::Exited {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .ok()?
                .0;
        }
    }

    /// Tells the thread to exit and waits for it (at most `timeout`);
    /// returns the vCPU for inspection.
    pub fn join(&self, timeout: Duration) -> Option<Vcpu> {
        self.send(VcpuCommand::Exit);
        if self
            .wait_for(|s| s == VcpuRunState::Exited, timeout)
            .is_none()
        {
            log::error!("vCPU {} did not stop within {timeout:?}", self.id);
            return None;
        }
        let t = self.thread.lock().ok()?.take()?;
        t.join().ok().flatten()
    }
}

fn run_thread(
    mut vcpu: Vcpu,
    bus: &IoManager,
    memory: &GuestRam,
    commands: &Receiver<VcpuCommand>,
    events: &VmEventSender,
    shared: &Shared,
    start_paused: bool,
) -> Vcpu {
    let id = vcpu.id();
    KVM_RUN.with(|c| c.set(vcpu.fd.get_kvm_run() as *mut kvm_run));
    let mut state = if start_paused {
        VcpuRunState::Paused
    } else {
        VcpuRunState::Running
    };
    let mut end: Result<StopReason, VcpuError> = Ok(StopReason::Requested);
    while state != VcpuRunState::Exited {
        let next = match state {
            VcpuRunState::Running => match commands.try_recv() {
                Ok(VcpuCommand::Pause) => match vcpu.complete_pending_io() {
                    Ok(()) => VcpuRunState::Paused,
                    Err(e) => {
                        end = Err(e);
                        VcpuRunState::Exited
                    }
                },
                Ok(VcpuCommand::Exit) | Err(TryRecvError::Disconnected) => VcpuRunState::Exited,
                Ok(VcpuCommand::SaveState) => {
                    shared.set_saved(Err(VcpuError::BadState {
                        what: "vCPU",
                        why: "its state is saved only while it is paused".into(),
                    }));
                    VcpuRunState::Running
                }
                Ok(VcpuCommand::Resume) | Err(TryRecvError::Empty) => {
                    match vcpu.run_once(bus, memory) {
                        Ok(VcpuEmulation::Handled) => VcpuRunState::Running,
                        Ok(VcpuEmulation::Interrupted) => {
                            vcpu.set_immediate_exit(0);
                            VcpuRunState::Running
                        }
                        Ok(VcpuEmulation::Stop(reason)) => {
                            end = Ok(reason);
                            VcpuRunState::Exited
                        }
                        Err(e) => {
                            end = Err(e);
                            VcpuRunState::Exited
                        }
                    }
                }
            },
            VcpuRunState::Paused => match commands.recv() {
                Ok(VcpuCommand::Resume) => {
                    vcpu.set_immediate_exit(0);
                    VcpuRunState::Running
                }
                Ok(VcpuCommand::Pause) => VcpuRunState::Paused,
                Ok(VcpuCommand::SaveState) => {
                    shared.set_saved(vcpu.capture_state());
                    VcpuRunState::Paused
                }
                Ok(VcpuCommand::Exit) | Err(_) => VcpuRunState::Exited,
            },
            VcpuRunState::Exited => VcpuRunState::Exited,
        };
        if next != state && next != VcpuRunState::Exited {
            shared.set(next);
        }
        state = next;
    }
    KVM_RUN.with(|c| c.set(ptr::null_mut()));
    // Say why before the state flips, so that whoever waits for the exit
    // finds the reason already sent.
    events.send(VmEvent::VcpuStopped { id, result: end });
    shared.set(VcpuRunState::Exited);
    vcpu
}
