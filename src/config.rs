//! What a VM is made of, as the user said it: flags, a JSON file, or both.
//!
//! Parsing here turns every bad value into a one-line message; nothing past
//! this point has to re-check user input.

use crate::devices_config::{parse_disk, parse_net, parse_plain, DiskConfig, NetConfig, PlainConfig};
use serde::Deserialize;
use std::path::PathBuf;
use veil_devices::dma::DmaMode;

/// Where the 8250's output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for SerialOutput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "off" => Ok(SerialOutput::Off),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(SerialOutput::File(path.into())),
                _ => Err(format!(
                    "invalid serial output '{s}': expected stdout, off or file=PATH"
                )),
            },
        }
    }
}

/// How veil enters the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the ELF has the note, else the Linux 64-bit boot protocol.
    #[default]
    Auto,
    /// The PVH entry (32-bit, `hvm_start_info` in EBX); an error without the note.
    Pvh,
    /// The Linux 64-bit boot protocol (`boot_params` in RSI).
    Linux64,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "pvh" => Ok(BootProtocol::Pvh),
            "linux64" => Ok(BootProtocol::Linux64),
            _ => Err(format!("invalid --boot '{s}': expected auto, pvh or linux64")),
        }
    }
}

/// Whether guest RAM should sit on 2 MiB pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Huge pages where the host gives them without configuration, else
    /// 4 KiB pages with one warning.
    #[default]
    Auto,
    /// Huge pages or an error.
    On,
    /// Always 4 KiB pages (a plain memfd).
    Off,
}

/// `--memory`: `SIZE` or `size=SIZE[,hugepages=on|off|auto][,file=PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    pub hugepages: HugePages,
    /// A file the user provides as guest RAM (e.g. on a hugetlbfs mount).
    pub file: Option<PathBuf>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: VmConfig::DEFAULT_MEMORY,
            hugepages: HugePages::Auto,
            file: None,
        }
    }
}

impl std::str::FromStr for MemoryConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut size = None;
        let mut config = MemoryConfig::default();
        for (i, item) in s.split(',').enumerate() {
            match item.split_once('=') {
                None if i == 0 => size = Some(parse_size(item)?),
                Some(("size", v)) => size = Some(parse_size(v)?),
                Some(("hugepages", v)) => {
                    config.hugepages = match v {
                        "auto" => HugePages::Auto,
                        "on" => HugePages::On,
                        "off" => HugePages::Off,
                        _ => return Err(format!("invalid --memory hugepages={v}: expected on, off or auto")),
                    }
                }
                Some(("file", v)) if !v.is_empty() => config.file = Some(v.into()),
                _ => {
                    return Err(format!(
                        "invalid --memory '{s}': expected SIZE or size=SIZE[,hugepages=on|off|auto][,file=PATH]"
                    ))
                }
            }
        }
        config.size = size.ok_or_else(|| format!("invalid --memory '{s}': no size"))?;
        Ok(config)
    }
}

/// Parses sizes like `256M`, `2G`, `65536` or `64KiB` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let bad = || format!("invalid size '{s}': expected a number with an optional K, M or G suffix (e.g. 256M)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Everything `veil run` needs, after defaults are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// None boots the built-in test guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory: MemoryConfig,
    pub cpus: u8,
    pub serial: SerialOutput,
    pub timeout_secs: Option<f64>,
    pub cpuid_hide: Vec<String>,
    /// How the kernel is entered.
    pub boot: BootProtocol,
    /// Each thread runs under its seccomp filter (src/sandbox.rs).
    pub seccomp: bool,
    /// DMA mode of every device that does not choose its own.
    pub dma: DmaMode,
    /// A virtio-iommu translates for the platform and auto devices.
    pub iommu: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub rngs: Vec<PlainConfig>,
    pub consoles: Vec<PlainConfig>,
}

impl VmConfig {
    pub const DEFAULT_MEMORY: u64 = 256 << 20;
    pub const MAX_CPUS: u8 = 254;

    pub fn describe(&self) -> String {
        let kernel = self
            .kernel
            .as_ref()
            .map_or_else(|| "built-in test guest".to_string(), |p| p.display().to_string());
        format!("{kernel}, {} MiB, {} vCPU(s)", self.memory.size >> 20, self.cpus)
    }
}

/// The JSON form of the settings (`--config FILE.json`); same names as the
/// flags, with `-` written as `_`. Unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory: Option<SizeValue>,
    pub cpus: Option<u64>,
    pub serial: Option<String>,
    pub log_level: Option<String>,
    pub timeout: Option<f64>,
    pub cpuid_hide: Option<Vec<String>>,
    pub boot: Option<String>,
    pub seccomp: Option<String>,
    pub dma: Option<String>,
    pub iommu: Option<bool>,
    pub disk: Option<Vec<String>>,
    pub net: Option<Vec<String>>,
    pub rng: Option<Vec<String>>,
    pub console: Option<Vec<String>>,
}

/// A size in a config file: `"256M"` or a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }

    /// The `--memory` form: a size, or the full `size=..,hugepages=..` list.
    pub fn memory(&self) -> Result<MemoryConfig, String> {
        match self {
            SizeValue::Bytes(n) => Ok(MemoryConfig {
                size: *n,
                ..Default::default()
            }),
            SizeValue::Text(s) => s.parse(),
        }
    }
}

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
    }
}

/// Device lists from the flags replace those of the file, kind by kind.
fn device_specs(flags: Option<Vec<String>>, file: Option<Vec<String>>) -> Vec<String> {
    flags.or(file).unwrap_or_default()
}

