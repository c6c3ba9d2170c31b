//! The x86_64 guest physical address map.
//!
//! ```text
//! 0                      RAM (low part, up to the gap)
//! 0xC000_0000            32-bit MMIO gap (1 GiB):
//!   0xD000_0000            device MMIO window (virtio-mmio and friends)
//!   0xFEC0_0000            IOAPIC
//!   0xFEE0_0000            LAPIC
//! 0x1_0000_0000          RAM (the rest, when the size needs it)
//! ```

use std::fmt;

/// Start of the 32-bit MMIO gap: RAM below it, devices inside it.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Start of the window handed out to device MMIO ranges.
pub const DEVICE_MMIO_START: u64 = 0xD000_0000;
/// Size of the device MMIO window.
pub const DEVICE_MMIO_SIZE: u64 = 0x2000_0000;
/// Base of the IOAPIC register window.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Size of the IOAPIC register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Base of the local APIC register window.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size of the local APIC register window.
pub const LAPIC_SIZE: u64 = 0x1000;
/// First address of RAM above the gap.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;
/// First interrupt line handed to devices (0-4 are the PIT, keyboard,
/// cascade, COM2 and COM1).
pub const IRQ_BASE: u32 = 5;
/// Last interrupt line handed to devices (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// Smallest guest RAM accepted: enough for the boot structures below 1 MiB
/// and a small kernel.
pub const MIN_RAM_SIZE: u64 = 2 << 20;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_RAM_SIZE: u64 = 1 << 40;

/// A half-open range `[start, start + len)` of guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestRange {
    start: u64,
    len: u64,
}

impl GuestRange {
    /// A range of `len` bytes at `start`; `None` if empty or past the end of
    /// the 64-bit address space.
    pub fn new(start: u64, len: u64) -> Option<Self> {
        (len > 0 && start.checked_add(len - 1).is_some()).then_some(Self { start, len })
    }

    /// First address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: empty ranges cannot be built.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.start + (self.len - 1)
    }

    /// End address (exclusive), saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr <= self.last()
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.start <= other.last() && other.start <= self.last()
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end())
    }
}

/// Why an address map cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The RAM size is below [`MIN_RAM_SIZE`].
    #[error(
        "guest RAM of {} is too small: at least {} are needed",
        Size(*size),
        Size(MIN_RAM_SIZE)
    )]
    RamTooSmall {
        /// The size asked for.
        size: u64,
    },
    /// The RAM size is above [`MAX_RAM_SIZE`].
    #[error(
        "guest RAM of {} is too large: at most {} are supported",
        Size(*size),
        Size(MAX_RAM_SIZE)
    )]
    RamTooLarge {
        /// The size asked for.
        size: u64,
    },
    /// The RAM size is not a multiple of the 4 KiB page size.
    #[error("guest RAM of {} is not a multiple of 4 KiB", Size(*size))]
    RamNotPageAligned {
        /// The size asked for.
        size: u64,
    },
}

/// A byte count shown in the largest binary unit it is a whole number of
/// (`2 MiB`, `1 TiB`, `1536 KiB`, `100 bytes`), as a user would have typed
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// Where RAM and the fixed device windows sit in guest physical memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressMap {
    ram: Vec<GuestRange>,
}

impl AddressMap {
    /// Lays out `ram_size` bytes of RAM: up to [`MMIO_GAP_START`] below the
    /// gap, the rest from [`HIGH_RAM_START`].
    pub fn new(ram_size: u64) -> Result<Self, LayoutError> {
        if ram_size < MIN_RAM_SIZE {
            return Err(LayoutError::RamTooSmall { size: ram_size });
        }
        if ram_size > MAX_RAM_SIZE {
            return Err(LayoutError::RamTooLarge { size: ram_size });
        }
        if ram_size % 4096 != 0 {
            return Err(LayoutError::RamNotPageAligned { size: ram_size });
        }
        let low = ram_size.min(MMIO_GAP_START);
        let mut ram = Vec::with_capacity(2);
        ram.extend(GuestRange::new(0, low));
        ram.extend(GuestRange::new(HIGH_RAM_START, ram_size - low));
        Ok(Self { ram })
    }

    /// The RAM ranges, in address order (one or two).
    pub fn ram(&self) -> &[GuestRange] {
        &self.ram
    }

