//! virtio-console: host input and fuzzer-made receive and transmit queues.
//! Output per chain stays bounded and nothing is written outside the
//! driver's buffers.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_devices::virtio::console::{Console, MAX_TX_CHAIN};
use vmm_devices::virtio::{ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_kit_fuzz::*;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<usize>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().expect("sink") += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let input_len = usize::from(byte(&mut u));
    let input = u.bytes(input_len).map(<[u8]>::to_vec).unwrap_or_default();
    let rx = QueueScenario::decode(&mut u);
    let tx = QueueScenario::decode(&mut u);
    let mem = memory();
    rx.write(&mem, 0);
    tx.write(&mem, 1);
    let allowed_rx = writable_ranges(&mem, 0, rx.size());
    let allowed_tx = writable_ranges(&mem, 1, tx.size());
    let before = snapshot(&mem);
    let sink = Sink::default();
    let (mut dev, feed): (Console<GuestMemoryMmap>, _) =
        Console::with_input(Box::new(sink.clone())).expect("console");
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues: vec![rx.queue(0, false), tx.queue(1, false)],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: VIRTIO_F_VERSION_1,
    };
    dev.activate(ctx).expect("activate");
    assert!(feed.push(&input));
    dev.process_event(0);
    dev.process_queue(1);
    dev.process_queue(0);
    let strict = allowed_rx.is_some() && allowed_tx.is_some();
    if let (Some(a), Some(b)) = (allowed_rx, allowed_tx) {
        let both: Vec<_> = a.into_iter().chain(b).collect();
        assert_writes_inside(&before, &mem, &both);
    }
    assert_used_ring(&mem, &rx, 0, strict);
    assert_used_ring(&mem, &tx, 1, strict);
    let written = *sink.0.lock().expect("sink");
    assert!(
        written <= MAX_TX_CHAIN * 4 * usize::from(tx.size()),
        "output {written} unbounded"
    );
});
