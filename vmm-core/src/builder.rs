//! [`VmBuilder`]: a whole VM assembled from parts, through one public door
//! for the built-in devices and a stranger's own alike.

use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_devices::metrics::{DeviceMetrics, MetricsRegistry};

use libc::c_int;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_boot::acpi::{write_acpi_tables, write_mptable, AcpiDevices, MAX_VCPUS};
use vmm_boot::{boot_guest, BootConfig, BootSetup, ProtocolChoice};
use vmm_devices::host_files::{
    lock_image, open_input, open_output, FileId, HostFileError, InputKind, OpenedInput,
};
use vmm_devices::legacy::{
    DebugCon, DebugExit, Serial, VmGeneration, COM1_IRQ, COM1_PORT, COM1_PORT_SIZE, DEBUGCON_PORT,
    DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, GENERATION_PORT, GENERATION_PORT_SIZE, I8042,
    I8042_KBD_IRQ, I8042_PORT, I8042_PORT_SIZE,
};
use vmm_devices::persist::Persist;
use vmm_devices::virtio::block::{Block, BlockError};
use vmm_devices::virtio::console::Console;
use vmm_devices::virtio::net::{Net, Tap, TapError};
use vmm_devices::virtio::rng::Rng;
use vmm_devices::virtio::vsock::Vsock;
use vmm_devices::virtio::VirtioDevice;
use vmm_devices::EventFdTrigger;
use vmm_memory::{
    create_guest_ram, AddressMap, GuestRam, GuestRange, RamBacking, ResourceAllocator,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{HostIo, KernelSource, SerialConfig, VmConfig, DEFAULT_CMDLINE};
use crate::devices::{
    ConsoleConfig, DeviceError, DiskConfig, NetConfig, TapSource, VirtioHandle, VirtioSlot,
    VsockConfig,
};
use crate::event_loop::Subscriber;
use crate::events::{VmEvent, VmEventSender};
use crate::host_io::{BufferedOutput, OutputStatus, Pty};
use crate::seccomp::{SeccompError, SeccompPolicy, ThreadFilters, ThreadKind};
use crate::snapshot::{
    read_state_file, DiskDescription, MachineDescription, NetDescription, RestoreConfig,
    RestoreError, SnapshotState, VsockDescription,
};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::vmm::{HostThread, KeyboardDevice, SerialDevice, Vmm, VmmError};

/// How long a serial input pump waits for room in the UART's FIFO.
const SERIAL_INPUT_RETRY: Duration = Duration::from_millis(2);

/// Assembles a VM: guest RAM first (so devices can be placed at once), then
/// devices, event sources and seccomp additions in any order, then
/// [`build`](VmBuilder::build) loads the kernel and creates the KVM VM.
/// Nothing runs and no thread starts until [`Vmm::start`] or [`Vmm::run`].
///
/// ```no_run
/// use std::sync::{Arc, Mutex};
/// use vmm_core::{HostIo, KernelSource, VmBuilder};
/// use vmm_devices::virtio::rng::Rng;
///
/// let mut builder = VmBuilder::new(64, Default::default())?;
/// builder
///     .kernel(KernelSource::Bytes(vmm_testguest::IMAGE))
///     .cmdline("testguest.run=rng,exit testguest.exit=0")
///     .host_io(HostIo::serial(Box::new(std::io::stdout())));
/// let rng = builder.add_virtio(Rng::new())?;
/// let vmm = builder.build()?;
/// let exit = vmm.run()?;
/// println!("{exit:?}; rng answered {:?} broken chains", rng.with(|r| r.broken_chains()));
/// # Ok::<(), vmm_core::VmmError>(())
/// ```
pub struct VmBuilder {
    map: AddressMap,
    memory: GuestRam,
    resources: ResourceAllocator,
    kernel: KernelSource,
    initrd: Option<PathBuf>,
    opened_kernel: Option<File>,
    opened_initrd: Option<File>,
    inputs: Vec<OpenedInput>,
    disks: Vec<(OpenedInput, bool)>,
    bus_names: Vec<(bool, String, u64, u64)>,
    outputs: Vec<(&'static str, OutputStatus)>,
    held: Vec<File>,
    serial_pty: Option<PathBuf>,
    virtio_cmdline: bool,
    cmdline: String,
    protocol: ProtocolChoice,
    vcpus: u8,
    seccomp: SeccompPolicy,
    extra_syscalls: Vec<(ThreadKind, i64)>,
    extra_ioctls: Vec<(ThreadKind, u64)>,
    exit_port: u16,
    io: HostIo,
    debugcon: bool,
    bus: IoManager,
    irq_lines: Vec<(EventFd, u32)>,
    virtio: Vec<VirtioSlot>,
    subscribers: Vec<Subscriber>,
    threads: Vec<HostThread>,
    stop_signals: Vec<c_int>,
    events: VmEventSender,
    receiver: std::sync::mpsc::Receiver<VmEvent>,
    metrics: MetricsRegistry,
    disk_slots: Vec<crate::vmm::DiskSlot>,
    net_slots: Vec<crate::vmm::NetSlot>,
    vsock: Option<VsockConfig>,
    track_dirty: bool,
    described: (bool, bool),
    restore: Option<Box<PendingRestore>>,
}

/// A snapshot being restored: its state, applied as the VM is built.
struct PendingRestore {
    state: SnapshotState,
    resume: bool,
}

/// The legacy devices the running VM keeps hold of.
struct LegacyDevices {
    serial: Arc<Mutex<SerialDevice>>,
    keyboard: Arc<Mutex<KeyboardDevice>>,
    generation: Arc<Mutex<VmGeneration>>,
}

fn check_vcpus(n: u8) -> Result<(), VmmError> {
    match n {
        0 => Err(VmmError::NoVcpus),
        n if n > MAX_VCPUS => Err(VmmError::TooManyVcpus { requested: n }),
        _ => Ok(()),
    }
}

/// More vCPUs than host CPUs run, but share them: said once, as a warning.
fn warn_if_overcommitted(n: u8) {
    let host = std::thread::available_parallelism().map_or(1, |p| p.get());
    if usize::from(n) > host {
        log::warn!(
            "{n} vCPUs on a host with {host} CPUs: they share the host's CPUs, \
             each gets less than a whole one"
        );
    }
}

impl VmBuilder {
    /// Lays out and creates `mem_mib` MiB of guest RAM backed by `backing`,
    /// and the allocator devices are placed from. Everything else starts at
    /// its default: no kernel, [`DEFAULT_CMDLINE`], one vCPU, seccomp on
    /// VMM threads, console output discarded.
    pub fn new(mem_mib: u64, backing: RamBacking) -> Result<Self, VmmError> {
        let map = Self::address_map_of(mem_mib)?;
        let memory = create_guest_ram(&map, backing)?;
        Self::with_ram(map, memory)
    }

    fn address_map_of(mem_mib: u64) -> Result<AddressMap, VmmError> {
        let size = mem_mib
            .checked_mul(1 << 20)
            .ok_or(VmmError::MemoryTooLarge(mem_mib))?;
        Ok(AddressMap::new(size)?)
    }

    /// A builder over guest RAM made elsewhere (for `map`).
    fn with_ram(map: AddressMap, memory: GuestRam) -> Result<Self, VmmError> {
        let resources = ResourceAllocator::new(&map).map_err(DeviceError::from)?;
        let (events, receiver) = VmEventSender::channel();
        Ok(Self {
            map,
            memory,
            resources,
            kernel: KernelSource::Bytes(&[]),
            initrd: None,
            opened_kernel: None,
            opened_initrd: None,
            inputs: Vec::new(),
            disks: Vec::new(),
            bus_names: Vec::new(),
            outputs: Vec::new(),
            held: Vec::new(),
            serial_pty: None,
            virtio_cmdline: true,
            cmdline: DEFAULT_CMDLINE.to_string(),
            protocol: ProtocolChoice::Auto,
            vcpus: 1,
            seccomp: SeccompPolicy::default(),
            extra_syscalls: Vec::new(),
            extra_ioctls: Vec::new(),
            exit_port: DEBUG_EXIT_PORT,
            io: HostIo::default(),
            debugcon: false,
            bus: IoManager::new(),
            irq_lines: Vec::new(),
            virtio: Vec::new(),
            subscribers: Vec::new(),
            threads: Vec::new(),
            stop_signals: Vec::new(),
            events,
            receiver,
            metrics: MetricsRegistry::default(),
            disk_slots: Vec::new(),
            net_slots: Vec::new(),
            vsock: None,
            track_dirty: false,
            described: (false, false),
            restore: None,
        })
    }

    /// A builder for the machine a snapshot describes, its RAM from the
    /// snapshot's memory files (mapped privately, or copied into RAM backed
    /// as `backing` says when `restore.eager`); [`build`](VmBuilder::build)
    /// then puts every saved state back instead of loading a kernel. Add
    /// the same devices of your own, in the same order, as the VM that was
    /// saved had.
    pub fn restoring(restore: &RestoreConfig, backing: RamBacking) -> Result<Self, VmmError> {
        let state: SnapshotState =
            read_state_file(&restore.state_path).map_err(RestoreError::from)?;
        state.validate().map_err(RestoreError::from)?;
        let needed = state.memory.layers;
        let given = restore.memory.len();
        // One file for a diff snapshot: its layers merged into one.
        if given == 0 || (given != needed as usize && given != 1) {
            return Err(RestoreError::Layers { needed, given }.into());
        }
        check_host_memory(state.machine.mem_mib)?;
        let map = Self::address_map_of(state.machine.mem_mib)?;
        let mem_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| RestoreError::Memory { path, source }
        };
        let mut files = Vec::with_capacity(restore.memory.len());
        for path in &restore.memory {
            let f = open_input("memory file", path, InputKind::RegularFile, false)?;
            files.push((path, f));
        }
        let (base_path, base) = &files[0];
        let memory = if restore.eager {
            vmm_memory::snapshot::load_eager(&map, base, backing)
        } else {
            vmm_memory::snapshot::map_private(&map, base)
        }
        .map_err(mem_err(base_path))?;
        for (path, layer) in &files[1..] {
            vmm_memory::snapshot::apply_layer(&map, &memory, layer).map_err(mem_err(path))?;
        }
        // What the layers wrote is the restored memory, not a change to it.
        vmm_memory::snapshot::take_written_pages(&memory);
        let mut b = Self::with_ram(map, memory)?;
        b.vcpus(state.machine.vcpus)
            .cmdline(&state.machine.cmdline)
            .exit_port(state.machine.exit_port)
            .debugcon(state.machine.debugcon);
        b.restore = Some(Box::new(PendingRestore {
            state,
            resume: restore.resume,
        }));
        Ok(b)
    }

    /// Track the pages the guest and the devices write, for diff snapshots
    /// (off by default: KVM's dirty log costs a little on every first write
    /// to a page after each snapshot).
    pub fn track_dirty_pages(&mut self, on: bool) -> &mut Self {
        self.track_dirty = on;
        self
    }

    /// A builder with everything `config` describes: the built-in devices
    /// are added through the same methods a caller's own devices use.
    ///
    /// Inputs first, outputs last: the kernel, the initrd and the disk
    /// images are opened (without blocking) and checked for what they must
    /// be; disks are locked and one image given twice is refused unless
    /// both are read-only; only then are output files opened, each refused
    /// if it is one of the inputs (by device and inode), and truncated only
    /// after that check.
    pub fn from_config(config: &VmConfig, mut io: HostIo) -> Result<Self, VmmError> {
        let (mut b, disks, nets, vsock, rng, console) = match &config.restore {
            None => {
                check_vcpus(config.vcpus)?;
                let mut b = Self::new(config.mem_mib, config.ram_backing)?;
                b.kernel(config.kernel.clone())
                    .cmdline(&config.cmdline)
                    .protocol(config.protocol)
                    .vcpus(config.vcpus)
                    .exit_port(config.exit_port)
                    .debugcon(config.debugcon)
                    .virtio_cmdline_entries(config.virtio_cmdline);
                if let Some(initrd) = &config.initrd {
                    b.initrd(initrd);
                }
                b.open_boot_files()?;
                (
                    b,
                    config.disks.clone(),
                    config.nets.clone(),
                    config.vsock.clone(),
                    config.rng,
                    config.console.clone(),
                )
            }
            Some(restore) => {
                let b = Self::restoring(restore, config.ram_backing)?;
                let machine = b
                    .restore
                    .as_ref()
                    .map(|r| r.state.machine.clone())
                    .ok_or(VmmError::NoVcpus)?;
                let disks = restored_disks(&machine, &restore.disks)?;
                let nets = restored_nets(&machine, &restore.nets)?;
                // The console is the snapshot's; where it writes is this
                // host's choice (the host's console output by default).
                let console = machine
                    .console
                    .then(|| config.console.clone().unwrap_or(ConsoleConfig::Host));
                let vsock = machine.vsock.as_ref().map(|v| VsockConfig {
                    guest_cid: v.guest_cid,
                    uds_path: restore
                        .vsock_uds
                        .clone()
                        .unwrap_or_else(|| v.uds_path.clone()),
                });
                (b, disks, nets, vsock, machine.rng, console)
            }
        };
        b.seccomp(config.seccomp)
            .track_dirty_pages(config.track_dirty_pages);
        b.described = (rng, console.is_some());
        for d in &disks {
            b.add_disk(d)?;
        }
        for n in &nets {
            b.add_net(n)?;
        }
        if let Some(v) = &vsock {
            b.add_vsock(v)?;
        }
        if rng {
            let rng = Rng::new();
            b.metrics
                .register("entropy", DeviceMetrics::Entropy(rng.metrics()));
            b.add_virtio(rng)?;
        }
        match &console {
            None => {}
            Some(ConsoleConfig::Host) => {
                let out = io
                    .console_out
                    .take()
                    .unwrap_or_else(|| Box::new(io::sink()));
                let out = b.buffered_output("console output", out);
                match io.console_in.take() {
                    Some(input) => {
                        let (dev, feed) =
                            Console::with_input(out).map_err(DeviceError::ConsoleInput)?;
                        b.add_virtio(dev)?;
                        b.spawn_on_start("console-in", ThreadKind::Input, move || feed.pump(input));
                    }
                    None => {
                        b.add_virtio(Console::new(out))?;
                    }
                }
            }
            Some(ConsoleConfig::File { path, mode }) => {
                let f = open_output("console output", path, *mode, &b.inputs)
                    .map_err(DeviceError::from)?;
                let out = b.buffered_output("console output", Box::new(f));
                b.add_virtio(Console::new(out))?;
            }
        }
        match &config.serial {
            SerialConfig::Host => {}
            SerialConfig::File { path, mode } => {
                let f = open_output("serial output", path, *mode, &b.inputs)
                    .map_err(DeviceError::from)?;
                io.serial_out = Box::new(f);
                io.serial_in = None;
            }
            SerialConfig::Pty => {
                let pty = Pty::open().map_err(VmmError::Pty)?;
                io.serial_out = Box::new(pty.master.try_clone().map_err(VmmError::Pty)?);
                io.serial_in = Some(Box::new(pty.master));
                b.held.push(pty.slave);
                b.serial_pty = Some(pty.path);
            }
        }
        b.host_io(io);
        Ok(b)
    }

    /// Puts `out` behind a [`BufferedOutput`] whose pump starts with the VM:
    /// guest output then never blocks a vCPU or the event loop, whatever the
    /// host end does; what cannot be written is dropped and counted, and
    /// reported when the VM ends.
    pub fn buffered_output(
        &mut self,
        name: &'static str,
        out: Box<dyn Write + Send>,
    ) -> Box<dyn Write + Send> {
        let (buffer, pump) = BufferedOutput::new(name, out);
        self.outputs.push((name, buffer.status()));
        self.spawn_on_start(name, ThreadKind::Input, move || pump.run());
        Box::new(buffer)
    }

    /// The path of the pseudo-terminal COM1 is on, with
    /// [`SerialConfig::Pty`].
    pub fn serial_pty(&self) -> Option<&Path> {
        self.serial_pty.as_deref()
    }

    /// Opens a disk image as `disk` says (locked unless it says not to) and
    /// adds a virtio-blk device over it. The same image twice (through any
    /// path) is refused unless both are read-only.
    pub fn add_disk(
        &mut self,
        disk: &DiskConfig,
    ) -> Result<VirtioHandle<Block<GuestRam>>, VmmError> {
        let disk_err = |source| DeviceError::Disk {
            path: disk.path.clone(),
            source,
        };
        // Host-file errors name the image themselves.
        let host = |e: HostFileError| VmmError::Device(DeviceError::Host(e));
        let file = open_input(
            "disk image",
            &disk.path,
            InputKind::FileOrBlockDevice,
            !disk.read_only,
        )
        .map_err(host)?;
        let id = FileId::of(&file).map_err(|e| {
            host(HostFileError::Open {
                what: "disk image",
                path: disk.path.clone(),
                source: e,
            })
        })?;
        if let Some((other, other_ro)) = self
            .disks
            .iter()
            .find(|(i, _)| i.id == id)
            .map(|(i, ro)| (i.path.clone(), *ro))
        {
            if !(other_ro && disk.read_only) {
                return Err(host(HostFileError::SameImageTwice {
                    path: disk.path.clone(),
                    other_path: other,
                }));
            }
        }
        if disk.lock {
            lock_image(&file, &disk.path, disk.read_only).map_err(host)?;
        }
        let mut block =
            Block::from_file(file, disk.read_only, disk.serial.as_deref()).map_err(disk_err)?;
        if let Some(limits) = &disk.rate_limiter {
            block
                .set_rate_limiter(limits)
                .map_err(|e| disk_err(BlockError::RateLimiter(e.to_string())))?;
        }
        let name = match disk.name.as_ref().or(disk.serial.as_ref()) {
            Some(id) => format!("block_{id}"),
            None => format!("block_{}", self.disks.len()),
        };
        self.metrics
            .register(name, DeviceMetrics::Block(block.metrics()));
        let input = OpenedInput {
            what: "disk image",
            path: disk.path.clone(),
            id,
        };
        self.inputs.push(input.clone());
        self.disks.push((input, disk.read_only));
        let handle = self.add_virtio(block)?;
        self.disk_slots.push(crate::vmm::DiskSlot {
            config: disk.clone(),
            transport: Arc::downgrade(handle.transport()),
        });
        Ok(handle)
    }

    /// Attaches to the TAP `net` names (or takes a duplicate of the one it
    /// passes) and adds a virtio-net device on it, with its MAC and rate
    /// limits. Ids must be unique.
    pub fn add_net(&mut self, net: &NetConfig) -> Result<VirtioHandle<Net<GuestRam>>, VmmError> {
        if self.net_slots.iter().any(|n| n.config.id == net.id) {
            return Err(DeviceError::NetIdTwice(net.id.clone()).into());
        }
        let tap_err = |source| DeviceError::Tap {
            id: net.id.clone(),
            source,
        };
        let tap = match &net.tap {
            TapSource::Name(name) => Tap::open(name).map_err(tap_err)?,
            TapSource::Fd(fd) => {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor number, no
                // pointers; a bad number fails with EBADF.
                let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(tap_err(TapError::NotTap {
                        fd: *fd,
                        source: Some(std::io::Error::last_os_error()),
                    })
                    .into());
                }
                // SAFETY: `dup` is a new descriptor, ours alone.
                let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) };
                // Errors name the caller's descriptor, not the duplicate.
                Tap::from_fd(owned)
                    .map_err(|e| match e {
                        TapError::NotTap { source, .. } => TapError::NotTap { fd: *fd, source },
                        other => other,
                    })
                    .map_err(tap_err)?
            }
        };
        let net_err = |source| DeviceError::Net {
            id: net.id.clone(),
            source,
        };
        let mut dev = Net::new(tap, net.mac).map_err(net_err)?;
        dev.set_rate_limiters(net.rx_rate_limiter.as_ref(), net.tx_rate_limiter.as_ref())
            .map_err(net_err)?;
        self.metrics
            .register(format!("net_{}", net.id), DeviceMetrics::Net(dev.metrics()));
        let handle = self.add_virtio(dev)?;
        self.net_slots.push(crate::vmm::NetSlot {
            config: net.clone(),
            transport: Arc::downgrade(handle.transport()),
        });
        Ok(handle)
    }

    /// Adds a virtio-vsock device listening on `vsock.uds_path`, and lets
    /// the device event loop make and accept Unix socket connections
    /// (`socket`, `connect`, `accept4`, `recvfrom`/`sendto` for peeks and
    /// writes without SIGPIPE, `shutdown`).
    pub fn add_vsock(
        &mut self,
        vsock: &VsockConfig,
    ) -> Result<VirtioHandle<Vsock<GuestRam>>, VmmError> {
        if self.vsock.is_some() {
            return Err(DeviceError::VsockTwice.into());
        }
        let dev = Vsock::new(vsock.guest_cid, vsock.uds_path.clone()).map_err(DeviceError::from)?;
        self.metrics
            .register("vsock", DeviceMetrics::Vsock(dev.metrics()));
        self.allow_syscalls(
            ThreadKind::EventLoop,
            &[
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
            ],
        );
        let handle = self.add_virtio(dev)?;
        self.vsock = Some(vsock.clone());
        Ok(handle)
    }

    /// Opens the kernel and initrd files now (without blocking, checked to
    /// be regular files), so that they are known before any output opens.
    fn open_boot_files(&mut self) -> Result<(), VmmError> {
        if let KernelSource::Path(p) = self.kernel.clone() {
            let f = open_input("kernel", &p, InputKind::RegularFile, false)?;
            self.note_input("kernel", &p, &f)?;
            self.opened_kernel = Some(f);
        }
        if let Some(p) = self.initrd.clone() {
            let f = open_input("initrd", &p, InputKind::RegularFile, false)?;
            self.note_input("initrd", &p, &f)?;
            self.opened_initrd = Some(f);
        }
        Ok(())
    }

    fn note_input(&mut self, what: &'static str, path: &Path, f: &File) -> Result<(), VmmError> {
        let id = FileId::of(f).map_err(|source| HostFileError::Open {
            what,
            path: path.to_path_buf(),
            source,
        })?;
        self.inputs.push(OpenedInput {
            what,
            path: path.to_path_buf(),
            id,
        });
        Ok(())
    }

    /// The kernel to boot.
    pub fn kernel(&mut self, kernel: KernelSource) -> &mut Self {
        self.kernel = kernel;
        self.opened_kernel = None;
        self
    }

    /// An initrd file.
    pub fn initrd(&mut self, path: &Path) -> &mut Self {
        self.initrd = Some(path.to_path_buf());
        self.opened_initrd = None;
        self
    }

    /// The kernel command line (the virtio devices' entries are appended).
    pub fn cmdline(&mut self, cmdline: &str) -> &mut Self {
        self.cmdline = cmdline.trim().to_string();
        self
    }

    /// Whether the virtio-mmio devices are announced on the command line
    /// (`virtio_mmio.device=` entries, on by default). The DSDT describes
    /// them either way, for kernels that read ACPI.
    pub fn virtio_cmdline_entries(&mut self, on: bool) -> &mut Self {
        self.virtio_cmdline = on;
        self
    }

    /// The boot protocol.
    pub fn protocol(&mut self, protocol: ProtocolChoice) -> &mut Self {
        self.protocol = protocol;
        self
    }

    /// The number of vCPUs (checked by [`build`](VmBuilder::build)).
    pub fn vcpus(&mut self, n: u8) -> &mut Self {
        self.vcpus = n;
        self
    }

    /// Which threads get seccomp filters.
    pub fn seccomp(&mut self, policy: SeccompPolicy) -> &mut Self {
        self.seccomp = policy;
        self
    }

    /// The port of the debug-exit device.
    pub fn exit_port(&mut self, port: u16) -> &mut Self {
        self.exit_port = port;
        self
    }

    /// Whether to put a debug console on port 0xE9, writing to
    /// [`HostIo::debugcon_out`].
    pub fn debugcon(&mut self, on: bool) -> &mut Self {
        self.debugcon = on;
        self
    }

    /// Where COM1 and the debug console go (what is left of `io` after a
    /// console took its part).
    pub fn host_io(&mut self, io: HostIo) -> &mut Self {
        self.io = io;
        self
    }

    /// Stop the VM ([`VmEvent::StopRequested`]) when the process receives
    /// one of `signals`. The handlers are process-wide and installed when
    /// the VM starts, pointing at the VM started last.
    pub fn stop_on_signals(&mut self, signals: &[c_int]) -> &mut Self {
        self.stop_signals = signals.to_vec();
        self
    }

    /// Also allow `syscalls` (`libc::SYS_*` numbers) on threads of `kind`:
    /// what a device's own code running there needs.
    pub fn allow_syscalls(&mut self, kind: ThreadKind, syscalls: &[i64]) -> &mut Self {
        self.extra_syscalls
            .extend(syscalls.iter().map(|&s| (kind, s)));
        self
    }

    /// Also allow `ioctl` with these requests on threads of `kind`.
    pub fn allow_ioctls(&mut self, kind: ThreadKind, requests: &[u64]) -> &mut Self {
        self.extra_ioctls
            .extend(requests.iter().map(|&r| (kind, r)));
        self
    }

    /// Guest RAM, for devices that need it before the VM is built.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The guest address map.
    pub fn address_map(&self) -> &AddressMap {
        &self.map
    }

    /// The sending end of the VM's events, for a device that ends the run
    /// or asks for a reset.
    pub fn events(&self) -> VmEventSender {
        self.events.clone()
    }

    /// Puts a virtio device on virtio-mmio: a 4 KiB window and an interrupt
    /// line from the allocator, an ioeventfd per queue, an irqfd, its
    /// `virtio_mmio.device=` command-line entry, and its queue and event
    /// handling on the device event loop. Returns a typed handle on it.
    pub fn add_virtio<D: VirtioDevice<GuestRam>>(
        &mut self,
        device: D,
    ) -> Result<VirtioHandle<D>, VmmError> {
        let slot = VirtioSlot::place(Box::new(device), &self.memory, &mut self.resources)?;
        let handle = VirtioHandle::new(&slot);
        self.virtio.push(slot);
        Ok(handle)
    }

    /// Puts a port I/O device on `size` ports from `base`. `name` appears in
    /// errors (a clash with another device, say).
    pub fn add_pio_device(
        &mut self,
        name: &str,
        base: u16,
        size: u16,
        device: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<&mut Self, VmmError> {
        let names = &self.bus_names;
        let err = |source| bus_error(names, false, name, u64::from(base), u64::from(size), source);
        let range = PioRange::new(PioAddress(base), size).map_err(err)?;
        self.bus.register_pio(range, device).map_err(err)?;
        self.bus_names
            .push((false, name.to_string(), u64::from(base), u64::from(size)));
        Ok(self)
    }

    /// Puts an MMIO device on `range` (from
    /// [`allocate_mmio`](VmBuilder::allocate_mmio), or a fixed address
    /// outside guest RAM).
    pub fn add_mmio_device(
        &mut self,
        name: &str,
        range: GuestRange,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<&mut Self, VmmError> {
        let names = &self.bus_names;
        let err = |source| bus_error(names, true, name, range.start(), range.len(), source);
        let r = MmioRange::new(MmioAddress(range.start()), range.len()).map_err(err)?;
        self.bus.register_mmio(r, device).map_err(err)?;
        self.bus_names
            .push((true, name.to_string(), range.start(), range.len()));
        Ok(self)
    }

    /// An MMIO window of `size` bytes in the device area of the MMIO gap.
    pub fn allocate_mmio(&mut self, size: u64) -> Result<GuestRange, VmmError> {
        Ok(self
            .resources
            .allocate_mmio(size)
            .map_err(DeviceError::from)?)
    }

    /// An interrupt line for a device: `gsi` if given (an ISA line such as
    /// 4 for COM1), else a free one from the allocator. Writing the trigger
    /// raises the line in the guest (it becomes a KVM irqfd).
    pub fn interrupt_line(&mut self, gsi: Option<u32>) -> Result<(u32, EventFdTrigger), VmmError> {
        let gsi = match gsi {
            Some(g) => g,
            None => self.resources.allocate_irq().map_err(DeviceError::from)?,
        };
        let trigger = EventFdTrigger::new().map_err(VmmError::EventFd)?;
        let evt = trigger.eventfd().try_clone().map_err(VmmError::EventFd)?;
        self.irq_lines.push((evt, gsi));
        Ok((gsi, trigger))
    }

    /// Adds an event source to the device event loop (an event-manager
    /// subscriber: it registers its own fds in `init`).
    pub fn add_event_source(&mut self, subscriber: Subscriber) -> &mut Self {
        self.subscribers.push(subscriber);
        self
    }

    /// Runs `body` on a thread of its own when the VM starts, under the
    /// filter of `kind` (for a device's host side: an input pump, a backend
    /// reader). The thread is not joined: it ends when `body` returns.
    pub fn spawn_on_start(
        &mut self,
        name: &str,
        kind: ThreadKind,
        body: impl FnOnce() + Send + 'static,
    ) -> &mut Self {
        self.threads.push(HostThread {
            name: name.to_string(),
            kind,
            body: Box::new(body),
        });
        self
    }

    /// The registry of device counters: the built-in devices register
    /// theirs; a device of the caller's own may add its own.
    pub fn metrics(&self) -> MetricsRegistry {
        self.metrics.clone()
    }

    /// The legacy PC devices every VM gets: COM1, the i8042 (for reset), the
    /// debug-exit port and, if asked, the debug console.
    fn add_legacy_devices(&mut self) -> Result<LegacyDevices, VmmError> {
        let (_, irq) = self.interrupt_line(Some(COM1_IRQ))?;
        let out = std::mem::replace(&mut self.io.serial_out, Box::new(io::sink()));
        let out = self.buffered_output("serial output", out);
        let saved = self.restore.as_ref().map(|r| {
            (
                r.state.serial.clone(),
                r.state.i8042.clone(),
                r.state.generation,
            )
        });
        let legacy_err = |device: &str| {
            let device = device.to_string();
            move |source| VmmError::Restore(RestoreError::Device { device, source })
        };
        let serial = match &saved {
            None => Serial::new(irq, out),
            Some((st, _, _)) => Serial::restore((irq, out), st).map_err(legacy_err("COM1"))?,
        };
        self.metrics
            .register("uart", DeviceMetrics::Uart(serial.metrics()));
        let serial = Arc::new(Mutex::new(serial));
        self.add_pio_device("COM1", COM1_PORT, COM1_PORT_SIZE, serial.clone())?;
        let (_, kbd_irq) = self.interrupt_line(Some(I8042_KBD_IRQ))?;
        let reset = self.events.trigger(|| VmEvent::ResetRequested);
        let i8042 = match &saved {
            None => I8042::new(reset, kbd_irq),
            Some((_, st, _)) => {
                I8042::restore((reset, kbd_irq), st).map_err(legacy_err("i8042"))?
            }
        };
        let i8042 = Arc::new(Mutex::new(i8042));
        self.add_pio_device("i8042", I8042_PORT, I8042_PORT_SIZE, i8042.clone())?;
        let identity = random_u64();
        let generation = match &saved {
            None => VmGeneration::new(identity),
            Some((_, _, st)) => {
                VmGeneration::restore(identity, st).map_err(legacy_err("generation port"))?
            }
        };
        let generation = Arc::new(Mutex::new(generation));
        self.add_pio_device(
            "generation",
            GENERATION_PORT,
            GENERATION_PORT_SIZE,
            generation.clone(),
        )?;
        let events = self.events.clone();
        let exit = DebugExit::new(move |status| events.send(VmEvent::GuestStatus(status)));
        self.add_pio_device(
            "debug-exit",
            self.exit_port,
            DEBUG_EXIT_PORT_SIZE,
            Arc::new(Mutex::new(exit)),
        )?;
        if self.debugcon {
            let out = self
                .io
                .debugcon_out
                .take()
                .unwrap_or_else(|| Box::new(io::sink()));
            let out = self.buffered_output("debug console output", out);
            self.add_pio_device(
                "debug console",
                DEBUGCON_PORT,
                1,
                Arc::new(Mutex::new(DebugCon::new(out))),
            )?;
        }
        if let Some(mut input) = self.io.serial_in.take() {
            let serial = serial.clone();
            self.spawn_on_start("serial-in", ThreadKind::Input, move || {
                pump_serial_input(&mut input, &serial)
            });
        }
        Ok(LegacyDevices {
            serial,
            keyboard: i8042,
            generation,
        })
    }

    /// Loads the kernel, creates the KVM VM and its vCPUs, and wires every
    /// device to it.
    pub fn build(mut self) -> Result<Vmm, VmmError> {
        check_vcpus(self.vcpus)?;
        warn_if_overcommitted(self.vcpus);
        let LegacyDevices {
            serial,
            keyboard,
            generation,
        } = self.add_legacy_devices()?;
        let (cmdline, boot, layers) = match &self.restore {
            None => {
                let cmdline = self.full_cmdline();
                let rsdp = self.write_firmware_tables()?;
                let boot = self.load_kernel(&cmdline, Some(rsdp))?;
                (cmdline, Some(boot), 0)
            }
            Some(r) => (self.cmdline.clone(), None, r.state.memory.layers),
        };
        let filters = self.thread_filters_in_background();
        let vm = Vm::with_dirty_tracking(self.memory.clone(), self.track_dirty)?;
        self.wire_devices(&vm)?;
        let vcpus = self.create_vcpus(&vm, boot.as_ref())?;
        let restore = self.restore.take();
        let start_paused = restore.as_ref().is_some_and(|r| !r.resume);
        if let Some(r) = restore {
            self.apply_restore(&vm, &vcpus, &r.state)?;
        }
        let machine = self.machine_description(&cmdline);
        let filters = filters.wait()?;
        let mut subscribers: Vec<Subscriber> =
            self.virtio.iter().map(VirtioSlot::subscriber).collect();
        subscribers.append(&mut self.subscribers);
        Ok(Vmm::assemble(crate::vmm::Parts {
            vm,
            vcpus,
            bus: Arc::new(self.bus),
            boot,
            virtio: self.virtio,
            cmdline,
            subscribers,
            threads: self.threads,
            filters,
            seccomp: self.seccomp,
            stop_signals: self.stop_signals,
            events: self.events,
            receiver: self.receiver,
            metrics: self.metrics,
            disks: self.disk_slots,
            nets: self.net_slots,
            serial,
            keyboard,
            generation,
            outputs: self.outputs,
            held: self.held,
            serial_pty: self.serial_pty,
            machine,
            layers,
            track_dirty: self.track_dirty,
            start_paused,
        }))
    }

    /// What a snapshot of the VM being built records of it.
    fn machine_description(&self, cmdline: &str) -> MachineDescription {
        MachineDescription {
            mem_mib: self.map.ram_size() >> 20,
            vcpus: self.vcpus,
            cmdline: cmdline.to_string(),
            exit_port: self.exit_port,
            debugcon: self.debugcon,
            disks: self
                .disk_slots
                .iter()
                .map(|d| DiskDescription::from(&d.config))
                .collect(),
            nets: self
                .net_slots
                .iter()
                .map(|n| NetDescription::from(&n.config))
                .collect(),
            vsock: self.vsock.as_ref().map(|v| VsockDescription {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
            }),
            rng: self.described.0,
            console: self.described.1,
        }
    }

    /// Puts a snapshot's states back into the VM just built: the host is
    /// checked for the vCPUs' CPU features, each virtio device is checked
    /// to be where and what the snapshot says and gets its device, transport
    /// and queue state (then a notification on each queue, for requests the
    /// guest made while it was being saved), then the irqchip, PIT and
    /// clock, then every vCPU.
    fn apply_restore(
        &self,
        vm: &Vm,
        vcpus: &[Vcpu],
        state: &SnapshotState,
    ) -> Result<(), VmmError> {
        if let Some(first) = vcpus.first() {
            check_cpu_features(&first.current_cpuid()?, state)?;
        }
        let mismatch = |what: String, saved: String, here: String| {
            VmmError::Restore(RestoreError::Mismatch { what, saved, here })
        };
        if state.virtio.len() != self.virtio.len() {
            return Err(mismatch(
                "virtio devices".into(),
                state.virtio.len().to_string(),
                self.virtio.len().to_string(),
            ));
        }
        for (i, (slot, saved)) in self.virtio.iter().zip(&state.virtio).enumerate() {
            let mut t = slot
                .transport()
                .lock()
                .map_err(|_| DeviceError::Poisoned("a virtio transport"))?;
            let here = (t.device().device_type(), slot.window().start(), slot.irq());
            let there = (saved.device_type, saved.mmio_base, saved.irq);
            if here != there {
                return Err(mismatch(
                    format!("virtio device {i} (type, MMIO base, IRQ)"),
                    format!("{} at {:#x} on {}", there.0, there.1, there.2),
                    format!("{} at {:#x} on {}", here.0, here.1, here.2),
                ));
            }
            let device_err = |source| {
                VmmError::Restore(RestoreError::Device {
                    device: format!("virtio device {i} (type {})", here.0),
                    source,
                })
            };
            t.device_mut()
                .restore_device_state(saved.device.as_ref())
                .map_err(device_err)?;
            t.restore_state(&saved.transport).map_err(device_err)?;
            if t.device().is_active() {
                for evt in t.queue_events() {
                    evt.write(1).map_err(VmmError::EventFd)?;
                }
            }
        }
        vm.restore_state(&state.vm)?;
        for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(saved)?;
        }
        Ok(())
    }

    /// Interrupt lines become irqfds; virtio slots get their irqfd,
    /// ioeventfds and place on the MMIO bus.
    fn wire_devices(&mut self, vm: &Vm) -> Result<(), VmmError> {
        for (evt, gsi) in &self.irq_lines {
            vm.register_irqfd(evt, *gsi)?;
        }
        for slot in &self.virtio {
            slot.attach(vm, &mut self.bus)?;
        }
        Ok(())
    }

    /// The ACPI tables (every vCPU, the IOAPIC, COM1 and the virtio-mmio
    /// devices) and the MP table; returns the RSDP's address.
    fn write_firmware_tables(&self) -> Result<u64, VmmError> {
        let devices = AcpiDevices {
            serial: Some((COM1_PORT, COM1_IRQ)),
            virtio_mmio: self.virtio.iter().map(|s| (s.window(), s.irq())).collect(),
        };
        let rsdp = write_acpi_tables(&self.memory, self.vcpus, &devices)?;
        write_mptable(&self.memory, self.vcpus)?;
        Ok(rsdp)
    }

    /// The vCPUs: the first set up with the boot protocol's state, the
    /// others waiting for the guest's INIT and startup IPIs.
    fn create_vcpus(&self, vm: &Vm, boot: Option<&BootSetup>) -> Result<Vec<Vcpu>, VmmError> {
        let metrics = std::sync::Arc::new(vmm_devices::metrics::VcpuMetrics::default());
        self.metrics
            .register("vcpu", DeviceMetrics::Vcpu(metrics.clone()));
        (0..self.vcpus)
            .map(|id| {
                let mut vcpu = vm.create_vcpu(id)?;
                vcpu.set_metrics(metrics.clone());
                let state = boot.filter(|_| id == 0).map(|b| &b.cpu);
                vcpu.configure(vm.kvm(), self.vcpus, state)?;
                Ok(vcpu)
            })
            .collect()
    }

    /// Each kind of thread's seccomp filter, with the system calls devices
    /// asked for.
    /// Compiled on a short-lived thread of its own while KVM creates the VM
    /// (each takes about a millisecond on the hosts measured; neither needs
    /// the other); joined before [`build`](VmBuilder::build) returns. Where
    /// no thread can be started, compiled when asked for.
    fn thread_filters_in_background(&self) -> FiltersJob {
        let confines = self.seccomp.confines_threads();
        let (calls, ioctls) = (self.extra_syscalls.clone(), self.extra_ioctls.clone());
        let compile = move || {
            if !confines {
                return Ok(ThreadFilters::none());
            }
            thread_filters(&calls, &ioctls)
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("seccomp-compile".into())
            .spawn(move || {
                let _ = tx.send(compile());
            });
        match spawned {
            Ok(handle) => FiltersJob::Thread(handle, rx),
            Err(_) => FiltersJob::Inline(
                self.seccomp.confines_threads(),
                self.extra_syscalls.clone(),
                self.extra_ioctls.clone(),
            ),
        }
    }
}

/// Seccomp filters being compiled.
enum FiltersJob {
    Thread(
        std::thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<Result<ThreadFilters, SeccompError>>,
    ),
    Inline(bool, Vec<(ThreadKind, i64)>, Vec<(ThreadKind, u64)>),
}

impl FiltersJob {
    fn wait(self) -> Result<ThreadFilters, SeccompError> {
        match self {
            FiltersJob::Thread(handle, rx) => {
                let result = rx.recv().map_err(|_| SeccompError::CompilerPanicked);
                let _ = handle.join();
                result?
            }
            FiltersJob::Inline(false, ..) => Ok(ThreadFilters::none()),
            FiltersJob::Inline(true, calls, ioctls) => thread_filters(&calls, &ioctls),
        }
    }
}

/// Each kind of thread's seccomp filter, with the system calls and ioctls
/// devices asked for.
fn thread_filters(
    calls: &[(ThreadKind, i64)],
    ioctls: &[(ThreadKind, u64)],
) -> Result<ThreadFilters, SeccompError> {
    ThreadFilters::build(|kind| {
        (
            calls
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, s)| *s)
                .collect(),
            ioctls
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| *r)
                .collect(),
        )
    })
}

