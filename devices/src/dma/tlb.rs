//! One endpoint's translations: non-overlapping IOVA ranges, each to a
//! guest-physical range with permissions, sorted by IOVA.
//!
//! veil's own rather than vm-memory's `Iotlb`: a lookup here is one binary
//! search and a walk over the (usually one) mapping the access touches,
//! where `Iotlb::lookup` scans its range map three times. A sorted vector
//! rather than a BTreeMap: lookups are what the data path does, and they
//! cost about half the instructions (callgrind, examples/dma_walk.rs);
//! MAP and UNMAP, rarer, pay for the shifting.

use super::DmaMapping;
use vm_memory::Permissions;

/// Where a translated access lands: up to this many pieces are kept inline.
pub const MAX_PIECES: usize = 4;

/// Guest-physical pieces of one access, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pieces {
    len: usize,
    items: [(u64, usize); MAX_PIECES],
}

impl Pieces {
    pub fn one(gpa: u64, len: usize) -> Pieces {
        let mut p = Pieces::default();
        p.items[0] = (gpa, len);
        p.len = 1;
        p
    }

    fn push(&mut self, gpa: u64, len: usize) -> bool {
        if self.len == MAX_PIECES {
            return false;
        }
        self.items[self.len] = (gpa, len);
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[(u64, usize)] {
        &self.items[..self.len]
    }
}

/// Why a lookup failed, and the first address it failed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    Unmapped(u64),
    Permission(u64),
    /// More mappings than `MAX_PIECES` for one access: refused, so that the
    /// data path never allocates.
    Fragmented(u64),
}

#[derive(Debug, Default)]
pub struct Tlb {
    /// Sorted by IOVA, never overlapping: a binary search finds the one
    /// mapping an address can be in.
    maps: Vec<DmaMapping>,
}

fn allows(perm: Permissions, access: Permissions) -> bool {
    perm.allow(access)
}

