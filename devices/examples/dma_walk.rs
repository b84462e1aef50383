//! Walks descriptor-like reads through one DMA view N times, for
//! instruction counts: `valgrind --tool=callgrind target/release/examples/dma_walk VIEW N`
//! with VIEW one of direct, identity, iommu.

use std::hint::black_box;
use std::sync::Arc;
use veil_devices::dma::{direct_view, translated_view, DmaMapping, DmaTranslation, SharedPages};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (view, n): (&str, u64) = (&args[1], args[2].parse().unwrap());
    let host = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let gate = Arc::new(SharedPages::new(&[(0, 16 << 20)]));
    let (mem, base) = match view {
        "direct" => (direct_view(host), 0),
        "identity" => (translated_view(host, Arc::new(DmaTranslation::identity(&gate, "x"))), 0),
        _ => {
            let t = Arc::new(DmaTranslation::gated_endpoint(&gate, "x"));
            t.show_domain(
                false,
                [DmaMapping {
                    iova: 1 << 32,
                    last: (1 << 32) + (16 << 20) - 1,
                    phys: 0,
                    perm: Permissions::ReadWrite,
                }]
                .iter(),
            );
            (translated_view(host, t), 1u64 << 32)
        }
    };
    let mut buf = [0u8; 16];
    for i in 0..n {
        mem.read_slice(&mut buf, GuestAddress(base + (i % 1024) * 4096))
            .unwrap();
        black_box(&buf);
    }
}
