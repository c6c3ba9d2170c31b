//! The vCPU thread: a state machine (running, paused, exited) driven over a
//! channel, kicked out of `KVM_RUN` by a signal.

use std::cell::Cell;
use std::ptr;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vm_device::device_manager::IoManager;
use vmm_memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{StopReason, Vcpu, VcpuEmulation, VcpuError};
use crate::seccomp::{spawn_confined, ThreadKind};

/// Orders for a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Stop running guest code and wait.
    Pause,
    /// Run guest code again.
    Resume,
    /// End the thread.
    Exit,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Running guest code.
    Running,
    /// Waiting for `Resume` or `Exit`.
    Paused,
    /// Done; the thread ends.
    Exited,
}

/// What a vCPU thread reports.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The vCPU paused.
    Paused(u8),
    /// The vCPU resumed.
    Resumed(u8),
    /// The vCPU stopped for good, for this reason or with this error.
    Stopped(u8, Result<StopReason, VcpuError>),
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

/// The VMM's end of a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<Option<Vcpu>>>,
}

impl VcpuHandle {
    /// Starts `vcpu` on its own thread, confined by the vCPU seccomp filter
    /// when `confine`. Exits go to `bus`; events are sent on `events` and
    /// announced on `notify`.
    pub fn spawn(
        vcpu: Vcpu,
        bus: Arc<IoManager>,
        memory: GuestRam,
        events: Sender<VcpuEvent>,
        notify: EventFd,
        confine: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler();
        let id = vcpu.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = spawn_confined(format!("vcpu{id}"), ThreadKind::Vcpu, confine, move || {
            run_thread(vcpu, &bus, &memory, &rx, &events, &notify)
        })?;
        Ok(Self {
            id,
            commands: tx,
            thread: Some(thread),
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends `cmd` and kicks the thread out of the guest to read it.
    pub fn send(&self, cmd: VcpuCommand) {
        // A closed channel means the thread is gone already.
        let _ = self.commands.send(cmd);
        self.kick();
    }

    /// Interrupts `KVM_RUN` on the vCPU thread.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Tells the thread to exit and waits for it (kicking it again until it
    /// leaves the guest, at most `timeout`); returns the vCPU for inspection.
    pub fn join(mut self, timeout: Duration) -> Option<Vcpu> {
        let _ = self.commands.send(VcpuCommand::Exit);
        let t = self.thread.take()?;
        let deadline = Instant::now() + timeout;
        while !t.is_finished() {
            if Instant::now() > deadline {
                log::error!("vCPU {} did not stop within {timeout:?}", self.id);
                return None;
            }
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().ok().flatten()
    }
}

fn run_thread(
    mut vcpu: Vcpu,
    bus: &IoManager,
    memory: &GuestRam,
    commands: &Receiver<VcpuCommand>,
    events: &Sender<VcpuEvent>,
    notify: &EventFd,
) -> Vcpu {
    let id = vcpu.id();
    KVM_RUN.with(|c| c.set(vcpu.fd.get_kvm_run() as *mut kvm_run));
    let report = |e: VcpuEvent| {
        let _ = events.send(e);
        let _ = notify.write(1);
    };
    let mut state = VcpuState::Running;
    while state != VcpuState::Exited {
        state = match state {
            VcpuState::Running => match commands.try_recv() {
                Ok(VcpuCommand::Pause) => {
                    report(VcpuEvent::Paused(id));
                    VcpuState::Paused
                }
                Ok(VcpuCommand::Exit) | Err(TryRecvError::Disconnected) => {
                    report(VcpuEvent::Stopped(id, Ok(StopReason::Requested)));
                    VcpuState::Exited
                }
                Ok(VcpuCommand::Resume) | Err(TryRecvError::Empty) => {
                    match vcpu.run_once(bus, memory) {
                        Ok(VcpuEmulation::Handled) => VcpuState::Running,
                        Ok(VcpuEmulation::Interrupted) => {
                            vcpu.set_immediate_exit(0);
                            VcpuState::Running
                        }
                        Ok(VcpuEmulation::Stop(reason)) => {
                            report(VcpuEvent::Stopped(id, Ok(reason)));
                            VcpuState::Exited
                        }
                        Err(e) => {
                            report(VcpuEvent::Stopped(id, Err(e)));
                            VcpuState::Exited
                        }
                    }
                }
            },
            VcpuState::Paused => match commands.recv() {
                Ok(VcpuCommand::Resume) => {
                    vcpu.set_immediate_exit(0);
                    report(VcpuEvent::Resumed(id));
                    VcpuState::Running
                }
                Ok(VcpuCommand::Pause) => VcpuState::Paused,
                Ok(VcpuCommand::Exit) | Err(_) => {
                    report(VcpuEvent::Stopped(id, Ok(StopReason::Requested)));
                    VcpuState::Exited
                }
            },
            VcpuState::Exited => VcpuState::Exited,
        };
    }
    KVM_RUN.with(|c| c.set(ptr::null_mut()));
    vcpu
}
