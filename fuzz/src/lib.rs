//! Shared harness of the fuzz targets: a small guest memory, a split queue
//! laid out by the fuzzer (mostly valid, sometimes not), an interrupt double,
//! and the invariants every device must keep.
//!
//! Inputs are read with `arbitrary::Unstructured`, one byte at a time or as
//! byte strings, in a layout that [`QueueScenario::encode`] can write back,
//! so the seed corpus is generated from code (`make_corpus`).

use arbitrary::Unstructured;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size of every target.
pub const MEM_SIZE: usize = 0x2_0000;
/// Descriptor table, available and used rings of queue `i` start at
/// `QUEUE_AREA + i * 0x3000`.
pub const QUEUE_AREA: u64 = 0;
/// Buffers the descriptors point at live from here to the end of memory:
/// past the rings of four queues (the last ring of queue 3 ends below
/// `0xC000`), so that a buffer overlaps a ring only where a descriptor
/// points there on purpose (and the strict checks stand down).
pub const BUF_BASE: u64 = 0xC000;
const BUF_SPAN: u64 = MEM_SIZE as u64 - BUF_BASE;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The interrupt double of every target (vmm-devices' `test-utils`).
pub use vmm_devices::test_utils::TestInterrupt;

/// Reads one byte (0 when the input is exhausted).
pub fn byte(u: &mut Unstructured) -> u8 {
    u.arbitrary::<u8>().unwrap_or(0)
}

/// Reads a little-endian u16.
pub fn word(u: &mut Unstructured) -> u16 {
    u16::from_le_bytes([byte(u), byte(u)])
}

/// Reads a little-endian u32.
pub fn dword(u: &mut Unstructured) -> u32 {
    u32::from_le_bytes([byte(u), byte(u), byte(u), byte(u)])
}

/// One descriptor as the fuzzer describes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    /// 0: inside the buffer area at `offset`; 1: a raw address; 2: past the
    /// end of memory.
    pub place: u8,
    /// Offset or address bits.
    pub offset: u32,
    /// Length.
    pub len: u32,
    /// VRING_DESC_F_* bits.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// A queue and its rings as laid out in memory.
#[derive(Clone, Debug, Default)]
pub struct QueueScenario {
    /// log2 of the queue size (0-8).
    pub size_log2: u8,
    /// The descriptor table.
    pub descs: Vec<Desc>,
    /// Available ring heads.
    pub heads: Vec<u16>,
    /// Added to the number of heads to make the available index (to race
    /// ahead).
    pub avail_extra: u16,
    /// `used_event` for EVENT_IDX.
    pub used_event: u16,
    /// Bytes written into the buffer area: (offset, bytes).
    pub payload: Vec<(u16, Vec<u8>)>,
}

impl QueueScenario {
    /// Queue size.
    pub fn size(&self) -> u16 {
        1 << self.size_log2.min(8)
    }

    /// Decodes a scenario.
    pub fn decode(u: &mut Unstructured) -> Self {
        let size_log2 = byte(u) % 9;
        let size = 1u16 << size_log2;
        let ndesc = usize::from(byte(u)).min(usize::from(size));
        let descs = (0..ndesc)
            .map(|_| Desc {
                place: byte(u) % 3,
                offset: dword(u),
                len: dword(u),
                flags: u16::from(byte(u)) & (F_NEXT | F_WRITE | F_INDIRECT),
                next: word(u),
            })
            .collect();
        let nheads = usize::from(byte(u)).min(usize::from(size));
        let heads = (0..nheads).map(|_| word(u)).collect();
        let avail_extra = word(u);
        let used_event = word(u);
        let nchunks = usize::from(byte(u) % 8);
        let payload = (0..nchunks)
            .map(|_| {
                let off = word(u);
                let len = usize::from(byte(u));
                (off, u.bytes(len).map(<[u8]>::to_vec).unwrap_or_default())
            })
            .collect();
        Self {
            size_log2,
            descs,
            heads,
            avail_extra,
            used_event,
            payload,
        }
    }

    /// Encodes a scenario the way [`QueueScenario::decode`] reads it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.size_log2);
        out.push(self.descs.len() as u8);
        for d in &self.descs {
            out.push(d.place);
            out.extend_from_slice(&d.offset.to_le_bytes());
            out.extend_from_slice(&d.len.to_le_bytes());
            out.push(d.flags as u8);
            out.extend_from_slice(&d.next.to_le_bytes());
        }
        out.push(self.heads.len() as u8);
        for h in &self.heads {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&self.avail_extra.to_le_bytes());
        out.extend_from_slice(&self.used_event.to_le_bytes());
        out.push(self.payload.len() as u8);
        for (off, bytes) in &self.payload {
            out.extend_from_slice(&off.to_le_bytes());
            out.push(bytes.len() as u8);
            out.extend_from_slice(bytes);
        }
    }

    /// Base of queue `index`'s structures.
    pub fn base(index: usize) -> u64 {
        QUEUE_AREA + 0x3000 * index as u64
    }

    /// (descriptor table, available ring, used ring) of queue `index`.
    pub fn rings(index: usize) -> (u64, u64, u64) {
        let b = Self::base(index);
        (b, b + 0x1000, b + 0x2000)
    }

    fn addr(d: &Desc) -> u64 {
        match d.place {
            0 => BUF_BASE + u64::from(d.offset) % BUF_SPAN,
            1 => u64::from(d.offset) | (u64::from(d.len >> 16) << 32),
            _ => MEM_SIZE as u64 + u64::from(d.offset % 0x1000),
        }
    }

    /// Writes the scenario into `mem` as queue `index`.
    pub fn write(&self, mem: &GuestMemoryMmap, index: usize) {
        let (desc, avail, used) = Self::rings(index);
        for (off, bytes) in &self.payload {
            let at = BUF_BASE + u64::from(*off) % BUF_SPAN;
            let n = bytes.len().min((MEM_SIZE as u64 - at) as usize);
            let _ = mem.write_slice(&bytes[..n], GuestAddress(at));
        }
        for (i, d) in self.descs.iter().enumerate() {
            let a = desc + 16 * i as u64;
            let _ = mem.write_obj(Self::addr(d), GuestAddress(a));
            let _ = mem.write_obj(d.len, GuestAddress(a + 8));
            let _ = mem.write_obj(d.flags, GuestAddress(a + 12));
            let _ = mem.write_obj(d.next, GuestAddress(a + 14));
        }
        let size = self.size();
        for (i, h) in self.heads.iter().enumerate() {
            let _ = mem.write_obj(
                *h,
                GuestAddress(avail + 4 + 2 * (i as u64 % u64::from(size))),
            );
        }
        let idx = (self.heads.len() as u16).wrapping_add(self.avail_extra);
        let _ = mem.write_obj(idx, GuestAddress(avail + 2));
        let _ = mem.write_obj(
            self.used_event,
            GuestAddress(avail + 4 + 2 * u64::from(size)),
        );
        let _ = mem.write_obj(0u16, GuestAddress(used + 2));
    }

    /// A ready queue over the scenario's rings.
    pub fn queue(&self, index: usize, event_idx: bool) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let (desc, avail, used) = Self::rings(index);
        let mut q = virtio_queue::Queue::new(256).expect("max size 256 is valid");
        q.set_size(self.size());
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }
}

