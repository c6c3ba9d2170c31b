//! The test guest: a tiny `no_std` program that boots like Linux (64-bit boot
//! protocol or PVH), runs a short CPL0 bootstrap, then runs the scenarios named
//! on its command line at CPL3 and reports over COM1.
//!
//! Command line keys:
//! - `testguest.run=NAME[,NAME...]`: scenarios to run in order (default `hello`);
//! - `testguest.exit=N`: the status the `exit` scenario ends with;
//! - `testguest.exit_port=PORT`: the debug-exit port (default 0xf4).
//!
//! Every report line starts with `testguest: `. The guest ends by writing its
//! status to the debug-exit port: 0 when every scenario passed.

#![no_std]
#![no_main]

#[macro_use]
mod io;
mod acpi;
mod apic;
mod boot;
mod bootinfo;
mod cmdline;
mod devices;
mod harness;
mod hostile;
mod mem;
mod net;
mod scenarios;
mod shared;
mod smp;
mod snapshot;
mod virtio;
mod vsock;

use bootinfo::BootInfo;

/// Every scenario passed.
pub const EXIT_OK: u8 = 0;
/// A scenario failed.
pub const EXIT_FAILED: u8 = 3;
/// `testguest.run=` named a scenario the guest does not have.
pub const EXIT_UNKNOWN_SCENARIO: u8 = 4;
/// A CPU exception reached the guest's IDT.
pub const EXIT_EXCEPTION: u8 = 5;
/// The guest panicked.
pub const EXIT_PANIC: u8 = 6;
/// The boot information was unusable.
pub const EXIT_BAD_BOOT: u8 = 7;

/// CPL3 entry, reached from the bootstrap by `iretq`.
#[unsafe(no_mangle)]
pub extern "C" fn tg_user_main(proto: u32, info: u64) -> ! {
    let boot = match BootInfo::read(proto, info) {
        Ok(b) => b,
        Err(e) => {
            report!("error boot info: {}", e);
            io::exit(EXIT_BAD_BOOT)
        }
    };
    let args = cmdline::Args::parse(boot.cmdline);
    if let Some(port) = args.exit_port {
        io::set_exit_port(port);
    }
    let (_, virtio_entries) = virtio::find_devices(boot.cmdline);
    report!(
        "boot proto={} cpl={} cmdline_bytes={} virtio_entries={}",
        boot.protocol,
        current_cpl(),
        boot.cmdline.len(),
        virtio_entries
    );
    for name in args.scenarios() {
        let status = scenarios::run(name, &boot, &args);
        if status != EXIT_OK {
            report!("done status={}", status);
            io::exit(status);
        }
    }
    report!("done status={}", EXIT_OK);
    io::exit(EXIT_OK)
}

fn current_cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effect.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// Called by the CPL0 exception path: reports and exits.
pub fn report_exception(frame: &boot::ExceptionFrame, cr2: u64) -> ! {
    report!(
        "exception vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        cr2
    );
    io::exit(EXIT_EXCEPTION)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    report!("panic {}", info);
    io::exit(EXIT_PANIC)
}

/// The precompiled `core` refers to the unwinding personality routine even
/// though this program is built with `panic=abort` and never unwinds.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