impl VmBuilder {
    fn full_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone();
        if !self.virtio_cmdline {
            return cmdline;
        }
        for slot in &self.virtio {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&slot.cmdline_entry());
        }
        cmdline
    }

    fn load_kernel(
        &mut self,
        cmdline: &str,
        acpi_rsdp: Option<u64>,
    ) -> Result<BootSetup, VmmError> {
        if self.opened_kernel.is_none() && self.opened_initrd.is_none() {
            self.open_boot_files()?;
        }
        let mut initrd = self.opened_initrd.take();
        let config = BootConfig {
            protocol: self.protocol,
            cmdline,
            acpi_rsdp,
        };
        let setup = match &self.kernel {
            KernelSource::Path(p) => {
                let mut file = match self.opened_kernel.take() {
                    Some(f) => f,
                    None => open_input("kernel", p, InputKind::RegularFile, false)?,
                };
                boot_guest(&self.memory, &self.map, &mut file, initrd.as_mut(), &config)?
            }
            KernelSource::Bytes(bytes) => boot_guest(
                &self.memory,
                &self.map,
                &mut Cursor::new(*bytes),
                initrd.as_mut(),
                &config,
            )?,
        };
        log::info!(
            "kernel loaded: {} via {}, entry {:#x}, ends at {:#x}",
            setup.kernel.format,
            setup.protocol,
            setup.cpu.rip,
            setup.kernel_loaded.end()
        );
        Ok(setup)
    }
}

