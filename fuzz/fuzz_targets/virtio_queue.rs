//! Descriptor chain parsing and used-ring publication, as every device does
//! it: drain a fuzzer-made queue, reading every readable byte and filling
//! every writable one. No write may land outside the driver's writable
//! buffers and the used ring, and the used ring must stay consistent.
#![no_main]

use std::io::{Read, Write};

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vmm_devices::virtio::{drain_queue, QueueBudget};
use vmm_kit_fuzz::*;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let event_idx = byte(&mut u) & 1 == 1;
    let s = QueueScenario::decode(&mut u);
    let mem = memory();
    s.write(&mem, 0);
    let allowed = writable_ranges(&mem, 0, s.size());
    let before = snapshot(&mem);
    let mut q = s.queue(0, event_idx);
    let intr = TestInterrupt::default();
    let mut chains = 0u32;
    let budget = QueueBudget::for_queue(&q);
    let _ = drain_queue(&mut q, &mem, &intr, budget, |chain| {
        chains += 1;
        let mut sink = [0u8; 4096];
        if let Ok(mut r) = chain.clone().reader(&mem) {
            while let Ok(n) = r.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        match chain.writer(&mem) {
            Ok(mut w) => {
                let n = w.available_bytes().min(4096);
                let _ = w.write_all(&vec![0x5a; n]);
                n as u32
            }
            Err(_) => 0,
        }
    });
    assert!(chains <= 4 * u32::from(s.size()), "budget exceeded");
    if let Some(allowed) = &allowed {
        assert_writes_inside(&before, &mem, allowed);
    }
    assert_used_ring(&mem, &s, 0, allowed.is_some());
});
