//! A whole VM: [`Vmm`] (built, not yet running), [`RunningVm`] (its threads
//! started) and [`VmHandle`] (stop, pause and resume from any thread).

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use libc::{c_int, c_void, siginfo_t};
use vm_device::device_manager::IoManager;
use vmm_boot::BootSetup;
use vmm_devices::legacy::{KeyError, Serial, VmGeneration, I8042};
use vmm_devices::metrics::MetricsRegistry;
use vmm_devices::persist::Persist;
use vmm_devices::EventFdTrigger;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::devices::{DeviceError, VirtioSlot};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::events::{EventTrigger, StopCause, VmEvent, VmEventSender, VmExit};
use crate::host_io::OutputStatus;
use crate::seccomp::{
    self, spawn_confined, spawn_confined_unconfirmed, SeccompError, SeccompPolicy, SpawnError,
};
use crate::seccomp::{ThreadFilters, ThreadKind};
use crate::snapshot::{
    replace_atomically, write_state_file, MachineDescription, MemoryDescription, SnapshotError,
    SnapshotInfo, SnapshotKind, SnapshotRequest, SnapshotState, VirtioDeviceSnapshot,
};
use crate::vcpu::{StopReason, Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuRunState};
use crate::vm::{Vm, VmError};

/// How long stopping, pausing or resuming waits for each vCPU thread.
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a run waits for buffered guest output to reach a
/// slow host (all outputs together).
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) type SerialDevice = Serial<EventFdTrigger, Box<dyn Write + Send>>;
pub(crate) type KeyboardDevice = I8042<EventTrigger, EventFdTrigger>;

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// More vCPUs than xAPIC IDs allow were asked for.
    #[error("{requested} vCPUs requested; at most 254 are supported (8-bit xAPIC IDs, one kept for the IOAPIC)")]
    TooManyVcpus {
        /// vCPUs asked for.
        requested: u8,
    },
    /// Zero vCPUs were asked for.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// Guest RAM size in MiB overflows.
    #[error("guest RAM of {0} MiB is too large")]
    MemoryTooLarge(u64),
    /// A kernel or initrd file cannot be used.
    #[error(transparent)]
    HostFile(#[from] vmm_devices::host_files::HostFileError),
    /// The address map could not be built.
    #[error("bad guest memory size")]
    Layout(#[from] vmm_memory::LayoutError),
    /// Guest RAM could not be created.
    #[error("cannot create guest RAM")]
    Ram(#[from] vmm_memory::RamError),
    /// The guest could not be set up for boot.
    #[error("cannot boot the guest")]
    Boot(#[from] vmm_boot::BootError),
    /// KVM refused.
    #[error("cannot set up the VM")]
    Vm(#[from] VmError),
    /// A vCPU failed.
    #[error("vCPU failed")]
    Vcpu(#[from] VcpuError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device event loop could not start.
    #[error("cannot start the device event loop")]
    EventLoop(#[source] EventLoopError),
    /// A helper thread could not start.
    #[error("cannot start a VMM thread")]
    Spawn(#[from] SpawnError),
    /// A seccomp filter could not be built or installed.
    #[error("cannot confine the VMM")]
    Seccomp(#[from] SeccompError),
    /// A pseudo-terminal could not be opened.
    #[error("cannot open a pseudo-terminal for the serial console")]
    Pty(#[source] io::Error),
    /// A signal handler could not be installed.
    #[error("cannot install the handler of signal {0}")]
    Signal(c_int, #[source] io::Error),
    /// A snapshot could not be restored.
    #[error("cannot restore the snapshot")]
    Restore(#[from] crate::snapshot::RestoreError),
}

/// Why a pause or resume did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM has not started, or has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// A vCPU did not obey in time.
    #[error("vCPU {0} did not pause or resume within {VCPU_TIMEOUT:?}")]
    VcpuTimeout(u8),
    /// The device event loop did not pause.
    #[error("the device event loop did not pause")]
    EventLoop(#[from] EventLoopError),
    /// A key could not be pressed.
    #[error(transparent)]
    Keyboard(#[from] KeyError),
    /// No disk has that id.
    #[error("no disk has the id {0:?}")]
    NoSuchDisk(String),
    /// No NIC has that id.
    #[error("no network interface has the id {0:?}")]
    NoSuchNet(String),
    /// A NIC refused new limits.
    #[error("network interface {id}")]
    Net {
        /// The NIC.
        id: String,
        /// Why.
        #[source]
        source: vmm_devices::virtio::net::NetError,
    },
    /// The new image cannot be used.
    #[error(transparent)]
    Disk(#[from] DeviceError),
}

/// A thread a device asked for, started with the VM.
pub(crate) struct HostThread {
    pub name: String,
    pub kind: ThreadKind,
    pub body: Box<dyn FnOnce() + Send>,
}

/// What [`VmBuilder::build`](crate::VmBuilder::build) hands over.
pub(crate) struct Parts {
    pub vm: Vm,
    pub vcpus: Vec<Vcpu>,
    pub bus: Arc<IoManager>,
    pub boot: Option<BootSetup>,
    pub virtio: Vec<VirtioSlot>,
    pub cmdline: String,
    pub subscribers: Vec<Subscriber>,
    pub threads: Vec<HostThread>,
    pub filters: ThreadFilters,
    pub seccomp: SeccompPolicy,
    pub stop_signals: Vec<c_int>,
    pub events: VmEventSender,
    pub receiver: Receiver<VmEvent>,
    pub metrics: MetricsRegistry,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub keyboard: Arc<Mutex<KeyboardDevice>>,
    pub generation: Arc<Mutex<VmGeneration>>,
    pub disks: Vec<DiskSlot>,
    pub nets: Vec<NetSlot>,
    pub outputs: Vec<(&'static str, OutputStatus)>,
    pub held: Vec<std::fs::File>,
    pub serial_pty: Option<PathBuf>,
    pub machine: MachineDescription,
    pub layers: u32,
    pub track_dirty: bool,
    pub start_paused: bool,
}

/// The threads of a started VM.
struct Running {
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoop,
    paused: bool,
    vm: Arc<Vm>,
}

/// A virtio device as a snapshot reaches it. Weak: a handle kept after the
/// VM is gone does not keep its devices (and their open, locked images).
struct SlotRef {
    window: vmm_memory::GuestRange,
    irq: u32,
    transport: Weak<Mutex<crate::devices::Transport>>,
}

/// What handles and the waiting thread share: the running threads, behind
/// one lock so that control operations never interleave.
struct Control {
    running: Mutex<Option<Running>>,
    events: VmEventSender,
    metrics: MetricsRegistry,
    keyboard: Arc<Mutex<KeyboardDevice>>,
    serial: Arc<Mutex<SerialDevice>>,
    generation: Arc<Mutex<VmGeneration>>,
    disks: Vec<DiskSlot>,
    nets: Vec<NetSlot>,
    slots: Vec<SlotRef>,
    /// The machine as a snapshot describes it (disk paths kept current).
    machine: Mutex<MachineDescription>,
    /// Memory files a restore of the VM's memory as of its last snapshot
    /// (or its restore) needs; 0 when there is nothing to layer a diff on.
    layers: Mutex<u32>,
    track_dirty: bool,
}

/// A NIC the VM was built with, for link and limit changes (weak, as
/// [`SlotRef`]).
#[derive(Clone)]
pub(crate) struct NetSlot {
    pub config: crate::devices::NetConfig,
    pub transport: Weak<Mutex<crate::devices::Transport>>,
}

/// A disk the VM was built with, for replacing its image (weak, as
/// [`SlotRef`]).
#[derive(Clone)]
pub(crate) struct DiskSlot {
    pub config: crate::devices::DiskConfig,
    pub transport: Weak<Mutex<crate::devices::Transport>>,
}

impl Control {
    fn pause(&self) -> Result<(), ControlError> {
        let mut guard = self.running.lock().map_err(|_| ControlError::NotRunning)?;
        let r = guard.as_mut().ok_or(ControlError::NotRunning)?;
        if r.paused {
            return Ok(());
        }
        for v in &r.vcpus {
            v.send(VcpuCommand::Pause);
        }
        for v in &r.vcpus {
            v.wait_for(|s| s != VcpuRunState::Running, VCPU_TIMEOUT)
                .ok_or(ControlError::VcpuTimeout(v.id()))?;
        }
        r.event_loop.pause(VCPU_TIMEOUT)?;
        r.paused = true;
        self.events.send(VmEvent::Paused);
        Ok(())
    }

    fn resume(&self) -> Result<(), ControlError> {
        let mut guard = self.running.lock().map_err(|_| ControlError::NotRunning)?;
        let r = guard.as_mut().ok_or(ControlError::NotRunning)?;
        if !r.paused {
            return Ok(());
        }
        r.event_loop.resume();
        for v in &r.vcpus {
            v.send(VcpuCommand::Resume);
        }
        for v in &r.vcpus {
            v.wait_for(|s| s != VcpuRunState::Paused, VCPU_TIMEOUT)
                .ok_or(ControlError::VcpuTimeout(v.id()))?;
        }
        r.paused = false;
        self.events.send(VmEvent::Resumed);
        Ok(())
    }

    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, SnapshotError> {
        let started = std::time::Instant::now();
        let guard = self.running.lock().map_err(|_| SnapshotError::NotRunning)?;
        let r = guard.as_ref().ok_or(SnapshotError::NotRunning)?;
        if !r.paused {
            return Err(SnapshotError::NotPaused);
        }
        let mut layers = self
            .layers
            .lock()
            .map_err(|_| SnapshotError::Poisoned("the snapshot layers"))?;
        let new_layers = match req.kind {
            SnapshotKind::Full => 1,
            SnapshotKind::Diff if !self.track_dirty => return Err(SnapshotError::NoDirtyTracking),
            SnapshotKind::Diff if *layers == 0 => return Err(SnapshotError::NoBase),
            SnapshotKind::Diff => (*layers + 1).min(crate::snapshot::MAX_MEMORY_LAYERS),
        };
        let mut vcpus = Vec::with_capacity(r.vcpus.len());
        for v in &r.vcpus {
            match v.save_state(VCPU_TIMEOUT) {
                None => return Err(SnapshotError::VcpuTimeout(v.id())),
                Some(Err(source)) => return Err(SnapshotError::Vcpu { id: v.id(), source }),
                Some(Ok(state)) => vcpus.push(state),
            }
        }
        let vm = r.vm.save_state()?;
        let mut virtio = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let transport = slot.transport.upgrade().ok_or(SnapshotError::NotRunning)?;
            let mut t = transport
                .lock()
                .map_err(|_| SnapshotError::Poisoned("a virtio transport"))?;
            // The disk's content is part of the snapshot: make it durable.
            t.device_mut().flush().map_err(SnapshotError::Flush)?;
            virtio.push(VirtioDeviceSnapshot {
                device_type: t.device().device_type(),
                mmio_base: slot.window.start(),
                irq: slot.irq,
                transport: t.state(),
                device: t.device().save_device_state(),
            });
        }
        let serial = self
            .serial
            .lock()
            .map_err(|_| SnapshotError::Poisoned("COM1"))?
            .save();
        let i8042 = self
            .keyboard
            .lock()
            .map_err(|_| SnapshotError::Poisoned("the i8042"))?
            .save();
        let generation = self
            .generation
            .lock()
            .map_err(|_| SnapshotError::Poisoned("the generation port"))?
            .save();
        let machine = self
            .machine
            .lock()
            .map_err(|_| SnapshotError::Poisoned("the machine description"))?
            .clone();
        let ram = r.vm.memory();
        // From here a failure loses track of what was written: the next
        // diff would miss it, so none is allowed until a full snapshot.
        *layers = 0;
        let mut dirty = r.vm.take_dirty_log()?;
        let written = vmm_memory::snapshot::take_written_pages(ram);
        let memory_err = |source| SnapshotError::Memory {
            path: req.memory_path.display().to_string(),
            source,
        };
        let memory_bytes = replace_atomically(&req.memory_path, |f: &mut std::fs::File| {
            match req.kind {
                SnapshotKind::Full => vmm_memory::snapshot::write_sparse(ram, f),
                SnapshotKind::Diff => {
                    dirty.resize(written.len(), Vec::new());
                    for (d, w) in dirty.iter_mut().zip(&written) {
                        if d.len() < w.len() {
                            d.resize(w.len(), 0);
                        }
                        for (a, b) in d.iter_mut().zip(w) {
                            *a |= b;
                        }
                    }
                    vmm_memory::snapshot::write_pages(ram, &dirty, f)
                }
            }
            .map_err(memory_err)
        })?;
        let state = SnapshotState {
            writer: format!("vmm-core {}", env!("CARGO_PKG_VERSION")),
            memory: MemoryDescription {
                size_bytes: machine.mem_mib << 20,
                kind: req.kind,
                layers: new_layers,
            },
            machine,
            vm,
            vcpus,
            virtio,
            serial,
            i8042,
            generation,
        };
        write_state_file(&req.state_path, &state)?;
        *layers = new_layers;
        Ok(SnapshotInfo {
            memory_bytes,
            layers: new_layers,
            duration: started.elapsed(),
        })
    }

    /// Ends every vCPU thread (out of `KVM_RUN`, joined), then the event
    /// loop (the device handler in progress finishes first).
    fn shutdown(&self) -> Vec<Vcpu> {
        let running = self.running.lock().ok().and_then(|mut g| g.take());
        let Some(r) = running else {
            return Vec::new();
        };
        for v in &r.vcpus {
            v.send(VcpuCommand::Exit);
        }
        let vcpus = r
            .vcpus
            .iter()
            .filter_map(|v| v.join(VCPU_TIMEOUT))
            .collect();
        r.event_loop.stop();
        vcpus
    }
}

/// A handle on a VM, from any thread: stop it, pause and resume it.
///
/// ```no_run
/// # use vmm_core::{HostIo, KernelSource, VmConfig, Vmm};
/// # let config = VmConfig { kernel: KernelSource::Bytes(vmm_testguest::IMAGE), ..VmConfig::default() };
/// let vmm = Vmm::new(&config, HostIo::default())?;
/// let handle = vmm.handle();
/// let running = vmm.start()?;
/// handle.pause()?;   // every vCPU out of the guest, no device work
/// handle.resume()?;
/// handle.stop();
/// assert_eq!(running.wait()?, vmm_core::VmExit::Stopped(vmm_core::StopCause::Requested));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct VmHandle {
    events: VmEventSender,
    control: Arc<Control>,
}

impl VmHandle {
    /// Asks the VM to stop; [`RunningVm::wait`] then returns
    /// [`VmExit::Stopped`]. Works before the VM starts too (it then
    /// stops as soon as it starts).
    pub fn stop(&self) {
        self.events
            .send(VmEvent::StopRequested(StopCause::Requested));
    }

    /// Pauses every vCPU (each out of `KVM_RUN`) and the device event loop,
    /// and returns once they are all quiet. Pausing a paused VM does
    /// nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.control.pause()
    }

    /// Runs a paused VM again.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.control.resume()
    }

    /// Whether the VM is started and paused.
    pub fn is_paused(&self) -> bool {
        self.control
            .running
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|r| r.paused))
            .unwrap_or(false)
    }

    /// The VM's event sender.
    pub fn events(&self) -> VmEventSender {
        self.events.clone()
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard (a Linux guest then
    /// reboots, which ends the VM: an orchestrator's graceful stop).
    pub fn send_ctrl_alt_del(&self) -> Result<(), ControlError> {
        let running = self
            .control
            .running
            .lock()
            .map(|r| r.is_some())
            .unwrap_or(false);
        if !running {
            return Err(ControlError::NotRunning);
        }
        let mut kbd = self
            .control
            .keyboard
            .lock()
            .map_err(|_| ControlError::NotRunning)?;
        Ok(kbd.press_ctrl_alt_del()?)
    }

    /// Runs `f` on NIC `id`'s device.
    fn with_net<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut vmm_devices::virtio::net::Net<vmm_memory::GuestRam>) -> R,
    ) -> Result<R, ControlError> {
        let slot = self
            .control
            .nets
            .iter()
            .find(|n| n.config.id == id)
            .ok_or_else(|| ControlError::NoSuchNet(id.to_string()))?;
        let transport = slot.transport.upgrade().ok_or(ControlError::NotRunning)?;
        let mut t = transport.lock().map_err(|_| ControlError::NotRunning)?;
        let net = t
            .device_as_mut::<vmm_devices::virtio::net::Net<vmm_memory::GuestRam>>()
            .ok_or_else(|| ControlError::NoSuchNet(id.to_string()))?;
        Ok(f(net))
    }

    /// Sets NIC `id`'s link up or down (the guest gets a configuration
    /// change interrupt; while down, nothing moves).
    pub fn set_net_link(&self, id: &str, up: bool) -> Result<(), ControlError> {
        self.with_net(id, |n| n.set_link(up))
    }

    /// Replaces NIC `id`'s receive and transmit limits (`None`: that side
    /// unchanged; a config with no buckets: no limit), at once.
    pub fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&vmm_devices::rate_limiter::RateLimiterConfig>,
        tx: Option<&vmm_devices::rate_limiter::RateLimiterConfig>,
    ) -> Result<(), ControlError> {
        self.with_net(id, |n| n.set_rate_limiters(rx, tx))?
            .map_err(|source| ControlError::Net {
                id: id.to_string(),
                source,
            })?;
        if let Ok(mut m) = self.control.machine.lock() {
            if let Some(d) = m.nets.iter_mut().find(|d| d.id == id) {
                if let Some(rx) = rx {
                    d.rx_rate_limiter = Some(*rx);
                }
                if let Some(tx) = tx {
                    d.tx_rate_limiter = Some(*tx);
                }
            }
        }
        Ok(())
    }

    /// The position of the disk whose id (name, else serial) is `id`.
    fn disk_index(&self, id: &str) -> Result<usize, ControlError> {
        self.control
            .disks
            .iter()
            .position(|d| {
                d.config
                    .name
                    .as_ref()
                    .or(d.config.serial.as_ref())
                    .map(String::as_str)
                    == Some(id)
            })
            .ok_or_else(|| ControlError::NoSuchDisk(id.to_string()))
    }

    /// Replaces disk `id`'s limits (a config with no buckets lifts them),
    /// at once.
    pub fn update_disk_rate_limiter(
        &self,
        id: &str,
        limits: &vmm_devices::rate_limiter::RateLimiterConfig,
    ) -> Result<(), ControlError> {
        let index = self.disk_index(id)?;
        let transport = self.control.disks[index]
            .transport
            .upgrade()
            .ok_or(ControlError::NotRunning)?;
        let mut t = transport.lock().map_err(|_| ControlError::NotRunning)?;
        let block = t
            .device_as_mut::<vmm_devices::virtio::block::Block<vmm_memory::GuestRam>>()
            .ok_or_else(|| ControlError::NoSuchDisk(id.to_string()))?;
        block.set_rate_limiter(limits).map_err(|e| {
            ControlError::Disk(DeviceError::Disk {
                path: self.control.disks[index].config.path.clone(),
                source: vmm_devices::virtio::block::BlockError::RateLimiter(e.to_string()),
            })
        })?;
        drop(t);
        if let Ok(mut m) = self.control.machine.lock() {
            if let Some(d) = m.disks.get_mut(index) {
                d.rate_limiter = Some(*limits);
            }
        }
        Ok(())
    }

    /// Puts the disk whose id (serial) is `id` on the image at `path`,
    /// opened and locked as the disk was configured (read-only or not); the
    /// guest sees a configuration change with the new capacity. This opens
    /// a file: call it where the thread's seccomp filter allows that (see
    /// [`VmEvent::Run`]).
    pub fn replace_disk(&self, id: &str, path: &std::path::Path) -> Result<(), ControlError> {
        let index = self.disk_index(id)?;
        let slot = &self.control.disks[index];
        let ro = slot.config.read_only;
        let host = |e| ControlError::Disk(DeviceError::Host(e));
        let file = vmm_devices::host_files::open_input(
            "disk image",
            path,
            vmm_devices::host_files::InputKind::FileOrBlockDevice,
            !ro,
        )
        .map_err(host)?;
        if slot.config.lock {
            vmm_devices::host_files::lock_image(&file, path, ro).map_err(host)?;
        }
        let transport = slot.transport.upgrade().ok_or(ControlError::NotRunning)?;
        let mut t = transport.lock().map_err(|_| ControlError::NotRunning)?;
        let block = t
            .device_as_mut::<vmm_devices::virtio::block::Block<vmm_memory::GuestRam>>()
            .ok_or_else(|| ControlError::NoSuchDisk(id.to_string()))?;
        block.replace_file(file).map_err(|source| {
            ControlError::Disk(DeviceError::Disk {
                path: path.to_path_buf(),
                source,
            })
        })?;
        t.config_changed();
        drop(t);
        if let Ok(mut m) = self.control.machine.lock() {
            if let Some(d) = m.disks.get_mut(index) {
                d.path = path.to_path_buf();
            }
        }
        Ok(())
    }

    /// The counters of the VM's devices.
    pub fn metrics(&self) -> MetricsRegistry {
        self.control.metrics.clone()
    }

    /// Saves the paused VM: every vCPU, the irqchip, PIT and clock, every
    /// device and transport with its queues, and the machine description to
    /// the state file; guest memory (all of it, or with
    /// [`SnapshotKind::Diff`] what was written since the last snapshot) to
    /// the memory file. Disks are flushed first: their images are part of
    /// the snapshot, and must not change until it is restored. Both files
    /// are replaced whole or not at all. This writes files: call it where
    /// the thread's seccomp filter allows that (see [`VmEvent::Run`]).
    ///
    /// ```no_run
    /// use vmm_core::snapshot::{RestoreConfig, SnapshotKind, SnapshotRequest};
    /// use vmm_core::{HostIo, KernelSource, VmConfig, Vmm};
    ///
    /// let config = VmConfig {
    ///     kernel: KernelSource::Bytes(vmm_testguest::IMAGE),
    ///     ..VmConfig::default()
    /// };
    /// let vmm = Vmm::new(&config, HostIo::default())?;
    /// let handle = vmm.handle();
    /// let running = vmm.start()?;
    /// handle.pause()?;
    /// handle.snapshot(&SnapshotRequest {
    ///     state_path: "vm.state".into(),
    ///     memory_path: "vm.mem".into(),
    ///     kind: SnapshotKind::Full,
    /// })?;
    /// handle.stop();
    /// running.wait()?;
    ///
    /// // Later, in this process or another: the same VM, where it was.
    /// let restored = VmConfig {
    ///     restore: Some(RestoreConfig {
    ///         state_path: "vm.state".into(),
    ///         memory: vec!["vm.mem".into()],
    ///         resume: true,
    ///         ..RestoreConfig::default()
    ///     }),
    ///     ..VmConfig::default()
    /// };
    /// let exit = Vmm::new(&restored, HostIo::default())?.run()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotInfo, SnapshotError> {
        self.control.snapshot(req)
    }

    /// The machine as a snapshot of the VM would describe it now.
    pub fn machine(&self) -> Option<MachineDescription> {
        self.control.machine.lock().ok().map(|m| m.clone())
    }

    /// The VM's generation counter and identity (see
    /// [`VmGeneration`]).
    pub fn generation(&self) -> (u64, u64) {
        self.control
            .generation
            .lock()
            .map(|g| (g.counter(), g.identity()))
            .unwrap_or_default()
    }
}

/// A VM built and ready to [`start`](Vmm::start) or [`run`](Vmm::run).
pub struct Vmm {
    parts: Parts,
    control: Arc<Control>,
}

impl Vmm {
    /// Builds the VM `config` describes, its consoles on `io`:
    /// [`VmBuilder::from_config`](crate::VmBuilder::from_config), then
    /// [`build`](crate::VmBuilder::build).
    pub fn new(config: &crate::VmConfig, io: crate::HostIo) -> Result<Self, VmmError> {
        crate::VmBuilder::from_config(config, io)?.build()
    }

    pub(crate) fn assemble(parts: Parts) -> Self {
        let control = Arc::new(Control {
            running: Mutex::new(None),
            events: parts.events.clone(),
            metrics: parts.metrics.clone(),
            keyboard: parts.keyboard.clone(),
            serial: parts.serial.clone(),
            generation: parts.generation.clone(),
            disks: parts.disks.clone(),
            nets: parts.nets.clone(),
            slots: parts
                .virtio
                .iter()
                .map(|s| SlotRef {
                    window: s.window(),
                    irq: s.irq(),
                    transport: Arc::downgrade(s.transport()),
                })
                .collect(),
            machine: Mutex::new(parts.machine.clone()),
            layers: Mutex::new(parts.layers),
            track_dirty: parts.track_dirty,
        });
        Self { parts, control }
    }

    /// What was booted and how (`None` for a VM restored from a
    /// snapshot: it booted elsewhere).
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.parts.boot.as_ref()
    }

    /// The virtio devices, in the order of their command line entries.
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.parts.virtio
    }

    /// The kernel command line the guest got (with the device entries).
    pub fn cmdline(&self) -> &str {
        &self.parts.cmdline
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.parts.vm
    }

    /// The path of the pseudo-terminal COM1 is on, if it is on one.
    pub fn serial_pty(&self) -> Option<&std::path::Path> {
        self.parts.serial_pty.as_deref()
    }

    /// A handle that stops, pauses and resumes this VM from any thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            events: self.parts.events.clone(),
            control: self.control.clone(),
        }
    }

    /// Starts the VM: the device event loop, the devices' host threads, the
    /// signal relay if asked, then the vCPUs. With
    /// [`SeccompPolicy::VmmThreadsAndCaller`], the calling thread is
    /// confined last.
    pub fn start(self) -> Result<RunningVm, VmmError> {
        let Vmm { parts, control } = self;
        let filters = &parts.filters;
        let event_loop = EventLoop::spawn(
            parts.subscribers,
            filters.get(ThreadKind::EventLoop).cloned(),
        )
        .map_err(VmmError::EventLoop)?;
        if parts.start_paused {
            event_loop
                .pause(VCPU_TIMEOUT)
                .map_err(VmmError::EventLoop)?;
        }
        let vm = Arc::new(parts.vm);
        // The devices' host threads start together; their filters are
        // confirmed once the vCPUs are started too.
        let mut helpers = Vec::with_capacity(parts.threads.len());
        for t in parts.threads {
            helpers.push(spawn_confined_unconfirmed(
                t.name,
                filters.get(t.kind).cloned(),
                t.body,
            )?);
        }
        let signals = if parts.stop_signals.is_empty() {
            None
        } else {
            Some(SignalRelay::start(
                &parts.stop_signals,
                parts.events.clone(),
                filters.get(ThreadKind::Input).cloned(),
            )?)
        };
        let mut vcpus = Vec::with_capacity(parts.vcpus.len());
        for vcpu in parts.vcpus {
            let spawned = VcpuHandle::spawn_in(
                vcpu,
                parts.bus.clone(),
                vm.memory().clone(),
                parts.events.clone(),
                filters.get(ThreadKind::Vcpu).cloned(),
                parts.start_paused,
            );
            match spawned {
                Ok(h) => vcpus.push(h),
                Err(e) => {
                    for v in &vcpus {
                        v.join(VCPU_TIMEOUT);
                    }
                    return Err(e.into());
                }
            }
        }
        for h in helpers {
            if let Err(e) = h.confirm() {
                for v in &vcpus {
                    v.join(VCPU_TIMEOUT);
                }
                return Err(e.into());
            }
        }
        if let Ok(mut g) = control.running.lock() {
            *g = Some(Running {
                vcpus,
                event_loop,
                paused: parts.start_paused,
                vm: vm.clone(),
            });
        }
        if parts.start_paused {
            parts.events.send(VmEvent::Paused);
        }
        let running = RunningVm {
            vm: Some(vm),
            boot: parts.boot,
            virtio: parts.virtio,
            receiver: parts.receiver,
            control,
            serial: parts.serial,
            outputs: parts.outputs,
            _held: parts.held,
            signals,
            vcpus: Vec::new(),
        };
        if parts.seccomp == SeccompPolicy::VmmThreadsAndCaller {
            let installed = match filters.get(ThreadKind::Main) {
                Some(p) => seccomp::install_program(p),
                None => seccomp::install(ThreadKind::Main),
            };
            if let Err(e) = installed {
                running.control.shutdown();
                return Err(e.into());
            }
        }
        Ok(running)
    }

    /// Starts the VM and waits for its end.
    pub fn run(self) -> Result<VmExit, VmmError> {
        self.start()?.wait()
    }
}

/// A started VM.
pub struct RunningVm {
    vm: Option<Arc<Vm>>,
    boot: Option<BootSetup>,
    virtio: Vec<VirtioSlot>,
    receiver: Receiver<VmEvent>,
    control: Arc<Control>,
    serial: Arc<Mutex<SerialDevice>>,
    outputs: Vec<(&'static str, OutputStatus)>,
    _held: Vec<std::fs::File>,
    signals: Option<SignalRelay>,
    vcpus: Vec<Vcpu>,
}

impl RunningVm {
    /// A handle that stops, pauses and resumes this VM from any thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            events: self.control.events.clone(),
            control: self.control.clone(),
        }
    }

    /// What was booted and how (`None` for a VM restored from a
    /// snapshot).
    pub fn boot_setup(&self) -> Option<&BootSetup> {
        self.boot.as_ref()
    }

    /// The virtio devices.
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// Waits for the event that ends the run, then stops the VM in order:
    /// every vCPU out of the guest and joined, the event loop stopped.
    pub fn wait(self) -> Result<VmExit, VmmError> {
        self.wait_and_keep().map(|(exit, _)| exit)
    }

    /// Like [`wait`](RunningVm::wait), and hands back the stopped VM and its
    /// vCPUs (for inspection or state capture).
    pub fn wait_and_keep(mut self) -> Result<(VmExit, StoppedVm), VmmError> {
        let outcome = loop {
            let Ok(event) = self.receiver.recv() else {
                break Ok(VmExit::Stopped(StopCause::Requested));
            };
            if let VmEvent::Run(task) = event {
                (task.0)();
                continue;
            }
            log_event(&event);
            if let Some(outcome) = event.outcome() {
                break outcome;
            }
        };
        self.vcpus = self.control.shutdown();
        self.flush_devices();
        self.stop_signals();
        self.drain_outputs();
        let exit = outcome?;
        // The control's reference went with the shutdown.
        let vm = self
            .vm
            .take()
            .and_then(|vm| Arc::try_unwrap(vm).ok())
            .ok_or(VmmError::NoVcpus)?;
        Ok((
            exit,
            StoppedVm {
                vm,
                vcpus: std::mem::take(&mut self.vcpus),
                virtio: std::mem::take(&mut self.virtio),
            },
        ))
    }

    /// Makes what the devices wrote durable (disks synced), now that no vCPU
    /// runs and the event loop has finished its work.
    fn flush_devices(&self) {
        for slot in &self.virtio {
            let Ok(mut t) = slot.transport().lock() else {
                continue;
            };
            if let Err(e) = t.device_mut().flush() {
                log::warn!(
                    "virtio device type {} at {:#x}: cannot flush: {e}",
                    t.device().device_type(),
                    slot.window().start()
                );
            }
        }
    }

    /// Lets buffered guest output reach the host, for at most
    /// [`OUTPUT_DRAIN_TIMEOUT`] in all, and reports what was lost.
    fn drain_outputs(&self) {
        let deadline = std::time::Instant::now() + OUTPUT_DRAIN_TIMEOUT;
        for (name, status) in &self.outputs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !status.wait_written(left) {
                log::warn!("{name}: the host did not take the guest's last output in time");
            }
            if status.lost_bytes() > 0 {
                log::warn!(
                    "{name}: {} bytes of guest output were lost",
                    status.lost_bytes()
                );
            }
        }
        if let Ok(s) = self.serial.try_lock() {
            if s.lost_output() > 0 {
                log::warn!(
                    "{} bytes of guest serial output could not be written",
                    s.lost_output()
                );
            }
        }
    }

    fn stop_signals(&mut self) {
        if let Some(s) = self.signals.take() {
            s.stop();
        }
    }
}

