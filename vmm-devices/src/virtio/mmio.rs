//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2).
//!
//! The driver's register accesses arrive through [`MutDeviceMmio`]; the
//! transport keeps the status state machine, the feature words and each
//! queue's configuration, and activates the device at `DRIVER_OK` with queues
//! it has validated. Queue notifications are eventfds, one per queue: the VMM
//! registers them as ioeventfds on [`NOTIFY_REG_OFFSET`] with the queue index
//! as data match, so a notification never exits to userspace; writes that do
//! reach the transport signal the same eventfds.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivationContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::persist::{Persist, RestoreError};
use crate::EventFdTrigger;

/// Size of a device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (for ioeventfd registration).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) interface.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id: "VMMK".
pub const VENDOR_ID: u32 = 0x4b4d_4d56;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
/// Configuration change interrupt bit.
pub const INT_CONFIG: u32 = 2;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport's side of a device's interrupt: the interrupt status
/// register, the needs-reset flag and the interrupt line.
pub struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFdTrigger,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.trigger() {
            log::error!("virtio-mmio: cannot raise the interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.raise(INT_CONFIG);
        }
    }
}

/// What the driver wrote for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueConfig {
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One queue as the driver configured it and, for an active device, the
/// ring positions the device has reached (virtio-queue's `QueueState`, as
/// serde data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available entry the device will read.
    pub next_avail: u16,
    /// Next used entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// The transport's state, as plain data (for snapshots and inspection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// The device status register (with `DEVICE_NEEDS_RESET` if set).
    pub device_status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
    /// The selectors.
    pub device_features_sel: u32,
    /// See [`MmioTransportState::device_features_sel`].
    pub driver_features_sel: u32,
    /// See [`MmioTransportState::device_features_sel`].
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Each queue as the driver configured it; for an active device, with
    /// the ring positions the device has reached.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue maximum size is zero, above 32768 or not a power of two.
    #[error("queue {index} has an invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Its declared maximum.
        size: u16,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Which ring of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table.
    Descriptors,
    /// The available (driver) ring.
    Available,
    /// The used (device) ring.
    Used,
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Available => "available ring",
            Ring::Used => "used ring",
        })
    }
}

/// Why a queue the driver set up cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueSetupError {
    /// The driver did not set QueueReady.
    #[error("queue {index} is not ready")]
    NotReady {
        /// Queue index.
        index: usize,
    },
    /// The size is zero, above the maximum or not a power of two.
    #[error("queue {index}: size {size} is not a power of two between 1 and {max}")]
    Size {
        /// Queue index.
        index: usize,
        /// What the driver wrote.
        size: u32,
        /// The device's maximum.
        max: u16,
    },
    /// A ring address is not aligned as the specification requires.
    #[error("queue {index}: {ring} at {addr:#x} is misaligned")]
    Misaligned {
        /// Queue index.
        index: usize,
        /// Which ring.
        ring: Ring,
        /// Its address.
        addr: u64,
    },
    /// A ring is not inside guest RAM.
    #[error("queue {index}: its rings are not inside guest memory")]
    OutsideMemory {
        /// Queue index.
        index: usize,
    },
}

