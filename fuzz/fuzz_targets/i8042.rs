//! The i8042 and the debug-exit port under any sequence of port accesses
//! and host key presses: a reset is signalled exactly for command 0xFE on
//! port 0x64, the output buffer stays bounded and the status register says
//! whether it holds a byte, and the exit status is the first byte written
//! to the exit port.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vmm_devices::legacy::{DebugExit, DEBUG_EXIT_PORT, I8042, I8042_BUFFER_SIZE, I8042_PORT};
use vmm_devices::persist::Persist;
use vmm_devices::EventFdTrigger;
use vmm_kit_fuzz::*;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut kbd = I8042::new(
        EventFdTrigger::new().expect("eventfd"),
        EventFdTrigger::new().expect("eventfd"),
    );
    let mut exits = 0u32;
    let mut exit = DebugExit::new(|_status| exits += 1);
    let mut resets = 0u64;
    let mut first_status = None;
    for _ in 0..1024 {
        if u.is_empty() {
            break;
        }
        let op = byte(&mut u);
        let width = [1usize, 2, 4, 3][usize::from(op >> 4) & 3];
        let v = [byte(&mut u), byte(&mut u), byte(&mut u), byte(&mut u)];
        let offset = u16::from(byte(&mut u) % 8);
        if op & 0x40 != 0 {
            // The host presses Ctrl-Alt-Del; refused only when full.
            let before = kbd.save();
            // Eight bytes in scancode set 1 (translation on), eleven in set 2.
            let needed = if before.command_byte & 0x40 != 0 {
                8
            } else {
                11
            };
            if kbd.press_ctrl_alt_del().is_err() {
                assert!(
                    before.output.len() + needed > I8042_BUFFER_SIZE,
                    "refused with room"
                );
            } else {
                assert_eq!(kbd.save().output.len(), before.output.len() + needed);
            }
        }
        match op & 3 {
            0 => {
                if offset == 4 && width == 1 && v[0] == 0xfe {
                    resets += 1;
                }
                kbd.pio_write(PioAddress(I8042_PORT), offset, &v[..width]);
            }
            1 => {
                let mut buf = [0u8; 4];
                kbd.pio_read(PioAddress(I8042_PORT), offset, &mut buf[..width]);
            }
            2 => {
                if offset == 0 && matches!(width, 1 | 2 | 4) && first_status.is_none() {
                    first_status = Some(v[0]);
                }
                exit.pio_write(PioAddress(DEBUG_EXIT_PORT), offset, &v[..width]);
            }
            _ => {
                let mut buf = [0u8; 4];
                exit.pio_read(PioAddress(DEBUG_EXIT_PORT), offset, &mut buf[..width]);
            }
        }
    }
    let state = kbd.save();
    assert!(state.output.len() <= I8042_BUFFER_SIZE);
    assert_eq!(kbd.read(4) & 1 != 0, !state.output.is_empty(), "OBF says");
    assert_eq!(kbd.resets(), resets);
    assert_eq!(exit.status(), first_status);
    drop(exit);
    assert_eq!(
        exits,
        u32::from(first_status.is_some()),
        "the sink hears one status"
    );
});
