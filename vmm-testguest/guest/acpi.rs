//! The `acpi` scenario: walks the tables the VMM gave (RSDP -> XSDT -> MADT
//! and FADT -> DSDT), checking each signature and checksum, and reports the
//! CPUs, IOAPICs and devices it found.

use crate::bootinfo::BootInfo;
use crate::{EXIT_FAILED, EXIT_OK};

/// Longest table read.
const MAX_TABLE: u32 = 64 * 1024;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the first 4 GiB are identity mapped and user readable; every
    // address is checked to be below 4 GiB before it is read.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn sum(addr: u64, len: u32) -> u8 {
    (0..u64::from(len)).fold(0u8, |a, i| a.wrapping_add(read::<u8>(addr + i)))
}

/// The length of the table at `addr` if it has `signature`, a sane length
/// and a zero checksum.
fn table(addr: u64, signature: &[u8; 4]) -> Result<u32, &'static str> {
    if addr == 0 || addr >= 1 << 32 {
        return Err("table address outside the first 4 GiB");
    }
    if read::<[u8; 4]>(addr) != *signature {
        return Err("wrong table signature");
    }
    let len = read::<u32>(addr + 4);
    if !(36..=MAX_TABLE).contains(&len) {
        return Err("bad table length");
    }
    if sum(addr, len) != 0 {
        return Err("bad table checksum");
    }
    Ok(len)
}

/// Occurrences of `needle` in the `len` bytes at `addr`.
fn count(addr: u64, len: u32, needle: &[u8]) -> u32 {
    let n = needle.len() as u64;
    (0..u64::from(len).saturating_sub(n))
        .filter(|&i| (0..n).all(|k| read::<u8>(addr + i + k) == needle[k as usize]))
        .count() as u32
}

/// What the tables say: enabled local APICs, IOAPICs, virtio-mmio and
/// COM1 devices in the DSDT.
struct Found {
    cpus: u32,
    ioapics: u32,
    virtio_mmio: u32,
    serial: u32,
}

/// The number of enabled processors the MADT lists.
pub fn cpu_count(boot: &BootInfo) -> Result<u32, &'static str> {
    walk(boot).map(|f| f.cpus)
}

fn walk(boot: &BootInfo) -> Result<Found, &'static str> {
    let rsdp = boot.rsdp;
    if rsdp == 0 || rsdp >= 1 << 32 {
        return Err("no RSDP given");
    }
    if read::<[u8; 8]>(rsdp) != *b"RSD PTR " || sum(rsdp, 20) != 0 || sum(rsdp, 36) != 0 {
        return Err("bad RSDP");
    }
    let xsdt = read::<u64>(rsdp + 24);
    let xlen = table(xsdt, b"XSDT")?;
    let (mut cpus, mut ioapics, mut dsdt_devices, mut serial) = (0u32, 0u32, 0u32, 0u32);
    for i in 0..(xlen - 36) / 8 {
        let entry = read::<u64>(xsdt + 36 + 8 * u64::from(i));
        let signature = read::<[u8; 4]>(entry);
        if signature == *b"APIC" {
            let len = table(entry, b"APIC")?;
            let mut at = 44;
            while at + 2 <= len {
                let kind = read::<u8>(entry + u64::from(at));
                let size = read::<u8>(entry + u64::from(at) + 1);
                if size < 2 {
                    return Err("bad MADT entry length");
                }
                match kind {
                    0 if read::<u32>(entry + u64::from(at) + 4) & 1 == 1 => cpus += 1,
                    1 => ioapics += 1,
                    _ => {}
                }
                at += u32::from(size);
            }
        } else if signature == *b"FACP" {
            table(entry, b"FACP")?;
            let dsdt = read::<u64>(entry + 140);
            let len = table(dsdt, b"DSDT")?;
            dsdt_devices = count(dsdt, len, b"LNRO0005");
            serial = count(dsdt, len, b"COM1");
        }
    }
    Ok(Found {
        cpus,
        ioapics,
        virtio_mmio: dsdt_devices,
        serial,
    })
}

/// Runs the scenario.
pub fn acpi(boot: &BootInfo) -> u8 {
    match walk(boot) {
        Ok(f) => {
            report!("acpi cpus={} ioapics={} virtio_mmio={} serial={}", f.cpus, f.ioapics, f.virtio_mmio, f.serial);
            EXIT_OK
        }
        Err(msg) => {
            report!("error acpi {}", msg);
            EXIT_FAILED
        }
    }
}
