//! A crate family for building Virtual Machine Monitors on Linux KVM.
//!
//! This facade re-exports the member crates under short names:
//!
//! | module | crate | what it does |
//! |---|---|---|
//! | [`memory`] | `vmm-memory` | guest address map, guest RAM, MMIO/IRQ allocation |
//! | [`boot`] | `vmm-boot` | kernel loading, boot parameters, boot CPU state |
//! | [`devices`] | `vmm-devices` | device emulators: legacy PC devices, virtio and its transport |
//! | [`core`] | `vmm-core` | KVM VM, vCPUs, the event loop, the [`VmBuilder`](vmm_core::VmBuilder) and [`Vmm`](vmm_core::Vmm) |
//! | [`api`] | `vmm-api` | Firecracker's REST API over a Unix socket, on [`VmController`](vmm_core::VmController) |
//! | [`testguest`] | `vmm-testguest` | the test guest image and its report parser |
//!
//! It also re-exports, at the versions the members use, every crate whose
//! types appear in their public signatures ([`vm_memory`], [`vm_device`],
//! [`virtio_queue`], [`kvm_ioctls`], ...): depend on `vmm-kit` alone and
//! name them through it.
//!
//! The reference VMM is `examples/minimal.rs`: `cargo run --example minimal`;
//! a VMM with devices of its own is `examples/custom_device.rs`.

#![deny(missing_docs)]

pub use vmm_api as api;
pub use vmm_boot as boot;
pub use vmm_core as core;
pub use vmm_devices as devices;
pub use vmm_memory as memory;
pub use vmm_testguest as testguest;

pub use acpi_tables;
pub use event_manager;
pub use kvm_bindings;
pub use kvm_ioctls;
pub use linux_loader;
pub use seccompiler;
pub use virtio_bindings;
pub use virtio_queue;
pub use vm_allocator;
pub use vm_device;
pub use vm_memory;
pub use vm_superio;
pub use vmm_sys_util;
