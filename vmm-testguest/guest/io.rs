//! Port I/O, the COM1 writer and the debug-exit port. Usable at CPL3 because
//! the scenarios run with IOPL 3.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicU16, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 0x20;

/// The debug-exit port, settable from the command line (`testguest.exit_port=`).
static EXIT_PORT: AtomicU16 = AtomicU16::new(0xf4);

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effect; the guest runs with IOPL 3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes bytes to COM1, waiting for the transmit holding register each time.
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        let mut spins = 0u32;
        while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 && spins < 100_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

/// `core::fmt` sink for COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial_write(s.as_bytes());
        Ok(())
    }
}

/// Chooses the port `exit` writes to.
pub fn set_exit_port(port: u16) {
    EXIT_PORT.store(port, Ordering::Relaxed);
}

/// Ends the guest with `status` through the debug-exit port. The VMM stops
/// the vCPU once it sees the write; until then the guest spins.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT.load(Ordering::Relaxed), status);
    loop {
        core::hint::spin_loop();
    }
}

/// Prints one formatted report line on COM1, prefixed with `testguest: `.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::io::Serial, "testguest: ");
        let _ = write!($crate::io::Serial, $($arg)*);
        $crate::io::serial_write(b"\n");
    }};
}
