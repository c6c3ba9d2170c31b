//! Legacy PC devices on the port I/O bus.

mod debug_exit;
mod debugcon;
mod generation;
mod i8042;
mod serial;

pub use debug_exit::{
    DebugExit, DebugExitState, GuestExitSink, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE,
};
pub use debugcon::{DebugCon, DebugConState, DEBUGCON_PORT};
pub use generation::{VmGeneration, VmGenerationState, GENERATION_PORT, GENERATION_PORT_SIZE};
pub use i8042::{
    I8042State, KeyError, I8042, I8042_BUFFER_SIZE, I8042_KBD_IRQ, I8042_PORT, I8042_PORT_SIZE,
};
pub use serial::{
    Serial, SerialSnapshot, SerialState, COM1_IRQ, COM1_PORT, COM1_PORT_SIZE, SERIAL_FIFO_SIZE,
};
