//! The CPUID a vCPU sees: what KVM supports, with the APIC ID filled in per
//! vCPU and the features the user asked to hide removed.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

#[derive(Clone, Copy, Debug)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature bit, by the name Linux gives it in /proc/cpuinfo.
#[derive(Debug)]
struct Feature {
    name: &'static str,
    leaf: u32,
    reg: Reg,
    bit: u32,
}

const fn feature(name: &'static str, leaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature { name, leaf, reg, bit }
}

/// Features that `--cpuid-hide` accepts. Leaf 7 means subleaf 0.
const FEATURES: &[Feature] = &[
    feature("fma", 1, Reg::Ecx, 12),
    feature("cx16", 1, Reg::Ecx, 13),
    feature("pcid", 1, Reg::Ecx, 17),
    feature("sse4_1", 1, Reg::Ecx, 19),
    feature("sse4_2", 1, Reg::Ecx, 20),
    feature("x2apic", 1, Reg::Ecx, 21),
    feature("movbe", 1, Reg::Ecx, 22),
    feature("popcnt", 1, Reg::Ecx, 23),
    feature("tsc_deadline_timer", 1, Reg::Ecx, 24),
    feature("aes", 1, Reg::Ecx, 25),
    feature("xsave", 1, Reg::Ecx, 26),
    feature("avx", 1, Reg::Ecx, 28),
    feature("f16c", 1, Reg::Ecx, 29),
    feature("rdrand", 1, Reg::Ecx, 30),
    feature("fsgsbase", 7, Reg::Ebx, 0),
    feature("avx2", 7, Reg::Ebx, 5),
    feature("smep", 7, Reg::Ebx, 7),
    feature("bmi2", 7, Reg::Ebx, 8),
    feature("erms", 7, Reg::Ebx, 9),
    feature("invpcid", 7, Reg::Ebx, 10),
    feature("avx512f", 7, Reg::Ebx, 16),
    feature("rdseed", 7, Reg::Ebx, 18),
    feature("smap", 7, Reg::Ebx, 20),
    feature("umip", 7, Reg::Ecx, 2),
    feature("pku", 7, Reg::Ecx, 3),
    feature("la57", 7, Reg::Ecx, 16),
    feature("fsrm", 7, Reg::Edx, 4),
    feature("pdpe1gb", 0x8000_0001, Reg::Edx, 26),
    feature("rdtscp", 0x8000_0001, Reg::Edx, 27),
    // KVM's paravirtual features (leaf 0x4000_0001), by their KVM_FEATURE_
    // names. These three make the guest issue hypercalls (vmcall).
    feature("kvm_pv_unhalt", KVM_FEATURES_LEAF, Reg::Eax, 7),
    feature("kvm_pv_send_ipi", KVM_FEATURES_LEAF, Reg::Eax, 11),
    feature("kvm_pv_sched_yield", KVM_FEATURES_LEAF, Reg::Eax, 13),
];

const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Features that only work together with another one: hiding the first
/// hides the rest too, so a guest never sees e.g. AVX without XSAVE.
const DEPENDENTS: &[(&str, &[&str])] = &[
    ("xsave", &["avx", "avx2", "fma", "f16c", "avx512f"]),
    ("avx", &["avx2", "fma", "f16c", "avx512f"]),
];

const LEAF1_ECX_OSXSAVE: u32 = 27;
const LEAF1_ECX_HYPERVISOR: u32 = 31;
const LEAF_XSAVE: u32 = 0xd;

/// Names accepted by `--cpuid-hide`.
pub fn feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.name)
}

/// Resolves user-given names (with their dependents) into the features to
/// clear; an unknown name is an error naming it.
pub fn resolve_hidden(names: &[String]) -> Result<Vec<&'static str>, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in names {
        let f = FEATURES.iter().find(|f| f.name == name.as_str()).ok_or_else(|| {
            format!(
                "unknown CPUID feature '{name}' (known: {})",
                feature_names().collect::<Vec<_>>().join(",")
            )
        })?;
        out.push(f.name);
        if let Some((_, deps)) = DEPENDENTS.iter().find(|(n, _)| *n == f.name) {
            out.extend(deps.iter().copied());
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Adapts KVM's supported CPUID for vCPU `apic_id` of `cpu_count`, hiding
/// `hidden` (names from `resolve_hidden`).
pub fn filter_cpuid(cpuid: &mut CpuId, apic_id: u8, cpu_count: u8, hidden: &[&str]) {
    let hide_xsave = hidden.contains(&"xsave");
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Initial APIC ID and logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(cpu_count) << 16);
                entry.edx |= 1 << 28; // HTT: the count above is valid
                entry.ecx |= 1 << LEAF1_ECX_HYPERVISOR;
                if hide_xsave {
                    entry.ecx &= !(1 << LEAF1_ECX_OSXSAVE);
                }
            }
            // Extended topology: the x2APIC ID is in EDX.
            0xb | 0x1f => entry.edx = u32::from(apic_id),
            LEAF_XSAVE if hide_xsave => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
        for f in FEATURES.iter().filter(|f| hidden.contains(&f.name)) {
            let leaf_matches = f.leaf == entry.function && (f.leaf != 7 || entry.index == 0);
            if leaf_matches {
                *reg_mut(entry, f.reg) &= !(1 << f.bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: 0,
                ebx: 0x0001_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: u32::MAX,
                ecx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ebx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 9,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_FEATURES_LEAF,
                eax: u32::MAX,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_and_count_are_per_vcpu() {
        let mut c = sample();
        filter_cpuid(&mut c, 3, 4, &[]);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_eq!(c.as_slice()[4].edx, 3);
    }

    #[test]
    fn hiding_xsave_hides_avx_and_leaf_d() {
        let hidden = resolve_hidden(&["xsave".into()]).unwrap();
        assert!(hidden.contains(&"avx2"));
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1, &hidden);
        let s = c.as_slice();
        assert_eq!(s[0].ecx & (1 << 26 | 1 << 27 | 1 << 28), 0);
        assert_eq!(s[1].ebx & (1 << 5), 0);
        assert_eq!(s[3].eax, 0);
        assert_ne!(s[0].ecx & (1 << 13), 0, "cx16 untouched");
    }

    #[test]
    fn subleaf_1_of_leaf_7_is_untouched() {
        let hidden = resolve_hidden(&["smap".into()]).unwrap();
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1, &hidden);
        assert_eq!(c.as_slice()[1].ebx & (1 << 20), 0);
        assert_eq!(c.as_slice()[2].ebx, u32::MAX);
    }

    #[test]
    fn kvm_paravirtual_features_can_be_hidden() {
        let hidden = resolve_hidden(&["kvm_pv_send_ipi".into(), "kvm_pv_unhalt".into()]).unwrap();
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1, &hidden);
        assert_eq!(c.as_slice()[5].eax, !((1 << 11) | (1 << 7)));
    }

    #[test]
    fn unknown_feature_is_an_error() {
        let err = resolve_hidden(&["warp-drive".into()]).unwrap_err();
        assert!(err.contains("warp-drive"));
    }
}
