//! KVM_HC_MAP_GPA_RANGE (KVM's hypercall 12, as SEV and TDX guests use it)
//! as an ultracall: decrypted = SHARE, encrypted = UNSHARE.
//!
//! KVM's hypercalls.rst: a0 = first guest-physical address, a1 = number of
//! 4 KiB pages, a2 = attributes (bits 0-3 the *preferred* page size, bit 4
//! encrypted, bits 5-63 reserved, zero). The page size is a hint: KVM's
//! SEV-SNP code passes the 2 MiB hint with a1 still counting 4 KiB pages, so
//! it never scales the length here.

use super::{Function, Status};

pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
const ENCRYPTED: u64 = 1 << 4;
const PAGE_SIZE_HINT: u64 = 0xf;
/// 4 KiB, 2 MiB, 1 GiB.
const LARGEST_PAGE_SIZE_HINT: u64 = 2;
const RESERVED: u64 = !(ENCRYPTED | PAGE_SIZE_HINT);

/// KVM's hypercall error numbers (include/uapi/linux/kvm_para.h), returned
/// negated.
const KVM_EPERM: u64 = 1;
const KVM_EFAULT: u64 = 14;
const KVM_EINVAL: u64 = 22;
const KVM_ENOSYS: u64 = 1000;

/// The ultracall a hypercall asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conversion {
    pub function: Function,
    pub gpa: u64,
    pub npages: u64,
}

fn negated(errno: u64) -> u64 {
    errno.wrapping_neg()
}

/// The ultracall for hypercall `nr` with `args`, or the `ret` that refuses
/// it. Range checks are the gate's.
pub fn decode(nr: u64, args: &[u64; 6]) -> Result<Conversion, u64> {
    if nr != KVM_HC_MAP_GPA_RANGE {
        return Err(negated(KVM_ENOSYS));
    }
    let [gpa, npages, attrs, ..] = *args;
    if attrs & RESERVED != 0 || attrs & PAGE_SIZE_HINT > LARGEST_PAGE_SIZE_HINT {
        return Err(negated(KVM_EINVAL));
    }
    let function = if attrs & ENCRYPTED != 0 {
        Function::Unshare
    } else {
        Function::Share
    };
    Ok(Conversion { function, gpa, npages })
}

/// The hypercall's `ret` for the ultracall's status.
pub fn ret(status: Status) -> u64 {
    match status {
        Status::Ok => 0,
        Status::NotSecure => negated(KVM_EPERM),
        Status::HostError => negated(KVM_EFAULT),
        Status::UnknownFunction
        | Status::Unaligned
        | Status::ZeroLength
        | Status::OutOfRange
        | Status::AlreadySecure => negated(KVM_EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(gpa: u64, npages: u64, attrs: u64) -> Result<Conversion, i64> {
        decode(12, &[gpa, npages, attrs, 0xdead, 0xbeef, 0xf00d]).map_err(|r| r as i64)
    }

    fn conversion(function: Function, gpa: u64, npages: u64) -> Result<Conversion, i64> {
        Ok(Conversion { function, gpa, npages })
    }

    #[test]
    fn decrypted_shares_and_encrypted_unshares() {
        assert_eq!(decoded(0x20_0000, 3, 0), conversion(Function::Share, 0x20_0000, 3));
        assert_eq!(decoded(0x20_0000, 3, 0x10), conversion(Function::Unshare, 0x20_0000, 3));
    }

    #[test]
    fn page_size_is_a_hint_that_does_not_scale_the_length() {
        for hint in 0..=2 {
            assert_eq!(
                decoded(0x40_0000, 512, hint),
                conversion(Function::Share, 0x40_0000, 512)
            );
            assert_eq!(
                decoded(0x40_0000, 512, 0x10 | hint),
                conversion(Function::Unshare, 0x40_0000, 512)
            );
        }
    }

    #[test]
    fn unknown_page_sizes_and_reserved_bits_are_invalid() {
        for attrs in [3, 0xf, 0x13, 0x20, 0x30, 1 << 63, u64::MAX] {
            assert_eq!(decoded(0, 1, attrs), Err(-22), "attrs {attrs:#x}");
        }
    }

    #[test]
    fn lengths_and_addresses_pass_through_for_the_gate_to_check() {
        // Overflowing and wrapping ranges, zero and unaligned ones: the
        // gate refuses them with its own statuses, mapped by `ret`.
        assert_eq!(decoded(0, u64::MAX, 0), conversion(Function::Share, 0, u64::MAX));
        assert_eq!(decoded(!0xfff, 2, 0x10), conversion(Function::Unshare, !0xfff, 2));
        assert_eq!(decoded(0x801, 0, 0), conversion(Function::Share, 0x801, 0));
    }

    #[test]
    fn other_hypercalls_are_not_implemented() {
        for nr in [0, 1, 5, 11, 13, u64::MAX] {
            assert_eq!(decode(nr, &[0; 6]).map_err(|r| r as i64), Err(-1000), "nr {nr}");
        }
    }

    #[test]
    fn statuses_become_negative_kvm_errnos() {
        assert_eq!(ret(Status::Ok), 0);
        assert_eq!(ret(Status::NotSecure) as i64, -1);
        assert_eq!(ret(Status::HostError) as i64, -14);
        for s in [
            Status::UnknownFunction,
            Status::Unaligned,
            Status::ZeroLength,
            Status::OutOfRange,
            Status::AlreadySecure,
        ] {
            assert_eq!(ret(s) as i64, -22, "{s:?}");
        }
    }
}
