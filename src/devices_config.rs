//! `--disk`, `--net`, `--rng` and `--console`: virtio devices as the user
//! names them, `key=value` lists such as `path=disk.img,readonly=on`.

use std::path::PathBuf;
use veil_devices::dma::DmaMode;

/// How the guest reaches a virtio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Mmio,
    Pci,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            _ => Err(format!("invalid transport '{s}': expected mmio or pci")),
        }
    }
}

/// Settings every virtio device accepts.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Common {
    pub transport: Transport,
    /// None: the VM-wide `--dma`.
    pub dma: Option<DmaMode>,
    /// In platform mode, fail FEATURES_OK for drivers without ACCESS_PLATFORM.
    pub insist: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub common: Common,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    Tap(String),
    Loopback,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackendConfig,
    pub mac: Option<[u8; 6]>,
    pub common: Common,
}

/// A device with nothing to configure but the common settings (rng, console).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PlainConfig {
    pub common: Common,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid {key}={v}: expected on or off")),
    }
}

/// Splits `a=1,b,c=3` into pairs (a bare word has an empty value).
fn pairs(spec: &str) -> Vec<(&str, &str)> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Applies a common key; false when `key` is not one.
fn common_key(c: &mut Common, key: &str, value: &str) -> Result<bool, String> {
    match key {
        "transport" => c.transport = value.parse()?,
        "dma" => c.dma = Some(value.parse()?),
        "insist" => c.insist = on_off(key, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn unknown(kind: &str, key: &str) -> String {
    format!("invalid --{kind} option '{key}'")
}

pub fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut readonly = false;
    let mut common = Common::default();
    for (k, v) in pairs(spec) {
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "readonly" | "ro" => readonly = on_off(k, if v.is_empty() { "on" } else { v })?,
            _ if common_key(&mut common, k, v)? => {}
            _ => return Err(unknown("disk", k)),
        }
    }
    let path = path.ok_or_else(|| format!("invalid --disk '{spec}': path=FILE is required"))?;
    Ok(DiskConfig { path, readonly, common })
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("invalid MAC address '{s}': expected six hex bytes like 52:54:00:12:34:56");
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(format!(
            "invalid MAC address '{s}': a multicast address cannot name a NIC"
        ));
    }
    Ok(mac)
}

pub fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let mut backend = None;
    let mut mac = None;
    let mut common = Common::default();
    for (k, v) in pairs(spec) {
        match k {
            "tap" if !v.is_empty() && v.len() < 16 => backend = Some(NetBackendConfig::Tap(v.to_string())),
            "tap" => return Err(format!("invalid tap name '{v}': 1 to 15 characters")),
            "loopback" => backend = Some(NetBackendConfig::Loopback),
            "mac" => mac = Some(parse_mac(v)?),
            _ if common_key(&mut common, k, v)? => {}
            _ => return Err(unknown("net", k)),
        }
    }
    let backend = backend.ok_or_else(|| format!("invalid --net '{spec}': give tap=NAME or loopback"))?;
    Ok(NetConfig { backend, mac, common })
}

pub fn parse_plain(kind: &str, spec: &str) -> Result<PlainConfig, String> {
    let mut common = Common::default();
    for (k, v) in pairs(spec) {
        if !common_key(&mut common, k, v)? {
            return Err(unknown(kind, k));
        }
    }
    Ok(PlainConfig { common })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d = parse_disk("path=/tmp/a.img,readonly=on,transport=pci,dma=platform").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.readonly);
        assert_eq!(
            d.common,
            Common {
                transport: Transport::Pci,
                dma: Some(DmaMode::Platform),
                insist: false
            }
        );
        assert!(!parse_disk("path=x").unwrap().readonly);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=x,readonly=maybe").is_err());
        assert!(parse_disk("path=x,transport=usb").is_err());
        assert!(parse_disk("path=x,colour=blue").unwrap_err().contains("colour"));
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=veil0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(n.backend, NetBackendConfig::Tap("veil0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(
            parse_net("loopback,transport=pci").unwrap().common.transport,
            Transport::Pci
        );
        assert!(parse_net("mac=52:54:00:00:00:01").is_err());
        assert!(parse_net("tap=").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert!(parse_net("loopback,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("loopback,mac=zz").is_err());
    }

    #[test]
    fn plain() {
        assert_eq!(parse_plain("rng", "").unwrap(), PlainConfig::default());
        assert_eq!(
            parse_plain("rng", "transport=pci").unwrap().common.transport,
            Transport::Pci
        );
        assert!(parse_plain("rng", "speed=fast").is_err());
    }
}
