//! Saving and restoring device state: every device's state is plain serde
//! data, and restoring it is validated like any untrusted input (a state
//! file may be corrupt, hostile, or from another machine).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose state can be captured and restored.
///
/// `save` captures plain data; `restore` builds the component anew from
/// what it needs that is not data (`Args`: its host file, its interrupt
/// line, its output) and a saved state, and refuses a state that does not
/// fit: bounds, consistency, and agreement with `Args`.
///
/// ```
/// use vmm_devices::legacy::DebugExit;
/// use vmm_devices::persist::Persist;
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let mut port = DebugExit::new(|_status: u8| {});
/// port.pio_write(PioAddress(0xf4), 0, &[7]);
/// let state = port.save();
/// let json = serde_json::to_string(&state)?;
/// let back = serde_json::from_str(&json)?;
/// let restored = DebugExit::restore(|_status: u8| {}, &back)?;
/// assert_eq!(restored.status(), Some(7));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Persist: Sized {
    /// The saved state.
    type State: Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned;
    /// What restoring needs besides the state.
    type Args;
    /// Why a state was refused.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Captures the state.
    fn save(&self) -> Self::State;

    /// Builds the component from `args` and a saved `state`, after checking
    /// the state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Why a saved device state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state disagrees with the device it is restored into.
    #[error("{what}: the state says {saved}, the device has {here}")]
    Mismatch {
        /// What disagrees.
        what: String,
        /// The saved value.
        saved: String,
        /// The value here.
        here: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{what} is invalid: {why}")]
    Invalid {
        /// Which value.
        what: String,
        /// Why.
        why: String,
    },
    /// A restored queue is unusable.
    #[error("restored queue is unusable")]
    Queue(#[from] crate::virtio::mmio::QueueSetupError),
    /// The device refused the restored queues.
    #[error("the device refused its restored queues")]
    Activation(#[from] crate::virtio::ActivateError),
    /// The device could not be set up at all.
    #[error("the device cannot be set up")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl RestoreError {
    /// A [`RestoreError::Mismatch`].
    pub fn mismatch(
        what: impl Into<String>,
        saved: impl fmt::Debug,
        here: impl fmt::Debug,
    ) -> Self {
        Self::Mismatch {
            what: what.into(),
            saved: format!("{saved:?}"),
            here: format!("{here:?}"),
        }
    }

    /// A [`RestoreError::Invalid`].
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }
}
