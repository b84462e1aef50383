pub const PROBE_ELF: &[u8] = &[];
