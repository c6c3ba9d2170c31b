//! The `smp` scenario: the bootstrap processor (at CPL3) starts every
//! application processor with INIT and two startup IPIs, as firmware does;
//! each AP runs a trampoline copied below 1 MiB from real mode through
//! protected mode to long mode on the guest's own page tables, counts itself
//! in, waits until every AP is in (so they all ran at once), counts again
//! and halts. Only a few dozen CPL0 instructions per AP, no stack. Run
//! again, it starts the (halted) APs over: INIT puts them back to waiting
//! for a startup IPI.

use core::arch::global_asm;
use core::ptr::{addr_of, addr_of_mut};

use crate::bootinfo::BootInfo;
use crate::{acpi, apic, EXIT_FAILED, EXIT_OK};

/// Where the trampoline is copied; the startup IPI's vector is its page.
const TRAMPOLINE: u64 = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// Cycles to wait for the APs (several seconds on any host).
const TIMEOUT_CYCLES: u64 = 1 << 34;

global_asm!(
    r#"
    .set TRAMP, 0x8000
    .pushsection .text.tg_trampoline, "ax"
    .global tg_tramp_start
    .global tg_tramp_end
    .code16
tg_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tg_tramp_gdt_ptr - tg_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(TRAMP + tg_tramp32 - tg_tramp_start)

    .code32
tg_tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $tg_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0
    ljmp $0x18, $(TRAMP + tg_tramp64 - tg_tramp_start)

    .code64
tg_tramp64:
    movabsq $tg_ap_main, %rax
    jmp *%rax

    .align 8
tg_tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08 code, 32-bit */
    .quad 0x00cf92000000ffff    /* 0x10 data */
    .quad 0x00af9a000000ffff    /* 0x18 code, 64-bit */
tg_tramp_gdt_ptr:
    .word 31
    .long TRAMP + tg_tramp_gdt - tg_tramp_start
tg_tramp_end:
    .popsection

    .pushsection .text, "ax"
    .code64
tg_ap_main:
    lock incl tg_ap_in(%rip)
    movabsq $0xfee00020, %rax   /* local APIC ID register */
    movl (%rax), %eax
    shrl $24, %eax
    lock btsl %eax, tg_ap_seen(%rip)
1:
    pause
    movl tg_ap_in(%rip), %eax
    cmpl tg_ap_expected(%rip), %eax
    jb 1b
    lock incl tg_ap_together(%rip)
2:
    cli
    hlt
    jmp 2b
    .popsection

    .pushsection .data, "aw"
    .align 64
    .global tg_ap_in
tg_ap_in:
    .long 0
    .global tg_ap_expected
tg_ap_expected:
    .long 0
    .global tg_ap_together
tg_ap_together:
    .long 0
    .align 8
    .global tg_ap_seen
tg_ap_seen:
    .space 32
    .popsection
    "#,
    options(att_syntax)
);

extern "C" {
    static tg_tramp_start: u8;
    static tg_tramp_end: u8;
    static mut tg_ap_in: u32;
    static mut tg_ap_expected: u32;
    static mut tg_ap_together: u32;
    static mut tg_ap_seen: [u32; 8];
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn wait_cycles(n: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < n {
        core::hint::spin_loop();
    }
}

fn load(p: *const u32) -> u32 {
    // SAFETY: a guest static, identity mapped and user readable; the APs
    // write it with locked instructions.
    unsafe { core::ptr::read_volatile(p) }
}

/// Runs the scenario.
pub fn smp(boot: &BootInfo) -> u8 {
    let cpus = match acpi::cpu_count(boot) {
        Ok(n) => n,
        Err(msg) => {
            report!("error smp {}", msg);
            return EXIT_FAILED;
        }
    };
    let aps = cpus.saturating_sub(1);
    // SAFETY: the trampoline's bytes lie between its two labels in the
    // image; the copy goes to free, identity-mapped, user-writable memory
    // below 1 MiB that nothing else uses after boot.
    unsafe {
        let start = addr_of!(tg_tramp_start);
        let len = addr_of!(tg_tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
        core::ptr::write_volatile(addr_of_mut!(tg_ap_expected), aps);
        core::ptr::write_volatile(addr_of_mut!(tg_ap_in), 0);
        core::ptr::write_volatile(addr_of_mut!(tg_ap_together), 0);
        core::ptr::write_volatile(addr_of_mut!(tg_ap_seen), [0; 8]);
    }
    apic::enable_lapic();
    // INIT, then two startup IPIs, to every processor but this one.
    apic::send_ipi_to_others(0x0000_4500);
    wait_cycles(10_000_000);
    for _ in 0..2 {
        apic::send_ipi_to_others(0x0000_4600 | SIPI_VECTOR);
        wait_cycles(1_000_000);
    }
    let start = rdtsc();
    let (together, counted) = (addr_of!(tg_ap_together), addr_of!(tg_ap_in));
    while load(together) < aps && rdtsc().wrapping_sub(start) < TIMEOUT_CYCLES {
        core::hint::spin_loop();
    }
    // Every AP's APIC ID set in the bitmap, and nothing else.
    let mut ids_ok = true;
    for id in 0..256u32 {
        let word = load(addr_of!(tg_ap_seen).cast::<u32>().wrapping_add((id / 32) as usize));
        let seen = word & (1 << (id % 32)) != 0;
        ids_ok &= seen == (id >= 1 && id < cpus);
    }
    let (started, ran_together) = (load(counted), load(together));
    report!("smp cpus={} started={} together={} apic_ids={}", cpus, started, ran_together, if ids_ok { "ok" } else { "wrong" });
    if started == aps && ran_together == aps && ids_ok {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}
