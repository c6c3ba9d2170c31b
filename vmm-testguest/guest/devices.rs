//! Scenarios that drive virtio devices: `blk`, `rng`, `console`, each polled
//! or (with the `-irq` suffix) interrupt driven.

use crate::bootinfo::BootInfo;
use crate::shared::{blk_pattern_byte, BLK_PATTERN_LEN, BLK_PATTERN_SECTOR, CONSOLE_MESSAGE};
use crate::virtio::{
    device_type, dma_alloc, dma_fits, find_devices, Device, DriverError, MmioEntry, Mode, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::{EXIT_FAILED, EXIT_OK};

const TYPE_BLOCK: u32 = 2;
const TYPE_CONSOLE: u32 = 3;
const TYPE_RNG: u32 = 4;

const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

fn wr<T>(addr: u64, v: T) {
    // SAFETY: DMA memory from `dma_alloc`, identity mapped and user writable.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: as for `wr`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Runs `f` on every device of type `kind`; reports and returns the status.
fn for_each(
    boot: &BootInfo,
    kind: u32,
    name: &str,
    mode: Mode,
    mut f: impl FnMut(&MmioEntry, usize) -> Result<(), DriverError>,
) -> u8 {
    if !dma_fits(boot.ram_top) {
        report!("error {} needs at least 5 MiB of RAM", name);
        return EXIT_FAILED;
    }
    let (entries, n) = find_devices(boot.cmdline);
    let mut count = 0;
    let mut failed = false;
    for e in entries[..n].iter().flatten() {
        if device_type(e) != kind {
            continue;
        }
        if let Err(msg) = f(e, count) {
            report!("error {} dev={} mode={} {}", name, count, mode.name(), msg);
            failed = true;
        }
        count += 1;
    }
    if count == 0 {
        report!("error {} no device found", name);
        return EXIT_FAILED;
    }
    report!("{} {} mode={} devices={}", name, if failed { "failed" } else { "ok" }, mode.name(), count);
    if failed {
        EXIT_FAILED
    } else {
        EXIT_OK
    }
}

struct BlkBufs {
    hdr: u64,
    data: u64,
    status: u64,
}

fn blk_request(
    dev: &mut Device,
    q: &mut crate::virtio::Queue,
    b: &BlkBufs,
    t: u32,
    sector: u64,
    len: u32,
    data_writable: bool,
) -> Result<(u8, u32), DriverError> {
    wr(b.hdr, t);
    wr(b.hdr + 4, 0u32);
    wr(b.hdr + 8, sector);
    wr(b.status, 0xffu8);
    let used = if len == 0 {
        dev.transact(q, &[(b.hdr, 16, false), (b.status, 1, true)])?
    } else {
        dev.transact(q, &[(b.hdr, 16, false), (b.data, len, data_writable), (b.status, 1, true)])?
    };
    Ok((rd::<u8>(b.status), used))
}

fn expect(got: (u8, u32), status: u8, used: u32, what: DriverError) -> Result<(), DriverError> {
    if got == (status, used) {
        Ok(())
    } else {
        Err(what)
    }
}

fn blk_one(e: &MmioEntry, index: usize, mode: Mode) -> Result<(), DriverError> {
    let want = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | BLK_F_RO | BLK_F_FLUSH | BLK_F_BLK_SIZE | BLK_F_SEG_MAX;
    let mut dev = Device::init(e, want, mode)?;
    let mut q = dev.queue(0)?;
    dev.start()?;
    let capacity = dev.config64(0);
    let ro = dev.features & BLK_F_RO != 0;
    let len = BLK_PATTERN_LEN as u32;
    let b = BlkBufs {
        hdr: dma_alloc(16, 16).ok_or("out of DMA memory")?,
        data: dma_alloc(u64::from(len), 4096).ok_or("out of DMA memory")?,
        status: dma_alloc(1, 1).ok_or("out of DMA memory")?,
    };
    let id = dma_alloc(20, 8).ok_or("out of DMA memory")?;
    wr(b.hdr, T_GET_ID);
    wr(b.hdr + 8, 0u64);
    wr(b.status, 0xffu8);
    let used = dev.transact(&mut q, &[(b.hdr, 16, false), (id, 20, true), (b.status, 1, true)])?;
    if rd::<u8>(b.status) != S_OK || used != 21 {
        return Err("GET_ID failed");
    }
    let mut id_bytes = [0u8; 20];
    for (i, byte) in id_bytes.iter_mut().enumerate() {
        *byte = rd::<u8>(id + i as u64);
    }
    let id_len = id_bytes.iter().position(|&c| c == 0).unwrap_or(20);
    let id_str = core::str::from_utf8(&id_bytes[..id_len]).unwrap_or("<binary>");
    let id_str = if id_str.is_empty() { "-" } else { id_str };

    let tag = if mode == Mode::Irq { 1 } else { 0 };
    for i in 0..BLK_PATTERN_LEN {
        wr(b.data + i as u64, blk_pattern_byte(i, tag));
    }
    if ro {
        let r = blk_request(&mut dev, &mut q, &b, T_OUT, BLK_PATTERN_SECTOR, len, false)?;
        expect(r, S_IOERR, 1, "a write to the read-only disk was not refused")?;
        report!("blk dev={} ro=1 capacity={} id={} write=ioerr", index, capacity, id_str);
    } else {
        let r = blk_request(&mut dev, &mut q, &b, T_OUT, BLK_PATTERN_SECTOR, len, false)?;
        expect(r, S_OK, 1, "write failed")?;
        let r = blk_request(&mut dev, &mut q, &b, T_FLUSH, 0, 0, false)?;
        expect(r, S_OK, 1, "flush failed")?;
        for i in 0..BLK_PATTERN_LEN {
            wr(b.data + i as u64, 0u8);
        }
        let r = blk_request(&mut dev, &mut q, &b, T_IN, BLK_PATTERN_SECTOR, len, true)?;
        expect(r, S_OK, len + 1, "read failed")?;
        for i in 0..BLK_PATTERN_LEN {
            if rd::<u8>(b.data + i as u64) != blk_pattern_byte(i, tag) {
                return Err("read back different data");
            }
        }
        let r = blk_request(&mut dev, &mut q, &b, T_IN, capacity, 512, true)?;
        expect(r, S_IOERR, 1, "a read past the end was not refused")?;
        report!(
            "blk dev={} ro=0 capacity={} id={} write=ok flush=ok read=ok beyond=ioerr",
            index,
            capacity,
            id_str
        );
    }
    dev.reset();
    Ok(())
}

/// `blk`: on every disk, read the id and capacity; on writable disks write
/// the pattern, flush, read it back and compare, and check that a read past
/// the end fails; on read-only disks check that a write fails.
pub fn blk(boot: &BootInfo, mode: Mode) -> u8 {
    for_each(boot, TYPE_BLOCK, "blk", mode, |e, i| blk_one(e, i, mode))
}

/// `rng`: two 64-byte requests that must come back full, not zero, and
/// different.
pub fn rng(boot: &BootInfo, mode: Mode) -> u8 {
    for_each(boot, TYPE_RNG, "rng", mode, |e, _| {
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, mode)?;
        let mut q = dev.queue(0)?;
        dev.start()?;
        let a = dma_alloc(64, 64).ok_or("out of DMA memory")?;
        let b = dma_alloc(64, 64).ok_or("out of DMA memory")?;
        if dev.transact(&mut q, &[(a, 64, true)])? != 64 || dev.transact(&mut q, &[(b, 64, true)])? != 64 {
            return Err("short random read");
        }
        let (mut zero, mut same) = (true, true);
        for i in 0..64 {
            let (x, y) = (rd::<u8>(a + i), rd::<u8>(b + i));
            zero &= x == 0;
            same &= x == y;
        }
        dev.reset();
        if zero || same {
            return Err("random bytes are zero or repeat");
        }
        Ok(())
    })
}

/// `console`: writes [`CONSOLE_MESSAGE`] on the transmit queue.
pub fn console(boot: &BootInfo, mode: Mode) -> u8 {
    for_each(boot, TYPE_CONSOLE, "console", mode, |e, _| {
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, mode)?;
        let _rx = dev.queue(0)?;
        let mut tx = dev.queue(1)?;
        dev.start()?;
        let msg = CONSOLE_MESSAGE.as_bytes();
        let buf = dma_alloc(msg.len() as u64, 8).ok_or("out of DMA memory")?;
        for (i, &c) in msg.iter().enumerate() {
            wr(buf + i as u64, c);
        }
        if dev.transact(&mut tx, &[(buf, msg.len() as u32, false)])? != 0 {
            return Err("the device wrote into a transmit buffer");
        }
        dev.reset();
        Ok(())
    })
}

