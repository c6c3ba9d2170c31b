//! The 8250 UART's registers under any sequence of reads, writes and host
//! input. The receive FIFO never grows past its size and every transmitted
//! byte comes from a write to the data register.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vmm_devices::legacy::{Serial, COM1_PORT, SERIAL_FIFO_SIZE};
use vmm_devices::EventFdTrigger;
use vmm_kit_fuzz::*;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut s = Serial::new(EventFdTrigger::new().expect("eventfd"), Vec::<u8>::new());
    let mut data_writes = 0usize;
    for _ in 0..1024 {
        if u.is_empty() {
            break;
        }
        let op = byte(&mut u);
        let offset = u16::from(byte(&mut u) % 10);
        let width = [1usize, 1, 1, 2, 4][usize::from(op >> 3) % 5];
        match op & 3 {
            0 => {
                let v = [byte(&mut u), byte(&mut u), byte(&mut u), byte(&mut u)];
                if offset == 0 && width == 1 {
                    data_writes += 1;
                }
                s.pio_write(PioAddress(COM1_PORT), offset, &v[..width]);
            }
            1 => {
                let mut buf = [0u8; 4];
                s.pio_read(PioAddress(COM1_PORT), offset, &mut buf[..width]);
            }
            _ => {
                let n = usize::from(byte(&mut u));
                let bytes = u.bytes(n).unwrap_or_default();
                let taken = s.enqueue_input(bytes);
                assert!(taken <= bytes.len());
            }
        }
        assert!(s.input_room() <= SERIAL_FIFO_SIZE);
        assert!(
            s.output().len() <= data_writes,
            "output without a data register write"
        );
    }
});