/// Why the transport did not activate its device at `DRIVER_OK`.
#[derive(Debug, thiserror::Error)]
pub enum ActivationRefused {
    /// A queue is unusable.
    #[error(transparent)]
    Queue(#[from] QueueSetupError),
    /// The device refused its context.
    #[error("the device refused activation")]
    Device(#[from] super::ActivateError),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A queue built from what the driver wrote, checked as the specification
/// requires: ready, a size within the maximum, aligned rings inside guest
/// memory.
fn build_queue<M: GuestMemoryBackend>(
    index: usize,
    cfg: &QueueConfig,
    max: u16,
    acked_features: u64,
    mem: &M,
) -> Result<Queue, QueueSetupError> {
    if !cfg.ready {
        return Err(QueueSetupError::NotReady { index });
    }
    let size_err = QueueSetupError::Size {
        index,
        size: cfg.size,
        max,
    };
    let mut q = Queue::new(max).map_err(|_| size_err)?;
    let size = u16::try_from(cfg.size).map_err(|_| size_err)?;
    q.try_set_size(size).map_err(|_| size_err)?;
    let misaligned = |ring, addr| QueueSetupError::Misaligned { index, ring, addr };
    q.try_set_desc_table_address(GuestAddress(cfg.desc))
        .map_err(|_| misaligned(Ring::Descriptors, cfg.desc))?;
    q.try_set_avail_ring_address(GuestAddress(cfg.avail))
        .map_err(|_| misaligned(Ring::Available, cfg.avail))?;
    q.try_set_used_ring_address(GuestAddress(cfg.used))
        .map_err(|_| misaligned(Ring::Used, cfg.used))?;
    q.set_event_idx(acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(QueueSetupError::OutsideMemory { index });
    }
    Ok(q)
}

/// A virtio device on the virtio-mmio transport.
///
/// The driver's register accesses arrive through [`MmioTransport::read`]
/// and [`MmioTransport::write`] (or the vm-device bus, through
/// `MutDeviceMmio`); the device is activated at `DRIVER_OK` with validated
/// queues.
///
/// ```
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// use vmm_devices::virtio::mmio::{status, MmioTransport, MMIO_MAGIC};
/// use vmm_devices::virtio::rng::Rng;
/// use vmm_devices::EventFdTrigger;
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let mut t = MmioTransport::new(Box::new(Rng::new()), mem, EventFdTrigger::new()?)?;
/// let reg = |t: &mut MmioTransport<_>, offset| {
///     let mut v = [0u8; 4];
///     t.read(offset, &mut v);
///     u32::from_le_bytes(v)
/// };
/// assert_eq!(reg(&mut t, 0x000), MMIO_MAGIC);
/// assert_eq!(reg(&mut t, 0x008), 4, "virtio-rng");
/// t.write(0x070, &status::ACKNOWLEDGE.to_le_bytes());
/// assert_eq!(t.device_status(), status::ACKNOWLEDGE);
/// // Clearing bits without a reset is not a transition the driver may make.
/// t.write(0x070, &status::DRIVER.to_le_bytes());
/// assert_eq!(t.device_status(), status::ACKNOWLEDGE);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MmioTransport<M> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    queue_cfg: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> MmioTransport<M> {
    /// Puts `device` on a transport; `irq` is its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        irq: EventFdTrigger,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes().to_vec();
        for (index, &size) in sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(TransportError::QueueMaxSize { index, size });
            }
        }
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        Ok(Self {
            device,
            mem,
            queue_cfg: vec![QueueConfig::default(); sizes.len()],
            queue_evts,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                irq,
            }),
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The queue notification eventfds, in queue order.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt state.
    pub fn interrupt(&self) -> &MmioInterrupt {
        &self.interrupt
    }