/// A bus error naming the device placed and, for a clash, the device
/// already there.
fn bus_error(
    names: &[(bool, String, u64, u64)],
    mmio: bool,
    name: &str,
    base: u64,
    size: u64,
    source: vm_device::bus::Error,
) -> DeviceError {
    let end = base.saturating_add(size);
    let other = names
        .iter()
        .find(|(m, _, b, s)| *m == mmio && *b < end && base < b.saturating_add(*s));
    match other {
        Some((_, other, other_base, other_size)) => DeviceError::Clash {
            name: name.to_string(),
            base,
            size,
            other: other.clone(),
            other_base: *other_base,
            other_size: *other_size,
        },
        None => DeviceError::Bus {
            name: name.to_string(),
            base,
            size,
            source,
        },
    }
}

/// Forwards `input` to the guest's COM1, waiting whenever the UART's FIFO is
/// full; ends at end of input.
fn pump_serial_input(input: &mut dyn Read, serial: &Mutex<SerialDevice>) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let Ok(taken) = serial.lock().map(|mut s| s.enqueue_input(rest)) else {
                return;
            };
            rest = &rest[taken..];
            if taken == 0 {
                std::thread::sleep(SERIAL_INPUT_RETRY);
            }
        }
    }
}

/// The disks a snapshot describes, each on its override's image if one
/// names it (by name, else serial); an override naming no disk is refused.
fn restored_disks(
    machine: &MachineDescription,
    overrides: &[(String, PathBuf)],
) -> Result<Vec<DiskConfig>, VmmError> {
    for (id, _) in overrides {
        if !machine.disks.iter().any(|d| d.id() == Some(id.as_str())) {
            return Err(RestoreError::NoSuchDisk(id.clone()).into());
        }
    }
    Ok(machine
        .disks
        .iter()
        .map(|d| {
            let path = overrides
                .iter()
                .find(|(id, _)| d.id() == Some(id.as_str()))
                .map_or_else(|| d.path.clone(), |(_, p)| p.clone());
            d.config(path)
        })
        .collect())
}

