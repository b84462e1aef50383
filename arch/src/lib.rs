//! x86-64 boot for veil: where things live in guest memory, the initial CPU
//! state, CPUID, the zero page and the ACPI tables.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod pvh;
pub mod regs;
