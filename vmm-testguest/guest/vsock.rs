//! Scenarios on the virtio-vsock device: `vsock` (connects to a host
//! listener on `testguest.vsock_port`, default 52, sends a message and
//! checks the echo; then listens on `testguest.vsock_listen`, default 1234,
//! accepts the host's connection and echoes what it sends until the host
//! shuts it down) and `vsock-bench` (streams `testguest.bench_iters` 4 KiB
//! packets to the host listener, 16 made available at a time, and reads as
//! many back, timed).

use crate::bootinfo::BootInfo;
use crate::virtio::{
    device_type, dma_alloc, dma_fits, find_devices, Device, DriverError, Mode, Queue, DESC_F_WRITE,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::{EXIT_FAILED, EXIT_OK};

const TYPE_VSOCK: u32 = 19;
const HOST_CID: u64 = 2;
const HDR: u64 = 44;
const DATA: u64 = 4096;
const BUF: u64 = HDR + DATA;
const RX_BUFS: u16 = 32;
/// The buffer space this driver offers the host on a connection.
const BUF_ALLOC: u32 = 64 * 1024;
/// Packets `vsock-bench` makes available at once (as a kernel driver
/// queues a socket's packets and notifies once).
const TX_BATCH: usize = 16;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

/// About 0.2 s of TSC cycles on these machines.
const TICK: u64 = 1 << 29;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: DMA memory from `dma_alloc`, identity mapped, user accessible.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

fn wr<T>(addr: u64, v: T) {
    // SAFETY: as for `rd`.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

/// A packet header.
#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn write(&self, at: u64) {
        wr(at, self.src_cid);
        wr(at + 8, self.dst_cid);
        wr(at + 16, self.src_port);
        wr(at + 20, self.dst_port);
        wr(at + 24, self.len);
        wr(at + 28, 1u16); // stream
        wr(at + 30, self.op);
        wr(at + 32, self.flags);
        wr(at + 36, self.buf_alloc);
        wr(at + 40, self.fwd_cnt);
    }

    fn read(at: u64) -> Hdr {
        Hdr {
            src_cid: rd(at),
            dst_cid: rd(at + 8),
            src_port: rd(at + 16),
            dst_port: rd(at + 20),
            len: rd(at + 24),
            op: rd(at + 30),
            flags: rd(at + 32),
            buf_alloc: rd(at + 36),
            fwd_cnt: rd(at + 40),
        }
    }
}

/// One connection's counters.
#[derive(Clone, Copy, Default)]
struct Conn {
    local: u32,
    peer: u32,
    /// Bytes sent, and what the host said of its buffer.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes taken from the host.
    fwd_cnt: u32,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A received packet: header and where its data is.
struct Pkt {
    hdr: Hdr,
    data: u64,
    head: u16,
}

struct Vsock {
    dev: Device,
    rxq: Queue,
    txq: Queue,
    rx_base: u64,
    tx: u64,
    /// `TX_BATCH` packet buffers for `stream_out`.
    tx_batch: u64,
    cid: u64,
}

impl Vsock {
    fn up(boot: &BootInfo) -> Result<Vsock, DriverError> {
        if !dma_fits(boot.ram_top) {
            return Err("needs at least 6 MiB of RAM");
        }
        let (entries, n) = find_devices(boot.cmdline);
        let e = entries[..n].iter().flatten().find(|e| device_type(e) == TYPE_VSOCK).ok_or("no vsock device found")?;
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, Mode::Poll)?;
        let mut rxq = dev.queue(0)?;
        let txq = dev.queue(1)?;
        let mut evq = dev.queue(2)?;
        let cid = dev.config64(0);
        let rx_base = dma_alloc(BUF * u64::from(RX_BUFS), 4096).ok_or("out of DMA memory")?;
        let tx = dma_alloc(BUF, 64).ok_or("out of DMA memory")?;
        let tx_batch = dma_alloc(BUF * TX_BATCH as u64, 64).ok_or("out of DMA memory")?;
        let ev = dma_alloc(4, 4).ok_or("out of DMA memory")?;
        dev.start()?;
        for i in 0..RX_BUFS.min(rxq.size) {
            Device::write_desc(&rxq, i, rx_base + u64::from(i) * BUF, BUF as u32, DESC_F_WRITE, 0);
            dev.publish(&mut rxq, i, 1);
        }
        Device::write_desc(&evq, 0, ev, 4, DESC_F_WRITE, 0);
        dev.publish(&mut evq, 0, 1);
        Ok(Vsock { dev, rxq, txq, rx_base, tx, tx_batch, cid })
    }

