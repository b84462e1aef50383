//! Everything the probe does at CPL0, and the tables it leaves behind.
//!
//! On veil's KVM, CPL0 guest code is emulated at ~0.25 µs per instruction
//! while CPL3 code runs natively, so the probe spends as few instructions as
//! it can at CPL0: `_start` (BSP) and `probe_ap_start` (APs) are hand-written
//! assembly that only does what needs privilege, then `iretq`s to CPL3 with
//! IOPL=3 and interrupts off. No compiler-generated code ever runs at CPL0
//! (so no SSE there either), except that the exception handler below, also
//! hand-written, prints a line and ends the VM.
//!
//! What the BSP does at CPL0 (`_start`): 289 instructions, counted by
//! single-stepping it on KVM with a 4-entry e820 map, before the PVH entry
//! was added (2 more since: the entry kind, counted by reading, not
//! stepped; the PVH entry `probe_pvh_start` runs 16 more than `_start`) (about 13 more per e820
//! RAM entry, 7 per other entry; with 2 MiB pages about 2,570 more per GiB
//! of RAM above 4 GiB, with 1 GiB pages 5 per GiB), i.e. ~75 µs here:
//! 1. CR0/CR4 so that SSE works at CPL3 (OSFXSR, OSXMMEXCPT, MP; no EM/TS)
//!    and so that CPL0 may run on user pages (SMEP/SMAP off) and CPL3 may
//!    read the TSC (TSD off);
//! 2. its own page tables: an identity map of 0–4 GiB (RAM, the 32-bit MMIO
//!    window, the AP mailbox, IOAPIC and LAPIC) and of every GiB above that
//!    holds e820 RAM, all with the User bit, in 1 GiB pages if CPUID says
//!    pdpe1gb, else in 2 MiB pages (0–4 GiB from tables built at compile
//!    time, the rest from a pool of PD pages);
//! 3. GDT (kernel code/data, user data/code, one TSS per CPU), TSS, IDT;
//! 4. `iretq` to `bsp_main` at CPL3.
//!
//! An AP (`probe_ap_start`, 32 instructions) only loads CR0/CR4/CR3, GDT,
//! IDT and its own TSS, which the BSP prepared at CPL3 (`prepare_ap`).

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};

/// Highest APIC ID + 1 that the probe has per-CPU room for.
pub const MAX_CPUS: usize = 64;

/// Per-CPU slots: slot 0 is the BSP, slot 1 + id is the AP with APIC ID `id`.
const SLOTS: usize = MAX_CPUS + 1;

/// Selectors: 0x08 kernel code, 0x10 kernel data, then user data below user
/// code (as `sysret` would want).
pub const USER_DS: u64 = 0x18 | 3;
pub const USER_CS: u64 = 0x20 | 3;
/// The TSS descriptor of slot `s` is at `TSS_SEL0 + 16 * s`.
const TSS_SEL0: u64 = 0x28;

/// RFLAGS at CPL3: IOPL = 3 (bits 12–13) so port I/O works, IF = 0,
/// bit 1 is reserved and reads as one.
const USER_RFLAGS: u64 = 0x3002;

const KSTACK_SIZE: usize = 4096;
const AP_STACK_SIZE: usize = 8 * 1024;
const BSP_STACK_SIZE: usize = 64 * 1024;
/// PD pages for RAM above 4 GiB when only 2 MiB pages exist: 60 GiB more.
const EXTRA_PDS: usize = 60;

const GDT_LEN: usize = 5 + 2 * SLOTS;
const IDT_VECTORS: usize = 32;

