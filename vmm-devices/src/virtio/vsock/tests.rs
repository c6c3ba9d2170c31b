//! virtio-vsock against real Unix sockets: a test driver plays the guest.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{EV_HOST, EV_KICK, EV_TIMER};
use super::*;
use crate::host_files::HostFileError;
use crate::test_utils::{context, memory, Buf, Driver, TestInterrupt};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const EVQ: u64 = 0xf000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUF: u64 = 0x80_0000;
const RX_BUF: u32 = 4096 + 44;
const CID: u64 = 3;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;

/// A packet header's fields, as the tests read and write them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn guest(src_port: u32, dst_port: u32, op: u16) -> Self {
        Hdr {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: 1,
            op,
            buf_alloc: 64 * 1024,
            ..Hdr::default()
        }
    }

    fn bytes(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16::from_le_bytes(b[28..30].try_into().unwrap()),
            op: u16::from_le_bytes(b[30..32].try_into().unwrap()),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

struct Setup<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Vsock<GuestMemoryMmap>,
    rx: Driver<'a>,
    tx: Driver<'a>,
    ev: Driver<'a>,
    intr: Arc<TestInterrupt>,
    path: PathBuf,
    /// Receive entries read so far.
    seen: u16,
    tx_slot: u64,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(mem: &GuestMemoryMmap) -> Setup<'_> {
    let dir = std::env::temp_dir().join(format!(
        "vmm-vsock-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let mut dev = Vsock::new(CID, path.clone()).unwrap();
    let rx = Driver::new(mem, RXQ, 64);
    let tx = Driver::new(mem, TXQ, 64);
    let ev = Driver::new(mem, EVQ, 4);
    let (ctx, intr) = context(
        mem,
        vec![rx.queue(), tx.queue(), ev.queue()],
        VIRTIO_F_VERSION_1,
    );
    dev.activate(ctx).unwrap();
    let mut s = Setup {
        mem,
        dev,
        rx,
        tx,
        ev,
        intr,
        path,
        seen: 0,
        tx_slot: 0,
        _dir: TempDir(dir),
    };
    for i in 0..32 {
        s.rx.add(&[Buf(RX_BUFS + i * 0x2000, RX_BUF, true)]);
    }
    s
}

impl Setup<'_> {
    /// Sends a packet from the guest (header and data in one chain).
    fn send(&mut self, h: Hdr, data: &[u8]) {
        let at = TX_BUF + (self.tx_slot % 32) * 0x1_1000;
        self.tx_slot += 1;
        let mut h = h;
        h.len = data.len() as u32;
        self.mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
        self.mem.write_slice(data, GuestAddress(at + 44)).unwrap();
        if data.is_empty() {
            self.tx.add(&[Buf(at, 44, false)]);
        } else {
            self.tx
                .add(&[Buf(at, 44, false), Buf(at + 44, data.len() as u32, false)]);
        }
        self.dev.process_queue(1);
    }

    /// The packets the device put in receive buffers since the last call,
    /// each buffer posted again.
    fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let mut out = Vec::new();
        while self.seen != self.rx.used_idx() {
            let (head, len) = self.rx.used(self.seen);
            self.seen = self.seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(head) * 0x2000;
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let h = Hdr::parse(&b);
            assert_eq!(
                len as usize,
                44 + h.len as usize,
                "used length = header + data"
            );
            out.push((h, b[44..].to_vec()));
            self.rx.add(&[Buf(addr, RX_BUF, true)]);
        }
        out
    }

    fn host_event(&mut self) {
        self.dev.process_event(EV_HOST);
    }

    /// Waits (at most `limit`) for the device's connection timer to fire,
    /// then lets the device handle it. Returns how long it took.
    fn timer_event(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        let fd: RawFd = self.dev.event_fds()[EV_TIMER];
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
        assert_eq!(n, 1, "the connection timer did not fire within {limit:?}");
        self.dev.process_event(EV_TIMER);
        start.elapsed()
    }
}

