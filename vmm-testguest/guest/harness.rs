//! Scenarios for testing a device of your own: `probe` reports what every
//! virtio-mmio device announces, `pio` and `mmio` read and write the ports
//! or addresses the command line names, and `virtio` sends one request to a
//! device of any type and reports its answer.

use crate::bootinfo::BootInfo;
use crate::cmdline::{parse_u64, Args};
use crate::virtio::{
    device_type, dma_alloc, dma_fits, find_devices, Device, Mode, CONFIG, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
    QUEUE_NUM_MAX, QUEUE_SEL, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::{io, EXIT_FAILED, EXIT_OK};

/// Most queues `probe` looks for on one device.
const MAX_PROBED_QUEUES: u32 = 16;
/// Most configuration bytes `probe` reads (`testguest.probe_config=N`).
const MAX_PROBED_CONFIG: u64 = 256;
/// Most bytes a `virtio` request sends or takes back.
const MAX_VIRTIO_BYTES: usize = 256;

fn rd32(addr: u64) -> u32 {
    // SAFETY: a device register in the identity-mapped first 4 GiB.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Writes `bytes` as hexadecimal after the current report text.
fn hex(bytes: impl Iterator<Item = u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        io::serial_write(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]);
    }
}

/// `probe`: one line per `virtio_mmio.device=` entry with its type, both
/// feature words, each queue's maximum size and the first configuration
/// bytes. A window without a virtio-mmio v2 device reports `type=0`.
pub fn probe(boot: &BootInfo, args: &Args) -> u8 {
    let (entries, n) = find_devices(boot.cmdline);
    let config_len = args.probe_config.unwrap_or(16).min(MAX_PROBED_CONFIG);
    for (i, e) in entries[..n].iter().flatten().enumerate() {
        let kind = device_type(e);
        use core::fmt::Write as _;
        let _ = write!(io::Serial, "testguest: probe dev={} base={:#x} irq={} type={}", i, e.base, e.irq, kind);
        if kind != 0 {
            wr32(e.base + DEVICE_FEATURES_SEL, 0);
            let mut features = u64::from(rd32(e.base + DEVICE_FEATURES));
            wr32(e.base + DEVICE_FEATURES_SEL, 1);
            features |= u64::from(rd32(e.base + DEVICE_FEATURES)) << 32;
            let _ = write!(io::Serial, " features={:#x} queues=", features);
            for q in 0..MAX_PROBED_QUEUES {
                wr32(e.base + QUEUE_SEL, q);
                let max = rd32(e.base + QUEUE_NUM_MAX);
                if max == 0 {
                    break;
                }
                let _ = write!(io::Serial, "{}{}", if q == 0 { "" } else { "," }, max);
            }
            wr32(e.base + QUEUE_SEL, 0);
            io::serial_write(b" config=");
            hex((0..config_len).map(|off| rd8(e.base + CONFIG + off)));
        }
        io::serial_write(b"\n");
    }
    report!("probe devices={}", n);
    EXIT_OK
}

/// One access of `pio`/`mmio`: `r<width>@<addr>` or
/// `w<width>@<addr>=<value>`, width 1, 2 or 4.
struct Access {
    write: bool,
    width: u8,
    addr: u64,
    value: u64,
}

fn parse_access(s: &[u8]) -> Option<Access> {
    let (write, rest) = match s.split_first()? {
        (b'r', rest) => (false, rest),
        (b'w', rest) => (true, rest),
        _ => return None,
    };
    let at = rest.iter().position(|&b| b == b'@')?;
    let width = u8::try_from(parse_u64(&rest[..at])?).ok().filter(|w| matches!(w, 1 | 2 | 4))?;
    let rest = &rest[at + 1..];
    let (addr, value) = match rest.iter().position(|&b| b == b'=') {
        Some(eq) if write => (parse_u64(&rest[..eq])?, parse_u64(&rest[eq + 1..])?),
        None if !write => (parse_u64(rest)?, 0),
        _ => return None,
    };
    Some(Access { write, width, addr, value })
}

fn port_access(a: &Access) -> Option<u64> {
    let port = u16::try_from(a.addr).ok()?;
    // SAFETY: port I/O has no memory effect; the guest runs with IOPL 3.
    unsafe {
        use core::arch::asm;
        match (a.write, a.width) {
            (true, 1) => asm!("out dx, al", in("dx") port, in("al") a.value as u8, options(nomem, nostack)),
            (true, 2) => asm!("out dx, ax", in("dx") port, in("ax") a.value as u16, options(nomem, nostack)),
            (true, _) => asm!("out dx, eax", in("dx") port, in("eax") a.value as u32, options(nomem, nostack)),
            (false, 1) => {
                let v: u8;
                asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack));
                return Some(u64::from(v));
            }
            (false, 2) => {
                let v: u16;
                asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack));
                return Some(u64::from(v));
            }
            (false, _) => {
                let v: u32;
                asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack));
                return Some(u64::from(v));
            }
        }
    }
    Some(a.value)
}

fn mmio_access(a: &Access) -> Option<u64> {
    // Only the identity-mapped first 4 GiB, naturally aligned.
    if a.addr >= 1 << 32 || !a.addr.is_multiple_of(u64::from(a.width)) {
        return None;
    }
    // SAFETY: an aligned address in the identity-mapped, user-accessible
    // first 4 GiB, as the person testing their device asked.
    unsafe {
        match (a.write, a.width) {
            (true, 1) => core::ptr::write_volatile(a.addr as *mut u8, a.value as u8),
            (true, 2) => core::ptr::write_volatile(a.addr as *mut u16, a.value as u16),
            (true, _) => core::ptr::write_volatile(a.addr as *mut u32, a.value as u32),
            (false, 1) => return Some(u64::from(core::ptr::read_volatile(a.addr as *const u8))),
            (false, 2) => return Some(u64::from(core::ptr::read_volatile(a.addr as *const u16))),
            (false, _) => return Some(u64::from(core::ptr::read_volatile(a.addr as *const u32))),
        }
    }
    Some(a.value)
}

