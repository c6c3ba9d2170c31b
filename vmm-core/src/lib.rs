//! The KVM binding of the crate family: the VM (memslots, irqchip, PIT,
//! irqfds), vCPUs set up from [`vmm_boot`]'s plain boot state, the vCPU
//! thread with a pure exit handler dispatching to the vm-device bus, the
//! device event loop, and the [`VmBuilder`] that assembles a whole VM from
//! parts (the built-in devices and your own alike) into a [`Vmm`] that runs,
//! pauses, resumes and stops on typed [`VmEvent`]s.
//!
//! ```no_run
//! use vmm_core::{HostIo, KernelSource, VmConfig, Vmm};
//!
//! let config = VmConfig {
//!     kernel: KernelSource::Bytes(vmm_testguest::IMAGE),
//!     cmdline: "testguest.run=hello".into(),
//!     ..VmConfig::default()
//! };
//! let vmm = Vmm::new(&config, HostIo::serial(Box::new(std::io::stdout())))?;
//! let exit = vmm.run()?;
//! std::process::exit(exit.exit_code().into());
//! # Ok::<(), vmm_core::VmmError>(())
//! ```

#![deny(missing_docs)]

mod builder;
mod config;
pub mod devices;
pub mod event_loop;
mod events;
pub mod host_io;
pub mod lifecycle;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
mod vmm;

pub use builder::VmBuilder;
pub use config::{HostIo, KernelSource, SerialConfig, VmConfig, DEFAULT_CMDLINE};
pub use devices::{
    ConsoleConfig, DeviceError, DiskConfig, NetConfig, TapSource, Transport, VirtioHandle,
    VirtioSlot, VsockConfig,
};
pub use event_loop::{EventLoop, EventLoopError, Subscriber};
pub use events::{exit_status, EventTrigger, OwnerTask, StopCause, VmEvent, VmEventSender, VmExit};
pub use lifecycle::{ConfigError, LifecycleError, LifecycleState, VmController};
pub use seccomp::{SeccompPolicy, ThreadKind};
pub use vcpu::{handle_exit, StopReason, Vcpu, VcpuEmulation, VcpuError, VcpuState};
pub use vm::{Vm, VmError, VmState};
pub use vmm::{ControlError, RunningVm, StoppedVm, VmHandle, Vmm, VmmError};