thread_local! {
    static MEMORY: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
}

/// Zeroed guest memory (the same mapping each run, cleared: mapping it
/// anew every run would dominate the run time).
pub fn memory() -> GuestMemoryMmap {
    MEMORY.with(|m| {
        // SAFETY: the region is one live mapping of MEM_SIZE bytes at guest
        // address 0, owned by this thread's memory object; nothing else
        // accesses it during the clear.
        unsafe { std::ptr::write_bytes(host_base(m), 0, MEM_SIZE) };
        m.clone()
    })
}

fn host_base(mem: &GuestMemoryMmap) -> *mut u8 {
    use vm_memory::GuestMemoryBackend;
    mem.get_host_address(GuestAddress(0)).expect("host address")
}

/// A copy of all guest memory.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    // SAFETY: one live mapping of MEM_SIZE bytes at guest address 0; the
    // devices under test run on this thread and are not running now.
    unsafe { std::slice::from_raw_parts(host_base(mem), MEM_SIZE) }.to_vec()
}

/// The ranges a device may write for queue `index`: every device-writable
/// buffer the descriptor table (or an indirect table it names) describes,
/// and the used ring. `None` when a writable buffer overlaps a descriptor
/// table or any queue's rings: the driver then lets the device rewrite its
/// own descriptors or ring and no fixed set of ranges (nor ring indices) can
/// be derived beforehand.
pub fn writable_ranges(mem: &GuestMemoryMmap, index: usize, size: u16) -> Option<Vec<(u64, u64)>> {
    let (desc, _, used) = QueueScenario::rings(index);
    let mut out = vec![(used, used + 6 + 8 * u64::from(size))];
    let mut tables = vec![(desc, u64::from(size))];
    // Driver structures a buffer must not overlap for the check to hold:
    // the whole queue area (every queue's table and rings) and any indirect
    // table.
    let mut all_tables = vec![(QUEUE_AREA, BUF_BASE)];
    while let Some((table, n)) = tables.pop() {
        all_tables.push((table, table.saturating_add(16 * n)));
        if all_tables.len() > 16 {
            return None;
        }
        // Read the table at once (the part inside memory); entries outside
        // memory cannot be followed.
        let in_mem = (MEM_SIZE as u64).saturating_sub(table).min(16 * n) as usize / 16 * 16;
        let mut raw = vec![0u8; in_mem];
        if table >= MEM_SIZE as u64 || mem.read_slice(&mut raw, GuestAddress(table)).is_err() {
            continue;
        }
        for e in raw.chunks_exact(16) {
            let addr = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes(e[12..14].try_into().expect("2 bytes"));
            if flags & F_INDIRECT != 0 {
                tables.push((addr, u64::from(len / 16).min(4096)));
            } else if flags & F_WRITE != 0 {
                out.push((addr, addr.saturating_add(u64::from(len))));
            }
        }
    }
    let overlaps =
        |&(lo, hi): &(u64, u64)| all_tables.iter().any(|&(tlo, thi)| lo < thi && tlo < hi);
    if out.iter().skip(1).any(overlaps) {
        return None;
    }
    Some(out)
}