/// `bench-virtio` / `bench-virtio-irq`: round trips of one-byte rng requests
/// (notify, the device answers, the driver sees the used entry by polling or
/// by interrupt), in TSC cycles per request.
pub fn bench_virtio(boot: &BootInfo, mode: Mode, iters: u64) -> u8 {
    let name = if mode == Mode::Irq { "bench-virtio-irq" } else { "bench-virtio" };
    let mut cycles_per_op = 0;
    let status = for_each(boot, TYPE_RNG, name, mode, |e, index| {
        if index > 0 {
            return Ok(());
        }
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, mode)?;
        let mut q = dev.queue(0)?;
        dev.start()?;
        let buf = dma_alloc(1, 1).ok_or("out of DMA memory")?;
        for _ in 0..iters.min(100) {
            dev.transact(&mut q, &[(buf, 1, true)])?;
        }
        // SAFETY: rdtsc has no side effects and is allowed at CPL3.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        for _ in 0..iters {
            if dev.transact(&mut q, &[(buf, 1, true)])? != 1 {
                return Err("short answer");
            }
        }
        // SAFETY: as above.
        let end = unsafe { core::arch::x86_64::_rdtsc() };
        cycles_per_op = end.wrapping_sub(start) / iters;
        dev.reset();
        Ok(())
    });
    if status == EXIT_OK {
        report!("{} iters={} cycles_per_op={}", name, iters, cycles_per_op);
    }
    status
}