fn ops(pkts: &[(Hdr, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn a_guest_connection_reaches_the_port_socket_and_data_flows_both_ways() {
    let mem = memory();
    let mut s = setup(&mem);
    let listener = UnixListener::bind(format!("{}_52", s.path.display())).unwrap();
    s.send(Hdr::guest(1000, 52, OP_REQUEST), &[]);
    let got = s.received();
    assert_eq!(ops(&got), [OP_RESPONSE]);
    let h = got[0].0;
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, CID, 52, 1000)
    );
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
    let (mut host, _) = listener.accept().unwrap();
    s.send(Hdr::guest(1000, 52, OP_RW), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    host.write_all(b"hello guest").unwrap();
    s.host_event();
    let got = s.received();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!(got[0].0.fwd_cnt, 10, "the device counts what it passed on");
    // The host closes: the guest is told neither side sends any more.
    drop(host);
    s.host_event();
    let got = s.received();
    assert_eq!(ops(&got), [OP_SHUTDOWN]);
    assert_eq!(got[0].0.flags, 3);
    s.send(Hdr::guest(1000, 52, OP_RST), &[]);
    assert_eq!(s.dev.connections(), 0);
    let m = s.dev.metrics();
    assert_eq!((m.conns_added.get(), m.conns_removed.get()), (1, 1));
}

#[test]
fn a_host_program_connects_with_connect_and_gets_ok() {
    let mem = memory();
    let mut s = setup(&mem);
    let mut host = UnixStream::connect(&s.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The data right after the line stays for the connection.
    host.write_all(b"CONNECT 1234\nearly").unwrap();
    s.host_event();
    let got = s.received();
    assert_eq!(ops(&got), [OP_REQUEST]);
    let req = got[0].0;
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= 1 << 30, "a host port the device picked");
    let mut resp = Hdr::guest(1234, req.src_port, OP_RESPONSE);
    resp.buf_alloc = 4096;
    s.send(resp, &[]);
    let mut line = [0u8; 64];
    let n = host.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    s.host_event();
    let got = s.received();
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"early");
    s.send(Hdr::guest(1234, req.src_port, OP_RW), b"echo");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"echo");
}

#[test]
fn bad_connect_lines_and_absent_ports_are_refused() {
    let mem = memory();
    let mut s = setup(&mem);
    let mut host = UnixStream::connect(&s.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"HELLO 1\n").unwrap();
    s.host_event();
    assert!(s.received().is_empty());
    let mut buf = [0u8; 64];
    let n = host.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"ERR"));
    // A line that never ends.
    let mut host = UnixStream::connect(&s.path).unwrap();
    host.write_all(&[b'x'; 64]).unwrap();
    s.host_event();
    assert!(s.received().is_empty());
    // Nobody listens on port 9.
    s.send(Hdr::guest(1000, 9, OP_REQUEST), &[]);
    assert_eq!(ops(&s.received()), [OP_RST]);
    // Not addressed to the host, or not a stream.
    let mut h = Hdr::guest(1000, 52, OP_REQUEST);
    h.dst_cid = 7;
    s.send(h, &[]);
    let mut h = Hdr::guest(1000, 52, OP_REQUEST);
    h.type_ = 2;
    s.send(h, &[]);
    // Data on no connection.
    s.send(Hdr::guest(1000, 52, OP_RW), b"x");
    assert_eq!(ops(&s.received()), [OP_RST, OP_RST, OP_RST]);
    assert_eq!(s.dev.connections(), 0);
    assert!(!s.intr.needs_reset());
}

#[test]
fn the_device_never_sends_past_the_guests_credit() {
    let mem = memory();
    let mut s = setup(&mem);
    let listener = UnixListener::bind(format!("{}_52", s.path.display())).unwrap();
    let mut req = Hdr::guest(1000, 52, OP_REQUEST);
    req.buf_alloc = 6000;
    s.send(req, &[]);
    s.received();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 10000]).unwrap();
    s.host_event();
    let got = s.received();
    let sent: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(sent, 6000, "exactly the guest's buffer");
    // The guest takes 5000 bytes: 5000 more may come.
    let mut upd = Hdr::guest(1000, 52, OP_CREDIT_UPDATE);
    upd.buf_alloc = 6000;
    upd.fwd_cnt = 5000;
    s.send(upd, &[]);
    let got = s.received();
    let sent: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(sent, 4000, "the rest of the host's 10000");
}

