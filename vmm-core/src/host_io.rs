//! The host side of guest consoles: output that never blocks the guest, and
//! a pseudo-terminal for COM1.
//!
//! A guest writes its console on a vCPU thread (COM1) or the device event
//! loop (virtio-console). If the host end stalls (a paused pager, a full
//! pipe, a stalled terminal), a direct `write` would stall that thread, and
//! with it every stop path that waits for it. [`BufferedOutput`] puts the
//! bytes in a bounded buffer instead; a thread of its own writes them out,
//! and what does not fit is dropped and counted.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vmm_devices::host_warn;

/// Bytes of guest output held for a stalled host writer before the rest is
/// dropped.
pub const OUTPUT_BUFFER_SIZE: usize = 256 * 1024;

#[derive(Default)]
struct Pending {
    data: VecDeque<u8>,
    closed: bool,
    writing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    written: Condvar,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// A `Write` that never blocks: bytes go into a buffer of at most
/// [`OUTPUT_BUFFER_SIZE`] bytes, written to the real output by
/// [`OutputPump::run`] on a thread of its own. Bytes that do not fit are
/// dropped and counted.
///
/// ```
/// use std::io::Write;
/// use vmm_core::host_io::BufferedOutput;
///
/// let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
/// struct To(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
/// impl Write for To {
///     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
///         self.0.lock().unwrap().extend_from_slice(b);
///         Ok(b.len())
///     }
///     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
/// }
/// let (mut out, pump) = BufferedOutput::new("example", Box::new(To(sink.clone())));
/// out.write_all(b"hello")?;
/// drop(out); // the pump ends once everything is out
/// pump.run();
/// assert_eq!(&*sink.lock().unwrap(), b"hello");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct BufferedOutput {
    shared: Arc<Shared>,
}

/// The writing end of a [`BufferedOutput`]: run it on a thread of its own.
pub struct OutputPump {
    name: &'static str,
    shared: Arc<Shared>,
    out: Box<dyn Write + Send>,
}

impl BufferedOutput {
    /// A buffer in front of `out`, and the pump that writes to it. `name`
    /// names the output in warnings.
    pub fn new(name: &'static str, out: Box<dyn Write + Send>) -> (Self, OutputPump) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            ready: Condvar::new(),
            written: Condvar::new(),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        (
            Self {
                shared: shared.clone(),
            },
            OutputPump { name, shared, out },
        )
    }

    /// How the output fares: bytes lost, and a bounded wait for the rest
    /// to be written; usable after the output is gone.
    pub fn status(&self) -> OutputStatus {
        OutputStatus(self.shared.clone())
    }
}

/// What became of a [`BufferedOutput`]'s bytes.
#[derive(Clone)]
pub struct OutputStatus(Arc<Shared>);

impl OutputStatus {
    /// Bytes lost so far (dropped for want of room, or refused by the host
    /// writer).
    pub fn lost_bytes(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed) + self.0.failed.load(Ordering::Relaxed)
    }

    /// Waits until every buffered byte is written, at most `timeout`;
    /// returns whether it was. What is still pending then is discarded and
    /// counted as lost.
    pub fn wait_written(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let Ok(mut p) = self.0.pending.lock() else {
            return false;
        };
        while !p.data.is_empty() || p.writing {
            let now = std::time::Instant::now();
            if now >= deadline {
                self.0
                    .dropped
                    .fetch_add(p.data.len() as u64, Ordering::Relaxed);
                p.data.clear();
                return false;
            }
            p = match self.0.written.wait_timeout(p, deadline - now) {
                Ok((p, _)) => p,
                Err(_) => return false,
            };
        }
        true
    }
}

impl Write for BufferedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Ok(mut p) = self.shared.pending.lock() else {
            return Ok(buf.len());
        };
        let room = OUTPUT_BUFFER_SIZE.saturating_sub(p.data.len());
        let taken = room.min(buf.len());
        p.data.extend(&buf[..taken]);
        drop(p);
        if taken < buf.len() {
            self.shared
                .dropped
                .fetch_add((buf.len() - taken) as u64, Ordering::Relaxed);
        }
        if taken > 0 {
            self.shared.ready.notify_one();
        }
        // The guest is never told: its output went where output goes.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BufferedOutput {
    fn drop(&mut self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.closed = true;
        }
        self.shared.ready.notify_one();
    }
}

