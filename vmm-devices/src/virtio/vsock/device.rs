//! The virtio-vsock device and its connections.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ByteValued, Bytes, GuestMemoryBackend, Le32, Le64};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::HOST_CID;
use crate::host_files::{listen_unix, HostFileError};
use crate::metrics::VsockMetrics;
use crate::persist::RestoreError;
use crate::virtio::{
    decode_device_state, read_config_bytes, ActivateError, ActivationContext, QueueBudget,
    VirtioCommon, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of each queue.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// The buffer space the device offers the guest on each connection: what
/// it holds of guest data the host program has not taken yet.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Most connections at once; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most payload bytes in one packet.
const MAX_PKT_DATA: u32 = 64 * 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// How long the guest has to answer a host program's connection request
/// before the device gives up on it (the host program's socket closes).
pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to close a connection the host program ended
/// (the device sent it a shutdown) before the device resets it.
pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Device events, in [`VirtioDevice::event_fds`] order.
pub(super) const EV_HOST: usize = 0;
pub(super) const EV_KICK: usize = 1;
pub(super) const EV_TIMER: usize = 2;

/// Epoll data of the listener; others are the socket's fd.
const LISTENER: u64 = u64::MAX;

/// Why a vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest's context id is one of the reserved ones (0, 1, 2) or
    /// beyond 32 bits.
    #[error("guest CID {0} is reserved or too large: use 3 to 4294967294")]
    BadCid(u64),
    /// The Unix socket path cannot be listened on: another process serves
    /// it, something other than a socket is there, or it cannot be made.
    #[error(transparent)]
    Listen(#[from] HostFileError),
    /// An epoll instance or eventfd could not be made.
    #[error("cannot set up the device's event sources")]
    Events(#[source] io::Error),
}

/// The saved state of a [`Vsock`] (connections are not saved: a restored
/// guest is told they are gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// The host asked; the guest has not answered.
    HostRequested,
    /// Both sides may send.
    Established,
}

/// (host port, guest port).
type ConnKey = (u32, u32);

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// What the guest said of its buffer: size, and bytes it has taken.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of the guest's passed on to the host program.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest was last told it.
    fwd_cnt_told: Wrapping<u32>,
    /// Guest data the host program has not taken yet.
    pending: VecDeque<u8>,
    /// The host socket has data (or an end) the device has not read.
    readable: bool,
    /// The host program closed its side.
    host_eof: bool,
    /// The guest sends no more: shut the host's write side once `pending`
    /// is out.
    guest_done_sending: bool,
    /// The epoll events registered for the socket.
    interest: EventSet,
    /// Whether the socket is in the device's epoll set.
    registered: bool,
    /// When the device gives up waiting for the guest: to answer a host
    /// request, or to close after the host program did.
    expires: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            pending: VecDeque::new(),
            readable: false,
            host_eof: false,
            guest_done_sending: false,
            interest: EventSet::empty(),
            registered: false,
            expires: None,
        }
    }

    /// Bytes the guest has room for.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The events the device wants from the socket now.
    fn wanted(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == ConnState::Established
            && !self.readable
            && !self.host_eof
            && self.peer_credit() > 0
        {
            e |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }
}

/// A host program that connected to the device's socket and has not yet
/// said `CONNECT <port>`.
struct HostHello {
    stream: UnixStream,
}