impl Drop for RunningVm {
    /// A VM dropped without [`wait`](RunningVm::wait) is stopped in order
    /// all the same.
    fn drop(&mut self) {
        self.control.shutdown();
        self.flush_devices();
        self.stop_signals();
    }
}

/// A VM whose run ended: its KVM VM, vCPUs and devices, for inspection.
pub struct StoppedVm {
    /// The KVM VM.
    pub vm: Vm,
    /// The vCPUs, in index order.
    pub vcpus: Vec<Vcpu>,
    /// The virtio devices.
    pub virtio: Vec<VirtioSlot>,
}

fn log_event(event: &VmEvent) {
    match event {
        VmEvent::VcpuStopped { id, result: Err(e) } => log::error!("vCPU {id} failed: {e}"),
        VmEvent::VcpuStopped {
            id,
            result: Ok(StopReason::TripleFault),
        } => log::warn!("vCPU {id} triple-faulted: the guest reset its CPU"),
        VmEvent::VcpuStopped {
            id,
            result: Ok(StopReason::Crash),
        } => log::warn!("vCPU {id}: the guest reported a crash"),
        other => log::info!("VM event: {other:?}"),
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn stop_signal_handler(signal: c_int, _: *mut siginfo_t, _: *mut c_void) {
    LAST_SIGNAL.store(signal, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Turns stop signals into [`VmEvent::StopRequested`]: the handler writes an
/// eventfd (all a handler may do), a thread reads it and sends the event.
struct SignalRelay {
    evt: Arc<EventFd>,
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl SignalRelay {
    fn start(
        signals: &[c_int],
        events: VmEventSender,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Self, VmmError> {
        let evt = Arc::new(EventFd::new(0).map_err(VmmError::EventFd)?);
        let closing = Arc::new(AtomicBool::new(false));
        let (thread_evt, thread_closing) = (evt.clone(), closing.clone());
        let thread = spawn_confined("signals".into(), filter, move || loop {
            if thread_evt.read().is_err() {
                continue;
            }
            if thread_closing.load(Ordering::SeqCst) {
                return;
            }
            let signal = LAST_SIGNAL.load(Ordering::SeqCst);
            events.send(VmEvent::StopRequested(StopCause::Signal(signal)));
        })?;
        SIGNAL_FD.store(
            std::os::fd::AsRawFd::as_raw_fd(evt.as_ref()),
            Ordering::SeqCst,
        );
        for &s in signals {
            register_signal_handler(s, stop_signal_handler)
                .map_err(|e| VmmError::Signal(s, io::Error::from_raw_os_error(e.errno())))?;
        }
        Ok(Self {
            evt,
            closing,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.evt.as_ref());
        let _ = SIGNAL_FD.compare_exchange(fd, -1, Ordering::SeqCst, Ordering::SeqCst);
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
