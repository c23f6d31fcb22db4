//! What a machine is made of, as given on the command line: RAM, vCPUs, the
//! guest image, and the workload the guest runs.

use guest_images::abi::{self, param};
use serde::{Deserialize, Serialize};

/// Errors in a machine or workload description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Bad size '{0}': expected a number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("Bad workload item '{0}': expected key=value")]
    Item(String),
    #[error("Unknown workload key '{0}' (known: wset, rate, fill, read, readset, cpu, pattern, bpc, period, hb_us, timer_hz, idle)")]
    Key(String),
    #[error("Bad value for workload key '{key}': '{value}'")]
    Value { key: String, value: String },
    #[error("vCPU count {0} is outside 1..={max}", max = abi::MAX_VCPUS)]
    Vcpus(u64),
    #[error("Working set of {wset_mib} MiB does not fit in {mem_mib} MiB of RAM (at most {max_mib} MiB)")]
    WsetTooLarge {
        wset_mib: u64,
        mem_mib: u64,
        max_mib: u64,
    },
}

/// Parses `512`, `64K`, `256M`, `1G`, `1.5G` into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(ConfigError::Size(s.into())),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| ConfigError::Size(s.into()))?;
    if !v.is_finite() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(ConfigError::Size(s.into()));
    }
    Ok((v * mult as f64) as u64)
}

/// The workload the guest runs (seeds 001 and 002), all rates for the
/// whole VM (split evenly over the vCPUs by the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Working set filled at boot and held (MiB).
    pub wset_mib: u64,
    /// Pages dirtied per second.
    pub write_rate: u64,
    /// Share of each page rewritten when dirtied (%).
    pub fill_pct: u64,
    /// Pages read (and checked) per second.
    pub read_rate: u64,
    /// Pages read are the first `read_set_mib` of the working set (0 = all).
    pub read_set_mib: u64,
    /// Share of each millisecond in an ALU loop (%).
    pub cpu_load_pct: u64,
    /// Dirtying order: sequential (cyclic, as seed 002) or random.
    pub random: bool,
    /// Seed 002's BPC: blocks (pages) dirtied per cycle; 0 = use `write_rate`.
    pub bpc: u64,
    /// Seed 002's PERIOD: cycle length in ms.
    pub period_ms: u64,
    /// Heartbeat interval (µs, at most 1000).
    pub hb_us: u64,
    /// Timer frequency (Hz) of every vCPU but vCPU 0; vCPU 0, the guest's
    /// heartbeat clock, ticks at least at the heartbeat rate when halting.
    pub timer_hz: u64,
    /// What a vCPU does when nothing is due.
    #[serde(default)]
    pub idle: Idle,
}

/// What a guest vCPU does when it has nothing to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Idle {
    /// Halt until the next timer tick, as a real guest does (`HLT`): the
    /// host sees an idle vCPU.
    #[default]
    Halt,
    /// Spin on `pause`: the host sees a busy vCPU whatever the workload
    /// (for experiments that want one).
    Spin,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            wset_mib: 16,
            write_rate: 0,
            fill_pct: 100,
            read_rate: 0,
            read_set_mib: 0,
            cpu_load_pct: 0,
            random: false,
            bpc: 0,
            period_ms: 100,
            hb_us: 1000,
            timer_hz: 100,
            idle: Idle::Halt,
        }
    }
}

impl Workload {
    /// Parses `wset=256M,rate=20000,read=50000,fill=100,...`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut w = Self::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::Item(item.into()))?;
            let bad = || ConfigError::Value {
                key: k.into(),
                value: v.into(),
            };
            let num = || v.parse::<u64>().map_err(|_| bad());
            match k {
                "wset" => w.wset_mib = parse_size(v).map_err(|_| bad())? >> 20,
                "readset" => w.read_set_mib = parse_size(v).map_err(|_| bad())? >> 20,
                "rate" => w.write_rate = num()?,
                "read" => w.read_rate = num()?,
                "fill" => {
                    w.fill_pct =
                        num().and_then(|f| (1..=100).contains(&f).then_some(f).ok_or_else(bad))?
                }
                "cpu" => {
                    w.cpu_load_pct = num().and_then(|f| (f <= 100).then_some(f).ok_or_else(bad))?
                }
                "pattern" => {
                    w.random = match v {
                        "seq" | "sequential" => false,
                        "random" => true,
                        _ => return Err(bad()),
                    }
                }
                "bpc" => w.bpc = num()?,
                "period" => {
                    w.period_ms = num().and_then(|p| (p > 0).then_some(p).ok_or_else(bad))?
                }
                "hb_us" => {
                    w.hb_us =
                        num().and_then(|p| (1..=1000).contains(&p).then_some(p).ok_or_else(bad))?
                }
                "timer_hz" => {
                    w.timer_hz =
                        num().and_then(|p| (1..=1000).contains(&p).then_some(p).ok_or_else(bad))?
                }
                "idle" => {
                    w.idle = match v {
                        "halt" => Idle::Halt,
                        "spin" => Idle::Spin,
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(ConfigError::Key(k.into())),
            }
        }
        Ok(w)
    }
}

