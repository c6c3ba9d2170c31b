//! Scenarios, run at CPL3 in the order `testguest.run=` names them. Each
//! returns the exit status it wants (`EXIT_OK` to go on with the next one).

use crate::bootinfo::BootInfo;
use crate::cmdline::Args;
use crate::virtio::Mode;
use crate::{devices, hostile, io, EXIT_OK, EXIT_UNKNOWN_SCENARIO};

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
        "blk" => devices::blk(boot, Mode::Poll),
        "blk-irq" => devices::blk(boot, Mode::Irq),
        "rng" => devices::rng(boot, Mode::Poll),
        "rng-irq" => devices::rng(boot, Mode::Irq),
        "console" => devices::console(boot, Mode::Poll),
        "console-irq" => devices::console(boot, Mode::Irq),
        "hostile" => hostile::hostile(boot),
        "spin" => {
            report!("spin");
            loop {
                core::hint::spin_loop();
            }
        }
        _ => {
            report!("error unknown scenario \"{}\"", name);
            EXIT_UNKNOWN_SCENARIO
        }
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
