//! `hostile`: a driver that breaks the rules on purpose. Each case drives the
//! first writable disk (and checks the rng) in a way the virtio specification
//! forbids, and expects the device to refuse it, ignore it, or set
//! DEVICE_NEEDS_RESET, never to hang or corrupt the disk. After every case
//! the disk is reset and must work again.

use crate::bootinfo::BootInfo;
use crate::virtio::{
    device_type, dma_alloc, dma_fits, find_devices, Device, DriverError, MmioEntry, Mode, Queue, DESC_F_NEXT,
    DESC_F_WRITE, MAGIC, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_NUM, QUEUE_READY, QUEUE_SEL,
    S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, STATUS, VIRTIO_F_VERSION_1,
};
use crate::{EXIT_FAILED, EXIT_OK};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_GET_ID: u32 = 8;
const ALL: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

fn wr<T>(addr: u64, v: T) {
    // SAFETY: DMA memory from `dma_alloc`, identity mapped and user writable.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: as for `wr`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

struct Bufs {
    hdr: u64,
    data: u64,
    status: u64,
}

fn header(b: &Bufs, t: u32, sector: u64) {
    wr(b.hdr, t);
    wr(b.hdr + 4, 0u32);
    wr(b.hdr + 8, sector);
    wr(b.status, 0xffu8);
}

/// A disk that is up and serving queue 0.
fn up(e: &MmioEntry) -> Result<(Device, Queue), DriverError> {
    let mut dev = Device::init(e, VIRTIO_F_VERSION_1, Mode::Poll)?;
    let q = dev.queue(0)?;
    dev.start()?;
    Ok((dev, q))
}

/// A GET_ID round trip: the proof that the device works.
fn works(dev: &mut Device, q: &mut Queue, b: &Bufs) -> Result<(), DriverError> {
    header(b, T_GET_ID, 0);
    let used = dev.transact(q, &[(b.hdr, 16, false), (b.data, 20, true), (b.status, 1, true)])?;
    if used != 21 || rd::<u8>(b.status) != 0 {
        return Err("the device does not answer a valid request");
    }
    Ok(())
}

/// Sets up queue 0 with raw values and sets DRIVER_OK.
fn bad_geometry(e: &MmioEntry, size: u32, desc: u64) -> Result<&'static str, DriverError> {
    let dev = Device::init(e, VIRTIO_F_VERSION_1, Mode::Poll)?;
    let rings = dma_alloc(0x3000, 0x1000).ok_or("out of DMA memory")?;
    dev.set_reg(QUEUE_SEL, 0);
    dev.set_reg(QUEUE_NUM, size);
    for (reg, addr) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, rings + 0x1000), (QUEUE_DEVICE, rings + 0x2000)] {
        dev.set_reg(reg, addr as u32);
        dev.set_reg(reg + 4, (addr >> 32) as u32);
    }
    dev.set_reg(QUEUE_READY, 1);
    dev.set_reg(STATUS, ALL);
    let status = dev.reg(STATUS);
    dev.reset();
    if status & S_NEEDS_RESET == 0 {
        return Err("the device accepted the queue");
    }
    Ok("needs-reset")
}

fn refused_features(e: &MmioEntry, want: u64) -> Result<&'static str, DriverError> {
    match Device::init(e, want, Mode::Poll) {
        Err(_) => Ok("refused"),
        Ok(dev) => {
            dev.reset();
            // `init` masks to what the device offers; force the bits.
            let d = Device::init(e, VIRTIO_F_VERSION_1, Mode::Poll)?;
            d.reset();
            d.set_reg(STATUS, S_ACKNOWLEDGE);
            d.set_reg(STATUS, S_ACKNOWLEDGE | S_DRIVER);
            d.set_reg(crate::virtio::DRIVER_FEATURES_SEL, 0);
            d.set_reg(crate::virtio::DRIVER_FEATURES, want as u32);
            d.set_reg(crate::virtio::DRIVER_FEATURES_SEL, 1);
            d.set_reg(crate::virtio::DRIVER_FEATURES, (want >> 32) as u32);
            d.set_reg(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
            let s = d.reg(STATUS);
            d.reset();
            if s & S_FEATURES_OK != 0 {
                return Err("the device accepted features it never offered");
            }
            Ok("refused")
        }
    }
}

