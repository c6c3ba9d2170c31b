//! virtio-vsock (virtio 1.2, 5.10) with Firecracker's host side: stream
//! sockets between the guest and host programs, over Unix sockets.
//!
//! - A guest connection to host port `P` reaches the Unix socket
//!   `<uds_path>_<P>`, which a host program listens on.
//! - A host program connects to the Unix socket `<uds_path>`, writes
//!   `CONNECT <port>\n`, and once the guest accepts on `port` reads
//!   `OK <host port>\n`; the stream is then the connection.
//!
//! Packets use the rust-vmm `virtio-vsock` crate's format. Flow control is
//! credit-based both ways: the device never sends the guest more than its
//! advertised buffer space, and resets a connection whose guest side sends
//! more than the device's ([`CONN_BUF_SIZE`] per connection). Host data
//! moves between the socket and guest buffers without a copy in the
//! device. A guest that does not answer a host program's request within
//! [`CONN_REQUEST_TIMEOUT`], or does not close a connection within
//! [`CONN_SHUTDOWN_TIMEOUT`] of the host program closing it, has that
//! connection reset (as Firecracker does, 2 s each). A device reset closes
//! every connection; a restored device tells the driver its connections are
//! gone (a transport reset event).
//!
//! ```no_run
//! use vm_memory::GuestMemoryMmap;
//! use vmm_devices::virtio::vsock::Vsock;
//!
//! let vsock: Vsock<GuestMemoryMmap> = Vsock::new(3, "/run/vm0.vsock".into())?;
//! assert_eq!(vsock.guest_cid(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod device;

pub use device::{
    Vsock, VsockError, VsockState, CONN_BUF_SIZE, CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT,
    MAX_CONNECTIONS, VSOCK_QUEUE_SIZE,
};

/// The host's context id.
pub const HOST_CID: u64 = 2;

#[cfg(test)]
mod tests;
