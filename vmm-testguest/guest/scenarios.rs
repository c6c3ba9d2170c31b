//! Scenarios, run at CPL3 in the order `testguest.run=` names them. Each
//! returns the exit status it wants (`EXIT_OK` to go on with the next one).

use crate::bootinfo::BootInfo;
use crate::cmdline::Args;
use crate::virtio::Mode;
use crate::{
    acpi, devices, harness, hostile, io, smp, EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN_SCENARIO,
};

/// Runs scenario `name`.
pub fn run(name: &str, boot: &BootInfo, args: &Args) -> u8 {
    match name {
        "hello" => hello(boot),
        "exit" => {
            let status = args.exit_status.unwrap_or(EXIT_OK);
            report!("exit status={}", status);
            io::exit(status)
        }
        "reset" => {
            // i8042 command 0xFE: pulse the CPU reset line.
            report!("reset");
            io::outb(0x64, 0xfe);
            loop {
                core::hint::spin_loop();
            }
        }
        "kbd" => kbd(),
        "snapshot" => crate::snapshot::snapshot(boot),
        "touch" => crate::snapshot::touch(boot),
        "blk" => devices::blk(boot, Mode::Poll),
        "blk-irq" => devices::blk(boot, Mode::Irq),
        "rng" => devices::rng(boot, Mode::Poll),
        "rng-irq" => devices::rng(boot, Mode::Irq),
        "console" => devices::console(boot, Mode::Poll),
        "console-irq" => devices::console(boot, Mode::Irq),
        "hostile" => hostile::hostile(boot),
        "net" => crate::net::net(boot, args),
        "net-link" => crate::net::net_link(boot),
        "net-bench" => crate::net::net_bench(boot, args),
        "vsock" => crate::vsock::vsock(boot),
        "vsock-bench" => crate::vsock::vsock_bench(boot, args.bench_iters.unwrap_or(2_000)),
        "probe" => harness::probe(boot, args),
        "acpi" => acpi::acpi(boot),
        "smp" => smp::smp(boot),
        "pio" => harness::accesses("pio", args.pio, false),
        "mmio" => harness::accesses("mmio", args.mmio, true),
        "virtio" => harness::virtio(boot, args),
        "bench-virtio" => devices::bench_virtio(boot, Mode::Poll, args.bench_iters.unwrap_or(2_000)),
        "bench-virtio-irq" => devices::bench_virtio(boot, Mode::Irq, args.bench_iters.unwrap_or(2_000)),
        "bench-blk" => devices::bench_blk(boot, args.bench_iters.unwrap_or(2_000)),
        "bench-pio" => bench_exits(args, "bench-pio", || io::outb(BENCH_PORT, 0)),
        "bench-mmio" => bench_exits(args, "bench-mmio", || {
            // SAFETY: an unclaimed address in the MMIO gap, identity mapped
            // and user accessible; the read exits to the VMM.
            unsafe { core::ptr::read_volatile(BENCH_MMIO as *const u32) };
        }),
        "spin" => {
            report!("spin");
            loop {
                core::hint::spin_loop();
            }
        }
        "flood" => {
            // Serial output without end, for tests of a stalled host console.
            let mut i: u64 = 0;
            loop {
                report!("flood {}", i);
                i = i.wrapping_add(1);
            }
        }
        _ => {
            report!("error unknown scenario \"{}\"", name);
            EXIT_UNKNOWN_SCENARIO
        }
    }
}

/// The i8042's data and command/status ports.
const KBD_DATA: u16 = 0x60;
const KBD_COMMAND: u16 = 0x64;

/// The next byte the controller has for us, if one comes soon.
fn kbd_read() -> Option<u8> {
    for _ in 0..1_000_000 {
        if io::inb(KBD_COMMAND) & 1 != 0 {
            return Some(io::inb(KBD_DATA));
        }
        core::hint::spin_loop();
    }
    None
}