/// A packet the device owes the guest, other than data.
#[derive(Clone, Copy, Debug)]
struct Ctl {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// A virtio-vsock device.
pub struct Vsock<M> {
    common: VirtioCommon<M>,
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    /// Socket fd to connection.
    by_fd: HashMap<RawFd, ConnKey>,
    hellos: HashMap<RawFd, HostHello>,
    ctl: VecDeque<Ctl>,
    next_port: u32,
    /// A transport reset event is owed to the driver (after a restore).
    owe_reset_event: bool,
    kick: EventFd,
    /// Fires when a connection's wait for the guest may have run out.
    timer: TimerFd,
    /// When `timer` fires, if it is armed.
    timer_at: Option<Instant>,
    metrics: Arc<VsockMetrics>,
}

impl<M> Vsock<M> {
    /// A device for guest context id `cid`, listening for host programs on
    /// the Unix socket `uds_path` (which must not exist, or be a socket
    /// nobody serves any more; it is removed when the device is dropped).
    pub fn new(cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        if !(3..=u64::from(u32::MAX - 1)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        let listener = listen_unix("vsock socket", &uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Events)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(VsockError::Events)?;
        Ok(Self {
            common: VirtioCommon::new(
                TYPE_VSOCK,
                VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
                &[VSOCK_QUEUE_SIZE; 3],
            ),
            cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            hellos: HashMap::new(),
            ctl: VecDeque::new(),
            next_port: 1 << 30,
            owe_reset_event: false,
            kick: EventFd::new(EFD_NONBLOCK).map_err(VsockError::Events)?,
            timer: TimerFd::new().map_err(|e| VsockError::Events(e.into()))?,
            timer_at: None,
            metrics: Arc::default(),
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// The Unix socket host programs connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// Closes every connection and forgets what was owed to the guest.
    fn close_all(&mut self) {
        self.metrics.conns_killed.add(self.conns.len() as u64);
        self.conns.clear();
        self.by_fd.clear();
        self.hellos.clear();
        self.ctl.clear();
        // The timer stays armed: disarming it is a system call the vCPU
        // thread (which resets and activates devices) may not make. When
        // it fires there is nothing left to expire.
        self.timer_at = None;
    }

    /// Gives the guest until `timeout` from now to move connection `key`
    /// along, then resets it.
    fn expire_in(&mut self, key: ConnKey, timeout: Duration) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let at = Instant::now() + timeout;
        c.expires = Some(at);
        if self.timer_at.is_none_or(|t| at < t) {
            self.arm_timer(at);
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        let wait = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => crate::host_warn!("virtio-vsock: cannot arm the connection timer: {e}"),
        }
    }

    /// Resets the connections whose wait for the guest ran out, and arms
    /// the timer for the next.
    fn expire_connections(&mut self) {
        let _ = self.timer.clear();
        self.timer_at = None;
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expires.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.metrics.conns_timed_out.inc();
            self.reset(key);
        }
        if let Some(next) = self.conns.values().filter_map(|c| c.expires).min() {
            self.arm_timer(next);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_fd.remove(&c.stream.as_raw_fd());
            self.metrics.conns_removed.inc();
        }
    }

    /// Drops the connection and tells the guest.
    fn reset(&mut self, key: ConnKey) {
        self.remove(key);
        self.ctl.push_back(Ctl {
            key,
            op: OP_RST,
            flags: 0,
        });
    }

    /// Registers the socket for the events the connection wants now.
    fn rearm(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted();
        if c.registered && want == c.interest {
            return;
        }
        let fd = c.stream.as_raw_fd();
        let op = if c.registered {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        self.by_fd.insert(fd, key);
        if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(want, fd as u64)) {
            crate::host_warn!("virtio-vsock: cannot watch a connection: {e}");
            return;
        }
        c.interest = want;
        c.registered = true;
    }

    fn free_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
            if !self.conns.keys().any(|&(local, _)| local == p) {
                return p;
            }
        }
    }