/// A static that the CPL0 code and the CPL3 code share by address.
#[repr(transparent)]
pub struct Racy<T>(UnsafeCell<T>);
// SAFETY: every access goes through raw pointers, and each use documents
// which CPU writes it when.
unsafe impl<T> Sync for Racy<T> {}
impl<T> Racy<T> {
    pub const fn new(v: T) -> Self {
        Racy(UnsafeCell::new(v))
    }
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// 64-bit TSS (Intel SDM vol. 3, 8.7).
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

/// One TSS per slot, 128 bytes apart (the asm indexes with a shift).
#[derive(Clone, Copy)]
#[repr(C, align(128))]
struct TssSlot(Tss);

/// Bytes of an I/O permission bitmap that covers all 65536 ports.
const IOMAP_BYTES: usize = 65536 / 8;

/// All TSSes, then one I/O permission bitmap they all point at.
///
/// On veil's KVM, `in`/`out` at CPL3 is allowed only by the I/O bitmap of
/// the guest TSS: IOPL=3 alone still gives #GP (seen on this machine's
/// kvm_pvm). So every TSS's `iomap_base` reaches this shared, all-zero
/// (every port allowed) bitmap, ended by the 0xFF byte the SDM asks for,
/// and its limit covers it. IOPL=3 is set as well, which is all that an
/// ordinary KVM needs.
#[repr(C, align(4096))]
struct TssArea {
    slots: [TssSlot; SLOTS],
    iomap: [u8; IOMAP_BYTES],
    iomap_end: u8,
}

/// Offset from slot `s`'s TSS to the bitmap, and the TSS limit (the last
/// byte of the segment, the 0xFF terminator).
const fn iomap_base(s: usize) -> u64 {
    ((SLOTS - s) * core::mem::size_of::<TssSlot>()) as u64
}
const fn tss_limit(s: usize) -> u64 {
    iomap_base(s) + IOMAP_BYTES as u64
}
const _: () = assert!(tss_limit(0) < 0x10000, "the asm only sets limit bits 0..15");

const fn tss_area_init() -> TssArea {
    let empty = Tss {
        _reserved0: 0,
        rsp: [0; 3],
        _reserved1: 0,
        ist: [0; 7],
        _reserved2: 0,
        _reserved3: 0,
        iomap_base: 0,
    };
    let mut area = TssArea {
        slots: [TssSlot(empty); SLOTS],
        iomap: [0; IOMAP_BYTES],
        iomap_end: 0xFF,
    };
    let mut s = 0;
    while s < SLOTS {
        area.slots[s].0.iomap_base = iomap_base(s) as u16;
        s += 1;
    }
    area
}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

const PTE_P: u64 = 1;
const PTE_W: u64 = 2;
const PTE_U: u64 = 4;
const PTE_PS: u64 = 0x80;
const LEAF: u64 = PTE_P | PTE_W | PTE_U | PTE_PS;

/// 0–4 GiB in 2 MiB pages, computed at compile time: the BSP spends no
/// instruction on them (it only links them into the PDPT).
const fn low_pds() -> [PageTable; 4] {
    let mut t = [PageTable([0; 512]); 4];
    let mut i = 0;
    while i < 4 * 512 {
        t[i / 512].0[i % 512] = ((i as u64) << 21) | LEAF;
        i += 1;
    }
    t
}

const fn gdt_init() -> [u64; GDT_LEN] {
    let mut g = [0u64; GDT_LEN];
    g[1] = 0x0020_9A00_0000_0000; // 0x08 kernel code: P, DPL0, code, L
    g[2] = 0x0000_9200_0000_0000; // 0x10 kernel data: P, DPL0, data, W
    g[3] = 0x0000_F200_0000_0000; // 0x18 user data:   P, DPL3, data, W
    g[4] = 0x0020_FA00_0000_0000; // 0x20 user code:   P, DPL3, code, L
                                  // TSS descriptors (two entries each) are filled at run time.
    g
}

// Zero-initialised statics land in .bss, which link.ld stores in the file.
static PML4: Racy<PageTable> = Racy::new(PageTable([0; 512]));
static PDPT: Racy<PageTable> = Racy::new(PageTable([0; 512]));
static PD_LOW: Racy<[PageTable; 4]> = Racy::new(low_pds());
#[link_section = ".noinit.pd_pool"]
static PD_POOL: Racy<[PageTable; EXTRA_PDS]> = Racy::new([PageTable([0; 512]); EXTRA_PDS]);

static GDT: Racy<[u64; GDT_LEN]> = Racy::new(gdt_init());
#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_VECTORS]);
static IDT: Racy<Idt> = Racy::new(Idt([0; 2 * IDT_VECTORS]));
static TSS: Racy<TssArea> = Racy::new(tss_area_init());

/// Written by `_start`: the end of the identity map and the page size used.
static MAPPED_END: Racy<u64> = Racy::new(0);
static PAGE_SIZE: Racy<u64> = Racy::new(0);

#[link_section = ".noinit.stacks"]
static KSTACKS: Racy<[Stack<KSTACK_SIZE>; SLOTS]> = Racy::new([const { Stack([0; KSTACK_SIZE]) }; SLOTS]);
#[link_section = ".noinit.stacks"]
static AP_STACKS: Racy<[Stack<AP_STACK_SIZE>; MAX_CPUS]> = Racy::new([const { Stack([0; AP_STACK_SIZE]) }; MAX_CPUS]);
#[link_section = ".noinit.stacks"]
static BSP_STACK: Racy<Stack<BSP_STACK_SIZE>> = Racy::new(Stack([0; BSP_STACK_SIZE]));

extern "C" {
    fn probe_ap_start();
    static __image_start: u8;
    static __image_end: u8;
    static __ro_end: u8;
}

global_asm!(
    // CR0: clear EM (bit 2) and TS (bit 3), set MP (bit 1).
    // CR4: set OSFXSR (bit 9) and OSXMMEXCPT (bit 10); clear TSD (bit 2),
    // SMEP (bit 20) and SMAP (bit 21): every page is a user page, CPL0 code
    // included. 8 instructions.
    ".macro probe_cpu_setup",
    "    mov rax, cr0",
    "    and rax, ~0xC",
    "    or rax, 0x2",
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    and rax, ~0x300004",
    "    or rax, 0x600",
    "    mov cr4, rax",
    ".endm",
    "",
    // Push an iretq frame for CPL3 and go. rax = user RSP. 7 instructions.
    ".macro probe_to_user entry",
    "    push {user_ds}",
    "    push rax",
    "    push {user_rflags}",
    "    push {user_cs}",
    "    lea rax, [rip + \\entry]",
    "    push rax",
    "    iretq",
    ".endm",
    "",
    ".section .text.probe_entry, \"ax\", @progbits",
    ".global _start",
    "_start:",
    // rsi = boot_params (Linux 64-bit boot protocol); keep it in r15, and
    // the entry kind (0: boot_params) in r13.
    "    mov r15, rsi",
    "    xor r13d, r13d",
    "    probe_cpu_setup",
    // r14 = CPUID.80000001h:EDX; bit 26 = 1 GiB pages.
    "    mov eax, 0x80000001",
    "    cpuid",
    "    mov r14d, edx",
    // The e820 table: ecx entries from rsi, r9 bytes apart.
    "    movzx ecx, byte ptr [r15 + 0x1E8]",
    "    lea rsi, [r15 + 0x2D0]",
    "    mov r9d, 20",
    // From here on the same for both entries.
    "probe_bsp_common:",
    // r8 = GiBs to identity-map: at least 4, else up to the highest end of
    // any e820 RAM entry (type 1), rounded up. At most 128 entries.
    "    mov eax, 128",
    "    cmp ecx, eax",
    "    cmova ecx, eax",
    "    mov r8d, 4",
    "2:  test ecx, ecx",
    "    jz 4f",
    "    cmp dword ptr [rsi + 16], 1",
    "    jne 3f",
    "    mov rax, [rsi]",
    "    add rax, [rsi + 8]",
    "    add rax, 0x3FFFFFFF",
    "    shr rax, 30",
    "    cmp rax, r8",
    "    cmova r8, rax",
    "3:  add rsi, r9",
    "    dec ecx",
    "    jmp 2b",
    "4:  lea rdi, [rip + {pdpt}]",
    "    bt r14d, 26",
    "    jnc 6f",
    // 1 GiB pages: PDPT[g] = g GiB | PS|U|W|P for g < r8 (at most 512).
    "    mov eax, 512",
    "    cmp r8, rax",
    "    cmova r8, rax",
    "    mov rcx, r8",
    "    mov eax, {leaf}",
    "5:  mov [rdi], rax",
    "    add rax, 0x40000000",
    "    add rdi, 8",
    "    dec rcx",
    "    jnz 5b",
    "    mov dword ptr [rip + {page_size}], 0x40000000",
    "    jmp 9f",
    // 2 MiB pages: PDPT[0..4] = the compile-time PDs; each further GiB gets
    // a pool page filled with 512 entries.
    "6:  lea rax, [rip + {pd_low}]",
    "    or rax, 7",
    "    mov [rdi], rax",
    "    add rax, 4096",
    "    mov [rdi + 8], rax",
    "    add rax, 4096",
    "    mov [rdi + 16], rax",
    "    add rax, 4096",
    "    mov [rdi + 24], rax",
    "    mov eax, {max_gib_2m}",
    "    cmp r8, rax",
    "    cmova r8, rax",
    "    lea rsi, [rip + {pd_pool}]",
    "    mov ecx, 4",
    "    mov rax, 0x100000000 + {leaf}",
    "7:  cmp rcx, r8",
    "    jae 8f",
    "    lea rdx, [rsi + 7]",
    "    mov [rdi + rcx * 8], rdx",
    "    mov edx, 512",
    "71: mov [rsi], rax",
    "    add rax, 0x200000",
    "    add rsi, 8",
    "    dec edx",
    "    jnz 71b",
    "    inc rcx",
    "    jmp 7b",
    "8:  mov dword ptr [rip + {page_size}], 0x200000",
    "9:  shl r8, 30",
    "    mov [rip + {mapped_end}], r8",
    "    lea rax, [rip + {pdpt}]",
    "    or rax, 7",
    "    mov [rip + {pml4}], rax",
    "    lea rax, [rip + {pml4}]",
    "    mov cr3, rax",
    // BSP TSS (slot 0): RSP0 = IST1 = top of kernel stack 0.
    "    lea rax, [rip + {kstacks} + {kstack_size}]",
    "    lea rdx, [rip + {tss}]",
    "    mov [rdx + 4], rax",
    "    mov [rdx + 0x24], rax",
    // Its descriptor at GDT + 0x28: limit (through the I/O bitmap), type
    // 0x89 (present, available 64-bit TSS), base split over bits 16–39 and
    // 56–63, then base[63:32] in the next entry.
    "    mov rax, rdx",
    "    and eax, 0xFFFFFF",
    "    shl rax, 16",
    "    mov rcx, 0x890000000000 + {tss_limit0}",
    "    or rax, rcx",
    "    mov rcx, rdx",
    "    shr rcx, 24",
    "    shl rcx, 56",
    "    or rax, rcx",
    "    lea rdi, [rip + {gdt}]",
    "    mov [rdi + 0x28], rax",
    "    shr rdx, 32",
    "    mov [rdi + 0x30], rdx",
    "    lgdt [rip + probe_gdtr]",
    "    mov ax, 0x28",
    "    ltr ax",
    // IDT: 32 interrupt gates (P, DPL0, type 0xE, IST1, CS 0x08), one per
    // 16-byte stub. The stubs share address bits 16–63 (link.ld asserts
    // it), so gate n is gate 0 plus 16 * n in its low quadword and the high
    // quadword (address bits 32–63) stays zero.
    "    lea rax, [rip + probe_isr_stubs]",
    "    mov rdx, rax",
    "    shl rdx, 32",
    "    mov rcx, 0xFFFF000000000000",
    "    and rdx, rcx",
    "    movzx ecx, ax",
    "    or rdx, rcx",
    "    mov rcx, 0x00008E0100080000",
    "    or rdx, rcx",
    "    lea rdi, [rip + {idt}]",
    "    mov ecx, {idt_vectors}",
    "10: mov [rdi], rdx",
    "    add rdx, 16",
    "    add rdi, 16",
    "    dec ecx",
    "    jnz 10b",
    "    lidt [rip + probe_idtr]",
    // To CPL3: bsp_main(boot structure, kind) on the BSP stack (16-byte
    // aligned top minus 8, as if called).
    "    mov rdi, r15",
    "    mov rsi, r13",
    "    lea rax, [rip + {bsp_stack} + {bsp_stack_size} - 8]",
    "    probe_to_user {bsp_main}",
    "",
    // PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging
    // off, flat segments, ebx = hvm_start_info, no stack. Turn on PAE, the
    // boot page tables below (0-4 GiB), long mode and paging, load the
    // probe's GDT and far-jump to its 64-bit code segment. 14 instructions
    // (rdmsr/wrmsr and the far jump included), then 18 in 64-bit mode before
    // the common path, where `_start` has 16: the PVH entry costs 16 more.
    ".section .text.probe_pvh, \"ax\", @progbits",
    ".code32",
    ".global probe_pvh_start",
    "probe_pvh_start:",
    "    mov eax, cr4",
    "    or eax, 0x20",
    "    mov cr4, eax",
    "    mov eax, offset probe_pvh_pml4",
    "    mov cr3, eax",
    "    mov ecx, 0xC0000080",
    "    rdmsr",
    "    or eax, 0x100",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",
    "    mov cr0, eax",
    "    lgdt [probe_gdtr]",
    // ljmp 0x08:probe_pvh64, spelled out (ptr16:32 form).
    "    .byte 0xEA",
    "    .long probe_pvh64",
    "    .short 0x08",
    ".code64",
    "probe_pvh64:",
    // r15 = hvm_start_info, r13 = 1 (the PVH kind); a stack for the
    // iretq frame: the top of kernel stack 0.
    "    mov r15d, ebx",
    "    mov r13d, 1",
    "    lea rsp, [rip + {kstacks} + {kstack_size}]",
    "    probe_cpu_setup",
    "    mov eax, 0x80000001",
    "    cpuid",
    "    mov r14d, edx",
    // The memory map: memmap_entries (at 0x30) 24-byte entries from
    // memmap_paddr (at 0x28); type at +16 as in e820.
    "    mov ecx, [r15 + 0x30]",
    "    mov rsi, [r15 + 0x28]",
    "    mov r9d, 24",
    "    jmp probe_bsp_common",
    "",
    // The PVH note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), the
    // 32-bit entry as an 8-byte value (QEMU reads 8, others 4).
    ".section .note.Xen, \"a\", @note",
    ".balign 4",
    "    .long 4",
    "    .long 8",
    "    .long 18",
    "    .asciz \"Xen\"",
    ".balign 4",
    "    .quad probe_pvh_start",
    "",
    // Boot page tables for the PVH entry, filled at link time: PML4[0] ->
    // PDPT, PDPT[0..4] -> the compile-time 2 MiB PDs of 0-4 GiB. `_start`'s
    // common path then builds the real ones.
    ".section .data.probe_pvh, \"aw\", @progbits",
    ".balign 4096",
    "probe_pvh_pml4:",
    "    .quad probe_pvh_pdpt + 7",
    "    .fill 511, 8, 0",
    "probe_pvh_pdpt:",
    "    .quad {pd_low} + 7",
    "    .quad {pd_low} + 0x1007",
    "    .quad {pd_low} + 0x2007",
    "    .quad {pd_low} + 0x3007",
    "    .fill 508, 8, 0",
    "",
    // AP entry, reached through the ACPI wake-up mailbox: rdi = APIC ID,
    // rsp = 0, veil's CR3 and GDT, interrupts off. The BSP has filled this
    // AP's TSS and TSS descriptor (prepare_ap) before waking it.
    ".text",
    ".global probe_ap_start",
    "probe_ap_start:",
    "    cmp rdi, {max_cpus}",
    "    jae 2f",
    "    probe_cpu_setup",
    "    lea rax, [rip + {pml4}]",
    "    mov cr3, rax",
    "    lgdt [rip + probe_gdtr]",
    "    lidt [rip + probe_idtr]",
    // TSS selector of slot id + 1: 0x28 + 16 * (id + 1) = 8 * (2 * id + 7).
    "    lea eax, [rdi * 2 + 7]",
    "    shl eax, 3",
    "    ltr ax",
    // The iretq frame goes on this AP's kernel stack (top of slot id + 1).
    "    lea rax, [rdi + 2]",
    "    shl rax, 12",
    "    lea rsp, [rip + {kstacks}]",
    "    add rsp, rax",
    // User stack: top of AP stack `id`, minus 8.
    "    lea rax, [rdi + 1]",
    "    imul rax, rax, {ap_stack_size}",
    "    lea rcx, [rip + {ap_stacks} - 8]",
    "    add rax, rcx",
    "    probe_to_user {ap_main}",
    // An APIC ID the probe has no room for: park it.
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    "",
    // Exception stubs, 16 bytes apart: push a zero where the CPU pushes no
    // error code, then the vector.
    ".balign 512",
    ".global probe_isr_stubs",
    "probe_isr_stubs:",
    ".irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".balign 16",
    ".if (\\vec == 8) || (\\vec == 10) || (\\vec == 11) || (\\vec == 12) || (\\vec == 13) || (\\vec == 14) || (\\vec == 17) || (\\vec == 21) || (\\vec == 29) || (\\vec == 30)",
    "    push \\vec",
    ".else",
    "    push 0",
    "    push \\vec",
    ".endif",
    "    jmp probe_fault",
    ".endr",
    "",
    // Any exception: print `PROBE fault vec=<n> err=<hex> rip=<hex>
    // cr2=<hex>` on COM1 and end the VM with status 3 (port 0xF4). Runs on
    // the CPU's IST1 stack, so a broken RSP is reported too.
    "probe_fault:",
    "    mov r12, [rsp]",
    "    mov r13, [rsp + 8]",
    "    mov r14, [rsp + 16]",
    "    mov r15, cr2",
    "    lea rsi, [rip + probe_msg_vec]",
    "    call probe_puts",
    "    mov rax, r12",
    "    call probe_putdec",
    "    lea rsi, [rip + probe_msg_err]",
    "    call probe_puts",
    "    mov rbx, r13",
    "    call probe_puthex",
    "    lea rsi, [rip + probe_msg_rip]",
    "    call probe_puts",
    "    mov rbx, r14",
    "    call probe_puthex",
    "    lea rsi, [rip + probe_msg_cr2]",
    "    call probe_puts",
    "    mov rbx, r15",
    "    call probe_puthex",
    "    mov al, 10",
    "    call probe_putc",
    "    mov eax, 3",
    "    out 0xF4, eax",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    // al -> COM1 THR, no LSR polling.
    "probe_putc:",
    "    mov dx, 0x3F8",
    "    out dx, al",
    "    ret",
    // NUL-terminated string at rsi.
    "probe_puts:",
    "    movzx eax, byte ptr [rsi]",
    "    test al, al",
    "    jz 2f",
    "    call probe_putc",
    "    inc rsi",
    "    jmp probe_puts",
    "2:  ret",
    // rax (< 100) in decimal.
    "probe_putdec:",
    "    cmp eax, 10",
    "    jb 2f",
    "    xor edx, edx",
    "    mov ecx, 10",
    "    div ecx",
    "    push rdx",
    "    add al, 0x30",
    "    call probe_putc",
    "    pop rax",
    "2:  add al, 0x30",
    "    jmp probe_putc",
    // rbx in hex without leading zeros ("0x" is in the messages).
    "probe_puthex:",
    "    mov ecx, 60",
    "2:  mov rax, rbx",
    "    shr rax, cl",
    "    test eax, 0xF",
    "    jnz 3f",
    "    sub ecx, 4",
    "    jnz 2b",
    "3:  mov rax, rbx",
    "    shr rax, cl",
    "    and eax, 0xF",
    "    cmp al, 10",
    "    jb 4f",
    "    add al, 0x27",
    "4:  add al, 0x30",
    "    call probe_putc",
    "    sub ecx, 4",
    "    jns 3b",
    "    ret",
    "",
    ".section .rodata.probe_boot, \"a\", @progbits",
    ".balign 16",
    "probe_gdtr:",
    "    .short {gdt_len} * 8 - 1",
    "    .quad {gdt}",
    ".balign 16",
    "probe_idtr:",
    "    .short {idt_vectors} * 16 - 1",
    "    .quad {idt}",
    "probe_msg_vec: .asciz \"PROBE fault vec=\"",
    "probe_msg_err: .asciz \" err=0x\"",
    "probe_msg_rip: .asciz \" rip=0x\"",
    "probe_msg_cr2: .asciz \" cr2=0x\"",
    ".text",
    pml4 = sym PML4,
    pdpt = sym PDPT,
    pd_low = sym PD_LOW,
    pd_pool = sym PD_POOL,
    gdt = sym GDT,
    idt = sym IDT,
    tss = sym TSS,
    kstacks = sym KSTACKS,
    ap_stacks = sym AP_STACKS,
    bsp_stack = sym BSP_STACK,
    mapped_end = sym MAPPED_END,
    page_size = sym PAGE_SIZE,
    bsp_main = sym crate::bsp_main,
    ap_main = sym crate::smp::ap_main,
    leaf = const LEAF,
    max_gib_2m = const 4 + EXTRA_PDS,
    max_cpus = const MAX_CPUS,
    kstack_size = const KSTACK_SIZE,
    ap_stack_size = const AP_STACK_SIZE,
    bsp_stack_size = const BSP_STACK_SIZE,
    gdt_len = const GDT_LEN,
    tss_limit0 = const tss_limit(0),
    idt_vectors = const IDT_VECTORS,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    user_rflags = const USER_RFLAGS,
);

/// End of the identity map (a GiB multiple, at least 4 GiB).
pub fn mapped_end() -> u64 {
    // SAFETY: written once by `_start` before CPL3 code runs.
    unsafe { MAPPED_END.get().read_volatile() }
}

/// Page size of the identity map: 1 GiB or 2 MiB.
pub fn page_size() -> u64 {
    // SAFETY: as for `mapped_end`.
    unsafe { PAGE_SIZE.get().read_volatile() }
}

/// The probe's own memory, stacks and page tables included: [start, end).
pub fn image_range() -> (u64, u64) {
    // Linker symbols: only their addresses are used.
    (addr_of!(__image_start) as u64, addr_of!(__image_end) as u64)
}

/// The probe's code and read-only data: what the APs checksum.
pub fn readonly_image() -> &'static [u8] {
    let (start, _) = image_range();
    // SAFETY: [__image_start, __ro_end) is the loaded, never-written text
    // and rodata of this image.
    unsafe {
        let end = addr_of!(__ro_end) as u64;
        core::slice::from_raw_parts(start as *const u8, (end - start) as usize)
    }
}

