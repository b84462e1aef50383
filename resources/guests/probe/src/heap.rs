//! The probe's heap: `alloc` for virtio-drivers (indirect descriptor
//! tables, the console's receive buffer) and for the workloads' data
//! buffers.
//!
//! A size-class allocator over one region of RAM that `virtio::reserve`
//! carves out of e820 at run time (`init`). Every request is rounded up to
//! a power of two (at least 16 bytes) and served from that class's free
//! list, else from a bump pointer, naturally aligned: a block of 2^k bytes
//! sits at a multiple of 2^k, so any alignment up to the block size holds.
//! Freed blocks go back on their class's list and are never merged; the
//! probe's allocation pattern (a few long-lived buffers, many short-lived
//! small tables of one size) suits that.
//!
//! Before `init` (and when the region is used up) every allocation fails,
//! which ends in a `PROBE panic` line through the panic handler.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, Ordering};

/// Classes 2^4 .. 2^(4 + CLASSES - 1): 16 bytes to 256 MiB.
const MIN_SHIFT: u32 = 4;
const CLASSES: usize = 25;

struct State {
    /// Bump pointer and end of the region, and its size.
    next: usize,
    end: usize,
    size: usize,
    /// Head of each class's free list (0 = empty); a free block holds the
    /// address of the next one in its first word.
    free: [usize; CLASSES],
}

pub struct Heap {
    lock: AtomicBool,
    state: UnsafeCell<State>,
}

// SAFETY: `state` is only touched with `lock` held.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap {
    lock: AtomicBool::new(false),
    state: UnsafeCell::new(State {
        next: 0,
        end: 0,
        size: 0,
        free: [0; CLASSES],
    }),
};

impl Heap {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.state.get() });
        self.lock.store(false, Ordering::Release);
        r
    }
}

/// The class of a layout: block size 2^(MIN_SHIFT + class).
fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let shift = size.checked_next_power_of_two()?.trailing_zeros();
    let class = (shift - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(&layout) else {
            return null_mut();
        };
        let size = 1usize << (class as u32 + MIN_SHIFT);
        self.with(|s| {
            let block = if s.free[class] != 0 {
                let b = s.free[class];
                // SAFETY: a free block of this class holds the next link.
                s.free[class] = unsafe { (b as *const usize).read() };
                b
            } else {
                let b = s.next.next_multiple_of(size);
                match b.checked_add(size) {
                    Some(e) if s.end != 0 && e <= s.end => s.next = e,
                    _ => return null_mut(),
                }
                b
            };
            block as *mut u8
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class_of(&layout) else {
            return;
        };
        self.with(|s| {
            // SAFETY: the caller gives back a block of this class, which is
            // ours again to write the link into.
            unsafe { (ptr as *mut usize).write(s.free[class]) };
            s.free[class] = ptr as usize;
        })
    }
}

/// Hand the heap its memory: [start, start + len), identity-mapped RAM
/// that nothing else uses from now on. Only the first call counts.
pub fn init(start: u64, len: u64) {
    HEAP.with(|s| {
        if s.end == 0 && len != 0 {
            s.next = start as usize;
            s.end = (start + len) as usize;
            s.size = len as usize;
        }
    })
}

/// Bytes the heap was given (0 before `init`).
pub fn size() -> u64 {
    HEAP.with(|s| s.size as u64)
}