/// The NICs a snapshot describes, each on its override's TAP if one names
/// it.
fn restored_nets(
    machine: &MachineDescription,
    overrides: &[(String, String)],
) -> Result<Vec<NetConfig>, VmmError> {
    for (id, _) in overrides {
        if !machine.nets.iter().any(|n| n.id == *id) {
            return Err(RestoreError::NoSuchNet(id.clone()).into());
        }
    }
    Ok(machine
        .nets
        .iter()
        .map(|n| {
            let tap = overrides
                .iter()
                .find(|(id, _)| n.id == *id)
                .map_or_else(|| n.host_dev_name.clone(), |(_, t)| t.clone());
            n.config(tap)
        })
        .collect())
}

/// Refuses a guest larger than all of this host's memory.
fn check_host_memory(mem_mib: u64) -> Result<(), VmmError> {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match total_kib {
        Some(kib) if kib / 1024 < mem_mib => Err(RestoreError::HostMemory {
            guest_mib: mem_mib,
            host_mib: kib / 1024,
        }
        .into()),
        _ => Ok(()),
    }
}

/// CPUID bits that follow the guest's control registers or MSRs rather than
/// the host (OSXSAVE, the APIC enable, OSPKE): never a missing feature.
const CPUID_DYNAMIC: &[(u32, u32, usize, u32)] =
    &[(1, 0, 2, 1 << 27), (1, 0, 3, 1 << 9), (7, 0, 2, 1 << 4)];

