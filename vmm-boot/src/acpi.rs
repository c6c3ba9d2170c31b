//! ACPI tables (with the rust-vmm `acpi_tables` crate) and the Intel MP
//! table, for guests to find their CPUs, interrupt controllers and devices.
//!
//! The ACPI tables go at [`ACPI_START`] and the MP table at
//! [`MPTABLE_START`], both in the BIOS area that the memory map reserves:
//! an RSDP, an XSDT, a hardware-reduced FADT, a MADT with one local APIC per
//! vCPU and the IOAPIC, and a DSDT that describes COM1 and every virtio-mmio
//! device (so a kernel finds them without `virtio_mmio.device=` entries).

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{aml, fadt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_memory::GuestRange;

use crate::error::BootError;

/// Where the ACPI tables start (the RSDP first), in the reserved BIOS area.
pub const ACPI_START: u64 = 0xe_0000;
/// Room for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x1_0000;
/// Where the MP floating pointer and configuration table go.
pub const MPTABLE_START: u64 = 0xf_0000;
/// The local APICs' address.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The IOAPIC's address.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// Most vCPUs the tables describe: xAPIC IDs are 8 bits, 255 is broadcast,
/// and the IOAPIC takes one more.
pub const MAX_VCPUS: u8 = 254;

const OEM_ID: [u8; 6] = *b"VMMKIT";
const OEM_TABLE_ID: [u8; 8] = *b"VMMKITAC";

/// What the tables describe besides the vCPUs.
#[derive(Clone, Debug, Default)]
pub struct AcpiDevices {
    /// COM1: its first port and interrupt line.
    pub serial: Option<(u16, u32)>,
    /// The virtio-mmio devices: window and interrupt line, in order.
    pub virtio_mmio: Vec<(GuestRange, u32)>,
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The DSDT: COM1 and the virtio-mmio devices under `\_SB`.
fn dsdt(devices: &AcpiDevices) -> Vec<u8> {
    let mut body = Vec::new();
    if let Some((port, irq)) = devices.serial {
        let hid = aml::EISAName::new("PNP0501");
        let io = aml::IO::new(port, port, 1, 8);
        let int = aml::Interrupt::new(true, true, false, false, irq);
        let crs = aml::ResourceTemplate::new(vec![&io, &int]);
        let uid = aml::ZERO;
        let names = [
            aml::Name::new("_HID".into(), &hid),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let com1 = aml::Device::new(
            "_SB_.COM1".into(),
            names.iter().map(|n| n as &dyn Aml).collect(),
        );
        com1.to_aml_bytes(&mut body);
    }
    for (i, (window, irq)) in devices.virtio_mmio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, window.start() as u32, window.len() as u32);
        let int = aml::Interrupt::new(true, true, false, false, *irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
        let uid = i as u32;
        let name = format!("_SB_.V{i:03X}");
        let names = [
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let dev = aml::Device::new(
            name.as_str().into(),
            names.iter().map(|n| n as &dyn Aml).collect(),
        );
        dev.to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    sdt.append_slice(&body);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// Writes the ACPI tables for `vcpus` vCPUs and `devices` at
/// [`ACPI_START`]; returns the RSDP's address (for the zero page's
/// `acpi_rsdp_addr` and PVH's `rsdp_paddr`).
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    vcpus: u8,
    devices: &AcpiDevices,
) -> Result<u64, BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let mut at = ACPI_START + Rsdp::len() as u64;
    let mut place = |table: Vec<u8>| -> Result<u64, BootError> {
        let addr = at.next_multiple_of(16);
        at = addr + table.len() as u64;
        if at > ACPI_START + ACPI_SIZE {
            return Err(BootError::BootStructuresDoNotFit);
        }
        mem.write_slice(&table, GuestAddress(addr))
            .map_err(BootError::Memory)?;
        Ok(addr)
    };
    let dsdt_addr = place(dsdt(devices))?;
    let fadt = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::Headless)
        .finalize();
    let fadt_addr = place(bytes(&fadt))?;
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDRESS, 0));
    let madt_addr = place(bytes(&madt))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(ACPI_START))
        .map_err(BootError::Memory)?;
    Ok(ACPI_START)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes an Intel MP table (MP specification 1.4) for `vcpus` vCPUs at
