//! Kernel inspection and loading, and the boot structures, fed arbitrary
//! images, command lines, protocol choices and vCPU counts (with the ACPI
//! and MP tables). No panic; a kernel that loads
//! lies inside guest RAM above 1 MiB, and the initrd above it.
#![no_main]

use std::io::Cursor;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use vmm_boot::{boot_guest, inspect_kernel, BootConfig, BootProtocol, ProtocolChoice};
use vmm_kit_fuzz::byte;
use vmm_memory::{create_guest_ram, AddressMap, RamBacking};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let choice = match byte(&mut u) % 3 {
        0 => ProtocolChoice::Auto,
        1 => ProtocolChoice::Force(BootProtocol::Linux64),
        _ => ProtocolChoice::Force(BootProtocol::Pvh),
    };
    let sizes = byte(&mut u);
    let mib = 2 + u64::from(sizes % 31);
    let vcpus = 1 + sizes % vmm_boot::acpi::MAX_VCPUS;
    let cmdline_len = usize::from(byte(&mut u));
    let cmdline = String::from_utf8_lossy(u.bytes(cmdline_len).unwrap_or_default()).into_owned();
    let with_initrd = byte(&mut u) & 1 == 1;
    let initrd_len = usize::from(byte(&mut u)) * 64;
    let initrd = u.bytes(initrd_len).unwrap_or_default().to_vec();
    let image = u.take_rest();

    let _ = inspect_kernel(&mut Cursor::new(image));
    let map = AddressMap::new(mib << 20).expect("map");
    let mem = create_guest_ram(&map, RamBacking::Anonymous).expect("ram");
    // The firmware tables fit in the BIOS area for every vCPU count.
    let rsdp = vmm_boot::acpi::write_acpi_tables(&mem, vcpus, &Default::default())
        .expect("ACPI tables for 1-254 vCPUs");
    vmm_boot::acpi::write_mptable(&mem, vcpus).expect("MP table for 1-254 vCPUs");
    let config = BootConfig {
        protocol: choice,
        cmdline: &cmdline,
        acpi_rsdp: Some(rsdp),
    };
    let mut initrd = Cursor::new(initrd);
    let result = boot_guest(
        &mem,
        &map,
        &mut Cursor::new(image),
        with_initrd.then_some(&mut initrd),
        &config,
    );
    if let Ok(setup) = result {
        let k = setup.kernel_loaded;
        assert!(
            k.start() >= 0x10_0000 && map.is_ram(k.start(), k.len()),
            "kernel at {k:x?} outside RAM"
        );
        if let Some(r) = setup.kernel.load_range {
            assert!(
                map.is_ram(r.start(), r.len()),
                "kernel needs {r:x?} outside RAM"
            );
        }
        if let Some(r) = setup.initrd {
            assert!(map.is_ram(r.start(), r.len()), "initrd outside RAM");
            assert!(r.start() >= k.end(), "initrd over the kernel");
        }
    }
});
