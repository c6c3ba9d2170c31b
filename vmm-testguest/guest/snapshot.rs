//! The `snapshot` scenario: a guest that can be saved and restored at any
//! moment and checks that everything carried on.
//!
//! Each round waits for a tick of the local APIC timer (periodic, about
//! 250 Hz) and then:
//! - writes one word of a 1 MiB region and keeps a running sum of the
//!   region, recomputed in full every [`REPORT_EVERY`] rounds (memory that
//!   was not restored, or restored from the wrong moment, shows as a
//!   mismatch);
//! - counts itself in two places (a counter and its copy in another page);
//! - every [`BLK_EVERY`] rounds, waits for the write to the first virtio-blk
//!   disk it left in flight, reads the sector back and compares, then
//!   leaves the next write in flight (a snapshot taken meanwhile must carry
//!   it through);
//! - checks that the PIT (IOAPIC pin 0 or 2) ticks too;
//! - polls the keyboard: Ctrl-Alt-Del ends the scenario.
//!
//! Every [`REPORT_EVERY`] rounds it reports `snapshot round=...` with its
//! counters and the generation port's counter and identity. A failed check
//! reports `error snapshot ...` and fails the scenario.

use crate::boot::irq_count;
use crate::bootinfo::BootInfo;
use crate::scenarios::{kbd_probe, CtrlAltDel};
use crate::virtio::{device_type, dma_alloc, dma_fits, find_devices, Device, Mode, Queue, VIRTIO_F_VERSION_1};
use crate::{apic, io, EXIT_FAILED, EXIT_OK};

const LAPIC_TIMER_VECTOR: u8 = 0x50;
/// 16 x 250,000 bus cycles of KVM's 1 GHz APIC bus: 4 ms.
const LAPIC_TIMER_COUNT: u32 = 250_000;
/// PIT divisor for about 250 Hz.
const PIT_DIVISOR: u16 = 4773;
const REGION_BYTES: u64 = 1 << 20;
const REGION_WORDS: u64 = REGION_BYTES / 8;
const REPORT_EVERY: u64 = 250;
const BLK_EVERY: u64 = 8;
/// The sectors the scenario writes (from 128 KiB into the disk).
const BLK_FIRST_SECTOR: u64 = 256;
const BLK_SECTORS: u64 = 128;
/// Spins without a timer tick before the timer counts as stopped (seconds
/// of running, on any host; a paused VM does not spin).
const TICK_SPIN_LIMIT: u64 = 1 << 31;
const GENERATION_PORT: u16 = 0x5a0;

/// The word written at round `r`.
fn word(r: u64) -> u64 {
    r.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
}

fn rd(addr: u64) -> u64 {
    // SAFETY: DMA memory from `dma_alloc`, identity mapped, user writable.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn wr(addr: u64, v: u64) {
    // SAFETY: as for `rd`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

fn ticks() -> (u32, u32) {
    let pit = irq_count(apic::IRQ_VECTOR_BASE).wrapping_add(irq_count(apic::IRQ_VECTOR_BASE + 2));
    (irq_count(LAPIC_TIMER_VECTOR), pit)
}

fn generation() -> (u64, u64) {
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = io::inb(GENERATION_PORT + i as u16);
    }
    let mut c = [0u8; 8];
    let mut id = [0u8; 8];
    c.copy_from_slice(&b[..8]);
    id.copy_from_slice(&b[8..]);
    (u64::from_le_bytes(c), u64::from_le_bytes(id))
}

/// The first virtio-blk disk, driven by interrupt, with one write that may
/// be in flight.
struct Disk {
    dev: Device,
    q: Queue,
    hdr: u64,
    data: u64,
    check: u64,
    status: u64,
    /// The round whose write is in flight, and the interrupt count before it.
    pending: Option<(u64, u32)>,
    writes: u64,
    /// The round whose sector the device last read into `check` (a page
    /// only the device writes: a snapshot that missed the device's writes
    /// shows there).
    last_read: Option<u64>,
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;

impl Disk {
    fn open(boot: &BootInfo) -> Result<Option<Disk>, &'static str> {
        let (entries, n) = find_devices(boot.cmdline);
        let Some(e) = entries[..n].iter().flatten().find(|e| device_type(e) == 2) else {
            return Ok(None);
        };
        let mut dev = Device::init(e, VIRTIO_F_VERSION_1, Mode::Irq)?;
        let q = dev.queue(0)?;
        dev.start()?;
        if dev.config64(0) < BLK_FIRST_SECTOR + BLK_SECTORS {
            return Err("the disk is smaller than 192 KiB");
        }
        let alloc = |len| dma_alloc(len, 512).ok_or("out of DMA memory");
        Ok(Some(Disk {
            dev,
            q,
            hdr: alloc(16)?,
            data: alloc(512)?,
            check: dma_alloc(4096, 4096).ok_or("out of DMA memory")?,
            status: alloc(1)?,
            pending: None,
            writes: 0,
            last_read: None,
        }))
    }

