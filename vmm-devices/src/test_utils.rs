//! Test doubles for device tests, fuzz targets and benchmarks (the
//! `test-utils` feature): a small guest memory, a driver that lays out a
//! split queue and publishes chains ([`Driver`]), and an interrupt that
//! counts what the device signalled ([`TestInterrupt`]).
//!
//! They panic on misuse (a buffer outside their memory, say): they are
//! for tests.
//!
//! ```
//! use vmm_devices::test_utils::{context, memory, Buf, Driver};
//! use vmm_devices::virtio::rng::Rng;
//! use vmm_devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
//!
//! let mem = memory();
//! let mut driver = Driver::new(&mem, 0x1000, 16);
//! let (ctx, interrupt) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
//! let mut rng = Rng::new();
//! rng.activate(ctx).expect("test memory");
//! driver.add(&[Buf(0x10_0000, 32, true)]);
//! rng.process_queue(0);
//! assert_eq!(driver.used(0), (0, 32));
//! assert_eq!(interrupt.used_count(), 1);
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::{ActivationContext, VirtioInterrupt};

/// Guest memory of the tests: 16 MiB at 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("test memory")
}

/// Counts what the device signalled.
#[derive(Debug, Default)]
pub struct TestInterrupt {
    /// Used-buffer notifications.
    pub used: AtomicUsize,
    /// Configuration-change notifications.
    pub config: AtomicUsize,
    /// Whether the device asked for a reset.
    pub needs_reset: AtomicBool,
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

impl TestInterrupt {
    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
    /// Used-buffer notifications so far.
    pub fn used_count(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf(pub u64, pub u32, pub bool);

/// A driver's view of one queue at `base` (queue structures) with `size`
/// entries: descriptor table, then the available ring, then the used ring.
///
/// It lays the rings out itself: virtio-queue 0.18's `MockSplitQueue` ends
/// its available ring `size` bytes (not entries) after the ring start, so
/// its used ring overlaps the available ring of queues above 4 entries.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    /// A driver of a `size`-entry queue whose structures start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        for addr in [avail, avail + 2, used, used + 2] {
            mem.write_obj(0u16, GuestAddress(addr))
                .expect("test memory");
        }
        Self {
            mem,
            desc,
            avail,
            used,
            next_desc: 0,
            size,
        }
    }

    /// A ready queue over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("test memory");
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("test memory");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("test memory");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("test memory");
        q.set_ready(true);
        q
    }

    /// The available ring's address.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Stores a raw descriptor at `index`.
    pub fn store(&self, index: u16, d: RawDescriptor) {
        self.mem
            .write_obj(
                d,
                GuestAddress(self.desc + 16 * u64::from(index % self.size)),
            )
            .expect("test memory");
    }

    /// Publishes a chain of `bufs` (linked with NEXT) and returns its head.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        // Chains are laid out contiguously; start over at 0 when one would
        // run past the table (earlier chains are consumed by then).
        let head = if usize::from(self.next_desc) + bufs.len() > usize::from(self.size) {
            0
        } else {
            self.next_desc
        };
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let idx = head + i as u16;
            self.store(
                idx,
                RawDescriptor::from(Descriptor::new(b.0, b.1, flags, (idx + 1) % self.size)),
            );
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(head);
        head
    }

    /// Writes raw descriptors at `index` and makes `head` available.
    pub fn add_raw(&mut self, index: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.store(index + i as u16, *d);
        }
        self.push_avail(head);
    }

    /// Makes `head` available without touching descriptors.
    pub fn push_avail(&mut self, head: u16) {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(self.avail + 2))
            .expect("test memory");
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("test memory");
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .expect("test memory");
    }

    /// Sets the available index directly (for hostile tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .expect("test memory");
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("test memory")
    }

    /// Used ring entry `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).expect("test memory"),
            self.mem
                .read_obj(GuestAddress(at + 4))
                .expect("test memory"),
        )
    }
}

/// An activation context over `queues`, with a test interrupt.
pub fn context(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
    features: u64,
) -> (ActivationContext<GuestMemoryMmap>, Arc<TestInterrupt>) {
    let interrupt = Arc::new(TestInterrupt::default());
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues,
        interrupt: interrupt.clone(),
        acked_features: features,
    };
    (ctx, interrupt)
}
