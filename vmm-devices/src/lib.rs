//! Device emulators for KVM guests, independent of KVM and of the bus they
//! sit on: each device exposes register-level reads and writes and a thin
//! vm-device adapter (`MutDevicePio`), and receives its interrupt line, its
//! output and its exit/reset notifications by injection.
//!
//! Legacy devices: the COM1 8250 UART ([`legacy::Serial`], on vm-superio), the
//! i8042 controller for the guest's reset request ([`legacy::I8042`]) and a
//! debug-exit port through which a guest ends the VM with a status
//! ([`legacy::DebugExit`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vm_device::bus::{PioAddress, PioRange};
//! use vm_device::device_manager::{IoManager, PioManager};
//! use vmm_devices::legacy::{DebugExit, Serial, COM1_PORT, COM1_PORT_SIZE};
//! use vmm_devices::EventFdTrigger;
//!
//! let serial = Arc::new(Mutex::new(Serial::new(EventFdTrigger::new()?, Vec::new())));
//! let mut bus = IoManager::new();
//! bus.register_pio(PioRange::new(PioAddress(COM1_PORT), COM1_PORT_SIZE)?, serial.clone())?;
//! for b in b"hi\n" {
//!     bus.pio_write(PioAddress(COM1_PORT), &[*b])?;
//! }
//! assert_eq!(serial.lock().unwrap().output(), b"hi\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod host_files;
mod interrupt;
pub mod legacy;
pub mod metrics;
pub mod persist;
pub mod rate_limiter;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[macro_use]
pub mod ratelimit;
pub mod virtio;

pub use interrupt::EventFdTrigger;
