//! Virtio devices of a [`Vmm`](crate::Vmm): built from the configuration,
//! placed by the resource allocator, announced on the kernel command line and
//! wired to KVM (ioeventfds for notifications, irqfds for interrupts).

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vmm_devices::virtio::block::{Block, BlockError};
use vmm_devices::virtio::console::{Console, ConsoleInput};
use vmm_devices::virtio::mmio::{
    MmioEventHandler, MmioTransport, TransportError, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use vmm_devices::virtio::rng::Rng;
use vmm_devices::virtio::VirtioDevice;
use vmm_devices::EventFdTrigger;
use vmm_memory::{AllocatorError, GuestRam, GuestRange, ResourceAllocator};

use crate::event_loop::Subscriber;
use crate::vm::{Vm, VmError};

/// A disk: a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image.
    pub path: PathBuf,
    /// Refuse guest writes (the file is opened read-only).
    pub read_only: bool,
    /// The id the guest reads with GET_ID (at most 20 bytes).
    pub serial: Option<String>,
}

/// Where a virtio console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// Output to the VMM's stdout, input from its stdin.
    Stdout,
    /// Output to a file (created or truncated), no input.
    File(PathBuf),
}

/// Why a virtio device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk could not be opened.
    #[error("disk {path}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The console output could not be opened.
    #[error("cannot open console output {path}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The console input thread could not start.
    #[error("cannot start the console input")]
    ConsoleInput(#[source] io::Error),
    /// No MMIO window or interrupt line was left.
    #[error("no resources left for a device")]
    Resources(#[from] AllocatorError),
    /// The transport refused the device.
    #[error("cannot put the device on virtio-mmio")]
    Transport(#[from] TransportError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// KVM refused an ioeventfd or irqfd.
    #[error("cannot wire the device to KVM")]
    Kvm(#[from] VmError),
    /// The MMIO bus refused the device.
    #[error("cannot place the device on the MMIO bus")]
    Bus(#[source] vm_device::bus::Error),
}

/// One virtio-mmio device in the VM.
pub struct VirtioSlot {
    /// Its MMIO window.
    pub window: GuestRange,
    /// Its interrupt line.
    pub irq: u32,
    irq_evt: EventFdTrigger,
    /// The transport (and the device inside).
    pub transport: Arc<Mutex<MmioTransport<GuestRam>>>,
}

impl VirtioSlot {
    /// The `virtio_mmio.device=` command line entry that announces it.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.window.len() / 1024,
            self.window.start(),
            self.irq
        )
    }
}

fn place(
    device: Box<dyn VirtioDevice<GuestRam>>,
    memory: &GuestRam,
    resources: &mut ResourceAllocator,
) -> Result<VirtioSlot, DeviceError> {
    let window = resources.allocate_mmio(MMIO_WINDOW_SIZE)?;
    let irq = resources.allocate_irq()?;
    let irq_evt = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
    let transport = MmioTransport::new(
        device,
        memory.clone(),
        irq_evt.try_clone().map_err(DeviceError::EventFd)?,
    )?;
    Ok(VirtioSlot {
        window,
        irq,
        irq_evt,
        transport: Arc::new(Mutex::new(transport)),
    })
}

/// Builds the configured devices, in a stable order: disks, rng, console.
/// Returns them and, for a console on stdout, the handle its stdin pump
/// feeds.
pub fn build_virtio(
    disks: &[DiskConfig],
    rng: bool,
    console: Option<&ConsoleConfig>,
    memory: &GuestRam,
    resources: &mut ResourceAllocator,
) -> Result<(Vec<VirtioSlot>, Option<ConsoleInput>), DeviceError> {
    let mut slots = Vec::new();
    let mut input = None;
    for d in disks {
        let dev = Block::open(&d.path, d.read_only, d.serial.as_deref()).map_err(|source| {
            DeviceError::Disk {
                path: d.path.clone(),
                source,
            }
        })?;
        slots.push(place(Box::new(dev), memory, resources)?);
    }
    if rng {
        slots.push(place(Box::new(Rng::new()), memory, resources)?);
    }
    if let Some(c) = console {
        let dev = match c {
            ConsoleConfig::Stdout => {
                let (dev, feed) = Console::with_input(Box::new(io::stdout()))
                    .map_err(DeviceError::ConsoleInput)?;
                input = Some(feed);
                dev
            }
            ConsoleConfig::File(path) => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| DeviceError::ConsoleFile {
                        path: path.clone(),
                        source,
                    })?;
                Console::new(Box::new(f))
            }
        };
        slots.push(place(Box::new(dev), memory, resources)?);
    }
    Ok((slots, input))
}

/// Wires the devices to KVM and the MMIO bus.
pub fn attach(vm: &Vm, bus: &mut IoManager, slots: &[VirtioSlot]) -> Result<(), DeviceError> {
    for slot in slots {
        vm.register_irqfd(slot.irq_evt.eventfd(), slot.irq)?;
        let t = slot
            .transport
            .lock()
            .map_err(|_| DeviceError::EventFd(io::Error::other("poisoned lock")))?;
        let notify = IoEventAddress::Mmio(slot.window.start() + NOTIFY_REG_OFFSET);
        for (i, evt) in t.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &notify, i as u32)?;
        }
        drop(t);
        let range = MmioRange::new(MmioAddress(slot.window.start()), slot.window.len())
            .map_err(DeviceError::Bus)?;
        bus.register_mmio(range, slot.transport.clone())
            .map_err(DeviceError::Bus)?;
    }
    Ok(())
}

/// The event loop subscribers of the devices.
pub fn subscribers(slots: &[VirtioSlot]) -> Vec<Subscriber> {
    slots
        .iter()
        .map(|s| Box::new(MmioEventHandler::new(s.transport.clone())) as Subscriber)
        .collect()
}
