//! What the virtio-iommu knows: endpoints, domains and their mappings, and
//! the rules of ATTACH, DETACH, MAP and UNMAP (virtio 1.2 §5.13.6). Every
//! change is pushed to the IOTLB of each affected endpoint before the
//! method returns, so a request's status is only seen by the driver once
//! devices already see its effect.

use super::{
    ATTACH_F_BYPASS, DOMAIN_END, DOMAIN_START, F_BYPASS_CONFIG, INPUT_END, INPUT_START, MAP_F_READ, MAP_F_WRITE,
    MSI_END, MSI_START, PAGE_SIZE_MASK,
};
use crate::dma::{DmaMapping, DmaTranslation};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use vm_memory::Permissions;

/// Request status codes (virtio 1.2 §5.13.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

/// How much guest-controlled state the device keeps at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Domains at once.
    pub domains: usize,
    /// Mappings in one domain.
    pub mappings_per_domain: usize,
    /// Mappings in all domains together.
    pub mappings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            domains: 1024,
            mappings_per_domain: 65536,
            mappings: 262_144,
        }
    }
}

struct Endpoint {
    translation: Arc<DmaTranslation>,
    domain: Option<u32>,
}

struct Domain {
    bypass: bool,
    /// By first IOVA; mappings never overlap.
    mappings: BTreeMap<u64, DmaMapping>,
    endpoints: BTreeSet<u32>,
}

pub(crate) struct IommuState {
    limits: Limits,
    /// The `bypass` config field: where detached endpoints go.
    bypass: bool,
    /// Features the driver accepted (0 until FEATURES_OK).
    acked: u64,
    endpoints: BTreeMap<u32, Endpoint>,
    domains: HashMap<u32, Domain>,
    /// Mappings in all domains.
    mappings: usize,
}

fn overlaps(a_first: u64, a_last: u64, b_first: u64, b_last: u64) -> bool {
    a_first <= b_last && b_first <= a_last
}

fn aligned(addr: u64) -> bool {
    addr & !PAGE_SIZE_MASK == 0
}

impl IommuState {
    /// Takes the endpoints over; they start detached. Endpoint IDs must be
    /// unique.
    pub fn new(endpoints: Vec<(u32, Arc<DmaTranslation>)>, bypass: bool, limits: Limits) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (id, translation) in endpoints {
            translation.show_detached(bypass);
            let ep = Endpoint {
                translation,
                domain: None,
            };
            if map.insert(id, ep).is_some() {
                return Err(format!("endpoint ID {id} given twice"));
            }
        }
        Ok(IommuState {
            limits,
            bypass,
            acked: 0,
            endpoints: map,
            domains: HashMap::new(),
            mappings: 0,
        })
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn set_acked(&mut self, acked: u64) {
        self.acked = acked;
    }

    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// The driver wrote `bypass`: every detached endpoint follows at once.
    pub fn set_bypass(&mut self, bypass: bool) {
        if bypass == self.bypass {
            return;
        }
        self.bypass = bypass;
        for ep in self.endpoints.values().filter(|e| e.domain.is_none()) {
            ep.translation.show_detached(bypass);
        }
    }

    /// Device reset: no domains, every endpoint detached. `bypass` stays
    /// what the driver last made it (§5.13.4: it survives device reset).
    pub fn reset(&mut self) {
        self.domains.clear();
        self.mappings = 0;
        self.acked = 0;
        for ep in self.endpoints.values_mut() {
            ep.domain = None;
            ep.translation.show_detached(self.bypass);
        }
    }

    /// Removes `endpoint` from `domain`'s books, and the domain itself when
    /// it was the last one there (§5.13.6.4: it ceases to exist). The
    /// endpoint's IOTLB is left to the caller.
    fn leave(&mut self, domain: u32, endpoint: u32) {
        if let Some(d) = self.domains.get_mut(&domain) {
            d.endpoints.remove(&endpoint);
            if d.endpoints.is_empty() {
                self.mappings -= d.mappings.len();
                self.domains.remove(&domain);
            }
        }
    }