    /// Sends a packet on `c` with `len` bytes of data already at `tx + HDR`.
    fn send(&mut self, c: &mut Conn, op: u16, flags: u32, len: u32) -> Result<(), DriverError> {
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local,
            dst_port: c.peer,
            len,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        };
        h.write(self.tx);
        self.dev.transact(&mut self.txq, &[(self.tx, (HDR + u64::from(len)) as u32, false)])?;
        c.tx_cnt = c.tx_cnt.wrapping_add(len);
        Ok(())
    }

    /// The next packet for this guest, within `cycles`.
    fn recv(&mut self, cycles: u64) -> Result<Option<Pkt>, DriverError> {
        let start = rdtsc();
        loop {
            if let Some((head, len)) = Device::try_used(&mut self.rxq) {
                let head = head as u16;
                if head >= RX_BUFS {
                    return Err("used entry for a buffer never posted");
                }
                let at = self.rx_base + u64::from(head) * BUF;
                let hdr = Hdr::read(at);
                if u64::from(len) != HDR + u64::from(hdr.len) || u64::from(hdr.len) > DATA {
                    return Err("a packet whose length does not match its header");
                }
                if hdr.dst_cid != self.cid || hdr.src_cid != HOST_CID {
                    return Err("a packet not addressed to this guest");
                }
                return Ok(Some(Pkt { hdr, data: at + HDR, head }));
            }
            if rdtsc().wrapping_sub(start) > cycles {
                return Ok(None);
            }
            core::hint::spin_loop();
        }
    }

    /// Gives a receive buffer back.
    fn repost(&mut self, p: &Pkt) {
        Device::write_desc(&self.rxq, p.head, self.rx_base + u64::from(p.head) * BUF, BUF as u32, DESC_F_WRITE, 0);
        self.dev.publish(&mut self.rxq, p.head, 1);
    }

    /// Waits for a packet on `c` (others are answered with a reset),
    /// updating its credit.
    fn next_on(&mut self, c: &mut Conn, cycles: u64) -> Result<Pkt, DriverError> {
        loop {
            let p = self.recv(cycles)?.ok_or("no packet from the host in time")?;
            if p.hdr.dst_port == c.local && p.hdr.src_port == c.peer {
                c.peer_buf_alloc = p.hdr.buf_alloc;
                c.peer_fwd_cnt = p.hdr.fwd_cnt;
                if p.hdr.op == OP_CREDIT_REQUEST {
                    self.repost(&p);
                    self.send(c, OP_CREDIT_UPDATE, 0, 0)?;
                    continue;
                }
                return Ok(p);
            }
            self.repost(&p);
        }
    }

    /// Streams `total` bytes (whatever the buffers hold) on `c` in 4 KiB
    /// packets, up to `TX_BATCH` made available at once, within the host's
    /// credit.
    fn stream_out(&mut self, c: &mut Conn, total: u64) -> Result<(), DriverError> {
        let mut sent = 0u64;
        while sent < total {
            while c.credit() < DATA as u32 {
                self.wait_credit(c)?;
            }
            let mut chains = [[(0u64, 0u32, false); 1]; TX_BATCH];
            let mut k = 0;
            let mut credit = c.credit();
            while k < TX_BATCH && sent < total {
                let n = (total - sent).min(DATA) as u32;
                if credit < n {
                    break;
                }
                let at = self.tx_batch + k as u64 * BUF;
                Hdr {
                    src_cid: self.cid,
                    dst_cid: HOST_CID,
                    src_port: c.local,
                    dst_port: c.peer,
                    len: n,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: c.fwd_cnt,
                }
                .write(at);
                chains[k] = [(at, (HDR + u64::from(n)) as u32, false)];
                credit -= n;
                sent += u64::from(n);
                c.tx_cnt = c.tx_cnt.wrapping_add(n);
                k += 1;
            }
            let refs: [&[(u64, u32, bool)]; TX_BATCH] = core::array::from_fn(|i| &chains[i][..]);
            self.dev.transact_batch(&mut self.txq, &refs[..k])?;
        }
        Ok(())
    }

    /// Waits for the host's next credit update on `c`.
    fn wait_credit(&mut self, c: &mut Conn) -> Result<(), DriverError> {
        let p = self.next_on(c, TICK * 25)?;
        self.repost(&p);
        match p.hdr.op {
            OP_CREDIT_UPDATE | OP_RW if p.hdr.len == 0 => Ok(()),
            OP_RST => Err("the host reset the connection"),
            _ => Err("an unexpected packet while waiting for credit"),
        }
    }

    /// Sends `data` (copied to the transmit buffer in pieces of at most
    /// 4 KiB) within the host's credit.
    fn send_data(&mut self, c: &mut Conn, mut fill: impl FnMut(u64, u32), total: u64) -> Result<(), DriverError> {
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(DATA) as u32;
            while c.credit() < n {
                self.wait_credit(c)?;
            }
            fill(self.tx + HDR, n);
            self.send(c, OP_RW, 0, n)?;
            sent += u64::from(n);
        }
        Ok(())
    }
}