impl OutputPump {
    /// Writes buffered bytes out until the [`BufferedOutput`] is dropped and
    /// everything is written. A write error drops what was pending, warns
    /// (rate limited) and goes on.
    pub fn run(mut self) {
        let mut chunk = Vec::with_capacity(16 * 1024);
        loop {
            {
                let Ok(mut p) = self.shared.pending.lock() else {
                    return;
                };
                while p.data.is_empty() && !p.closed {
                    p = match self.shared.ready.wait(p) {
                        Ok(p) => p,
                        Err(_) => return,
                    };
                }
                if p.data.is_empty() {
                    return;
                }
                let n = p.data.len().min(chunk.capacity());
                chunk.clear();
                chunk.extend(p.data.drain(..n));
                p.writing = true;
            }
            if let Err(e) = self.out.write_all(&chunk).and_then(|()| self.out.flush()) {
                self.shared
                    .failed
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                host_warn!(
                    "{}: {} bytes of guest output lost: {e}",
                    self.name,
                    chunk.len()
                );
            }
            if let Ok(mut p) = self.shared.pending.lock() {
                p.writing = false;
            }
            self.shared.written.notify_all();
        }
    }
}

/// A pseudo-terminal for a guest console: the VMM holds the master; a user
/// attaches to the slave (`screen /dev/pts/N`). The slave is kept open by
/// the VMM too, so that output is buffered (and input waits) while nobody
/// is attached, instead of failing.
pub struct Pty {
    /// The master side: read for guest input, write for guest output.
    pub master: File,
    /// The slave side, held open.
    pub slave: File,
    /// The slave's path, for the user.
    pub path: PathBuf,
}

impl Pty {
    /// Opens a new pseudo-terminal in raw mode (no echo, no line editing,
    /// bytes as they are).
    pub fn open() -> io::Result<Self> {
        // SAFETY: posix_openpt has no memory arguments; the result is
        // checked.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `master` is a new descriptor nobody else owns.
        let master = unsafe { File::from_raw_fd(master) };
        // SAFETY: grantpt/unlockpt on our master descriptor.
        if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
            // SAFETY: as above.
            || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes at most `name.len()` bytes into `name`.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open(&path)?;
        set_raw(slave.as_raw_fd())?;
        Ok(Self {
            master,
            slave,
            path: PathBuf::from(path),
        })
    }
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NOCTTY | libc::O_CLOEXEC)
    }
}

/// Puts the terminal on `fd` in raw mode.
pub fn set_raw(fd: i32) -> io::Result<()> {
    let mut t = get_termios(fd)?;
    // SAFETY: cfmakeraw edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    set_termios(fd, &t)
}

/// The terminal settings of `fd`.
pub fn get_termios(fd: i32) -> io::Result<libc::termios> {
    // SAFETY: an all-zero termios is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into `t`, a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// Applies terminal settings to `fd`.
pub fn set_termios(fd: i32, t: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr reads the valid termios `t`.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A writer that blocks until told.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_host_writer_never_blocks_the_guest_and_overflow_is_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (mut out, pump) =
            BufferedOutput::new("test", Box::new(Stalled(gate.clone(), got.clone())));
        let status = out.status();
        let t = std::thread::spawn(move || pump.run());
        // Far more than the buffer, written while the host end is stalled.
        for _ in 0..(OUTPUT_BUFFER_SIZE / 1024) * 3 {
            out.write_all(&[b'x'; 1024]).unwrap();
        }
        assert!(
            status.lost_bytes() >= OUTPUT_BUFFER_SIZE as u64,
            "{}",
            status.lost_bytes()
        );
        assert!(
            !status.wait_written(std::time::Duration::from_millis(50)),
            "the wait is bounded"
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(out);
        t.join().unwrap();
        let written = got.lock().unwrap().len() as u64;
        assert_eq!(
            written + status.lost_bytes(),
            3 * OUTPUT_BUFFER_SIZE as u64,
            "every byte written or counted"
        );
    }

    #[test]
    fn a_pty_carries_bytes_both_ways_raw() {
        let mut pty = Pty::open().unwrap();
        assert!(pty.path.starts_with("/dev/pts"));
        pty.master.write_all(b"a\nb").unwrap();
        let mut buf = [0u8; 3];
        pty.slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a\nb", "no newline translation");
        pty.slave.write_all(b"\x03").unwrap();
        let mut one = [0u8; 1];
        pty.master.read_exact(&mut one).unwrap();
        assert_eq!(one, [3], "Ctrl-C is a byte, not a signal");
    }
}
