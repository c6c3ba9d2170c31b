//! A complete single-vCPU VM: guest RAM, the boot, the legacy devices on the
//! port bus, the vCPU thread, and the wait for the guest's end.

use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libc::{c_int, c_void, siginfo_t};
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vmm_boot::{boot_guest, BootConfig, BootSetup, ProtocolChoice};
use vmm_devices::legacy::{
    DebugCon, DebugExit, Serial, COM1_IRQ, COM1_PORT, COM1_PORT_SIZE, DEBUGCON_PORT,
    DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, I8042, I8042_PORT, I8042_PORT_SIZE,
};
use vmm_devices::EventFdTrigger;
use vmm_memory::{create_guest_ram, AddressMap, RamBacking, ResourceAllocator};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::devices::{
    attach, build_virtio, subscribers, ConsoleConfig, DeviceError, DiskConfig, VirtioSlot,
};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::seccomp::{self, spawn_confined, SeccompError, SeccompPolicy, SpawnError, ThreadKind};
use crate::vcpu::{StopReason, Vcpu, VcpuError, VcpuEvent, VcpuHandle};
use crate::vm::{Vm, VmError};

/// Default kernel command line: what a Linux guest needs on this machine
/// model (serial console, reset through the i8042, reboot on panic).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// How long [`Vmm::run`] waits for a vCPU thread to leave the guest.
const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// An image file.
    Path(PathBuf),
    /// An image in memory (such as the embedded test guest).
    Bytes(&'static [u8]),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs (only 1 for now).
    pub vcpus: u8,
    /// The kernel.
    pub kernel: KernelSource,
    /// An initrd file.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// The boot protocol.
    pub protocol: ProtocolChoice,
    /// What backs guest RAM.
    pub ram_backing: RamBacking,
    /// The debug-exit port.
    pub exit_port: u16,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-console.
    pub console: Option<ConsoleConfig>,
    /// Which threads get seccomp filters.
    pub seccomp: SeccompPolicy,
    /// Put a debug console (port 0xE9) on the bus, writing to stderr.
    pub debugcon: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_mib: 128,
            vcpus: 1,
            kernel: KernelSource::Bytes(&[]),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            protocol: ProtocolChoice::Auto,
            ram_backing: RamBacking::Anonymous,
            exit_port: DEBUG_EXIT_PORT,
            disks: Vec::new(),
            rng: false,
            console: None,
            seccomp: SeccompPolicy::default(),
            debugcon: false,
        }
    }
}