/// Guest-physical address of the AP entry point (the wake-up vector).
pub fn ap_entry() -> u64 {
    probe_ap_start as *const () as u64
}

/// Prepare slot `1 + apic_id` before waking that AP: its TSS (RSP0 = IST1 =
/// top of its kernel stack) and its TSS descriptor. Runs at CPL3: the
/// tables are ordinary user-writable memory.
pub fn prepare_ap(apic_id: u32) {
    let slot = apic_id as usize + 1;
    assert!(slot < SLOTS);
    // SAFETY: the slot belongs to an AP that is not running yet; nothing
    // else touches it until that AP's `ltr`.
    unsafe {
        let top = (KSTACKS.get() as *mut Stack<KSTACK_SIZE>).add(slot + 1) as u64;
        let tss = addr_of_mut!((*TSS.get()).slots[slot].0);
        addr_of_mut!((*tss).rsp).write_unaligned([top, 0, 0]);
        addr_of_mut!((*tss).ist).write_unaligned([top, 0, 0, 0, 0, 0, 0]);
        let base = tss as u64;
        let low = tss_limit(slot) | ((base & 0xFF_FFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56);
        let gdt = GDT.get() as *mut u64;
        let index = ((TSS_SEL0 as usize) >> 3) + 2 * slot;
        gdt.add(index).write_volatile(low);
        gdt.add(index + 1).write_volatile(base >> 32);
    }
}