    fn check_domain(domain: u32) -> Result<(), Status> {
        if (DOMAIN_START..=DOMAIN_END).contains(&domain) {
            Ok(())
        } else {
            Err(Status::Range)
        }
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32, reserved: u32) -> Result<(), Status> {
        if reserved != 0 {
            return Err(Status::Inval);
        }
        let known = if self.acked & F_BYPASS_CONFIG != 0 {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if flags & !known != 0 {
            return Err(Status::Inval);
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        let old = self.endpoints.get(&endpoint).ok_or(Status::NoEnt)?.domain;
        Self::check_domain(domain)?;
        match self.domains.get(&domain) {
            Some(d) if d.bypass != bypass => return Err(Status::Inval),
            Some(_) if old == Some(domain) => return Ok(()),
            Some(_) => {}
            None => {
                // Moving the last endpoint out of a domain frees that one.
                let freed = old
                    .and_then(|o| self.domains.get(&o))
                    .map_or(0, |d| usize::from(d.endpoints.len() == 1));
                if self.domains.len() - freed >= self.limits.domains {
                    return Err(Status::NoMem);
                }
            }
        }
        // Detach first (§5.13.6.3), but the endpoint goes straight from the
        // old domain's translations to the new one's, never through bypass.
        if let Some(o) = old {
            self.leave(o, endpoint);
        }
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            mappings: BTreeMap::new(),
            endpoints: BTreeSet::new(),
        });
        d.endpoints.insert(endpoint);
        let ep = self.endpoints.get_mut(&endpoint).ok_or(Status::DevErr)?;
        ep.domain = Some(domain);
        ep.translation.show_domain(d.bypass, d.mappings.values());
        Ok(())
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<(), Status> {
        let current = self.endpoints.get(&endpoint).ok_or(Status::NoEnt)?.domain;
        Self::check_domain(domain)?;
        if current != Some(domain) {
            return Err(Status::Inval);
        }
        self.leave(domain, endpoint);
        let bypass = self.bypass;
        let ep = self.endpoints.get_mut(&endpoint).ok_or(Status::DevErr)?;
        ep.domain = None;
        ep.translation.show_detached(bypass);
        Ok(())
    }

    /// The domain for MAP and UNMAP: it exists and is not a bypass domain.
    fn mapping_domain(domains: &mut HashMap<u32, Domain>, domain: u32) -> Result<&mut Domain, Status> {
        Self::check_domain(domain)?;
        let d = domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        if d.bypass {
            return Err(Status::Inval);
        }
        Ok(d)
    }

    fn check_input(virt_start: u64, virt_end: u64) -> Result<(), Status> {
        if virt_end < virt_start {
            return Err(Status::Inval);
        }
        let input = INPUT_START..=INPUT_END;
        if !input.contains(&virt_start) || !input.contains(&virt_end) {
            return Err(Status::Range);
        }
        Ok(())
    }

    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Result<(), Status> {
        // MAP_F_MMIO is unknown here: VIRTIO_IOMMU_F_MMIO is not offered.
        if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 {
            return Err(Status::Inval);
        }
        let limits = self.limits;
        let total = self.mappings;
        let d = Self::mapping_domain(&mut self.domains, domain)?;
        Self::check_input(virt_start, virt_end)?;
        // INPUT_END < u64::MAX, so `virt_end + 1` cannot overflow.
        if !aligned(virt_start) || !aligned(virt_end + 1) || !aligned(phys_start) {
            return Err(Status::Range);
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Err(Status::Range);
        }
        if overlaps(virt_start, virt_end, MSI_START, MSI_END) {
            return Err(Status::Range);
        }
        // Mappings are disjoint: only the last one starting at or before
        // `virt_end` can reach into the new range.
        if let Some((_, m)) = d.mappings.range(..=virt_end).next_back() {
            if m.last >= virt_start {
                return Err(Status::Inval);
            }
        }
        if d.mappings.len() >= limits.mappings_per_domain || total >= limits.mappings {
            return Err(Status::NoMem);
        }
        let perm = match (flags & MAP_F_READ != 0, flags & MAP_F_WRITE != 0) {
            (true, true) => Permissions::ReadWrite,
            (true, false) => Permissions::Read,
            (false, true) => Permissions::Write,
            (false, false) => Permissions::No,
        };
        let m = DmaMapping {
            iova: virt_start,
            last: virt_end,
            phys: phys_start,
            perm,
        };
        d.mappings.insert(virt_start, m);
        for id in &d.endpoints {
            if let Some(ep) = self.endpoints.get(id) {
                ep.translation.add_mapping(&m);
            }
        }
        self.mappings += 1;
        Ok(())
    }

    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<(), Status> {
        let d = Self::mapping_domain(&mut self.domains, domain)?;
        Self::check_input(virt_start, virt_end)?;
        // A mapping that starts before the range and reaches into it, or
        // starts inside and ends after it, would be split (§5.13.6.6).
        if let Some((_, m)) = d.mappings.range(..virt_start).next_back() {
            if m.last >= virt_start {
                return Err(Status::Range);
            }
        }
        if let Some((_, m)) = d.mappings.range(virt_start..=virt_end).next_back() {
            if m.last > virt_end {
                return Err(Status::Range);
            }
        }
        let doomed: Vec<u64> = d.mappings.range(virt_start..=virt_end).map(|(&k, _)| k).collect();
        if doomed.is_empty() {
            return Ok(());
        }
        for k in &doomed {
            d.mappings.remove(k);
        }
        // Nothing else lives in the range, so one invalidation per endpoint
        // covers every removed mapping.
        for id in &d.endpoints {
            if let Some(ep) = self.endpoints.get(id) {
                ep.translation.remove_range(virt_start, virt_end);
            }
        }
        self.mappings -= doomed.len();
        Ok(())
    }

    pub fn probe(&self, endpoint: u32) -> Result<(), Status> {
        if self.endpoints.contains_key(&endpoint) {
            Ok(())
        } else {
            Err(Status::NoEnt)
        }
    }

    /// The domain `endpoint` is attached to.
    #[cfg(test)]
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).and_then(|e| e.domain)
    }

    /// Mappings of `domain`, or None if it does not exist.
    #[cfg(test)]
    pub fn mapping_count(&self, domain: u32) -> Option<usize> {
        self.domains.get(&domain).map(|d| d.mappings.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{translated_view, FaultQueue};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const RW: u32 = MAP_F_READ | MAP_F_WRITE;

    struct Setup {
        state: IommuState,
        eps: Vec<Arc<DmaTranslation>>,
        mem: GuestMemoryMmap,
    }

    impl Setup {
        fn view(&self, i: usize) -> crate::dma::DmaMemory {
            translated_view(self.mem.clone(), self.eps[i].clone())
        }

        /// Whether endpoint `i` can read a byte at `iova`.
        fn reads(&self, i: usize, iova: u64) -> bool {
            self.view(i).read_obj::<u8>(GuestAddress(iova)).is_ok()
        }
    }

    /// Endpoints 1, 2 and 3, bypass off.
    fn setup_with(limits: Limits, bypass: bool) -> Setup {
        let faults = Arc::new(FaultQueue::new(16).unwrap());
        let eps: Vec<Arc<DmaTranslation>> = (0..3).map(|_| Arc::new(DmaTranslation::new())).collect();
        for (i, t) in eps.iter().enumerate() {
            assert!(t.bind(i as u32 + 1, faults.clone()));
        }
        let list = eps.iter().enumerate().map(|(i, t)| (i as u32 + 1, t.clone())).collect();
        let state = IommuState::new(list, bypass, limits).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        Setup { state, eps, mem }
    }

    fn setup() -> Setup {
        setup_with(Limits::default(), false)
    }

    #[test]
    fn duplicate_endpoint_ids_are_refused() {
        let t = Arc::new(DmaTranslation::new());
        let list = vec![(5, t.clone()), (5, t)];
        assert!(IommuState::new(list, false, Limits::default()).is_err());
    }

    #[test]
    fn map_checks_its_arguments() {
        let mut s = setup();
        let st = &mut s.state;
        assert_eq!(
            st.map(1, 0x1000, 0x1fff, 0x1000, RW),
            Err(Status::NoEnt),
            "domain never created"
        );
        st.attach(1, 1, 0, 0).unwrap();
        assert_eq!(st.map(DOMAIN_END + 1, 0x1000, 0x1fff, 0, RW), Err(Status::Range));
        assert_eq!(st.map(1, 0x1000, 0x1fff, 0, 4), Err(Status::Inval), "MMIO not offered");
        assert_eq!(st.map(1, 0x1000, 0x1fff, 0, 8), Err(Status::Inval), "unknown flag");
        assert_eq!(st.map(1, 0x2000, 0x1fff, 0, RW), Err(Status::Inval), "end before start");
        assert_eq!(st.map(1, 0x1800, 0x1fff, 0, RW), Err(Status::Range), "start unaligned");
        assert_eq!(
            st.map(1, 0x1000, 0x17ff, 0, RW),
            Err(Status::Range),
            "end + 1 unaligned"
        );
        assert_eq!(
            st.map(1, 0x1000, 0x1fff, 0x800, RW),
            Err(Status::Range),
            "phys unaligned"
        );
        assert_eq!(st.map(1, 0x1000, 0x1000, 0, RW), Err(Status::Range), "one byte");
        assert_eq!(st.map(1, INPUT_END + 1, INPUT_END + 0x1000, 0, RW), Err(Status::Range));
        assert_eq!(st.map(1, INPUT_END - 0xfff, u64::MAX, 0, RW), Err(Status::Range));
        assert_eq!(
            st.map(1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
            Err(Status::Range),
            "phys wraps"
        );
        assert_eq!(
            st.map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW),
            Err(Status::Range),
            "MSI window"
        );
        assert_eq!(
            st.map(1, 0xfed0_0000, 0xfeff_ffff, 0, RW),
            Err(Status::Range),
            "around MSI"
        );
        assert_eq!(st.mapping_count(1), Some(0));
        st.map(1, INPUT_END - 0xfff, INPUT_END, 0, RW).unwrap();
        st.map(1, 0x1000, 0x1fff, 0x1000, 0).unwrap();
        assert_eq!(st.mapping_count(1), Some(2));
    }

    #[test]
    fn overlapping_maps_are_invalid() {
        let mut s = setup();
        let st = &mut s.state;
        st.attach(1, 1, 0, 0).unwrap();
        st.map(1, 0x4000, 0x7fff, 0x4000, RW).unwrap();
        for (a, b) in [
            (0x4000, 0x7fff),
            (0x3000, 0x4fff),
            (0x7000, 0x8fff),
            (0x5000, 0x5fff),
            (0x0, 0xffff),
        ] {
            assert_eq!(st.map(1, a, b, 0, RW), Err(Status::Inval), "{a:#x}..={b:#x}");
        }
        st.map(1, 0x3000, 0x3fff, 0, RW).unwrap();
        st.map(1, 0x8000, 0x8fff, 0, RW).unwrap();
        assert_eq!(st.mapping_count(1), Some(3));
    }

    #[test]
    fn unmap_follows_the_spec_examples() {
        let mut s = setup();
        let st = &mut s.state;
        st.attach(1, 1, 0, 0).unwrap();
        let p = |n: u64| n * 0x1000;
        let last = |n: u64| n * 0x1000 + 0xfff;
        // (1) nothing there.
        st.unmap(1, p(0), last(4)).unwrap();
        // (2) exactly one mapping.
        st.map(1, p(0), last(9), 0, RW).unwrap();
        st.unmap(1, p(0), last(9)).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        // (3) two whole mappings.
        st.map(1, p(0), last(4), 0, RW).unwrap();
        st.map(1, p(5), last(9), 0, RW).unwrap();
        st.unmap(1, p(0), last(9)).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        // (4) would split: nothing removed.
        st.map(1, p(0), last(9), 0, RW).unwrap();
        assert_eq!(st.unmap(1, p(0), last(4)), Err(Status::Range));
        assert_eq!(st.unmap(1, p(5), last(12)), Err(Status::Range));
        assert_eq!(st.unmap(1, p(0) + 1, last(9)), Err(Status::Range), "unaligned, inside");
        assert_eq!(st.mapping_count(1), Some(1));
        st.unmap(1, p(0), last(9)).unwrap();
        // (5) one of two.
        st.map(1, p(0), last(4), 0, RW).unwrap();
        st.map(1, p(5), last(9), 0, RW).unwrap();
        st.unmap(1, p(0), last(4)).unwrap();
        assert_eq!(st.mapping_count(1), Some(1));
        st.unmap(1, p(5), last(9)).unwrap();
        // (6) spilling over.
        st.map(1, p(0), last(4), 0, RW).unwrap();
        st.unmap(1, p(0), last(9)).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        // (7) a hole in the middle.
        st.map(1, p(0), last(4), 0, RW).unwrap();
        st.map(1, p(10), last(14), 0, RW).unwrap();
        st.unmap(1, p(0), last(14)).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        // Unaligned but covering whole mappings: fine.
        st.map(1, p(3), last(3), 0, RW).unwrap();
        st.unmap(1, p(2) + 0x800, p(4) + 0x7ff).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        // Argument errors.
        assert_eq!(st.unmap(1, p(2), p(1)), Err(Status::Inval));
        assert_eq!(st.unmap(1, 0, u64::MAX), Err(Status::Range), "outside the input range");
        assert_eq!(st.unmap(2, 0, last(1)), Err(Status::NoEnt));
        assert_eq!(st.unmap(DOMAIN_END + 1, 0, last(1)), Err(Status::Range));
    }

    /// A guest that maps a million single pages into one domain gets NOMEM
    /// past the default per-domain cap, and the device keeps no more.
    #[test]
    fn a_million_maps_stop_at_the_cap() {
        let mut s = setup();
        let st = &mut s.state;
        st.attach(1, 1, 0, 0).unwrap();
        let cap = Limits::default().mappings_per_domain as u64;
        let mut refused = 0u64;
        for i in 0..1_000_000u64 {
            let iova = i * 0x1000;
            match st.map(1, iova, iova + 0xfff, 0, RW) {
                Ok(()) => assert!(i < cap, "map {i} past the cap"),
                Err(e) => {
                    assert_eq!(e, Status::NoMem, "map {i}");
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 1_000_000 - cap);
        assert_eq!(st.mapping_count(1), Some(cap as usize));
        // Unmapping everything gives room back.
        st.unmap(1, 0, INPUT_END).unwrap();
        assert_eq!(st.mapping_count(1), Some(0));
        st.map(1, 0, 0xfff, 0, RW).unwrap();
    }

    #[test]
    fn limits_give_nomem() {
        let limits = Limits {
            domains: 2,
            mappings_per_domain: 3,
            mappings: 4,
        };
        let mut s = setup_with(limits, false);
        let st = &mut s.state;
        st.attach(10, 1, 0, 0).unwrap();
        st.attach(11, 2, 0, 0).unwrap();
        assert_eq!(st.attach(12, 3, 0, 0), Err(Status::NoMem));
        assert_eq!(st.domain_of(3), None);
        // Moving the only endpoint of a domain frees a slot for the new one.
        st.attach(12, 2, 0, 0).unwrap();
        assert_eq!(st.mapping_count(11), None);
        for i in 0..3 {
            st.map(10, i * 0x1000, i * 0x1000 + 0xfff, 0, RW).unwrap();
        }
        assert_eq!(
            st.map(10, 0x10_0000, 0x10_0fff, 0, RW),
            Err(Status::NoMem),
            "per domain"
        );
        st.map(12, 0, 0xfff, 0, RW).unwrap();
        assert_eq!(st.map(12, 0x1000, 0x1fff, 0, RW), Err(Status::NoMem), "in all");
        st.unmap(10, 0, 0xfff).unwrap();
        st.map(12, 0x1000, 0x1fff, 0, RW).unwrap();
        // Destroying a domain gives its mappings back.
        st.detach(12, 2).unwrap();
        st.map(10, 0, 0xfff, 0, RW).unwrap();
    }

    #[test]
    fn attach_checks_and_moves() {
        let mut s = setup();
        s.state.attach(1, 1, 0, 0).unwrap();
        s.state.map(1, 0x1000, 0x1fff, 0x5000, RW).unwrap();
        s.state.attach(2, 2, 0, 0).unwrap();
        s.state.map(2, 0x1000, 0x1fff, 0x9000, MAP_F_READ).unwrap();
        assert!(s.reads(0, 0x1000));
        s.mem.write_obj(0x42_u8, GuestAddress(0x9000)).unwrap();

        let st = &mut s.state;
        assert_eq!(st.attach(1, 9, 0, 0), Err(Status::NoEnt));
        assert_eq!(st.attach(DOMAIN_END + 1, 1, 0, 0), Err(Status::Range));
        assert_eq!(st.attach(1, 1, 0, 1), Err(Status::Inval), "reserved");
        assert_eq!(st.attach(1, 1, 2, 0), Err(Status::Inval), "unknown flag");
        assert_eq!(
            st.attach(3, 3, ATTACH_F_BYPASS, 0),
            Err(Status::Inval),
            "BYPASS_CONFIG not negotiated"
        );
        // Again into the same domain: nothing changes.
        st.attach(1, 1, 0, 0).unwrap();
        assert_eq!(st.mapping_count(1), Some(1));

        // Endpoint 1 moves to domain 2: domain 1 had no one else, so it is
        // gone with its mapping, and endpoint 1 now sees domain 2's.
        st.attach(2, 1, 0, 0).unwrap();
        assert_eq!(st.domain_of(1), Some(2));
        assert_eq!(st.mapping_count(1), None);
        assert_eq!(s.view(0).read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x42);
        assert!(
            s.view(0).write_obj(1_u8, GuestAddress(0x1000)).is_err(),
            "domain 2 maps it read-only"
        );
        // A later MAP in domain 2 reaches both of its endpoints.
        s.state.map(2, 0x3000, 0x3fff, 0x3000, RW).unwrap();
        assert!(s.reads(0, 0x3000) && s.reads(1, 0x3000));
        assert!(!s.reads(2, 0x3000), "endpoint 3 is not attached");
        // Domain 1 was destroyed: re-creating it starts empty.
        s.state.attach(1, 3, 0, 0).unwrap();
        assert_eq!(s.state.mapping_count(1), Some(0));
    }

    #[test]
    fn bypass_domains_need_the_feature_and_refuse_mappings() {
        let mut s = setup();
        s.state.set_acked(F_BYPASS_CONFIG);
        s.state.attach(5, 1, ATTACH_F_BYPASS, 0).unwrap();
        assert!(s.reads(0, 0x8_0000), "identity");
        assert_eq!(
            s.state.attach(5, 2, 0, 0),
            Err(Status::Inval),
            "inconsistent with the domain"
        );
        assert_eq!(s.state.map(5, 0x1000, 0x1fff, 0, RW), Err(Status::Inval));
        assert_eq!(s.state.unmap(5, 0x1000, 0x1fff), Err(Status::Inval));
        s.state.attach(6, 1, 0, 0).unwrap();
        assert!(!s.reads(0, 0x8_0000), "moved to an empty domain");
    }

    #[test]
    fn detach_errors_and_effects() {
        let mut s = setup();
        let st = &mut s.state;
        assert_eq!(st.detach(1, 9), Err(Status::NoEnt));
        assert_eq!(st.detach(1, 1), Err(Status::Inval), "not attached");
        st.attach(1, 1, 0, 0).unwrap();
        st.attach(1, 2, 0, 0).unwrap();
        st.map(1, 0x1000, 0x1fff, 0x1000, RW).unwrap();
        assert_eq!(st.detach(2, 1), Err(Status::Inval), "attached elsewhere");
        assert_eq!(st.detach(DOMAIN_END + 1, 1), Err(Status::Range));
        st.detach(1, 1).unwrap();
        assert_eq!(st.detach(1, 1), Err(Status::Inval), "twice");
        assert!(!s.reads(0, 0x1000), "detached, bypass off");
        assert!(s.reads(1, 0x1000), "the other endpoint keeps the domain");
        assert_eq!(s.state.mapping_count(1), Some(1));
        s.state.detach(1, 2).unwrap();
        assert_eq!(s.state.mapping_count(1), None, "the last one out destroys the domain");
        assert_eq!(s.state.map(1, 0x1000, 0x1fff, 0, RW), Err(Status::NoEnt));
    }

    #[test]
    fn bypass_applies_to_detached_endpoints_only() {
        let mut s = setup_with(Limits::default(), true);
        assert!(s.reads(0, 0x1000), "bypass by default");
        s.state.attach(1, 1, 0, 0).unwrap();
        assert!(!s.reads(0, 0x1000), "attached to an empty domain");
        s.state.set_bypass(false);
        assert!(!s.reads(1, 0x1000));
        s.state.set_bypass(true);
        assert!(s.reads(1, 0x1000));
        assert!(!s.reads(0, 0x1000));
        s.state.detach(1, 1).unwrap();
        assert!(s.reads(0, 0x1000));
        // Reset detaches everything and keeps the bypass setting.
        s.state.set_bypass(false);
        s.state.attach(1, 1, 0, 0).unwrap();
        s.state.map(1, 0x1000, 0x1fff, 0x1000, RW).unwrap();
        s.state.reset();
        assert!(!s.state.bypass());
        assert_eq!(s.state.domain_of(1), None);
        assert!(!s.reads(0, 0x1000));
    }

    #[test]
    fn unmap_is_visible_before_it_returns() {
        let mut s = setup();
        s.state.attach(1, 1, 0, 0).unwrap();
        s.state.attach(1, 2, 0, 0).unwrap();
        s.state.map(1, 0x1000, 0x2fff, 0x4000, RW).unwrap();
        s.state.map(1, 0x3000, 0x3fff, 0x8000, RW).unwrap();
        let v = s.view(1);
        v.write_obj(0x99_u8, GuestAddress(0x2000)).unwrap();
        assert_eq!(s.mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x99);
        s.state.unmap(1, 0x1000, 0x2fff).unwrap();
        assert!(v.write_obj(0x11_u8, GuestAddress(0x2000)).is_err());
        assert!(!s.reads(0, 0x1000));
        assert_eq!(s.mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x99);
        assert!(s.reads(0, 0x3000) && s.reads(1, 0x3000), "the neighbour stays");
        assert!(s.eps[1].faults() >= 1);
    }
}