/// Probes the i8042 and its keyboard as Linux's driver does (controller
/// self test, command byte with translation on, keyboard reset), reports
/// `kbd ready`, waits for Ctrl, Alt and Delete (scancode set 1), then asks
/// for a reset, as Linux does on Ctrl-Alt-Del with `reboot=k`.
/// Probes the i8042 and its keyboard as Linux's driver does (controller
/// self test, command byte with translation on, keyboard reset); returns
/// the command byte it found, or reports and returns `None`.
pub fn kbd_probe() -> Option<u8> {
    while io::inb(KBD_COMMAND) & 1 != 0 {
        io::inb(KBD_DATA);
    }
    io::outb(KBD_COMMAND, 0xaa);
    let selftest = kbd_read();
    io::outb(KBD_COMMAND, 0x20);
    let command_byte = kbd_read().unwrap_or(0);
    io::outb(KBD_COMMAND, 0x60);
    io::outb(KBD_DATA, command_byte | 0x40);
    io::outb(KBD_DATA, 0xff);
    let reset = (kbd_read(), kbd_read());
    if selftest != Some(0x55) || reset != (Some(0xfa), Some(0xaa)) {
        report!(
            "kbd error selftest={:?} reset={:?}",
            selftest,
            reset
        );
        return None;
    }
    Some(command_byte)
}

/// Follows scancodes (set 1) for Ctrl, Alt and Delete held together.
#[derive(Default)]
pub struct CtrlAltDel {
    ctrl: bool,
    alt: bool,
    del: bool,
    extended: bool,
}

impl CtrlAltDel {
    /// Takes the next byte; true once all three were pressed.
    pub fn feed(&mut self, byte: u8) -> bool {
        match (self.extended, byte) {
            (_, 0xe0) => {
                self.extended = true;
                return false;
            }
            (false, 0x1d) => self.ctrl = true,
            (false, 0x38) => self.alt = true,
            (true, 0x53) => self.del = true,
            _ => {}
        }
        self.extended = false;
        self.ctrl && self.alt && self.del
    }

    /// Reads the keyboard's pending bytes, if any; true once all three were
    /// pressed.
    pub fn poll(&mut self) -> bool {
        while io::inb(KBD_COMMAND) & 1 != 0 {
            if self.feed(io::inb(KBD_DATA)) {
                return true;
            }
        }
        false
    }
}

/// `kbd`: probes the keyboard, reports `kbd ready`, waits for Ctrl, Alt and
/// Delete, then asks for a reset, as Linux does on Ctrl-Alt-Del with
/// `reboot=k`.
fn kbd() -> u8 {
    let Some(command_byte) = kbd_probe() else {
        return EXIT_FAILED;
    };
    report!("kbd ready command_byte={:#x}", command_byte);
    let mut keys = CtrlAltDel::default();
    while !keys.poll() {
        core::hint::spin_loop();
    }
    report!("kbd ctrl-alt-del");
    io::outb(KBD_COMMAND, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

fn hello(boot: &BootInfo) -> u8 {
    report!(
        "hello proto={} mem_mib={} ram_bytes={} ram_top={:#x} map_entries={}",
        boot.protocol,
        boot.ram_bytes.div_ceil(1 << 20),
        boot.ram_bytes,
        boot.ram_top,
        boot.map_entries
    );
    EXIT_OK
}

/// Port the `bench-pio` loop writes (port 0x80, the POST diagnostic port:
/// no device of ours claims it, QEMU answers it in a stub).
const BENCH_PORT: u16 = 0x80;
/// Address the `bench-mmio` loop reads: in the device MMIO window, past the
/// devices a VMM places there.
const BENCH_MMIO: u64 = 0xdfff_f000;
const DEFAULT_BENCH_ITERS: u64 = 20_000;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Times `op` (one exit to the VMM) over `testguest.bench_iters` iterations
/// and reports TSC cycles per iteration.
fn bench_exits(args: &Args, name: &str, op: impl Fn()) -> u8 {
    let iters = args.bench_iters.unwrap_or(DEFAULT_BENCH_ITERS);
    // Warm up the exit path before timing it.
    for _ in 0..iters.min(100) {
        op();
    }
    let start = rdtsc();
    for _ in 0..iters {
        op();
    }
    let cycles = rdtsc().wrapping_sub(start);
    report!("{} iters={} cycles={} cycles_per_op={}", name, iters, cycles, cycles / iters);
    EXIT_OK
}
