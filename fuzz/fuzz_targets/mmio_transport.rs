//! The virtio-mmio register state machine under any sequence of reads and
//! writes (any offset, any width) and queue notifications, with an rng
//! device behind it and fuzzer-made rings in memory.
//!
//! Invariants: the identity registers never change; DRIVER_OK is never set
//! without FEATURES_OK; an active device always runs with VERSION_1 and only
//! offered features.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_devices::virtio::mmio::{status, MmioTransport};
use vmm_devices::virtio::rng::Rng;
use vmm_devices::virtio::VIRTIO_F_VERSION_1;
use vmm_devices::EventFdTrigger;
use vmm_kit_fuzz::*;

/// Register offsets a driver uses, so most operations hit something real.
const REGS: [u64; 24] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100,
];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let s = QueueScenario::decode(&mut u);
    let mem = memory();
    s.write(&mem, 0);
    let irq = EventFdTrigger::new().expect("eventfd");
    let mut t: MmioTransport<GuestMemoryMmap> =
        MmioTransport::new(Box::new(Rng::new()), mem.clone(), irq).expect("transport");
    let offered = t.device().device_features();
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        let op = byte(&mut u);
        let offset = if op & 0x80 == 0 {
            REGS[usize::from(byte(&mut u)) % REGS.len()]
        } else {
            u64::from(word(&mut u) % 0x1000)
        };
        let width = [1usize, 2, 4, 8][usize::from(op >> 4) & 3];
        match op & 3 {
            0 | 1 => {
                let v = u64::from(dword(&mut u)) | (u64::from(dword(&mut u)) << 32);
                t.write(offset, &v.to_le_bytes()[..width]);
            }
            2 => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..width]);
            }
            _ => {
                if t.device().is_active() {
                    t.device_mut().process_queue(0);
                }
            }
        }
        let mut magic = [0u8; 4];
        t.read(0, &mut magic);
        assert_eq!(u32::from_le_bytes(magic), 0x7472_6976);
        let st = t.device_status();
        assert!(
            st & status::DRIVER_OK == 0 || st & status::FEATURES_OK != 0,
            "DRIVER_OK without FEATURES_OK"
        );
        if t.device().is_active() {
            assert_ne!(t.acked_features() & VIRTIO_F_VERSION_1, 0);
            assert_eq!(t.acked_features() & !offered, 0);
        }
    }
    let _ = t.state();
});
