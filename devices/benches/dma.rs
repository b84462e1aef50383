//! What a device pays to reach guest memory through each DMA view, without
//! KVM: walking a descriptor chain (reading each descriptor and the first
//! bytes of its buffer, as a device parsing a request does) and copying a
//! 64 KiB buffer.
//!
//! Views:
//! * `direct`: vm-memory with the IOMMU off (the floor);
//! * `identity`: what veil gives a bypass device (identity translation plus
//!   the shared-page gate, open while the guest is ordinary);
//! * `identity-secure`: the same after ESM, every page the chain uses shared;
//! * `iommu-warm`: a vIOMMU endpoint whose mappings are in place (lazy: one
//!   mapping of the DMA pool; the IOTLB is the complete set of mappings, so
//!   warm is the only state a lookup can hit);
//! * `iommu-cold`: strict mapping, each buffer mapped just before the chain is
//!   walked and unmapped after (the endpoint-side cost of MAP/UNMAP, without
//!   the guest's request round trip).
//!
//! `cargo bench -p veil-devices --bench dma`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use veil_devices::dma::{
    direct_view, translated_view, DmaMapping, DmaMemory, DmaTranslation, HostProtection, SharedPages,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

const RAM: u64 = 64 << 20;
/// Descriptor table, then buffers one page apart from BUFFERS.
const DESC_TABLE: u64 = 0x10_0000;
const BUFFERS: u64 = 0x20_0000;
/// Where the vIOMMU cases put the same memory.
const IOVA_OFFSET: u64 = 0x1_0000_0000;
const CHAIN: u16 = 16;

struct NoProtection;

impl HostProtection for NoProtection {
    fn set_accessible(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

fn host() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

/// A chain of CHAIN descriptors at `base` (descriptor table and buffers
/// both seen from `base`): descriptor i points at buffer i, next = i + 1.
fn write_chain(mem: &GuestMemoryMmap, base: u64) {
    for i in 0..CHAIN {
        let at = DESC_TABLE + u64::from(i) * 16;
        let more = i + 1 < CHAIN;
        mem.write_obj(base + BUFFERS + u64::from(i) * 4096, GuestAddress(at))
            .unwrap();
        mem.write_obj(4096_u32, GuestAddress(at + 8)).unwrap();
        mem.write_obj(if more { 1_u16 } else { 0 }, GuestAddress(at + 12))
            .unwrap();
        mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
    }
}

/// Reads every descriptor of the chain at `base` and the 16-byte header of
/// its buffer, as a device parsing requests does; returns a checksum.
fn walk(view: &DmaMemory, base: u64) -> u64 {
    let mut sum = 0u64;
    let mut index = 0u16;
    loop {
        let at = GuestAddress(base + DESC_TABLE + u64::from(index) * 16);
        let mut desc = [0u8; 16];
        view.read_slice(&mut desc, at).unwrap();
        let addr = u64::from_le_bytes(desc[0..8].try_into().unwrap());
        let flags = u16::from_le_bytes([desc[12], desc[13]]);
        let next = u16::from_le_bytes([desc[14], desc[15]]);
        let mut header = [0u8; 16];
        view.read_slice(&mut header, GuestAddress(addr)).unwrap();
        sum = sum.wrapping_add(addr ^ u64::from_le_bytes(header[0..8].try_into().unwrap()));
        if flags & 1 == 0 {
            return sum;
        }
        index = next;
    }
}

fn pool_mapping() -> DmaMapping {
    DmaMapping {
        iova: IOVA_OFFSET,
        last: IOVA_OFFSET + RAM - 1,
        phys: 0,
        perm: Permissions::ReadWrite,
    }
}

/// Every view, with the address its chain is seen at.
fn views() -> Vec<(&'static str, DmaMemory, u64, Option<Arc<DmaTranslation>>)> {
    let mem = host();
    write_chain(&mem, 0);
    let open = Arc::new(SharedPages::new(&[(0, RAM)]));
    let secure = Arc::new(SharedPages::new(&[(0, RAM)]));
    secure
        .enter_secure(
            DESC_TABLE,
            (BUFFERS - DESC_TABLE) / 4096 + u64::from(CHAIN),
            &NoProtection,
        )
        .unwrap();
    // The vIOMMU cases read descriptors holding IOVAs: a second chain image.
    let iova_mem = host();
    write_chain(&iova_mem, IOVA_OFFSET);
    let warm = Arc::new(DmaTranslation::gated_endpoint(&open, "warm"));
    warm.show_domain(false, [pool_mapping()].iter());
    let cold = Arc::new(DmaTranslation::gated_endpoint(&open, "cold"));
    cold.show_domain(false, std::iter::empty());
    vec![
        ("direct", direct_view(mem.clone()), 0, None),
        (
            "identity",
            translated_view(mem.clone(), Arc::new(DmaTranslation::identity(&open, "bypass"))),
            0,
            None,
        ),
        (
            "identity-secure",
            translated_view(mem.clone(), Arc::new(DmaTranslation::identity(&secure, "bypass"))),
            0,
            None,
        ),
        ("iommu-warm", translated_view(iova_mem.clone(), warm), IOVA_OFFSET, None),
        (
            "iommu-cold",
            translated_view(iova_mem, cold.clone()),
            IOVA_OFFSET,
            Some(cold),
        ),
    ]
}

fn descriptor_chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("descriptor_chain");
    group.throughput(Throughput::Elements(u64::from(CHAIN)));
    for (name, view, base, cold) in views() {
        group.bench_function(BenchmarkId::from_parameter(name), |b| match &cold {
            None => b.iter(|| black_box(walk(&view, base))),
            Some(t) => b.iter(|| {
                // Strict: the descriptor table stays mapped; each buffer is
                // mapped for the request and unmapped after.
                t.add_mapping(&DmaMapping {
                    iova: IOVA_OFFSET + DESC_TABLE,
                    last: IOVA_OFFSET + DESC_TABLE + 4095,
                    phys: DESC_TABLE,
                    perm: Permissions::Read,
                });
                for i in 0..u64::from(CHAIN) {
                    let iova = IOVA_OFFSET + BUFFERS + i * 4096;
                    t.add_mapping(&DmaMapping {
                        iova,
                        last: iova + 4095,
                        phys: BUFFERS + i * 4096,
                        perm: Permissions::ReadWrite,
                    });
                }
                let sum = walk(&view, base);
                t.remove_range(
                    IOVA_OFFSET + BUFFERS,
                    IOVA_OFFSET + BUFFERS + u64::from(CHAIN) * 4096 - 1,
                );
                black_box(sum)
            }),
        });
    }
    group.finish();
}

fn copy_64k(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy_64k");
    group.throughput(Throughput::Bytes(64 << 10));
    let mut buf = vec![0u8; 64 << 10];
    for (name, view, base, cold) in views() {
        if cold.is_some() {
            continue;
        }
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                view.read_slice(&mut buf, GuestAddress(base + BUFFERS)).unwrap();
                black_box(buf[100])
            })
        });
    }
    group.finish();
}

criterion_group!(benches, descriptor_chain, copy_64k);
criterion_main!(benches);