#[test]
fn a_guest_that_sends_past_its_credit_is_reset() {
    let mem = memory();
    let mut s = setup(&mem);
    let listener = UnixListener::bind(format!("{}_52", s.path.display())).unwrap();
    s.send(Hdr::guest(1000, 52, OP_REQUEST), &[]);
    s.received();
    // The host never reads: once its socket is full, the device holds at
    // most its advertised buffer.
    let (_host, _) = listener.accept().unwrap();
    let chunk = vec![1u8; 60 * 1024];
    let mut reset = false;
    for _ in 0..40 {
        s.send(Hdr::guest(1000, 52, OP_RW), &chunk);
        if ops(&s.received()).contains(&OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the credit lie was caught");
    assert_eq!(s.dev.metrics().credit_violations.get(), 1);
    assert_eq!(s.dev.connections(), 0);
}

#[test]
fn a_device_reset_closes_every_connection_and_a_restore_tells_the_driver() {
    let mem = memory();
    let mut s = setup(&mem);
    let listener = UnixListener::bind(format!("{}_52", s.path.display())).unwrap();
    s.send(Hdr::guest(1000, 52, OP_REQUEST), &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(s.dev.connections(), 1);
    s.dev.reset();
    assert_eq!(s.dev.connections(), 0);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0, "the host sees the end");
    // A restored device owes the driver a transport reset event.
    let st = s.dev.save_device_state();
    let mut other = Vsock::<GuestMemoryMmap>::new(CID, s.path.with_extension("2")).unwrap();
    other.restore_device_state(st.as_ref()).unwrap();
    let wrong = Vsock::<GuestMemoryMmap>::new(4, s.path.with_extension("3")).unwrap();
    let mut wrong = wrong;
    assert!(wrong.restore_device_state(st.as_ref()).is_err());
    s.ev.add(&[Buf(0x20_0000, 4, true)]);
    let (ctx, _) = context(
        &mem,
        vec![s.rx.queue(), s.tx.queue(), s.ev.queue()],
        VIRTIO_F_VERSION_1,
    );
    other.activate(ctx).unwrap();
    assert_eq!(s.ev.used_idx(), 1);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(),
        0,
        "TRANSPORT_RESET"
    );
    let _ = EV_KICK;
}

#[test]
fn a_host_request_the_guest_never_answers_is_given_up_in_time() {
    let mem = memory();
    let mut s = setup(&mem);
    let mut ignored = UnixStream::connect(&s.path).unwrap();
    let mut answered = UnixStream::connect(&s.path).unwrap();
    ignored.write_all(b"CONNECT 77\n").unwrap();
    answered.write_all(b"CONNECT 78\n").unwrap();
    s.host_event();
    let got = s.received();
    assert_eq!(ops(&got), [OP_REQUEST, OP_REQUEST]);
    let to = |port: u32| got.iter().find(|(h, _)| h.dst_port == port).unwrap().0;
    let (ignored_req, answered_req) = (to(77), to(78));
    s.send(Hdr::guest(78, answered_req.src_port, OP_RESPONSE), &[]);
    let waited = s.timer_event(CONN_REQUEST_TIMEOUT * 2);
    assert!(waited >= CONN_REQUEST_TIMEOUT - Duration::from_millis(100));
    // The guest is told the request is withdrawn; the host program's
    // socket ends without an OK.
    let got = s.received();
    assert_eq!(ops(&got), [OP_RST]);
    assert_eq!(
        (got[0].0.src_port, got[0].0.dst_port),
        (ignored_req.src_port, 77)
    );
    ignored
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut rest = Vec::new();
    ignored.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // The answered one lives on.
    assert_eq!(s.dev.connections(), 1);
    assert_eq!(s.dev.metrics().conns_timed_out.get(), 1);
    answered.write_all(b"still here").unwrap();
    s.host_event();
    let got = s.received();
    assert_eq!(
        got.last().map(|(_, d)| d.as_slice()),
        Some(&b"still here"[..])
    );
}

#[test]
fn a_guest_that_never_closes_after_the_host_did_is_reset() {
    let mem = memory();
    let mut s = setup(&mem);
    let listener = UnixListener::bind(format!("{}_52", s.path.display())).unwrap();
    s.send(Hdr::guest(1000, 52, OP_REQUEST), &[]);
    s.received();
    let (host, _) = listener.accept().unwrap();
    drop(host);
    s.host_event();
    assert_eq!(ops(&s.received()), [OP_SHUTDOWN]);
    // The guest neither resets nor shuts down its side.
    s.timer_event(CONN_SHUTDOWN_TIMEOUT * 2);
    assert_eq!(ops(&s.received()), [OP_RST]);
    assert_eq!(s.dev.connections(), 0);
    assert_eq!(s.dev.metrics().conns_timed_out.get(), 1);
}

#[test]
fn the_socket_path_is_checked_and_removed_with_the_device() {
    let dir = std::env::temp_dir().join(format!("vmm-vsock-path-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("v.sock");
    let _ = std::fs::remove_file(&path);
    assert!(matches!(
        Vsock::<GuestMemoryMmap>::new(2, path.clone()),
        Err(VsockError::BadCid(2))
    ));
    // A socket whose process is gone is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::<GuestMemoryMmap>::new(3, path.clone()).unwrap();
    // A live one (another VMM's) is not.
    assert!(matches!(
        Vsock::<GuestMemoryMmap>::new(3, path.clone()),
        Err(VsockError::Listen(HostFileError::SocketInUse { .. }))
    ));
    drop(dev);
    assert!(!path.exists());
    // Nor is a file that is not a socket, which stays as it was.
    std::fs::write(&path, b"data").unwrap();
    let err = Vsock::<GuestMemoryMmap>::new(3, path.clone())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("is a regular file, not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    let _ = std::fs::remove_dir_all(&dir);
}
