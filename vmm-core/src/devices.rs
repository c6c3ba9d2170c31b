//! Devices of a VM: the virtio-mmio slot every virtio device sits in (its
//! window, interrupt line, ioeventfds, irqfd and command-line entry), the
//! typed handle its owner keeps, and the plain descriptions of the built-in
//! devices that [`VmConfig`](crate::VmConfig) carries.

use std::io;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vmm_devices::host_files::{HostFileError, OutputMode};
use vmm_devices::rate_limiter::RateLimiterConfig;
use vmm_devices::virtio::block::BlockError;
use vmm_devices::virtio::mmio::{
    MmioEventHandler, MmioTransport, TransportError, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use vmm_devices::virtio::net::{MacAddr, NetError, TapError};
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
    /// The name a manager knows the disk by (such as Firecracker's
    /// `drive_id`, which may be longer than a serial): what
    /// [`VmHandle::replace_disk`](crate::VmHandle::replace_disk) and the
    /// metrics (`block_<name>`) use. Without it, the serial is the name.
    pub name: Option<String>,
    /// Take an OFD lock on the image (shared when read-only, exclusive
    /// otherwise), so that no other VMM writes it meanwhile.
    pub lock: bool,
    /// Limits on the bytes the guest reads and writes and on its requests.
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DiskConfig {
    /// A locked, writable disk on `path` with no id.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            serial: None,
            name: None,
            lock: true,
            rate_limiter: None,
        }
    }
}

/// Where a NIC's TAP comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// A TAP interface by name (usually made beforehand with
    /// `ip tuntap add NAME mode tap`).
    Name(String),
    /// A TAP the caller opened (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and
    /// passes by descriptor; the VM uses a duplicate, the caller keeps its
    /// own.
    Fd(std::os::fd::RawFd),
}

/// A virtio-net NIC on a host TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The name a manager knows the NIC by (Firecracker's `iface_id`):
    /// what [`VmHandle::set_net_link`](crate::VmHandle::set_net_link), the
    /// metrics (`net_<id>`) and restore overrides use.
    pub id: String,
    /// The TAP.
    pub tap: TapSource,
    /// The MAC address offered to the guest (it picks one otherwise).
    pub mac: Option<MacAddr>,
    /// Limits on what the guest receives.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// A NIC `id` on the TAP interface `tap`, no MAC, no limits.
    pub fn new(id: impl Into<String>, tap: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            tap: TapSource::Name(tap.into()),
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }
}

/// A virtio-vsock device with Firecracker's host side (see
/// [`vmm_devices::virtio::vsock`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; guest connections to port
    /// `P` go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Where a virtio console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The host I/O given to the builder
    /// ([`HostIo::console_out`](crate::HostIo::console_out) and
    /// [`HostIo::console_in`](crate::HostIo::console_in)).
    Host,
    /// Output to a file, no input.
    File {
        /// The file (created if missing; refused if it is one of the VM's
        /// inputs).
        path: PathBuf,
        /// Emptied first, or appended to.
        mode: OutputMode,
    },
}