/// [`MPTABLE_START`]: the floating pointer, then the configuration table
/// with a processor entry per vCPU (the first the bootstrap processor), the
/// ISA bus, the IOAPIC, the 16 ISA interrupts routed to its pins, and the
/// local interrupts (LINT0 ExtINT, LINT1 NMI).
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<(), BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.push(0); // processor
        entries.extend_from_slice(&[id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]); // IOAPIC, version, enabled
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    for irq in 0u8..16 {
        // I/O interrupt: INT, conforming polarity and trigger, ISA bus.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts to every local APIC (0xff): LINT0 ExtINT, LINT1 NMI.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // specification revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMMKIT  ");
    table.extend_from_slice(b"VMMKIT MPTAB");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut pointer = Vec::with_capacity(16);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(table_addr as u32).to_le_bytes());
    pointer.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4
    pointer[10] = checksum(&pointer);

    if table_addr + table.len() as u64 > 0x10_0000 {
        return Err(BootError::BootStructuresDoNotFit);
    }
    mem.write_slice(&pointer, GuestAddress(MPTABLE_START))
        .map_err(BootError::Memory)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(BootError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// An independent reader: the table at `addr`, checked (signature,
    /// length, checksum).
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, addr, 36);
        assert_eq!(&head[..4], signature);
        let len = u32_at(&head, 4) as usize;
        let t = read(mem, addr, len);
        assert_eq!(
            checksum(&t),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        t
    }

    #[test]
    fn acpi_tables_parse_back_with_every_cpu_and_device() {
        let mem = memory();
        let devices = AcpiDevices {
            serial: Some((0x3f8, 4)),
            virtio_mmio: vec![(GuestRange::new(0xd000_0000, 0x1000).unwrap(), 5)],
        };
        let rsdp_addr = write_acpi_tables(&mem, 4, &devices).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(checksum(&rsdp[..20]), 0);
        assert_eq!(checksum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&mem, entries[0], b"FACP");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "hardware-reduced");
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        let text = String::from_utf8_lossy(&dsdt);
        assert!(
            text.contains("COM1") && text.contains("LNRO0005"),
            "{text:?}"
        );
        let madt = table(&mem, entries[1], b"APIC");
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDRESS);
        let (mut lapics, mut ioapics, mut at) = (Vec::new(), 0, 44);
        while at < madt.len() {
            match madt[at] {
                0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(&madt, at + 4))),
                1 => ioapics += 1,
                other => panic!("unexpected MADT entry {other}"),
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!(lapics, (0..4).map(|i| (i, i, 1)).collect::<Vec<_>>());
        assert_eq!(ioapics, 1);
        assert!(at <= (ACPI_SIZE as usize) && rsdp_addr == ACPI_START);
    }

    #[test]
    fn the_mp_table_lists_every_cpu_with_the_first_as_bsp() {
        let mem = memory();
        write_mptable(&mem, 64).unwrap();
        let fp = read(&mem, MPTABLE_START, 16);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(checksum(&fp), 0);
        let addr = u32_at(&fp, 4) as u64;
        let head = read(&mem, addr, 44);
        assert_eq!(&head[..4], b"PCMP");
        let len = u16::from_le_bytes([head[4], head[5]]) as usize;
        let t = read(&mem, addr, len);
        assert_eq!(checksum(&t), 0);
        let mut at = 44;
        let mut cpus = Vec::new();
        while at < t.len() {
            let size = if t[at] == 0 { 20 } else { 8 };
            if t[at] == 0 {
                cpus.push((t[at + 1], t[at + 3]));
            }
            at += size;
        }
        assert_eq!(cpus.len(), 64);
        assert_eq!(cpus[0], (0, 3), "enabled and BSP");
        assert!(cpus[1..].iter().all(|&(_, f)| f == 1));
    }

    #[test]
    fn zero_or_too_many_vcpus_are_refused() {
        let mem = memory();
        for n in [0, 255] {
            assert!(matches!(
                write_acpi_tables(&mem, n, &AcpiDevices::default()),
                Err(BootError::TooManyVcpus(_))
            ));
            assert!(matches!(
                write_mptable(&mem, n),
                Err(BootError::TooManyVcpus(_))
            ));
        }
        write_acpi_tables(&mem, MAX_VCPUS, &AcpiDevices::default()).unwrap();
        write_mptable(&mem, MAX_VCPUS).unwrap();
    }
}
