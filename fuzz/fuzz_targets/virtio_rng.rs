//! virtio-rng requests: bounded answers, no write outside the driver's
//! buffers, a consistent used ring.
#![no_main]

use std::sync::Arc;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::virtio::rng::{Rng, MAX_RNG_REQUEST};
use vmm_devices::virtio::{ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_kit_fuzz::*;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let event_idx = byte(&mut u) & 1 == 1;
    let s = QueueScenario::decode(&mut u);
    let mem = memory();
    s.write(&mem, 0);
    let allowed = writable_ranges(&mem, 0, s.size());
    let before = snapshot(&mem);
    let mut dev: Rng<GuestMemoryMmap> = Rng::new();
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![s.queue(0, event_idx)],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: VIRTIO_F_VERSION_1,
    };
    dev.activate(ctx).expect("activate");
    dev.process_queue(0);
    if let Some(allowed) = &allowed {
        assert_writes_inside(&before, &mem, allowed);
    }
    assert_used_ring(&mem, &s, 0, allowed.is_some());
    if allowed.is_none() {
        return;
    }
    let (_, _, used) = QueueScenario::rings(0);
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    for i in 0..u64::from(used_idx.min(s.size())) {
        let len: u32 = mem
            .read_obj(GuestAddress(used + 8 + 8 * i))
            .expect("used len");
        assert!(len as usize <= MAX_RNG_REQUEST, "answer of {len} bytes");
    }
});
