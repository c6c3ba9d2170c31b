//! Test doubles for device tests, fuzz targets and benchmarks (the
//! `test-utils` feature): a small guest memory, a driver that lays out a
//! split queue and publishes chains ([`Driver`]), and an interrupt that
//! counts what the device signalled ([`TestInterrupt`]); for network
//! tests, a namespace of their own ([`NetNs`]) and the host's end of a TAP
//! ([`HostLink`]).
//!
//! They panic on misuse (a buffer outside their memory, say): they are
//! for tests.
//!
//! ```
//! use vmm_devices::test_utils::{context, memory, Buf, Driver};
//! use vmm_devices::virtio::rng::Rng;
//! use vmm_devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
//!
//! let mem = memory();
//! let mut driver = Driver::new(&mem, 0x1000, 16);
//! let (ctx, interrupt) = context(&mem, vec![driver.queue()], VIRTIO_F_VERSION_1);
//! let mut rng = Rng::new();
//! rng.activate(ctx).expect("test memory");
//! driver.add(&[Buf(0x10_0000, 32, true)]);
//! rng.process_queue(0);
//! assert_eq!(driver.used(0), (0, 32));
//! assert_eq!(interrupt.used_count(), 1);
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::{ActivationContext, VirtioInterrupt};

/// Guest memory of the tests: 16 MiB at 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("test memory")
}

/// Counts what the device signalled.
#[derive(Debug, Default)]
pub struct TestInterrupt {
    /// Used-buffer notifications.
    pub used: AtomicUsize,
    /// Configuration-change notifications.
    pub config: AtomicUsize,
    /// Whether the device asked for a reset.
    pub needs_reset: AtomicBool,
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_used_queue(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

impl TestInterrupt {
    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
    /// Used-buffer notifications so far.
    pub fn used_count(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf(pub u64, pub u32, pub bool);

/// A driver's view of one queue at `base` (queue structures) with `size`
/// entries: descriptor table, then the available ring, then the used ring.
///
/// It lays the rings out itself: virtio-queue 0.18's `MockSplitQueue` ends
/// its available ring `size` bytes (not entries) after the ring start, so
/// its used ring overlaps the available ring of queues above 4 entries.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    size: u16,
}

impl<'a> Driver<'a> {
    /// A driver of a `size`-entry queue whose structures start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        for addr in [avail, avail + 2, used, used + 2] {
            mem.write_obj(0u16, GuestAddress(addr))
                .expect("test memory");
        }
        Self {
            mem,
            desc,
            avail,
            used,
            next_desc: 0,
            size,
        }
    }

    /// A ready queue over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("test memory");
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("test memory");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("test memory");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("test memory");
        q.set_ready(true);
        q
    }

    /// The available ring's address.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Stores a raw descriptor at `index`.
    pub fn store(&self, index: u16, d: RawDescriptor) {
        self.mem
            .write_obj(
                d,
                GuestAddress(self.desc + 16 * u64::from(index % self.size)),
            )
            .expect("test memory");
    }

    /// Publishes a chain of `bufs` (linked with NEXT) and returns its head.
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
        // Chains are laid out contiguously; start over at 0 when one would
        // run past the table (earlier chains are consumed by then).
        let head = if usize::from(self.next_desc) + bufs.len() > usize::from(self.size) {
            0
        } else {
            self.next_desc
        };
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let idx = head + i as u16;
            self.store(
                idx,
                RawDescriptor::from(Descriptor::new(b.0, b.1, flags, (idx + 1) % self.size)),
            );
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(head);
        head
    }

    /// Writes raw descriptors at `index` and makes `head` available.
    pub fn add_raw(&mut self, index: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.store(index + i as u16, *d);
        }
        self.push_avail(head);
    }

    /// Makes `head` available without touching descriptors.
    pub fn push_avail(&mut self, head: u16) {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(self.avail + 2))
            .expect("test memory");
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("test memory");
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .expect("test memory");
    }

    /// Sets the available index directly (for hostile tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .expect("test memory");
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("test memory")
    }

    /// Used ring entry `i`: (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).expect("test memory"),
            self.mem
                .read_obj(GuestAddress(at + 4))
                .expect("test memory"),
        )
    }
}

