//! The local APIC and the IOAPIC, programmed from CPL3 through their MMIO
//! windows (identity mapped and user accessible).

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WIN: u64 = 0x10;

/// First vector used for IOAPIC pins: pin `n` raises vector `IRQ_VECTOR_BASE + n`.
pub const IRQ_VECTOR_BASE: u8 = 0x30;

fn write32(addr: u64, v: u32) {
    // SAFETY: MMIO register inside the identity-mapped, user-accessible
    // first 4 GiB.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as for `write32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
/// ICR destination shorthand: all processors but this one.
const ALL_BUT_SELF: u32 = 0b11 << 18;

/// Sends the IPI `low` (delivery mode, level, vector) to every other
/// processor.
pub fn send_ipi_to_others(low: u32) {
    write32(LAPIC + LAPIC_ICR_HIGH, 0);
    write32(LAPIC + LAPIC_ICR_LOW, low | ALL_BUT_SELF);
}

/// Software-enables the local APIC (spurious vector 0xff) and accepts every
/// priority.
pub fn enable_lapic() {
    write32(LAPIC + LAPIC_SVR, 0x100 | 0xff);
    write32(LAPIC + LAPIC_TPR, 0);
}

const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const LVT_PERIODIC: u32 = 1 << 17;

/// Starts the local APIC timer in periodic mode: `vector` every `count`
/// bus cycles divided by 16.
pub fn start_periodic_timer(vector: u8, count: u32) {
    write32(LAPIC + LAPIC_TIMER_DIVIDE, 0b0011);
    write32(LAPIC + LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(vector));
    write32(LAPIC + LAPIC_TIMER_INITIAL, count);
}

/// Stops the local APIC timer.
pub fn stop_timer() {
    write32(LAPIC + LAPIC_TIMER_INITIAL, 0);
    write32(LAPIC + LAPIC_LVT_TIMER, 1 << 16);
}

fn ioapic_write(reg: u32, v: u32) {
    write32(IOAPIC + IOAPIC_REGSEL, reg);
    write32(IOAPIC + IOAPIC_WIN, v);
}

fn ioapic_read(reg: u32) -> u32 {
    write32(IOAPIC + IOAPIC_REGSEL, reg);
    read32(IOAPIC + IOAPIC_WIN)
}

/// Routes IOAPIC pin `pin` to `vector` on APIC 0: fixed delivery, physical
/// destination, active high, edge triggered, unmasked. Returns false if the
/// pin does not exist.
pub fn route(pin: u32, vector: u8) -> bool {
    let pins = ((ioapic_read(1) >> 16) & 0xff) + 1;
    if pin >= pins {
        return false;
    }
    ioapic_write(0x11 + 2 * pin, 0);
    ioapic_write(0x10 + 2 * pin, u32::from(vector));
    true
}

/// Masks IOAPIC pin `pin` again.
pub fn mask(pin: u32) {
    ioapic_write(0x10 + 2 * pin, 1 << 16);
}
