//! Guest physical memory for x86_64 KVM guests: the address map, guest RAM
//! creation and MMIO/IRQ allocation.
//!
//! This crate knows nothing of KVM. It turns a RAM size into an
//! [`AddressMap`] (RAM below the 32-bit MMIO gap, the gap with the IOAPIC, the
//! LAPIC and a window for device MMIO, RAM above 4 GiB when needed), backs that
//! map with host memory as a vm-memory [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap)
//! ([`create_guest_ram`]), and hands out device MMIO ranges and interrupt lines
//! ([`ResourceAllocator`]).
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_memory::{create_guest_ram, AddressMap, RamBacking, ResourceAllocator};
//!
//! let map = AddressMap::new(64 << 20)?;
//! let ram = create_guest_ram(&map, RamBacking::Anonymous)?;
//! ram.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(ram.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//!
//! let mut resources = ResourceAllocator::new(&map)?;
//! let window = resources.allocate_mmio(0x1000)?;
//! let irq = resources.allocate_irq()?;
//! assert!(map.device_mmio().contains(window.start()));
//! assert!(irq >= vmm_memory::layout::IRQ_BASE);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod allocator;
pub mod layout;
mod ram;
pub mod snapshot;

pub use allocator::{AllocatorError, ResourceAllocator};
pub use layout::{AddressMap, GuestRange, LayoutError, Size};
pub use ram::{create_guest_ram, GuestRam, RamBacking, RamError};
