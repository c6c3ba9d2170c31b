//! Micro-benchmarks of the virtio hot paths, no KVM needed: descriptor chain
//! parsing, used-ring publication, and a whole virtio-blk request (GET_ID, so
//! no disk I/O) through the device.
//!
//! `cargo bench -p vmm-devices`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::test_utils::{context, memory, Buf, Driver};
use vmm_devices::virtio::block::Block;
use vmm_devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE: u64 = 0x1000;
const SIZE: u16 = 256;
const HEADER: u64 = 0x8_0000;

/// A driver with one three-descriptor blk-style chain at descriptors 0-2
/// (header, data, status) of request type `request_type`, published once.
fn driver_with_chain(mem: &GuestMemoryMmap, request_type: u32) -> Driver<'_> {
    let mut driver = Driver::new(mem, QUEUE, SIZE);
    mem.write_obj(request_type, GuestAddress(HEADER))
        .expect("header");
    driver.add(&[
        Buf(HEADER, 16, false),
        Buf(0x9_0000, 512, true),
        Buf(0xa_0000, 1, true),
    ]);
    driver
}

fn chain_parsing(c: &mut Criterion) {
    let mem = memory();
    let mut driver = driver_with_chain(&mem, 0);
    let mut q = driver.queue();
    c.bench_function(
        "pop a 3-descriptor chain and walk its readable and writable buffers",
        |b| {
            b.iter(|| {
                driver.push_avail(0);
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
    let mut q = Driver::new(&mem, QUEUE, SIZE).queue();
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
    let mut driver = driver_with_chain(&mem, virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID);
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
    let (ctx, _interrupt) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
    dev.activate(ctx).expect("activate");
    c.bench_function(
        "virtio-blk GET_ID request through the device (parse, answer, publish)",
        |b| {
            b.iter(|| {
                driver.push_avail(0);
                black_box(dev.process_queue(0))
            })
        },
    );
}

criterion_group!(benches, chain_parsing, used_ring, blk_request);
criterion_main!(benches);