/// Refuses a host whose KVM lacks feature bits the snapshot's vCPUs have
/// (leaves 1, 7, 0xd and 0x80000001: what a guest checks before using an
/// instruction set). The baseline is what KVM reports for a vCPU of this
/// host set up as this VMM sets one up (`fresh`), the way the saved CPUID
/// was read on the snapshot's host.
fn check_cpu_features(
    fresh: &[kvm_bindings::kvm_cpuid_entry2],
    state: &SnapshotState,
) -> Result<(), VmmError> {
    let Some(saved) = state.vcpus.first() else {
        return Ok(());
    };
    let mut missing = Vec::new();
    // (leaf, subleaf, the registers holding feature bits)
    let leaves: [(u32, u32, &[usize]); 5] = [
        (1, 0, &[2, 3]),
        (7, 0, &[1, 2, 3]),
        (0xd, 0, &[0]),
        (0xd, 1, &[0]),
        (0x8000_0001, 0, &[2, 3]),
    ];
    for (leaf, index, registers) in leaves {
        let find = |entries: &[kvm_bindings::kvm_cpuid_entry2]| {
            entries
                .iter()
                .find(|e| e.function == leaf && e.index == index)
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        };
        let Some(have) = find(&saved.cpuid) else {
            continue;
        };
        let host = find(fresh).unwrap_or_default();
        for &r in registers {
            let dynamic = CPUID_DYNAMIC
                .iter()
                .filter(|d| d.0 == leaf && d.1 == index && d.2 == r)
                .fold(0, |m, d| m | d.3);
            let lacking = have[r] & !host[r] & !dynamic;
            if lacking != 0 {
                let reg = ["eax", "ebx", "ecx", "edx"][r];
                missing.push(format!("leaf {leaf:#x}.{index} {reg} bits {lacking:#010x}"));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RestoreError::CpuFeatures(missing.join(", ")).into())
    }
}

/// 64 random bits from the host (a fixed value if it has none to give).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        log::warn!("getrandom failed: the VM's identity is not random");
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: KernelSource::Bytes(vmm_testguest::IMAGE),
            ..Default::default()
        }
    }

    #[test]
    fn a_second_vsock_device_and_a_second_nic_id_are_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-builder-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut b = VmBuilder::new(16, RamBacking::Anonymous).expect("builder");
        let v = |name: &str| VsockConfig {
            guest_cid: 3,
            uds_path: dir.join(name),
        };
        b.add_vsock(&v("a.sock")).expect("the first");
        assert!(matches!(
            b.add_vsock(&v("b.sock")),
            Err(VmmError::Device(DeviceError::VsockTwice))
        ));
        assert!(
            !dir.join("b.sock").exists(),
            "nothing listens for the refused one"
        );
        let mut nic = NetConfig::new("eth0", "this-name-is-too-long");
        assert!(matches!(
            b.add_net(&nic),
            Err(VmmError::Device(DeviceError::Tap { .. }))
        ));
        nic.tap = TapSource::Fd(-1);
        assert!(matches!(
            b.add_net(&nic),
            Err(VmmError::Device(DeviceError::Tap { .. }))
        ));
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zero_or_too_many_vcpus_are_refused_before_anything_is_built() {
        let c = VmConfig {
            vcpus: 255,
            ..config()
        };
        assert!(matches!(
            VmBuilder::from_config(&c, HostIo::default()),
            Err(VmmError::TooManyVcpus { requested: 255 })
        ));
        let c = VmConfig {
            vcpus: 0,
            ..config()
        };
        assert!(matches!(
            VmBuilder::from_config(&c, HostIo::default()),
            Err(VmmError::NoVcpus)
        ));
    }

    #[test]
    fn absurd_memory_sizes_are_refused() {
        assert!(matches!(
            VmBuilder::new(u64::MAX, RamBacking::Anonymous),
            Err(VmmError::MemoryTooLarge(_))
        ));
        assert!(matches!(
            VmBuilder::new(1, RamBacking::Anonymous),
            Err(VmmError::Layout(_))
        ));
    }

    #[test]
    fn port_clashes_name_both_the_device_and_its_range() {
        let mut b = VmBuilder::new(16, RamBacking::Anonymous).unwrap();
        let dev = Arc::new(Mutex::new(DebugCon::new(io::sink())));
        b.add_pio_device("mine", 0x3f8, 1, dev.clone()).unwrap();
        let Err(err) = b.add_pio_device("theirs", 0x3f8, 8, dev) else {
            panic!("a clash was accepted");
        };
        let msg = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(
            msg.contains("theirs") && msg.contains("0x3f8"),
            "unclear: {msg}"
        );
    }

    #[test]
    fn virtio_devices_get_distinct_windows_and_lines_and_a_cmdline_entry() {
        let mut b = VmBuilder::new(16, RamBacking::Anonymous).unwrap();
        let a = b.add_virtio(Rng::new()).unwrap();
        let c = b.add_virtio(Rng::new()).unwrap();
        assert_ne!(a.window(), c.window());
        assert_ne!(a.irq(), c.irq());
        b.cmdline("  console=ttyS0 ");
        let line = b.full_cmdline();
        assert!(
            line.starts_with("console=ttyS0 virtio_mmio.device=4K@"),
            "{line}"
        );
        assert_eq!(line.matches("virtio_mmio.device=").count(), 2);
        assert_eq!(a.with(|rng| rng.broken_chains()), Some(0));
    }

    #[test]
    fn missing_and_directory_kernels_are_clear_errors() {
        let mut b = VmBuilder::new(16, RamBacking::Anonymous).unwrap();
        b.kernel(KernelSource::Path("/nonexistent/vmlinux".into()));
        assert!(matches!(
            b.load_kernel("", None),
            Err(VmmError::HostFile(HostFileError::Open {
                what: "kernel",
                ..
            }))
        ));
        b.kernel(KernelSource::Path("/".into()));
        assert!(matches!(
            b.load_kernel("", None),
            Err(VmmError::HostFile(HostFileError::WrongKind {
                what: "kernel",
                ..
            }))
        ));
    }
}