/// One workload of `bench-blk`.
struct BlkLoad {
    name: &'static str,
    write: bool,
    random: bool,
    bytes: u32,
    depth: usize,
}

const BLK_LOADS: [BlkLoad; 6] = [
    BlkLoad { name: "randread-4k-qd1", write: false, random: true, bytes: 4096, depth: 1 },
    BlkLoad { name: "randwrite-4k-qd1", write: true, random: true, bytes: 4096, depth: 1 },
    BlkLoad { name: "randread-4k-qd32", write: false, random: true, bytes: 4096, depth: 32 },
    BlkLoad { name: "randwrite-4k-qd32", write: true, random: true, bytes: 4096, depth: 32 },
    BlkLoad { name: "read-128k", write: false, random: false, bytes: 128 * 1024, depth: 1 },
    BlkLoad { name: "write-128k", write: true, random: false, bytes: 128 * 1024, depth: 1 },
];

/// `bench-blk`: 4 KiB random reads and writes at queue depth 1 and 32, and
/// 128 KiB sequential ones, on the first writable disk, polled. Reports TSC
/// cycles per request for each workload.
pub fn bench_blk(boot: &BootInfo, iters: u64) -> u8 {
    let mut done = false;
    for_each(boot, TYPE_BLOCK, "bench-blk", Mode::Poll, |e, _| {
        if done {
            return Ok(());
        }
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | BLK_F_RO, Mode::Poll)?;
        if dev.features & BLK_F_RO != 0 {
            dev.reset();
            return Ok(());
        }
        done = true;
        let mut q = dev.queue(0)?;
        dev.start()?;
        let capacity = dev.config64(0);
        let hdrs = dma_alloc(16 * 32, 16).ok_or("out of DMA memory")?;
        let statuses = dma_alloc(32, 1).ok_or("out of DMA memory")?;
        let data = dma_alloc(128 * 1024, 4096).ok_or("out of DMA memory")?;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for load in &BLK_LOADS {
            let sectors = u64::from(load.bytes / 512);
            if capacity < sectors * 64 {
                return Err("disk too small for the benchmark");
            }
            let span = capacity / sectors;
            let batches = (iters / load.depth as u64).max(1);
            let mut next_seq = 0u64;
            let mut start = 0u64;
            for round in 0..batches + 1 {
                if round == 1 {
                    // The first round warms up; time the rest.
                    // SAFETY: rdtsc has no side effects.
                    start = unsafe { core::arch::x86_64::_rdtsc() };
                }
                let mut chains: [[(u64, u32, bool); 3]; 32] = [[(0, 0, false); 3]; 32];
                for (i, chain) in chains.iter_mut().enumerate().take(load.depth) {
                    let slot = if load.random {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % span
                    } else {
                        next_seq = (next_seq + 1) % span;
                        next_seq
                    };
                    let hdr = hdrs + 16 * i as u64;
                    wr(hdr, if load.write { T_OUT } else { T_IN });
                    wr(hdr + 4, 0u32);
                    wr(hdr + 8, slot * sectors);
                    let buf = data + (i as u64 * u64::from(load.bytes)) % (128 * 1024);
                    *chain = [(hdr, 16, false), (buf, load.bytes, !load.write), (statuses + i as u64, 1, true)];
                }
                let refs: [&[(u64, u32, bool)]; 32] = core::array::from_fn(|i| &chains[i][..]);
                dev.transact_batch(&mut q, &refs[..load.depth])?;
                for i in 0..load.depth {
                    if rd::<u8>(statuses + i as u64) != S_OK {
                        return Err("a benchmark request failed");
                    }
                }
            }
            // SAFETY: as above.
            let cycles = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start);
            let requests = batches * load.depth as u64;
            report!(
                "bench-blk load={} bytes={} depth={} requests={} cycles_per_op={}",
                load.name,
                load.bytes,
                load.depth,
                requests,
                cycles / requests
            );
        }
        dev.reset();
        Ok(())
    })
}
