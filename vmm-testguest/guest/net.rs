//! Scenarios on the first virtio-net NIC: `net` (ARP for the host's
//! address, ICMP echo with the host's network stack, then answering the
//! host's ARP, ICMP echo and UDP echo on port 7), `net-link` (watches the
//! link go down and up, then pings again) and `net-bench` (UDP frames to
//! the host and from it, timed with the TSC).
//!
//! Addresses come from `testguest.ip=A.B.C.D` (default 172.16.0.2) and
//! `testguest.peer=A.B.C.D` (the host's TAP address, default 172.16.0.1).

use crate::bootinfo::BootInfo;
use crate::cmdline::Args;
use crate::virtio::{
    device_type, dma_alloc, dma_fits, find_devices, Device, DriverError, Mode, Queue, DESC_F_WRITE,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::{EXIT_FAILED, EXIT_OK};

const TYPE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;
/// The virtio-net header on every frame.
const HDR: usize = 12;
/// Each receive buffer.
const RX_BUF: u64 = 2048;
/// Most bytes of a frame this driver sends.
const TX_MAX: usize = 1514;
/// The UDP port the host's benchmark listens on, and the guest's echo port.
pub const BENCH_PORT: u16 = 5001;
const ECHO_PORT: u16 = 7;
const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;
/// About 0.2 s of TSC cycles on these machines.
const TICK: u64 = 1 << 29;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: DMA memory from `dma_alloc`, identity mapped and user readable.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn wr8(addr: u64, v: u8) {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// The bytes of a received frame, copied out of its buffer.
struct Frame {
    data: [u8; TX_MAX],
    len: usize,
}

impl Frame {
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.data[at], self.data[at + 1]])
    }
}

