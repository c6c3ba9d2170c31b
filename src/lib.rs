//! A crate family for building Virtual Machine Monitors on Linux KVM.
//!
//! This facade re-exports the member crates under short names:
//!
//! | module | crate | what it does |
//! |---|---|---|
//! | [`memory`] | `vmm-memory` | guest address map, guest RAM, MMIO/IRQ allocation |
//! | [`boot`] | `vmm-boot` | kernel loading, boot parameters, boot CPU state |
//! | [`devices`] | `vmm-devices` | device emulators (serial, i8042, debug-exit) |
//! | [`core`] | `vmm-core` | KVM VM, vCPUs and their run loop, the [`Vmm`](vmm_core::Vmm) |
//! | [`testguest`] | `vmm-testguest` | the test guest image and its report parser |
//!
//! The reference VMM is `examples/minimal.rs`: `cargo run --example minimal`.

#![deny(missing_docs)]

pub use vmm_boot as boot;
pub use vmm_core as core;
pub use vmm_devices as devices;
pub use vmm_memory as memory;
pub use vmm_testguest as testguest;
