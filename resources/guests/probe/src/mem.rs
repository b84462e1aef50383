//! The C memory functions the compiler may call (there is no libc here).
//! Written with string instructions so that the compiler cannot turn them
//! back into calls to themselves. They only run at CPL3.

use core::arch::asm;

/// # Safety
/// As C `memcpy`: valid, non-overlapping ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
         options(nostack, preserves_flags));
    dst
}

/// # Safety
/// As C `memmove`: valid ranges of `n` bytes, which may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or past its end: a forward copy is safe.
        return memcpy(dst, src, n);
    }
    // Overlap with dst above src: copy backwards (direction flag set, then
    // cleared again as the ABI requires).
    asm!("std", "rep movsb", "cld",
         inout("rdi") dst.add(n).wrapping_sub(1) => _, inout("rsi") src.add(n).wrapping_sub(1) => _,
         inout("rcx") n => _, options(nostack));
    dst
}

/// # Safety
/// As C `memset`: a valid range of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
         options(nostack, preserves_flags));
    dst
}

/// # Safety
/// As C `memcmp`: valid ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // Volatile reads keep this loop a loop (not a call to memcmp).
        let (x, y) = (a.add(i).read_volatile(), b.add(i).read_volatile());
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