    fn fill(&self, addr: u64, r: u64) {
        for i in 0..64 {
            wr(addr + 8 * i, word(r ^ (i << 40)));
        }
    }

    fn sector(r: u64) -> u64 {
        BLK_FIRST_SECTOR + r % BLK_SECTORS
    }

    fn header(&self, t: u32, sector: u64) {
        // SAFETY: DMA memory from `dma_alloc`.
        unsafe {
            core::ptr::write_volatile(self.hdr as *mut u32, t);
            core::ptr::write_volatile((self.hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((self.hdr + 8) as *mut u64, sector);
            core::ptr::write_volatile(self.status as *mut u8, 0xff);
        }
    }

    fn status(&self) -> u8 {
        // SAFETY: DMA memory from `dma_alloc`.
        unsafe { core::ptr::read_volatile(self.status as *const u8) }
    }

    /// Finishes the write in flight and checks it by reading it back.
    fn settle(&mut self) -> Result<(), &'static str> {
        let Some((r, irqs)) = self.pending.take() else {
            return Ok(());
        };
        self.dev.wait_used(&mut self.q, irqs)?;
        if self.status() != 0 {
            return Err("a write failed");
        }
        self.header(T_IN, Self::sector(r));
        let len = self.dev.transact(&mut self.q, &[(self.hdr, 16, false), (self.check, 512, true), (self.status, 1, true)])?;
        if len != 513 || self.status() != 0 {
            return Err("a read back failed");
        }
        self.last_read = Some(r);
        if !self.check_holds_last_read() {
            return Err("a sector read back differs from what was written");
        }
        self.writes += 1;
        Ok(())
    }

    /// Whether the read buffer still holds the sector read last.
    fn check_holds_last_read(&self) -> bool {
        let Some(r) = self.last_read else {
            return true;
        };
        (0..64).all(|i| rd(self.check + 8 * i) == word(r ^ (i << 40)))
    }

    /// Leaves the write of round `r` in flight.
    fn start_write(&mut self, r: u64) {
        self.fill(self.data, r);
        self.header(T_OUT, Self::sector(r));
        let head = Device::write_chain(&mut self.q, &[(self.hdr, 16, false), (self.data, 512, false), (self.status, 1, true)]);
        let irqs = self.dev.irqs();
        self.dev.publish(&mut self.q, head, 1);
        self.pending = Some((r, irqs));
    }
}

/// The sum of the region's words.
fn region_sum(region: u64) -> u64 {
    (0..REGION_WORDS).fold(0u64, |sum, i| sum.wrapping_add(rd(region + 8 * i)))
}

fn fail(what: &str, round: u64) -> u8 {
    report!("error snapshot round={} {}", round, what);
    EXIT_FAILED
}

/// Runs the scenario (see the module documentation).
pub fn snapshot(boot: &BootInfo) -> u8 {
    if !dma_fits(boot.ram_top) {
        report!("error snapshot needs at least 5 MiB of RAM");
        return EXIT_FAILED;
    }
    if kbd_probe().is_none() {
        return EXIT_FAILED;
    }
    let mut disk = match Disk::open(boot) {
        Ok(d) => d,
        Err(e) => {
            report!("error snapshot disk: {}", e);
            return EXIT_FAILED;
        }
    };
    let Some(region) = dma_alloc(REGION_BYTES, 4096) else {
        report!("error snapshot out of memory for its region");
        return EXIT_FAILED;
    };
    let Some(copy) = dma_alloc(4096, 4096) else {
        report!("error snapshot out of memory");
        return EXIT_FAILED;
    };
    for i in 0..REGION_WORDS {
        wr(region + 8 * i, 0);
    }
    // The legacy PIC stays masked: the PIT reaches the CPU through the
    // IOAPIC only.
    io::outb(0x21, 0xff);
    io::outb(0xa1, 0xff);
    apic::enable_lapic();
    apic::route(0, apic::IRQ_VECTOR_BASE);
    apic::route(2, apic::IRQ_VECTOR_BASE + 2);
    io::outb(0x43, 0x34);
    io::outb(0x40, PIT_DIVISOR as u8);
    io::outb(0x40, (PIT_DIVISOR >> 8) as u8);
    apic::start_periodic_timer(LAPIC_TIMER_VECTOR, LAPIC_TIMER_COUNT);
    let (gen0, id0) = generation();
    report!(
        "snapshot ready region={:#x} disk={} generation={} id={:#x}",
        region,
        if disk.is_some() { "yes" } else { "no" },
        gen0,
        id0
    );
    let mut sum: u64 = 0;
    let mut round: u64 = 0;
    let mut keys = CtrlAltDel::default();
    let mut last_pit = ticks().1;
    let mut seen_gen = (gen0, id0);
    loop {
        // Wait for the next LAPIC timer tick.
        let before = irq_count(LAPIC_TIMER_VECTOR);
        let mut spins = 0u64;
        while irq_count(LAPIC_TIMER_VECTOR) == before {
            spins += 1;
            if spins > TICK_SPIN_LIMIT {
                return fail("the LAPIC timer stopped", round);
            }
            core::hint::spin_loop();
        }
        round += 1;
        let at = region + 8 * (round % REGION_WORDS);
        let new = word(round);
        sum = sum.wrapping_sub(rd(at)).wrapping_add(new);
        wr(at, new);
        wr(copy, round);
        if rd(copy) != round {
            return fail("the counter's copy differs", round);
        }
        if let Some(d) = disk.as_mut() {
            if !d.check_holds_last_read() {
                return fail("the page the disk last read into changed behind the guest's back", round);
            }
            if round.is_multiple_of(BLK_EVERY) {
                if let Err(e) = d.settle() {
                    return fail(e, round);
                }
                d.start_write(round);
            }
        }
        if keys.poll() {
            break;
        }
        if round.is_multiple_of(REPORT_EVERY) {
            if region_sum(region) != sum {
                return fail("the memory region's sum changed behind the guest's back", round);
            }
            let (lapic, pit) = ticks();
            if pit == last_pit {
                return fail("the PIT stopped", round);
            }
            last_pit = pit;
            let g = generation();
            if g != seen_gen {
                report!("snapshot generation={} id={:#x} round={}", g.0, g.1, round);
                seen_gen = g;
            }
            report!(
                "snapshot round={} lapic={} pit={} blk_writes={} sum={:#x} generation={} id={:#x}",
                round,
                lapic,
                pit,
                disk.as_ref().map_or(0, |d| d.writes),
                sum,
                g.0,
                g.1
            );
        }
    }
    if let Some(d) = disk.as_mut() {
        if let Err(e) = d.settle() {
            return fail(e, round);
        }
    }
    apic::stop_timer();
    io::outb(0x43, 0x30);
    if region_sum(region) != sum {
        return fail("the memory region's sum changed behind the guest's back", round);
    }
    let (lapic, pit) = ticks();
    let (g, id) = generation();
    report!(
        "snapshot ok rounds={} lapic={} pit={} blk_writes={} generation={} id={:#x}",
        round,
        lapic,
        pit,
        disk.as_ref().map_or(0, |d| d.writes),
        g,
        id
    );
    EXIT_OK
}

/// First byte of the `touch` scenario's region (above the DMA arena).
const TOUCH_START: u64 = 8 << 20;
/// The end of what the guest's page tables map.
const MAPPED_TOP: u64 = 4 << 30;
const HOST_PAGE: u64 = 4096;

/// One write to each 4 KiB page of `[TOUCH_START, end)`; TSC cycles per page.
fn touch_pass(end: u64, tag: u64) -> u64 {
    let pages = (end - TOUCH_START) / HOST_PAGE;
    let start = rdtsc();
    for p in 0..pages {
        wr(TOUCH_START + p * HOST_PAGE, p ^ tag);
    }
    rdtsc().wrapping_sub(start) / pages.max(1)
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `touch`: the cost of a first write to a page, on fresh memory and after a
/// restore. Writes each 4 KiB page of RAM above 8 MiB once and reports
/// `touch phase=cold pages=N cycles_per_page=C`, then `touch ready`, then
/// waits for a byte on COM1 (sent once the VM is saved and restored), marks
/// the moment with `!` on the debug console (port 0xE9), writes each page
/// again and reports `touch phase=restored ...`.
pub fn touch(boot: &BootInfo) -> u8 {
    let end = boot.ram_top.min(MAPPED_TOP);
    if end <= TOUCH_START + HOST_PAGE {
        report!("error touch needs more than 8 MiB of RAM");
        return EXIT_FAILED;
    }
    let pages = (end - TOUCH_START) / HOST_PAGE;
    let cold = touch_pass(end, 1);
    report!("touch phase=cold pages={} cycles_per_page={}", pages, cold);
    report!("touch ready");
    while io::inb(0x3fd) & 1 == 0 {
        core::hint::spin_loop();
    }
    io::inb(0x3f8);
    io::outb(0xe9, b'!');
    let restored = touch_pass(end, 2);
    for p in 0..pages {
        if rd(TOUCH_START + p * HOST_PAGE) != p ^ 2 {
            report!("error touch page {} lost its write", p);
            return EXIT_FAILED;
        }
    }
    report!("touch phase=restored pages={} cycles_per_page={}", pages, restored);
    EXIT_OK
}