/// Internet checksum of `bytes` (plus `sum` carried in).
fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        let w = if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from(pair[0]) << 8 };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Parses `A.B.C.D`.
fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for o in &mut out {
        *o = u8::try_from(crate::cmdline::parse_u64(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The value of `testguest.KEY=` on the command line.
fn key(boot: &BootInfo, k: &[u8]) -> Option<&'static [u8]> {
    boot.cmdline.split(|&b| b == b' ').find_map(|w| w.strip_prefix(k))
}

fn ip_arg(boot: &BootInfo, k: &[u8], default: [u8; 4]) -> [u8; 4] {
    key(boot, k).and_then(parse_ip).unwrap_or(default)
}

/// A NIC being driven, polled.
pub struct Nic {
    dev: Device,
    rxq: Queue,
    txq: Queue,
    rx_base: u64,
    rx_len: u32,
    tx: u64,
    mac: [u8; 6],
    ip: [u8; 4],
    peer: [u8; 4],
    peer_mac: Option<[u8; 6]>,
    /// Echo replies seen: (sequence number, whether the payload matched).
    last_reply: Option<(u16, bool)>,
    /// ICMP and UDP echo requests answered.
    served: u32,
    /// Benchmark datagrams received.
    bench_rx: u64,
}

impl Nic {
    fn up(boot: &BootInfo) -> Result<Nic, DriverError> {
        Nic::up_with(boot, RX_BUF as u32, u16::MAX, None)
    }

    /// A NIC with `count` receive buffers (at most the queue size) of
    /// `len` bytes each, at `base` (2 KiB apart) or in fresh DMA memory.
    fn up_with(boot: &BootInfo, len: u32, count: u16, base: Option<u64>) -> Result<Nic, DriverError> {
        if !dma_fits(boot.ram_top) {
            return Err("needs at least 6 MiB of RAM");
        }
        let (entries, n) = find_devices(boot.cmdline);
        let e = entries[..n].iter().flatten().find(|e| device_type(e) == TYPE_NET).ok_or("no NIC found")?;
        let want = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | F_MAC | F_STATUS | F_MRG_RXBUF;
        let mut dev = Device::init(e, want, Mode::Poll)?;
        let mut rxq = dev.queue(0)?;
        let txq = dev.queue(1)?;
        let mut mac = [0x06, 0, 0, 0, 0, 0x99];
        if dev.features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.config8(i as u64);
            }
        }
        let count = count.min(rxq.size);
        let rx_base = match base {
            Some(b) => b,
            None => dma_alloc(RX_BUF * u64::from(count), 4096).ok_or("out of DMA memory")?,
        };
        let tx = dma_alloc(HDR as u64 + TX_MAX as u64, 64).ok_or("out of DMA memory")?;
        dev.start()?;
        for i in 0..count {
            Device::write_desc(&rxq, i, rx_base + u64::from(i) * RX_BUF, len, DESC_F_WRITE, 0);
            dev.publish(&mut rxq, i, 1);
        }
        Ok(Nic {
            dev,
            rxq,
            txq,
            rx_base,
            rx_len: len,
            tx,
            mac,
            ip: ip_arg(boot, b"testguest.ip=", [172, 16, 0, 2]),
            peer: ip_arg(boot, b"testguest.peer=", [172, 16, 0, 1]),
            peer_mac: None,
            last_reply: None,
            served: 0,
            bench_rx: 0,
        })
    }

    fn link_up(&self) -> bool {
        self.dev.features & F_STATUS == 0 || self.dev.config16(6) & S_LINK_UP != 0
    }

    /// Sends `frame` (without header), waiting for the device to take it.
    fn send(&mut self, frame: &[u8]) -> Result<(), DriverError> {
        for i in 0..HDR {
            wr8(self.tx + i as u64, 0);
        }
        for (i, &b) in frame.iter().enumerate() {
            wr8(self.tx + (HDR + i) as u64, b);
        }
        self.dev.transact(&mut self.txq, &[(self.tx, (HDR + frame.len()) as u32, false)])?;
        Ok(())
    }

    /// Takes one received frame, if there is one, and gives its buffers
    /// back.
    fn recv(&mut self) -> Result<Option<Frame>, DriverError> {
        let Some((head, len)) = Device::try_used(&mut self.rxq) else {
            return Ok(None);
        };
        let head = head as u16;
        if head >= self.rxq.size {
            return Err("used entry for a buffer never posted");
        }
        let addr = self.rx_base + u64::from(head) * RX_BUF;
        let nbuf = u16::from_le_bytes([rd8(addr + 10), rd8(addr + 11)]);
        let mut f = Frame { data: [0; TX_MAX], len: 0 };
        let len = len as usize;
        if len < HDR {
            return Err("a used receive buffer shorter than a header");
        }
        f.len = (len - HDR).min(TX_MAX);
        for (i, b) in f.data[..f.len].iter_mut().enumerate() {
            *b = rd8(addr + (HDR + i) as u64);
        }
        self.repost(head);
        // Frames larger than one buffer (none are expected): skip the rest.
        for _ in 1..nbuf.max(1) {
            let start = rdtsc();
            loop {
                if let Some((h, _)) = Device::try_used(&mut self.rxq) {
                    self.repost(h as u16);
                    break;
                }
                if rdtsc().wrapping_sub(start) > TICK {
                    return Err("a merged frame's next buffer never came");
                }
            }
        }
        Ok(Some(f))
    }

    fn repost(&mut self, head: u16) {
        Device::write_desc(&self.rxq, head, self.rx_base + u64::from(head) * RX_BUF, self.rx_len, DESC_F_WRITE, 0);
        self.dev.publish(&mut self.rxq, head, 1);
    }

    /// An Ethernet header to `dst` of `ethertype` into `f`.
    fn eth(&self, f: &mut [u8], dst: [u8; 6], ethertype: u16) {
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn arp(&mut self, op: u16, target_mac: [u8; 6], target_ip: [u8; 4]) -> Result<(), DriverError> {
        let mut f = [0u8; 60];
        let dst = if op == 1 { [0xff; 6] } else { target_mac };
        self.eth(&mut f, dst, ETH_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, op as u8]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&self.ip);
        f[32..38].copy_from_slice(&target_mac);
        f[38..42].copy_from_slice(&target_ip);
        self.send(&f)
    }

    /// An IPv4 packet with `payload` (checksummed by the caller if it needs
    /// one) to `dst`/`dst_mac`.
    fn ip_send(&mut self, dst_mac: [u8; 6], dst: [u8; 4], proto: u8, payload: &[u8]) -> Result<(), DriverError> {
        let mut f = [0u8; TX_MAX];
        let total = 20 + payload.len();
        if 14 + total > TX_MAX {
            return Err("packet too large");
        }
        self.eth(&mut f, dst_mac, ETH_IP);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&self.ip);
        ip[16..20].copy_from_slice(&dst);
        let c = checksum(ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f[34..34 + payload.len()].copy_from_slice(payload);
        let len = (14 + total).max(60);
        self.send(&f[..len])
    }

    fn udp_send(&mut self, dst_mac: [u8; 6], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Result<(), DriverError> {
        let mut u = [0u8; TX_MAX];
        let len = 8 + data.len();
        u[..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        u[8..len].copy_from_slice(data);
        // Checksum 0: none (allowed for UDP over IPv4).
        self.ip_send(dst_mac, dst, 17, &u[..len])
    }

    /// Handles one frame: learns the peer's MAC, answers ARP and echo
    /// requests, notes echo replies and counts benchmark datagrams.
    fn handle(&mut self, f: &Frame) -> Result<(), DriverError> {
        if f.len < 14 {
            return Ok(());
        }
        let d = &f.data;
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&d[6..12]);
        match f.u16(12) {
            ETH_ARP if f.len >= 42 => {
                let op = f.u16(20);
                let sender_ip = [d[28], d[29], d[30], d[31]];
                let target_ip = [d[38], d[39], d[40], d[41]];
                let mut sender_mac = [0u8; 6];
                sender_mac.copy_from_slice(&d[22..28]);
                if sender_ip == self.peer {
                    self.peer_mac = Some(sender_mac);
                }
                if op == 1 && target_ip == self.ip {
                    self.arp(2, sender_mac, sender_ip)?;
                }
            }
            ETH_IP if f.len >= 34 => {
                let ihl = usize::from(d[14] & 0x0f) * 4;
                let total = usize::from(f.u16(16));
                let dst = [d[30], d[31], d[32], d[33]];
                let src = [d[26], d[27], d[28], d[29]];
                if dst != self.ip || ihl < 20 || 14 + total > f.len || total < ihl {
                    return Ok(());
                }
                let payload = &d[14 + ihl..14 + total];
                match d[23] {
                    1 if payload.len() >= 8 => {
                        let mut m = [0u8; TX_MAX];
                        let n = payload.len();
                        m[..n].copy_from_slice(payload);
                        match payload[0] {
                            8 => {
                                // Echo request: the same message as a reply.
                                m[0] = 0;
                                m[2] = 0;
                                m[3] = 0;
                                let c = checksum(&m[..n], 0);
                                m[2..4].copy_from_slice(&c.to_be_bytes());
                                self.ip_send(src_mac, src, 1, &m[..n])?;
                                self.served += 1;
                            }
                            0 if src == self.peer => {
                                let seq = u16::from_be_bytes([payload[6], payload[7]]);
                                let ok = checksum(payload, 0) == 0 && payload[8..].iter().enumerate().all(|(i, &b)| b == ping_byte(seq, i));
                                self.last_reply = Some((seq, ok));
                            }
                            _ => {}
                        }
                    }
                    17 if payload.len() >= 8 => {
                        let sport = u16::from_be_bytes([payload[0], payload[1]]);
                        let dport = u16::from_be_bytes([payload[2], payload[3]]);
                        let ulen = usize::from(u16::from_be_bytes([payload[4], payload[5]])).min(payload.len());
                        if dport == ECHO_PORT && ulen >= 8 {
                            let mut data = [0u8; TX_MAX];
                            let n = ulen - 8;
                            data[..n].copy_from_slice(&payload[8..ulen]);
                            self.udp_send(src_mac, src, ECHO_PORT, sport, &data[..n])?;
                            self.served += 1;
                        } else if dport == BENCH_PORT {
                            self.bench_rx += 1;
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Handles frames for `cycles`, or until `done` says so.
    fn serve(&mut self, cycles: u64, mut done: impl FnMut(&Nic) -> bool) -> Result<bool, DriverError> {
        let start = rdtsc();
        loop {
            if done(self) {
                return Ok(true);
            }
            if rdtsc().wrapping_sub(start) > cycles {
                return Ok(false);
            }
            if let Some(f) = self.recv()? {
                self.handle(&f)?;
            } else {
                core::hint::spin_loop();
            }
        }
    }

    fn resolve_peer(&mut self) -> Result<[u8; 6], DriverError> {
        for _ in 0..25 {
            let peer = self.peer;
            self.arp(1, [0; 6], peer)?;
            if self.serve(TICK, |n| n.peer_mac.is_some())? {
                break;
            }
        }
        self.peer_mac.ok_or("no ARP reply from the peer")
    }

    fn ping(&mut self, peer_mac: [u8; 6], seq: u16) -> Result<(), DriverError> {
        let mut m = [0u8; 64];
        m[0] = 8;
        m[4..6].copy_from_slice(&0x7467u16.to_be_bytes());
        m[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in m[8..].iter_mut().enumerate() {
            *b = ping_byte(seq, i);
        }
        let c = checksum(&m, 0);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        for _ in 0..10 {
            self.ip_send(peer_mac, self.peer, 1, &m)?;
            if self.serve(TICK * 2, |n| matches!(n.last_reply, Some((s, _)) if s == seq))? {
                return match self.last_reply {
                    Some((_, true)) => Ok(()),
                    _ => Err("an echo reply with a different payload"),
                };
            }
        }
        Err("no echo reply from the peer")
    }

    fn mac_str(&self) -> MacStr {
        MacStr(self.mac)
    }
}

fn ping_byte(seq: u16, i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(seq as u8)
}

/// A MAC address for reports.
struct MacStr([u8; 6]);

impl core::fmt::Display for MacStr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

struct IpStr([u8; 4]);

impl core::fmt::Display for IpStr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.0[0], self.0[1], self.0[2], self.0[3])
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

/// `net`: ARP for the peer, four pings, then `testguest.net_serve=N`
/// echo requests (ICMP or UDP port 7) from the host answered (default 0),
/// within about 20 s.
pub fn net(boot: &BootInfo, args: &Args) -> u8 {
    let serve = key(boot, b"testguest.net_serve=").and_then(crate::cmdline::parse_u64).unwrap_or(0) as u32;
    let _ = args;
    finish(
        "net",
        (|| {
            let mut nic = Nic::up(boot)?;
            if !nic.link_up() {
                return Err("the link is down");
            }
            report!("net mac={} ip={} link=up", nic.mac_str(), IpStr(nic.ip));
            let peer_mac = nic.resolve_peer()?;
            report!("net arp peer={} mac={}", IpStr(nic.peer), MacStr(peer_mac));
            for seq in 1..=4 {
                nic.ping(peer_mac, seq)?;
                report!("net ping seq={} ok", seq);
            }
            if serve > 0 {
                report!("net serve ready");
                if !nic.serve(TICK * 100, |n| n.served >= serve)? {
                    return Err("the host's echo requests did not all come");
                }
            }
            report!("net ok pings=4 served={}", nic.served);
            Ok(())
        })(),
    )
}

/// `net-link`: reports the link up, waits for it to go down and up again,
/// then pings the peer to show frames move again.
pub fn net_link(boot: &BootInfo) -> u8 {
    finish(
        "net-link",
        (|| {
            let mut nic = Nic::up(boot)?;
            if nic.dev.features & F_STATUS == 0 {
                return Err("the device has no link status");
            }
            if !nic.link_up() {
                return Err("the link is down at the start");
            }
            report!("net-link state=up");
            for (want, name) in [(false, "down"), (true, "up-again")] {
                let start = rdtsc();
                while nic.link_up() != want {
                    if rdtsc().wrapping_sub(start) > TICK * 150 {
                        return Err("the link did not change");
                    }
                    // Frames that come meanwhile are answered.
                    if let Some(f) = nic.recv()? {
                        nic.handle(&f)?;
                    }
                }
                report!("net-link state={}", name);
            }
            let peer_mac = nic.resolve_peer()?;
            nic.ping(peer_mac, 1)?;
            report!("net-link ok");
            Ok(())
        })(),
    )
}

/// `net-bench`: sends `testguest.bench_iters` UDP datagrams of
/// `testguest.net_size` bytes of frame (64 to 1514, default 1514) to the
/// peer's port 5001, timed; times 50 pings of the peer; then reports
/// `net-bench rx-ready` and counts
/// the datagrams the host sends to its port 5001 until as many came or
/// the host sends none for a while, and reports how many and how fast.
pub fn net_bench(boot: &BootInfo, args: &Args) -> u8 {
    let size = key(boot, b"testguest.net_size=")
        .and_then(crate::cmdline::parse_u64)
        .map_or(TX_MAX, |s| (s as usize).clamp(64, TX_MAX));
    let iters = args.bench_iters.unwrap_or(20_000);
    finish(
        "net-bench",
        (|| {
            let mut nic = Nic::up(boot)?;
            let peer_mac = nic.resolve_peer()?;
            // Frame = 14 Ethernet + 20 IP + 8 UDP + data.
            let data_len = size - 42;
            let mut frame = [0u8; TX_MAX];
            let data = [0x5au8; TX_MAX];
            {
                // Build one frame, then send the same buffer in batches.
                let ip = nic.ip;
                let peer = nic.peer;
                nic.eth(&mut frame, peer_mac, ETH_IP);
                let total = 28 + data_len;
                let h = &mut frame[14..34];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                h[6] = 0x40;
                h[8] = 64;
                h[9] = 17;
                h[12..16].copy_from_slice(&ip);
                h[16..20].copy_from_slice(&peer);
                let c = checksum(h, 0);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                frame[34..36].copy_from_slice(&BENCH_PORT.to_be_bytes());
                frame[36..38].copy_from_slice(&BENCH_PORT.to_be_bytes());
                frame[38..40].copy_from_slice(&((8 + data_len) as u16).to_be_bytes());
                frame[42..42 + data_len].copy_from_slice(&data[..data_len]);
            }
            for i in 0..HDR {
                wr8(nic.tx + i as u64, 0);
            }
            for (i, &b) in frame[..size].iter().enumerate() {
                wr8(nic.tx + (HDR + i) as u64, b);
            }
            let chain = [(nic.tx, (HDR + size) as u32, false)];
            let batch = usize::from(nic.txq.size).min(64);
            let chains = [&chain[..]; 64];
            let start = rdtsc();
            let mut sent = 0u64;
            while sent < iters {
                let n = (iters - sent).min(batch as u64) as usize;
                nic.dev.transact_batch(&mut nic.txq, &chains[..n])?;
                sent += n as u64;
            }
            let cycles = rdtsc().wrapping_sub(start);
            report!("net-bench tx size={} frames={} cycles={}", size, sent, cycles);
            // Round trips: ICMP echo to the peer's own stack.
            let rounds = 50u16;
            let mut best = u64::MAX;
            let mut total = 0u64;
            for seq in 1..=rounds {
                let t = rdtsc();
                nic.ping(peer_mac, seq)?;
                let rtt = rdtsc().wrapping_sub(t);
                best = best.min(rtt);
                total += rtt;
            }
            report!("net-bench ping rounds={} cycles_per_rtt={} best={}", rounds, total / u64::from(rounds), best);
            report!("net-bench rx-ready");
            let mut first = 0u64;
            let mut last = 0u64;
            let mut idle = rdtsc();
            while nic.bench_rx < iters {
                match nic.recv()? {
                    Some(f) => {
                        let before = nic.bench_rx;
                        nic.handle(&f)?;
                        if nic.bench_rx > before {
                            last = rdtsc();
                            if before == 0 {
                                first = last;
                            }
                            idle = last;
                        }
                    }
                    None => {
                        // Nothing for a while after frames came: done.
                        let quiet = if nic.bench_rx == 0 { TICK * 100 } else { TICK * 5 };
                        if rdtsc().wrapping_sub(idle) > quiet {
                            break;
                        }
                    }
                }
            }
            report!("net-bench rx frames={} cycles={}", nic.bench_rx, last.wrapping_sub(first));
            Ok(())
        })(),
    )
}

/// Sends a raw transmit chain of `len` bytes at `addr`; the used length.
fn tx_raw(nic: &mut Nic, addr: u64, len: u32) -> Result<u32, DriverError> {
    nic.dev.transact(&mut nic.txq, &[(addr, len, false)])
}

/// The device still works: the peer answers ARP.
fn works(nic: &mut Nic) -> Result<(), DriverError> {
    nic.peer_mac = None;
    nic.resolve_peer().map(|_| ())
}

/// Resets the NIC and brings it up again with `count` ordinary buffers.
fn reinit(boot: &BootInfo, nic: &mut Nic, count: u16) -> Result<(), DriverError> {
    nic.dev.reset();
    *nic = Nic::up_with(boot, RX_BUF as u32, count, Some(nic.rx_base))?;
    Ok(())
}

/// Expects the device to ask for a reset, then brings it up again and
/// checks it works.
fn expect_reset(boot: &BootInfo, nic: &mut Nic, count: u16) -> Result<&'static str, DriverError> {
    let asked = nic.dev.wait_needs_reset();
    reinit(boot, nic, count)?;
    if !asked {
        return Err("the device did not ask for a reset");
    }
    works(nic)?;
    Ok("needs-reset")
}

/// The `hostile` scenario's NIC cases, on the first NIC (whose TAP has the
/// peer's address): each must be dropped, given back or answered with
/// DEVICE_NEEDS_RESET, and the NIC must answer ARP afterwards. Returns
/// false when there is no NIC.
pub fn hostile_cases(boot: &BootInfo, outside: u64, case: &mut dyn FnMut(&str, Result<&'static str, DriverError>)) -> bool {
    let (entries, n) = find_devices(boot.cmdline);
    if !entries[..n].iter().flatten().any(|e| device_type(e) == TYPE_NET) {
        return false;
    }
    // 36 buffers of 2 KiB: more than a largest frame's room.
    const COUNT: u16 = 36;
    let (mut nic, big) = match (Nic::up_with(boot, RX_BUF as u32, COUNT, None), dma_alloc(70_000, 4096)) {
        (Ok(n), Some(b)) => (n, b),
        _ => {
            case("net-up", Err("cannot bring the NIC up"));
            return true;
        }
    };
    let tx = nic.tx;
    for i in 0..(HDR + 60) as u64 {
        wr8(tx + i, 0);
    }
    let r = tx_raw(&mut nic, tx, 4).and_then(|_| works(&mut nic)).map(|()| "dropped");
    case("net-tx-shorter-than-header", r);
    let r = tx_raw(&mut nic, big, 70_000).and_then(|_| works(&mut nic)).map(|()| "dropped");
    case("net-tx-oversized-frame", r);
    // A header the host refuses: an unknown GSO type.
    wr8(tx + 1, 0x7f);
    let r = tx_raw(&mut nic, tx, (HDR + 60) as u32).and_then(|_| works(&mut nic)).map(|()| "dropped");
    wr8(tx + 1, 0);
    case("net-tx-bad-header", r);
    // Receive buffers too small for a header: given back empty.
    let r = (|| {
        reinit(boot, &mut nic, 0)?;
        for i in 0..8u16 {
            Device::write_desc(&nic.rxq, i, nic.rx_base + u64::from(i) * RX_BUF, 4, DESC_F_WRITE, 0);
            nic.dev.publish(&mut nic.rxq, i, 1);
        }
        let peer = nic.peer;
        nic.arp(1, [0; 6], peer)?;
        let start = rdtsc();
        let len = loop {
            if let Some((_, len)) = Device::try_used(&mut nic.rxq) {
                break len;
            }
            if rdtsc().wrapping_sub(start) > TICK * 25 {
                return Err("the tiny buffers were never given back");
            }
        };
        reinit(boot, &mut nic, COUNT)?;
        if len != 0 {
            return Err("a frame written into a buffer smaller than its header");
        }
        works(&mut nic)?;
        Ok("given-back")
    })();
    case("net-rx-buffer-shorter-than-header", r);
    // Buffers outside guest RAM.
    let r = tx_raw(&mut nic, outside, 100).map_or(Ok(()), |_| Ok(())).and_then(|()| expect_reset(boot, &mut nic, COUNT));
    case("net-tx-buffer-outside-ram", r);
    let good = nic.rx_base;
    let r = (|| {
        nic.dev.reset();
        nic = Nic::up_with(boot, RX_BUF as u32, 8, Some(outside))?;
        let peer = nic.peer;
        nic.arp(1, [0; 6], peer)?;
        let asked = nic.dev.wait_needs_reset();
        nic.dev.reset();
        nic = Nic::up_with(boot, RX_BUF as u32, COUNT, Some(good))?;
        if !asked {
            return Err("the device did not ask for a reset");
        }
        works(&mut nic)?;
        Ok("needs-reset")
    })();
    // The NIC's buffers are back at their DMA memory for the next cases.
    case("net-rx-buffer-outside-ram", r);
    // A transmit index racing past the queue.
    let size = nic.txq.size;
    let head = Device::write_chain(&mut nic.txq, &[(tx, (HDR + 60) as u32, false)]);
    nic.dev.publish(&mut nic.txq, head, size + 20);
    let r = expect_reset(boot, &mut nic, COUNT);
    case("net-tx-avail-index-racing-ahead", r);
    nic.dev.reset();
    true
}