fn finish(name: &str, r: Result<(), DriverError>) -> u8 {
    match r {
        Ok(()) => EXIT_OK,
        Err(e) => {
            report!("error {} {}", name, e);
            EXIT_FAILED
        }
    }
}

fn key(boot: &BootInfo, k: &[u8], default: u64) -> u64 {
    boot.cmdline
        .split(|&b| b == b' ')
        .find_map(|w| w.strip_prefix(k))
        .and_then(crate::cmdline::parse_u64)
        .unwrap_or(default)
}

fn msg_byte(i: u64) -> u8 {
    (i as u8).wrapping_mul(13).wrapping_add(5)
}

/// Connects to host port `port` from local port `local`.
fn connect(v: &mut Vsock, local: u32, port: u32) -> Result<Conn, DriverError> {
    let mut c = Conn { local, peer: port, ..Conn::default() };
    v.send(&mut c, OP_REQUEST, 0, 0)?;
    let p = v.next_on(&mut c, TICK * 25)?;
    v.repost(&p);
    match p.hdr.op {
        OP_RESPONSE => Ok(c),
        OP_RST => Err("the host refused the connection (nobody listening?)"),
        _ => Err("an unexpected answer to a connection request"),
    }
}

/// Closes `c` both ways and waits for the host's reset.
fn close(v: &mut Vsock, c: &mut Conn) -> Result<(), DriverError> {
    v.send(c, OP_SHUTDOWN, 3, 0)?;
    loop {
        let p = v.next_on(c, TICK * 25)?;
        v.repost(&p);
        if p.hdr.op == OP_RST {
            return Ok(());
        }
    }
}