    /// The device status register as the driver reads it.
    pub fn device_status(&self) -> u32 {
        let reset = if self.interrupt.needs_reset() {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.device_status | reset
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice<M> {
        self.device.as_ref()
    }

    /// Captures the transport's state and its queues' positions.
    pub fn state(&self) -> MmioTransportState {
        let active = self.device.active_queues();
        let queues = self
            .queue_cfg
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
            .map(|(i, (cfg, &max_size))| match active.get(i) {
                Some(q) => q.state().into(),
                None => QueueSnapshot {
                    max_size,
                    size: u16::try_from(cfg.size).unwrap_or(0),
                    ready: cfg.ready,
                    desc_table: cfg.desc,
                    avail_ring: cfg.avail,
                    used_ring: cfg.used,
                    ..QueueSnapshot::default()
                },
            })
            .collect();
        MmioTransportState {
            device_status: self.device_status(),
            acked_features: self.acked_features,
            interrupt_status: self.interrupt.status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            queues,
        }
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice<M> {
        self.device.as_mut()
    }

    /// Tells the driver the device's configuration space changed (a disk
    /// got a new size, say): the generation moves on and, once the driver
    /// has set DRIVER_OK, a configuration-change interrupt is raised.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.device.is_active() {
            self.interrupt.signal_config_change();
        }
    }

    /// The device as its concrete type `D`, if it is one.
    pub fn device_as<D: VirtioDevice<M>>(&self) -> Option<&D> {
        let any: &dyn Any = self.device.as_ref();
        any.downcast_ref()
    }

    /// The device as its concrete type `D`, mutably, if it is one.
    pub fn device_as_mut<D: VirtioDevice<M>>(&mut self) -> Option<&mut D> {
        let any: &mut dyn Any = self.device.as_mut();
        any.downcast_mut()
    }

    /// Reads a register or the configuration space.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read of register {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let sel = self.queue_sel as usize;
        let v = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(sel)
                .map_or(0, |&m| u32::from(m)),
            reg::QUEUE_READY => self.queue_cfg.get(sel).map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.device_status(),
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Writes a register or the configuration space.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte write of register {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => {
                self.write_queue_config(offset, v)
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    // With an ioeventfd registered, KVM signals the eventfd
                    // itself and this path is not taken.
                    log::trace!("virtio-mmio: queue {v} notified through the transport");
                    if let Err(e) = evt.write(1) {
                        log::error!("virtio-mmio: cannot signal queue {v}: {e}");
                    }
                }
                None => log::debug!("virtio-mmio: notify of missing queue {v}"),
            },
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(v),
            _ => log::debug!(
                "virtio-mmio: write of read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let s = self.device_status;
        if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
            log::debug!(
                "virtio-mmio: driver features written outside feature negotiation; ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => log::debug!("virtio-mmio: driver features word {sel} does not exist"),
        }
    }

    fn write_queue_config(&mut self, offset: u64, v: u32) {
        let s = self.device_status;
        if s & status::FEATURES_OK == 0 || s & status::DRIVER_OK != 0 {
            log::debug!(
                "virtio-mmio: queue register {offset:#x} written outside queue setup; ignored"
            );
            return;
        }
        let Some(q) = self.queue_cfg.get_mut(self.queue_sel as usize) else {
            log::debug!("virtio-mmio: queue {} does not exist", self.queue_sel);
            return;
        };
        match offset {
            reg::QUEUE_NUM => q.size = v,
            reg::QUEUE_READY => q.ready = v == 1,
            reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
            reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
            reg::QUEUE_DRIVER_LOW => set_low(&mut q.avail, v),
            reg::QUEUE_DRIVER_HIGH => set_high(&mut q.avail, v),
            reg::QUEUE_DEVICE_LOW => set_low(&mut q.used, v),
            reg::QUEUE_DEVICE_HIGH => set_high(&mut q.used, v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if v & old != old {
            log::debug!(
                "virtio-mmio: status {v:#x} clears bits of {old:#x} without a reset; ignored"
            );
            return;
        }
        let new = v & !old;
        let mut next = old | (new & (status::ACKNOWLEDGE | status::FAILED));
        if new & status::DRIVER != 0 && next & status::ACKNOWLEDGE != 0 {
            next |= status::DRIVER;
        }
        if new & status::FEATURES_OK != 0 && next & status::DRIVER != 0 {
            let offered = self.device.device_features();
            if self.acked_features & !offered != 0 {
                guest_warn!(
                    "virtio-mmio: driver accepted features {:#x} that were never offered",
                    self.acked_features & !offered
                );
            } else if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                guest_warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            } else {
                next |= status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && next & status::FEATURES_OK != 0 {
            next |= status::DRIVER_OK;
            if let Err(reason) = self.activate() {
                guest_warn!("virtio-mmio: activation refused: {}", error_chain(&reason));
                self.interrupt.set_needs_reset();
            }
        }
        if next != v {
            log::debug!("virtio-mmio: status {v:#x} taken as {next:#x}");
        }
        self.device_status = next;
    }

    fn activate(&mut self) -> Result<(), ActivationRefused> {
        let max_sizes = self.device.queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (cfg, max)) in self.queue_cfg.iter().zip(max_sizes).enumerate() {
            let q = build_queue(index, cfg, max, self.acked_features, &self.mem)?;
            queues.push(q);
        }
        let ctx = ActivationContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        Ok(self.device.activate(ctx)?)
    }

    fn reset(&mut self) {
        // Whatever the device held is dropped with the context.
        let _ = self.device.reset();
        for q in &mut self.queue_cfg {
            *q = QueueConfig::default();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
        for evt in &self.queue_evts {
            // Drop notifications that came before the reset.
            let _ = evt.read();
        }
    }
}

/// Every status bit the transport knows.
const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// Checks that a saved status could have been reached through the state
/// machine with `acked` features.
fn check_status(st: u32, acked: u64) -> Result<(), RestoreError> {
    let bad = |why: &str| {
        Err(RestoreError::invalid(
            "device status",
            format!("{st:#x}: {why}"),
        ))
    };
    if st & !KNOWN_STATUS != 0 {
        return bad("unknown bits");
    }
    if st & status::DRIVER != 0 && st & status::ACKNOWLEDGE == 0 {
        return bad("DRIVER without ACKNOWLEDGE");
    }
    if st & status::FEATURES_OK != 0
        && (st & status::DRIVER == 0 || acked & VIRTIO_F_VERSION_1 == 0)
    {
        return bad("FEATURES_OK without DRIVER or VIRTIO_F_VERSION_1");
    }
    if st & status::DRIVER_OK != 0 && st & status::FEATURES_OK == 0 {
        return bad("DRIVER_OK without FEATURES_OK");
    }
    Ok(())
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> Persist for MmioTransport<M> {
    type State = MmioTransportState;
    /// The device (restored on its own first, inactive), guest memory and
    /// the interrupt line.
    type Args = (Box<dyn VirtioDevice<M>>, M, EventFdTrigger);
    type Error = RestoreError;

    fn save(&self) -> MmioTransportState {
        self.state()
    }

    /// Checks the state against the device (queue count and maxima, offered
    /// features) and the status state machine; for a device the driver had
    /// started, validates every queue against guest memory as at
    /// `DRIVER_OK`, puts the ring positions back and activates the device.
    fn restore(
        (device, mem, irq): Self::Args,
        st: &MmioTransportState,
    ) -> Result<Self, RestoreError> {
        let mut t = Self::new(device, mem, irq).map_err(|e| RestoreError::Setup(Box::new(e)))?;
        t.restore_state(st)?;
        Ok(t)
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> MmioTransport<M> {
    /// Puts a saved state back into this transport, freshly built around
    /// its (inactive) device: see [`Persist::restore`]. On error the
    /// transport may be half restored: drop it.
    pub fn restore_state(&mut self, st: &MmioTransportState) -> Result<(), RestoreError> {
        let t = self;
        if t.device.is_active() || t.device_status != 0 {
            return Err(RestoreError::invalid(
                "transport",
                "restored into a device the driver already started",
            ));
        }
        let maxima = t.device.queue_max_sizes().to_vec();
        if st.queues.len() != maxima.len() {
            return Err(RestoreError::mismatch(
                "queue count",
                st.queues.len(),
                maxima.len(),
            ));
        }
        for (i, (q, &max)) in st.queues.iter().zip(&maxima).enumerate() {
            if q.max_size != max {
                return Err(RestoreError::mismatch(
                    format!("queue {i} maximum size"),
                    q.max_size,
                    max,
                ));
            }
        }
        let offered = t.device.device_features();
        if st.acked_features & !offered != 0 {
            return Err(RestoreError::mismatch(
                "accepted features",
                format!("{:#x}", st.acked_features),
                format!("{offered:#x} offered"),
            ));
        }
        check_status(st.device_status, st.acked_features)?;
        if st.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(RestoreError::invalid(
                "interrupt status",
                format!("{:#x}: unknown bits", st.interrupt_status),
            ));
        }
        t.device_status = st.device_status & !status::DEVICE_NEEDS_RESET;
        t.acked_features = st.acked_features;
        t.device_features_sel = st.device_features_sel;
        t.driver_features_sel = st.driver_features_sel;
        t.queue_sel = st.queue_sel;
        t.config_generation = st.config_generation;
        for (cfg, q) in t.queue_cfg.iter_mut().zip(&st.queues) {
            *cfg = QueueConfig {
                size: u32::from(q.size),
                ready: q.ready,
                desc: q.desc_table,
                avail: q.avail_ring,
                used: q.used_ring,
            };
        }
        let needs_reset = st.device_status & status::DEVICE_NEEDS_RESET != 0;
        if t.device_status & status::DRIVER_OK != 0 && !needs_reset {
            let mut queues = Vec::with_capacity(maxima.len());
            for (index, ((cfg, q), &max)) in
                t.queue_cfg.iter().zip(&st.queues).zip(&maxima).enumerate()
            {
                let mut queue = build_queue(index, cfg, max, t.acked_features, &t.mem)?;
                queue.set_next_avail(q.next_avail);
                queue.set_next_used(q.next_used);
                queues.push(queue);
            }
            let ctx = ActivationContext {
                mem: t.mem.clone(),
                queues,
                interrupt: t.interrupt.clone(),
                acked_features: t.acked_features,
            };
            t.device.activate(ctx)?;
        }
        t.interrupt
            .status
            .store(st.interrupt_status, Ordering::SeqCst);
        t.interrupt.needs_reset.store(needs_reset, Ordering::SeqCst);
        Ok(())
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> MutDeviceMmio for MmioTransport<M> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: u64, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: u64, data: &[u8]) {
        self.write(offset, data);
    }
}

/// Event tokens at or above this value are the device's own
/// [`VirtioDevice::event_fds`]; below it, queue indices.
const DEVICE_EVENT_BASE: u32 = 1 << 16;

/// Connects a transport to an event-manager loop: queue notifications and the
/// device's own events are handled on the loop's thread.
pub struct MmioEventHandler<M> {
    transport: Arc<Mutex<MmioTransport<M>>>,
}

impl<M> MmioEventHandler<M> {
    /// A handler for `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport<M>>>) -> Self {
        Self { transport }
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> MutEventSubscriber for MmioEventHandler<M> {
    fn init(&mut self, ops: &mut EventOps) {
        let Ok(t) = self.transport.lock() else { return };
        for (i, evt) in t.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio-mmio: cannot watch queue {i}: {e:?}");
            }
        }
        for (k, fd) in t.device.event_fds().into_iter().enumerate() {
            let set = if t.device.event_edge_triggered(k) {
                EventSet::IN | EventSet::EDGE_TRIGGERED
            } else {
                EventSet::IN
            };
            if let Err(e) = ops.add(Events::with_data_raw(fd, DEVICE_EVENT_BASE + k as u32, set)) {
                log::error!("virtio-mmio: cannot watch device event {k}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Ok(mut t) = self.transport.lock() else {
            return;
        };
        let token = events.data();
        if token >= DEVICE_EVENT_BASE {
            t.device.process_event((token - DEVICE_EVENT_BASE) as usize);
            return;
        }
        let i = token as usize;
        let Some(evt) = t.queue_evts.get(i) else {
            return;
        };
        // Drain the counter; several notifications collapse into one pass.
        let _ = evt.read();
        if t.device.is_active() && t.device.process_queue(i) {
            // The device stopped at its budget: come back after other events.
            if let Some(evt) = t.queue_evts.get(i) {
                let _ = evt.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::memory;
    use crate::virtio::rng::Rng;
    use vm_memory::GuestMemoryMmap;

    const QUEUE_BASE: u64 = 0x1_0000;

    fn transport() -> (MmioTransport<GuestMemoryMmap>, EventFdTrigger) {
        let irq = EventFdTrigger::new().unwrap();
        let t =
            MmioTransport::new(Box::new(Rng::new()), memory(), irq.try_clone().unwrap()).unwrap();
        (t, irq)
    }

    fn r(t: &mut MmioTransport<GuestMemoryMmap>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport<GuestMemoryMmap>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport to FEATURES_OK with `features` accepted.
    fn negotiate(t: &mut MmioTransport<GuestMemoryMmap>, features: u64) -> u32 {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        r(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport<GuestMemoryMmap>, size: u32, desc: u64) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, desc as u32);
        w(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (QUEUE_BASE + 0x1000) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (QUEUE_BASE + 0x2000) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn a_configuration_change_moves_the_generation_and_interrupts_a_live_driver() {
        let (mut t, irq) = transport();
        t.config_changed();
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
        assert!(irq.eventfd().read().is_err(), "no driver yet: no interrupt");
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), TYPE_RNG_ID);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 1");
        assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    const TYPE_RNG_ID: u32 = 4;

    #[test]
    fn both_feature_words_are_offered_and_accepted() {
        let (mut t, _) = transport();
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 29, "EVENT_IDX");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_ne!(s & status::FEATURES_OK, 0);
        assert_eq!(
            t.acked_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
    }

    #[test]
    fn features_never_offered_or_without_version_1_are_refused() {
        let (mut t, _) = transport();
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5)) & status::FEATURES_OK,
            0
        );
        let (mut t, _) = transport();
        assert_eq!(
            negotiate(&mut t, VIRTIO_RING_F_EVENT_IDX) & status::FEATURES_OK,
            0
        );
    }

    #[test]
    fn driver_features_outside_negotiation_are_ignored() {
        let (mut t, _) = transport();
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), 0, "before DRIVER");
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1, "after FEATURES_OK");
    }

    #[test]
    fn a_valid_queue_activates_the_device_and_reset_returns_everything() {
        let (mut t, irq) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16, QUEUE_BASE);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, ALL);
        assert_eq!(r(&mut t, reg::STATUS), ALL);
        assert!(t.device().is_active());
        // Queue setup is frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queue_cfg[0].size, 16);
        // Interrupt status and acknowledgement.
        t.interrupt.signal_used_queue();
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // The state shows the negotiated features and the live queue.
        let st = t.state();
        assert_eq!(st.device_status, ALL);
        assert_eq!(st.acked_features, VIRTIO_F_VERSION_1);
        assert_eq!(
            (
                st.queues[0].size,
                st.queues[0].desc_table,
                st.queues[0].ready
            ),
            (16, QUEUE_BASE, true)
        );
        // Reset.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(!t.device().is_active());
        assert_eq!(t.state().queues[0].size, 0);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    fn activation_fails(size: u32, desc: u64) {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, size, desc);
        w(&mut t, reg::STATUS, ALL);
        assert!(
            !t.device().is_active(),
            "size {size} desc {desc:#x} activated"
        );
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        // A reset clears it.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn bad_queue_geometry_sets_needs_reset_instead_of_activating() {
        activation_fails(0, QUEUE_BASE);
        activation_fails(3, QUEUE_BASE);
        activation_fails(512, QUEUE_BASE);
        activation_fails(0x1_0000, QUEUE_BASE);
        activation_fails(16, QUEUE_BASE + 8); // misaligned descriptor table
        activation_fails(16, 0xffff_f000); // outside guest memory (the MMIO gap)
        activation_fails(16, u64::MAX - 0xfff);
    }

    #[test]
    fn a_queue_that_is_not_ready_blocks_activation() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16, QUEUE_BASE);
        w(&mut t, reg::QUEUE_READY, 0);
        w(&mut t, reg::STATUS, ALL);
        assert!(!t.device().is_active());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_setup_before_features_ok_is_ignored() {
        let (mut t, _) = transport();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        setup_queue(&mut t, 16, QUEUE_BASE);
        assert_eq!(t.queue_cfg[0], QueueConfig::default());
    }

    #[test]
    fn status_out_of_order_or_clearing_bits_is_not_taken() {
        let (mut t, _) = transport();
        // All at once: ACKNOWLEDGE and DRIVER are taken, FEATURES_OK is not
        // (VERSION_1 was never accepted), so neither is DRIVER_OK.
        w(&mut t, reg::STATUS, ALL);
        let ack_driver = status::ACKNOWLEDGE | status::DRIVER;
        assert_eq!(r(&mut t, reg::STATUS), ack_driver);
        assert!(!t.device().is_active());
        w(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(
            r(&mut t, reg::STATUS),
            ack_driver,
            "clearing a bit needs a reset"
        );
        w(&mut t, reg::STATUS, ack_driver | status::FAILED);
        assert_eq!(r(&mut t, reg::STATUS), ack_driver | status::FAILED);
        // DRIVER_OK without FEATURES_OK is not taken.
        let (mut t, _) = transport();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE);
    }

    #[test]
    fn notify_signals_the_queue_eventfd_and_ignores_missing_queues() {
        let (mut t, _) = transport();
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 5);
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
    }

    #[test]
    fn odd_accesses_are_ignored_and_config_space_is_forwarded() {
        let (mut t, _) = transport();
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let mut four = [0xffu8; 4];
        t.read(reg::MAGIC + 1, &mut four);
        assert_eq!(four, [0; 4]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        // rng has no config space: reads are zero.
        let mut cfg = [0xffu8; 8];
        t.read(CONFIG_SPACE_OFFSET, &mut cfg);
        assert_eq!(cfg, [0; 8]);
        t.write(0xfff, &[1]);
    }

    #[test]
    fn bad_maximum_queue_sizes_are_refused() {
        struct Odd(crate::virtio::VirtioCommon<GuestMemoryMmap>);
        impl VirtioDevice<GuestMemoryMmap> for Odd {
            fn common(&self) -> &crate::virtio::VirtioCommon<GuestMemoryMmap> {
                &self.0
            }
            fn common_mut(&mut self) -> &mut crate::virtio::VirtioCommon<GuestMemoryMmap> {
                &mut self.0
            }
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn process_queue(&mut self, _: usize) -> bool {
                false
            }
        }
        let irq = EventFdTrigger::new().unwrap();
        assert!(matches!(
            MmioTransport::new(
                Box::new(Odd(crate::virtio::VirtioCommon::new(
                    4,
                    VIRTIO_F_VERSION_1,
                    &[100]
                ))),
                memory(),
                irq
            ),
            Err(TransportError::QueueMaxSize {
                index: 0,
                size: 100
            })
        ));
    }

    /// A started rng transport whose device has answered one request.
    fn started_with_one_request() -> MmioTransport<GuestMemoryMmap> {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        setup_queue(&mut t, 16, QUEUE_BASE);
        w(&mut t, reg::STATUS, ALL);
        let mem = t.mem.clone();
        // One 8-byte writable buffer at 0x2_0000, made available.
        let desc = virtio_queue::desc::split::Descriptor::new(0x2_0000, 8, 2, 0);
        let raw = virtio_queue::desc::RawDescriptor::from(desc);
        vm_memory::Bytes::write_obj(&mem, raw, GuestAddress(QUEUE_BASE)).unwrap();
        vm_memory::Bytes::write_obj(&mem, 0u16, GuestAddress(QUEUE_BASE + 0x1004)).unwrap();
        vm_memory::Bytes::write_obj(&mem, 1u16, GuestAddress(QUEUE_BASE + 0x1002)).unwrap();
        t.device_mut().process_queue(0);
        t
    }

    fn restore_rng(
        state: &MmioTransportState,
    ) -> Result<MmioTransport<GuestMemoryMmap>, RestoreError> {
        let args = (
            Box::new(Rng::new()) as Box<dyn VirtioDevice<GuestMemoryMmap>>,
            memory(),
            EventFdTrigger::new().unwrap(),
        );
        MmioTransport::restore(args, state)
    }

    #[test]
    fn a_started_transport_restores_active_with_its_ring_positions() {
        let t = started_with_one_request();
        let saved = t.save();
        assert_eq!(saved.queues[0].next_avail, 1);
        assert_eq!(saved.queues[0].next_used, 1);
        let json = serde_json::to_string(&saved).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        let restored = restore_rng(&back).unwrap();
        assert!(restored.device().is_active());
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.device_status(), ALL);
    }

    #[test]
    fn an_idle_or_half_negotiated_transport_restores_inactive() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 16, QUEUE_BASE);
        let saved = t.save();
        let restored = restore_rng(&saved).unwrap();
        assert!(!restored.device().is_active());
        assert_eq!(restored.save(), saved);
    }

    #[test]
    fn restored_states_that_do_not_fit_are_refused() {
        let good = started_with_one_request().save();
        let refused = |f: &dyn Fn(&mut MmioTransportState)| {
            let mut s = good.clone();
            f(&mut s);
            match restore_rng(&s) {
                Ok(_) => panic!("accepted {s:?}"),
                Err(e) => e,
            }
        };
        assert!(matches!(
            refused(&|s| s.queues.push(s.queues[0])),
            RestoreError::Mismatch { .. }
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].max_size = 128),
            RestoreError::Mismatch { .. }
        ));
        assert!(matches!(
            refused(&|s| s.acked_features |= 1 << 5),
            RestoreError::Mismatch { .. }
        ));
        assert!(matches!(
            refused(&|s| s.device_status = status::ACKNOWLEDGE | status::DRIVER_OK),
            RestoreError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&|s| s.device_status |= 1 << 4),
            RestoreError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&|s| s.interrupt_status = 4),
            RestoreError::Invalid { .. }
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].desc_table = 1 << 40),
            RestoreError::Queue(QueueSetupError::OutsideMemory { index: 0 })
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].size = 3),
            RestoreError::Queue(QueueSetupError::Size { .. })
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].used_ring = QUEUE_BASE + 0x2001),
            RestoreError::Queue(QueueSetupError::Misaligned {
                ring: Ring::Used,
                ..
            })
        ));
    }

    #[test]
    fn a_device_that_needed_a_reset_still_does_and_is_not_activated() {
        let mut saved = started_with_one_request().save();
        saved.device_status |= status::DEVICE_NEEDS_RESET;
        saved.queues[0].desc_table = 1 << 40;
        let t = restore_rng(&saved).unwrap();
        assert!(!t.device().is_active());
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
    }
}
