//! Driver-side helpers for device tests: guest memory, a queue built with
//! virtio-queue's mock, chains, the used ring, and an interrupt double.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{ActivationContext, VirtioInterrupt};

/// Guest memory of the tests: 16 MiB at 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// Counts what the device signalled.
#[derive(Default)]
pub struct TestInterrupt {
    pub used: AtomicUsize,
    pub config: AtomicUsize,
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
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
    pub fn used_count(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf(pub u64, pub u32, pub bool);

/// A driver's view of one queue at `base` (queue structures) with `size`
/// entries.
pub struct Driver<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            next_desc: 0,
            size,
        }
    }

    pub fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
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
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut flags = if b.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(
                    b.0,
                    b.1,
                    flags,
                    (head + i as u16 + 1) % self.size,
                ))
            })
            .collect();
        self.mock.add_desc_chains(&descs, head).unwrap();
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Writes raw descriptors at `index` and makes `head` available.
    pub fn add_raw(&mut self, index: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.mock.desc_table().store(index + i as u16, *d).unwrap();
        }
        self.push_avail(head);
    }

    /// Makes `head` available without touching descriptors.
    pub fn push_avail(&mut self, head: u16) {
        let avail = self.mock.avail_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Sets the available index directly (for hostile tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.mock.avail_addr().0 + 2))
            .unwrap();
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.mock.used_addr().0 + 2))
            .unwrap()
    }

    /// Used ring entry `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.mock.used_addr().0 + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
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