/// Why a device could not be set up.
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
    /// A NIC's TAP could not be used.
    #[error("NIC {id}")]
    Tap {
        /// The NIC.
        id: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// A NIC could not be set up.
    #[error("NIC {id}")]
    Net {
        /// The NIC.
        id: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// The vsock device could not be set up.
    #[error("vsock")]
    Vsock(#[from] vmm_devices::virtio::vsock::VsockError),
    /// A second vsock device (a VM has one: the guest's context id is the
    /// VM's).
    #[error("a VM has one vsock device")]
    VsockTwice,
    /// Two NICs have the same id.
    #[error("two NICs have the id {0:?}")]
    NetIdTwice(String),
    /// A host file cannot be used.
    #[error(transparent)]
    Host(#[from] HostFileError),
    /// The console input could not be set up.
    #[error("cannot set up the console input")]
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
    /// A device's range clashes with another's, or is not a valid range.
    #[error("{name} at {base:#x} (+{size:#x}) overlaps another device or is not a valid range")]
    Bus {
        /// The device being placed.
        name: String,
        /// Its first address.
        base: u64,
        /// Its size.
        size: u64,
        /// The bus's reason.
        #[source]
        source: vm_device::bus::Error,
    },
    /// A device's range overlaps another device's.
    #[error(
        "{name} at {base:#x}-{:#x} clashes with {other} at {other_base:#x}-{:#x}",
        base + size - 1,
        other_base + other_size - 1
    )]
    Clash {
        /// The device being placed.
        name: String,
        /// Its first address.
        base: u64,
        /// Its size.
        size: u64,
        /// The device already there.
        other: String,
        /// Its first address.
        other_base: u64,
        /// Its size.
        other_size: u64,
    },
    /// A device lock was poisoned by a panic on another thread.
    #[error("the lock of {0} is poisoned")]
    Poisoned(&'static str),
}

/// The transport of a virtio device in a VM.
pub type Transport = MmioTransport<GuestRam>;

/// One virtio-mmio device in the VM.
pub struct VirtioSlot {
    window: GuestRange,
    irq: u32,
    irq_evt: EventFdTrigger,
    transport: Arc<Mutex<Transport>>,
}

impl VirtioSlot {
    /// Puts `device` on a transport in a fresh MMIO window with a fresh
    /// interrupt line, both from `resources`.
    pub fn place(
        device: Box<dyn VirtioDevice<GuestRam>>,
        memory: &GuestRam,
        resources: &mut ResourceAllocator,
    ) -> Result<Self, DeviceError> {
        let window = resources.allocate_mmio(MMIO_WINDOW_SIZE)?;
        let irq = resources.allocate_irq()?;
        let irq_evt = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
        let transport = MmioTransport::new(
            device,
            memory.clone(),
            irq_evt.try_clone().map_err(DeviceError::EventFd)?,
        )?;
        Ok(Self {
            window,
            irq,
            irq_evt,
            transport: Arc::new(Mutex::new(transport)),
        })
    }

    /// Its MMIO window.
    pub fn window(&self) -> GuestRange {
        self.window
    }

    /// Its interrupt line (a GSI of the in-kernel IOAPIC).
    pub fn irq(&self) -> u32 {
        self.irq
    }

    /// The transport, with the device inside.
    pub fn transport(&self) -> &Arc<Mutex<Transport>> {
        &self.transport
    }

    /// The `virtio_mmio.device=` command line entry that announces it.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.window.len() / 1024,
            self.window.start(),
            self.irq
        )
    }

    /// Wires the slot to KVM (irqfd; an ioeventfd per queue on the notify
    /// register) and to the MMIO bus.
    pub fn attach(&self, vm: &Vm, bus: &mut IoManager) -> Result<(), DeviceError> {
        vm.register_irqfd(self.irq_evt.eventfd(), self.irq)?;
        let t = self
            .transport
            .lock()
            .map_err(|_| DeviceError::Poisoned("a virtio transport"))?;
        let notify = IoEventAddress::Mmio(self.window.start() + NOTIFY_REG_OFFSET);
        for (i, evt) in t.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &notify, i as u32)?;
        }
        let name = format!("virtio device type {}", t.device().device_type());
        drop(t);
        let bus_err = |source| DeviceError::Bus {
            name: name.clone(),
            base: self.window.start(),
            size: self.window.len(),
            source,
        };
        let range =
            MmioRange::new(MmioAddress(self.window.start()), self.window.len()).map_err(bus_err)?;
        bus.register_mmio(range, self.transport.clone())
            .map_err(bus_err)
    }

    /// The event loop subscriber that serves its queues and events.
    pub fn subscriber(&self) -> Subscriber {
        Box::new(MmioEventHandler::new(self.transport.clone()))
    }
}

/// The owner's typed handle on a virtio device it gave to a VM: reach the
/// device (as its own type) while the VM runs or after it ended.
pub struct VirtioHandle<D> {
    window: GuestRange,
    irq: u32,
    transport: Arc<Mutex<Transport>>,
    device: PhantomData<fn() -> D>,
}

impl<D> Clone for VirtioHandle<D> {
    fn clone(&self) -> Self {
        Self {
            window: self.window,
            irq: self.irq,
            transport: self.transport.clone(),
            device: PhantomData,
        }
    }
}

impl<D: VirtioDevice<GuestRam>> VirtioHandle<D> {
    pub(crate) fn new(slot: &VirtioSlot) -> Self {
        Self {
            window: slot.window,
            irq: slot.irq,
            transport: slot.transport.clone(),
            device: PhantomData,
        }
    }

    /// Runs `f` on the device (holding its transport's lock: keep it short,
    /// the device's queues wait meanwhile). `None` if the lock is poisoned.
    pub fn with<R>(&self, f: impl FnOnce(&mut D) -> R) -> Option<R> {
        let mut t = self.transport.lock().ok()?;
        t.device_as_mut::<D>().map(f)
    }

    /// The transport, with the device inside (its state, the driver's
    /// status).
    pub fn transport(&self) -> &Arc<Mutex<Transport>> {
        &self.transport
    }

    /// Its MMIO window.
    pub fn window(&self) -> GuestRange {
        self.window
    }

    /// Its interrupt line.
    pub fn irq(&self) -> u32 {
        self.irq
    }
}