    /// Total RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram.iter().map(GuestRange::len).sum()
    }

    /// End (exclusive) of the highest RAM range.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, GuestRange::end)
    }

    /// The 32-bit MMIO gap.
    pub fn mmio_gap(&self) -> GuestRange {
        GuestRange {
            start: MMIO_GAP_START,
            len: MMIO_GAP_END - MMIO_GAP_START,
        }
    }

    /// The window device MMIO ranges are allocated from.
    pub fn device_mmio(&self) -> GuestRange {
        GuestRange {
            start: DEVICE_MMIO_START,
            len: DEVICE_MMIO_SIZE,
        }
    }

    /// The IOAPIC register window.
    pub fn ioapic(&self) -> GuestRange {
        GuestRange {
            start: IOAPIC_START,
            len: IOAPIC_SIZE,
        }
    }

    /// The local APIC register window.
    pub fn lapic(&self) -> GuestRange {
        GuestRange {
            start: LAPIC_START,
            len: LAPIC_SIZE,
        }
    }

    /// Whether `[addr, addr + len)` lies entirely inside one RAM range.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        match GuestRange::new(addr, len) {
            Some(r) => self
                .ram
                .iter()
                .any(|ram| ram.contains(r.start) && ram.contains(r.last())),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_typed() {
        assert_eq!(Size(2 << 20).to_string(), "2 MiB");
        assert_eq!(Size(1 << 40).to_string(), "1 TiB");
        assert_eq!(Size(1536 << 10).to_string(), "1536 KiB");
        assert_eq!(Size(100).to_string(), "100 bytes");
        let e = AddressMap::new(1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest RAM of 1 MiB is too small: at least 2 MiB are needed"
        );
    }

    #[test]
    fn small_ram_sits_below_the_gap_in_one_range() {
        let map = AddressMap::new(128 << 20).unwrap();
        assert_eq!(map.ram(), &[GuestRange::new(0, 128 << 20).unwrap()]);
        assert_eq!(map.ram_size(), 128 << 20);
        assert_eq!(map.ram_end(), 128 << 20);
    }

    #[test]
    fn ram_exactly_filling_low_memory_has_no_high_range() {
        let map = AddressMap::new(MMIO_GAP_START).unwrap();
        assert_eq!(map.ram().len(), 1);
        assert_eq!(map.ram_end(), MMIO_GAP_START);
    }

    #[test]
    fn large_ram_is_split_around_the_gap() {
        let map = AddressMap::new(4 << 30).unwrap();
        let low = GuestRange::new(0, MMIO_GAP_START).unwrap();
        let high = GuestRange::new(HIGH_RAM_START, (4 << 30) - MMIO_GAP_START).unwrap();
        assert_eq!(map.ram(), &[low, high]);
        assert_eq!(map.ram_size(), 4 << 30);
        assert!(!map.ram().iter().any(|r| r.overlaps(&map.mmio_gap())));
    }

    #[test]
    fn fixed_windows_sit_inside_the_gap_and_do_not_overlap() {
        let map = AddressMap::new(64 << 20).unwrap();
        let gap = map.mmio_gap();
        let windows = [map.device_mmio(), map.ioapic(), map.lapic()];
        for w in &windows {
            assert!(
                gap.contains(w.start()) && gap.contains(w.last()),
                "{w} outside gap"
            );
        }
        for (i, a) in windows.iter().enumerate() {
            for b in &windows[i + 1..] {
                assert!(!a.overlaps(b), "{a} overlaps {b}");
            }
        }
        // The standard x86 addresses the guest expects.
        assert_eq!(map.ioapic().start(), 0xfec0_0000);
        assert_eq!(map.lapic().start(), 0xfee0_0000);
    }

    #[test]
    fn bad_sizes_are_rejected_with_their_reason() {
        assert_eq!(
            AddressMap::new(1 << 20),
            Err(LayoutError::RamTooSmall { size: 1 << 20 })
        );
        assert_eq!(
            AddressMap::new(1 << 41),
            Err(LayoutError::RamTooLarge { size: 1 << 41 })
        );
        assert_eq!(
            AddressMap::new((64 << 20) + 1),
            Err(LayoutError::RamNotPageAligned {
                size: (64 << 20) + 1
            })
        );
    }

    #[test]
    fn is_ram_rejects_ranges_crossing_into_the_gap() {
        let map = AddressMap::new(MMIO_GAP_START + (1 << 30)).unwrap();
        assert!(map.is_ram(0, 4096));
        assert!(map.is_ram(MMIO_GAP_START - 4096, 4096));
        assert!(!map.is_ram(MMIO_GAP_START - 4096, 8192));
        assert!(map.is_ram(HIGH_RAM_START, 4096));
        assert!(!map.is_ram(0, 0));
        assert!(!map.is_ram(u64::MAX, 2));
    }

    #[test]
    fn guest_range_refuses_empty_and_wrapping_ranges() {
        assert!(GuestRange::new(0, 0).is_none());
        assert!(GuestRange::new(u64::MAX, 2).is_none());
        let r = GuestRange::new(u64::MAX, 1).unwrap();
        assert_eq!(r.last(), u64::MAX);
        assert_eq!(r.end(), u64::MAX);
    }
}
