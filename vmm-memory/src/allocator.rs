//! Device MMIO ranges and interrupt lines, allocated on vm-allocator.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::layout::{AddressMap, GuestRange, IRQ_BASE, IRQ_MAX};

/// Alignment of every MMIO range handed out (one page).
pub const MMIO_ALIGNMENT: u64 = 4096;

/// Why a resource could not be allocated or released.
#[derive(Debug, thiserror::Error)]
pub enum AllocatorError {
    /// The device MMIO window has no room left for the size asked.
    #[error("no room for {size} bytes of device MMIO")]
    MmioExhausted {
        /// Bytes asked for.
        size: u64,
        /// vm-allocator's reason.
        #[source]
        source: vm_allocator::Error,
    },
    /// Every device interrupt line is taken.
    #[error("no free device interrupt line (lines {IRQ_BASE}..={IRQ_MAX} are all taken)")]
    IrqExhausted(#[source] vm_allocator::Error),
    /// A size of zero was asked for.
    #[error("cannot allocate an empty MMIO range")]
    EmptyRange,
    /// Releasing a range or line that was not allocated.
    #[error("cannot release a resource that was not allocated")]
    NotAllocated(#[source] vm_allocator::Error),
    /// The allocators could not be set up.
    #[error("cannot set up the resource allocators")]
    Setup(#[source] vm_allocator::Error),
}

/// Hands out device MMIO ranges from the map's device window and interrupt
/// lines from [`IRQ_BASE`] to [`IRQ_MAX`].
#[derive(Debug)]
pub struct ResourceAllocator {
    mmio: AddressAllocator,
    irqs: IdAllocator,
}

impl ResourceAllocator {
    /// Allocators over `map`'s device MMIO window and the device IRQ lines.
    pub fn new(map: &AddressMap) -> Result<Self, AllocatorError> {
        let window = map.device_mmio();
        Ok(Self {
            mmio: AddressAllocator::new(window.start(), window.len())
                .map_err(AllocatorError::Setup)?,
            irqs: IdAllocator::new(IRQ_BASE, IRQ_MAX).map_err(AllocatorError::Setup)?,
        })
    }

    /// A page-aligned MMIO range of `size` bytes (rounded up to a page).
    pub fn allocate_mmio(&mut self, size: u64) -> Result<GuestRange, AllocatorError> {
        if size == 0 {
            return Err(AllocatorError::EmptyRange);
        }
        let rounded =
            size.checked_next_multiple_of(MMIO_ALIGNMENT)
                .ok_or(AllocatorError::MmioExhausted {
                    size,
                    source: vm_allocator::Error::Overflow,
                })?;
        let r = self
            .mmio
            .allocate(rounded, MMIO_ALIGNMENT, AllocPolicy::FirstMatch)
            .map_err(|source| AllocatorError::MmioExhausted { size, source })?;
        GuestRange::new(r.start(), r.len()).ok_or(AllocatorError::EmptyRange)
    }

    /// Gives an MMIO range back.
    pub fn free_mmio(&mut self, range: GuestRange) -> Result<(), AllocatorError> {
        let r = vm_allocator::RangeInclusive::new(range.start(), range.last())
            .map_err(AllocatorError::NotAllocated)?;
        self.mmio.free(&r).map_err(AllocatorError::NotAllocated)
    }

    /// The lowest free device interrupt line.
    pub fn allocate_irq(&mut self) -> Result<u32, AllocatorError> {
        self.irqs
            .allocate_id()
            .map_err(AllocatorError::IrqExhausted)
    }

    /// Gives an interrupt line back.
    pub fn free_irq(&mut self, irq: u32) -> Result<(), AllocatorError> {
        self.irqs
            .free_id(irq)
            .map(|_| ())
            .map_err(AllocatorError::NotAllocated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator() -> (AddressMap, ResourceAllocator) {
        let map = AddressMap::new(64 << 20).unwrap();
        let alloc = ResourceAllocator::new(&map).unwrap();
        (map, alloc)
    }

    #[test]
    fn mmio_ranges_are_page_aligned_disjoint_and_inside_the_window() {
        let (map, mut a) = allocator();
        let r1 = a.allocate_mmio(0x200).unwrap();
        let r2 = a.allocate_mmio(0x1000).unwrap();
        let r3 = a.allocate_mmio(0x1001).unwrap();
        for r in [r1, r2, r3] {
            assert_eq!(r.start() % MMIO_ALIGNMENT, 0);
            assert!(map.device_mmio().contains(r.start()) && map.device_mmio().contains(r.last()));
        }
        assert_eq!(r1.len(), 0x1000);
        assert_eq!(r3.len(), 0x2000);
        assert!(!r1.overlaps(&r2) && !r2.overlaps(&r3) && !r1.overlaps(&r3));
    }

    #[test]
    fn freed_mmio_is_reused() {
        let (_, mut a) = allocator();
        let r1 = a.allocate_mmio(0x1000).unwrap();
        a.free_mmio(r1).unwrap();
        assert_eq!(a.allocate_mmio(0x1000).unwrap(), r1);
    }

    #[test]
    fn mmio_window_exhaustion_is_an_error() {
        let (map, mut a) = allocator();
        a.allocate_mmio(map.device_mmio().len()).unwrap();
        assert!(matches!(
            a.allocate_mmio(0x1000),
            Err(AllocatorError::MmioExhausted { .. })
        ));
        assert!(matches!(
            a.allocate_mmio(0),
            Err(AllocatorError::EmptyRange)
        ));
        assert!(matches!(
            a.allocate_mmio(u64::MAX),
            Err(AllocatorError::MmioExhausted { .. })
        ));
    }

    #[test]
    fn irqs_run_from_base_to_max_then_fail_and_are_reusable() {
        let (_, mut a) = allocator();
        let irqs: Vec<u32> = (IRQ_BASE..=IRQ_MAX)
            .map(|_| a.allocate_irq().unwrap())
            .collect();
        assert_eq!(irqs, (IRQ_BASE..=IRQ_MAX).collect::<Vec<_>>());
        assert!(matches!(
            a.allocate_irq(),
            Err(AllocatorError::IrqExhausted(_))
        ));
        a.free_irq(7).unwrap();
        assert_eq!(a.allocate_irq().unwrap(), 7);
        assert!(a.free_irq(2).is_err());
    }
}