/// `pio` (`testguest.pio=`) or `mmio` (`testguest.mmio=`): each access of
/// the comma-separated list in turn, one report line each.
pub fn accesses(name: &str, list: &'static [u8], mmio: bool) -> u8 {
    let mut count = 0;
    for word in list.split(|&b| b == b',').filter(|w| !w.is_empty()) {
        let done = parse_access(word).and_then(|a| {
            let v = if mmio { mmio_access(&a) } else { port_access(&a) }?;
            Some((a, v))
        });
        let Some((a, v)) = done else {
            report!("error {} bad access \"{}\"", name, core::str::from_utf8(word).unwrap_or("?"));
            return EXIT_FAILED;
        };
        let op = if a.write { "write" } else { "read" };
        report!("{} {} addr={:#x} width={} value={:#x}", name, op, a.addr, a.width, v);
        count += 1;
    }
    report!("{} ok accesses={}", name, count);
    EXIT_OK
}

/// `virtio` (`testguest.virtio=TYPE:QUEUE:HEX:LEN`): finds the first device
/// of TYPE, starts it with every queue it has, sends on QUEUE one chain of a
/// driver-readable buffer holding HEX (bytes in hexadecimal, may be empty)
/// and a device-writable buffer of LEN bytes, polls for the answer and
/// reports the used length and the bytes written back.
pub fn virtio(boot: &BootInfo, args: &Args) -> u8 {
    let Some(req) = parse_request(args.virtio) else {
        report!("error virtio bad testguest.virtio= (want TYPE:QUEUE:HEX:LEN)");
        return EXIT_FAILED;
    };
    if !dma_fits(boot.ram_top) {
        report!("error virtio needs at least 6 MiB of RAM");
        return EXIT_FAILED;
    }
    match send(boot, &req) {
        Ok(()) => EXIT_OK,
        Err(msg) => {
            report!("error virtio type={} {}", req.kind, msg);
            EXIT_FAILED
        }
    }
}

struct Request {
    kind: u32,
    queue: u32,
    out: [u8; MAX_VIRTIO_BYTES],
    out_len: usize,
    in_len: usize,
}

fn parse_request(s: &[u8]) -> Option<Request> {
    let mut parts = s.split(|&b| b == b':');
    let kind = u32::try_from(parse_u64(parts.next()?)?).ok()?;
    let queue = u32::try_from(parse_u64(parts.next()?)?).ok()?;
    let hex = parts.next()?;
    let in_len = usize::try_from(parse_u64(parts.next()?)?).ok()?;
    if parts.next().is_some() || !hex.len().is_multiple_of(2) || hex.len() / 2 > MAX_VIRTIO_BYTES || in_len > MAX_VIRTIO_BYTES {
        return None;
    }
    let mut out = [0u8; MAX_VIRTIO_BYTES];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(Request { kind, queue, out, out_len: hex.len() / 2, in_len })
}

fn send(boot: &BootInfo, req: &Request) -> Result<(), &'static str> {
    let (entries, n) = find_devices(boot.cmdline);
    let entry = entries[..n].iter().flatten().find(|e| device_type(e) == req.kind).ok_or("no device of that type")?;
    let mut dev = Device::init(entry, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, Mode::Poll)?;
    let mut target = None;
    for index in 0..MAX_PROBED_QUEUES {
        dev.set_reg(QUEUE_SEL, index);
        if dev.reg(QUEUE_NUM_MAX) == 0 {
            break;
        }
        let q = dev.queue(index)?;
        if index == req.queue {
            target = Some(q);
        }
    }
    let mut q = target.ok_or("no such queue")?;
    dev.start()?;
    let out = dma_alloc(MAX_VIRTIO_BYTES as u64, 16).ok_or("out of DMA memory")?;
    let inb = dma_alloc(MAX_VIRTIO_BYTES as u64, 16).ok_or("out of DMA memory")?;
    for (i, &b) in req.out[..req.out_len].iter().enumerate() {
        // SAFETY: DMA memory from `dma_alloc`, identity mapped and writable.
        unsafe { core::ptr::write_volatile((out + i as u64) as *mut u8, b) };
    }
    let mut bufs = [(0u64, 0u32, false); 2];
    let mut k = 0;
    if req.out_len > 0 {
        bufs[k] = (out, req.out_len as u32, false);
        k += 1;
    }
    if req.in_len > 0 {
        bufs[k] = (inb, req.in_len as u32, true);
        k += 1;
    }
    let used = dev.transact(&mut q, &bufs[..k])?;
    dev.reset();
    use core::fmt::Write as _;
    let _ = write!(
        io::Serial,
        "testguest: virtio type={} queue={} size={} used_len={} data=",
        req.kind, req.queue, q.size, used
    );
    let shown = (used as usize).min(req.in_len);
    // SAFETY: as above; the device wrote at most `in_len` bytes there.
    hex((0..shown).map(|i| unsafe { core::ptr::read_volatile((inb + i as u64) as *const u8) }));
    io::serial_write(b"\n");
    Ok(())
}