    /// Accepts host programs and reads their `CONNECT` lines; notes which
    /// connections have data, and writes out what waits for the host.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                crate::host_warn!("virtio-vsock: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let data = ev.data();
            if data == LISTENER {
                self.accept();
                continue;
            }
            let fd = data as RawFd;
            if self.hellos.contains_key(&fd) {
                self.read_hello(fd);
                continue;
            }
            let Some(&key) = self.by_fd.get(&fd) else {
                continue;
            };
            let set = ev.event_set();
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.readable = true;
                }
            }
            if set.contains(EventSet::OUT) {
                self.flush_to_host(key);
            }
            self.rearm(key);
        }
    }

    fn accept(&mut self) {
        loop {
            // SAFETY: accept4 on our listener, without the peer's address;
            // the new descriptor, if any, is ours.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            let accepted = if fd >= 0 {
                // SAFETY: a fresh descriptor nothing else owns.
                Ok(unsafe { UnixStream::from_raw_fd(fd) })
            } else {
                Err(io::Error::last_os_error())
            };
            match accepted {
                Ok(stream) => {
                    if self.conns.len() + self.hellos.len() >= MAX_CONNECTIONS {
                        self.metrics.conn_refused.inc();
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.hellos.insert(fd, HostHello { stream });
                        // The line may be there already.
                        self.read_hello(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::host_warn!("virtio-vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// Reads `CONNECT <port>\n` from a host program (without reading past
    /// it), and asks the guest to accept.
    fn read_hello(&mut self, fd: RawFd) {
        let Some(hello) = self.hellos.get(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        // SAFETY: recv into a local buffer of its length; MSG_PEEK leaves
        // the bytes in the socket.
        let n = unsafe {
            libc::recv(
                hello.stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            return;
        }
        let n = n.max(0) as usize;
        let line_end = buf[..n].iter().position(|&b| b == b'\n');
        let Some(end) = line_end else {
            if n == 0 || n == MAX_CONNECT_LINE {
                // Gone, or a line too long: not a vsock client.
                self.hellos.remove(&fd);
            }
            return;
        };
        let Some(mut hello) = self.hellos.remove(&fd) else {
            return;
        };
        let mut line = vec![0u8; end + 1];
        if hello.stream.read_exact(&mut line).is_err() {
            return;
        }
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            let _ = hello.stream.write_all(b"ERR bad CONNECT line\n");
            self.metrics.conn_refused.inc();
            return;
        };
        let local = self.free_port();
        let key = (local, peer_port);
        // Not watched until the guest accepts.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.conns
            .insert(key, Conn::new(hello.stream, ConnState::HostRequested));
        self.by_fd.insert(fd, key);
        self.metrics.conns_added.inc();
        self.expire_in(key, CONN_REQUEST_TIMEOUT);
        self.ctl.push_back(Ctl {
            key,
            op: OP_REQUEST,
            flags: 0,
        });
    }

    /// Writes what the guest sent and the host has not taken; shuts the
    /// host's write side once the guest is done and everything is out.
    fn flush_to_host(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.pending.is_empty() {
            let (a, _) = c.pending.as_slices();
            match c.stream.write(a) {
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.metrics.tx_write_fails.inc();
                    self.reset(key);
                    return;
                }
            }
        }
        if c.pending.is_empty() && c.guest_done_sending {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        self.maybe_credit_update(key);
    }

    /// Tells the guest about freed buffer space once enough has freed up.
    fn maybe_credit_update(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            if (c.fwd_cnt - c.fwd_cnt_told).0 >= CONN_BUF_SIZE / 4 {
                self.queue_ctl(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    fn queue_ctl(&mut self, key: ConnKey, op: u16, flags: u32) {
        // One credit update pending per connection is enough.
        if op == OP_CREDIT_UPDATE && self.ctl.iter().any(|c| c.key == key && c.op == op) {
            return;
        }
        self.ctl.push_back(Ctl { key, op, flags });
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> Vsock<M> {
    /// Handles the guest's packets.
    fn transmit(&mut self) -> bool {
        let Some(ctx) = self.common.active.as_mut() else {
            return false;
        };
        let mem = ctx.mem.clone();
        let budget = QueueBudget::for_queue(&ctx.queues[TXQ]).0;
        let mut done = 0usize;
        let mut more = false;
        let mut broken = false;
        'outer: loop {
            let Some(ctx) = self.common.active.as_mut() else {
                return false;
            };
            if ctx.queues[TXQ].disable_notification(&mem).is_err() {
                broken = true;
                break;
            }
            loop {
                if done >= budget {
                    more = true;
                    break 'outer;
                }
                let Some(ctx) = self.common.active.as_mut() else {
                    return false;
                };
                let mut chain = match ctx.queues[TXQ].iter(&mem) {
                    Ok(mut it) => match it.next() {
                        Some(c) => c,
                        None => break,
                    },
                    Err(_) => {
                        broken = true;
                        break 'outer;
                    }
                };
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => self.handle_packet(&pkt),
                    Err(e) => {
                        self.metrics.tx_malformed.inc();
                        crate::guest_warn!("virtio-vsock: dropped a malformed packet: {e}");
                    }
                }
                let Some(ctx) = self.common.active.as_mut() else {
                    return false;
                };
                if ctx.queues[TXQ].add_used(&mem, head, 0).is_err() {
                    broken = true;
                    break 'outer;
                }
                done += 1;
            }
            let Some(ctx) = self.common.active.as_mut() else {
                return false;
            };
            match ctx.queues[TXQ].enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        let Some(ctx) = self.common.active.as_mut() else {
            return false;
        };
        if done > 0 && !matches!(ctx.queues[TXQ].needs_notification(&mem), Ok(false)) {
            ctx.interrupt.signal_used_queue();
        }
        if broken {
            crate::guest_warn!(
                "virtio-vsock: the driver broke the transmit ring; the device needs a reset"
            );
            ctx.interrupt.set_needs_reset();
            return false;
        }
        more
    }

    /// One packet from the guest.
    fn handle_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        self.metrics.tx_packets_count.inc();
        let key = (pkt.dst_port(), pkt.src_port());
        let op = pkt.op();
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID || pkt.type_() != TYPE_STREAM {
            // Not for this host, or not a stream: refused (never answer a
            // reset with one).
            self.metrics.tx_malformed.inc();
            if op != OP_RST {
                self.ctl.push_back(Ctl {
                    key,
                    op: OP_RST,
                    flags: 0,
                });
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = pkt.buf_alloc();
            c.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
        }
        match op {
            OP_REQUEST => self.guest_connects(key, pkt),
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::HostRequested => {
                    c.state = ConnState::Established;
                    c.expires = None;
                    let ok = format!("OK {}\n", key.0);
                    // A few bytes on a fresh socket: written whole.
                    if c.stream.write_all(ok.as_bytes()).is_err() {
                        self.reset(key);
                    } else {
                        self.rearm(key);
                    }
                }
                _ => self.reset(key),
            },
            OP_RW => self.guest_data(key, pkt),
            OP_CREDIT_UPDATE => self.rearm(key),
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.queue_ctl(key, OP_CREDIT_UPDATE, 0);
                } else {
                    self.reset(key);
                }
            }
            OP_SHUTDOWN => {
                let flags = pkt.flags();
                match self.conns.get_mut(&key) {
                    Some(_) if flags & (SHUT_RCV | SHUT_SEND) == SHUT_RCV | SHUT_SEND => {
                        // Both directions closed: the connection ends.
                        self.reset(key);
                    }
                    Some(c) => {
                        if flags & SHUT_SEND != 0 {
                            c.guest_done_sending = true;
                            if c.pending.is_empty() {
                                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                            }
                        }
                    }
                    None => self.reset(key),
                }
            }
            OP_RST => self.remove(key),
            _ => {
                self.metrics.tx_malformed.inc();
                self.reset(key);
            }
        }
    }

    fn guest_connects<B: BitmapSlice>(&mut self, key: ConnKey, pkt: &VsockPacket<'_, B>) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.metrics.conn_refused.inc();
            self.ctl.push_back(Ctl {
                key,
                op: OP_RST,
                flags: 0,
            });
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut c = Conn::new(stream, ConnState::Established);
                c.peer_buf_alloc = pkt.buf_alloc();
                c.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
                self.conns.insert(key, c);
                self.metrics.conns_added.inc();
                self.rearm(key);
                self.ctl.push_back(Ctl {
                    key,
                    op: OP_RESPONSE,
                    flags: 0,
                });
            }
            Err(_) => {
                // Nobody listens on that port.
                self.metrics.conn_refused.inc();
                self.ctl.push_back(Ctl {
                    key,
                    op: OP_RST,
                    flags: 0,
                });
            }
        }
    }

    fn guest_data<B: BitmapSlice>(&mut self, key: ConnKey, pkt: &VsockPacket<'_, B>) {
        let Some(c) = self.conns.get_mut(&key) else {
            self.reset(key);
            return;
        };
        if c.state != ConnState::Established {
            self.reset(key);
            return;
        }
        let Some(data) = pkt.data_slice() else {
            return;
        };
        let len = data.len();
        self.metrics.tx_bytes_count.add(len as u64);
        if c.pending.len() + len > CONN_BUF_SIZE as usize {
            // More than the credit the device gave: the guest lied.
            crate::guest_warn!(
                "virtio-vsock: the guest sent past its credit on port {}; connection reset",
                key.0
            );
            self.metrics.credit_violations.inc();
            self.reset(key);
            return;
        }
        let mut written = 0usize;
        if c.pending.is_empty() {
            let ptr = data.ptr_guard();
            // SAFETY: a slice of guest memory of `len` bytes, mapped while
            // the packet borrows it; send(2) only reads it. MSG_NOSIGNAL: a
            // host program that went away is an error, not a SIGPIPE.
            let r = unsafe {
                libc::send(
                    c.stream.as_raw_fd(),
                    ptr.as_ptr().cast(),
                    len,
                    libc::MSG_NOSIGNAL,
                )
            };
            if r >= 0 {
                written = r as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                self.metrics.tx_write_fails.inc();
                self.reset(key);
                return;
            }
        }
        c.fwd_cnt += Wrapping(written as u32);
        if written < len {
            let mut rest = vec![0u8; len - written];
            if data.read_slice(&mut rest, written).is_ok() {
                c.pending.extend(rest);
            }
        }
        self.rearm(key);
        self.maybe_credit_update(key);
    }

    /// Fills receive buffers: control packets first, then host data for
    /// connections that have some and credit for it.
    fn receive(&mut self) {
        self.poll_host();
        let Some(ctx) = self.common.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let budget = QueueBudget::for_queue(&ctx.queues[RXQ]).0;
        let mut used = 0usize;
        let mut broken = false;
        let mut keys: VecDeque<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.readable && c.state == ConnState::Established)
            .map(|(k, _)| *k)
            .collect();
        if ctx.queues[RXQ].disable_notification(&mem).is_err() {
            broken = true;
        }
        while !broken && used < budget {
            // What to send next.
            let next = if let Some(ctl) = self.ctl.front().copied() {
                Some((ctl.key, Some(ctl)))
            } else {
                keys.pop_front().map(|k| (k, None))
            };
            let Some((key, ctl)) = next else {
                break;
            };
            if ctl.is_none() {
                let Some(c) = self.conns.get(&key) else {
                    continue;
                };
                if !c.readable || c.peer_credit() == 0 || c.state != ConnState::Established {
                    self.rearm(key);
                    continue;
                }
            }
            let Some(ctx) = self.common.active.as_mut() else {
                return;
            };
            let queue = &mut ctx.queues[RXQ];
            let mut chain = match queue.iter(&mem) {
                Ok(mut it) => match it.next() {
                    Some(c) => c,
                    None => {
                        // No room: ask for a notification when there is.
                        match queue.enable_notification(&mem) {
                            Ok(true) => {
                                let _ = queue.disable_notification(&mem);
                                if ctl.is_none() {
                                    keys.push_front(key);
                                }
                                continue;
                            }
                            Ok(false) => {
                                self.metrics.rx_no_buffers.inc();
                                break;
                            }
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                },
                Err(_) => {
                    broken = true;
                    break;
                }
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    crate::guest_warn!(
                        "virtio-vsock: a receive buffer is unusable: {e}; the device needs a reset"
                    );
                    let _ = queue.add_used(&mem, head, 0);
                    broken = true;
                    break;
                }
            };
            let len = match ctl {
                Some(ctl) => {
                    self.ctl.pop_front();
                    self.fill_header(&mut pkt, ctl.key, ctl.op, ctl.flags);
                    0
                }
                None => match self.read_host_data(key, &mut pkt) {
                    Some(n) => n,
                    None => {
                        // Nothing after all: the buffer goes back.
                        let Some(ctx) = self.common.active.as_mut() else {
                            return;
                        };
                        ctx.queues[RXQ].go_to_previous_position();
                        continue;
                    }
                },
            };
            let Some(ctx) = self.common.active.as_mut() else {
                return;
            };
            if ctx.queues[RXQ]
                .add_used(&mem, head, (PKT_HEADER_SIZE + len) as u32)
                .is_err()
            {
                broken = true;
                break;
            }
            self.metrics.rx_packets_count.inc();
            used += 1;
            if ctl.is_none() {
                // More may be there: serve the others first.
                if self.conns.get(&key).is_some_and(|c| c.readable) {
                    keys.push_back(key);
                }
            }
        }
        if used >= budget {
            let _ = self.kick.write(1);
        }
        let Some(ctx) = self.common.active.as_mut() else {
            return;
        };
        if used > 0 && !matches!(ctx.queues[RXQ].needs_notification(&mem), Ok(false)) {
            ctx.interrupt.signal_used_queue();
        }
        if broken {
            ctx.interrupt.set_needs_reset();
        }
    }

    fn fill_header<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
        key: ConnKey,
        op: u16,
        flags: u32,
    ) {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.fwd_cnt_told = c.fwd_cnt;
                (CONN_BUF_SIZE, c.fwd_cnt.0)
            }
            None => (0, 0),
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.cid)
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(0)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Reads host data for connection `key` straight into the packet's
    /// buffer. `None`: nothing there (the socket would block).
    fn read_host_data<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<usize> {
        let c = self.conns.get_mut(&key)?;
        let room = pkt.data_slice().map_or(0, |d| d.len());
        let want = room.min(c.peer_credit() as usize);
        if want == 0 {
            return None;
        }
        let data = pkt.data_slice()?;
        let ptr = data.ptr_guard_mut();
        // SAFETY: a slice of guest memory of at least `want` bytes, mapped
        // while the packet borrows it.
        let r = unsafe { libc::read(c.stream.as_raw_fd(), ptr.as_ptr().cast(), want) };
        match r {
            r if r > 0 => {
                let n = r as usize;
                data.bitmap().mark_dirty(0, n);
                c.rx_cnt += Wrapping(n as u32);
                self.metrics.rx_bytes_count.add(n as u64);
                self.fill_header(pkt, key, OP_RW, 0);
                pkt.set_len(n as u32);
                Some(n)
            }
            0 => {
                // The host program closed its side: the guest gets no more.
                c.readable = false;
                c.host_eof = true;
                self.fill_header(pkt, key, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND);
                self.expire_in(key, CONN_SHUTDOWN_TIMEOUT);
                Some(0)
            }
            _ if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                self.rearm(key);
                None
            }
            _ => {
                self.metrics.rx_read_fails.inc();
                self.remove(key);
                self.fill_header(pkt, key, OP_RST, 0);
                Some(0)
            }
        }
    }

    /// Sends the transport reset event if one is owed and the driver has
    /// posted an event buffer.
    fn send_reset_event(&mut self) {
        if !self.owe_reset_event {
            return;
        }
        let Some(ctx) = self.common.active.as_mut() else {
            return;
        };
        let mem = &ctx.mem;
        let queue = &mut ctx.queues[EVQ];
        let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) else {
            return;
        };
        let head = chain.head_index();
        let ok = chain.writer(mem).ok().is_some_and(|mut w| {
            w.write_all(Le32::from(EVENT_TRANSPORT_RESET).as_slice())
                .is_ok()
        });
        let _ = queue.add_used(mem, head, if ok { 4 } else { 0 });
        ctx.interrupt.signal_used_queue();
        self.owe_reset_event = false;
    }
}

/// A non-blocking stream connected to the Unix socket at `path` (made
/// non-blocking from the start: no `ioctl` afterwards).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: connect(2) with a sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl<M> Drop for Vsock<M> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> VirtioDevice<M> for Vsock<M> {
    fn common(&self) -> &VirtioCommon<M> {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon<M> {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(Le64::from(self.cid).as_slice(), offset, data);
    }

    fn activate(&mut self, ctx: ActivationContext<M>) -> Result<(), ActivateError> {
        self.close_all();
        self.common.activate(ctx)?;
        self.send_reset_event();
        Ok(())
    }

    /// Closes every connection: the host programs see their sockets end.
    fn reset(&mut self) -> Option<ActivationContext<M>> {
        self.close_all();
        self.common.reset()
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RXQ => {
                self.receive();
                false
            }
            TXQ => {
                let more = self.transmit();
                // Answers and freed credit go out now.
                self.receive();
                more
            }
            EVQ => {
                self.send_reset_event();
                false
            }
            _ => false,
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![
            self.epoll.as_raw_fd(),
            self.kick.as_raw_fd(),
            self.timer.as_raw_fd(),
        ]
    }

    fn event_edge_triggered(&self, index: usize) -> bool {
        index == EV_HOST
    }

    fn process_event(&mut self, index: usize) {
        if index == EV_KICK {
            let _ = self.kick.read();
            if self.transmit() {
                let _ = self.kick.write(1);
            }
        }
        if index == EV_TIMER {
            self.expire_connections();
        }
        if self.common.is_active() {
            self.receive();
        } else {
            // Nobody to talk to: still take host programs off the backlog
            // (they wait for the guest's driver).
            self.poll_host();
        }
    }

    fn save_device_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(VsockState {
            guest_cid: self.cid,
        })
        .ok()
    }

    /// Checks the context id; the restored driver is told its connections
    /// are gone once the device runs.
    fn restore_device_state(
        &mut self,
        state: Option<&serde_json::Value>,
    ) -> Result<(), RestoreError> {
        let st: VsockState = decode_device_state("virtio-vsock", state)?;
        if st.guest_cid != self.cid {
            return Err(RestoreError::mismatch("guest CID", st.guest_cid, self.cid));
        }
        self.owe_reset_event = true;
        Ok(())
    }
}
