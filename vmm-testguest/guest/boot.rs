//! CPL0 bootstrap: the two entry points, the guest's own GDT, TSS, IDT and
//! identity page tables, and the drop to CPL3.
//!
//! Everything here runs at CPL0, where a nested or emulated hypervisor may
//! interpret every instruction, so it is kept to a few hundred instructions:
//! the page tables and the GDT are static data in the image, only the TSS
//! descriptor and the 32 IDT gates are written at run time.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

/// Boot protocol numbers passed from the entry stubs to Rust.
pub const PROTO_LINUX64: u32 = 1;
/// PVH: 32-bit protected-mode entry through the Xen ELF note, `ebx` = start info.
pub const PROTO_PVH: u32 = 2;

const KERNEL_CS: u16 = 0x08;
const USER_CS: u64 = 0x18 | 3;
const USER_DS: u64 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;
/// RFLAGS for CPL3: IOPL 3 (bits 12-13) so the scenarios may use port I/O, the
/// always-one bit 1, and interrupts on (IF, bit 9). Nothing interrupts until
/// a scenario unmasks an IOAPIC pin: the PIC is masked at boot and the IOAPIC
/// comes out of reset with every pin masked.
const USER_RFLAGS: u64 = 0x3202;

global_asm!(
    r#"

    /* Xen PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) with the 32-bit entry. */
    .pushsection .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start
    .popsection

    .pushsection .text.boot, "ax"

    /* PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info. */
    .code32
    .global pvh_start
pvh_start:
    cli
    movb $0x21, %al             /* boot marker '!' on the debug console */
    outb %al, $0xe9
    movb $0x21, %al             /* boot marker '!' on the debug console */
    outb %al, $0xe9
    movl %ebx, %esi
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
    lgdt tg_gdt_ptr
    ljmp $0x08, $tg_pvh64

    .code64
tg_pvh64:
    movl %esi, %esi
    movl $2, %edi
    jmp tg_common64

    /* 64-bit Linux boot protocol entry: long mode, rsi = boot_params. */
    .global _start
_start:
    cli
    movb $0x21, %al             /* boot marker '!' on the debug console */
    outb %al, $0xe9
    movl $1, %edi

tg_common64:
    lgdt tg_gdt_ptr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq tg_kstack_top(%rip), %rsp
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    leaq tg_pml4(%rip), %rax
    movq %rax, %cr3
    movq %cr4, %rax
    orq $0x620, %rax
    movq %rax, %cr4
    movq %cr0, %rax
    andq $~0x4, %rax            /* EM off */
    orq $0x2, %rax              /* MP on */
    movq %rax, %cr0
    call tg_kernel_main
2:
    hlt
    jmp 2b

    /* Drop to CPL3: rdi/rsi are passed through, rdx = entry, rcx = stack. */
    .global tg_enter_user
tg_enter_user:
    movq %r8, %rax
    movw %ax, %ds
    movw %ax, %es
    pushq %r8
    pushq %rcx
    pushq %r9
    pushq ${user_cs}
    pushq %rdx
    iretq

    /* Exception stubs, 16 bytes apart; the CPU pushes an error code for
       vectors 8, 10-14, 17, 21, 29 and 30, the others push a zero. */
    .macro tg_isr n, err
    .align 16
    .if \err == 0
    pushq $0
    .endif
    pushq $\n
    jmp tg_isr_common
    .endm
    .align 16
    .global tg_isr_base
tg_isr_base:
    tg_isr 0,0
    tg_isr 1,0
    tg_isr 2,0
    tg_isr 3,0
    tg_isr 4,0
    tg_isr 5,0
    tg_isr 6,0
    tg_isr 7,0
    tg_isr 8,1
    tg_isr 9,0
    tg_isr 10,1
    tg_isr 11,1
    tg_isr 12,1
    tg_isr 13,1
    tg_isr 14,1
    tg_isr 15,0
    tg_isr 16,0
    tg_isr 17,1
    tg_isr 18,0
    tg_isr 19,0
    tg_isr 20,0
    tg_isr 21,1
    tg_isr 22,0
    tg_isr 23,0
    tg_isr 24,0
    tg_isr 25,0
    tg_isr 26,0
    tg_isr 27,0
    tg_isr 28,0
    tg_isr 29,1
    tg_isr 30,1
    tg_isr 31,0

tg_isr_common:
    movq %rsp, %rdi
    andq $~0xf, %rsp
    call tg_exception
3:
    hlt
    jmp 3b

    /* External interrupts, vectors 32-255: count, EOI the LAPIC (but for
       the spurious vector 0xff), return. A handful of instructions, since
       they run at CPL0. */
    .align 16
    .global tg_irq_base
tg_irq_base:
    .set tg_v, 32
    .rept 224
    .align 16
    pushq $tg_v
    jmp tg_irq_common
    .set tg_v, tg_v + 1
    .endr
tg_irq_common:
    pushq %rax
    movq 8(%rsp), %rax
    lock incl tg_irq_counts(,%rax,4)
    cmpq $0xff, %rax
    je 4f
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
4:
    popq %rax
    addq $8, %rsp
    iretq
    .popsection

    .pushsection .data.tg_pagetables, "aw"
    /* Identity map of the first 4 GiB with 2 MiB pages, user accessible,
       so that CPL3 scenarios reach RAM, boot structures and MMIO alike. */
    .align 4096
    .global tg_pml4
tg_pml4:
    .quad tg_pdpt + 0x7
    .fill 511, 8, 0
tg_pdpt:
    .quad tg_pd + 0x0007
    .quad tg_pd + 0x1007
    .quad tg_pd + 0x2007
    .quad tg_pd + 0x3007
    .fill 508, 8, 0
tg_pd:
    .set tg_i, 0
    .rept 2048
    .quad (tg_i << 21) | 0x87
    .set tg_i, tg_i + 1
    .endr

    .align 16
    .global tg_gdt
tg_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00affa000000ffff    /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff    /* 0x20 user data, DPL 3 */
    .quad 0, 0                  /* 0x28 TSS, written at run time */
tg_gdt_end:
    .align 8
tg_gdt_ptr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt

    .align 16
    .global tg_irq_counts
tg_irq_counts:
    .space 1024

    .align 16
    .space 16384
tg_kstack_top:
    .popsection
    "#,
    user_cs = const USER_CS,
    options(att_syntax)
);