/// `vsock`: see the module documentation.
pub fn vsock(boot: &BootInfo) -> u8 {
    let port = key(boot, b"testguest.vsock_port=", 52) as u32;
    let listen = key(boot, b"testguest.vsock_listen=", 1234) as u32;
    finish(
        "vsock",
        (|| {
            let mut v = Vsock::up(boot)?;
            report!("vsock cid={}", v.cid);
            // Guest to host: a message and its echo.
            let mut c = connect(&mut v, 40000, port)?;
            let len = 6000u64;
            v.send_data(&mut c, |at, n| {
                for i in 0..u64::from(n) {
                    wr(at + i, msg_byte(i));
                }
            }, len)?;
            let mut got = 0u64;
            while got < len {
                let p = v.next_on(&mut c, TICK * 25)?;
                match p.hdr.op {
                    OP_RW => {
                        for i in 0..u64::from(p.hdr.len) {
                            // The echo of the same 4 KiB pattern, restarted
                            // at each packet the guest sent.
                            if rd::<u8>(p.data + i) != msg_byte((got + i) % DATA) {
                                return Err("the echo differs from what was sent");
                            }
                        }
                        got += u64::from(p.hdr.len);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(p.hdr.len);
                    }
                    OP_CREDIT_UPDATE => {}
                    _ => return Err("an unexpected packet instead of the echo"),
                }
                v.repost(&p);
            }
            close(&mut v, &mut c)?;
            report!("vsock connect port={} echo=ok bytes={}", port, got);
            // Host to guest: accept, echo until the host is done.
            report!("vsock listen port={} ready", listen);
            let (mut c, mut echoed) = loop {
                let p = v.recv(TICK * 100)?.ok_or("no connection from the host")?;
                v.repost(&p);
                if p.hdr.op == OP_REQUEST && p.hdr.dst_port == listen {
                    let mut c = Conn {
                        local: listen,
                        peer: p.hdr.src_port,
                        peer_buf_alloc: p.hdr.buf_alloc,
                        peer_fwd_cnt: p.hdr.fwd_cnt,
                        ..Conn::default()
                    };
                    v.send(&mut c, OP_RESPONSE, 0, 0)?;
                    break (c, 0u64);
                }
            };
            loop {
                let p = v.next_on(&mut c, TICK * 50)?;
                match p.hdr.op {
                    OP_RW => {
                        let n = p.hdr.len;
                        let src = p.data;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                        // Copied out before the buffer goes back.
                        let mut off = 0u64;
                        v.send_data(&mut c, |at, k| {
                            for i in 0..u64::from(k) {
                                wr(at + i, rd::<u8>(src + off + i));
                            }
                            off += u64::from(k);
                        }, u64::from(n))?;
                        v.repost(&p);
                        echoed += u64::from(n);
                    }
                    OP_SHUTDOWN => {
                        v.repost(&p);
                        v.send(&mut c, OP_RST, 0, 0)?;
                        break;
                    }
                    OP_RST => {
                        v.repost(&p);
                        break;
                    }
                    _ => v.repost(&p),
                }
            }
            report!("vsock accept ok port={} bytes={}", listen, echoed);
            Ok(())
        })(),
    )
}

/// `vsock-bench`: see the module documentation.
pub fn vsock_bench(boot: &BootInfo, iters: u64) -> u8 {
    let port = key(boot, b"testguest.vsock_port=", 52) as u32;
    finish(
        "vsock-bench",
        (|| {
            let mut v = Vsock::up(boot)?;
            let mut c = connect(&mut v, 40001, port)?;
            let total = iters * DATA;
            let start = rdtsc();
            v.stream_out(&mut c, total)?;
            let tx_cycles = rdtsc().wrapping_sub(start);
            report!("vsock-bench tx bytes={} cycles={}", total, tx_cycles);
            let start = rdtsc();
            let mut got = 0u64;
            while got < total {
                let p = v.next_on(&mut c, TICK * 50)?;
                if p.hdr.op == OP_RW {
                    got += u64::from(p.hdr.len);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(p.hdr.len);
                } else if p.hdr.op == OP_RST || p.hdr.op == OP_SHUTDOWN {
                    v.repost(&p);
                    return Err("the host closed before sending everything back");
                }
                v.repost(&p);
                // Tell the host about freed room now and then.
                if got % (BUF_ALLOC as u64 / 2) < DATA {
                    v.send(&mut c, OP_CREDIT_UPDATE, 0, 0)?;
                }
            }
            let rx_cycles = rdtsc().wrapping_sub(start);
            report!("vsock-bench rx bytes={} cycles={}", got, rx_cycles);
            close(&mut v, &mut c)?;
            Ok(())
        })(),
    )
}

/// Sends a raw packet: `h` with stream type `type_`, in one descriptor of
/// `chain_len` bytes.
fn send_raw(v: &mut Vsock, h: Hdr, type_: u16, chain_len: u32) -> Result<(), DriverError> {
    h.write(v.tx);
    wr(v.tx + 28, type_);
    v.dev.transact(&mut v.txq, &[(v.tx, chain_len, false)])?;
    Ok(())
}

/// Waits for a reset to (`local`, `peer`).
fn expect_rst(v: &mut Vsock, local: u32, peer: u32) -> Result<&'static str, DriverError> {
    loop {
        let p = v.recv(TICK * 25)?.ok_or("no reset from the device")?;
        v.repost(&p);
        if p.hdr.dst_port == local && p.hdr.src_port == peer {
            return match p.hdr.op {
                OP_RST => Ok("reset"),
                _ => Err("an answer other than a reset"),
            };
        }
    }
}