/// Panics if a byte outside `allowed` differs between `before` and `mem`.
pub fn assert_writes_inside(before: &[u8], mem: &GuestMemoryMmap, allowed: &[(u64, u64)]) {
    let after = snapshot(mem);
    // Compare by chunks first: slice equality is one memcmp, while a byte
    // loop would be traced comparison by comparison.
    const CHUNK: usize = 256;
    for (c, (a, b)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
        if a == b {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                let at = (c * CHUNK + i) as u64;
                assert!(
                    allowed.iter().any(|&(lo, hi)| at >= lo && at < hi),
                    "write at {at:#x} outside the buffers the driver gave"
                );
            }
        }
    }
}

/// Panics unless the used ring of queue `index` is consistent, when `strict`
/// (the driver did not let the device write over its own rings): the used
/// index moved by at most the number of chains made available, and not at
/// all if the available index raced past the queue size, and every entry
/// names a head inside the queue.
pub fn assert_used_ring(mem: &GuestMemoryMmap, s: &QueueScenario, index: usize, strict: bool) {
    let (_, _, used) = QueueScenario::rings(index);
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    let avail_idx = (s.heads.len() as u16).wrapping_add(s.avail_extra);
    let size = s.size();
    if !strict {
        return;
    }
    if avail_idx > size {
        assert_eq!(
            used_idx, 0,
            "a racing avail index must not be served (queue {index})"
        );
    }
    assert!(
        used_idx <= avail_idx,
        "used {used_idx} > available {avail_idx}"
    );
    for i in 0..u64::from(used_idx.min(size)) {
        let id: u32 = mem
            .read_obj(GuestAddress(used + 4 + 8 * i))
            .expect("used id");
        assert!(
            id < u32::from(size),
            "used entry names head {id} outside the queue"
        );
    }
}
