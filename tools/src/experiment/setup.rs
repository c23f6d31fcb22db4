//! One cell's setup, resolved from the tree of [`super::spec`]: the
//! command lines of `vmm run`, `vmm receive` and `vmm migrate`, the link,
//! and the inputs of seed 001's model where they are known.
//!
//! Flags are passed through by name (`max_downtime = "50ms"` becomes
//! `--max-downtime 50ms`, `verify = true` becomes `--verify`), so that
//! every flag of the CLI is a possible factor; the CLI itself checks them.

use migration::model::{predict, Mode, Params, Prediction};
use serde_json::{Map, Value};

/// Bytes in a guest page.
const PAGE: f64 = 4096.0;

/// The link between source and destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Loopback,
    /// A veth pair into a namespace, shaped with tc tbf at this rate
    /// (tc syntax: `1gbit`), which is `bytes_s` bytes per second.
    Tbf {
        rate: String,
        bytes_s: f64,
    },
}

/// What a cell runs.
#[derive(Debug, Clone)]
pub struct Setup {
    pub run_args: Vec<String>,
    pub receive_args: Vec<String>,
    pub migrate_args: Vec<String>,
    pub link: Link,
    /// Seed 001's inputs, when the mode and the link's rate are known.
    pub model: Option<(Mode, Params)>,
}

impl Setup {
    /// Reads a setup tree (see [`super::spec::Spec::setup_of`]).
    pub fn resolve(tree: &Value) -> Result<Self, String> {
        let empty = Map::new();
        let table = |k: &str| tree[k].as_object().unwrap_or(&empty);
        let link = parse_link(&tree["link"])?;
        let run_args = run_args(table("guest"))?;
        let receive_args = flags(table("receive"), &["listen", "secret", "api_socket"])?;
        let migrate_args = flags(table("migration"), &["to", "secret", "api_socket", "json"])?;
        let model = model_inputs(table("guest"), table("migration"), table("model"), &link);
        Ok(Self {
            run_args,
            receive_args,
            migrate_args,
            link,
            model,
        })
    }

    /// Seed 001's prediction for this cell, if the model applies.
    pub fn predict(&self) -> Option<Prediction> {
        let (mode, p) = self.model?;
        predict(mode, &p).ok()
    }
}

fn parse_link(v: &Value) -> Result<Link, String> {
    let s = v.as_str().ok_or("link must be a string")?;
    if s == "loopback" {
        return Ok(Link::Loopback);
    }
    let rate = s
        .strip_prefix("tbf:")
        .ok_or_else(|| format!("unknown link '{s}' (loopback or tbf:RATE)"))?;
    let bytes_s = migration::rate_limit::parse_bandwidth(rate)? as f64;
    Ok(Link::Tbf {
        rate: rate.to_ascii_lowercase(),
        bytes_s,
    })
}

/// `vmm run` arguments from the `[guest]` table.
fn run_args(guest: &Map<String, Value>) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    for (key, v) in guest {
        let flag = match key.as_str() {
            "memory" | "vcpus" => format!("--{key}"),
            "image" => "--guest".into(),
            "workload" => {
                args.extend(["--workload".into(), workload_string(v)?]);
                continue;
            }
            other => {
                return Err(format!(
                    "unknown guest key '{other}' (memory, vcpus, workload, image)"
                ))
            }
        };
        args.extend([flag, scalar(key, v)?]);
    }
    Ok(args)
}

/// `wset=16M,rate=2000` from a table (or a string as it is).
fn workload_string(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(m) => {
            let parts: Result<Vec<String>, String> = m
                .iter()
                .map(|(k, v)| Ok(format!("{k}={}", scalar(k, v)?)))
                .collect();
            Ok(parts?.join(","))
        }
        _ => Err("workload must be a table or a string".into()),
    }
}

fn scalar(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!("{key}: expected a string or a number, got {v}")),
    }
}

/// `--flag value` for each key; `true` is the bare flag, `false` none.
fn flags(table: &Map<String, Value>, refused: &[&str]) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    for (key, v) in table {
        if refused.contains(&key.as_str()) {
            return Err(format!("'{key}' is set by the experiment itself"));
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match v {
            Value::Bool(true) => args.push(flag),
            Value::Bool(false) | Value::Null => {}
            other => args.extend([flag, scalar(key, other)?]),
        }
    }
    Ok(args)
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.parse().ok())
}

