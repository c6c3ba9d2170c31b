//! virtio-blk requests against a small image: no panic, no write outside the
//! driver's buffers, a consistent used ring, and a read-only image that
//! never changes.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_devices::virtio::block::Block;
use vmm_devices::virtio::{
    ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vmm_kit_fuzz::*;

const IMAGE_SIZE: u64 = 64 * 1024;

thread_local! {
    static IMAGE: File = {
        let path = std::env::temp_dir().join(format!("vmm-fuzz-blk-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("image");
        let _ = std::fs::remove_file(&path);
        f.set_len(IMAGE_SIZE).expect("size image");
        f
    };
}

/// The image, refilled with `content` (one file per process, reused).
fn image(content: u8) -> File {
    IMAGE.with(|f| {
        f.write_all_at(&vec![content; IMAGE_SIZE as usize], 0)
            .expect("fill image");
        f.try_clone().expect("clone image")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let cfg = byte(&mut u);
    let (event_idx, read_only) = (cfg & 1 == 1, cfg & 2 == 2);
    let s = QueueScenario::decode(&mut u);
    let mem = memory();
    s.write(&mem, 0);
    let allowed = writable_ranges(&mem, 0, s.size());
    let before = snapshot(&mem);

    let file = image(0xab);
    let mut dev: Block<GuestMemoryMmap> =
        Block::from_file(file.try_clone().expect("clone"), read_only, Some("fuzz")).expect("disk");
    let features = VIRTIO_F_VERSION_1
        | if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
    let intr = Arc::new(TestInterrupt::default());
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![s.queue(0, event_idx)],
        interrupt: intr,
        acked_features: features,
    };
    dev.activate(ctx).expect("activate");
    let mut rounds = 0;
    while dev.process_queue(0) && rounds < 4 {
        rounds += 1;
    }

    if let Some(allowed) = &allowed {
        assert_writes_inside(&before, &mem, allowed);
    }
    assert_used_ring(&mem, &s, 0, allowed.is_some());
    if read_only {
        let mut content = vec![0u8; IMAGE_SIZE as usize];
        file.read_exact_at(&mut content, 0).expect("read image");
        assert!(
            content.iter().all(|&b| b == 0xab),
            "a read-only image changed"
        );
    }
});
