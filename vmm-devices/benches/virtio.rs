//! Micro-benchmarks of the virtio hot paths, no KVM needed: descriptor chain
//! parsing, used-ring publication, and a whole virtio-blk request (GET_ID, so
//! no disk I/O) through the device.
//!
//! `cargo bench -p vmm-devices`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::virtio::block::Block;
use vmm_devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const SIZE: u16 = 256;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self) {}
    fn signal_config_change(&self) {}
    fn set_needs_reset(&self) {}
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
}

/// A three-descriptor blk-style chain at descriptors 0-2: header, data,
/// status.
fn write_chain(mem: &GuestMemoryMmap, request_type: u32) {
    let descs: [(u64, u32, u16, u16); 3] = [
        (0x8_0000, 16, 1, 1),
        (0x9_0000, 512, 3, 2),
        (0xa_0000, 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
        let at = DESC + 16 * i as u64;
        mem.write_obj(*addr, GuestAddress(at)).expect("desc");
        mem.write_obj(*len, GuestAddress(at + 8)).expect("desc");
        mem.write_obj(*flags, GuestAddress(at + 12)).expect("desc");
        mem.write_obj(*next, GuestAddress(at + 14)).expect("desc");
    }
    mem.write_obj(request_type, GuestAddress(0x8_0000))
        .expect("header");
}

/// Makes head 0 available once more.
fn publish(mem: &GuestMemoryMmap) {
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).expect("avail idx");
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
        .expect("ring");
    mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .expect("avail idx");
}

fn queue() -> Queue {
    let mut q = Queue::new(SIZE).expect("queue");
    q.try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc table");
    q.try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail ring");
    q.try_set_used_ring_address(GuestAddress(USED))
        .expect("used ring");
    q.set_ready(true);
    q
}

fn chain_parsing(c: &mut Criterion) {
    let mem = memory();
    write_chain(&mem, 0);
    let mut q = queue();
    c.bench_function(
        "pop a 3-descriptor chain and walk its readable and writable buffers",
        |b| {
            b.iter(|| {
                publish(&mem);
                let chain = q.iter(&mem).expect("iter").next().expect("chain");
                let reader = chain.clone().reader(&mem).expect("reader");
                let writer = chain.writer(&mem).expect("writer");
                black_box((reader.available_bytes(), writer.available_bytes()))
            })
        },
    );
}

fn used_ring(c: &mut Criterion) {
    let mem = memory();
    let mut q = queue();
    c.bench_function("publish a used entry and decide on the notification", |b| {
        b.iter(|| {
            q.add_used(&mem, black_box(0), black_box(513))
                .expect("add_used");
            black_box(q.needs_notification(&mem).expect("needs_notification"))
        })
    });
}

fn blk_request(c: &mut Criterion) {
    let mem = memory();
    write_chain(&mem, virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID);
    let path = std::env::temp_dir().join(format!("vmm-devices-bench-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("image");
    let _ = std::fs::remove_file(&path);
    file.set_len(1 << 20).expect("size");
    let mut dev: Block<GuestMemoryMmap> =
        Block::from_file(file, false, Some("bench")).expect("disk");
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![queue()],
        interrupt: Arc::new(NoInterrupt),
        acked_features: VIRTIO_F_VERSION_1,
    };
    dev.activate(ctx).expect("activate");
    c.bench_function(
        "virtio-blk GET_ID request through the device (parse, answer, publish)",
        |b| {
            b.iter(|| {
                publish(&mem);
                black_box(dev.process_queue(0))
            })
        },
    );
}

criterion_group!(benches, chain_parsing, used_ring, blk_request);
criterion_main!(benches);