fn queue_writes_after_driver_ok(e: &MmioEntry, b: &Bufs) -> Result<&'static str, DriverError> {
    let (mut dev, mut q) = up(e)?;
    dev.set_reg(QUEUE_SEL, 0);
    dev.set_reg(QUEUE_NUM, 2);
    dev.set_reg(QUEUE_DESC, 0xdead_0000);
    dev.set_reg(QUEUE_READY, 0);
    if dev.reg(QUEUE_READY) != 1 {
        return Err("queue setup changed after DRIVER_OK");
    }
    works(&mut dev, &mut q, b)?;
    dev.reset();
    Ok("ignored")
}

fn register_abuse(e: &MmioEntry, b: &Bufs) -> Result<&'static str, DriverError> {
    let (mut dev, mut q) = up(e)?;
    // SAFETY: reads and writes of the device's own MMIO window, at odd widths
    // and offsets on purpose.
    unsafe {
        let base = e.base;
        let _ = core::ptr::read_volatile((base + 2) as *const u16);
        let _ = core::ptr::read_volatile((base + 0x71) as *const u8);
        core::ptr::write_volatile((base + STATUS) as *mut u8, 0);
        core::ptr::write_volatile((base + 0x72) as *mut u16, 0xffff);
        let _ = core::ptr::read_volatile((base + 0xffc) as *const u32);
        core::ptr::write_volatile((base + 0xff8) as *mut u64, u64::MAX);
        core::ptr::write_volatile((base + MAGIC) as *mut u32, 0);
    }
    if dev.reg(MAGIC) != 0x7472_6976 || dev.reg(STATUS) != ALL {
        return Err("odd accesses changed the device");
    }
    works(&mut dev, &mut q, b)?;
    dev.reset();
    Ok("ignored")
}

/// Publishes a hand-made chain and expects NEEDS_RESET.
fn bad_chain(
    e: &MmioEntry,
    build: impl FnOnce(&mut Device, &mut Queue) -> (u16, u16),
) -> Result<&'static str, DriverError> {
    let (mut dev, mut q) = up(e)?;
    let (head, advance) = build(&mut dev, &mut q);
    dev.publish(&mut q, head, advance);
    let ok = dev.wait_needs_reset();
    dev.reset();
    if ok {
        Ok("needs-reset")
    } else {
        Err("the device did not ask for a reset")
    }
}

fn chain_longer_than_queue(e: &MmioEntry, b: &Bufs) -> Result<&'static str, DriverError> {
    let (mut dev, mut q) = up(e)?;
    let n = q.size;
    header(b, T_IN, 0);
    Device::write_desc(&q, 0, b.hdr, 16, DESC_F_NEXT, 1);
    for slot in 1..n {
        // Every descriptor points on, the last back to the first.
        let addr = if slot == n - 1 { b.status } else { b.data };
        let len = if slot == n - 1 { 1 } else { 512 };
        Device::write_desc(&q, slot, addr, len, DESC_F_NEXT | DESC_F_WRITE, (slot + 1) % n);
    }
    dev.publish(&mut q, 0, 1);
    let start_used = dev.wait_used(&mut q, 0);
    dev.reset();
    match start_used {
        Ok(_) => Ok("bounded"),
        Err(_) if dev.reg(STATUS) & S_NEEDS_RESET != 0 => Ok("needs-reset"),
        Err(e) => Err(e),
    }
}

fn notify_storm(e: &MmioEntry, b: &Bufs) -> Result<&'static str, DriverError> {
    let (mut dev, mut q) = up(e)?;
    for _ in 0..100_000 {
        dev.notify(0);
    }
    for _ in 0..1_000 {
        dev.notify(7);
    }
    works(&mut dev, &mut q, b)?;
    dev.reset();
    Ok("survived")
}