/// The device still works: a connection to the host's echo on `port`.
fn vsock_works(v: &mut Vsock, local: u32, port: u32) -> Result<(), DriverError> {
    let mut c = connect(v, local, port)?;
    v.send_data(&mut c, |at, n| {
        for i in 0..u64::from(n) {
            wr(at + i, msg_byte(i));
        }
    }, 100)?;
    let mut got = 0u32;
    while got < 100 {
        let p = v.next_on(&mut c, TICK * 25)?;
        v.repost(&p);
        if p.hdr.op == OP_RW {
            got += p.hdr.len;
            c.fwd_cnt = c.fwd_cnt.wrapping_add(p.hdr.len);
        } else if p.hdr.op != OP_CREDIT_UPDATE {
            return Err("no echo after the abuse");
        }
    }
    close(v, &mut c)
}

/// The `hostile` scenario's vsock cases: packets misaddressed, of the
/// wrong type, without a connection, shorter than a header, longer than
/// their buffer, and a guest that sends past its credit to a host program
/// that never reads (`testguest.vsock_sink`, default 53). Each must be
/// refused with a reset or dropped, and a connection to the host's echo
/// (`testguest.vsock_port`, default 52) must work afterwards. Returns false
/// when there is no vsock device.
pub fn hostile_cases(boot: &BootInfo, case: &mut dyn FnMut(&str, Result<&'static str, DriverError>)) -> bool {
    let (entries, n) = find_devices(boot.cmdline);
    if !entries[..n].iter().flatten().any(|e| device_type(e) == TYPE_VSOCK) {
        return false;
    }
    let echo = key(boot, b"testguest.vsock_port=", 52) as u32;
    let sink = key(boot, b"testguest.vsock_sink=", 53) as u32;
    let mut v = match Vsock::up(boot) {
        Ok(v) => v,
        Err(e) => {
            case("vsock-up", Err(e));
            return true;
        }
    };
    let cid = v.cid;
    let base = Hdr { src_cid: cid, dst_cid: HOST_CID, src_port: 777, dst_port: echo, buf_alloc: BUF_ALLOC, ..Hdr::default() };
    let r = send_raw(&mut v, Hdr { dst_cid: 7, op: OP_REQUEST, ..base }, 1, HDR as u32).and_then(|()| expect_rst(&mut v, 777, echo));
    case("vsock-misaddressed", r);
    let r = send_raw(&mut v, Hdr { op: OP_REQUEST, ..base }, 2, HDR as u32).and_then(|()| expect_rst(&mut v, 777, echo));
    case("vsock-not-a-stream", r);
    let r = send_raw(&mut v, Hdr { op: OP_RW, len: 10, ..base }, 1, HDR as u32 + 10).and_then(|()| expect_rst(&mut v, 777, echo));
    case("vsock-data-without-connection", r);
    let r = send_raw(&mut v, Hdr { op: OP_REQUEST, ..base }, 1, 20).and_then(|()| vsock_works(&mut v, 40100, echo)).map(|()| "dropped");
    case("vsock-shorter-than-header", r);
    let r = send_raw(&mut v, Hdr { op: OP_RW, len: 4096, ..base }, 1, HDR as u32).and_then(|()| vsock_works(&mut v, 40101, echo)).map(|()| "dropped");
    case("vsock-length-past-buffer", r);
    // A credit lie: stream to a host program that never reads, ignoring
    // the credit the device gave, until the device resets the connection.
    let r = (|| {
        let mut c = connect(&mut v, 40102, sink)?;
        for _ in 0..1024 {
            v.send(&mut c, OP_RW, 0, DATA as u32)?;
            if let Some(p) = v.recv(0)? {
                v.repost(&p);
                if p.hdr.op == OP_RST && p.hdr.dst_port == c.local {
                    vsock_works(&mut v, 40103, echo)?;
                    return Ok("reset");
                }
            }
        }
        Err("4 MiB past the credit and no reset")
    })();
    case("vsock-credit-lie", r);
    v.dev.reset();
    true
}