fn check_cpus(n: u64) -> Result<u8, String> {
    match u8::try_from(n) {
        Ok(c) if (1..=VmConfig::MAX_CPUS).contains(&c) => Ok(c),
        _ => Err(format!("invalid --cpus {n}: expected 1 to {}", VmConfig::MAX_CPUS)),
    }
}

fn check_timeout(t: f64) -> Result<f64, String> {
    if t.is_finite() && t > 0.0 {
        Ok(t)
    } else {
        Err(format!("invalid --timeout {t}: expected a positive number of seconds"))
    }
}

/// Merges the file (if any) with the flags, given in the same form: a
/// setting from the flags wins. Then applies the defaults.
pub fn resolve(file: ConfigFile, flags: ConfigFile) -> Result<VmConfig, String> {
    let memory = match flags.memory.or(file.memory) {
        Some(v) => v.memory()?,
        None => MemoryConfig::default(),
    };
    let serial = match flags.serial.or(file.serial) {
        Some(s) => s.parse()?,
        None => SerialOutput::Stdout,
    };
    Ok(VmConfig {
        kernel: flags.kernel.or(file.kernel),
        initrd: flags.initrd.or(file.initrd),
        cmdline: flags.cmdline.or(file.cmdline),
        memory,
        cpus: check_cpus(flags.cpus.or(file.cpus).unwrap_or(1))?,
        serial,
        timeout_secs: flags.timeout.or(file.timeout).map(check_timeout).transpose()?,
        cpuid_hide: flags.cpuid_hide.or(file.cpuid_hide).unwrap_or_default(),
        boot: flags
            .boot
            .or(file.boot)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or_default(),
        seccomp: match flags.seccomp.or(file.seccomp).as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => return Err(format!("invalid --seccomp '{other}': expected on or off")),
        },
        dma: flags
            .dma
            .or(file.dma)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(DmaMode::Bypass),
        iommu: flags.iommu.or(file.iommu).unwrap_or(false),
        disks: device_specs(flags.disk, file.disk)
            .iter()
            .map(|s| parse_disk(s))
            .collect::<Result<_, _>>()?,
        nets: device_specs(flags.net, file.net)
            .iter()
            .map(|s| parse_net(s))
            .collect::<Result<_, _>>()?,
        rngs: device_specs(flags.rng, file.rng)
            .iter()
            .map(|s| parse_plain("rng", s))
            .collect::<Result<_, _>>()?,
        consoles: device_specs(flags.console, file.console)
            .iter()
            .map(|s| parse_plain("console", s))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn memory_specs() {
        let plain: MemoryConfig = "1G".parse().unwrap();
        assert_eq!(
            (plain.size, plain.hugepages, plain.file),
            (1 << 30, HugePages::Auto, None)
        );
        let full: MemoryConfig = "size=512M,hugepages=off,file=/dev/hugepages/vm".parse().unwrap();
        assert_eq!(full.size, 512 << 20);
        assert_eq!(full.hugepages, HugePages::Off);
        assert_eq!(full.file.as_deref(), Some(std::path::Path::new("/dev/hugepages/vm")));
        assert_eq!(
            "2G,hugepages=on".parse::<MemoryConfig>().unwrap().hugepages,
            HugePages::On
        );
        for bad in [
            "hugepages=on",
            "1G,hugepages=yes",
            "1G,file=",
            "1G,color=red",
            "size=1G,2G",
            "",
        ] {
            let err = bad.parse::<MemoryConfig>().unwrap_err();
            assert!(err.starts_with("invalid"), "{bad}: {err}");
        }
    }

    #[test]
    fn serial_specs() {
        assert_eq!("stdout".parse(), Ok(SerialOutput::Stdout));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialOutput::File("/tmp/x".into())));
        assert!("file=".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
    }

    #[test]
    fn flags_override_file_and_defaults_apply() {
        let file: ConfigFile = serde_json::from_str(r#"{"memory": "1G", "cpus": 2, "cmdline": "a"}"#).unwrap();
        let flags = ConfigFile {
            cpus: Some(4),
            ..Default::default()
        };
        let c = resolve(file, flags).unwrap();
        assert_eq!((c.memory.size, c.cpus, c.cmdline.as_deref()), (1 << 30, 4, Some("a")));
        assert_eq!(c.serial, SerialOutput::Stdout);
        let d = resolve(ConfigFile::default(), ConfigFile::default()).unwrap();
        assert_eq!((d.memory.size, d.cpus, d.kernel), (VmConfig::DEFAULT_MEMORY, 1, None));
        assert_eq!(d.memory.hugepages, HugePages::Auto);
    }

    #[test]
    fn bad_values_are_errors() {
        let bad_cpus = ConfigFile {
            cpus: Some(0),
            ..Default::default()
        };
        assert!(resolve(ConfigFile::default(), bad_cpus).unwrap_err().contains("--cpus"));
        let many = ConfigFile {
            cpus: Some(300),
            ..Default::default()
        };
        assert!(resolve(ConfigFile::default(), many).is_err());
        let t = ConfigFile {
            timeout: Some(-1.0),
            ..Default::default()
        };
        assert!(resolve(ConfigFile::default(), t).is_err());
        assert!(serde_json::from_str::<ConfigFile>(r#"{"memroy": "1G"}"#).is_err());
        let bytes: ConfigFile = serde_json::from_str(r#"{"memory": 67108864}"#).unwrap();
        assert_eq!(resolve(bytes, ConfigFile::default()).unwrap().memory.size, 64 << 20);
    }
}