/// A size (`16M`, or a plain number of bytes) in the model's MB (10⁶ B).
fn size_mb(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().map(|b| b / 1e6),
        Value::String(s) => vmm::config::parse_size(s).ok().map(|b| b as f64 / 1e6),
        _ => None,
    }
}

/// Seed 001's inputs: V = the working set (what the guest populated), w
/// and r = its write and read rates, μ = the link's rate (tbf, or the
/// `--bandwidth` cap, the lower of both), l = the hybrid's threshold, or
/// what `--max-downtime` (default 300 ms) leaves at μ; φ and ws from the
/// `[model]` table (defaults 1 and 0: this engine's push has the link to
/// itself but for demand pages, and its state is a few KiB).
fn model_inputs(
    guest: &Map<String, Value>,
    migration: &Map<String, Value>,
    knobs: &Map<String, Value>,
    link: &Link,
) -> Option<(Mode, Params)> {
    let mode: Mode = migration
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("pre")
        .parse()
        .ok()?;
    let link_mb_s = match link {
        Link::Tbf { bytes_s, .. } => Some(bytes_s / 1e6),
        Link::Loopback => None,
    };
    let cap_mb_s = migration
        .get("bandwidth")
        .and_then(Value::as_str)
        .and_then(|b| migration::rate_limit::parse_bandwidth(b).ok())
        .map(|b| b as f64 / 1e6);
    let mu = match (link_mb_s, cap_mb_s) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let workload = guest.get("workload").and_then(Value::as_object)?;
    let v = workload
        .get("wset")
        .or(guest.get("memory"))
        .and_then(size_mb)?;
    let pages_s = |k: &str| workload.get(k).and_then(number).unwrap_or(0.0);
    let max_downtime_ms = migration
        .get("max_downtime")
        .and_then(Value::as_str)
        .and_then(|d| crate::migrate::parse_duration_ms(d).ok())
        .unwrap_or(300.0);
    let l = knobs
        .get("l_mb")
        .and_then(number)
        .or_else(|| migration.get("threshold").and_then(size_mb))
        .unwrap_or(max_downtime_ms / 1e3 * mu);
    let p = Params {
        v,
        r: pages_s("read") * PAGE / 1e6,
        w: pages_s("rate") * PAGE / 1e6,
        mu,
        l,
        phi: knobs.get("phi").and_then(number).unwrap_or(1.0),
        ws: knobs.get("ws_mb").and_then(number).unwrap_or(0.0),
    };
    Some((mode, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_pass_through_by_name() {
        let tree = json!({
            "guest": {"memory": "128M", "workload": {"wset": "16M", "rate": 2000}},
            "migration": {"mode": "pre", "max_downtime": "50ms", "verify": true, "auto_converge": false},
            "receive": {"prefault": true},
            "link": "tbf:1gbit",
        });
        let s = Setup::resolve(&tree).unwrap();
        assert_eq!(
            s.run_args,
            ["--memory", "128M", "--workload", "rate=2000,wset=16M"]
        );
        assert_eq!(
            s.migrate_args,
            ["--max-downtime", "50ms", "--mode", "pre", "--verify"]
        );
        assert_eq!(s.receive_args, ["--prefault"]);
        assert_eq!(
            s.link,
            Link::Tbf {
                rate: "1gbit".into(),
                bytes_s: 125e6
            }
        );
        let (mode, p) = s.model.unwrap();
        assert_eq!(mode, Mode::Pre);
        assert!(
            (p.mu - 125.0).abs() < 1e-9 && (p.l - 6.25).abs() < 1e-9,
            "{p:?}"
        );
        assert!((p.v - 16.777216).abs() < 1e-9);
    }

    #[test]
    fn the_experiment_keeps_its_own_flags() {
        let tree = json!({"migration": {"to": "tcp:1.2.3.4:5"}, "link": "loopback"});
        assert!(Setup::resolve(&tree).is_err());
        let tree = json!({"link": "udp:1"});
        assert!(Setup::resolve(&tree).is_err());
    }
}
