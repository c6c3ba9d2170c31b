//! The KVM binding of the crate family: the VM (memslots, irqchip, PIT,
//! irqfds), vCPUs set up from [`vmm_boot`]'s plain boot state, the vCPU
//! thread with a pure exit handler dispatching to the vm-device bus, and a
//! [`Vmm`] that puts a whole guest together and waits for its end.
//!
//! ```no_run
//! use vmm_core::{KernelSource, VmConfig, Vmm};
//!
//! let config = VmConfig {
//!     kernel: KernelSource::Bytes(vmm_testguest::IMAGE),
//!     cmdline: "testguest.run=hello".into(),
//!     ..VmConfig::default()
//! };
//! let vmm = Vmm::new(&config, Box::new(std::io::stdout()))?;
//! let exit = vmm.run()?;
//! std::process::exit(exit.exit_code().into());
//! # Ok::<(), vmm_core::VmmError>(())
//! ```

#![deny(missing_docs)]

pub mod devices;
pub mod event_loop;
pub mod seccomp;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use devices::{ConsoleConfig, DeviceError, DiskConfig};
pub use seccomp::SeccompPolicy;
pub use vcpu::{handle_exit, StopReason, Vcpu, VcpuEmulation, VcpuError};
pub use vm::{Vm, VmError};
pub use vmm::{KernelSource, StopHandle, VmConfig, VmExit, Vmm, VmmError, DEFAULT_CMDLINE};