impl Tlb {
    pub fn clear(&mut self) {
        self.maps.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Replaces whatever `m` overlaps.
    pub fn insert(&mut self, m: DmaMapping) {
        self.remove(m.iova, m.last);
        let at = self.maps.partition_point(|x| x.iova < m.iova);
        self.maps.insert(at, m);
    }

    /// Removes `iova..=last`, keeping the parts of mappings that cross its
    /// ends.
    pub fn remove(&mut self, iova: u64, last: u64) {
        let first = self.maps.partition_point(|m| m.last < iova);
        let end = self.maps.partition_point(|m| m.iova <= last);
        if first >= end {
            return;
        }
        let mut kept = Vec::with_capacity(2);
        let (head, tail) = (self.maps[first], self.maps[end - 1]);
        if head.iova < iova {
            kept.push(DmaMapping { last: iova - 1, ..head });
        }
        if tail.last > last {
            let from = last + 1;
            kept.push(DmaMapping {
                iova: from,
                phys: tail.phys + (from - tail.iova),
                ..tail
            });
        }
        self.maps.splice(first..end, kept);
    }

    /// The guest-physical pieces of `iova..iova + len` for `access`.
    /// `len` is at least 1 and the range does not wrap (callers check).
    pub fn lookup(&self, iova: u64, len: usize, access: Permissions) -> Result<Pieces, Miss> {
        let last = iova + (len as u64 - 1);
        let mut index = match self.maps.partition_point(|m| m.iova <= iova) {
            0 => return Err(Miss::Unmapped(iova)),
            i => i - 1,
        };
        // The common case: one mapping holds the whole access.
        let m = &self.maps[index];
        if m.last >= last && allows(m.perm, access) {
            return Ok(Pieces::one(m.phys + (iova - m.iova), len));
        }
        let mut pieces = Pieces::default();
        let mut at = iova;
        loop {
            let Some(m) = self.maps.get(index) else {
                return Err(Miss::Unmapped(at));
            };
            if m.iova > at || m.last < at {
                return Err(Miss::Unmapped(at));
            }
            if !allows(m.perm, access) {
                return Err(Miss::Permission(at));
            }
            let end = m.last.min(last);
            let gpa = m.phys + (at - m.iova);
            // Adjacent pieces that are adjacent in guest memory too are one.
            let merged = match pieces.len {
                0 => false,
                n => {
                    let (g, l) = &mut pieces.items[n - 1];
                    if *g + *l as u64 == gpa {
                        *l += (end - at + 1) as usize;
                        true
                    } else {
                        false
                    }
                }
            };
            if !merged && !pieces.push(gpa, (end - at + 1) as usize) {
                return Err(Miss::Fragmented(at));
            }
            if end == last {
                return Ok(pieces);
            }
            at = end + 1;
            index += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(iova: u64, len: u64, phys: u64, perm: Permissions) -> DmaMapping {
        DmaMapping {
            iova,
            last: iova + len - 1,
            phys,
            perm,
        }
    }

    const RW: Permissions = Permissions::ReadWrite;

    #[test]
    fn lookups_follow_mappings_and_merge_contiguous_pieces() {
        let mut t = Tlb::default();
        t.insert(m(0x1000, 0x1000, 0x8000, RW));
        t.insert(m(0x2000, 0x1000, 0x9000, RW));
        t.insert(m(0x3000, 0x1000, 0x2000, Permissions::Read));
        assert_eq!(t.lookup(0x1800, 0x10, Permissions::Read), Ok(Pieces::one(0x8800, 0x10)));
        let p = t.lookup(0x1ff0, 0x1020, Permissions::Read).unwrap();
        assert_eq!(p.as_slice(), &[(0x8ff0, 0x1010), (0x2000, 0x10)]);
        assert_eq!(
            t.lookup(0x2ff0, 0x20, Permissions::Write),
            Err(Miss::Permission(0x3000))
        );
        assert_eq!(t.lookup(0x3ff0, 0x20, Permissions::Read), Err(Miss::Unmapped(0x4000)));
        assert_eq!(t.lookup(0x800, 0x10, Permissions::Read), Err(Miss::Unmapped(0x800)));
    }

    #[test]
    fn removal_splits_what_it_cuts() {
        let mut t = Tlb::default();
        t.insert(m(0x10000, 0x10000, 0x100000, RW));
        t.remove(0x14000, 0x14fff);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(0x13fff, 1, Permissions::Read), Ok(Pieces::one(0x103fff, 1)));
        assert_eq!(t.lookup(0x14000, 1, Permissions::Read), Err(Miss::Unmapped(0x14000)));
        assert_eq!(t.lookup(0x15000, 1, Permissions::Read), Ok(Pieces::one(0x105000, 1)));
        // Across two mappings and the hole between them.
        t.remove(0x12000, 0x16fff);
        assert_eq!(t.lookup(0x11fff, 1, Permissions::Read), Ok(Pieces::one(0x101fff, 1)));
        assert_eq!(t.lookup(0x17000, 1, Permissions::Read), Ok(Pieces::one(0x107000, 1)));
        assert_eq!(t.lookup(0x16fff, 1, Permissions::Read), Err(Miss::Unmapped(0x16fff)));
        // A new mapping replaces what it overlaps.
        t.insert(m(0x11000, 0x7000, 0x0, RW));
        assert_eq!(t.lookup(0x11000, 0x10, Permissions::Read), Ok(Pieces::one(0x0, 0x10)));
        assert_eq!(t.lookup(0x17fff, 1, Permissions::Read), Ok(Pieces::one(0x6fff, 1)));
        assert_eq!(t.lookup(0x18000, 1, Permissions::Read), Ok(Pieces::one(0x108000, 1)));
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn an_access_over_too_many_mappings_is_refused() {
        let mut t = Tlb::default();
        for i in 0..8u64 {
            // Not contiguous in guest memory: no merging.
            t.insert(m(i * 0x1000, 0x1000, (8 - i) * 0x10000, RW));
        }
        assert!(t.lookup(0, 0x4000, Permissions::Read).is_ok());
        assert_eq!(t.lookup(0, 0x5000, Permissions::Read), Err(Miss::Fragmented(0x4000)));
    }

    #[test]
    fn the_top_of_the_address_space_is_reachable() {
        let mut t = Tlb::default();
        t.insert(DmaMapping {
            iova: u64::MAX - 0xfff,
            last: u64::MAX,
            phys: 0x5000,
            perm: RW,
        });
        assert_eq!(t.lookup(u64::MAX, 1, Permissions::Write), Ok(Pieces::one(0x5fff, 1)));
        t.remove(u64::MAX - 0xfff, u64::MAX);
        assert!(t.is_empty());
    }
}