/// 64-bit task state segment: RSP0 (the stack for exceptions and interrupts
/// taken at CPL3) and an I/O permission bitmap that grants every port.
///
/// IOPL 3 alone grants CPL3 the ports on hardware virtualization, but some
/// hypervisors run guest user mode as host user mode and clear IOPL on the
/// way there (KVM's PVM does); the bitmap is what they honour instead.
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    iomap: [u8; 8193],
}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtGate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const IDT_ENTRIES: usize = 256;
const EXCEPTIONS: usize = 32;

#[repr(C, align(16))]
struct Idt([IdtGate; IDT_ENTRIES]);

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    // The bitmap follows the 104-byte TSS: all zeros (every port allowed),
    // then the terminating 0xff byte the CPU may read past the last port.
    iomap_base: 104,
    iomap: {
        let mut m = [0u8; 8193];
        m[8192] = 0xff;
        m
    },
};

static mut INTERRUPT_STACK: Stack<16384> = Stack([0; 16384]);
static mut USER_STACK: Stack<65536> = Stack([0; 65536]);

static mut IDT: Idt = Idt(
    [IdtGate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; IDT_ENTRIES],
);

unsafe extern "C" {
    static tg_isr_base: u8;
    static tg_irq_base: u8;
    /// Interrupts taken, per vector (written by the CPL0 handler).
    pub static tg_irq_counts: [core::sync::atomic::AtomicU32; 256];
    static mut tg_gdt: [u64; 7];
    fn tg_enter_user(proto: u32, info: u64, entry: u64, stack: u64, ds: u64, rflags: u64) -> !;
}

/// First Rust code, at CPL0 on the boot stack: TSS, IDT, then CPL3.
#[unsafe(no_mangle)]
extern "C" fn tg_kernel_main(proto: u32, info: u64) -> ! {
    // SAFETY: single CPU, interrupts off, nothing else touches these statics
    // yet; the descriptors written match the layouts the CPU expects.
    unsafe {
        let int_stack = addr_of_mut!(INTERRUPT_STACK) as u64 + 16384;
        let tss = addr_of_mut!(TSS);
        (*tss).rsp[0] = int_stack;
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let gdt = addr_of_mut!(tg_gdt);
        // Available 64-bit TSS, present, DPL 0.
        (*gdt)[5] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        (*gdt)[6] = base >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags));

        // Mask both 8259 PICs: interrupts come through the IOAPIC only.
        crate::io::outb(0x21, 0xff);
        crate::io::outb(0xa1, 0xff);

        let isr_base = &raw const tg_isr_base as u64;
        let irq_base = &raw const tg_irq_base as u64;
        let idt = addr_of_mut!(IDT);
        for (n, gate) in (*idt).0.iter_mut().enumerate() {
            let handler = if n < EXCEPTIONS {
                isr_base + 16 * n as u64
            } else {
                irq_base + 16 * (n - EXCEPTIONS) as u64
            };
            *gate = IdtGate {
                offset_low: handler as u16,
                selector: KERNEL_CS,
                ist: 0,
                // Present, DPL 0, 64-bit interrupt gate.
                type_attr: 0x8e,
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let idt_ptr = TablePointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{0}]", in(reg) &idt_ptr, options(readonly, nostack, preserves_flags));

        // The entry sees the stack as if called: rsp + 8 is 16-byte aligned.
        let user_stack = addr_of_mut!(USER_STACK) as u64 + 65536 - 8;
        tg_enter_user(
            proto,
            info,
            crate::tg_user_main as *const () as u64,
            user_stack,
            USER_DS,
            USER_RFLAGS,
        )
    }
}

/// The frame the exception stubs leave: vector, error code, then the
/// CPU-pushed interrupt frame.
#[repr(C)]
pub struct ExceptionFrame {
    /// Exception vector number.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code segment selector at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
}

#[unsafe(no_mangle)]
extern "C" fn tg_exception(frame: *const ExceptionFrame) -> ! {
    // SAFETY: the stub passes the address of the frame it just built.
    let frame = unsafe { &*frame };
    let cr2: u64;
    // SAFETY: reading CR2 at CPL0 has no side effect.
    unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::report_exception(frame, cr2)
}

/// How many times interrupt `vector` was taken.
pub fn irq_count(vector: u8) -> u32 {
    // SAFETY: `tg_irq_counts` is a static array of atomics in the image,
    // only ever accessed atomically.
    unsafe { tg_irq_counts[usize::from(vector)].load(core::sync::atomic::Ordering::SeqCst) }
}
