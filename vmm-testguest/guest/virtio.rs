//! A small virtio-mmio (version 2) driver with split virtqueues, polled or
//! interrupt driven, for the scenarios.

use core::sync::atomic::{fence, Ordering};

use crate::apic;
use crate::boot::irq_count;
use crate::cmdline::parse_u64;

/// Most devices the guest looks at.
pub const MAX_DEVICES: usize = 8;
/// Most entries in a queue the guest sets up: each queue gets the smaller of
/// this and the device's maximum (rounded down to a power of two).
pub const MAX_QUEUE_SIZE: u16 = 128;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const MAGIC: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
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
pub const QUEUE_DESC: u64 = 0x080;
pub const QUEUE_DRIVER: u64 = 0x090;
pub const QUEUE_DEVICE: u64 = 0x0a0;
/// Start of the device configuration space.
pub const CONFIG: u64 = 0x100;

pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
/// The device asks for a reset.
pub const S_NEEDS_RESET: u32 = 64;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Where DMA buffers and rings live: 2 MiB of guest RAM at 4 MiB, above
/// the image, handed out by a bump allocator.
const DMA_BASE: u64 = 0x40_0000;
const DMA_SIZE: u64 = 0x20_0000;
static mut DMA_NEXT: u64 = DMA_BASE;

/// Allocates `len` bytes of zeroed DMA memory aligned to `align`.
pub fn dma_alloc(len: u64, align: u64) -> Option<u64> {
    // SAFETY: the guest has one CPU and the scenarios run one at a time.
    unsafe {
        let start = DMA_NEXT.next_multiple_of(align);
        let end = start.checked_add(len)?;
        if end > DMA_BASE + DMA_SIZE {
            return None;
        }
        DMA_NEXT = end;
        core::ptr::write_bytes(start as *mut u8, 0, len as usize);
        Some(start)
    }
}

/// Whether guest RAM reaches past the DMA arena.
pub fn dma_fits(ram_top: u64) -> bool {
    ram_top >= DMA_BASE + DMA_SIZE
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: a device register or RAM in the identity-mapped first 4 GiB.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
fn rd16(addr: u64) -> u16 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
fn wr16(addr: u64, v: u16) {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn wr64(addr: u64, v: u64) {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// A `virtio_mmio.device=<size>@<addr>:<irq>` entry.
#[derive(Clone, Copy)]
pub struct MmioEntry {
    /// Register window base.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, mult) = match s.last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1024),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    parse_u64(num)?.checked_mul(mult)
}

/// The virtio-mmio devices named on the command line, in order.
pub fn find_devices(cmdline: &'static [u8]) -> ([Option<MmioEntry>; MAX_DEVICES], usize) {
    let mut out = [None; MAX_DEVICES];
    let mut n = 0;
    for word in cmdline.split(|&b| b == b' ') {
        let Some(v) = word.strip_prefix(b"virtio_mmio.device=") else { continue };
        let Some(at) = v.iter().position(|&b| b == b'@') else { continue };
        let Some(colon) = v.iter().position(|&b| b == b':') else { continue };
        if colon < at || n == MAX_DEVICES {
            continue;
        }
        let (Some(size), Some(base), Some(irq)) =
            (parse_size(&v[..at]), parse_u64(&v[at + 1..colon]), parse_u64(&v[colon + 1..]))
        else {
            continue;
        };
        if size < 0x200 || base >= 1 << 32 || irq > 23 {
            continue;
        }
        out[n] = Some(MmioEntry { base, irq: irq as u32 });
        n += 1;
    }
    (out, n)
}

/// The device type at `entry`, or 0 if there is no virtio-mmio v2 device.
pub fn device_type(entry: &MmioEntry) -> u32 {
    if rd32(entry.base + MAGIC) != 0x7472_6976 || rd32(entry.base + VERSION) != 2 {
        return 0;
    }
    rd32(entry.base + DEVICE_ID)
}

/// The size the guest gives a queue whose device maximum is `max` (not 0):
/// the largest power of two within both maxima.
pub fn queue_size(max: u32) -> u16 {
    let cap = max.min(u32::from(MAX_QUEUE_SIZE));
    1 << (31 - cap.leading_zeros())
}

/// How the driver waits for completions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Spin on the used ring.
    Poll,
    /// Wait for the device's interrupt through the IOAPIC and LAPIC.
    Irq,
}

impl Mode {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Irq => "irq",
        }
    }
}

