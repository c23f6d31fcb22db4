//! A token bucket, to emulate a slower link than loopback.

use std::time::{Duration, Instant};

/// Sends at most `rate` bytes per second on average, in bursts of at most
/// `burst` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket for `bytes_per_s`, with a burst of 10 ms worth (≥ 64 KiB).
    pub fn new(bytes_per_s: u64) -> Self {
        let rate = bytes_per_s as f64;
        let burst = (rate / 100.0).max(65536.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Waits until `n` bytes may be sent, then takes them.
    pub fn consume(&mut self, n: usize) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
        }
    }
}

/// Parses `1Gbit`, `100Mbit`, `500M` (bytes), `2G` (bytes) into bytes/s.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| t.split_at(i))
        .unwrap_or((t, ""));
    let v: f64 = num.parse().map_err(|_| format!("bad bandwidth '{s}'"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        _ => {
            return Err(format!(
                "bad bandwidth unit in '{s}' (use Mbit, Gbit, M, G)"
            ))
        }
    };
    let b = v * mult;
    if !b.is_finite() || b < 1.0 {
        return Err(format!("bad bandwidth '{s}'"));
    }
    Ok(b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_parse() {
        assert_eq!(parse_bandwidth("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("50M"), Ok(50_000_000));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("0").is_err());
    }

    #[test]
    fn bucket_enforces_the_rate() {
        let mut b = TokenBucket::new(10_000_000);
        let t = Instant::now();
        for _ in 0..40 {
            b.consume(65536);
        }
        // 2.6 MB at 10 MB/s, minus one burst: at least ~0.2 s.
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
    }
}