/// How the VM ended.
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
    /// The VMM was told to stop (Ctrl-C or [`StopHandle::stop`]).
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

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// More than one vCPU was asked for.
    #[error("{requested} vCPUs requested, but only 1 is supported until SMP support lands")]
    SmpUnsupported {
        /// vCPUs asked for.
        requested: u8,
    },
    /// Zero vCPUs were asked for.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// Guest RAM size in MiB overflows.
    #[error("guest RAM of {0} MiB is too large")]
    MemoryTooLarge(u64),
    /// A file could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A path that must be a regular file is not.
    #[error("{what} {path} is not a regular file")]
    NotAFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
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
    /// A device could not be put on the bus.
    #[error("cannot place a device on the I/O bus")]
    Bus(#[source] vm_device::bus::Error),
    /// A virtio device could not be set up.
    #[error("cannot set up a virtio device")]
    Device(#[from] DeviceError),
    /// The device event loop could not start.
    #[error("cannot start the device event loop")]
    EventLoop(#[source] EventLoopError),
    /// A helper thread could not start.
    #[error("cannot start a VMM thread")]
    Spawn(#[source] SpawnError),
    /// A seccomp filter could not be installed.
    #[error("cannot confine the VMM")]
    Seccomp(#[from] SeccompError),
}

type SerialDevice = Serial<EventFdTrigger, Box<dyn Write + Send>>;

/// Tells a running [`Vmm`] to stop, from any thread.
#[derive(Clone)]
pub struct StopHandle {
    evt: Arc<EventFd>,
    requested: Arc<AtomicBool>,
}

impl StopHandle {
    /// Asks the VMM to stop; [`Vmm::run`] then returns [`VmExit::Interrupted`].
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }
}

static SIGINT_FD: AtomicI32 = AtomicI32::new(-1);
static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn sigint_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    SIGINT_SEEN.store(true, Ordering::SeqCst);
    let fd = SIGINT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is 8 readable bytes.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// A VM built from a [`VmConfig`], ready to [`run`](Vmm::run).
pub struct Vmm {
    vm: Vm,
    vcpu: Option<Vcpu>,
    bus: Arc<IoManager>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042<EventFdTrigger>>>,
    debug_exit: Arc<Mutex<DebugExit<EventFdTrigger>>>,
    stop_evt: Arc<EventFd>,
    stop_requested: Arc<AtomicBool>,
    boot: BootSetup,
    virtio: Vec<VirtioSlot>,
    cmdline: String,
    seccomp: SeccompPolicy,
}

fn open_file(what: &'static str, path: &Path) -> Result<File, VmmError> {
    let file = File::open(path).map_err(|source| VmmError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| VmmError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VmmError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

impl Vmm {
    /// Builds the VM: RAM, kernel and boot parameters, KVM VM and vCPU,
    /// COM1 (output to `serial_out`), i8042 and the debug-exit port.
    pub fn new(config: &VmConfig, serial_out: Box<dyn Write + Send>) -> Result<Self, VmmError> {
        match config.vcpus {
            0 => return Err(VmmError::NoVcpus),
            1 => {}
            n => return Err(VmmError::SmpUnsupported { requested: n }),
        }
        let mut initrd = match &config.initrd {
            Some(p) => Some(open_file("initrd", p)?),
            None => None,
        };
        let mut kernel_file = match &config.kernel {
            KernelSource::Path(p) => Some(open_file("kernel", p)?),
            KernelSource::Bytes(_) => None,
        };
        let size = config
            .mem_mib
            .checked_mul(1 << 20)
            .ok_or(VmmError::MemoryTooLarge(config.mem_mib))?;
        let map = AddressMap::new(size)?;
        let memory = create_guest_ram(&map, config.ram_backing)?;
        let mut resources = ResourceAllocator::new(&map).map_err(DeviceError::from)?;
        let (virtio, console_input) = build_virtio(
            &config.disks,
            config.rng,
            config.console.as_ref(),
            &memory,
            &mut resources,
        )?;
        let mut cmdline = config.cmdline.trim().to_string();
        for slot in &virtio {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&slot.cmdline_entry());
        }
        let boot_config = BootConfig {
            protocol: config.protocol,
            cmdline: &cmdline,
        };
        let boot = match (&mut kernel_file, &config.kernel) {
            (Some(file), _) => boot_guest(&memory, &map, file, initrd.as_mut(), &boot_config)?,
            (None, KernelSource::Bytes(bytes)) => boot_guest(
                &memory,
                &map,
                &mut Cursor::new(*bytes),
                initrd.as_mut(),
                &boot_config,
            )?,
            (None, KernelSource::Path(path)) => {
                return Err(VmmError::NotAFile {
                    what: "kernel",
                    path: path.clone(),
                });
            }
        };
        log::info!(
            "kernel loaded: {} via {}, entry {:#x}, ends at {:#x}",
            boot.kernel.format,
            boot.protocol,
            boot.cpu.rip,
            boot.kernel_end
        );

        let vm = Vm::new(memory)?;
        let stop_evt = Arc::new(EventFd::new(0).map_err(VmmError::EventFd)?);
        let trigger = || -> Result<EventFdTrigger, VmmError> {
            Ok(EventFdTrigger::from_eventfd(
                stop_evt.try_clone().map_err(VmmError::EventFd)?,
            ))
        };
        let serial_irq = EventFdTrigger::new().map_err(VmmError::EventFd)?;
        vm.register_irqfd(serial_irq.eventfd(), COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
        let i8042 = Arc::new(Mutex::new(I8042::new(trigger()?)));
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(trigger()?)));

        let mut bus = IoManager::new();
        let range = |base, size| PioRange::new(PioAddress(base), size).map_err(VmmError::Bus);
        bus.register_pio(range(COM1_PORT, COM1_PORT_SIZE)?, serial.clone())
            .map_err(VmmError::Bus)?;
        bus.register_pio(range(I8042_PORT, I8042_PORT_SIZE)?, i8042.clone())
            .map_err(VmmError::Bus)?;
        bus.register_pio(
            range(config.exit_port, DEBUG_EXIT_PORT_SIZE)?,
            debug_exit.clone(),
        )
        .map_err(VmmError::Bus)?;
        if config.debugcon {
            let con = Arc::new(Mutex::new(DebugCon::new(io::stderr())));
            bus.register_pio(range(DEBUGCON_PORT, 1)?, con)
                .map_err(VmmError::Bus)?;
        }
        attach(&vm, &mut bus, &virtio)?;

        let vcpu = vm.create_vcpu(0)?;
        vcpu.configure(vm.kvm(), &boot.cpu)?;
        Ok(Self {
            vm,
            vcpu: Some(vcpu),
            bus: Arc::new(bus),
            serial,
            i8042,
            debug_exit,
            stop_evt,
            stop_requested: Arc::new(AtomicBool::new(false)),
            boot,
            virtio,
            cmdline,
            seccomp: config.seccomp,
        })
        .and_then(|vmm: Self| {
            if let Some(feed) = console_input {
                let confine = vmm.seccomp.confines_threads();
                spawn_confined("console-in".into(), ThreadKind::Input, confine, move || {
                    feed.pump(io::stdin())
                })
                .map_err(VmmError::Spawn)?;
            }
            Ok(vmm)
        })
    }

    /// What was booted and how.
    pub fn boot_setup(&self) -> &BootSetup {
        &self.boot
    }

    /// The virtio devices, in the order of their command line entries.
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The kernel command line the guest got (with the device entries).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// A handle that stops [`Vmm::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            evt: self.stop_evt.clone(),
            requested: self.stop_requested.clone(),
        }
    }

    /// Makes Ctrl-C (SIGINT) stop this VMM cleanly: [`Vmm::run`] returns
    /// [`VmExit::Interrupted`]. The handler is process-wide and points at the
    /// last VMM it was installed for.
    pub fn stop_on_sigint(&self) -> io::Result<()> {
        SIGINT_SEEN.store(false, Ordering::SeqCst);
        SIGINT_FD.store(
            std::os::fd::AsRawFd::as_raw_fd(self.stop_evt.as_ref()),
            Ordering::SeqCst,
        );
        register_signal_handler(libc::SIGINT, sigint_handler)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// Forwards `input` (the host's stdin, say) to the guest's COM1 on a
    /// thread of its own, waiting whenever the UART's FIFO is full. The thread
    /// ends at end of input.
    pub fn forward_serial_input<R: Read + Send + 'static>(
        &self,
        mut input: R,
    ) -> Result<(), VmmError> {
        let serial = self.serial.clone();
        let confine = self.seccomp.confines_threads();
        spawn_confined("serial-in".into(), ThreadKind::Input, confine, move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial
                        .lock()
                        .map(|mut s| s.enqueue_input(rest))
                        .unwrap_or(0);
                    rest = &rest[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map_err(VmmError::Spawn)?;
        Ok(())
    }

    /// Runs the guest until it ends, then stops the vCPU.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        let vcpu = self.vcpu.take().ok_or(VmmError::NoVcpus)?;
        let confine = self.seccomp.confines_threads();
        let event_loop =
            EventLoop::spawn(subscribers(&self.virtio), confine).map_err(VmmError::EventLoop)?;
        let (tx, rx) = channel();
        let notify = self.stop_evt.try_clone().map_err(VmmError::EventFd)?;
        let memory = self.vm.memory().clone();
        let handle = VcpuHandle::spawn(vcpu, self.bus.clone(), memory, tx, notify, confine)?;
        if self.seccomp == SeccompPolicy::VmmThreadsAndCaller {
            if let Err(e) = seccomp::install(ThreadKind::Main) {
                handle.join(VCPU_JOIN_TIMEOUT);
                event_loop.stop();
                return Err(e.into());
            }
        }
        let outcome = self.wait(&rx);
        if handle.join(VCPU_JOIN_TIMEOUT).is_none() {
            log::warn!("vCPU thread did not finish");
        }
        event_loop.stop();
        if let Ok(s) = self.serial.lock() {
            if s.lost_output() > 0 {
                log::warn!(
                    "{} bytes of guest serial output could not be written",
                    s.lost_output()
                );
            }
        }
        outcome
    }

    fn wait(&self, vcpu_events: &Receiver<VcpuEvent>) -> Result<VmExit, VmmError> {
        loop {
            if let Err(e) = self.stop_evt.read() {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(VmmError::EventFd(e));
                }
            }
            if let Some(status) = self.debug_exit.lock().ok().and_then(|d| d.status()) {
                return Ok(VmExit::GuestStatus(status));
            }
            while let Ok(event) = vcpu_events.try_recv() {
                match event {
                    VcpuEvent::Stopped(id, Err(e)) => {
                        log::error!("vCPU {id} failed: {e}");
                        return Err(VmmError::Vcpu(e));
                    }
                    VcpuEvent::Stopped(id, Ok(reason)) => {
                        match reason {
                            StopReason::TripleFault => {
                                log::warn!("vCPU {id} triple-faulted: the guest reset its CPU")
                            }
                            StopReason::Crash => {
                                log::warn!("vCPU {id}: the guest reported a crash")
                            }
                            _ => log::info!("vCPU {id} stopped: {reason:?}"),
                        }
                        match reason {
                            StopReason::TripleFault => return Ok(VmExit::TripleFault),
                            StopReason::Reset => return Ok(VmExit::Reset),
                            StopReason::PowerOff => return Ok(VmExit::PowerOff),
                            StopReason::Crash => return Ok(VmExit::Crash),
                            StopReason::Halted => return Ok(VmExit::Halted),
                            StopReason::Requested => {}
                        }
                    }
                    VcpuEvent::Paused(_) | VcpuEvent::Resumed(_) => {}
                }
            }
            if self.i8042.lock().map(|d| d.resets() > 0).unwrap_or(false) {
                return Ok(VmExit::Reset);
            }
            if self.stop_requested.load(Ordering::SeqCst) || SIGINT_SEEN.load(Ordering::SeqCst) {
                return Ok(VmExit::Interrupted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_documented_table() {
        assert_eq!(VmExit::GuestStatus(42).exit_code(), 42);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::TripleFault.exit_code(), 0);
        assert_eq!(VmExit::Crash.exit_code(), 1);
        assert_eq!(VmExit::Interrupted.exit_code(), 130);
    }

    fn config() -> VmConfig {
        VmConfig {
            kernel: KernelSource::Bytes(vmm_testguest::IMAGE),
            ..Default::default()
        }
    }

    #[test]
    fn smp_and_zero_vcpus_are_refused_before_anything_is_built() {
        let c = VmConfig {
            vcpus: 2,
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::SmpUnsupported { requested: 2 })
        ));
        let c = VmConfig {
            vcpus: 0,
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::NoVcpus)
        ));
    }

    #[test]
    fn missing_and_directory_kernels_are_clear_errors() {
        let c = VmConfig {
            kernel: KernelSource::Path("/nonexistent/vmlinux".into()),
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::Open { what: "kernel", .. })
        ));
        let c = VmConfig {
            kernel: KernelSource::Path("/".into()),
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::NotAFile { what: "kernel", .. })
        ));
    }

    #[test]
    fn absurd_memory_sizes_are_refused() {
        let c = VmConfig {
            mem_mib: u64::MAX,
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::MemoryTooLarge(_))
        ));
        let c = VmConfig {
            mem_mib: 1,
            ..config()
        };
        assert!(matches!(
            Vmm::new(&c, Box::new(io::sink())),
            Err(VmmError::Layout(_))
        ));
    }
}