/// A split virtqueue.
pub struct Queue {
    index: u32,
    /// Entries.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_avail: u16,
    last_used: u16,
}

/// A device being driven.
pub struct Device {
    base: u64,
    irq: u32,
    mode: Mode,
    /// Features accepted.
    pub features: u64,
}

/// What went wrong, for the report.
pub type DriverError = &'static str;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3 (CR4.TSD is
    // clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Cycles to wait for a device before giving up (several seconds).
const TIMEOUT_CYCLES: u64 = 1 << 34;

impl Device {
    /// Resets and initializes the device up to FEATURES_OK, accepting `want`
    /// (less what the device lacks; VERSION_1 is required).
    pub fn init(entry: &MmioEntry, want: u64, mode: Mode) -> Result<Device, DriverError> {
        let base = entry.base;
        wr32(base + STATUS, 0);
        wr32(base + STATUS, S_ACKNOWLEDGE);
        wr32(base + STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr32(base + DEVICE_FEATURES_SEL, 0);
        let mut offered = u64::from(rd32(base + DEVICE_FEATURES));
        wr32(base + DEVICE_FEATURES_SEL, 1);
        offered |= u64::from(rd32(base + DEVICE_FEATURES)) << 32;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let features = want & offered;
        wr32(base + DRIVER_FEATURES_SEL, 0);
        wr32(base + DRIVER_FEATURES, features as u32);
        wr32(base + DRIVER_FEATURES_SEL, 1);
        wr32(base + DRIVER_FEATURES, (features >> 32) as u32);
        wr32(base + STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if rd32(base + STATUS) & S_FEATURES_OK == 0 {
            return Err("device refused the features");
        }
        if mode == Mode::Irq {
            apic::enable_lapic();
            if !apic::route(entry.irq, apic::IRQ_VECTOR_BASE + entry.irq as u8) {
                return Err("no such IOAPIC pin");
            }
        }
        Ok(Device { base, irq: entry.irq, mode, features })
    }

    /// Sets up queue `index`.
    pub fn queue(&mut self, index: u32) -> Result<Queue, DriverError> {
        let b = self.base;
        wr32(b + QUEUE_SEL, index);
        if rd32(b + QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let max = rd32(b + QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        let size = queue_size(max);
        let n = u64::from(size);
        let desc = dma_alloc(16 * n, 16).ok_or("out of DMA memory")?;
        let avail = dma_alloc(6 + 2 * n, 2).ok_or("out of DMA memory")?;
        let used = dma_alloc(6 + 8 * n, 4).ok_or("out of DMA memory")?;
        wr32(b + QUEUE_NUM, u32::from(size));
        for (reg, addr) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, avail), (QUEUE_DEVICE, used)] {
            wr32(b + reg, addr as u32);
            wr32(b + reg + 4, (addr >> 32) as u32);
        }
        wr32(b + QUEUE_READY, 1);
        Ok(Queue { index, size, desc, avail, used, next_avail: 0, last_used: 0 })
    }

    /// Sets DRIVER_OK and checks the device took it.
    pub fn start(&self) -> Result<(), DriverError> {
        wr32(self.base + STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        if rd32(self.base + STATUS) & S_NEEDS_RESET != 0 {
            return Err("device needs a reset after DRIVER_OK");
        }
        Ok(())
    }

    /// Reads a 32-bit configuration field.
    pub fn config32(&self, off: u64) -> u32 {
        rd32(self.base + CONFIG + off)
    }

    /// Reads a 64-bit configuration field (as two 32-bit reads).
    pub fn config64(&self, off: u64) -> u64 {
        u64::from(self.config32(off)) | (u64::from(self.config32(off + 4)) << 32)
    }

    /// Resets the device and masks its interrupt.
    pub fn reset(&self) {
        wr32(self.base + STATUS, 0);
        if self.mode == Mode::Irq {
            apic::mask(self.irq);
        }
    }

    /// Writes descriptor `slot` of `q`.
    pub fn write_desc(q: &Queue, slot: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = q.desc + 16 * u64::from(slot % q.size);
        wr64(d, addr);
        wr32(d + 8, len);
        wr16(d + 12, flags);
        wr16(d + 14, next);
    }

    /// Writes `bufs` (address, length, device-writable) as a chain at the
    /// next free descriptors and returns its head.
    pub fn write_chain(q: &mut Queue, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = q.size;
        let head = q.next_avail % n;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let slot = (head + i as u16) % n;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            Self::write_desc(q, slot, addr, len, flags, (slot + 1) % n);
        }
        q.next_avail = q.next_avail.wrapping_add(bufs.len() as u16);
        head
    }

    /// Puts `head` in the available ring and moves the available index by
    /// `advance` (1 for an honest driver), then notifies the device if it
    /// wants to be.
    pub fn publish(&mut self, q: &mut Queue, head: u16, advance: u16) {
        let event_idx = self.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let old_idx = rd16(q.avail + 2);
        let new_idx = old_idx.wrapping_add(advance);
        wr16(q.avail + 4 + 2 * u64::from(old_idx % q.size), head);
        if event_idx {
            // used_event: interrupt me when the device uses this entry.
            wr16(q.avail + 4 + 2 * u64::from(q.size), q.last_used);
        }
        fence(Ordering::SeqCst);
        wr16(q.avail + 2, new_idx);
        fence(Ordering::SeqCst);
        let notify = if event_idx {
            // vring_need_event(avail_event, new, old)
            let avail_event = rd16(q.used + 4 + 8 * u64::from(q.size));
            new_idx.wrapping_sub(avail_event).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
        } else {
            true
        };
        if notify {
            self.notify(q.index);
        }
    }

    /// Writes QueueNotify.
    pub fn notify(&self, queue: u32) {
        wr32(self.base + QUEUE_NOTIFY, queue);
    }

    /// The interrupt vector of this device.
    fn vector(&self) -> u8 {
        apic::IRQ_VECTOR_BASE + self.irq as u8
    }

    /// Interrupts taken so far on this device's vector (for
    /// [`wait_used`](Device::wait_used) after a [`publish`](Device::publish)).
    pub fn irqs(&self) -> u32 {
        irq_count(self.vector())
    }

    /// Waits for the next used entry of `q` (by polling or by interrupt,
    /// counting from `irqs_before`) and returns (head, length).
    pub fn wait_used(&mut self, q: &mut Queue, irqs_before: u32) -> Result<(u32, u32), DriverError> {
        let start = rdtsc();
        match self.mode {
            Mode::Poll => {
                while rd16(q.used + 2) == q.last_used {
                    if rdtsc().wrapping_sub(start) > TIMEOUT_CYCLES {
                        return Err("timeout waiting for the used ring");
                    }
                    core::hint::spin_loop();
                }
            }
            Mode::Irq => {
                while irq_count(self.vector()) == irqs_before {
                    if rdtsc().wrapping_sub(start) > TIMEOUT_CYCLES {
                        return Err("timeout waiting for the interrupt");
                    }
                    core::hint::spin_loop();
                }
                let isr = rd32(self.base + INTERRUPT_STATUS);
                wr32(self.base + INTERRUPT_ACK, isr);
                if isr & 1 == 0 {
                    return Err("interrupt without a used-buffer notification");
                }
                if rd16(q.used + 2) == q.last_used {
                    return Err("interrupt but the used ring did not move");
                }
            }
        }
        fence(Ordering::SeqCst);
        let slot = q.last_used % q.size;
        let id = rd32(q.used + 4 + 8 * u64::from(slot));
        let len = rd32(q.used + 4 + 8 * u64::from(slot) + 4);
        q.last_used = q.last_used.wrapping_add(1);
        Ok((id, len))
    }

    /// The next used entry of `q` (head, length) if the device has
    /// published one, without waiting.
    pub fn try_used(q: &mut Queue) -> Option<(u32, u32)> {
        if rd16(q.used + 2) == q.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = q.last_used % q.size;
        let id = rd32(q.used + 4 + 8 * u64::from(slot));
        let len = rd32(q.used + 4 + 8 * u64::from(slot) + 4);
        q.last_used = q.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Reads a 16-bit configuration field.
    pub fn config16(&self, off: u64) -> u16 {
        rd16(self.base + CONFIG + off)
    }

    /// Reads a configuration byte.
    pub fn config8(&self, off: u64) -> u8 {
        // SAFETY: a device register in the identity-mapped first 4 GiB.
        unsafe { core::ptr::read_volatile((self.base + CONFIG + off) as *const u8) }
    }

    /// Makes a chain of `bufs` (address, length, device-writable) available,
    /// notifies the device, waits for its used entry and returns the used
    /// length.
    pub fn transact(&mut self, q: &mut Queue, bufs: &[(u64, u32, bool)]) -> Result<u32, DriverError> {
        if bufs.is_empty() || bufs.len() > usize::from(q.size) {
            return Err("bad chain");
        }
        let head = Self::write_chain(q, bufs);
        let irqs_before = irq_count(self.vector());
        self.publish(q, head, 1);
        let (id, len) = self.wait_used(q, irqs_before)?;
        if id != u32::from(head) {
            return Err("used entry for another chain");
        }
        Ok(len)
    }

    /// Makes `chains` available at once (one index update, one notification)
    /// and waits, polling, until the device has used them all.
    pub fn transact_batch(&mut self, q: &mut Queue, chains: &[&[(u64, u32, bool)]]) -> Result<(), DriverError> {
        let n = chains.len() as u16;
        let descs: usize = chains.iter().map(|c| c.len()).sum();
        if n == 0 || descs > usize::from(q.size) {
            return Err("bad batch");
        }
        let old_idx = rd16(q.avail + 2);
        for (i, bufs) in chains.iter().enumerate() {
            let head = Self::write_chain(q, bufs);
            wr16(q.avail + 4 + 2 * u64::from(old_idx.wrapping_add(i as u16) % q.size), head);
        }
        let target = q.last_used.wrapping_add(n);
        if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            wr16(q.avail + 4 + 2 * u64::from(q.size), target.wrapping_sub(1));
        }
        fence(Ordering::SeqCst);
        wr16(q.avail + 2, old_idx.wrapping_add(n));
        fence(Ordering::SeqCst);
        self.notify(q.index);
        let start = rdtsc();
        while rd16(q.used + 2) != target {
            if rdtsc().wrapping_sub(start) > TIMEOUT_CYCLES {
                return Err("timeout waiting for a batch");
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        q.last_used = target;
        Ok(())
    }

    /// Reads a transport register.
    pub fn reg(&self, off: u64) -> u32 {
        rd32(self.base + off)
    }

    /// Writes a transport register.
    pub fn set_reg(&self, off: u64, v: u32) {
        wr32(self.base + off, v)
    }

    /// Waits until the device sets DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&self) -> bool {
        let start = rdtsc();
        while rd32(self.base + STATUS) & S_NEEDS_RESET == 0 {
            if rdtsc().wrapping_sub(start) > TIMEOUT_CYCLES {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }
}