/// A whole machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest: an embedded guest's name or a path to an ELF.
    pub guest: String,
    /// The workload.
    pub workload: Workload,
}

impl MachineConfig {
    /// Checks the parts that do not need KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || u64::from(self.vcpus) > abi::MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus.into()));
        }
        let mem_mib = self.mem_bytes >> 20;
        let max_mib = mem_mib.saturating_sub(abi::WSET_GPA >> 20);
        if self.workload.wset_mib > max_mib {
            return Err(ConfigError::WsetTooLarge {
                wset_mib: self.workload.wset_mib,
                mem_mib,
                max_mib,
            });
        }
        Ok(())
    }

    /// The probe's parameter table (see `guest_images::abi::param`).
    pub fn probe_params(&self, tsc_khz: u32) -> Vec<u32> {
        let w = &self.workload;
        let mut p = vec![0u32; param::COUNT as usize];
        let mut set = |k: u64, v: u64| p[k as usize] = v.min(u64::from(u32::MAX)) as u32;
        set(param::MAGIC, abi::PROBE_MAGIC);
        set(param::VERSION, abi::VERSION);
        set(param::VCPUS, self.vcpus.into());
        set(param::MEM_MIB, self.mem_bytes >> 20);
        set(param::TSC_KHZ, tsc_khz.into());
        set(param::WSET_MIB, w.wset_mib);
        set(param::WRITE_RATE, w.write_rate);
        set(param::FILL_PCT, w.fill_pct);
        set(param::READ_RATE, w.read_rate);
        set(param::READ_SET_MIB, w.read_set_mib);
        set(param::CPU_LOAD_PCT, w.cpu_load_pct);
        set(
            param::PATTERN,
            if w.random {
                abi::PATTERN_RANDOM
            } else {
                abi::PATTERN_SEQUENTIAL
            },
        );
        set(param::HB_US, w.hb_us);
        set(param::TIMER_HZ, w.timer_hz);
        set(param::BPC, w.bpc);
        set(param::PERIOD_MS, w.period_ms);
        set(
            param::IDLE,
            match w.idle {
                Idle::Halt => abi::IDLE_HALT,
                Idle::Spin => abi::IDLE_SPIN,
            },
        );
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn workload_parses_the_issue_example() {
        let w = Workload::parse("wset=256M,rate=20000,read=50000,fill=100").unwrap();
        assert_eq!(
            (w.wset_mib, w.write_rate, w.read_rate, w.fill_pct),
            (256, 20000, 50000, 100)
        );
        assert!(matches!(
            Workload::parse("fill=0"),
            Err(ConfigError::Value { .. })
        ));
        assert!(matches!(
            Workload::parse("speed=3"),
            Err(ConfigError::Key(_))
        ));
        assert!(matches!(Workload::parse("rate"), Err(ConfigError::Item(_))));
        assert_eq!(Workload::parse("").unwrap().idle, Idle::Halt);
        assert_eq!(Workload::parse("idle=spin").unwrap().idle, Idle::Spin);
        assert!(matches!(
            Workload::parse("idle=nap"),
            Err(ConfigError::Value { .. })
        ));
    }

    #[test]
    fn working_set_must_fit() {
        let c = MachineConfig {
            mem_bytes: 64 << 20,
            vcpus: 1,
            guest: "workload".into(),
            workload: Workload::parse("wset=64M").unwrap(),
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::WsetTooLarge { .. })
        ));
    }
}