/// Runs every case on the first writable disk, then checks the disk and the
/// rng still work.
pub fn hostile(boot: &BootInfo) -> u8 {
    if !dma_fits(boot.ram_top) {
        report!("error hostile needs at least 5 MiB of RAM");
        return EXIT_FAILED;
    }
    let (entries, n) = find_devices(boot.cmdline);
    let mut disk = None;
    let mut rng = None;
    for e in entries[..n].iter().flatten() {
        match device_type(e) {
            2 if disk.is_none() => disk = Some(*e),
            4 if rng.is_none() => rng = Some(*e),
            _ => {}
        }
    }
    let (Some(disk), Some(rng)) = (disk, rng) else {
        report!("error hostile needs a disk and an rng");
        return EXIT_FAILED;
    };
    let (Some(hdr), Some(data), Some(status)) =
        (dma_alloc(16, 16), dma_alloc(8192, 4096), dma_alloc(1, 1))
    else {
        report!("error hostile out of DMA memory");
        return EXIT_FAILED;
    };
    let b = Bufs { hdr, data, status };
    let outside = boot.ram_top.next_multiple_of(0x1000) + 0x10_0000;
    let valid_rings = match dma_alloc(0x1000, 0x1000) {
        Some(a) => a,
        None => return EXIT_FAILED,
    };

    let mut cases = 0;
    let mut failed = 0;
    let mut case = |name: &str, r: Result<&'static str, DriverError>| {
        cases += 1;
        match r {
            Ok(outcome) => report!("hostile case={} outcome={}", name, outcome),
            Err(why) => {
                failed += 1;
                report!("error hostile case={} {}", name, why);
            }
        }
    };
    case("queue-size-zero", bad_geometry(&disk, 0, valid_rings));
    case("queue-size-not-power-of-two", bad_geometry(&disk, 3, valid_rings));
    case("queue-size-above-max", bad_geometry(&disk, 1024, valid_rings));
    case("queue-size-huge", bad_geometry(&disk, 0x1_0000, valid_rings));
    case("ring-misaligned", bad_geometry(&disk, 16, valid_rings + 2));
    case("ring-outside-ram", bad_geometry(&disk, 16, outside));
    case("ring-in-mmio-gap", bad_geometry(&disk, 16, 0xfec0_0000));
    case("feature-never-offered", refused_features(&disk, VIRTIO_F_VERSION_1 | 1));
    case("no-version-1", refused_features(&disk, 0));
    case("queue-writes-after-driver-ok", queue_writes_after_driver_ok(&disk, &b));
    case("register-abuse", register_abuse(&disk, &b));
    case(
        "descriptor-loop",
        bad_chain(&disk, |_, q| {
            // An OUT request whose two read-only descriptors point at each
            // other: no status byte, and the write must not happen.
            header(&b, T_OUT, 0);
            Device::write_desc(q, 0, b.hdr, 16, DESC_F_NEXT, 1);
            Device::write_desc(q, 1, b.data, 512, DESC_F_NEXT, 0);
            (0, 1)
        }),
    );
    case("chain-longer-than-queue", chain_longer_than_queue(&disk, &b));
    case("avail-index-racing-ahead", bad_chain(&disk, |_, _| (0, crate::virtio::MAX_QUEUE_SIZE + 20)));
    case("head-out-of-range", bad_chain(&disk, |_, _| (crate::virtio::MAX_QUEUE_SIZE + 72, 1)));
    case(
        "buffer-outside-ram",
        bad_chain(&disk, |_, q| {
            header(&b, T_OUT, 0);
            let head = Device::write_chain(q, &[(b.hdr, 16, false), (outside, 512, false), (b.status, 1, true)]);
            (head, 1)
        }),
    );
    case(
        "buffer-in-mmio-gap",
        bad_chain(&disk, |_, q| {
            header(&b, T_IN, 0);
            let head = Device::write_chain(q, &[(b.hdr, 16, false), (0xfee0_0000, 512, true), (b.status, 1, true)]);
            (head, 1)
        }),
    );
    case("notify-storm", notify_storm(&disk, &b));
    let mut more = |name: &str, r: Result<&'static str, DriverError>| case(name, r);
    let nic = crate::net::hostile_cases(boot, outside, &mut more);
    let vsock = crate::vsock::hostile_cases(boot, &mut more);

    // Both devices still serve honest requests.
    let disk_ok = up(&disk).and_then(|(mut dev, mut q)| {
        header(&b, T_IN, 0);
        let used = dev.transact(&mut q, &[(b.hdr, 16, false), (b.data, 512, true), (b.status, 1, true)])?;
        dev.reset();
        if used != 513 || rd::<u8>(b.status) != 0 {
            return Err("the disk does not read after the abuse");
        }
        Ok(rd::<u8>(b.data))
    });
    let rng_ok = Device::init(&rng, VIRTIO_F_VERSION_1, Mode::Poll).and_then(|mut dev| {
        let mut q = dev.queue(0)?;
        dev.start()?;
        let n = dev.transact(&mut q, &[(b.data, 32, true)])?;
        dev.reset();
        if n != 32 {
            return Err("short random read");
        }
        Ok(())
    });
    match (disk_ok, rng_ok) {
        (Ok(first), Ok(())) if failed == 0 => {
            report!("hostile ok cases={} first_byte={:#x} nic={} vsock={}", cases, first, nic as u8, vsock as u8);
            EXIT_OK
        }
        (d, r) => {
            if let Err(why) = d {
                report!("error hostile disk {}", why);
            }
            if let Err(why) = r {
                report!("error hostile rng {}", why);
            }
            report!("hostile failed cases={} failed={}", cases, failed);
            EXIT_FAILED
        }
    }
}