/// An activation context over `queues`, with a test interrupt.
pub fn context(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
    features: u64,
) -> (ActivationContext<GuestMemoryMmap>, Arc<TestInterrupt>) {
    let interrupt = Arc::new(TestInterrupt::default());
    let ctx = ActivationContext {
        mem: mem.clone(),
        queues,
        interrupt: interrupt.clone(),
        acked_features: features,
    };
    (ctx, interrupt)
}

/// A network namespace of its own for a network test or benchmark, made
/// with iproute2's `ip` (which must be installed; root is needed) with `lo`
/// up, and removed on drop. A namespace of the same name left by an earlier,
/// killed run is removed first.
pub struct NetNs {
    /// Its name (under /var/run/netns): `vmmkit-<tag>-<pid>`.
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("network tests need iproute2's `ip` (apt-get install iproute2): {e}")
        });
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A namespace with `lo` up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vmmkit-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        NetNs { name }
    }

    /// A namespace with `lo` up and the TAP `tap` at `addr`/24, up.
    pub fn with_tap(tag: &str, tap: &str, addr: &str) -> NetNs {
        let ns = NetNs::new(tag);
        ns.add_tap(tap, addr);
        ns
    }

    /// Another TAP in the namespace, at `addr`/24, up.
    pub fn add_tap(&self, tap: &str, addr: &str) {
        ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// `program`, to be run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes, and
    /// TAPs a VM built there opens, belong to the namespace).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("the namespace's file");
                // SAFETY: setns on an open namespace fd; affects this thread.
                let r = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The host's end of a TAP, for network tests and benchmarks: a packet
/// socket bound to the TAP's interface, whose frames come out of the TAP's
/// descriptor, and which sees every frame written into it. Made in the
/// calling thread's network namespace (the TAP's).
pub struct HostLink {
    sock: std::os::fd::OwnedFd,
}

#[repr(C)]
struct IfReqInt {
    name: [u8; 16],
    value: i32,
    _pad: [u8; 20],
}

fn if_ioctl(ifname: &str, request: libc::c_ulong, value: i32) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if ifname.len() >= 16 {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut r = IfReqInt {
        name: [0; 16],
        value,
        _pad: [0; 20],
    };
    r.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let ctl = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the request reads one `struct ifreq` whose union starts with
    // the int given, which `r` is.
    if unsafe { libc::ioctl(ctl.as_raw_fd(), request, &mut r) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl HostLink {
    /// Sets the interface's MTU, brings it up (without ARP), and binds to
    /// it.
    pub fn up(ifname: &str, mtu: i32) -> std::io::Result<Self> {
        Self::set_mtu(ifname, mtu)?;
        if_ioctl(ifname, libc::SIOCSIFFLAGS, libc::IFF_UP | libc::IFF_NOARP)?;
        Self::bind(ifname)
    }

    /// Sets the interface's MTU.
    pub fn set_mtu(ifname: &str, mtu: i32) -> std::io::Result<()> {
        if_ioctl(ifname, libc::SIOCSIFMTU, mtu)
    }

    /// Binds to an interface as it is.
    pub fn bind(ifname: &str) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the name is
        // NUL-terminated.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        // SAFETY: as above.
        sll.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        // SAFETY: bind(2) with a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { sock })
    }

    /// Receives time out after `timeout` (`None`: they never wait).
    pub fn set_recv_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let (r, nonblock) = match timeout {
            Some(t) => {
                let tv = libc::timeval {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_usec: t.subsec_micros() as libc::suseconds_t,
                };
                // SAFETY: setsockopt with a local timeval of its size.
                let r = unsafe {
                    libc::setsockopt(
                        self.sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                (r, false)
            }
            None => (0, true),
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if nonblock {
            // SAFETY: F_GETFL/F_SETFL on our own descriptor.
            let ok = unsafe {
                let fl = libc::fcntl(self.sock.as_raw_fd(), libc::F_GETFL);
                fl >= 0
                    && libc::fcntl(self.sock.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sends `frame` out of the TAP, to whoever reads its descriptor.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: send(2) from a buffer of its length.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// The next frame written into the TAP, into `buf`.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: recv(2) into a buffer of its length.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// An Ethernet frame of `size` bytes (at least 42) carrying a UDP datagram
/// from `src` to `dst` (both to `port`), no checksums, to `dst_mac`.
pub fn udp_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], port: u16, size: usize) -> Vec<u8> {
    let size = size.max(42);
    let mut f = vec![0u8; size];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&[0x06, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = (size - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..40].copy_from_slice(&(total - 20).to_be_bytes());
    f
}
